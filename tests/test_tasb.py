"""TAS-Balanced: its batch composition (topic clusters, balanced margins), its teachers and losses, and the estimator
on a tiny random BERT over the synthetic collection."""
import numpy as np
import pandas as pd
import pyterrier as pt
import pytest
import torch

from pyterrier_coder import losses
from pyterrier_coder.sampling import MarginPairs, TopicSampler, cluster_queries, default_num_clusters, pair_arrays
from pyterrier_coder.teachers import TeacherCache, dense_teacher_embeddings, score_with_teacher


# --- losses -----------------------------------------------------------------------------------------------------

def test_margin_mse_is_the_mean_squared_error_of_the_margins():
    pos, neg = torch.tensor([3.0, 1.0, 0.5]), torch.tensor([1.0, 2.0, 0.5])
    teacher = torch.tensor([1.0, 0.0, 2.0])
    # margins 2, -1, 0 against 1, 0, 2: errors 1, 1, 4
    assert losses.margin_mse(pos, neg, teacher).item() == pytest.approx(2.0)
    assert losses.margin_mse(pos, neg, teacher, torch.tensor([True, True, False])).item() == pytest.approx(1.0)


def test_in_batch_margin_mse_pairs_each_positive_with_the_masked_passages():
    scores = torch.tensor([[5.0, 1.0, 2.0, 0.0],
                           [1.0, 4.0, 3.0, 3.0]])
    teacher = torch.tensor([[2.0, 1.0, 0.0, 1.0],
                            [0.0, 1.0, 0.0, 2.0]])
    positive = torch.tensor([0, 1])
    mask = torch.tensor([[False, True, True, False],     # query 0: passages 1 and 2
                         [True, False, False, True]])    # query 1: passages 0 and 3
    # query 0: student margins 4, 3; teacher 1, 2 -> errors 9, 1 -> 5
    # query 1: student margins 3, 1; teacher 1, -1 -> errors 4, 4 -> 4
    assert losses.in_batch_margin_mse(scores, teacher, positive, mask).item() == pytest.approx(4.5)
    # a query without any passage is left out of the mean
    mask[1] = False
    assert losses.in_batch_margin_mse(scores, teacher, positive, mask).item() == pytest.approx(5.0)


# --- topic-aware sampling ------------------------------------------------------------------------------------------

def _blobs(sizes, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim)) * 10
    points = np.concatenate([c + rng.normal(size=(n, dim)) * 0.1 for c, n in zip(centres, sizes)])
    truth = np.repeat(np.arange(len(sizes)), sizes)
    return points.astype(np.float32), truth


def test_cluster_queries_finds_well_separated_topics():
    import faiss
    x, truth = _blobs([40, 50, 60])
    labels = cluster_queries(x, 3, seed=3, verbose=False)   # (k-means from a random start: seeds 0-2 end in a local optimum)
    assert sorted(np.bincount(labels).tolist()) == [40, 50, 60]
    # the same partition as the truth (up to renumbering)
    assert len(set(zip(labels.tolist(), truth.tolist()))) == 3
    # one iteration per progress step is faiss's k-means of 20 iterations
    for seed in range(3):
        kmeans = faiss.Kmeans(x.shape[1], 3, niter=20, seed=seed)
        kmeans.train(x)
        same = kmeans.index.search(x, 1)[1][:, 0]
        mine = cluster_queries(x, 3, seed=seed, verbose=False)
        assert len(set(zip(mine.tolist(), same.tolist()))) == len(set(mine.tolist()))


def test_cluster_queries_refuses_more_clusters_than_queries():
    x, _ = _blobs([3, 2])
    with pytest.raises(ValueError, match='5 training queries cannot be clustered into num_clusters=6'):
        cluster_queries(x, 6, verbose=False)
    with pytest.raises(ValueError, match='num_clusters must be an integer'):
        cluster_queries(x, 0, verbose=False)


def test_default_num_clusters_scales_with_the_queries():
    assert default_num_clusters(400_000) == 2000        # the paper's setting
    assert default_num_clusters(2594) == 13
    assert default_num_clusters(10) == 1


def test_topic_batches_come_from_one_cluster_with_n_1():
    clusters = np.repeat(np.arange(5), [10, 12, 8, 20, 9])
    sampler = TopicSampler(clusters, len(clusters), batch_size=8, clusters_per_batch=1)
    batches = sampler(np.random.default_rng(0))
    assert len(batches) == -(-len(clusters) // 8)
    for batch in batches:
        assert len(batch) == 8 and len(set(batch.tolist())) == 8
        assert len(set(clusters[batch].tolist())) == 1
    assert sampler.topped_up == 0


def test_topic_batches_with_n_clusters_take_an_even_share_of_each():
    clusters = np.repeat(np.arange(6), 10)
    sampler = TopicSampler(clusters, len(clusters), batch_size=9, clusters_per_batch=3)
    for batch in sampler(np.random.default_rng(1)):
        counts = np.bincount(clusters[batch], minlength=6)
        assert sorted(counts[counts > 0].tolist()) == [3, 3, 3]


def test_a_small_cluster_is_topped_up_from_another_and_counted():
    clusters = np.array([0, 0] + [1] * 10)
    sampler = TopicSampler(clusters, len(clusters), batch_size=4)
    batches = sampler(np.random.default_rng(3))
    small = [b for b in batches if 0 in clusters[b]]
    assert small and all(len(b) == 4 and len(set(b.tolist())) == 4 for b in batches)
    assert sampler.topped_up == len(small)


def test_random_sampling_is_a_permutation():
    sampler = TopicSampler(None, 10, batch_size=4)
    batches = sampler(np.random.default_rng(0))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(np.concatenate(batches).tolist()) == list(range(10))


def test_more_clusters_per_batch_than_clusters_is_an_error():
    with pytest.raises(ValueError, match='clusters_per_batch=3 is more than the 2'):
        TopicSampler(np.array([0, 1, 1]), 3, batch_size=2, clusters_per_batch=3)


# --- balanced margin sampling ------------------------------------------------------------------------------------

def _skewed_pairs():
    """Query 0: 1000 pairs, 900 of them with margins near 0 and a few in each higher range; bins 5 and 6 are empty.
    Query 1: all pairs have the same margin."""
    rng = np.random.default_rng(0)
    margins = np.concatenate([rng.uniform(0, 0.1, 900), rng.uniform(0.1, 0.5, 60), rng.uniform(0.7, 1.0, 40)])
    margins[0], margins[-1] = 0.0, 1.0          # the range is exactly [0, 1]: bin i is [i/10, (i+1)/10)
    n = len(margins)
    query = np.concatenate([np.zeros(n, int), np.ones(5, int)])
    margins = np.concatenate([margins, np.full(5, 2.0)])
    pos = np.arange(len(query))
    return MarginPairs.build(query, pos, pos + 10_000, margins, num_queries=2, num_bins=10)


def test_balanced_margin_sampling_is_flat_over_the_bins_the_pool_fills():
    pairs = _skewed_pairs()
    rows = pairs.sample(np.zeros(20_000, int), np.random.default_rng(1))
    assert (rows < pairs.offsets[1]).all()                           # pairs of query 0 only
    hist = np.bincount(np.floor(pairs.margins[rows] * 10).clip(0, 9).astype(int), minlength=10)
    filled = [b for b in range(10) if b not in (5, 6)]
    assert hist[5] == hist[6] == 0                                   # nothing to draw there
    share = hist[filled] / hist.sum()
    assert np.allclose(share, 1 / 8, atol=0.015), hist               # flat: 8 bins, ~2,500 draws each
    # random pair sampling follows the pool instead: the first range holds 90 % of the pairs
    plain = pairs.sample(np.zeros(20_000, int), np.random.default_rng(1), balanced=False)
    assert np.mean(pairs.margins[plain] < 0.1) > 0.85


def test_margin_pairs_keep_their_pairs_and_handle_a_single_margin():
    pairs = _skewed_pairs()
    assert pairs.num_pairs == 1005 and len(pairs) == 2
    # every pair keeps its passages and margin through the sort by bin
    assert np.array_equal(pairs.negatives - pairs.positives, np.full(1005, 10_000))
    rows = pairs.sample(np.ones(50, int), np.random.default_rng(0))
    assert (rows >= pairs.offsets[1]).all() and (pairs.margins[rows] == 2.0).all()
    assert pairs.bin_offsets[2] - pairs.bin_offsets[1] == 1          # one bin for one margin


def test_margin_pairs_need_a_pair_for_every_query_and_finite_margins():
    with pytest.raises(ValueError, match='1 training queries have no'):
        MarginPairs.build(np.array([0, 0]), np.array([1, 2]), np.array([3, 4]), np.array([0.1, 0.2]), num_queries=2)
    with pytest.raises(ValueError, match='not finite'):
        MarginPairs.build(np.array([0]), np.array([1]), np.array([2]), np.array([np.nan]), num_queries=1)


def test_pair_arrays_combine_every_positive_with_every_negative():
    query, pos, neg, margin = pair_arrays([[0, 1], [], [5]], [[2, 3, 4], [6], []],
                                          [[1.0, 0.5], [], [2.0]], [[0.0, 1.0, 2.0], [0.3], []])
    assert query.tolist() == [0] * 6                                 # queries 1 and 2 lack a positive / a negative
    assert list(zip(pos.tolist(), neg.tolist())) == [(0, 2), (0, 3), (0, 4), (1, 2), (1, 3), (1, 4)]
    assert margin.tolist() == pytest.approx([1.0, 0.0, -1.0, 0.5, -0.5, -1.5])


# --- teachers ---------------------------------------------------------------------------------------------------

class CountingTeacher(pt.Transformer):
    """Scores a row by the length of its text; counts the rows it was asked to score. ``drop`` leaves rows out,
    ``column`` names its score column, ``nan`` gives NaN scores."""

    def __init__(self, drop=0, column='score', nan=False):
        self.calls = 0
        self.rows = 0
        self.drop, self.column, self.nan = drop, column, nan

    def transform(self, inp):
        self.calls += 1
        self.rows += len(inp)
        out = inp.assign(**{self.column: np.nan if self.nan else inp['text'].str.len().astype(float)})
        return out.iloc[self.drop:]

    def __repr__(self):
        return 'CountingTeacher()'


def _teacher_frame():
    return pd.DataFrame({'qid': ['1', '1', '2', '2', '2'], 'query': ['a', 'a', 'b', 'b', 'b'],
                         'docno': ['d1', 'd2', 'd1', 'd3', 'd4'], 'text': ['x', 'xx', 'x', 'xxx', 'xxxx']})


def test_teacher_scores_every_row_in_query_chunks():
    teacher = CountingTeacher()
    scores = score_with_teacher(teacher, _teacher_frame(), queries_per_call=1, verbose=False)
    assert scores.tolist() == [1, 2, 1, 3, 4]
    assert teacher.calls == 2 and teacher.rows == 5


@pytest.mark.parametrize('teacher, message', [
    (CountingTeacher(column='relevance'), 'returned no score column'),
    (CountingTeacher(drop=1), 'returned no score for 1 of the 5'),
    (CountingTeacher(nan=True), 'not finite')])
def test_a_teacher_that_does_not_score_every_row_is_an_error(teacher, message):
    with pytest.raises(ValueError, match=message):
        score_with_teacher(teacher, _teacher_frame(), verbose=False)


def test_teacher_cache_keeps_arrays_in_memory_and_on_disk(tmp_path):
    cache = TeacherCache(tmp_path / 'cache')
    assert cache.get('pairwise', 'k1') is None
    cache.put('pairwise', 'k1', {'scores': np.arange(3.0)})
    assert cache.get('pairwise', 'k1')['scores'].tolist() == [0, 1, 2]
    again = TeacherCache(tmp_path / 'cache')                         # another process
    assert again.get('pairwise', 'k1')['scores'].tolist() == [0, 1, 2]
    assert again.get('pairwise', 'k2') is None                       # other data or teacher: not reused
    assert TeacherCache().get('pairwise', 'k1') is None


# --- the estimator ------------------------------------------------------------------------------------------------

from pyterrier_coder.coder import Coder   # noqa: E402
from pyterrier_coder.encoders import DenseEncoder   # noqa: E402
from pyterrier_coder.tasb import TasBalanced   # noqa: E402

from conftest import crash_at_loss, quiet   # noqa: E402

FAST = dict(lr=1e-3, warmup=0, schedule='constant', batch_size=4, eval_every=5, device='cpu', verbose=False)


class TextTeacher(pt.Transformer):
    """A pairwise teacher whose score is how often the query's first word occurs in the text (plus a little of its
    length, so that scores differ); counts its calls and the rows it scored."""

    def __init__(self):
        self.calls = self.rows = 0

    @staticmethod
    def score(query, text):
        return text.split().count(query.split()[0]) + len(text) / 1000

    def transform(self, inp):
        self.calls += 1
        self.rows += len(inp)
        return inp.assign(score=[self.score(q, t) for q, t in zip(inp['query'], inp['text'])])

    def __repr__(self):
        return 'TextTeacher()'


@pytest.fixture(scope='module')
def setup(bi_encoder_setup):
    return bi_encoder_setup


def tasb(setup, path, **options):
    ds, encoder, base, bm25 = setup
    settings = {'corpus': ds, 'pairwise_teacher': TextTeacher(), 'in_batch_teacher': encoder, 'num_clusters': 2,
                **FAST, 'max_steps': 6, **options}
    return TasBalanced(encoder, path, **settings)


def candidates(setup, depth=20):
    ds, encoder, base, bm25 = setup
    return (bm25 % depth)(ds.get_topics('train')), ds.get_qrels('train')


def training_data(model, frame, qrels):
    """What fit trains on (the teacher scores, clusters and teacher embeddings included), without training."""
    from pyterrier_coder.bi_encoder_training import DocumentTexts
    from pyterrier_coder.frames import normalise_frame, normalise_qrels
    from pyterrier_coder.text import corpus_reader
    frame = normalise_frame(frame, 'test')
    texts = DocumentTexts([frame], None, corpus_reader(model.corpus, 'test'), 'text', 'test')
    return model._training_data(frame, normalise_qrels(qrels, 'test'), texts)


def _weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_fit_trains_both_towers_encodes_the_corpus_and_serves_pipelines(setup, tmp_path):
    ds, encoder, base, bm25 = setup
    model = tasb(setup, tmp_path / 'tasb.flex')
    before = _weights(model.encoder.model)
    train, qrels = candidates(setup)
    quiet(model.fit, train, qrels, train, qrels)
    assert model.fitted and model.history['steps'] == 6
    assert any(not torch.equal(before[k], v) for k, v in model.encoder.model.state_dict().items())
    stats = model.history['training_data']
    assert stats['train_queries'] == 10 and stats['clusters'] == 2 and stats['pairs'] > 0
    assert model.dense_index.built()
    topics = ds.get_topics('dev')
    single = model.retriever(5)(topics)
    assert len(single) == 5 * len(topics)
    reranked = (bm25 % 5 >> model)(topics)
    assert (reranked.groupby('qid')['rank'].min() == 0).all()
    assert 'fitted' in repr(model) and "sampling='tas-balanced'" in repr(model)
    # CODER fine-tunes its query encoder over the re-encoded index (the CODER paper's own setting)
    coder = Coder(model.dense_index, model.encoder, **FAST, max_steps=2, num_candidates=10)
    quiet(coder.fit, ds.get_topics('train'), qrels)
    assert coder.fitted and len(coder.retriever(5)(topics)) == 5 * len(topics)


def test_the_loss_is_margin_mse_against_both_teachers_by_hand(setup, tmp_path):
    ds, encoder, base, bm25 = setup
    frame, qrels = candidates(setup)
    for supervision in ('dual', 'pairwise', 'in-batch'):
        model = tasb(setup, tmp_path / f'{supervision}.flex', supervision=supervision, in_batch_weight=0.5,
                     pairwise_scale=2.0, in_batch_scale=3.0)
        model._data = data = quiet(training_data, model, frame, qrels)
        batch = model._sample_batches(0, np.random.default_rng(0))[0]
        model.encoder.model.eval()          # no dropout: the same scores twice
        with torch.no_grad():
            got = model._loss(batch).item()
            training = data.training
            queries, rows = batch[:, 0], batch[:, 1]
            pos, neg = data.pairs.positives[rows], data.pairs.negatives[rows]
            docs = sorted(set(pos.tolist()) | set(neg.tolist()))
            q = model._encode_training_queries([training.queries[i] for i in queries]).numpy()
            d = dict(zip(docs, model._encode_training_docs([training.texts[j] for j in docs]).numpy()))
        teacher = TextTeacher.score
        pair_terms, in_batch_terms = [], []
        tq = encoder.encode_queries([training.queries[i] for i in queries]) * 3.0
        td = dict(zip(docs, encoder.encode_docs([training.texts[j] for j in docs])))
        for b in range(len(batch)):
            query = training.queries[queries[b]]
            s = {j: float(q[b] @ d[j]) for j in docs}
            t = {j: float(tq[b] @ td[j]) for j in docs}
            margin = 2.0 * (teacher(query, training.texts[pos[b]]) - teacher(query, training.texts[neg[b]]))
            pair_terms.append(((s[pos[b]] - s[neg[b]]) - margin) ** 2)
            others = [j for j in docs if j != pos[b] and (supervision == 'in-batch' or j != neg[b])]
            in_batch_terms.append(np.mean([((s[pos[b]] - s[j]) - (t[pos[b]] - t[j])) ** 2 for j in others]))
        expected = {'dual': np.mean(pair_terms) + 0.5 * np.mean(in_batch_terms), 'pairwise': np.mean(pair_terms),
                    'in-batch': np.mean(in_batch_terms)}[supervision]
        assert got == pytest.approx(expected, rel=1e-4), supervision


def test_batches_come_from_one_topic_and_pairs_from_balanced_margins(setup, tmp_path):
    frame, qrels = candidates(setup)
    model = tasb(setup, tmp_path / 'x.flex')
    data = quiet(training_data, model, frame, qrels)
    sizes = np.bincount(data.clusters)
    model = tasb(setup, tmp_path / 'y.flex', batch_size=int(sizes.min()))
    model._data = data = quiet(training_data, model, frame, qrels)
    batches = model._sample_batches(0, np.random.default_rng(0))
    for batch in batches:
        assert len(set(data.clusters[batch[:, 0]].tolist())) == 1
        rows = batch[:, 1]
        assert (rows >= data.pairs.offsets[batch[:, 0]]).all() and (rows < data.pairs.offsets[batch[:, 0] + 1]).all()
    # random sampling: every query once per epoch, no clusters computed
    model = tasb(setup, tmp_path / 'z.flex', sampling='random')
    model._data = data = quiet(training_data, model, frame, qrels)
    assert data.clusters is None
    assert sorted(np.concatenate([b[:, 0] for b in model._sample_batches(0, np.random.default_rng(0))])) == \
        list(range(len(data)))


@pytest.mark.parametrize('pairwise', [True, False])
def test_in_batch_supervision_still_balances_pairs_by_teacher_margins(setup, tmp_path, pairwise):
    """With the in-batch teacher alone in the loss, ``tas-balanced`` still draws pairs by margin range: by the
    pairwise teacher's margins when one is given (the paper's static scores), else by the in-batch teacher's."""
    ds, encoder, base, bm25 = setup
    frame, qrels = candidates(setup)
    teacher = TextTeacher() if pairwise else None
    model = tasb(setup, tmp_path / 'x.flex', supervision='in-batch', pairwise_teacher=teacher, in_batch_scale=2.0)
    model._data = data = quiet(training_data, model, frame, qrels)
    pairs = data.pairs
    query = np.repeat(np.arange(len(data)), np.diff(pairs.offsets))
    if pairwise:
        texts, queries = data.training.texts, data.training.queries
        expected = [TextTeacher.score(queries[q], texts[p]) - TextTeacher.score(queries[q], texts[n])
                    for q, p, n in zip(query, pairs.positives, pairs.negatives)]
        assert teacher.calls == 1
    else:
        expected = np.einsum('ij,ij->i', data.teacher_queries[query],
                             data.teacher_docs[pairs.positives] - data.teacher_docs[pairs.negatives])
    np.testing.assert_allclose(pairs.margins, expected, rtol=1e-4, atol=1e-5)
    assert data.stats['balanced_by'] == ('pairwise teacher' if pairwise else 'in-batch teacher')
    # the draw is flat over each query's filled margin ranges, not over its pairs
    counts = np.zeros((len(data), pairs.num_bins))
    rng = np.random.default_rng(0)
    for epoch in range(300):
        rows = np.concatenate([b[:, 1] for b in model._sample_batches(epoch, rng)])
        np.add.at(counts, (query[rows], pairs.bins[rows]), 1)
    filled = np.zeros_like(counts, dtype=bool)
    filled[query, pairs.bins] = True
    assert (filled.sum(1) > 1).all()                     # real margins: more than one range per query
    share = counts / counts.sum(1, keepdims=True)
    expected_share = filled / filled.sum(1, keepdims=True)
    np.testing.assert_allclose(share, expected_share, atol=0.1)
    # the unbalanced cells neither need nor ask the pairwise teacher
    teacher = TextTeacher()
    quiet(training_data, tasb(setup, tmp_path / 'y.flex', supervision='in-batch', sampling='tas',
                              pairwise_teacher=teacher), frame, qrels)
    assert teacher.calls == 0


def test_teacher_scores_are_computed_once_and_reused_from_the_cache(setup, tmp_path):
    frame, qrels = candidates(setup)
    model = tasb(setup, tmp_path / 'a.flex', max_steps=2, eval_every=None)
    teacher = model.pairwise_teacher
    quiet(model.fit, frame, qrels)
    pairs_rows = model.history['training_data']
    assert teacher.calls == 1 and teacher.rows > 0
    rows = teacher.rows
    quiet(model.fit, frame, qrels)                            # the same object fitted again: kept in memory
    assert teacher.calls == 1
    cache = tmp_path / 'teacher'
    first = tasb(setup, tmp_path / 'b.flex', max_steps=2, eval_every=None, teacher_cache=cache,
                 pairwise_teacher=teacher)
    quiet(first.fit, frame, qrels)
    assert teacher.calls == 2 and teacher.rows == 2 * rows
    second = tasb(setup, tmp_path / 'c.flex', max_steps=2, eval_every=None, teacher_cache=cache,
                  pairwise_teacher=teacher)
    quiet(second.fit, frame, qrels)                           # another object (process) with the same cache
    assert teacher.calls == 2
    for k, v in first.encoder.model.state_dict().items():
        assert torch.equal(second.encoder.model.state_dict()[k], v), k
    # other training data is scored anew
    third = tasb(setup, tmp_path / 'd.flex', max_steps=2, eval_every=None, teacher_cache=cache,
                 pairwise_teacher=teacher)
    quiet(third.fit, frame[frame['qid'] != 'q00'], qrels)
    assert teacher.calls == 3
    assert pairs_rows['pairs'] > 0


def test_resume_after_an_interruption_gives_the_same_weights_without_asking_the_teacher(setup, tmp_path):
    frame, qrels = candidates(setup)
    options = dict(max_steps=9, batch_size=3, eval_every=4)
    reference = tasb(setup, tmp_path / 'ref.flex', **options)
    quiet(reference.fit, frame, qrels, frame, qrels)
    checkpoints = dict(checkpoint_dir=str(tmp_path / 'ckpt'), checkpoint_every=4, teacher_cache=tmp_path / 'cache')
    crashing = tasb(setup, tmp_path / 'run.flex', **options, **checkpoints)
    crash_at_loss(crashing, 6)
    with pytest.raises(KeyboardInterrupt):
        quiet(crashing.fit, frame, qrels, frame, qrels)
    teacher = TextTeacher()
    resumed = tasb(setup, tmp_path / 'run.flex', **options, **checkpoints, pairwise_teacher=teacher)
    quiet(resumed.fit, frame, qrels, frame, qrels, resume=True)
    assert teacher.calls == 0                                 # its scores came from the cache on disk
    assert resumed.history['resumed_at'] == 4
    assert [v for _, v in resumed.history['eval']] == [v for _, v in reference.history['eval']]
    for k, v in reference.encoder.model.state_dict().items():
        assert torch.equal(resumed.encoder.model.state_dict()[k], v), k


class DroppingTeacher(TextTeacher):
    def transform(self, inp):
        return super().transform(inp).iloc[1:]


class UnscoredTeacher(TextTeacher):
    def transform(self, inp):
        return super().transform(inp).rename(columns={'score': 'relevance'})


@pytest.mark.parametrize('options, error, message', [
    (dict(pairwise_teacher=UnscoredTeacher()), ValueError, 'returned no score column'),
    (dict(pairwise_teacher=DroppingTeacher()), ValueError, 'returned no score for 1 of the'),
    (dict(num_clusters=11), ValueError, '10 training queries cannot be clustered into num_clusters=11'),
    (dict(pairwise_teacher=None), ValueError, "supervision='dual' needs a pairwise_teacher"),
    (dict(in_batch_teacher=None, supervision='in-batch'), ValueError, "needs an in_batch_teacher"),
    (dict(in_batch_teacher='colbert'), TypeError, 'in_batch_teacher must be a dense model')])
def test_bad_teachers_and_settings_fail_clearly_before_training(setup, tmp_path, options, error, message):
    frame, qrels = candidates(setup)
    model = tasb(setup, tmp_path / 'x.flex', **options)
    with pytest.raises(error, match=message):
        quiet(model.fit, frame, qrels)
    assert not model.fitted and not model.dense_index.built()


def test_queries_without_a_negative_are_skipped_with_a_warning(setup, tmp_path):
    ds, encoder, base, bm25 = setup
    frame, qrels = candidates(setup)
    positives = set(zip(qrels['qid'], qrels['docno']))
    judged_only = frame[[(q, d) in positives for q, d in zip(frame['qid'], frame['docno'])]]
    frame = pd.concat([frame[frame['qid'] != 'q00'], judged_only[judged_only['qid'] == 'q00']])
    model = tasb(setup, tmp_path / 'x.flex', max_steps=2, eval_every=None)
    with pytest.warns(UserWarning, match='skipped 1 of 10 training queries without a negative'):
        model.fit(frame, qrels)
    assert model.history['training_data']['skipped_no_negative'] == 1
    assert model.history['training_data']['train_queries'] == 9
    with pytest.raises(ValueError, match='no training query has both a judged positive'):
        quiet(tasb(setup, tmp_path / 'y.flex').fit, judged_only, qrels)


@pytest.mark.parametrize('bad', [dict(sampling='balanced'), dict(supervision='teacher'), dict(num_bins=0),
                                 dict(clusters_per_batch=1.5), dict(in_batch_weight=0), dict(num_clusters=0),
                                 dict(pairwise_teacher='electra'), dict(pairwise_scale='big')])
def test_settings_are_checked_when_constructed(setup, tmp_path, bad):
    with pytest.raises((ValueError, TypeError)):
        tasb(setup, tmp_path / 'x.flex', **bad)


@pytest.mark.parametrize('sampling', ['random', 'tas', 'tas-balanced'])
@pytest.mark.parametrize('supervision', ['pairwise', 'in-batch', 'dual'])
def test_every_cell_of_the_ablation_grid_gives_a_finite_loss(setup, tmp_path, sampling, supervision):
    frame, qrels = candidates(setup)
    model = tasb(setup, tmp_path / 'x.flex', sampling=sampling, supervision=supervision)
    model._data = quiet(training_data, model, frame, qrels)
    loss = model._loss(model._sample_batches(0, np.random.default_rng(1))[0])
    assert torch.isfinite(loss) and loss.requires_grad


def test_save_and_load_round_trip(setup, tmp_path):
    ds, encoder, base, bm25 = setup
    frame, qrels = candidates(setup)
    model = tasb(setup, tmp_path / 'x.flex', max_steps=2, eval_every=None, sampling='tas', num_bins=4)
    quiet(model.fit, frame, qrels)
    model.save(tmp_path / 'saved')
    loaded = TasBalanced.load(tmp_path / 'saved')
    assert loaded.fitted and loaded.sampling == 'tas' and loaded.num_bins == 4
    topics = ds.get_topics('dev')
    pd.testing.assert_frame_equal(loaded.retriever(5)(topics), model.retriever(5)(topics))
    plain = DenseEncoder(str(tmp_path / 'saved'))             # a plain Hugging Face encoder directory
    np.testing.assert_allclose(plain.encode_queries(['apple']), model.encoder.encode_queries(['apple']), atol=1e-6)


def test_in_batch_teachers_give_inner_product_embeddings(setup, tmp_path):
    ds, encoder, base, bm25 = setup
    docnos = ['d000', 'd011', 'd152']
    text_of = {d['docno']: d['text'] for d in ds.get_corpus_iter(verbose=False)}
    lookup = lambda docnos: [text_of[d] for d in docnos]   # noqa: E731
    queries = ['apple the', 'banana a']
    q, d = dense_teacher_embeddings(encoder, queries, docnos, lookup, verbose=False)
    np.testing.assert_allclose(q, encoder.encode_queries(queries), atol=1e-6)
    np.testing.assert_allclose(d, encoder.encode_docs(lookup(docnos)), atol=1e-6)
    # a DenseIndex reads its index (built with the same encoder: the same vectors)
    q2, d2 = dense_teacher_embeddings(base, queries, docnos, lookup, verbose=False)
    np.testing.assert_allclose(d2, d, atol=1e-5)
    # a Coder encodes with its own query encoder and reads the passages from its index
    coder = Coder(base, encoder, **FAST, max_steps=2, num_candidates=10)
    quiet(coder.fit, ds.get_topics('train'), ds.get_qrels('train'))
    q3, d3 = dense_teacher_embeddings(coder, queries, docnos, lookup, verbose=False)
    np.testing.assert_allclose(q3, coder.encoder.encode_queries(queries), atol=1e-6)
    np.testing.assert_allclose(d3, d, atol=1e-5)
    with pytest.raises(KeyError, match='not in the index of the in-batch teacher'):
        dense_teacher_embeddings(coder, queries, ['d000', 'nope'], lambda ds: ['x'] * len(ds), verbose=False)
    # so does a fitted bi-encoder trainer, over the index it re-encoded
    model = tasb(setup, tmp_path / 'teacher.flex', max_steps=2, eval_every=None)
    quiet(model.fit, *candidates(setup))
    q4, d4 = dense_teacher_embeddings(model, queries, docnos, lookup, verbose=False)
    np.testing.assert_allclose(d4, model.encoder.encode_docs(lookup(docnos)), atol=1e-5)


def test_auto_pairwise_scale_matches_the_in_batch_teachers_margin_spread(setup, tmp_path):
    frame, qrels = candidates(setup)
    model = tasb(setup, tmp_path / 'x.flex', pairwise_scale='auto')
    data = quiet(training_data, model, frame, qrels)
    pairs = data.pairs
    rows = np.arange(pairs.num_pairs)
    query = np.repeat(np.arange(len(data)), np.diff(pairs.offsets))
    in_batch = np.einsum('ij,ij->i', data.teacher_queries[query],
                         data.teacher_docs[pairs.positives[rows]] - data.teacher_docs[pairs.negatives[rows]])
    assert np.std(pairs.margins) == pytest.approx(np.std(in_batch), rel=1e-4)
    assert data.stats['pairwise_scale'] > 0
    raw = quiet(training_data, tasb(setup, tmp_path / 'y.flex'), frame, qrels).pairs.margins
    assert np.std(pairs.margins) / np.std(raw) == pytest.approx(data.stats['pairwise_scale'], rel=1e-4)
    with pytest.raises(ValueError, match="pairwise_scale='auto' .* needs an in_batch_teacher"):
        quiet(training_data, tasb(setup, tmp_path / 'z.flex', pairwise_scale='auto', supervision='pairwise',
                                  in_batch_teacher=None), frame, qrels)


class RecordingTeacher(TextTeacher):
    def transform(self, inp):
        self.seen = inp.copy()
        return super().transform(inp)


def test_the_pairwise_teacher_sees_positives_and_negatives_with_the_first_stage_columns(setup, tmp_path):
    frame, qrels = candidates(setup, depth=5)
    frame = frame[~((frame['qid'] == 'q00') & (frame['docno'] == 'd000'))]     # a positive the stage missed
    teacher = RecordingTeacher()
    model = tasb(setup, tmp_path / 'x.flex', pairwise_teacher=teacher, negative_depth=3)
    data = quiet(training_data, model, frame, qrels).training
    seen = teacher.seen
    assert {'qid', 'query', 'docno', 'text', 'score', 'rank'} <= set(seen.columns)
    assert (seen.groupby('qid', sort=False).ngroup().diff().fillna(0) >= 0).all()     # each query's rows together
    retrieved = frame.assign(qid=frame['qid'].astype(str)).set_index(['qid', 'docno'])['score']
    for i, qid in enumerate(data.qids):
        rows = seen[seen['qid'] == qid]
        docnos = [data.docnos[j] for j in np.concatenate([data.positives[i], data.negatives[i]])]
        assert rows['docno'].tolist() == docnos                                  # positives, then negatives
        assert len(data.negatives[i]) <= 3
        for docno, score in zip(rows['docno'], rows['score']):
            if (qid, docno) in retrieved.index:
                assert score == retrieved[(qid, docno)]
            else:
                assert np.isnan(score)                                           # a positive BM25 missed
    assert np.isnan(seen.set_index(['qid', 'docno']).loc[('q00', 'd000'), 'score'])
