"""PyTerrier frames as the trainers and rerankers need them: string ids, no NaN query, no duplicated
(qid, docno) rows, grouped by qid best first; qrels likewise; and the grouping of rows into padded per-query arrays."""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import pandas as pd

from .validation import validate_columns

PAD = -1


def normalise_frame(frame: pd.DataFrame, component: str) -> pd.DataFrame:
    """String qid/docno, no NaN query text (it becomes ''), no duplicated (qid, docno) rows: the best one -- highest
    ``score``, else lowest ``rank``, else first -- is kept and the others are dropped with a warning. Result
    frames come back grouped by qid, best first."""
    converted, rows, _ = normalisation_plan(frame, component)
    if len(rows) != len(converted) or (rows[1:] < rows[:-1]).any():
        return converted.iloc[rows]
    return converted


def normalisation_plan(frame: pd.DataFrame, component: str, *, row_ids: Optional[np.ndarray] = None) -> tuple:
    """What :func:`normalise_frame` does, without moving any row yet: returns ``(converted, rows, qid_codes)``,
    ``converted`` the input with str qid/docno/query columns in the input order, ``rows`` the positions of the rows
    kept in their normalised order (``converted.iloc[rows]`` is ``normalise_frame``'s result, so a reranker moves
    the rows once, to their final order) and ``qid_codes`` numbering the qids of those rows in sorted qid order.
    ``row_ids`` (the docnos' row ids in the input order, -1 for unknown), when every docno is known, stand in for
    the docno strings as duplicate keys (the strings are not hashed again).

    Qid strings are hashed once (a sorted factorisation); the sort by (qid, score/rank) and the duplicate test
    then run on integer codes, which gives the order and the kept rows of ``sort_values(kind='stable')`` +
    ``duplicated`` (ties keep their input order, NaN scores/ranks sort last)."""
    out = frame.copy(deep=False)     # copy-on-write: the caller's frame is never modified
    out['qid'] = frame['qid'].astype(str)
    if 'query' in frame.columns:
        out['query'] = frame['query'].fillna('').astype(str)
    codes = _codes(out['qid'], sort=True)
    rows = np.arange(len(out))
    if 'docno' in frame.columns:
        out['docno'] = frame['docno'].astype(str)
        key = 'score' if 'score' in out.columns else 'rank' if 'rank' in out.columns else None
        if key is not None:
            rows = _sorted_rows(codes, out[key], descending=key == 'score')
        if row_ids is not None and len(row_ids) and (row_ids >= 0).all():
            doc_codes = np.asarray(row_ids, dtype=np.int64)
        else:
            doc_codes = _codes(out['docno'])
        pairs = codes[rows] * (int(doc_codes.max(initial=0)) + 1) + doc_codes[rows]
        dup = pd.Index(pairs).duplicated(keep='first')
        if dup.any():
            warnings.warn(f'{component}: dropped {int(dup.sum())} duplicated (qid, docno) rows (kept the best scored)')
            rows = rows[~dup]
    return out, rows, codes[rows]


def _codes(values: pd.Series, sort: bool = False) -> np.ndarray:
    """int64 codes of the distinct values (in sorted order when ``sort``); missing values share the last code, as
    they sort last. Runs of equal values (a result frame's qids) are found first, so only one value per run is
    hashed."""
    array = values.to_numpy(dtype=object)
    if len(array) == 0:
        return np.empty(0, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate([[True], array[1:] != array[:-1]]))
    codes = pd.factorize(array[starts], sort=sort)[0].astype(np.int64)
    codes[codes < 0] = codes.max(initial=-1) + 1
    return np.repeat(codes, np.diff(np.append(starts, len(array))))


def _sorted_rows(codes: np.ndarray, key: pd.Series, *, descending: bool) -> np.ndarray:
    """Stable order by (qid code, key) with the key descending or ascending, NaN last either way."""
    if key.dtype.kind in 'fiu':
        values = key.to_numpy(dtype=np.float64)
        return group_order(codes, -values if descending else values)
    # other dtypes (nullable, object...): pandas' own sort, on the codes instead of the qid strings
    by = pd.DataFrame({'q': codes, 'k': key.to_numpy()})
    return by.sort_values(['q', 'k'], ascending=[True, not descending], kind='stable').index.to_numpy()


def pad_groups(codes: np.ndarray, values: np.ndarray, n_groups: int, fill=PAD) -> tuple:
    """Lays ``values`` out as rows per group code (``fill`` padded): returns (padded, order, positions) so that
    ``padded[codes[order], positions] == values[order]``; within a row, values keep their input order."""
    order = np.argsort(codes, kind='stable')
    counts = np.bincount(codes, minlength=n_groups)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    padded = np.full((n_groups, counts.max() if len(counts) else 0), fill, dtype=values.dtype)
    positions = np.arange(len(order)) - np.repeat(starts, counts)
    padded[codes[order], positions] = values[order]
    return padded, order, positions


def pad_rows(rows: list, fill, dtype) -> np.ndarray:
    """Arrays of different lengths as the rows of one ``[len(rows), longest]`` array, ``fill`` padded."""
    padded = np.full((len(rows), max((len(row) for row in rows), default=0)), fill, dtype=dtype)
    for i, row in enumerate(rows):
        padded[i, :len(row)] = row
    return padded


def group_order(codes: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """The stable order of ``np.lexsort((keys, codes))`` (codes 0..G-1; float keys, NaN last), computed as a sort
    of each group's keys in a padded matrix (3x faster than the lexsort for groups of 1000), or found already in
    place (one linear check)."""
    keys = np.asarray(keys, dtype=np.float64)
    if len(codes) < 2:
        return np.arange(len(codes))
    same = codes[1:] == codes[:-1]
    if (codes[1:] >= codes[:-1]).all() and not (same & (keys[1:] < keys[:-1])).any() and not np.isnan(keys).any():
        return np.arange(len(codes))
    padded, order, positions = pad_groups(codes, keys, int(codes.max()) + 1, fill=np.inf)   # padding sorts last
    cells = np.full(padded.shape, -1, dtype=np.int64)
    cells[codes[order], positions] = order
    cells = np.take_along_axis(cells, np.argsort(padded, axis=1, kind='stable'), 1)
    return cells[cells >= 0]


def normalise_qrels(qrels: pd.DataFrame, component: str) -> pd.DataFrame:
    """``qid, docno, label`` with string ids; a (qid, docno) judged twice keeps its highest label (warned)."""
    with validate_columns(qrels, component, 'qrels frame') as v:
        v.columns(includes=['qid', 'docno', 'label'])
    qrels = qrels[['qid', 'docno', 'label']].copy()
    qrels['qid'] = qrels['qid'].astype(str)
    qrels['docno'] = qrels['docno'].astype(str)
    qrels = qrels.sort_values('label', ascending=False, kind='stable')
    dup = qrels.duplicated(['qid', 'docno'])
    if dup.any():
        warnings.warn(f'{component}: dropped {int(dup.sum())} duplicated (qid, docno) qrels (kept the highest label)')
        qrels = qrels[~dup]
    return qrels.sort_index(kind='stable')


def unknown_qrels(qrels: pd.DataFrame, qids, component: str) -> int:
    """How many (normalised) qrels belong to queries not in ``qids``; they are ignored, with a warning."""
    absent = ~qrels['qid'].isin(set(qids))
    n = int(absent.sum())
    if n:
        queries = qrels['qid'][absent].nunique()
        # in a pipeline's fit, the frame holds only the queries the preceding stage retrieved something for
        warnings.warn(f'{component}: ignored {n} qrels of {queries} {"query" if queries == 1 else "queries"} absent '
                      f'from the training frame (not among its topics, or the preceding stage retrieved nothing '
                      f'for them)')
    return n


def warn_skipped(skipped: int, total: int, component: str, why: str) -> None:
    if skipped:
        warnings.warn(f'{component}: skipped {skipped} of {total} training queries without a judged positive ({why})')
