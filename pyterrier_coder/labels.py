"""Which judged documents count as positives, read from the qrels rather than assumed.

Collections grade relevance differently: MS MARCO and most BEIR collections judge 0/1, TREC Deep Learning 0-3,
NFCorpus 1 (indirect link) and 2 (direct link). A trainer needs a threshold (``min_label``) above which a judged
document is a positive, and a treatment of the grades below it that are still above 0 (``lower_labels``: train on
them as negatives, or keep them out of the negatives). :func:`choose_label_scale` picks both from the training
qrels: the highest grade that still gives most judged queries a positive, with lower grades kept out of the
negatives (they are partly relevant, and count as relevant in the evaluation).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import pandas as pd

#: the share of judged training queries that must keep a positive at the chosen threshold
MIN_QUERY_SHARE = 0.3


@dataclasses.dataclass(frozen=True)
class LabelScale:
    """The positive threshold and the treatment of lower grades chosen for a collection, and why."""
    min_label: int
    lower_labels: str               #: 'negative' or 'ignore' (see the trainers' ``lower_labels``)
    grades: tuple                   #: the positive grades found in the qrels, ascending
    queries: int                    #: judged training queries (with any positive grade)
    queries_kept: int               #: of them, those with a positive at ``min_label``
    reason: str

    def settings(self) -> dict:
        return {'min_label': self.min_label, 'lower_labels': self.lower_labels}


def choose_label_scale(qrels: pd.DataFrame, topics: Optional[pd.DataFrame] = None, *,
                       min_query_share: float = MIN_QUERY_SHARE) -> LabelScale:
    """Chooses the positive threshold from the training ``qrels`` (``qid, docno, label``), over the queries of
    ``topics`` when given.

    - One positive grade (binary qrels, 0/1): every judged positive counts (``min_label`` = that grade).
    - Several grades: the highest grade ``g`` for which at least ``min_query_share`` of the judged queries have a
      document with ``label >= g``; judged documents below ``g`` are kept out of the negatives (``'ignore'``).
      When no grade above the lowest reaches that share, every positive grade counts.
    """
    if topics is not None:
        qrels = qrels[qrels['qid'].astype(str).isin(set(topics['qid'].astype(str)))]
    positive = qrels[qrels['label'] > 0]
    grades = tuple(sorted(int(g) for g in positive['label'].unique()))
    best = positive.groupby(positive['qid'].astype(str))['label'].max()
    judged = len(best)
    if not grades:
        raise ValueError('no judged positive (label > 0) in the training qrels: nothing to train on')
    if len(grades) == 1:
        return LabelScale(grades[0], 'negative', grades, judged, judged,
                          f'one positive grade ({grades[0]}): every judged positive counts')
    for grade in reversed(grades[1:]):
        kept = int((best >= grade).sum())
        if kept >= min_query_share * judged:
            return LabelScale(grade, 'ignore', grades, judged, kept,
                              f'grades {list(grades)}: the highest grade with a positive for at least '
                              f'{min_query_share:.0%} of the judged training queries is {grade} ({kept} of {judged}); '
                              f'lower grades are kept out of the negatives')
    return LabelScale(grades[0], 'negative', grades, judged, judged,
                      f'grades {list(grades)}: no grade above {grades[0]} gives {min_query_share:.0%} of the judged '
                      f'training queries a positive, so every judged positive counts')

#: what a trainer does with judged documents whose label is below its ``min_label`` but above 0 (graded qrels):
#: train on them as negatives, or leave them out of the negatives
LOWER_LABELS = ('negative', 'ignore')



def check_lower_labels(value: str, component: str) -> str:
    if value not in LOWER_LABELS:
        raise ValueError(f'{component}: lower_labels must be one of {LOWER_LABELS}, got {value!r}')
    return value
