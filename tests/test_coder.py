"""CODER on a tiny random BERT over the synthetic collection: mining, scoring, training, round trips, errors."""
import hashlib
import threading
import warnings

import numpy as np
import pandas as pd
import pyterrier as pt
import pytest
import torch

from pyterrier_coder import losses
from pyterrier_coder.evaluation import evaluate
from pyterrier_coder.adore import Adore
from pyterrier_coder.coder import Coder
from pyterrier_coder.candidates import CandidateSet, index_info, mine_candidates, mine_candidates_to_disk
from pyterrier_coder.embeddings import EmbeddingStore
from pyterrier_coder.frames import normalise_frame

from conftest import crash_at_loss, quiet

FAST = dict(lr=1e-3, optimizer='adamw', warmup=0, schedule='constant', batch_size=4, eval_every=10,
            device='cpu', verbose=False)


@pytest.fixture(scope='module')
def setup(tiny_indexes):
    return tiny_indexes


def _file_hash(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_mining_injects_positives_and_skips_queries_without_positive(setup):
    ds, encoder, dense, bm25 = setup
    store = EmbeddingStore(dense.flex)
    qrels = ds.get_qrels('train')
    q0 = qrels[qrels['qid'] == 'q00']
    candidates = pd.DataFrame({'qid': ['q00'] * 3 + ['zz'], 'query': ['apple'] * 3 + ['nothing'],
                               'docno': ['d050', 'd051', 'd052', 'd050'], 'score': [3.0, 2.0, 1.0, 1.0]})
    with pytest.warns(UserWarning, match='skipped 1 of 2'):
        cands = mine_candidates(candidates, qrels, store, num_candidates=2)
    assert cands.qids == ['q00']
    row = store.docnos.fwd[cands.docids[0][cands.docids[0] >= 0]].tolist()
    assert row[:2] == ['d050', 'd051']                       # top-2 by score, d052 cut
    assert set(row[2:]) == set(q0['docno'])                  # every judged positive appended
    labels = dict(zip(row, cands.labels[0][:len(row)]))
    assert all(labels[d] == l for d, l in zip(q0['docno'], q0['label']))
    assert cands.num_retrieved.tolist() == [2]
    assert cands.stats['skipped_no_positive'] == 1


def _mined_row(store, cands, i=0):
    ids = cands.docids[i]
    return store.docnos.fwd[ids[ids >= 0]].tolist(), cands.labels[i][ids >= 0].tolist()


def test_mining_appends_only_the_positives_the_first_stage_missed(setup):
    ds, encoder, dense, bm25 = setup
    store = EmbeddingStore(dense.flex)
    candidates = pd.DataFrame({'qid': ['q00'] * 3, 'query': ['apple'] * 3, 'docno': ['d000', 'd050', 'd051'],
                               'score': [3.0, 2.0, 1.0]})
    cands = mine_candidates(candidates, ds.get_qrels('train'), store, num_candidates=3)
    # d000 (label 2) was retrieved and keeps its place; only d001 (label 1) is appended, once
    assert _mined_row(store, cands) == (['d000', 'd050', 'd051', 'd001'], [2.0, 0.0, 0.0, 1.0])


def test_mining_positives_follow_min_label(setup):
    ds, encoder, dense, bm25 = setup
    store = EmbeddingStore(dense.flex)
    qrels = pd.DataFrame({'qid': ['q00', 'q00', 'q01'], 'docno': ['d000', 'd001', 'd011'], 'label': [2, 1, 1]})
    candidates = pd.DataFrame({'qid': ['q00', 'q01'], 'query': ['apple', 'banana'], 'docno': ['d050', 'd050'],
                               'score': [1.0, 1.0]})
    with pytest.warns(UserWarning, match='skipped 1 of 2'):
        cands = mine_candidates(candidates, qrels, store, num_candidates=5, min_label=2)
    assert cands.qids == ['q00']                            # q01 has only a label-1 judgement
    assert _mined_row(store, cands)[0] == ['d050', 'd000']  # d001 (label 1 < min_label) is not appended


@pytest.mark.parametrize('options, target, kept', [
    (dict(), [2, 1, 0, 0], [1, 1, 1, 1]),
    (dict(min_label=2), [2, 0, 0, 0], [1, 1, 1, 1]),
    (dict(min_label=2, lower_labels='ignore'), [2, 0, 0, 0], [1, 0, 1, 1]),
    (dict(label_weights={2: 1.0, 1: 1.0}), [1, 1, 0, 0], [1, 1, 1, 1])])   # not proportional to the labels
def test_loss_is_listnet_of_temperature_scaled_scores_against_the_configured_target(setup, options, target, kept):
    ds, encoder, dense, bm25 = setup
    store = EmbeddingStore(dense.flex)
    ids = store.ids(['d000', 'd001', 'd050', 'd051'])
    coder = Coder(dense, encoder, temperature=0.5, verbose=False, device='cpu', **options)
    coder._train = CandidateSet.from_rows(['q00'], ['apple'], [ids], [np.array([2, 1, 0, 0], np.float32)], [4], {})
    coder.encoder.model.eval()   # no dropout: the loss sees the scores _scores gives
    with torch.no_grad():
        got = coder._loss(np.array([[0]])).item()
        scores = coder._scores(['apple'], ids[None].astype(np.int64), torch.ones(1, 4, dtype=torch.bool))
    expected = losses.listnet_kl(scores / 0.5, torch.tensor([target], dtype=torch.float),
                                 torch.tensor([kept], dtype=torch.bool)).item()
    assert got == pytest.approx(expected, rel=1e-4)


def test_rerank_scores_are_the_inner_products_whatever_the_temperature(setup):
    ds, encoder, dense, bm25 = setup
    coder = Coder(dense, encoder, temperature=0.5, verbose=False, device='cpu')
    res = (bm25 % 10)(ds.get_topics('dev'))
    out = coder(res)
    assert len(out) == len(res) and set(res.columns) <= set(out.columns)
    assert (out.groupby('qid')['rank'].apply(lambda r: list(r) == list(range(len(r))))).all()
    assert (out.groupby('qid')['score'].apply(lambda s: s.is_monotonic_decreasing)).all()
    np.testing.assert_allclose(out['score'], _inner_products(encoder, dense, out), atol=1e-5)
    single = coder.retriever(1000)(ds.get_topics('dev'))     # the same scale as single-stage retrieval
    both = out.merge(single, on=['qid', 'docno'], suffixes=('', '_single'))
    assert len(both) and np.allclose(both['score'], both['score_single'], atol=1e-5)


def test_empty_frame_and_missing_columns_and_docnos(setup):
    ds, encoder, dense, bm25 = setup
    coder = Coder(dense, encoder, verbose=False, device='cpu')
    empty = pd.DataFrame(columns=['qid', 'query', 'docno', 'score', 'rank'])
    out = coder(empty)
    assert len(out) == 0 and {'score', 'rank'} <= set(out.columns)
    retrieved = coder(pd.DataFrame({'qid': pd.Series(dtype=str), 'query': pd.Series(dtype=str)}))   # single stage
    full = coder(pd.DataFrame({'qid': ['q'], 'query': ['apple']}))
    assert retrieved['docno'].dtype == full['docno'].dtype and retrieved['rank'].dtype == full['rank'].dtype
    with pytest.raises(Exception, match='query'):
        coder(pd.DataFrame({'qid': ['1'], 'docno': ['d000']}))
    bad = pd.DataFrame({'qid': ['1', '1'], 'query': ['apple', 'apple'], 'docno': ['d000', 'nope']})
    with pytest.raises(KeyError, match="nope"):
        coder(bad)
    dropping = Coder(dense, encoder, on_missing='drop', verbose=False, device='cpu')
    with pytest.warns(UserWarning, match='dropped 1'):
        assert dropping(bad)['docno'].tolist() == ['d000']
    res = (bm25 % 5)(ds.get_topics('dev'))
    reranked, none = coder(res), coder(res.iloc[:0])    # an empty result has the column types of a non-empty one
    assert len(none) == 0 and (none['rank'].dtype, none['score'].dtype) == (reranked['rank'].dtype, np.float64)


def _inner_products(encoder, dense, out):
    q = encoder.encode_queries(out['query'].tolist())
    d = dense.flex.np_vecs()[EmbeddingStore(dense.flex).ids(out['docno'])]
    return (q * d).sum(1)


def test_dropping_every_docno_of_a_query_leaves_the_other_queries_scores_right(setup):
    ds, encoder, dense, bm25 = setup
    res = (bm25 % 5)(ds.get_topics('dev'))
    gone = pd.DataFrame({'qid': ['0000'] * 2, 'query': ['apple'] * 2, 'docno': ['nope1', 'nope2'],
                         'score': [1.0, 0.5], 'rank': [0, 1]})   # sorts before every other qid
    coder = Coder(dense, encoder, on_missing='drop', verbose=False, device='cpu')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        out = coder(pd.concat([gone, res], ignore_index=True))
    assert '0000' not in set(out['qid']) and len(out) == len(res)
    np.testing.assert_allclose(out['score'], _inner_products(encoder, dense, out), atol=1e-5)
    assert (out.groupby('qid')['rank'].apply(lambda r: list(r) == list(range(len(r))))).all()


def test_small_cpu_score_blocks_give_the_same_scores(setup, monkeypatch):
    # candidates are scored a block of queries at a time on CPU: every block must use its own rows
    ds, encoder, dense, bm25 = setup
    res = (bm25 % 10)(ds.get_topics('train'))
    assert res['qid'].nunique() > 2
    monkeypatch.setattr(Coder, 'CPU_SCORE_BLOCK_BYTES', 1)    # one query per block
    out = Coder(dense, encoder, verbose=False, device='cpu')(res)
    np.testing.assert_allclose(out['score'], _inner_products(encoder, dense, out), atol=1e-5)


def _retrieval_metric(coder, topics, qrels, depth=100):
    return evaluate(coder.retriever(depth)(topics), qrels, coder.config.metric, topics['qid'])


def test_validate_with_retrieve_retrieves_even_from_a_result_frame(setup):
    ds, encoder, dense, bm25 = setup
    topics, qrels = ds.get_topics('train'), ds.get_qrels('train')
    res = (bm25 % 2)(topics)      # reranking 2 BM25 candidates scores differently from retrieving 100
    retrieve = Coder(dense, encoder, validate_with='retrieve', verbose=False, device='cpu')
    rerank = Coder(dense, encoder, validate_with='rerank', verbose=False, device='cpu')
    expected = _retrieval_metric(retrieve, topics, qrels)
    assert retrieve._validation_fn(res, qrels)() == pytest.approx(expected, abs=1e-6)
    assert rerank._validation_fn(res, qrels)() != pytest.approx(expected, abs=1e-6)


def test_retrieval_in_several_inference_batches(setup):
    # _retrieve_ids encodes inference_batch_size queries at a time: each batch its own queries
    ds, encoder, dense, bm25 = setup
    topics, qrels = ds.get_topics('train'), ds.get_qrels('train')
    assert len(topics) > 3
    small = Coder(dense, encoder, validate_with='retrieve', inference_batch_size=3, verbose=False, device='cpu')
    assert small._validation_fn(topics, qrels)() == pytest.approx(_retrieval_metric(small, topics, qrels), abs=1e-6)
    whole = Coder(dense, encoder, inference_batch_size=64, verbose=False, device='cpu')
    np.testing.assert_array_equal(small._retrieve_ids(topics['query'].tolist(), 5),
                                  whole._retrieve_ids(topics['query'].tolist(), 5))


def test_trainer_retriever_uses_the_requested_backend(setup):
    pytest.importorskip('faiss')
    ds, encoder, dense, bm25 = setup
    hnsw = Coder(dense, encoder, verbose=False, device='cpu').retriever(10, backend='hnsw')
    assert repr(hnsw).startswith('Coder(') and repr(hnsw).endswith(".retriever(k=10, backend='hnsw')")
    assert 'FaissRetriever' in repr(hnsw.inner)             # not the exact search
    topics = ds.get_topics('dev')
    assert hnsw(topics).groupby('qid').size().tolist() == [10] * len(topics)


def test_fit_trains_only_the_query_encoder_and_improves(setup):
    ds, encoder, dense, bm25 = setup
    train, qrels = ds.get_topics('train'), ds.get_qrels('train')
    vec_hash = _file_hash(dense.flex.index_path / 'vecs.f4')
    base_weights = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    coder = Coder(dense, encoder, num_candidates=20, max_steps=40, **FAST)
    pipeline = bm25 % 20 >> coder
    before = evaluate(pipeline(train), qrels, 'nDCG@10', train['qid'])
    pipeline.fit(train, qrels, train, qrels)       # validate on train: the tiny random model can only memorise
    after = evaluate(pipeline(train), qrels, 'nDCG@10', train['qid'])
    assert after > before + 0.1, (before, after)
    assert _file_hash(dense.flex.index_path / 'vecs.f4') == vec_hash                # documents untouched
    assert all(torch.equal(v, encoder.model.state_dict()[k]) for k, v in base_weights.items())  # base untouched
    h = coder.history
    assert len(h['loss']) == h['steps'] and h['eval'][0][0] == 0
    assert h['best_metric'] == pytest.approx(after, abs=1e-6)
    assert h['training_data']['train_queries'] == 10
    # single-stage retrieval with the fine-tuned encoder over the same index
    res = coder.retriever(k=10)(train)
    assert res.groupby('qid').size().eq(10).all()
    # named after the fitted Coder, so that pt.Experiment's rows of the base and the fine-tuned retriever differ
    assert repr(coder.retriever(k=10)) == f'{coder!r}.retriever(k=10)' and 'fitted' in repr(coder)
    assert repr(coder.retriever(k=10)) != repr(dense.retriever(k=10))


def test_fit_from_topics_uses_the_index_itself_and_retrieve_validation(setup):
    ds, encoder, dense, bm25 = setup
    train, qrels = ds.get_topics('train'), ds.get_qrels('train')
    coder = Coder(dense, encoder, num_candidates=15, max_steps=30, validate_with='retrieve', **FAST)
    before = evaluate(dense.retriever(100)(train), qrels, 'nDCG@10', train['qid'])
    coder.fit(train, qrels, train, qrels)
    after = evaluate(coder.retriever(100)(train), qrels, 'nDCG@10', train['qid'])
    assert after > before + 0.1, (before, after)
    assert coder.history['eval'][0][1] == pytest.approx(before, abs=1e-4)


@pytest.mark.parametrize('options', [dict(loss='margin'), dict(random_negatives=5),
                                     dict(refresh_every=5), dict(min_label=2, lower_labels='ignore'),
                                     dict(label_weights={2: 1.0, 1: 1.0})])   # not proportional to the labels
def test_training_variants_run_and_learn(setup, options):
    ds, encoder, dense, bm25 = setup
    train, qrels = ds.get_topics('train'), ds.get_qrels('train')
    coder = Coder(dense, encoder, num_candidates=20, max_steps=20, **options, **FAST)
    coder.fit((bm25 % 20)(train), qrels, (bm25 % 20)(train), qrels)
    assert coder.history['best_metric'] > coder.history['eval'][0][1]


def test_refresh_reretrieves_candidates(setup, monkeypatch):
    ds, encoder, dense, bm25 = setup
    coder = Coder(dense, encoder, num_candidates=10, max_steps=12, refresh_every=5, **FAST)
    calls = []
    original = coder._retrieve_ids
    monkeypatch.setattr(coder, '_retrieve_ids', lambda q, k: calls.append(k) or original(q, k))
    coder.fit((bm25 % 10)(ds.get_topics('train')), ds.get_qrels('train'))
    assert calls == [10, 10]        # steps 5 and 10


def test_refresh_keeps_every_judged_positive_with_its_label(setup):
    ds, encoder, dense, bm25 = setup
    store = EmbeddingStore(dense.flex)
    coder = Coder(dense, encoder, num_candidates=2, refresh_every=1, verbose=False, device='cpu')
    ids = store.ids(['d050', 'd051', 'd000', 'd001'])
    coder._train = CandidateSet.from_rows(['q00'], ['apple'], [ids], [np.array([0, 0, 2, 1], np.float32)], [2], {})
    coder._refresh_root = None
    coder._refresh(1)
    row, labels = coder._train.docids[0], coder._train.labels[0]
    kept = row[row >= 0]
    assert len(kept) == len(set(kept.tolist()))                        # no document twice
    label_of = dict(zip(kept.tolist(), labels[row >= 0].tolist()))
    assert label_of[int(ids[2])] == 2.0 and label_of[int(ids[3])] == 1.0
    assert kept[:2].tolist() == coder._retrieve_ids(['apple'], 2)[0].tolist()   # the new retrieval comes first


def test_transformer_scorer_trains_and_refuses_single_stage(setup, tmp_path):
    ds, encoder, dense, bm25 = setup
    train, qrels = ds.get_topics('train'), ds.get_qrels('train')
    coder = Coder(dense, encoder, scorer='transformer', num_candidates=20, max_steps=30, **FAST)
    res = (bm25 % 20)(train)
    coder.fit(res, qrels, res, qrels)
    assert coder.history['best_metric'] > coder.history['eval'][0][1]
    with pytest.raises(ValueError, match='single-stage'):
        coder.retriever()
    # permutation invariance: shuffling the candidate rows does not change any score
    a = coder(res).set_index(['qid', 'docno'])['score']
    b = coder(res.sample(frac=1.0, random_state=1)).set_index(['qid', 'docno'])['score']
    pd.testing.assert_series_equal(a.sort_index(), b.sort_index(), atol=1e-5)
    coder.save(tmp_path / 'tcoder')
    loaded = Coder.load(tmp_path / 'tcoder', dense.flex, device='cpu')
    pd.testing.assert_series_equal(a.sort_index(), loaded(res).set_index(['qid', 'docno'])['score'].sort_index(),
                                   atol=1e-6)


def test_save_load_round_trip(setup, tmp_path):
    ds, encoder, dense, bm25 = setup
    train, qrels = ds.get_topics('train'), ds.get_qrels('train')
    coder = Coder(dense, encoder, num_candidates=20, max_steps=10, **FAST)
    res = (bm25 % 20)(train)
    coder.fit(res, qrels, res, qrels)
    coder.save(tmp_path / 'coder')
    loaded = Coder.load(tmp_path / 'coder', device='cpu')          # index path remembered
    np.testing.assert_allclose(coder(res)['score'], loaded(res)['score'], atol=1e-6)
    assert loaded.history['steps'] == 10 and loaded.fitted
    assert 'fitted' in repr(loaded)
    with pytest.raises(ValueError, match='DenseEncoder'):
        Coder.load(tmp_path / 'coder' / 'encoder')


def test_save_load_keeps_every_setting(setup, tmp_path):
    ds, encoder, dense, bm25 = setup
    chosen = dict(num_candidates=17, loss='margin', temperature=0.5, min_label=2, label_weights={2: 1.0, 1: 0.3},
                  lower_labels='ignore', random_negatives=3, refresh_every=4, num_results=50, on_missing='drop')
    coder = Coder(dense, encoder, lr=3e-5, max_steps=7, verbose=False, device='cpu', **chosen)
    coder.save(tmp_path / 'coder')
    loaded = Coder.load(tmp_path / 'coder', device='cpu', verbose=False)
    assert loaded.settings() == coder.settings()
    assert {name: loaded.settings()[name] for name in chosen} == chosen     # every value differs from its default
    assert (loaded.config.lr, loaded.config.max_steps) == (3e-5, 7)


def test_pt_inspect_lists_settings_and_applies_changes_keeping_the_trained_weights(setup):
    """pt.inspect reads the signature by default, which fails for settings kept in a TrainingConfig (the Jupyter
    schematic then shows none); apply_attributes must keep the fine-tuned encoder and the trained head."""
    ds, encoder, dense, bm25 = setup
    train, qrels = ds.get_topics('train'), ds.get_qrels('train')
    coder = Coder(dense, encoder, scorer='transformer', num_candidates=20, max_steps=3, **FAST)
    res = (bm25 % 20)(train)
    coder.fit(res, qrels)
    attributes = {a.name: a.value for a in pt.inspect.transformer_attributes(coder)}
    assert attributes['index'] is coder.flex and attributes['scorer'] == 'transformer'
    assert attributes['kwargs']['lr'] == FAST['lr'] and attributes['kwargs']['max_steps'] == 3
    assert 'warmup' in attributes['kwargs'] and 'verbose' in attributes['kwargs']   # differs from the defaults
    copy = pt.inspect.transformer_apply_attributes(coder, num_results=7, lr=0.5)
    assert (copy.num_results, copy.config.lr, copy.config.max_steps, copy.scorer) == (7, 0.5, 3, 'transformer')
    assert copy.fitted and copy.encoder is not coder.encoder
    np.testing.assert_allclose(copy(res)['score'], coder(res)['score'], atol=1e-6)   # same encoder and head
    rebuilt = pt.inspect.transformer_apply_attributes(coder, encoder=encoder)          # a different encoder
    assert not rebuilt.fitted and not np.allclose(rebuilt(res)['score'], coder(res)['score'])
    adore = Adore(dense, encoder, k=5, delta_metric='MRR@5', lr=1e-4, verbose=False)
    attributes = {a.name: a.value for a in pt.inspect.transformer_attributes(adore)}
    assert (attributes['k'], attributes['delta_metric']) == (5, 'MRR@5')
    assert attributes['validate_with'] == 'retrieve'
    assert pt.inspect.transformer_apply_attributes(adore, k=9).k == 9
    with pytest.raises(TypeError, match='Coder'):
        pt.inspect.transformer_apply_attributes(coder, no_such_setting=1)


def test_validation_topics_without_qrels_fail(setup):
    """Validation frames without their qrels silently trained without validation (keeping the last weights)."""
    ds, encoder, dense, bm25 = setup
    res = (bm25 % 5)(ds.get_topics('train'))
    with pytest.raises(ValueError, match='Coder.fit: valid was given without valid_qrels'):
        Coder(dense, encoder, max_steps=1, **FAST).fit(res, ds.get_qrels('train'), res)


def test_fit_without_any_positive_fails_clearly(setup):
    ds, encoder, dense, bm25 = setup
    coder = Coder(dense, encoder, max_steps=2, **FAST)
    qrels = pd.DataFrame({'qid': ['q00'], 'docno': ['not-in-index'], 'label': [1]})
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(ValueError, match='no training query'):
            coder.fit((bm25 % 5)(ds.get_topics('train')), qrels)


def test_bad_arguments(setup):
    ds, encoder, dense, bm25 = setup
    for kwargs, match in [(dict(loss='x'), 'loss'), (dict(scorer='x'), 'scorer'), (dict(lr_typo=1), 'unexpected'),
                          (dict(lower_labels='drop'), 'lower_labels')]:
        with pytest.raises((ValueError, TypeError), match=match):
            Coder(dense, encoder, **kwargs)


def test_embedding_store_lookup_gather_and_search_paths(setup, monkeypatch):
    ds, encoder, dense, bm25 = setup
    store = EmbeddingStore(dense.flex)
    vecs = np.asarray(dense.flex.np_vecs())
    docnos = store.docnos.fwd[np.arange(len(store))].astype(str)
    ids = store.ids(docnos[::-1])
    assert (ids == np.arange(len(store))[::-1]).all()
    monkeypatch.setattr(EmbeddingStore, 'EXACT_LOOKUP_MAX_DOCS', 0)        # the large-index (npids) path
    assert (EmbeddingStore(dense.flex).ids(docnos[::-1]) == ids).all()
    with pytest.raises(KeyError, match='nope'):
        EmbeddingStore(dense.flex).ids(['d000', 'nope'])
    grid = np.array([[3, 1, -1], [3, 3, 0]])
    got = store.gather(grid).numpy()
    np.testing.assert_array_equal(got[0, 0], vecs[3])
    np.testing.assert_array_equal(got[0, 2], np.zeros(vecs.shape[1]))
    np.testing.assert_array_equal(got[1], vecs[[3, 3, 0]])
    q = torch.from_numpy(vecs[:4].copy())
    with warnings.catch_warnings():
        warnings.simplefilter('error')                                   # no "non-writable array" warning
        cached = store.search(q, 5)
    assert store._device_vecs is None                                    # on CPU it reads the map, no copy kept
    monkeypatch.setattr(EmbeddingStore, 'SEARCH_CACHE_MAX_BYTES', 0)     # the streamed (blocked) path
    streamed = EmbeddingStore(dense.flex).search(q, 5, block_size=7)
    expected = torch.from_numpy(q.numpy() @ vecs.T).topk(5, dim=1)
    for got_s, got_i in (cached, streamed):
        torch.testing.assert_close(got_s, expected.values)
        assert (got_i == expected.indices).all()


def test_coder_resume_matches_uninterrupted_run(setup, tmp_path):
    ds, encoder, dense, bm25 = setup
    res = (bm25 % 20)(ds.get_topics('train'))
    qrels = ds.get_qrels('train')
    options = dict(num_candidates=20, max_steps=9, **{**FAST, 'batch_size': 3, 'eval_every': 4})
    reference = Coder(dense, encoder, **options).fit(res, qrels, res, qrels)
    crashing = Coder(dense, encoder, checkpoint_dir=str(tmp_path / 'c'), checkpoint_every=4, **options)
    crash_at_loss(crashing, 6)
    with pytest.raises(KeyboardInterrupt):
        crashing.fit(res, qrels, res, qrels)
    resumed = Coder(dense, encoder, checkpoint_dir=str(tmp_path / 'c'), checkpoint_every=4, **options)
    resumed.fit(res, qrels, res, qrels, resume=True)
    assert resumed.history['resumed_at'] == 4
    assert [v for _, v in resumed.history['eval']] == [v for _, v in reference.history['eval']]
    np.testing.assert_array_equal(resumed(res)['score'], reference(res)['score'])
    other_queries = res[res['qid'] != res['qid'].iloc[0]]      # the same settings, other training data
    with pytest.raises(ValueError, match='another run.*other training data'):
        Coder(dense, encoder, checkpoint_dir=str(tmp_path / 'c'), checkpoint_every=4, **options).fit(
            other_queries, qrels, res, qrels, resume=True)
    with pytest.raises(ValueError, match='another run.*other settings'):
        Coder(dense, encoder, checkpoint_dir=str(tmp_path / 'c'), checkpoint_every=4, loss='margin',
              **options).fit(res, qrels, res, qrels, resume=True)


# --- reranking: the vectorised frame handling gives pyterrier's own result -------------------------------------

def _reference_normalise(inp):
    """What normalise_frame returned before it was vectorised (pandas sort_values + duplicated)."""
    frame = inp.copy()
    frame['qid'] = frame['qid'].astype(str)
    frame['docno'] = frame['docno'].astype(str)
    frame['query'] = frame['query'].fillna('').astype(str)
    if 'score' in frame.columns:
        frame = frame.sort_values(['qid', 'score'], ascending=[True, False], kind='stable')
    elif 'rank' in frame.columns:
        frame = frame.sort_values(['qid', 'rank'], kind='stable')
    return frame[~frame.duplicated(['qid', 'docno'])]


def _reference_rerank(coder, inp):
    """What Coder.transform returned before it was vectorised (pandas factorize/add_ranks/sort_values)."""
    frame = _reference_normalise(inp).reset_index(drop=True)
    ids = coder.store.ids(frame['docno'].values, on_missing='drop')
    frame, ids = frame[ids >= 0].reset_index(drop=True), ids[ids >= 0]
    codes, uniques = pd.factorize(frame['qid'])
    order = np.argsort(codes, kind='stable')
    counts = np.bincount(codes)
    positions = np.arange(len(order)) - np.repeat(np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    padded = np.full((len(uniques), counts.max()), -1)
    padded[codes[order], positions] = ids[order]
    queries = frame['query'].values[np.unique(codes, return_index=True)[1]].tolist()
    scores = coder._rerank_arrays(queries, padded)
    frame['score'] = 0.0
    frame.loc[order, 'score'] = scores[codes[order], positions]
    frame = frame.drop(columns=['rank'], errors='ignore')
    return pt.model.add_ranks(frame).sort_values(['qid', 'rank'], kind='stable').reset_index(drop=True)


@pytest.fixture(scope='module')
def tied_index(setup, tmp_path_factory):
    """60 documents sharing 6 distinct embeddings (so reranking produces many tied scores)."""
    import pyterrier_dr
    ds, encoder, dense, bm25 = setup
    vecs = np.asarray(dense.flex.np_vecs())[:6]
    flex = pyterrier_dr.FlexIndex(str(tmp_path_factory.mktemp('tied') / 'tied.flex'), verbose=False)
    flex.indexer(mode='overwrite').index([{'docno': f'{i}', 'doc_vec': vecs[i % 6]} for i in range(60)])
    return flex


def test_rerank_matches_pandas_ranking_on_messy_frames(setup, tied_index):
    ds, encoder, dense, bm25 = setup
    coder = Coder(tied_index, encoder, on_missing='drop', inference_batch_size=3, verbose=False, device='cpu')
    rng = np.random.default_rng(0)
    qids = rng.choice([3, 12, 7, 100, 25], size=200)                     # int qids, unsorted, '100' < '12' < '25'
    frame = pd.DataFrame({'qid': qids, 'query': [['apple', 'kiwi pear', None, 'plum', 'fig'][q % 5] for q in qids],
                          'docno': rng.integers(0, 65, size=200),       # duplicates, and 60..64 are not indexed
                          'score': rng.integers(0, 4, size=200) * 0.5,  # tied first-stage scores
                          'extra': np.arange(200)})
    frame.loc[[5, 17], 'score'] = np.nan
    variants = {'score': frame, 'rank only': frame.drop(columns='score').assign(rank=rng.integers(0, 9, 200)),
                'neither': frame.drop(columns='score'), 'sorted, no duplicates':
                frame.drop_duplicates(['qid', 'docno']).sort_values(['qid', 'score'])}
    for name, variant in variants.items():
        got, expected = quiet(coder, variant), quiet(_reference_rerank, coder, variant)
        pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=1e-6, obj=name)  # the product may differ in the last bit with the thread count
        pd.testing.assert_frame_equal(quiet(normalise_frame, variant, 'x'), _reference_normalise(variant), obj=name)
        assert got.duplicated(['qid', 'score']).any(), name          # ties were actually exercised

# --- scale: candidates stored on disk, chunked mining, training from a stored set, prefetching -------

SCALE_FAST = dict(lr=1e-3, optimizer='adamw', warmup=0, schedule='constant', batch_size=4, eval_every=3, max_steps=7,
                  device='cpu', verbose=False)


@pytest.fixture(scope='module')
def scale(setup):
    """The fixture collection's training topics, with one query left without a positive (skipped and counted) and
    qrels of an unknown query (ignored and counted)."""
    ds, encoder, dense, bm25 = setup
    qrels = ds.get_qrels('train')
    qrels = pd.concat([qrels[qrels['qid'] != 'q01'], pd.DataFrame({'qid': ['zz'], 'docno': ['d000'], 'label': [1]})])
    return ds, encoder, dense, bm25, ds.get_topics('train'), qrels


def assert_same_set(a: CandidateSet, b: CandidateSet):
    assert a.qids == b.qids and a.queries == b.queries and a.stats == b.stats
    for name in ('docids', 'labels', 'num_retrieved'):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(x, y, err_msg=name)


def test_candidate_set_round_trips_memory_mapped(scale, tmp_path):
    ds, encoder, dense, bm25, topics, qrels = scale
    store = EmbeddingStore(dense.flex)
    mined = quiet(mine_candidates, (bm25 % 10)(topics), qrels, store, num_candidates=10)
    saved = mined.save(tmp_path / 'set')
    for loaded in (saved, CandidateSet.load(tmp_path / 'set')):
        assert_same_set(loaded, mined)
        assert isinstance(loaded.docids, np.memmap) and isinstance(loaded.labels, np.memmap)
        assert loaded.docids.dtype == np.int32 and loaded.labels.dtype == np.float32
        # the index the row ids refer to, and the corpus it was built from
        assert loaded.index == index_info(store) and set(loaded.index) == {'path', 'docs', 'corpus'}
        assert loaded.index['path'] == str(dense.flex.index_path.resolve()) and loaded.index['docs'] == len(store)
    assert not isinstance(CandidateSet.load(tmp_path / 'set', mmap=False).docids, np.memmap)
    width = mined.docids.shape[1]
    assert repr(saved) == (f'CandidateSet(9 queries x {width} candidates, memory-mapped, '
                           f'index={str(dense.flex.index_path.resolve())!r})')   # shapes, not the arrays
    assert repr(mined.select([0, 1])).startswith(f'CandidateSet(2 queries x {width} candidates, index=')
    assert mined.stats == {'queries': 10, 'qrels_for_unknown_queries': 1, 'positives_not_in_index': 0,
                           'skipped_no_positive': 1}
    (tmp_path / 'set' / 'meta.json').unlink()          # written last: without it the set is incomplete
    with pytest.raises(FileNotFoundError, match='not a complete saved CandidateSet'):
        CandidateSet.load(tmp_path / 'set')


class _Recording(pt.Transformer):
    """A first stage that records how many queries each call was given."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = []

    def transform(self, topics):
        self.calls.append(len(topics))
        return self.inner(topics)

    def __repr__(self):
        return repr(self.inner)


@pytest.mark.parametrize('chunk_size', [1, 3, 100])
def test_chunked_mining_to_disk_equals_mining_the_whole_frame(scale, tmp_path, chunk_size):
    ds, encoder, dense, bm25, topics, qrels = scale
    store = EmbeddingStore(dense.flex)
    expected = quiet(mine_candidates, (bm25 % 10)(topics), qrels, store, num_candidates=7)
    first_stage = _Recording(bm25 % 10)
    shuffled = topics.sample(frac=1, random_state=0)            # the stored order does not depend on the input's
    with pytest.warns(UserWarning, match='skipped 1 of 10 training queries'):
        got = mine_candidates_to_disk(first_stage, shuffled, qrels, dense, tmp_path / 'set', chunk_size=chunk_size,
                                      num_candidates=7, verbose=False)
    assert max(first_stage.calls) == min(chunk_size, len(topics)) and sum(first_stage.calls) == len(topics)
    assert isinstance(got.docids, np.memmap)
    assert_same_set(got, expected)
    assert not (tmp_path / 'set' / '.parts').exists()


class _Interrupted(Exception):
    pass


class _FailingAfter(pt.Transformer):
    """A first stage that fails on its (n+1)-th call, like a job killed part way."""

    def __init__(self, inner, n):
        self.inner, self.n, self.calls = inner, n, 0

    def transform(self, topics):
        self.calls += 1
        if self.calls > self.n:
            raise _Interrupted()
        return self.inner(topics)

    def __repr__(self):
        return repr(self.inner)     # the same first stage, as far as resuming is concerned


def test_interrupted_mining_resumes_after_the_last_complete_chunk(scale, tmp_path):
    ds, encoder, dense, bm25, topics, qrels = scale
    expected = quiet(mine_candidates, (bm25 % 10)(topics), qrels, EmbeddingStore(dense.flex), num_candidates=7)
    args = dict(chunk_size=3, num_candidates=7, verbose=False)
    with pytest.raises(_Interrupted):
        mine_candidates_to_disk(_FailingAfter(bm25 % 10, 2), topics, qrels, dense, tmp_path / 'set', resume=True,
                                **args)
    assert not (tmp_path / 'set' / 'meta.json').exists()          # not a usable set yet
    with pytest.raises(FileNotFoundError):
        CandidateSet.load(tmp_path / 'set')
    first_stage = _Recording(bm25 % 10)
    with pytest.warns(UserWarning, match='skipped 1 of 10 training queries'):
        got = mine_candidates_to_disk(first_stage, topics, qrels, dense, tmp_path / 'set', resume=True, **args)
    assert first_stage.calls == [3, 1]       # 10 queries in chunks of 3: the first two chunks were kept
    assert_same_set(got, expected)

    # other settings: the kept chunks do not match, mining starts over (and so does resume=False)
    with pytest.raises(_Interrupted):
        mine_candidates_to_disk(_FailingAfter(bm25 % 10, 2), topics, qrels, dense, tmp_path / 'b', resume=True, **args)
    first_stage = _Recording(bm25 % 10)
    with pytest.warns(UserWarning, match='skipped 1 of 10 training queries'):
        got = mine_candidates_to_disk(first_stage, topics, qrels, dense, tmp_path / 'b', resume=True,
                                      **{**args, 'num_candidates': 5})
    assert first_stage.calls == [3, 3, 3, 1]
    assert got.docids.shape[1] <= expected.docids.shape[1]


def coder(scale, **options):
    """A Coder; the seed fixes the initial weights of the optional transformer scorer."""
    ds, encoder, dense, bm25, topics, qrels = scale
    torch.manual_seed(0)
    return Coder(dense, encoder, **options, **SCALE_FAST)


def _trained(model):
    h = model.history
    return h['loss'], h['eval'], {k: v.detach().clone() for k, v in model.trainable_module().state_dict().items()}


def assert_same_training(a, b):
    (loss_a, eval_a, weights_a), (loss_b, eval_b, weights_b) = a, b
    assert loss_a == loss_b and eval_a == eval_b
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name


@pytest.mark.parametrize('options', [dict(), dict(random_negatives=3, scorer='transformer'), dict(refresh_every=2)])
def test_coder_trains_from_a_stored_set_exactly_as_from_the_frame(scale, tmp_path, options, monkeypatch):
    ds, encoder, dense, bm25, topics, qrels = scale
    res = (bm25 % 10)(topics)
    from_frame = quiet(coder(scale, num_candidates=10, **options).fit, res, qrels, res, qrels)
    from_disk = coder(scale, num_candidates=10, **options)
    stored = quiet(from_disk.mine, bm25 % 10, topics, qrels, tmp_path / 'set', chunk_size=4)
    assert isinstance(stored.docids, np.memmap)
    # a refreshed set stays on disk, rebuilt a few queries at a time
    import pyterrier_coder.coder as coder_module
    monkeypatch.setattr(coder_module, 'REFRESH_CHUNK', 4)
    refreshed, original = [], from_disk._refresh
    monkeypatch.setattr(from_disk, '_refresh', lambda step: original(step) or refreshed.append(from_disk._train))
    from_disk.fit_candidates(tmp_path / 'set', res, qrels)
    assert_same_training(_trained(from_disk), _trained(from_frame))
    assert from_disk.history['training_data'] == from_frame.history['training_data']
    if options.get('refresh_every'):
        changed = [s for s in refreshed if s is not refreshed[0]]
        assert changed and all(isinstance(s.docids, np.memmap) for s in changed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['set']     # the refreshed copies are removed


def test_adore_trains_from_a_stored_set(scale, tmp_path):
    ds, encoder, dense, bm25, topics, qrels = scale
    store = EmbeddingStore(dense.flex)
    mined = quiet(mine_candidates, (bm25 % 10)(topics), qrels, store, num_candidates=10)
    mined.save(tmp_path / 'set')
    in_memory = Adore(dense, encoder, k=10, **SCALE_FAST).fit_candidates(mined, topics, qrels)
    from_disk = Adore(dense, encoder, k=10, **SCALE_FAST).fit_candidates(tmp_path / 'set', topics, qrels)
    assert_same_training(_trained(from_disk), _trained(in_memory))
    assert from_disk.history['training_data'] == {'train_queries': 9, 'skipped_no_positive': 0,
                                                  'lower_grades_ignored': 0, 'qrels_for_unknown_queries': 1}
    assert from_disk.history['steps'] == SCALE_FAST['max_steps']


def test_adore_from_a_stored_set_keeps_the_sets_lower_grades_out_of_its_negatives(scale):
    """Graded qrels (alternately 2 and 1): with min_label=2 and lower_labels='ignore', the label-1 rows the set
    holds for queries with a label-2 positive are the documents ADORE keeps out of its negatives."""
    ds, encoder, dense, bm25, topics, qrels = scale
    graded = qrels.assign(label=np.where(np.arange(len(qrels)) % 2 == 0, 2, 1))
    mined = quiet(mine_candidates, (bm25 % 10)(topics), graded, EmbeddingStore(dense.flex), num_candidates=10)
    labels, ids = np.asarray(mined.labels), np.asarray(mined.docids)
    has_positive = ((labels >= 2) & (ids >= 0)).any(1)
    expected = int((((labels == 1) & (ids >= 0)).sum(1) * has_positive).sum())
    assert expected > 0
    adore = Adore(dense, encoder, k=10, min_label=2, lower_labels='ignore', **SCALE_FAST).fit_candidates(mined)
    assert adore.history['training_data']['lower_grades_ignored'] == expected
    assert adore.history['training_data']['train_queries'] == int(has_positive.sum())


def test_a_set_mined_against_another_index_is_refused(scale, tmp_path):
    ds, encoder, dense, bm25, topics, qrels = scale
    mined = quiet(mine_candidates, (bm25 % 10)(topics), qrels, EmbeddingStore(dense.flex), num_candidates=10)
    mined.index = dict(mined.index, docs=len(EmbeddingStore(dense.flex)) + 1)
    for model in (Coder(dense, encoder, **SCALE_FAST), Adore(dense, encoder, **SCALE_FAST)):
        with pytest.raises(ValueError, match='mined against an index of'):
            model.fit_candidates(mined)


# --- prefetching ------------------------------------------------------------------------------------------------

def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name.startswith('pyterrier_coder-prefetch')]


@pytest.mark.parametrize('options', [dict(), dict(random_negatives=3, grad_accumulation=2),
                                     dict(refresh_every=2), dict(scorer='transformer')])
def test_prefetching_gives_bitwise_the_same_training(scale, options):
    ds, encoder, dense, bm25, topics, qrels = scale
    res = (bm25 % 10)(topics)
    runs = {}
    for prefetch in (True, False):
        runs[prefetch] = coder(scale, num_candidates=10, prefetch=prefetch, **options)
        quiet(runs[prefetch].fit, res, qrels, res, qrels)
    assert_same_training(_trained(runs[True]), _trained(runs[False]))
    # 9 queries in batches of 4: 3 batches per epoch, the first of each epoch is not prefetched
    assert runs[True].history['prefetched_batches'] > 0 and 'prefetched_batches' not in runs[False].history
    assert not _prefetch_threads() and runs[True]._prefetcher is None


def test_prefetching_shuts_down_on_errors_and_early_stopping(scale, monkeypatch):
    ds, encoder, dense, bm25, topics, qrels = scale
    res = (bm25 % 10)(topics)
    failing_coder = coder(scale, num_candidates=10)
    original, calls = failing_coder._loss, {'n': 0}

    def failing(batch):
        calls['n'] += 1
        if calls['n'] == 4:
            raise RuntimeError('boom')
        return original(batch)
    monkeypatch.setattr(failing_coder, '_loss', failing)
    with pytest.raises(RuntimeError, match='boom'):
        quiet(failing_coder.fit, res, qrels)
    assert not _prefetch_threads() and failing_coder._prefetcher is None

    stopping = Coder(dense, encoder, num_candidates=10, patience=1, **{**SCALE_FAST, 'eval_every': 1, 'max_steps': 50,
                                                                       'lr': 0.0})
    quiet(stopping.fit, res, qrels, res, qrels)
    assert stopping.history['stopped_early'] and stopping.history['steps'] < 50
    assert not _prefetch_threads() and stopping._prefetcher is None


def test_the_loop_announces_each_ranks_next_micro_batches():
    """Under data parallelism each rank is told the micro-batches of its own shard of the next batch: exactly the
    parts its loss will receive one step later (the first batch of an epoch is not announced)."""
    from pyterrier_coder.training import TrainingConfig, TrainingLoop
    module = torch.nn.Linear(2, 1)
    seen, announced = [], []

    def loss_fn(part):
        seen.append(part.tolist())
        return module(torch.ones(len(part), 2)).sum()
    config = TrainingConfig(max_steps=5, batch_size=5, grad_accumulation=2, eval_every=None, device='cpu',
                            verbose=False, warmup=0)
    loop = TrainingLoop(module, config, sample_batches=lambda epoch, rng: [np.arange(i, i + 5) for i in (0, 5, 10)],
                        loss_fn=loss_fn, prefetch=lambda part: announced.append(part.tolist()))
    loop.dp.rank, loop.dp.world = 1, 2          # rank 1 of 2: shards [1, 3] of [0..4], [6, 8] of [5..9], ...
    loop.run()
    assert seen == [[1], [3], [6], [8], [11], [13], [1], [3], [6], [8]]
    # announced at steps 0, 1 (epoch 1), 3, 4 (epoch 2); the last one is for a step that max_steps cuts off
    assert announced == [[6], [8], [11], [13], [6], [8], [11], [13]]


def test_candidate_scores_and_exact_search_stay_fp32_under_amp(setup):
    """Under a training step's autocast (bf16 here on CPU, as on most GPUs) the encoder runs in reduced precision,
    but the candidate scores and ADORE's exact search do not: bf16 would tie most of a thousand close scores and
    make training scores differ from the fp32 ones of validation and inference."""
    ds, encoder, dense, bm25 = setup
    coder = Coder(dense, encoder, **FAST)
    q = encoder.encode_queries_torch(ds.get_topics('train')['query'].tolist()[:3]).detach() * 40   # TAS-B-like sizes
    ids = np.tile(np.arange(len(coder.store)), (3, 1))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        amp_scores = coder._dot_candidates(q.bfloat16(), ids)
        amp_top = coder.store.search(q, 10)
    exact_scores = coder._dot_candidates(q.bfloat16().float(), ids)
    assert amp_scores.dtype == amp_top[0].dtype == torch.float32
    torch.testing.assert_close(amp_scores, exact_scores)
    top = coder.store.search(q, 10)
    torch.testing.assert_close(amp_top[0], top[0])
    assert torch.equal(amp_top[1], top[1])
    with torch.autocast('cpu', dtype=torch.bfloat16):    # what the product would be without the guard
        assert torch.einsum('bd,bld->bl', q, coder.store.gather(ids)).dtype == torch.bfloat16


def test_loaded_model_does_not_keep_the_training_device(setup, tmp_path):
    """A model trained on 'cuda:1' and loaded elsewhere chooses its device afresh (fit would fail on 'cuda:1')."""
    import json
    ds, encoder, dense, bm25 = setup
    Coder(dense, encoder, **FAST).save(tmp_path / 'coder')
    config_path = tmp_path / 'coder' / 'pyterrier_coder.json'
    config = json.loads(config_path.read_text())
    assert config['training']['device'] == 'cpu'
    config['training']['device'] = 'cuda:1'
    config_path.write_text(json.dumps(config))
    assert Coder.load(tmp_path / 'coder').config.device is None
    assert Coder.load(tmp_path / 'coder', device='cpu').config.device == 'cpu'


@pytest.mark.parametrize('component, bad', [
    ('Coder', dict(loss='hinge')), ('Coder', dict(scorer='bilinear')), ('Coder', dict(lower_labels='drop')),
    ('Coder', dict(num_candidates=0)), ('Coder', dict(refresh_every=0)), ('Coder', dict(validate_with='both')),
    ('Coder', dict(on_missing='skip')), ('Coder', dict(schedule='cosine')), ('Coder', dict(batch_size=None)),
    ('Adore', dict(delta_metric='P@10')), ('Adore', dict(search='annoy')), ('Adore', dict(k=0)),
    ('Adore', dict(optimizer='sgd')), ('Adore', dict(mrr_delta='last_relevant')),
    ('MonoElectra', dict(loss='listnet')), ('MonoElectra', dict(group_size=None)),
    ('MonoElectra', dict(group_size=1)), ('MonoElectra', dict(negatives_from=0)),
    ('MonoElectra', dict(query_max_length=61, max_length=64)), ('MonoElectra', dict(train_batch_size=0)),
    ('MonoElectra', dict(lower_labels='x')), ('MonoElectra', dict(max_steps=0))])
def test_settings_are_checked_before_anything_is_built_as_the_constructor_checks_them(component, bad, setup,
                                                                                       tiny_cross_encoder_dir):
    """training.check_settings (the runner's --set check, made before any index exists) refuses exactly what the
    constructor refuses, with the same message: both run each class's own _check_values."""
    import pyterrier_coder
    from pyterrier_coder.training import check_settings
    ds, encoder, dense, bm25 = setup
    cls = getattr(pyterrier_coder, component)
    with pytest.raises(ValueError) as early:
        check_settings(cls, bad)
    with pytest.raises(ValueError) as built:
        if component == 'MonoElectra':
            cls(str(tiny_cross_encoder_dir), verbose=False, **bad)
        else:
            cls(dense, encoder, verbose=False, device='cpu', **bad)
    assert str(early.value) == str(built.value) and str(early.value).startswith(f'{component}: ')
    check_settings(cls, {})                   # the defaults are fine


def test_a_callable_loss_is_used_and_recorded(setup, tmp_path):
    ds, encoder, dense, bm25 = setup
    calls = []

    def squared_error(scores, target, mask, *, temperature):
        calls.append(scores.shape)
        weights = target / target.sum(-1, keepdim=True).clamp(min=1e-9)
        return ((torch.softmax(scores / temperature, -1) - weights) ** 2 * mask).sum(-1).mean()
    coder = Coder(dense, encoder, loss=squared_error, num_candidates=20, max_steps=3, **FAST)
    coder.fit((bm25 % 20)(ds.get_topics('train')), ds.get_qrels('train'))
    assert len(calls) == 3
    assert coder.settings()['loss'].endswith('squared_error')
    with pytest.raises(ValueError, match="loss must be one of \\('listnet', 'margin'\\) or a callable"):
        Coder(dense, encoder, loss='kl', **FAST)


def test_the_papers_softmax_target_equals_a_hand_computation():
    from pyterrier_coder import losses
    weights = torch.tensor([[2.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    target = losses.softmax_target(weights, mask, label_temperature=0.5)
    e = np.exp([4.0, 0.0, 2.0])
    np.testing.assert_allclose(target[0].numpy(), np.append(e / e.sum(), 0.0), rtol=1e-6)
    assert target[1].sum() == 0                      # no positive: no target, skipped by the loss
    scores = torch.tensor([[0.3, 0.1, 0.2, 9.0], [0.5, 0.1, 0.0, 0.0]])
    q = np.exp([0.3, 0.1, 0.2]) / np.exp([0.3, 0.1, 0.2]).sum()
    p = e / e.sum()
    expected = float((p * np.log(p / q)).sum())
    assert float(losses.listnet_kl(scores, target, mask)) == pytest.approx(expected, rel=1e-5)
    # the default (proportional) target: the positives share the mass by weight
    proportional = np.array([2 / 3, 1 / 3])
    expected = float((proportional * np.log(proportional / q[[0, 2]])).sum())
    assert float(losses.listnet_kl(scores, weights, mask)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize('options', [dict(target='softmax', label_temperature=0.5),
                                     dict(num_candidates=0, random_negatives=5), dict(in_batch_negatives=3)])
def test_target_and_negative_composition_settings_train(setup, options):
    ds, encoder, dense, bm25 = setup
    res = (bm25 % 20)(ds.get_topics('train'))
    coder = Coder(dense, encoder, **{'num_candidates': 20, **options}, max_steps=4, **FAST)
    ids = []
    original = coder._scores
    coder._scores = lambda queries, batch_ids, mask: ids.append(batch_ids) or original(queries, batch_ids, mask)
    coder.fit(res, ds.get_qrels('train'))
    assert coder.history['steps'] == 4
    if options.get('in_batch_negatives'):
        # every query's list holds other queries' documents, none of its own twice
        assert all(len(set(row[row >= 0])) == int((row >= 0).sum()) for batch in ids for row in batch)
        assert max(batch.shape[1] for batch in ids) > 20
    if options.get('num_candidates') == 0:
        assert all(batch.shape[1] <= 5 + 2 for batch in ids)   # the positives (1-2 here) and 5 random negatives
    loaded = Coder(dense, encoder, **{**coder.settings(), **FAST})
    assert {k: loaded.settings()[k] for k in options} == options


def test_bad_target_settings():
    from pyterrier_coder.training import check_settings
    for bad, match in [(dict(target='uniform'), 'target must be one of'),
                       (dict(label_temperature=0), 'label_temperature must be'),
                       (dict(target='softmax', loss='margin'), 'margin loss uses the positives'),
                       (dict(num_candidates=0), 'one of them > 0')]:
        with pytest.raises(ValueError, match=match):
            check_settings(Coder, bad)
