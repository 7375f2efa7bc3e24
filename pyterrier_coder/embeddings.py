"""The fixed document embeddings of a FlexIndex: docno to row id, gathering the rows a batch needs from the
memory map (in a background thread while a step runs), and exact top-k search."""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import pandas as pd
import torch


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
