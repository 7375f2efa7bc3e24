"""What LCE trains on: per training query, its judged positives and a pool of localized negatives (the preceding
stage's top candidates), and groups of one positive and n-1 negatives sampled from them each epoch."""
from __future__ import annotations

import dataclasses
import warnings
from typing import Dict, List, Optional

import numpy as np
import pandas as pd

from .cross_encoders import COMPONENT
from .frames import normalise_frame, normalise_qrels, unknown_qrels, warn_skipped
from .labels import check_lower_labels
from .text import TextSource, clean_texts, lookup_texts


def text_hint(text_field: str, what: str = 'input') -> str:
    return (f"{COMPONENT} needs the document text in a {text_field!r} column of its {what}. Attach it in the first "
            f"stage, e.g. BM25(path, text=True) % 100 >> electra, or add a text loader: "
            f"bm25 % 100 >> bm25.text_loader() >> electra")


def missing_text_error(text_field: str, what: str = 'input') -> KeyError:
    return KeyError(text_hint(text_field, what).replace('. Attach', ', but there is none. Attach'))


@dataclasses.dataclass
class TrainingGroups:
    """What LCE samples from, per usable training query: the query text, the judged positives that have text,
    and the negative pool (the top ``negatives_from`` candidates minus the judged positives, in rank order)."""
    qids: List[str]
    queries: List[str]
    positives: List[np.ndarray]      #: docnos (object arrays)
    negatives: List[np.ndarray]      #: docnos (object arrays), at most negatives_from each
    texts: Dict[str, str]            #: docno -> text for every docno above
    stats: dict

    def __len__(self):
        return len(self.qids)


def build_training_groups(train: pd.DataFrame, qrels: pd.DataFrame, *, text_field: str = 'text',
                          negatives_from: int = 200, group_size: int = 8, min_label: int = 1,
                          lower_labels: str = 'negative', texts: Optional[TextSource] = None) -> TrainingGroups:
    """Turns the preceding stage's results on the training topics plus the qrels into :class:`TrainingGroups`.

    Positives are judged documents with ``label >= min_label``; their text comes from any candidate row with the
    same docno, else from ``texts``; positives without text are skipped and counted. Negatives are the top
    ``negatives_from`` candidates (by score, else rank) that are not positives; judged documents with
    ``0 < label < min_label`` may be negatives (``lower_labels='negative'``) or are left out of the pool
    (``'ignore'``: with graded qrels they are partly relevant, so they are neither pulled up nor pushed down).
    Queries without a positive are skipped and counted; queries with fewer than ``group_size - 1`` negatives are
    kept (their groups are smaller), counted and warned about once.
    """
    if text_field not in train.columns:
        raise missing_text_error(text_field, 'training frame')
    frame = train
    if 'score' not in frame.columns and 'rank' in frame.columns:
        frame = frame.sort_values(['qid', 'rank'], kind='stable')
    frame = normalise_frame(frame, COMPONENT)
    qrels = normalise_qrels(qrels, COMPONENT)
    topics = frame.drop_duplicates('qid')[['qid', 'query']]
    stats = {'queries': len(topics), 'qrels_for_unknown_queries': unknown_qrels(qrels, topics['qid'], COMPONENT)}
    text_of = dict(zip(frame['docno'], clean_texts(frame[text_field].values)))
    check_lower_labels(lower_labels, COMPONENT)
    judged = qrels[qrels['qid'].isin(set(topics['qid']))]
    positives = judged[judged['label'] >= min_label]
    pos_by_qid = {qid: list(dict.fromkeys(g['docno'])) for qid, g in positives.groupby('qid')}
    # documents kept out of the negative pools: the positives, and with 'ignore' the lower judged labels too
    excluded = positives if lower_labels == 'negative' else judged[judged['label'] > 0]
    excluded_by_qid = {qid: set(g['docno']) for qid, g in excluded.groupby('qid')}
    wanted = {d for qid, docs in pos_by_qid.items() for d in docs if d not in text_of}
    if wanted:
        text_of.update(lookup_texts(sorted(wanted), texts, text_field, COMPONENT))
    cand_by_qid = {qid: g['docno'].values for qid, g in frame.groupby('qid', sort=False)}

    out = TrainingGroups([], [], [], [], {}, stats)
    skipped = positives_without_text = few = 0
    for qid, query in zip(topics['qid'], topics['query']):
        pos = pos_by_qid.get(qid, [])
        with_text = [d for d in pos if d in text_of]
        positives_without_text += len(pos) - len(with_text)
        if not with_text:
            skipped += 1
            continue
        keep_out = excluded_by_qid.get(qid, set())
        top = cand_by_qid[qid][:negatives_from]
        negs = np.array([d for d in top if d not in keep_out], dtype=object)
        if len(negs) < group_size - 1:
            few += 1
        out.qids.append(qid)
        out.queries.append(query)
        out.positives.append(np.array(with_text, dtype=object))
        out.negatives.append(negs)
        for d in with_text:
            out.texts[d] = text_of[d]
        for d in negs:
            out.texts[d] = text_of[d]
    stats.update(skipped_no_positive=skipped, positives_without_text=positives_without_text,
                 queries_with_few_negatives=few, train_queries=len(out))
    warn_skipped(skipped, len(topics), COMPONENT, f'label >= {min_label} with text')
    if positives_without_text:
        warnings.warn(f'{COMPONENT}: skipped {positives_without_text} judged positives without text (not among the '
                      f'candidates and not given by texts=)')
    if few:
        warnings.warn(f'{COMPONENT}: {few} training queries have fewer than group_size - 1 = {group_size - 1} '
                      f'negatives among their candidates (up to negatives_from = {negatives_from} of them are used); '
                      f'their groups are smaller')
    return out


def sample_groups(data: TrainingGroups, group_size: int, rng: np.random.Generator) -> List[tuple]:
    """One epoch of groups: every training query once, in random order, as ``(query index, [docnos])`` where the
    first docno is a positive drawn uniformly from the query's positives and the others are ``group_size - 1``
    distinct negatives drawn uniformly without replacement from its negative pool (fewer if the pool is smaller).
    Called again each epoch, so negatives (and positives) are resampled."""
    groups = []
    for i in rng.permutation(len(data)):
        pos = data.positives[i][rng.integers(len(data.positives[i]))]
        pool = data.negatives[i]
        k = min(group_size - 1, len(pool))
        negs = pool[rng.choice(len(pool), size=k, replace=False)] if k else pool[:0]
        groups.append((int(i), [pos, *negs]))
    return groups
