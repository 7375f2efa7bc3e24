"""BM25 first-stage retrieval over a PISA (default) or Terrier index, with a built-in docstore.

Example::

    dataset = load_dataset('../shared/datasets/nfcorpus')
    bm25 = BM25.from_dataset(dataset, 'indexes/nfcorpus.bm25')     # indexes once, then reopens
    pipeline = bm25 % 100 >> bm25.text_loader() >> some_cross_encoder

An index directory holds the backend's index (``pisa/`` or ``terrier/``), a docstore of the document
texts (``docstore/``: the utf-8 ``text.bin`` with ``offsets.npy``, and sorted docnos) and ``bm25.json``,
which is written last, so its presence means a complete build.
"""
import contextlib
import ctypes
import functools
import importlib.util
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
from array import array
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

import numpy as np
import pandas as pd
import pyterrier as pt

from .corpora import CorpusFingerprint, check_document, describe_corpus, known_length
from .artifacts import build_lock, staging_directory
from .datasets import load_dataset
from .text import TextLoader
from .validation import validate_columns


__all__ = ['BM25', 'TextLoader', 'terrier_unavailable_reason']

BACKENDS = ('pisa', 'terrier')
_DEFAULT_STEMMER = {'pisa': 'porter2', 'terrier': 'porter'}
_META_FILE = 'bm25.json'
_FORMAT_VERSION = 1  # of the directory layout; bumped when it changes incompatibly
# The only entries BM25 ever creates in its directory; overwrite refuses to delete anything else.
_OWN_ENTRIES = {_META_FILE, 'pisa', 'terrier', 'docstore'}
_RESULT_COLUMNS = ['docno', 'score', 'rank']
# Terrier truncates docnos to a reserved length (20 by default): reserve more, and reject longer ones.
_TERRIER_DOCNO_BYTES = 128


class BM25(pt.Transformer):
    """BM25 retrieval: maps ``qid, query`` to ``qid, query, docno, score, rank`` (plus ``text`` if ``text=True``).

    The index is built once with :meth:`index` (or :meth:`from_dataset`) and reopened from ``path`` after that.
    When a pipeline is compiled, ``bm25 % k`` is fused into a retrieval of ``k`` results that shares the opened index.
    """

    def __init__(self,
                 path: Union[str, Path],
                 *,
                 backend: Optional[str] = None,
                 num_results: int = 1000,
                 k1: float = 0.9,
                 b: float = 0.4,
                 text: bool = False,
                 threads: int = 1,
                 stemmer: Optional[str] = None,
                 verbose: bool = False):
        """
        Args:
            path: The index directory (created by :meth:`index`).
            backend: ``'pisa'`` or ``'terrier'``. Defaults to the backend of an existing index, else ``'pisa'``.
            num_results: Results per query.
            k1: BM25 ``k1`` (the PISA default).
            b: BM25 ``b`` (the PISA default).
            text: Add the document ``text`` column to the results.
            threads: Threads for indexing and retrieval.
            stemmer: Stemmer used when indexing. Defaults to the stored one for an existing index, else
                ``'porter2'`` (PISA) or ``'porter'`` (Terrier).
            verbose: Show a progress bar during retrieval.
        """
        self.path = Path(path)
        meta = _read_meta(self.path)
        if meta is not None:
            if backend is not None and backend != meta['backend']:
                raise ValueError(f'{str(self.path)!r} holds a {meta["backend"]!r} index, not {backend!r}')
            if stemmer is not None and stemmer != meta['stemmer']:
                raise ValueError(f'{str(self.path)!r} was indexed with stemmer={meta["stemmer"]!r}, not {stemmer!r}')
            backend, stemmer = meta['backend'], meta['stemmer']
        backend = backend or 'pisa'
        if backend not in BACKENDS:
            raise ValueError(f'Unknown backend {backend!r}; expected one of {BACKENDS}')
        if int(num_results) < 1:
            raise ValueError(f'num_results must be >= 1, got {num_results!r}')
        self.backend = backend
        self.stemmer = stemmer or _DEFAULT_STEMMER[backend]
        self.num_results = int(num_results)
        self.k1 = k1
        self.b = b
        self.text = text
        self.threads = threads
        self.verbose = verbose
        # Opened lazily and shared with the copies made by fuse_rank_cutoff, so `bm25 % 100` reuses it.
        self._handle = _IndexHandle(self.path, backend)

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_dataset(cls, dataset, path: Union[str, Path], *, verbose: bool = True, **kwargs) -> 'BM25':
        """Opens the index at ``path``, first building it from ``dataset``'s corpus if it is not built yet; an index
        built from another corpus is refused (see :meth:`index`).

        Args:
            dataset: A dataset or a spec accepted by :func:`pyterrier_coder.datasets.load_dataset`.
            path: The index directory.
            verbose: Show a progress bar while indexing.
            **kwargs: Passed to :class:`BM25`.
        """
        bm25 = cls(path, **kwargs)
        # The dataset's own progress bar is off: index() shows the one bar (its total: the iterator's length).
        return bm25.index(load_dataset(dataset).get_corpus_iter(verbose=False), verbose=verbose)

    def built(self) -> bool:
        """Returns True if a complete index (of the current format) exists at ``path``."""
        return _read_meta(self.path) is not None

    def record(self) -> Optional[dict]:
        """The corpus this index was built from (``{'documents', 'sha256'}``), or None when not built (or built by
        an older version, which did not record it)."""
        meta = _read_meta(self.path)
        return meta.get('corpus') if meta else None

    def index(self, it: Iterable[Dict[str, Any]], *, overwrite: bool = False, verbose: bool = True) -> 'BM25':
        """Builds the index (and the docstore) from an iterable of ``{'docno': str, 'text': str}`` dicts.

        The index is built in a private directory beside ``path`` and moved into place when complete; another
        process building the same ``path`` waits for this one. If the index is already built, the corpus is read
        once (nothing is indexed) to check it is the one the index was built from: the same corpus returns ``self``,
        another one raises a ValueError (``overwrite=True`` rebuilds it). Pass a dataset's
        ``get_corpus_iter(verbose=False)`` to see only this method's progress bar.

        Raises:
            ValueError: The corpus is empty or has no indexable term, or a document lacks a string
                ``docno``/``text``, has whitespace or NUL in its docno (PISA separates the docno from the text
                by whitespace) or repeats a docno; or the index was built from another corpus. Errors raised by the
                corpus iterator itself propagate too. On any error, ``path`` is left as it was.
            FileExistsError: ``path`` is a non-empty directory that is not a complete BM25 index.
        """
        with build_lock(self.path):
            if self.built() and not overwrite:
                self._check_built_from(it)
                return self
            self._build(it, total=known_length(it), verbose=verbose, overwrite=overwrite)
        return self

    def _check_built_from(self, it) -> None:
        recorded = self.record()
        if recorded is None:      # built by an older version: nothing to compare with
            return
        given = CorpusFingerprint.of(it)
        if given != recorded:
            raise ValueError(f'BM25.index: {str(self.path)!r} was built from {describe_corpus(recorded)}, not from '
                             f'the one given ({describe_corpus(given)}). Use another path, or index(..., '
                             f'overwrite=True) to rebuild it')

    def _build(self, it, *, total=None, verbose=True, overwrite=False):
        if self.backend == 'terrier':
            _require_terrier()  # before anything is written
        self._check_directory(overwrite)
        with staging_directory(self.path) as root:
            if self.backend == 'pisa':
                import pyterrier_pisa
                docs = _CheckedDocs(it, root / 'docstore',
                                    tokenize=functools.partial(pyterrier_pisa.tokenize, stemmer=self.stemmer))
            else:
                docs = _CheckedDocs(it, root / 'docstore', max_docno_bytes=_TERRIER_DOCNO_BYTES)
            try:
                if self.backend == 'pisa':
                    self._build_pisa(root, docs, total, verbose)
                else:
                    self._build_terrier(root, docs, total, verbose)
                docs.raise_if_failed()  # an error raised inside the indexer's reader thread surfaces here
            except BaseException as ex:
                if docs.error is not None and docs.error is not ex:
                    raise docs.error from None  # a bad document made the indexer fail: report the cause
                raise
            finally:
                docs.close()
            meta = {'version': _FORMAT_VERSION, 'backend': self.backend, 'stemmer': self.stemmer,
                    'num_docs': docs.count, 'corpus': docs.fingerprint.as_dict()}
            (root / _META_FILE).write_text(json.dumps(meta))
            self._handle.reset()      # before the directory it may have opened is replaced
        self._handle.reset()

    def _build_pisa(self, root, docs, total, verbose):
        import pyterrier_pisa
        index = pyterrier_pisa.PisaIndex(str(root / 'pisa'), stemmer=self.stemmer, threads=self.threads)
        with _native_output_silenced() as stderr:
            bar = docs.progress(total, verbose, file=stderr, desc=f'BM25 indexing ({self.backend})')
            index.indexer('text').index(bar)
            bar.close()

    def _build_terrier(self, root, docs, total, verbose):
        indexer = pt.terrier.IterDictIndexer(str(root / 'terrier'), meta={'docno': _TERRIER_DOCNO_BYTES},
                                             text_attrs=['text'],
                                             stemmer=self.stemmer, threads=self.threads, overwrite=True)
        bar = docs.progress(total, verbose, file=None, desc=f'BM25 indexing ({self.backend})')
        indexer.index(bar)
        bar.close()

    def _check_directory(self, overwrite):
        """Refuses to replace what BM25 did not build, and, without ``overwrite``, an incomplete index."""
        if self.path.exists():
            if not self.path.is_dir():
                raise FileExistsError(f'{str(self.path)!r} exists and is not a directory')
            entries = {p.name for p in self.path.iterdir()}
            if entries and not overwrite:
                raise FileExistsError(f'{str(self.path)!r} is not empty but holds no complete BM25 index '
                                      '(an interrupted build?); pass overwrite=True to rebuild it')
            if entries - _OWN_ENTRIES:
                raise FileExistsError(f'Refusing to overwrite {str(self.path)!r}: it holds files BM25 did not '
                                      f'create: {sorted(entries - _OWN_ENTRIES)[:5]}')

    # -- retrieval ---------------------------------------------------------------------------------

    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        """Retrieves ``num_results`` documents for each query in ``inp`` (columns ``qid``, ``query``)."""
        with validate_columns(inp, 'BM25') as v:
            v.query_frame(extra_columns=['query'])
        added = _RESULT_COLUMNS + (['text'] if self.text else [])
        out_columns = [c for c in inp.columns if c not in added] + added
        if len(inp) == 0:
            return pd.DataFrame({c: pd.Series(dtype=inp[c].dtype if c in inp.columns else object)
                                 for c in out_columns}).astype({'score': float, 'rank': int})
        inp = inp.drop(columns=[c for c in added if c in inp.columns])
        inp = inp.assign(qid=inp['qid'].astype(str), query=inp['query'].fillna('').astype(str))
        queries = inp['query']
        res = self._handle.retrieve(inp.assign(query=queries.map(_without_nul)), self.num_results, k1=self.k1,
                                    b=self.b, threads=self.threads, verbose=self.verbose)
        if queries.str.contains('\x00', regex=False).any():      # the results carry the query as it was given
            res['query'] = res['qid'].map(dict(zip(inp['qid'], queries)))
        # Keep the input's query order (multi-threaded retrieval may interleave queries).
        order = {qid: i for i, qid in reversed(list(enumerate(inp['qid'])))}
        res = res.assign(_order=res['qid'].map(order)).sort_values(['_order', 'rank'], kind='stable')
        res = res.drop(columns='_order').reset_index(drop=True)
        res = res.astype({'docno': str, 'score': float, 'rank': int})
        if self.text:
            res['text'] = self._handle.docstore().get(res['docno'])
        return res[out_columns]

    def fuse_rank_cutoff(self, k: int) -> Optional['BM25']:
        """Returns a BM25 retrieving ``k`` results (sharing this one's opened index), used for ``bm25 % k``."""
        if k >= self.num_results:
            return self  # already at least as strict
        clone = BM25(self.path, backend=self.backend, num_results=k, k1=self.k1, b=self.b, text=self.text,
                     threads=self.threads, stemmer=self.stemmer, verbose=self.verbose)
        clone._handle = self._handle
        return clone

    def text_loader(self, fields='*', *, verbose: bool = False, **kwargs) -> 'TextLoader':
        """Returns a transformer that adds the ``text`` of each ``docno`` from this index's docstore (PyTerrier's
        text-loader protocol, so ``pt.text.get_text(bm25)`` works too; the docstore holds the ``text`` field only)."""
        return TextLoader(self._handle.docstore(), fields)

    def num_docs(self) -> int:
        """Returns the number of indexed documents."""
        self._handle.require_built()
        return _read_meta(self.path)['num_docs']

    # Equal BM25s give equal results: pt.Experiment(precompute_prefix=True) then runs a shared first stage once
    # even when the pipelines were built from separate BM25 objects (as PyTerrier's own retrievers compare).
    def _key(self) -> tuple:
        return (str(self.path.resolve()), self.backend, self.num_results, self.k1, self.b, self.text, self.stemmer)

    def __eq__(self, other):
        return self._key() == other._key() if isinstance(other, BM25) else NotImplemented

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        args = [repr(str(self.path)), f'backend={self.backend!r}', f'num_results={self.num_results!r}']
        if (self.k1, self.b) != (0.9, 0.4):
            args += [f'k1={self.k1!r}', f'b={self.b!r}']
        if self.text:
            args.append('text=True')
        return f'BM25({", ".join(args)})'


def _read_meta(path: Path) -> Optional[dict]:
    """The metadata of a complete index of the current format at ``path``, else None."""
    file = path / _META_FILE
    if not file.is_file():
        return None
    meta = json.loads(file.read_text())
    return meta if meta.get('version') == _FORMAT_VERSION else None


# -- index handle (backend retrievers + docstore, opened once) ---------------------------------------

class _IndexHandle:
    """Opens a BM25's backend index and docstore on first use; shared by its rank-cutoff copies.

    It keeps no BM25 settings: every retrieval is given the BM25's current ones, so ``set_parameter`` (and
    ``pt.GridScan`` over ``k1``/``b``) takes effect. Pickled (``.parallel()``, joblib, ``copy.deepcopy``), it
    drops the opened native objects, which cannot be pickled, and reopens them on first use."""

    def __init__(self, path: Path, backend: str):
        self.path, self.backend = path, backend
        self.reset()

    def reset(self):
        self._retrievers = {}   # (k1, b) -> a prepared PISA retriever (its native retrieval context)
        self._terrier_index = None
        self._docstore = None

    def __getstate__(self):
        return {'path': self.path, 'backend': self.backend}

    def __setstate__(self, state):
        self.__init__(state['path'], state['backend'])

    def require_built(self):
        if _read_meta(self.path) is None:
            found = ' (it holds an index of an older format: rebuild with overwrite=True)' \
                if (self.path / _META_FILE).is_file() else ''
            raise RuntimeError(f'No BM25 index at {str(self.path)!r}{found}; call .index(corpus_iter) first '
                               '(or use BM25.from_dataset)')

    def docstore(self) -> '_DocStore':
        if self._docstore is None:
            self.require_built()
            self._docstore = _DocStore(self.path / 'docstore')
        return self._docstore

    def retrieve(self, queries: pd.DataFrame, k: int, *, k1: float, b: float, threads: int,
                 verbose: bool) -> pd.DataFrame:
        self.require_built()
        if self.backend == 'terrier':
            return self._retrieve_terrier(queries, k, k1=k1, b=b, threads=threads, verbose=verbose)
        import copy
        import pyterrier_pisa
        if (k1, b) not in self._retrievers:
            index = pyterrier_pisa.PisaIndex(str(self.path / 'pisa'), threads=threads)
            with _native_output_silenced():
                self._retrievers[k1, b] = index.bm25(k1=k1, b=b, num_results=k, threads=threads, verbose=verbose)
        # A shallow copy shares the prepared retrieval context; only what does not change it is set on the copy.
        # (Retrieval itself prints nothing, so it is not silenced and verbose=True still shows its bar.)
        retriever = copy.copy(self._retrievers[k1, b])
        retriever.num_results, retriever.threads, retriever.verbose = k, threads, verbose
        return retriever.transform(queries)

    def _retrieve_terrier(self, queries, k, *, k1, b, threads, verbose):
        _require_terrier()
        if self._terrier_index is None:
            self._terrier_index = pt.terrier.IndexFactory.of(str(self.path / 'terrier' / 'data.properties'))
        retriever = pt.terrier.Retriever(self._terrier_index, wmodel='BM25', num_results=k, threads=threads,
                                         controls={'bm25.k_1': str(k1), 'bm25.b': str(b)}, verbose=verbose)
        # Terrier's query parser rejects some punctuation (quotes, colons, ...), so it gets words only
        # (and no empty queries); the original query text is kept on the results.
        words = queries[['qid']].assign(query=queries['query'].map(lambda q: ' '.join(re.findall(r'\w+', q))))
        words = words[words['query'] != '']
        if len(words) == 0:
            return queries.iloc[:0].assign(docno=[], score=[], rank=[])
        res = retriever.transform(words)
        res = res[['qid', 'docno', 'score', 'rank']].astype({'qid': str})
        return queries.merge(res, on='qid', how='inner')


# -- docstore -----------------------------------------------------------------------------------------

class _DocStoreWriter:
    """Writes a docstore: the texts concatenated as utf-8 (``text.bin``) with their byte offsets (``offsets.npy``),
    and the docnos sorted as fixed-width bytes (``docnos.npy``) with their document positions (``order.npy``).

    The sorted docnos are looked up exactly with a binary search, from a memory map. (npids, which pyterrier-dr
    uses, was tried first: its inverse lookup confuses "1" with "001" and misses some zero-padded docnos.)
    """

    def __init__(self, path: Path):
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._text = (path / 'text.bin').open('wb')
        self._offsets = array('Q', [0])
        self._docnos = []

    def add(self, docno: str, text: str):
        data = text.encode('utf-8')
        self._text.write(data)
        self._offsets.append(self._offsets[-1] + len(data))
        self._docnos.append(docno.encode('utf-8'))

    def close(self):
        if self._text.closed:
            return
        self._text.close()
        np.save(self.path / 'offsets.npy', np.frombuffer(self._offsets, dtype=np.uint64))
        docnos = np.array(self._docnos, dtype=bytes)  # fixed width: the longest docno
        order = np.argsort(docnos, kind='stable')
        np.save(self.path / 'docnos.npy', docnos[order])
        np.save(self.path / 'order.npy', order.astype(np.int64))
        self._docnos = []


class _DocStore:
    """Read access to a docstore written by :class:`_DocStoreWriter`."""

    def __init__(self, path: Path):
        self.path = path
        self.sorted_docnos = np.load(path / 'docnos.npy', mmap_mode='r')
        self.order = np.load(path / 'order.npy', mmap_mode='r')
        self.offsets = np.load(path / 'offsets.npy', mmap_mode='r')
        # np.memmap cannot map an empty file (a corpus of empty texts).
        size = int(self.offsets[-1])
        self.text = np.memmap(path / 'text.bin', dtype=np.uint8, mode='r') if size else np.zeros(0, np.uint8)

    fields = ('text',)

    def __getstate__(self):   # pickled, the memory maps would be copied whole: reopen them instead
        return {'path': self.path}

    def __setstate__(self, state):
        self.__init__(state['path'])

    @property
    def label(self) -> str:
        return str(self.path.parent)

    def __len__(self):
        return len(self.order)

    def get(self, docnos: Iterable[str], field: str = 'text') -> List[str]:
        """Returns the text of each docno. Raises KeyError naming (a few of) the unknown docnos."""
        docnos = [str(d) for d in docnos]
        if not docnos:
            return []
        keys = np.array([d.encode('utf-8') for d in docnos], dtype=bytes)
        pos = np.searchsorted(self.sorted_docnos, keys).clip(max=len(self.sorted_docnos) - 1)
        # Fixed-width bytes compare as if NUL-padded; docnos cannot contain NUL (checked at indexing).
        found = self.sorted_docnos[pos] == keys
        if not found.all():
            missing = list(dict.fromkeys(d for d, f in zip(docnos, found) if not f))
            raise KeyError(f'{len(missing)} docno(s) not in the docstore {str(self.path)!r}, e.g. {missing[:5]}')
        idxs = self.order[pos]
        starts, ends = self.offsets[idxs], self.offsets[idxs + 1]
        return [bytes(self.text[s:e]).decode('utf-8') for s, e in zip(starts, ends)]


def _without_nul(text: str) -> str:
    """NUL characters as spaces: the backends' tokenisers pass text to C/Java strings, which a NUL ends or breaks
    (PISA: 'embedded null character'); a NUL is never part of a term."""
    return text.replace('\x00', ' ') if '\x00' in text else text


class _CheckedDocs:
    """Wraps a corpus iterator: validates each document and writes it to the docstore as it passes.

    Indexers consume the corpus on a reader thread of their own, where an exception would only end the
    input early (and yield a silently truncated index). So the error is stored and re-raised afterwards.
    """

    _END = object()

    def __init__(self, it, docstore_path: Path, *, max_docno_bytes: Optional[int] = None, tokenize=None):
        """
        Args:
            it: The corpus iterator.
            docstore_path: Where to write the docstore.
            max_docno_bytes: Reject longer docnos (the backend would truncate them).
            tokenize: The backend's tokeniser, used to require a document with at least one term before the
                indexer starts (PISA aborts the whole process on a corpus without terms).
        """
        self.it = iter(it)
        self.docstore_path = docstore_path
        self.max_docno_bytes = max_docno_bytes
        self.tokenize = tokenize
        self.error = None
        self.count = 0
        self.fingerprint = CorpusFingerprint()
        self._seen = set()
        self._writer = None

    def progress(self, total, verbose, file, desc):
        """Returns the checked documents, wrapped in a progress bar."""
        # Documents are read up to the first one with terms here, on the caller's thread, so that an
        # empty, term-less or malformed start of the corpus fails before the indexer starts.
        head = []
        while True:
            doc = next(self.it, self._END)
            if doc is self._END:
                raise ValueError('Cannot index an empty corpus' if not head else
                                 f'None of the {len(head)} documents contains an indexable term')
            head.append(self._check(doc))
            if self.tokenize is None or self.tokenize(_without_nul(head[-1]['text'])):
                break
        self._writer = _DocStoreWriter(self.docstore_path)
        kwargs = {'file': file} if file is not None else {}
        return pt.tqdm(self._generate(head), total=total, desc=desc, unit='doc', disable=not verbose, **kwargs)

    def _check(self, doc) -> dict:
        n = self.count + 1
        doc = check_document(doc, n, self._seen)
        docno = doc['docno']
        if self.max_docno_bytes is not None and len(docno.encode('utf-8')) > self.max_docno_bytes:
            raise ValueError(f'Document {n}: docno {docno[:40]!r}... is longer than the {self.max_docno_bytes} '
                             'bytes the terrier backend stores')
        self.count += 1
        self.fingerprint.add(docno, doc['text'])
        return doc

    def _generate(self, head):
        try:
            for doc in itertools.chain(head, map(self._check, self.it)):
                self._writer.add(doc['docno'], doc['text'])      # the docstore keeps the text as it is
                yield {'docno': doc['docno'], 'text': _without_nul(doc['text'])}
        except Exception as ex:  # noqa: BLE001 -- re-raised on the caller's thread by raise_if_failed()
            self.error = ex

    def raise_if_failed(self):
        if self.error is not None:
            raise self.error

    def close(self):
        if self._writer is not None:
            self._writer.close()


# -- native output -------------------------------------------------------------------------------

@contextlib.contextmanager
def _native_output_silenced():
    """Sends the process's stdout/stderr to a temporary file while PISA's C++ code runs.

    PISA logs every indexing and query-preparation step from C++, and this build's ``pyterrier_pisa.log_level``
    has no native counterpart, so the file descriptors themselves are redirected. Yields a handle on the real
    stderr for a progress bar. On error the captured output is replayed to stderr, as it may explain the failure.
    """
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = os.dup(1), os.dup(2)
    real_stderr = os.fdopen(os.dup(saved[1]), 'w')
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        failed = True
        try:
            yield real_stderr
            failed = False
        finally:
            _flush_c_stdio()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            real_stderr.close()
            if failed:
                log.seek(0)
                sys.stderr.write(log.read()[-5000:].decode('utf-8', 'replace'))


def _flush_c_stdio():
    # C/C++ output buffered in stdio would otherwise be written to the real stdout after it is restored.
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


# -- Terrier availability -------------------------------------------------------------------------

def _local_jar_version(package: str, suffix: str = '') -> Optional[str]:
    """The newest version of an org.terrier jar in PyTerrier's home or the local Maven repository."""
    home = Path(os.environ.get('PYTERRIER_HOME', Path.home() / '.pyterrier'))
    m2 = Path.home() / '.m2' / 'repository' / 'org' / 'terrier' / package
    versions = []
    for jar in [*home.glob(f'{package}-*{suffix}.jar'), *m2.glob(f'*/{package}-*{suffix}.jar')]:
        match = re.fullmatch(rf'{package}-(\d+(?:\.\d+)*){suffix}\.jar', jar.name)
        if match:
            versions.append(tuple(int(x) for x in match.group(1).split('.')))
    return '.'.join(map(str, max(versions))) if versions else None


@functools.lru_cache(maxsize=None)
def terrier_unavailable_reason() -> Optional[str]:
    """Returns why the Terrier backend cannot be used here, or None if it can (starting Java if needed).

    Nothing is downloaded: Terrier's jars come from Maven Central, so they must already be in PyTerrier's home
    (``~/.pyterrier``) or ``~/.m2``; the check then starts Java with those local versions pinned, which avoids
    PyTerrier's online version lookup.
    """
    if not pt.java.started():
        if importlib.util.find_spec('jnius') is None:
            return 'pyjnius is not installed (pip install "python-terrier[java]")'
        if not (os.environ.get('JAVA_HOME') or shutil.which('java')):
            return 'no Java runtime found (java is not on PATH and JAVA_HOME is unset)'
        terrier = _local_jar_version('terrier-assemblies', '-jar-with-dependencies')
        helper = _local_jar_version('terrier-python-helper')
        if terrier is None or helper is None:
            return ('Terrier jars (terrier-assemblies, terrier-python-helper) are not available locally; they are '
                    'downloaded from Maven Central by pt.java.init(), which needs internet access')
        from pyterrier.terrier import java as terrier_java
        if terrier_java.configure['terrier_version'] is None:
            pt.terrier.set_version(terrier)
        if terrier_java.configure['helper_version'] is None:
            pt.terrier.set_helper_version(helper)
        try:
            pt.java.init()
        except Exception as ex:  # noqa: BLE001 -- any start-up failure means "unavailable", with its reason
            return f'starting Java/Terrier failed: {type(ex).__name__}: {ex}'
    try:
        pt.terrier.J.ApplicationSetup  # noqa: B018 -- fails if Java started without Terrier's jars
    except Exception as ex:  # noqa: BLE001
        return f'Terrier classes are not loaded: {type(ex).__name__}: {ex}'
    return None


def _require_terrier():
    reason = terrier_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"The 'terrier' backend is unavailable: {reason}. Use backend='pisa' instead.")
