"""What the runner compares: the measures, the baseline, and the paired comparisons that answer the questions the
baseline table does not (a reranker against its first stage, a fine-tuned retriever against its start, an ablation
against its full method)."""
from __future__ import annotations

import warnings
from typing import List

import pandas as pd


BASELINE = 'BM25 >> Dense'


MEASURES = ('nDCG@10', 'RR@10', 'R@100', 'R@1000', 'AP')


#: paired comparisons reported besides the baseline table: (system, reference) -- a reranker against its own
#: first stage, a fine-tuned single-stage retriever against the model it started from, an ablation against the
#: full method (same budget)
COMPARISONS = (
    ('BM25 >> CODER', 'BM25'), ('BM25 >> MonoELECTRA', 'BM25'), ('CODER', 'Dense'), ('ADORE', 'Dense'),
    ('BM25 >> CODER (margin loss)', 'BM25 >> CODER'), ('BM25 >> CODER (N=32)', 'BM25 >> CODER'),
    ('BM25 >> CODER(ADORE init)', 'BM25 >> CODER'), ('ADORE (static negatives)', 'ADORE'),
    ('ADORE (RankNet, no ΔM)', 'ADORE'), ('BM25 >> MonoELECTRA (CE)', 'BM25 >> MonoELECTRA'),
    ('BM25 >> MonoELECTRA (LCE, n=2)', 'BM25 >> MonoELECTRA'),
    ('BM25 >> CODER (+ BM25 score)', 'BM25'), ('BM25 >> CODER (+ BM25 score)', 'BM25 >> CODER'),
    ('BM25 >> MonoELECTRA (+ BM25 score)', 'BM25'), ('BM25 >> MonoELECTRA (+ BM25 score)', 'BM25 >> MonoELECTRA'),
)


#: the reranker rows that are also reported fused with BM25's score (``fusion.Interpolate``, weight chosen on dev)
FUSED_SUFFIX = ' (+ BM25 score)'


def paired_comparisons(perquery: pd.DataFrame, names: List[str]) -> pd.DataFrame:
    """Paired t-tests of the :data:`COMPARISONS` whose two systems are both in ``names``, over a per-query frame
    (``qid``, ``name``, ``measure``, ``value``); uncorrected p-values: each pair is its own question."""
    from scipy import stats
    rows = []
    for measure in ('nDCG@10', 'RR@10'):
        table = perquery[perquery['measure'] == measure].pivot(index='qid', columns='name', values='value')
        for system, reference in COMPARISONS:
            if system in names and reference in names:
                a, b = table[system], table[reference]
                with warnings.catch_warnings():
                    warnings.simplefilter('ignore', RuntimeWarning)
                    p = stats.ttest_rel(a, b).pvalue
                rows.append({'system': system, 'reference': reference, 'measure': measure,
                             'system value': a.mean(), 'reference value': b.mean(), 'difference': a.mean() - b.mean(),
                             'wins': int((a > b).sum()), 'losses': int((a < b).sum()), 'p-value': p})
    return pd.DataFrame(rows, columns=['system', 'reference', 'measure', 'system value', 'reference value',
                                       'difference', 'wins', 'losses', 'p-value'])


def measures():
    """The measures of the results table, as PyTerrier measure objects."""
    from pyterrier.measures import nDCG, RR, R, AP
    return [nDCG @ 10, RR @ 10, R @ 100, R @ 1000, AP]
