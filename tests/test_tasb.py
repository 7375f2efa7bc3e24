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
