"""Interpolate: the fused score and ranks, choosing the weight on validation data, fit delegation, errors, and use
in pipelines (a tiny MonoElectra after BM25; MiniLM after BM25 on the real NFCorpus)."""
import warnings

import numpy as np
import pandas as pd
import pyterrier as pt
import pytest

from pyterrier_coder.evaluation import evaluate
from pyterrier_coder.datasets import load_dataset
from pyterrier_coder.electra import MonoElectra
from pyterrier_coder.fusion import Interpolate, normalise_per_query
from pyterrier_coder.retrievers import BM25


class ColumnScorer(pt.Transformer):
    """A reranker that scores each row by its ``rr`` column (the stand-in for a model)."""

    def transform(self, inp):
        return pt.model.add_ranks(inp.assign(score=inp['rr'].astype(float))).sort_values(['qid', 'rank'])

    def __repr__(self):
        return 'ColumnScorer()'


class RecordingEstimator(pt.Estimator, ColumnScorer):
    def __init__(self):
        self.calls = []

    def fit(self, *frames):
        self.calls.append(frames)
        return self


def frame():
    # q1: the first stage orders a > b > c, the reranker c > b > a; q2 has a single document
    return pd.DataFrame({'qid': ['q1', 'q1', 'q1', 'q2'], 'query': ['x', 'x', 'x', 'y'],
                         'docno': ['a', 'b', 'c', 'd'], 'score': [10.0, 5.0, 0.0, 3.0],
                         'rr': [0.0, 1.0, 2.0, 7.0], 'text': ['ta', 'tb', 'tc', 'td']})


@pytest.mark.parametrize('alpha, expected', [(0.25, {'a': 0.75, 'b': 0.5, 'c': 0.25}),
                                             (0.75, {'a': 0.25, 'b': 0.5, 'c': 0.75}),
                                             (0.0, {'a': 1.0, 'b': 0.5, 'c': 0.0}),
                                             (1.0, {'a': 0.0, 'b': 0.5, 'c': 1.0})])
def test_fused_scores_ranks_and_columns(alpha, expected):
    out = Interpolate(ColumnScorer(), alpha)(frame())
    q1 = out[out['qid'] == 'q1']
    assert dict(zip(q1['docno'], q1['score'])) == pytest.approx(expected)
    assert list(q1['docno']) == sorted(expected, key=lambda d: -expected[d])   # sorted by the fused score
    assert list(q1['rank']) == [0, 1, 2]
    # a query with a single document: both normalised scores are 0
    assert out[out['qid'] == 'q2'][['docno', 'score', 'rank']].values.tolist() == [['d', 0.0, 0]]
    assert {'query', 'rr', 'text'} <= set(out.columns)
    assert list(out['qid']) == ['q1', 'q1', 'q1', 'q2']


def test_zscore_normalisation_and_constant_queries():
    qids = pd.Series(['q1', 'q1', 'q1', 'q2', 'q2'])
    scores = pd.Series([1.0, 2.0, 3.0, 4.0, 4.0])
    z = normalise_per_query(qids, scores, 'zscore')
    assert z[:3] == pytest.approx(np.array([-1, 0, 1]) / np.std([1, 2, 3]))
    assert list(z[3:]) == [0.0, 0.0]
    assert list(normalise_per_query(qids, scores, 'minmax')) == [0.0, 0.5, 1.0, 0.0, 0.0]
    out = Interpolate(ColumnScorer(), 0.5, normalise='zscore')(frame())
    assert out[out['qid'] == 'q1']['score'].tolist() == pytest.approx([0.0, 0.0, 0.0])


def test_integer_qids_and_a_reranker_that_returns_strings():
    class StringKeys(ColumnScorer):
        def transform(self, inp):
            return super().transform(inp.assign(qid=inp['qid'].astype(str), docno=inp['docno'].astype(str)))

    numeric = frame().assign(qid=[1, 1, 1, 2], docno=[10, 11, 12, 13])
    out = Interpolate(StringKeys(), 0.25)(numeric)
    assert out[out['qid'] == '1']['score'].tolist() == pytest.approx([0.75, 0.5, 0.25])


def test_documents_missing_from_the_input_get_the_lowest_incoming_score():
    class AddsADocument(ColumnScorer):
        def transform(self, inp):
            extra = inp.iloc[:1].assign(docno='new', rr=5.0)
            return super().transform(pd.concat([inp, extra], ignore_index=True))

    # q1's incoming scores are 10, 5, 2: 'new' gets 2 (not 0, which min-max would stretch the others against)
    inp = frame().assign(score=[10.0, 5.0, 2.0, 3.0])
    out = Interpolate(AddsADocument(), 0.5)(inp)
    score = out[out['qid'] == 'q1'].set_index('docno')['score']
    # incoming min-max over [10, 5, 2, 2]; reranker min-max over [0, 1, 2, 5]
    assert score['new'] == pytest.approx(0.5 * 0.0 + 0.5 * 1.0)
    assert score['c'] == pytest.approx(0.5 * 0.0 + 0.5 * 0.4)
    assert score['b'] == pytest.approx(0.5 * 3 / 8 + 0.5 * 0.2)


def test_empty_frames_errors_and_repr():
    model = Interpolate(ColumnScorer(), 0.3)
    empty = frame().iloc[:0]
    out = model(empty)
    assert len(out) == 0 and {'score', 'rank'} <= set(out.columns)
    with pytest.raises(KeyError, match=r"Interpolate.*\['score'\]"):
        model(frame().drop(columns='score'))
    with pytest.raises(RuntimeError, match='no weight yet'):
        Interpolate(ColumnScorer())(frame())
    # but its output columns can be inspected before the weight is chosen (pipeline schematics, validate=)
    columns = ['qid', 'query', 'docno', 'score', 'rank']
    assert set(pt.inspect.transformer_outputs(Interpolate(ColumnScorer()), columns)) == set(columns)
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        Interpolate(ColumnScorer(), 1.5)
    with pytest.raises(ValueError, match='normalise'):
        Interpolate(ColumnScorer(), 0.5, normalise='rank')
    assert repr(model) == "Interpolate(ColumnScorer(), alpha=0.3, normalise='minmax')"
    assert 'alpha not chosen' in repr(Interpolate(ColumnScorer()))


def test_combine_fuses_a_given_reranker_output_without_calling_the_reranker():
    class MustNotRun(ColumnScorer):
        def transform(self, inp):
            raise AssertionError('the reranker was called')

    inp = frame()
    expected = Interpolate(ColumnScorer(), 0.25)(inp)
    # e.g. the reranker's run read back from a TREC file: the key columns and the score only
    saved = ColumnScorer()(inp)[['qid', 'docno', 'score', 'rank']]
    got = Interpolate(MustNotRun(), 0.25).combine(inp, saved)
    pd.testing.assert_frame_equal(got[['qid', 'docno', 'score', 'rank']], expected[['qid', 'docno', 'score', 'rank']])
    assert len(Interpolate(MustNotRun(), 0.25).combine(inp.iloc[:0], saved)) == 0
    with pytest.raises(RuntimeError, match='no weight yet'):
        Interpolate(MustNotRun()).combine(inp, saved)
    with pytest.raises(KeyError, match='no score column'):
        Interpolate(MustNotRun(), 0.25).combine(inp, saved.drop(columns='score'))


def tuning_frame():
    # relevant b is second for the first stage (a first) and for the reranker (c first), first for a mix
    return pd.DataFrame({'qid': ['q1'] * 3 + ['q9'], 'query': ['x'] * 3 + ['z'], 'docno': ['a', 'b', 'c', 'e'],
                         'score': [1.0, 0.9, 0.0, 1.0], 'rr': [0.0, 0.9, 1.0, 1.0]})


QRELS = pd.DataFrame({'qid': ['q1', 'q5'], 'docno': ['b', 'x'], 'label': [1, 1]})   # q9 unjudged, q5 not asked


def test_tune_chooses_the_best_weight_and_prefers_the_reranker_on_ties():
    model = Interpolate(ColumnScorer(), alphas=(0.0, 0.25, 0.5, 0.75, 1.0))
    assert model.tune(tuning_frame(), QRELS) == 0.75
    second = 1 / np.log2(3)    # nDCG@10 of the only relevant document at rank 2
    assert np.allclose(model.history['by_alpha'], [[0.0, second], [0.25, 1.0], [0.5, 1.0], [0.75, 1.0],
                                                    [1.0, second]])
    assert model.history['validation_queries'] == 1
    assert model(tuning_frame())['docno'].iloc[0] == 'b'
    with pytest.raises(ValueError, match='none of the validation topics'):
        model.tune(tuning_frame(), QRELS.assign(qid='q7'))


def test_fit_trains_the_reranker_then_chooses_the_weight():
    train, valid = frame(), tuning_frame()
    reranker = RecordingEstimator()
    model = Interpolate(reranker, alphas=(0.0, 0.5, 1.0))
    assert model.fit(train, QRELS, valid, QRELS) is model
    assert len(reranker.calls) == 1 and reranker.calls[0][0] is train and reranker.calls[0][2] is valid
    assert model.alpha == 0.5
    # a chosen weight is chosen again by the next fit; a given weight is kept
    model.fit(train, QRELS, valid.assign(rr=[0.0, 0.9, 0.95, 1.0]), QRELS)
    assert model.history['by_alpha'][1][1] == pytest.approx(1.0)
    fixed = Interpolate(RecordingEstimator(), 0.2)
    fixed.fit(train, QRELS)
    assert fixed.alpha == 0.2 and len(fixed.reranker.calls) == 1 and fixed.history is None
    untrained = Interpolate(RecordingEstimator(), alphas=(0.0, 1.0), fit_reranker=False)
    untrained.fit(train, QRELS, valid, QRELS)
    assert untrained.reranker.calls == [] and untrained.alpha == 1.0
    needs_valid = Interpolate(RecordingEstimator())
    with pytest.raises(ValueError, match='validation data'):
        needs_valid.fit(train, QRELS)
    assert needs_valid.reranker.calls == []    # fails before training


def test_pipeline_with_a_tiny_monoelectra(tiny_cross_encoder_dir, tiny_collection, tmp_path):
    dataset = load_dataset(tiny_collection)
    bm25 = BM25(tmp_path / 'bm25', text=True).index(dataset.get_corpus_iter(verbose=False), verbose=False)
    electra = MonoElectra(str(tiny_cross_encoder_dir), verbose=False, group_size=4, negatives_from=10,
                          train_batch_size=2, max_steps=2, eval_every=2, lr=1e-4)
    fused = Interpolate(electra)
    pipe = bm25 % 10 >> fused
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        pipe.fit(dataset.get_topics('train'), dataset.get_qrels('train'),
                 dataset.get_topics('dev'), dataset.get_qrels('dev'))
    assert electra.history['steps'] == 2                 # the cross-encoder was trained through the pipeline
    assert fused.alpha in fused.alphas and len(fused.history['by_alpha']) == len(fused.alphas)
    dev = (bm25 % 10)(dataset.get_topics('dev'))
    out = pipe(dataset.get_topics('dev'))
    # the fused score is the weighted sum of the per-query min-max normalised scores of both stages
    expect = electra(dev).merge(dev[['qid', 'docno', 'score']], on=['qid', 'docno'], suffixes=('_ce', '_bm'))
    norm = lambda s: normalise_per_query(expect['qid'], expect[s], 'minmax')
    expect = expect.assign(fused=fused.alpha * norm('score_ce') + (1 - fused.alpha) * norm('score_bm'))
    merged = out.merge(expect[['qid', 'docno', 'fused']], on=['qid', 'docno'])
    assert len(merged) == len(dev) == len(out)
    assert np.allclose(merged['score'], merged['fused'])
    assert evaluate(out, dataset.get_qrels('dev'), 'nDCG@10', dev['qid'].unique()) == pytest.approx(
        dict(fused.history['by_alpha'])[fused.alpha])


def test_bm25_interpolated_with_minilm_beats_bm25_on_nfcorpus_test(nfcorpus_bm25, nfcorpus_minilm,
                                                                    nfcorpus_dataset):
    """Real data: the weight chosen on dev for BM25's top 100 fused with MiniLM (untrained for NFCorpus)
    carries over to test, where the fusion beats both BM25 and the MiniLM reranking alone."""
    ds = nfcorpus_dataset
    first = nfcorpus_bm25 % 100
    fused = Interpolate(nfcorpus_minilm.scorer())
    fused.tune(first(ds.get_topics('dev')), ds.get_qrels('dev'))
    assert 0.0 < fused.alpha < 1.0, fused.history
    test = ds.get_topics('test')
    qrels = ds.get_qrels('test')
    qids = test['qid'].unique()
    bm25_res = first(test)
    ndcg = {name: evaluate(res, qrels, 'nDCG@10', qids)
            for name, res in [('bm25', bm25_res), ('dense', nfcorpus_minilm.scorer()(bm25_res)),
                              ('fused', fused(bm25_res))]}
    assert ndcg['fused'] > max(ndcg['bm25'], ndcg['dense']) + 0.005, ndcg
