"""STAR (and the bi-encoder training it is built on) with a tiny random BERT over the synthetic collection."""

import numpy as np
import pandas as pd
import pytest
import torch

from pyterrier_coder import losses
from pyterrier_coder.adore import Adore
from pyterrier_coder.encoders import _PROBE_TEXT, DenseEncoder, DenseIndex
from pyterrier_coder.embeddings import EmbeddingStore
from pyterrier_coder.retrievers import BM25
from pyterrier_coder.star import Star, negative_mask

from conftest import crash_at_loss, quiet

FAST = dict(lr=1e-3, warmup=0, schedule='constant', batch_size=4, eval_every=5, device='cpu', verbose=False)


@pytest.fixture(scope='module')
def setup(bi_encoder_setup):
    return bi_encoder_setup


def star(setup, path, **options):
    ds, encoder, base, bm25 = setup
    return Star(encoder, path, **{'corpus': ds, **FAST, 'max_steps': 10, **options})


def fitted(setup, path, **options):
    ds, encoder, base, bm25 = setup
    model = star(setup, path, **options)
    train, qrels = ds.get_topics('train'), ds.get_qrels('train')
    quiet((bm25 % 20 >> model).fit, train, qrels, train, qrels)
    return model


def _weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


def _corpus(ds):
    docs = list(ds.get_corpus_iter(verbose=False))
    return [d['docno'] for d in docs], [d['text'] for d in docs]


def _index_vectors(flex, docnos):
    store = EmbeddingStore(flex)
    return store.vecs[store.ids(docnos)]


# --- the loss and its negatives ----------------------------------------------------------------------------------

def test_pairwise_loss_by_hand():
    scores = torch.tensor([[2.0, 1.0, 0.0], [0.5, 1.5, 3.0]])
    positives = torch.tensor([0, 1])
    negatives = torch.tensor([[False, True, True], [False, False, True]])    # (0,0) and (1,1) are the positives
    # pairs: q0 (d1, d2), q1 (d2); q1's d0 is masked (say it is judged relevant to q1)
    expected = (np.log1p(np.exp(1.0 - 2.0)) + np.log1p(np.exp(0.0 - 2.0)) + np.log1p(np.exp(3.0 - 1.5))) / 3
    assert losses.in_batch_pairwise_logistic(scores, positives, negatives).item() == pytest.approx(expected, rel=1e-6)
    # the listwise alternative on the same pairs: mean over queries of -log softmax of the positive among its negatives
    q0 = -np.log(np.exp(2.0) / (np.exp(2.0) + np.exp(1.0) + np.exp(0.0)))
    q1 = -np.log(np.exp(1.5) / (np.exp(1.5) + np.exp(3.0)))
    assert losses.in_batch_softmax(scores, positives, negatives).item() == pytest.approx((q0 + q1) / 2, rel=1e-6)
    # no negative at all: zero, with a graph
    none = torch.zeros_like(negatives)
    scores.requires_grad_(True)
    for fn in (losses.in_batch_pairwise_logistic, losses.in_batch_softmax):
        loss = fn(scores, positives, none)
        assert loss.item() == 0 and loss.requires_grad


def test_the_negatives_of_a_batch():
    # three queries: positives 10, 11, 12; hard negatives 20, 21 (query 2 has none); query 1 has 10 judged relevant
    documents = np.array([[10, 20], [11, 21], [12, -1]])
    excluded = [np.array([10]), np.array([10, 11]), np.array([12])]
    unique, positives, negatives = negative_mask(documents, excluded, hard_negatives=True, random_negatives=True)
    assert unique.tolist() == [10, 11, 12, 20, 21]
    assert positives.tolist() == [0, 1, 2]
    assert negatives.astype(int).tolist() == [[0, 1, 1, 1, 1],     # the others' positives and hard negatives
                                              [0, 0, 1, 1, 1],     # 10 is judged relevant to query 1: masked
                                              [1, 1, 0, 1, 1]]
    # not shared: a query's own hard negatives, and of the other queries only their positives
    _, _, unshared = negative_mask(documents, excluded, hard_negatives=True, random_negatives=True,
                                   share_hard_negatives=False)
    assert unshared.astype(int).tolist() == [[0, 1, 1, 1, 0],
                                             [0, 0, 1, 0, 1],
                                             [1, 1, 0, 0, 0]]
    _, _, hard_only = negative_mask(documents, excluded, hard_negatives=True, random_negatives=False)
    assert hard_only.astype(int).tolist() == [[0, 0, 0, 1, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]]
    _, _, random_only = negative_mask(documents[:, :1], excluded, hard_negatives=False, random_negatives=True)
    assert random_only.astype(int).tolist() == [[0, 1, 1], [0, 0, 1], [1, 1, 0]]
    # the same document brought by two queries is encoded once, and is no negative of a query it is relevant to
    unique, positives, negatives = negative_mask(np.array([[10, 11], [11, 10]]), [np.array([10]), np.array([11])],
                                                 hard_negatives=True, random_negatives=True)
    assert unique.tolist() == [10, 11] and positives.tolist() == [0, 1]
    assert negatives.astype(int).tolist() == [[0, 1], [1, 0]]


@pytest.mark.parametrize('share', [True, False])
def test_the_training_loss_is_the_loss_of_the_batch_scores(setup, tmp_path, monkeypatch, share):
    """Star._loss scores each query of the batch against every document the batch brought, encoded by the document
    tower at train_doc_max_length, divides by the temperature and masks with negative_mask."""
    import pyterrier_coder.star as star_module
    model = star(setup, tmp_path / 's.flex', max_steps=1, eval_every=None, lr=0.0, temperature=0.5, batch_size=3,
                 train_doc_max_length=8, share_hard_negatives=share)
    for module in model.encoder.model.modules():      # no dropout: the scores are those of the eval-mode encoders
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    seen = {}
    original_loss, original_fn = model._loss, star_module._LOSS_FUNCTIONS['pairwise']
    monkeypatch.setattr(model, '_loss', lambda batch: seen.update(batch=batch, data=model._data) or
                        original_loss(batch))
    monkeypatch.setitem(star_module._LOSS_FUNCTIONS, 'pairwise',
                        lambda *args: seen.update(args=[a.detach() for a in args]) or original_fn(*args))
    ds, encoder, base, bm25 = setup
    quiet((bm25 % 20 >> model).fit, ds.get_topics('train'), ds.get_qrels('train'))
    batch, data = seen['batch'], seen['data']
    scores, positives, negatives = seen['args']
    unique, expected_positives, expected_negatives = negative_mask(
        batch[:, 1:], [data.excluded[i] for i in batch[:, 0]], hard_negatives=True, random_negatives=True,
        share_hard_negatives=share)
    q = model.encoder.encode_queries([data.queries[i] for i in batch[:, 0]])
    d = model.doc_encoder.apply_attributes(doc_max_length=8).encode_docs([data.texts[j] for j in unique])
    np.testing.assert_allclose(scores.numpy(), q @ d.T / 0.5, atol=1e-4)
    assert positives.tolist() == expected_positives.tolist()
    assert torch.equal(negatives, torch.from_numpy(expected_negatives)) and negatives.any()
    assert model.history['loss'][0][1] == pytest.approx(
        losses.in_batch_pairwise_logistic(scores, positives, negatives).item(), rel=1e-6)
    # the judged positives of each query are never its negatives, whoever brought them
    for row, i in enumerate(batch[:, 0]):
        assert not negatives[row, np.isin(unique, data.excluded[i])].any()


# --- training both towers and re-encoding ------------------------------------------------------------------------

def test_the_document_tower_trains_and_the_corpus_is_encoded_again_with_it(setup, tmp_path):
    ds, encoder, base, bm25 = setup
    before = _weights(encoder.model)
    model = fitted(setup, tmp_path / 'star.flex')
    assert all(torch.equal(v, encoder.model.state_dict()[k]) for k, v in before.items())   # the caller's: untouched
    assert model.doc_encoder is model.encoder and _changed(before, model.doc_encoder.model)
    docnos, texts = _corpus(ds)
    vecs = _index_vectors(model.dense_index.flex, docnos)
    assert not np.allclose(vecs, _index_vectors(base.flex, docnos), atol=1e-3)
    np.testing.assert_allclose(vecs, model.doc_encoder.encode_docs(texts), atol=1e-5)
    assert model.dense_index.version() == model.weights_version()
    h = model.history
    assert h['steps'] == 10 and h['eval'][0][0] == 0 and h['training_data']['train_queries'] == 10
    assert h['training_data']['validation_queries'] == 10 and h['training_data']['validation_pool'] > 10
    # what it learnt: better than the starting encoder's own index on the training queries
    topics, qrels = ds.get_topics('train'), ds.get_qrels('train')
    from pyterrier_coder.evaluation import evaluate
    after = evaluate(model.retriever(50)(topics), qrels, 'nDCG@10', topics['qid'])
    assert after > evaluate(base.retriever(50)(topics), qrels, 'nDCG@10', topics['qid']) + 0.1


def test_separate_towers_train_both(setup, tmp_path):
    ds, encoder, base, bm25 = setup
    before = _weights(encoder.model)
    model = fitted(setup, tmp_path / 'two.flex', separate_towers=True)
    assert model.doc_encoder is not model.encoder
    assert _changed(before, model.encoder.model) and _changed(before, model.doc_encoder.model)
    q, d = model.encoder.model.state_dict(), model.doc_encoder.model.state_dict()
    assert any(not torch.equal(q[k], d[k]) for k in q)
    docnos, texts = _corpus(ds)
    np.testing.assert_allclose(_index_vectors(model.dense_index.flex, docnos), model.doc_encoder.encode_docs(texts),
                               atol=1e-5)
    scores = model(ds.get_topics('dev'))
    query_vecs = model.encoder.encode_queries(scores['query'].tolist())
    doc_vecs = model.doc_encoder.encode_docs([dict(zip(docnos, texts))[d] for d in scores['docno']])
    np.testing.assert_allclose(scores['score'], (query_vecs * doc_vecs).sum(1), atol=1e-5)


@pytest.mark.parametrize('options', [dict(random_negatives=False), dict(hard_negatives=False), dict(loss='softmax'),
                                     dict(min_label=2, lower_labels='ignore')])
def test_variants_learn(setup, tmp_path, options):
    model = fitted(setup, tmp_path / 'v.flex', max_steps=15, **options)
    h = model.history
    assert h['best_metric'] > h['eval'][0][1]


def test_gradient_checkpointing_gives_the_same_training_and_is_switched_off_after(setup, tmp_path):
    plain = fitted(setup, tmp_path / 'a.flex', max_steps=4, eval_every=None)
    checkpointed = fitted(setup, tmp_path / 'b.flex', max_steps=4, eval_every=None, gradient_checkpointing=True)
    for k, v in plain.encoder.model.state_dict().items():
        torch.testing.assert_close(checkpointed.encoder.model.state_dict()[k], v, rtol=1e-4, atol=1e-5)
    assert not any(getattr(m, 'gradient_checkpointing', False) for m in checkpointed.encoder.model.modules())
    assert any(getattr(m, 'gradient_checkpointing', None) is False for m in checkpointed.encoder.model.modules())


def test_hard_negatives_from_the_base_index_for_plain_topics(setup, tmp_path):
    ds, encoder, base, bm25 = setup
    model = star(setup, tmp_path / 'p.flex', base_index=base, hard_negative_depth=5)
    train, qrels = ds.get_topics('train'), ds.get_qrels('train')
    quiet(model.fit, train, qrels, ds.get_topics('train'), qrels)
    assert model.history['training_data']['queries_without_negatives'] == 0
    with pytest.raises(ValueError, match='no candidates.*base_index'):
        star(setup, tmp_path / 'q.flex').fit(train, qrels)
    with pytest.raises(ValueError, match='index_path is the base index'):
        star(setup, base.flex.index_path, base_index=base)


def test_resume_after_an_interruption_gives_the_same_weights(setup, tmp_path):
    ds, encoder, base, bm25 = setup
    train, qrels = ds.get_topics('train'), ds.get_qrels('train')
    res = (bm25 % 20)(train)
    options = dict(max_steps=9, batch_size=3, eval_every=4)
    reference = star(setup, tmp_path / 'ref.flex', **options)
    quiet(reference.fit, res, qrels, res, qrels)
    checkpoints = dict(checkpoint_dir=str(tmp_path / 'ckpt'), checkpoint_every=4)
    crashing = star(setup, tmp_path / 'run.flex', **options, **checkpoints)
    crash_at_loss(crashing, 6)
    with pytest.raises(KeyboardInterrupt):
        quiet(crashing.fit, res, qrels, res, qrels)
    assert not DenseIndex(encoder, tmp_path / 'run.flex').built()     # nothing encoded from unfinished training
    resumed = star(setup, tmp_path / 'run.flex', **options, **checkpoints)
    quiet(resumed.fit, res, qrels, res, qrels, resume=True)
    assert resumed.history['resumed_at'] == 4
    assert [v for _, v in resumed.history['eval']] == [v for _, v in reference.history['eval']]
    for k, v in reference.encoder.model.state_dict().items():
        assert torch.equal(resumed.encoder.model.state_dict()[k], v), k
    assert resumed.weights_version() == reference.weights_version()
    docnos, _ = _corpus(ds)
    np.testing.assert_array_equal(_index_vectors(resumed.dense_index.flex, docnos),
                                  _index_vectors(reference.dense_index.flex, docnos))
    with pytest.raises(ValueError, match='another run.*other training data'):
        star(setup, tmp_path / 'run.flex', **options, **checkpoints).fit(res[res['qid'] != 'q00'], qrels,
                                                                         resume=True)


def test_an_interrupted_encoding_resumes_and_a_stale_one_is_discarded(setup, tmp_path, monkeypatch):
    ds, encoder, base, bm25 = setup
    model = fitted(setup, tmp_path / 'x.flex', max_steps=3, eval_every=None, index_batch_size=16)
    docnos, texts = _corpus(ds)
    work = tmp_path / 'x.flex.encoding'
    original, calls, encoded = DenseEncoder.encode_docs, {'n': 0}, []

    def failing_at_the_third_chunk(self, texts, batch_size=None):
        if list(texts) == [_PROBE_TEXT]:     # the index's record of its encoder, not a chunk
            return original(self, texts, batch_size)
        calls['n'] += 1
        if calls['n'] == 3:
            raise KeyboardInterrupt
        encoded.append(len(texts))
        return original(self, texts, batch_size)
    monkeypatch.setattr(DenseEncoder, 'encode_docs', failing_at_the_third_chunk)

    def nudge():      # other weights, as another fit would give
        with torch.no_grad():
            next(model.doc_encoder.model.parameters()).add_(0.01)
        model._weights_version = None       # computed once per trained state: this one is new
        calls['n'] = 0
        encoded.clear()

    # training again interrupted while encoding: chunks of the new weights are left
    with pytest.raises(KeyboardInterrupt):
        quiet(model.fit, (bm25 % 20)(ds.get_topics('train')), ds.get_qrels('train'))
    assert len(list(work.glob('chunk*.npz'))) == 2
    nudge()           # ... which are stale for other weights: discarded, everything encoded again
    with pytest.raises(KeyboardInterrupt):
        model.index()
    assert encoded == [16, 16] and len(list(work.glob('chunk*.npz'))) == 2
    encoded.clear()
    model.index()     # the same weights: the two chunks are kept
    assert sum(encoded) == len(docnos) - 32 and not work.exists()
    np.testing.assert_allclose(_index_vectors(model.dense_index.flex, docnos), model.doc_encoder.encode_docs(texts),
                               atol=1e-5)
    encoded.clear()
    model.index()
    assert encoded == []                            # built with these weights: kept as it is
    nudge()
    calls['n'] = -100                               # no interruption this time
    model.index()
    assert sum(encoded) == len(docnos)              # built with other weights: encoded again


def test_an_index_it_did_not_write_is_never_overwritten(setup, tmp_path):
    ds, encoder, base, bm25 = setup
    other = DenseIndex(encoder, tmp_path / 'other.flex', verbose=False).index(ds.get_corpus_iter(verbose=False))
    model = star(setup, other.flex.index_path, max_steps=2)
    train, qrels = ds.get_topics('train'), ds.get_qrels('train')
    with pytest.raises(ValueError, match='did not write'):
        quiet((bm25 % 20 >> model).fit, train, qrels)
    assert not model.fitted and model.history is None          # refused before training
    assert other.version() is None and DenseIndex(encoder, other.flex.index_path).built()
    with pytest.raises(ValueError, match='did not write'):
        model.index()


# --- save / load and what uses the result ------------------------------------------------------------------------

@pytest.mark.parametrize('separate', [False, True])
def test_save_load_round_trip_and_a_plain_encoder_directory(setup, tmp_path, separate):
    ds, encoder, base, bm25 = setup
    model = fitted(setup, tmp_path / 's.flex', separate_towers=separate, min_label=2, loss='softmax',
                   share_hard_negatives=False)
    model.save(tmp_path / 'model')
    texts = ['apple market', 'sweet ripe peach']
    as_encoder = DenseEncoder(str(tmp_path / 'model'), device='cpu')
    assert (as_encoder.pooling, as_encoder.normalize) == ('mean', True)
    np.testing.assert_allclose(as_encoder.encode_queries(texts), model.encoder.encode_queries(texts), atol=1e-6)
    np.testing.assert_allclose(DenseEncoder.load(tmp_path / 'model').encode_docs(texts),
                               model.encoder.encode_docs(texts), atol=1e-6)
    loaded = Star.load(tmp_path / 'model', device='cpu', verbose=False)
    assert loaded.settings() == model.settings() and loaded.fitted and loaded.history['steps'] == 10
    assert loaded.index_path.resolve() == model.index_path.resolve()
    np.testing.assert_allclose(loaded.doc_encoder.encode_docs(texts), model.doc_encoder.encode_docs(texts),
                               atol=1e-6)
    assert loaded.weights_version() == model.weights_version()
    topics = ds.get_topics('dev')
    a, b = model(topics), loaded(topics)
    assert a['docno'].tolist() == b['docno'].tolist()
    np.testing.assert_allclose(a['score'], b['score'], atol=1e-6)
    assert (tmp_path / 'model' / 'doc_encoder').is_dir() == separate
    with pytest.raises(ValueError, match='holds a saved Star'):
        Adore.load(tmp_path / 'model')


def test_adore_trains_over_the_reencoded_index(setup, tmp_path):
    ds, encoder, base, bm25 = setup
    model = fitted(setup, tmp_path / 's.flex', max_steps=5)
    train, qrels = ds.get_topics('train'), ds.get_qrels('train')
    for index in (model.dense_index, model):
        adore = quiet(Adore(index, model.encoder, k=10, max_steps=8, **FAST).fit, train, qrels, train, qrels)
        assert adore.flex.index_path == model.index_path
        assert adore.history['best_metric'] >= adore.history['eval'][0][1]
    # ADORE starts where STAR ended: its first validation is STAR's own retrieval
    from pyterrier_coder.evaluation import evaluate
    start = evaluate(model.retriever(100)(train), qrels, 'nDCG@10', train['qid'])
    assert adore.history['eval'][0][1] == pytest.approx(start, abs=1e-4)


def test_fit_without_a_corpus_trains_on_the_text_column_and_texts(setup, tmp_path):
    ds, encoder, base, bm25 = setup
    train, qrels = ds.get_topics('train'), ds.get_qrels('train')
    with_text = BM25(bm25.path, text=True)
    model = Star(encoder, tmp_path / 'n.flex', texts=bm25.text_loader(), **{**FAST, 'max_steps': 3})
    with pytest.warns(UserWarning, match='call index'):
        (with_text % 10 >> model).fit(train, qrels)
    assert model.fitted and not model.dense_index.built()
    with pytest.raises(RuntimeError, match='no index'):
        model.retriever(10)
    with pytest.raises(ValueError, match='no corpus'):
        model.index()
    model.index(ds)
    assert len(model.retriever(10)(ds.get_topics('dev'))) == 10 * len(ds.get_topics('dev'))


# --- bad input ------------------------------------------------------------------------------------------------

def test_bad_training_data_fails_clearly_before_training(setup, tmp_path):
    ds, encoder, base, bm25 = setup
    train, qrels = ds.get_topics('train'), ds.get_qrels('train')
    res = (bm25 % 20)(train)
    model = star(setup, tmp_path / 'b.flex')
    with pytest.raises(ValueError, match='no training query has a judged positive'):
        quiet(model.fit, res, qrels.assign(label=0))
    with pytest.raises(ValueError, match='the training frame is empty'):
        model.fit(res.iloc[:0], qrels)
    # every candidate judged relevant: the hard-negative source gave nothing to use
    everything = qrels.merge(res[['qid', 'docno']], how='outer').fillna({'label': 1})
    with pytest.raises(ValueError, match='hard-negative source gave no candidates'):
        quiet(model.fit, res, everything)
    with pytest.raises(ValueError, match='corpus has 0 document'):
        star(setup, tmp_path / 'e.flex', corpus=[]).fit(res, qrels)
    with pytest.raises(TypeError, match='read only once'):
        star(setup, tmp_path / 'i.flex', corpus=iter([]))
    with pytest.raises(ValueError, match='valid was given without valid_qrels'):
        model.fit(res, qrels, res)
    assert not model.fitted and not model.dense_index.built()


def test_qrels_naming_unknown_documents_are_counted_and_warned_about(setup, tmp_path):
    ds, encoder, base, bm25 = setup
    train, qrels = ds.get_topics('train'), ds.get_qrels('train')
    extra = pd.DataFrame({'qid': ['q00', 'q01', 'zz'], 'docno': ['nope1', 'nope2', 'd000'], 'label': [2, 2, 2]})
    model = star(setup, tmp_path / 'u.flex', max_steps=2)
    with pytest.warns(UserWarning, match='2 judged positives were left out'):
        (bm25 % 20 >> model).fit(train, pd.concat([qrels, extra]))
    stats = model.history['training_data']
    assert stats['positives_without_text'] == 2 and stats['qrels_for_unknown_queries'] == 1
    assert stats['train_queries'] == 10


def test_input_columns_empty_frames_and_repr(setup, tmp_path):
    ds, encoder, base, bm25 = setup
    model = fitted(setup, tmp_path / 'r.flex', max_steps=2)
    with pytest.raises(KeyError, match=r"Star: the input frame does not have the required columns"):
        model(pd.DataFrame({'qid': ['1'], 'docno': ['d000']}))
    with pytest.raises(KeyError, match='training frame'):
        star(setup, tmp_path / 'c.flex').fit(pd.DataFrame({'qid': ['q00']}), ds.get_qrels('train'))
    with pytest.raises(KeyError, match='qrels frame'):
        star(setup, tmp_path / 'c.flex').fit(ds.get_topics('train'), pd.DataFrame({'qid': ['q00']}))
    retrieved = model(pd.DataFrame({'qid': pd.Series(dtype=str), 'query': pd.Series(dtype=str)}))
    assert len(retrieved) == 0 and {'docno', 'score', 'rank'} <= set(retrieved.columns)
    reranked = model(pd.DataFrame(columns=['qid', 'query', 'docno']))
    assert len(reranked) == 0 and {'score', 'rank'} <= set(reranked.columns)
    assert len(star(setup, tmp_path / 'unfitted.flex')(pd.DataFrame(columns=['qid', 'query']))) == 0
    res = (bm25 % 5)(ds.get_topics('dev'))
    out = model(res)
    assert sorted(out['docno']) == sorted(res['docno']) and (out.groupby('qid')['rank'].min() == 0).all()
    assert repr(model) == (f"Star({model.encoder!r}, {str(tmp_path / 'r.flex')!r}, loss='pairwise', fitted)")
    assert repr(model.retriever(5)) == f'{model!r}.retriever(k=5)'
    assert repr(star(setup, tmp_path / 'h.flex', random_negatives=False, separate_towers=True)).endswith(
        "separate_towers=True, loss='pairwise', random_negatives=False)")
    assert repr(star(setup, tmp_path / 'u.flex', share_hard_negatives=False)).endswith(
        "loss='pairwise', share_hard_negatives=False)")


@pytest.mark.parametrize('bad', [dict(loss='listnet'), dict(hard_negatives=False, random_negatives=False),
                                 dict(negatives_per_query=0), dict(hard_negative_depth=0), dict(temperature=0),
                                 dict(lower_labels='drop'), dict(train_doc_max_length=0),
                                 dict(validation_queries=0), dict(on_missing='skip'), dict(optimizer='lamb')])
def test_settings_are_checked_before_anything_is_built(setup, tmp_path, bad):
    from pyterrier_coder.training import check_settings
    ds, encoder, base, bm25 = setup
    with pytest.raises(ValueError) as early:
        check_settings(Star, bad)
    with pytest.raises(ValueError) as built:
        Star(encoder, tmp_path / 'x.flex', **bad)
    assert str(early.value) == str(built.value) and str(early.value).startswith('Star: ')
    check_settings(Star, {})


def test_apply_attributes_keeps_both_trained_towers(setup, tmp_path):
    import pyterrier as pt
    model = fitted(setup, tmp_path / 'aa.flex', separate_towers=True, max_steps=3)
    changed = pt.inspect.transformer_apply_attributes(model, num_results=7)
    assert changed.num_results == 7 and changed.fitted
    assert changed.weights_version() == model.weights_version()
    texts = ['apple']
    np.testing.assert_allclose(changed.encoder.encode_queries(texts), model.encoder.encode_queries(texts), atol=1e-6)
