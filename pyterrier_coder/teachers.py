"""The two teachers of TAS-Balanced's dual supervision, each asked once before training.

* A **pairwise teacher** is any PyTerrier transformer that scores a result frame (``qid``, ``query``, ``docno``, the
  passage text, and whatever its own first stage gave, e.g. BM25's ``score`` for a fused ``Interpolate``): a trained
  :class:`~pyterrier_coder.MonoElectra`, ``Interpolate(coder)``... :func:`score_with_teacher` scores every training
  (query, passage) once, as the paper used static teacher scores; :class:`TeacherCache` keeps the scores in memory
  and, given a path, on disk, so that a second or resumed fit does not ask the teacher again.
* An **in-batch teacher** must score every query of a batch against every passage of it at no cost: a dense model,
  whose embeddings of the training queries and passages :func:`dense_teacher_embeddings` computes once (a
  :class:`~pyterrier_coder.DenseEncoder`, a :class:`~pyterrier_coder.DenseIndex`, a fitted
  :class:`~pyterrier_coder.Coder` or any model with a dense ``encoder`` and a document index), so that a batch's
  teacher scores are one small matrix product.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import pandas as pd
import pyterrier as pt

from .embeddings import EmbeddingStore
from .encoders import DenseEncoder, DenseIndex


def frame_key(frame: pd.DataFrame, columns: Sequence[str]) -> str:
    """sha256 of ``columns`` of ``frame`` (pandas' vectorised row hashes, so a frame of long texts is cheap)."""
    digest = hashlib.sha256()
    for column in columns:
        digest.update(column.encode() + b'\x1f')
        digest.update(pd.util.hash_pandas_object(frame[column].astype(str), index=False).values.tobytes())
    return digest.hexdigest()


class TeacherCache:
    """Arrays computed by a teacher, keyed by a string describing everything they depend on (the teacher and the
    data it scored). Kept in memory, and with ``path`` also on disk as ``<path>/<name>.npz`` (written atomically):
    a later process that asks for the same name and key reads them back; a file with another key is replaced."""

    def __init__(self, path=None):
        self.path = Path(path) if path is not None else None
        self._memory: Dict[str, tuple] = {}

    def get(self, name: str, key: str) -> Optional[Dict[str, np.ndarray]]:
        found = self._memory.get(name)
        if found is not None and found[0] == key:
            return found[1]
        file = self._file(name)
        if file is None or not file.exists():
            return None
        with np.load(file, allow_pickle=False) as stored:
            if str(stored['__key__']) != key:
                return None
            arrays = {k: stored[k] for k in stored.files if k != '__key__'}
        self._memory[name] = (key, arrays)
        return arrays

    def put(self, name: str, key: str, arrays: Dict[str, np.ndarray]) -> None:
        self._memory[name] = (key, arrays)
        file = self._file(name)
        if file is None:
            return
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f'.{file.name}.', suffix='.npz')
        os.close(fd)
        np.savez(tmp, __key__=np.array(key), **arrays)
        os.replace(tmp, file)

    def _file(self, name: str) -> Optional[Path]:
        return self.path / f'{name}.npz' if self.path is not None else None

    def __repr__(self):
        return f'TeacherCache({str(self.path) if self.path else "in memory"!r})'


def score_with_teacher(teacher: pt.Transformer, frame: pd.DataFrame, *, queries_per_call: int = 256,
                       verbose: bool = True, component: str = 'TasBalanced') -> np.ndarray:
    """The ``teacher``'s score of every row of ``frame`` (``qid``, ``query``, ``docno`` and what the teacher needs,
    rows of a query together), asked ``queries_per_call`` queries at a time under a progress bar. A teacher output
    without a ``score`` column, without some of the (qid, docno) rows it was given, or with scores that are not
    finite is an error: a pair without its teacher margin cannot be trained on, and guessing one would be silent."""
    qids = frame['qid'].astype(str).to_numpy()
    docnos = frame['docno'].astype(str).to_numpy()
    starts = np.flatnonzero(np.concatenate([[True], qids[1:] != qids[:-1]])) if len(qids) else np.empty(0, int)
    if len(np.unique(qids[starts])) != len(starts):
        raise ValueError(f'{component}: the rows of each query must be together in the frame given to the teacher')
    bounds = np.append(starts, len(qids))
    scores = np.full(len(frame), np.nan, dtype=np.float64)
    with pt.tqdm(total=len(frame), desc=f'{component}: pairwise teacher', unit='passage',
                 disable=not verbose) as progress:
        for first in range(0, len(starts), queries_per_call):
            lo, hi = bounds[first], bounds[min(first + queries_per_call, len(starts))]
            part = frame.iloc[lo:hi]
            out = teacher(part)
            if 'score' not in out.columns:
                raise ValueError(f'{component}: the pairwise teacher {teacher!r} returned no score column (its '
                                 f'columns: {list(out.columns)}); a teacher must score the frame it is given')
            found = pd.DataFrame({'qid': out['qid'].astype(str).to_numpy(), 'docno': out['docno'].astype(str).to_numpy(),
                                  'score': out['score'].to_numpy(dtype=np.float64)}).drop_duplicates(['qid', 'docno'])
            wanted = pd.DataFrame({'qid': qids[lo:hi], 'docno': docnos[lo:hi]})
            joined = wanted.merge(found, on=['qid', 'docno'], how='left', indicator=True)
            got, missing = joined['score'].to_numpy(), joined['_merge'].ne('both').to_numpy()
            if missing.any():
                examples = [f'({q}, {d})' for q, d in zip(qids[lo:hi][missing][:3], docnos[lo:hi][missing][:3])]
                raise ValueError(f'{component}: the pairwise teacher {teacher!r} returned no score for '
                                 f'{int(missing.sum())} of the {hi - lo} (query, passage) rows it was given, e.g. '
                                 f'{", ".join(examples)}. It must score every row: a reranker that cuts or filters '
                                 f'its input (e.g. % k) cannot be a teacher')
            if not np.isfinite(got).all():
                raise ValueError(f'{component}: the pairwise teacher {teacher!r} gave {int((~np.isfinite(got)).sum())} '
                                 f'scores that are not finite (NaN or inf)')
            scores[lo:hi] = got
            progress.update(hi - lo)
    return scores


def _encode_in_chunks(encode, items: Sequence[str], dim: int, *, desc: str, unit: str, verbose: bool,
                      chunk: int) -> np.ndarray:
    """``encode`` of ``items``, ``chunk`` at a time under a progress bar, as one float32 array ``[len(items), dim]``."""
    parts = []
    with pt.tqdm(total=len(items), desc=desc, unit=unit, disable=not verbose) as progress:
        for start in range(0, len(items), chunk):
            parts.append(np.asarray(encode(list(items[start:start + chunk])), dtype=np.float32))
            progress.update(len(parts[-1]))
    return np.concatenate(parts) if parts else np.empty((0, dim), dtype=np.float32)


def encode_queries(encoder, queries: Sequence[str], *, desc: str, verbose: bool = True,
                   chunk: int = 256) -> np.ndarray:
    """``encoder.encode_queries`` of ``queries`` under a progress bar (``chunk`` queries at a time)."""
    return _encode_in_chunks(encoder.encode_queries, queries, encoder.dim, desc=desc, unit='query', verbose=verbose,
                             chunk=chunk)


def encode_passages(encoder, texts: Sequence[str], *, desc: str, verbose: bool = True, chunk: int = 256) -> np.ndarray:
    """``encoder.encode_docs`` of ``texts`` under a progress bar."""
    return _encode_in_chunks(encoder.encode_docs, texts, encoder.dim, desc=desc, unit='passage', verbose=verbose,
                             chunk=chunk)


def dense_teacher_embeddings(teacher, queries: Sequence[str], docnos: Sequence[str],
                             texts: Callable[[Sequence[str]], Sequence[str]], *, verbose: bool = True,
                             component: str = 'TasBalanced') -> tuple:
    """``(query embeddings [Q, D], passage embeddings [P, D])`` of the training ``queries`` and passages ``docnos``
    under the in-batch ``teacher``, whose score of a (query, passage) is the inner product of the two:

    - a :class:`~pyterrier_coder.DenseEncoder` encodes both (``texts(docnos)`` gives the passages' text);
    - a :class:`~pyterrier_coder.DenseIndex` reads the passages' embeddings from its index (encoding the passages
      absent from it with its encoder, which built it);
    - a model with a dense ``encoder`` and a document index (``store``, or a ``dense_index``), such as a fitted
      :class:`~pyterrier_coder.Coder`, :class:`~pyterrier_coder.Adore`, :class:`~pyterrier_coder.Star` or
      :class:`~pyterrier_coder.TasBalanced`, encodes the queries with its query encoder and reads the passages from
      its index; passages absent from that index are an error (its query encoder is not its document encoder).
    """
    docnos = list(map(str, docnos))
    if isinstance(teacher, DenseEncoder):
        encoder, store, can_encode = teacher, None, True
    elif isinstance(teacher, DenseIndex):
        encoder, store, can_encode = teacher.encoder, EmbeddingStore(teacher.flex), True
    elif isinstance(getattr(teacher, 'encoder', None), DenseEncoder) and (
            getattr(teacher, 'store', None) is not None or isinstance(getattr(teacher, 'dense_index', None), DenseIndex)):
        if getattr(teacher, 'head', None) is not None:
            raise ValueError(f'{component}: the in-batch teacher {teacher!r} scores with a transformer head over a '
                             f'candidate list, not by inner products; use a dot-product model')
        store = getattr(teacher, 'store', None) or EmbeddingStore(teacher.dense_index.flex)
        encoder, can_encode = teacher.encoder, False
    else:
        raise TypeError(f'{component}: in_batch_teacher must be a dense model that scores by inner products (a '
                        f'DenseEncoder, a DenseIndex, a fitted Coder or Adore, or a model with a dense encoder and '
                        f'an index), got {type(teacher).__name__}')
    name = type(teacher).__name__
    q = encode_queries(encoder, queries, desc=f'{component}: in-batch teacher ({name}), queries', verbose=verbose)
    if store is None:
        return q, encode_passages(encoder, texts(docnos), desc=f'{component}: in-batch teacher ({name}), passages',
                                  verbose=verbose)
    check = getattr(store, 'dim', None)
    if check is not None and check != q.shape[1]:
        raise ValueError(f'{component}: the in-batch teacher {teacher!r} gives {q.shape[1]}-d queries but its index '
                         f'holds {check}-d passages')
    ids = store.ids(docnos, component=component, on_missing='drop')
    absent = ids < 0
    if absent.any() and not can_encode:
        raise KeyError(f'{component}: {int(absent.sum())} training passages are not in the index of the in-batch '
                       f'teacher {teacher!r} (e.g. {[d for d, a in zip(docnos, absent) if a][:3]}); it can only '
                       f'score the passages of its index')
    d = np.zeros((len(docnos), q.shape[1]), dtype=np.float32)
    d[~absent] = store.gather(ids[~absent]).numpy()
    if absent.any():
        warnings.warn(f'{component}: {int(absent.sum())} training passages are not in the index of the in-batch '
                      f'teacher; encoded with its encoder')
        d[absent] = encode_passages(encoder, texts([dn for dn, a in zip(docnos, absent) if a]),
                                    desc=f'{component}: in-batch teacher, passages not in its index', verbose=verbose)
    return q, d
