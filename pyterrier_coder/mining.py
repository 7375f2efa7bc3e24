"""Training data for the query-encoder trainers, stored compactly.

* :class:`EmbeddingStore` wraps the fixed, memory-mapped document embeddings of a pyterrier-dr FlexIndex:
  docno → row id, per-batch gathering (only the rows a batch needs are read; the matrix is never loaded whole),
  and exact top-k search with torch matmul over blocks (dynamic retrieval for ADORE and CODER's refresh).
* :func:`mine_candidates` turns the result frame of a first stage into a :class:`CandidateSet`: per query an
  int32 row of document ids (top-N candidates + injected judged positives, padded with -1) and the qrels labels
  aligned with it -- never a DataFrame of N x queries rows.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import List, Optional

import numpy as np
import pandas as pd
import torch

PAD = -1
#: what a trainer does with judged documents whose label is below its ``min_label`` but above 0 (graded qrels):
#: train on them as negatives, or leave them out of the negatives
LOWER_LABELS = ('negative', 'ignore')


class EmbeddingStore:
    """The fixed document embeddings of a FlexIndex (read-only, memory-mapped)."""

    def __init__(self, flex):
        self.flex = flex
        self._vecs = None
        self._docnos = None
        self._exact = None
        self._device_vecs = None

    @property
    def vecs(self) -> np.ndarray:
        if self._vecs is None:
            self._vecs = self.flex.np_vecs()
        return self._vecs

    @property
    def docnos(self):
        if self._docnos is None:
            self._docnos = self.flex.docnos()
        return self._docnos

    def __len__(self):
        return self.vecs.shape[0]

    @property
    def dim(self) -> int:
        return self.vecs.shape[1]

    # An exact in-memory docno -> row table is the fastest lookup; above this many documents it would cost too much
    # memory, and npids' hashed lookup (verified) is used instead.
    EXACT_LOOKUP_MAX_DOCS = 2_000_000
    #: exact search on a GPU keeps a copy of the whole matrix there when it is at most this large (bytes); larger
    #: matrices (and any on CPU above this size) are scored in blocks, to bound the [queries, rows] score matrix
    SEARCH_CACHE_MAX_BYTES = 2 * 1024 ** 3

    def ids(self, docnos, *, component: str = 'pyterrier_coder', on_missing: str = 'error') -> np.ndarray:
        """Row ids of ``docnos``; unknown docnos raise a KeyError listing a few, or map to -1 when
        ``on_missing='drop'`` (the caller then drops them and warns)."""
        # pandas' str array: hashed once by the lookup, no conversion to a fixed-width numpy string array
        docnos = pd.Series(docnos, copy=False).astype(str).array
        if len(docnos) == 0:
            return np.empty(0, dtype=np.int64)
        out = None
        if len(self) > self.EXACT_LOOKUP_MAX_DOCS:
            strings = np.asarray(docnos, dtype=str)
            try:
                out = np.asarray(self.docnos.inv[strings], dtype=np.int64)
                # npids' hashed lookup can answer a near-miss ("1" for "001"): verify by the forward mapping
                if not (self.docnos.fwd[out].astype(str) == strings).all():
                    out = None
            except (KeyError, ValueError, IndexError):
                out = None
        if out is None:
            out = self._exact_index().get_indexer(docnos).astype(np.int64)
        if on_missing == 'error' and (out < 0).any():
            missing = sorted({str(d) for d in docnos[out < 0]})
            raise KeyError(f'{component}: {len(missing)} docno(s) are not in the document index '
                           f'{self.flex.index_path}: {missing[:5]}{" ..." if len(missing) > 5 else ""} '
                           f"(pass on_missing='drop' to drop them with a warning)")
        return out

    def _exact_index(self) -> pd.Index:
        """An exact docno -> row lookup (built once)."""
        if self._exact is None:
            self._exact = pd.Index(self.docnos.fwd[np.arange(len(self))].astype(str))
        return self._exact

    def gather(self, ids, device=None) -> torch.Tensor:
        """Embeddings of the rows ``ids`` (any shape; -1 = padding gives a zero vector) as a float32 tensor.
        Only the requested rows are read from the memory-mapped matrix, straight into the output (one copy:
        reading sorted unique rows first and expanding them costs a second copy, measured 1.5x slower)."""
        ids = np.asarray(ids)
        flat = ids.reshape(-1)
        valid = flat >= 0
        if valid.all():
            rows = np.asarray(np.take(self.vecs, flat, axis=0))
        else:
            rows = np.asarray(np.take(self.vecs, np.where(valid, flat, 0), axis=0))
            rows[~valid] = 0
        out = torch.from_numpy(rows.reshape(*ids.shape, self.dim))
        return out.to(device, non_blocking=True) if device is not None else out

    def search(self, query_vecs: torch.Tensor, k: int, *, block_size: int = 65536) -> tuple:
        """Exact top-k by inner product over all documents: returns (scores [Q,k], ids [Q,k] int64).

        On CPU the product reads the memory map itself: nothing is copied (reading its cached pages cost about
        what reading a private copy does, measured). On a GPU, a matrix of at most ``SEARCH_CACHE_MAX_BYTES`` is
        copied to the device once and kept (ADORE searches at every step). Otherwise the matrix is scored in blocks
        of ``block_size`` rows and the per-block top-k merged, so memory stays bounded whatever the corpus size."""
        with torch.autocast(query_vecs.device.type, enabled=False):   # exact: fp32 even inside a training step's AMP
            return self._search(query_vecs.detach().float(), min(k, len(self)), block_size)

    def _search(self, q: torch.Tensor, k: int, block_size: int) -> tuple:
        if self.vecs.nbytes <= self.SEARCH_CACHE_MAX_BYTES:
            if q.device.type == 'cpu':
                matrix = self._rows(0, len(self))
            else:
                if self._device_vecs is None or self._device_vecs.device != q.device:
                    self._device_vecs = self._rows(0, len(self)).to(q.device)
                matrix = self._device_vecs
            top = (q @ matrix.T).topk(k, dim=1)
            return top.values, top.indices
        best_s = best_i = None
        for start in range(0, len(self), block_size):
            block = self._rows(start, start + block_size).to(q.device)
            s = q @ block.T
            i = torch.arange(start, start + block.shape[0], device=q.device).expand_as(s)
            if best_s is not None:
                s = torch.cat([best_s, s], 1)
                i = torch.cat([best_i, i], 1)
            top = s.topk(min(k, s.shape[1]), dim=1)
            best_s, best_i = top.values, i.gather(1, top.indices)
        return best_s, best_i

    def _rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` as a CPU tensor viewing the memory map (no copy)."""
        with warnings.catch_warnings():
            # the map is read-only and torch only reads it; torch warns about any non-writable array
            warnings.filterwarnings('ignore', message='.*not writable.*')
            return torch.from_numpy(self.vecs[start:stop])


class GatherPrefetcher:
    """Gathers candidate embeddings in a background thread while the current training step runs.

    :meth:`request` (called with the next batch's row ids) starts ``store.gather`` on a worker thread (numpy's
    memory-mapped reads release the GIL); :meth:`take` returns the result for exactly those ids, waiting for it
    if needed, or None when they were not requested (then the caller gathers them itself). Requests are matched
    by their ids, never by position, so a stale one (candidates refreshed since) is simply skipped: the values
    used are always those of the current ids, and training is bitwise the same with and without prefetching.
    :meth:`close` (also on exceptions and early stopping) cancels what is pending and joins the thread."""

    #: requests kept waiting at most (older ones are dropped): a step's micro-batches plus slack
    MAX_PENDING = 64

    def __init__(self, store: EmbeddingStore, device=None):
        from concurrent.futures import ThreadPoolExecutor
        self.store = store
        self.pin = torch.device(device).type == 'cuda' if device is not None else False
        store.vecs                      # map the matrix here, not concurrently in the worker
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix='pyterrier_coder-prefetch')
        self._pending = []
        self.hits = 0       #: batches served from the background

    def _gather(self, ids: np.ndarray) -> torch.Tensor:
        out = self.store.gather(ids)
        return out.pin_memory() if self.pin else out

    def request(self, ids: np.ndarray) -> None:
        ids = np.array(ids, copy=True)
        self._pending.append((ids, self._pool.submit(self._gather, ids)))
        while len(self._pending) > self.MAX_PENDING:
            self._pending.pop(0)[1].cancel()

    def take(self, ids: np.ndarray) -> Optional[torch.Tensor]:
        for i, (requested, future) in enumerate(self._pending):
            if requested.shape == ids.shape and np.array_equal(requested, ids):
                for _, stale in self._pending[:i]:
                    stale.cancel()
                del self._pending[:i + 1]
                self.hits += 1
                return future.result()
        return None

    def close(self) -> None:
        for _, future in self._pending:
            future.cancel()
        self._pending = []
        self._pool.shutdown(wait=True, cancel_futures=True)


@dataclasses.dataclass
class CandidateSet:
    """Per training query: candidate row ids (``[Q, L]`` int32, -1 padded) and their qrels labels.

    :meth:`save` writes it to a directory and :meth:`load` opens it memory-mapped (only the rows of a batch are
    read); :func:`mine_candidates_to_disk` writes one chunk of queries at a time."""
    qids: List[str]
    queries: List[str]
    docids: np.ndarray
    labels: np.ndarray
    num_retrieved: np.ndarray   #: how many of each row came from the first stage (the rest are injected positives)
    stats: dict
    #: the document index the row ids refer to (``{'path', 'docs'}``), when known
    index: Optional[dict] = None

    FORMAT = 'pyterrier_coder.CandidateSet'

    def __len__(self):
        return len(self.qids)

    def __repr__(self):
        # shapes only: the arrays may be memory-mapped and hold 500M entries
        where = ', memory-mapped' if isinstance(self.docids, np.memmap) else ''
        index = f", index={self.index['path']!r}" if self.index else ''
        return f'CandidateSet({len(self)} queries x {self.docids.shape[1]} candidates{where}{index})'

    @classmethod
    def from_rows(cls, qids, queries, rows, labels, num_retrieved, stats, index=None) -> 'CandidateSet':
        """Pads variable-length id/label rows into the compact arrays."""
        width = max((len(r) for r in rows), default=0)
        docids = np.full((len(rows), width), PAD, dtype=np.int32)
        padded_labels = np.zeros((len(rows), width), dtype=np.float32)
        for i, (r, l) in enumerate(zip(rows, labels)):
            docids[i, :len(r)] = r
            padded_labels[i, :len(l)] = l
        return cls(list(qids), list(queries), docids, padded_labels, np.asarray(num_retrieved, dtype=np.int32), stats,
                   index)

    def select(self, idx) -> 'CandidateSet':
        idx = np.asarray(idx)
        return CandidateSet([self.qids[i] for i in idx], [self.queries[i] for i in idx], self.docids[idx],
                            self.labels[idx], self.num_retrieved[idx], self.stats, self.index)

    def save(self, path) -> 'CandidateSet':
        """Writes the set to the directory ``path`` (``docids.npy`` int32, ``labels.npy`` float32,
        ``num_retrieved.npy``, ``topics.json``, ``meta.json`` with the stats, written last) and returns it
        re-opened memory-mapped."""
        writer = CandidateSetWriter(path)
        writer.append(self)
        return writer.finish(self.stats, self.index)

    @classmethod
    def load(cls, path, *, mmap: bool = True) -> 'CandidateSet':
        """Opens a saved set; the id and label matrices stay on disk (``np.memmap``) unless ``mmap=False``."""
        path = Path(path)
        if not (path / 'meta.json').exists():
            raise FileNotFoundError(f'{path} is not a complete saved CandidateSet (no meta.json)')
        meta = json.loads((path / 'meta.json').read_text())
        if meta.get('format') != cls.FORMAT:
            raise ValueError(f'{path}: not a {cls.FORMAT} (format {meta.get("format")!r})')
        topics = json.loads((path / 'topics.json').read_text())
        mode = 'r' if mmap else None
        return cls(topics['qids'], topics['queries'], np.load(path / 'docids.npy', mmap_mode=mode),
                   np.load(path / 'labels.npy', mmap_mode=mode), np.load(path / 'num_retrieved.npy'),
                   meta['stats'], meta.get('index'))

    def check_index(self, store: 'EmbeddingStore', component: str) -> None:
        """Refuses a set whose row ids were mined against an index of another size."""
        if self.index and self.index.get('docs') is not None and self.index['docs'] != len(store):
            raise ValueError(f'{component}: these candidates were mined against an index of {self.index["docs"]:,} '
                             f'documents ({self.index.get("path")}), not this one ({len(store):,} documents: '
                             f'{store.flex.index_path}); their row ids would point at other documents')


class CandidateSetWriter:
    """Writes a :class:`CandidateSet` to a directory one part (chunk of queries) at a time: each part goes to disk
    as it comes; :meth:`finish` lays the parts out as the final matrices (padded to the widest row) by streaming
    copies, so memory stays at one part whatever the number of queries.

    With a ``resume_key`` (any JSON value describing what is being written), a writer that finds the parts of an
    interrupted writer with the same key keeps them: :attr:`infos` holds what was recorded with each, and the next
    :meth:`append` continues after them. Any other key, or none, starts from an empty directory."""

    def __init__(self, path, *, resume_key=None):
        self.path = Path(path)
        self.parts_dir = self.path / '.parts'
        (self.path / 'meta.json').unlink(missing_ok=True)      # incomplete until finish() writes it again
        self.shapes, self.qids, self.queries, self.infos = [], [], [], []
        key_file = self.parts_dir / 'key.json'
        key = json.loads(json.dumps(resume_key))
        if resume_key is not None and key_file.exists() and json.loads(key_file.read_text()) == key:
            while (self.parts_dir / f'{len(self.shapes):06d}.json').exists():
                meta = json.loads((self.parts_dir / f'{len(self.shapes):06d}.json').read_text())
                self.shapes.append(tuple(meta['shape']))
                self.qids += meta['qids']
                self.queries += meta['queries']
                self.infos.append(meta['info'])
        else:
            shutil.rmtree(self.parts_dir, ignore_errors=True)
            self.parts_dir.mkdir(parents=True)
            if resume_key is not None:
                key_file.write_text(json.dumps(key))

    def append(self, part: Optional['CandidateSet'], info=None) -> None:
        """Adds a part (``None`` or an empty set: a chunk that gave no query, still recorded for resuming) with
        ``info``, any JSON value returned in :attr:`infos` when resuming."""
        from ._util import atomic_write_text
        i = len(self.shapes)
        qids, queries, shape = [], [], (0, 0)
        if part is not None and len(part.qids):
            for name in ('docids', 'labels', 'num_retrieved'):
                np.save(self.parts_dir / f'{i:06d}.{name}.npy', np.asarray(getattr(part, name)))
            qids, queries, shape = list(part.qids), list(part.queries), tuple(part.docids.shape)
        # written last: a part whose .json exists is complete
        atomic_write_text(self.parts_dir / f'{i:06d}.json',
                          json.dumps({'shape': shape, 'qids': qids, 'queries': queries, 'info': info}))
        self.shapes.append(shape)
        self.qids += qids
        self.queries += queries
        self.infos.append(info)

    def finish(self, stats: dict, index: Optional[dict] = None) -> 'CandidateSet':
        n = sum(rows for rows, _ in self.shapes)
        width = max((cols for _, cols in self.shapes), default=0)
        docids = np.lib.format.open_memmap(self.path / 'docids.npy', 'w+', np.int32, (n, width))
        labels = np.lib.format.open_memmap(self.path / 'labels.npy', 'w+', np.float32, (n, width))
        num_retrieved, start = [], 0
        for i, (rows, cols) in enumerate(self.shapes):
            if not rows:
                continue
            docids[start:start + rows, :cols] = np.load(self.parts_dir / f'{i:06d}.docids.npy')
            docids[start:start + rows, cols:] = PAD
            labels[start:start + rows, :cols] = np.load(self.parts_dir / f'{i:06d}.labels.npy')
            labels[start:start + rows, cols:] = 0
            num_retrieved.append(np.load(self.parts_dir / f'{i:06d}.num_retrieved.npy'))
            start += rows
        docids.flush()
        labels.flush()
        del docids, labels
        np.save(self.path / 'num_retrieved.npy', np.concatenate(num_retrieved) if num_retrieved
                else np.empty(0, np.int32))
        from ._util import atomic_write_text
        atomic_write_text(self.path / 'topics.json', json.dumps({'qids': self.qids, 'queries': self.queries}))
        atomic_write_text(self.path / 'meta.json', json.dumps(
            {'format': CandidateSet.FORMAT, 'version': 1, 'queries': n, 'width': width, 'stats': stats,
             'index': index}, indent=1))
        shutil.rmtree(self.parts_dir)
        return CandidateSet.load(self.path)


def normalise_frame(frame: pd.DataFrame, component: str) -> pd.DataFrame:
    """String qid/docno, no NaN query text (it becomes ''), no duplicated (qid, docno) rows: the best one -- highest
    ``score``, else lowest ``rank``, else first -- is kept and the others are dropped with a warning. Result
    frames come back grouped by qid, best first."""
    converted, rows, _ = normalised(frame, component)
    if len(rows) != len(converted) or (rows[1:] < rows[:-1]).any():
        return converted.iloc[rows]
    return converted


def normalised(frame: pd.DataFrame, component: str, *, row_ids: Optional[np.ndarray] = None) -> tuple:
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


def check_lower_labels(value: str, component: str) -> str:
    if value not in LOWER_LABELS:
        raise ValueError(f'{component}: lower_labels must be one of {LOWER_LABELS}, got {value!r}')
    return value


def normalise_qrels(qrels: pd.DataFrame, component: str) -> pd.DataFrame:
    """``qid, docno, label`` with string ids; a (qid, docno) judged twice keeps its highest label (warned)."""
    from ._util import validate_columns
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


class _Judgements:
    """The qrels of a mining run, looked up per query: judged positives (row ids, ``label >= min_label``, in the
    index) and the label of any judged row."""

    def __init__(self, qrels: pd.DataFrame, store: EmbeddingStore, min_label: int, component: str):
        self.qrels = normalise_qrels(qrels, component)
        ids = store.ids(self.qrels['docno'].values, component=component, on_missing='drop')
        judged = self.qrels.assign(docid=ids).sort_values(['qid', 'docid'], kind='stable')
        self.judged = {qid: (g['docid'].to_numpy(), g['label'].to_numpy(np.float32))
                       for qid, g in judged.groupby('qid', sort=False)}
        positive = (judged['label'] >= min_label).to_numpy()
        known = (judged['docid'] >= 0).to_numpy()
        self.positives_not_in_index = int((positive & ~known).sum())
        self.positives = {qid: g['docid'].to_numpy() for qid, g in judged[positive & known].groupby('qid', sort=False)}

    def labels(self, qid: str, row: np.ndarray) -> np.ndarray:
        """The qrels label of each row id (0 when not judged)."""
        out = np.zeros(len(row), dtype=np.float32)
        ids, labels = self.judged.get(qid, (None, None))
        if ids is not None and len(ids) and len(row):
            at = np.minimum(np.searchsorted(ids, row), len(ids) - 1)
            hit = ids[at] == row
            out[hit] = labels[at[hit]]
        return out


def _mine_rows(candidates: pd.DataFrame, judgements: _Judgements, store: EmbeddingStore, *, num_candidates: int,
               inject_positives: bool, on_missing: str, component: str) -> tuple:
    """The candidate rows of the queries of a (normalised) first-stage frame: returns (qids, queries, rows,
    labels, num_retrieved, skipped)."""
    topics = candidates.drop_duplicates('qid')[['qid', 'query']]
    if 'docno' in candidates.columns:
        cand_ids = store.ids(candidates['docno'].values, component=component, on_missing=on_missing)
        if (cand_ids < 0).any():
            warnings.warn(f'{component}: dropped {int((cand_ids < 0).sum())} candidates whose docno is not in the index')
        candidates = candidates.assign(_docid=cand_ids)[cand_ids >= 0]
        groups = {qid: g['_docid'].values[:num_candidates] for qid, g in candidates.groupby('qid', sort=False)}
    else:
        groups = {}
    qids, queries, rows, labels, n_retrieved, skipped = [], [], [], [], [], 0
    for qid, query in zip(topics['qid'], topics['query']):
        pos = judgements.positives.get(qid)
        if pos is None or len(pos) == 0:
            skipped += 1
            continue
        retrieved = groups.get(qid, np.empty(0, dtype=np.int64))
        row = np.concatenate([retrieved, np.setdiff1d(pos, retrieved)]) if inject_positives else retrieved
        qids.append(qid)
        queries.append(query)
        rows.append(row)
        labels.append(judgements.labels(qid, row))
        n_retrieved.append(len(retrieved))
    return qids, queries, rows, labels, n_retrieved, skipped


def mine_candidates(candidates: pd.DataFrame, qrels: pd.DataFrame, store: EmbeddingStore, *,
                    num_candidates: int = 1000, inject_positives: bool = True, min_label: int = 1,
                    on_missing: str = 'error', component: str = 'pyterrier_coder') -> CandidateSet:
    """Builds the compact candidate set from a first stage's results and the qrels.

    Per query: the top ``num_candidates`` by score; then every judged document with ``label >= min_label``
    that the first stage missed is appended (the CODER paper does this); queries without any such positive
    are skipped and counted. Qrels of queries absent from ``candidates`` are ignored and counted. (For
    collections whose candidate frame would not fit in memory: :func:`mine_candidates_to_disk`.)
    """
    candidates = normalise_frame(candidates, component)
    judgements = _Judgements(qrels, store, min_label, component)
    topics = candidates.drop_duplicates('qid')
    stats = {'queries': len(topics),
             'qrels_for_unknown_queries': unknown_qrels(judgements.qrels, topics['qid'], component),
             'positives_not_in_index': judgements.positives_not_in_index}
    qids, queries, rows, labels, n_retrieved, skipped = _mine_rows(
        candidates, judgements, store, num_candidates=num_candidates, inject_positives=inject_positives,
        on_missing=on_missing, component=component)
    stats['skipped_no_positive'] = skipped
    warn_skipped(skipped, len(topics), component, f'label >= {min_label} in the index')
    return CandidateSet.from_rows(qids, queries, rows, labels, n_retrieved, stats, index_info(store))


def as_store(index) -> EmbeddingStore:
    """An :class:`EmbeddingStore` of an EmbeddingStore, a DenseIndex or a pyterrier-dr FlexIndex."""
    return index if isinstance(index, EmbeddingStore) else EmbeddingStore(getattr(index, 'flex', index))


def index_info(store: EmbeddingStore) -> dict:
    return {'path': str(Path(store.flex.index_path).resolve()), 'docs': len(store)}


def _fingerprint(frame: pd.DataFrame) -> str:
    return hashlib.sha256(pd.util.hash_pandas_object(frame, index=False).values.tobytes()).hexdigest()


def fingerprint(*parts) -> str:
    """sha256 of training data: numeric arrays (read in chunks of rows, so a memory-mapped candidate set is not
    loaded whole), strings and numbers, and sequences of these (e.g. per-query arrays of docnos)."""
    digest = hashlib.sha256()

    def feed(part):
        if isinstance(part, np.ndarray) and part.dtype != object:
            digest.update(f'{part.dtype}{part.shape}'.encode())
            for start in range(0, len(part), 65536):
                digest.update(np.ascontiguousarray(part[start:start + 65536]).tobytes())
        elif part is None or isinstance(part, (str, bytes, int, float, np.generic)):
            digest.update(repr(part).encode() + b'\x1f')
        elif isinstance(part, np.ndarray) or (isinstance(part, list) and all(isinstance(s, str) for s in part)):
            digest.update(('\x1e'.join(map(str, part)) + '\x1d').encode())    # strings, in one call
        else:
            digest.update(b'[')
            for item in part:
                feed(item)
            digest.update(b']')
    for part in parts:
        feed(part)
    return digest.hexdigest()


def mine_candidates_to_disk(first_stage, topics: pd.DataFrame, qrels: pd.DataFrame, index, path, *,
                            chunk_size: int = 1000, num_candidates: int = 1000, inject_positives: bool = True,
                            min_label: int = 1, on_missing: str = 'error', resume: bool = False,
                            component: str = 'pyterrier_coder', verbose: bool = True) -> CandidateSet:
    """:func:`mine_candidates` for collections whose candidate frame would not fit in memory (MS MARCO: 500k
    queries x 1000 candidates = 500M rows): runs ``first_stage`` (any PyTerrier transformer, e.g. ``bm25 % 1000``)
    on ``chunk_size`` queries at a time, and appends each chunk's int32 rows to the directory ``path``, which is
    returned as a memory-mapped :class:`CandidateSet` (:meth:`CandidateSet.load` opens it again later).

    Memory stays at one chunk's result frame plus the qrels. The rows, their order (sorted qids) and the stats are
    those :func:`mine_candidates` gives on the whole frame. ``index`` is the document index the row ids refer to
    (FlexIndex, DenseIndex or EmbeddingStore).

    ``resume=True`` continues an interrupted run in the same ``path`` after its last completed chunk, provided the
    topics, qrels, settings, index and first stage (by its ``repr``) are the same; otherwise mining starts over.
    The result is the one an uninterrupted run gives."""
    from ._util import validate_columns
    store = as_store(index)
    with validate_columns(topics, component, 'topics frame') as v:
        v.columns(includes=['qid', 'query'])
    topics = normalise_frame(topics[['qid', 'query']], component).drop_duplicates('qid').sort_values('qid', kind='stable')
    judgements = _Judgements(qrels, store, min_label, component)
    key = None
    if resume:
        key = dict(topics=_fingerprint(topics), qrels=_fingerprint(judgements.qrels), first_stage=repr(first_stage),
                   chunk_size=chunk_size, num_candidates=num_candidates, inject_positives=inject_positives,
                   min_label=min_label, on_missing=on_missing, index=index_info(store))
    writer = CandidateSetWriter(path, resume_key=key)
    seen = {qid for info in writer.infos for qid in info['seen']}
    queries_with_results = sum(len(info['seen']) for info in writer.infos)
    skipped = sum(info['skipped'] for info in writer.infos)
    done = min(len(writer.infos) * chunk_size, len(topics))
    import pyterrier as pt
    with pt.tqdm(total=len(topics), initial=done, desc=f'{component}: mining', unit='query',
                 disable=not verbose) as progress:
        for start in range(done, len(topics), chunk_size):
            chunk = topics.iloc[start:start + chunk_size]
            candidates = normalise_frame(first_stage(chunk), component)
            chunk_qids = candidates['qid'].unique()
            seen.update(chunk_qids)
            queries_with_results += len(chunk_qids)
            qids, queries, rows, labels, n_retrieved, chunk_skipped = _mine_rows(
                candidates, judgements, store, num_candidates=num_candidates, inject_positives=inject_positives,
                on_missing=on_missing, component=component)
            skipped += chunk_skipped
            part = CandidateSet.from_rows(qids, queries, rows, labels, n_retrieved, {}) if qids else None
            writer.append(part, {'seen': [str(q) for q in chunk_qids], 'skipped': int(chunk_skipped)})
            progress.update(len(chunk))
    stats = {'queries': queries_with_results,
             'qrels_for_unknown_queries': unknown_qrels(judgements.qrels, seen, component),
             'positives_not_in_index': judgements.positives_not_in_index, 'skipped_no_positive': skipped}
    warn_skipped(skipped, queries_with_results, component, f'label >= {min_label} in the index')
    return writer.finish(stats, index_info(store))
