"""What the runner compares: the measures, the baseline, and the paired comparisons that answer the questions the
baseline table does not (a reranker against its first stage, a fine-tuned retriever against its start, an ablation
against its full method)."""
from __future__ import annotations

import warnings
from typing import List, Optional

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
    ('BM25 >> CODER (softmax target)', 'BM25 >> CODER'), ('BM25 >> CODER (N=100)', 'BM25 >> CODER'),
    ('BM25 >> CODER (N=300)', 'BM25 >> CODER'), ('BM25 >> CODER (random negatives)', 'BM25 >> CODER'),
    ('BM25 >> CODER (in-batch negatives)', 'BM25 >> CODER'), ('ADORE (PQ index)', 'ADORE'),
    ('BM25 >> MonoELECTRA (hinge)', 'BM25 >> MonoELECTRA'), ('Dense >> MonoELECTRA', 'BM25 >> MonoELECTRA'),
    ('BM25 >> MonoELECTRA (dense negatives)', 'BM25 >> MonoELECTRA'),
    ('Dense >> MonoELECTRA (dense negatives)', 'Dense >> MonoELECTRA'),
    ('STAR', 'Dense'), ('ADORE+STAR', 'STAR'), ('STAR (random negatives only)', 'STAR'),
    ('STAR (hard negatives only)', 'STAR'), ('TAS-Balanced', 'Dense'), ('CODER+TAS-Balanced', 'TAS-Balanced'),
    ('BM25 >> CODER+TAS-Balanced', 'BM25'),
    *((f'TAS-Balanced ({sampling}, {supervision})', 'TAS-Balanced') for sampling in ('random', 'tas', 'tas-balanced')
      for supervision in ('pairwise', 'in-batch', 'dual') if (sampling, supervision) != ('tas-balanced', 'dual')),
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

#: the binary measures computed at a relevance threshold with ``--rel`` (the TREC Deep Learning convention)
BINARY_AT_THRESHOLD = ('RR(rel={rel})@10', 'R(rel={rel})@100', 'R(rel={rel})@1000', 'AP(rel={rel})')


def measure_names(extra=(), rel: Optional[int] = None) -> List[str]:
    """The names of the results table's measures, as ``pt.Experiment`` names its columns: :data:`MEASURES`, then
    ``extra`` (any ir_measures names, e.g. ``'R@10'``), then with ``rel`` the binary measures at that relevance
    threshold (:data:`BINARY_AT_THRESHOLD`; at ``rel=1``, ir_measures' default, they are the plain ones). An unknown
    name fails here, before anything runs."""
    import ir_measures
    names = list(MEASURES) + list(extra) + ([m.format(rel=rel) for m in BINARY_AT_THRESHOLD] if rel is not None else [])
    out = []
    for name in names:
        try:
            canonical = str(ir_measures.parse_measure(name))
        except (NameError, ValueError, TypeError, AttributeError, SyntaxError) as error:
            raise ValueError(f'--measures: {name!r} is not an ir_measures measure (e.g. R@10, P@5, '
                             f'nDCG(rel=2)@10): {error}') from None
        if canonical not in out:
            out.append(canonical)
    return out


def measures(extra=(), rel: Optional[int] = None) -> list:
    """The measures of :func:`measure_names`, as the objects ``pt.Experiment`` takes."""
    import ir_measures
    return [ir_measures.parse_measure(name) for name in measure_names(extra, rel)]
