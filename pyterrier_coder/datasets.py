"""Loading test collections: ir_datasets (``irds:...``) or a local directory.

ir_datasets gives each split of a collection its own id (``beir/nfcorpus/train``, ``.../dev``, ``.../test``), while
the runner and the examples ask one dataset for ``get_topics('train')``: ``irds:<id>`` of a collection that has such
sub-datasets is therefore an :class:`IrdsCollection`, whose splits are those sub-datasets.

A local dataset directory has this layout::

    corpus.jsonl          one JSON object per line: {"docno": str, "text": str}
    topics/<split>.tsv    tab-separated, header "qid<TAB>query"
    qrels/<split>.txt     TREC qrels: "qid 0 docno label"

Example::

    dataset = load_dataset('../shared/datasets/nfcorpus')
    topics, qrels = dataset.get_topics('test'), dataset.get_qrels('test')
"""
import contextlib
import itertools
import json
import warnings
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Union

import pandas as pd
import pyterrier as pt
from pyterrier.datasets import Dataset

from .text import TextLoader

__all__ = ['load_dataset', 'LocalDataset', 'IrdsCollection', 'DatasetError']


class DatasetError(ValueError):
    """A dataset file is malformed. The message names the file (and the line, where there is one)."""


def load_dataset(spec: Union[str, Path, Dataset]) -> Dataset:
    """Returns a dataset from a specification.

    Args:
        spec: ``"irds:<id>"`` for an `ir_datasets <https://ir-datasets.com/>`__ dataset: an
            :class:`IrdsCollection` when ``<id>`` has sub-datasets with queries (its splits, e.g.
            ``irds:beir/nfcorpus``), else what ``pt.get_dataset`` returns (e.g. ``irds:beir/nfcorpus/test``);
            a path to a local dataset directory (see :class:`LocalDataset`); or an existing
            :class:`pyterrier.datasets.Dataset`, which is returned as-is.

    Raises:
        FileNotFoundError: ``spec`` is a path that does not exist.
        ValueError: ``spec`` is neither of the above.
    """
    if isinstance(spec, Dataset):
        return spec
    if isinstance(spec, str) and spec.startswith('irds:'):
        collection = IrdsCollection(spec[len('irds:'):])
        return collection if collection.splits else collection._collection   # a leaf: pt.get_dataset's own
    if not isinstance(spec, (str, Path)):
        raise ValueError(f'Cannot load a dataset from {spec!r}: expected "irds:<id>" or a directory path')
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f'Dataset directory not found: {str(path)!r} '
                                '(use the "irds:" prefix for ir_datasets datasets)')
    if not path.is_dir():
        raise ValueError(f'Dataset path is not a directory: {str(path)!r}')
    return LocalDataset(path)


@contextlib.contextmanager
def _decoded_lines(file: Path):
    """``(line number, text)`` of each line of a UTF-8 file; a line that is not valid UTF-8 is a DatasetError
    naming the file, the line and the byte (decoding line by line, so that the line is known exactly)."""
    def lines(fin):
        for lineno, raw in enumerate(fin, start=1):
            try:
                yield lineno, raw.decode('utf-8')
            except UnicodeDecodeError as error:
                raise DatasetError(f'{file}:{lineno}: not valid UTF-8 (byte {raw[error.start]:#04x} at column '
                                   f'{error.start + 1}); dataset files must be UTF-8 encoded') from None
    with file.open('rb') as fin:
        yield lines(fin)


class _SizedIterator:
    """An iterator that also has a length, counted only when asked (PyTerrier's dataset corpus iterators have one,
    and code written for them calls ``len()``, e.g. for a progress bar)."""

    def __init__(self, items: Iterator, count: Callable[[], int]):
        self._items = items
        self._count = count

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._items)

    def __len__(self) -> int:
        return self._count()


class IrdsCollection(Dataset):
    """An ir_datasets collection and its splits, which ir_datasets names as sub-datasets: for
    ``IrdsCollection('beir/nfcorpus')``, ``get_topics('train')`` and ``get_qrels('train')`` are those of
    ``irds:beir/nfcorpus/train``, and the corpus is the collection's. Split names may contain ``/``
    (``msmarco-passage``: ``'dev/small'``, ``'trec-dl-2019/judged'``). Any other argument is handed to the
    collection's own ``get_topics``/``get_qrels`` (PyTerrier reads it as a query field); so is no argument.
    Nothing is downloaded until topics, qrels or documents are read."""

    def __init__(self, irds_id: str):
        self.irds_id = irds_id
        self._collection = pt.get_dataset(f'irds:{irds_id}')
        self._splits = None

    def __repr__(self):
        return f'IrdsCollection({self.irds_id!r})'

    @staticmethod
    def split_names(irds_id: str) -> List[str]:
        """The sub-datasets of ``irds_id`` that have queries, as split names, sorted (ir_datasets' registry is
        part of the package: no network)."""
        import ir_datasets      # a dependency of pyterrier
        prefix = irds_id.rstrip('/') + '/'
        return sorted(name[len(prefix):] for name in ir_datasets.registry
                      if name.startswith(prefix) and ir_datasets.load(name).has_queries())

    @property
    def splits(self) -> List[str]:
        if self._splits is None:
            self._splits = self.split_names(self.irds_id)
        return self._splits

    def split(self, name: str) -> Dataset:
        """The sub-dataset of a split, as ``pt.get_dataset`` returns it."""
        if name not in self.splits:
            raise KeyError(f'No split {name!r} in {self!r}; available: {self.splits}')
        return pt.get_dataset(f'irds:{self.irds_id}/{name}')

    def get_topics(self, variant: Optional[str] = None, **kwargs) -> pd.DataFrame:
        if variant in self.splits:
            return self.split(variant).get_topics(**kwargs)
        return self._collection.get_topics(variant, **kwargs)

    def get_qrels(self, variant: Optional[str] = None) -> pd.DataFrame:
        if variant in self.splits:
            return self.split(variant).get_qrels()
        return self._collection.get_qrels(variant)

    def get_corpus_iter(self, **kwargs):
        return self._collection.get_corpus_iter(**kwargs)

    def get_corpus_lang(self):
        return self._collection.get_corpus_lang()

    def get_topics_lang(self):
        return self._collection.get_topics_lang()

    def text_loader(self, *args, **kwargs) -> pt.Transformer:
        return self._collection.text_loader(*args, **kwargs)

    def info_url(self):
        return self._collection.info_url()


class LocalDataset(Dataset):
    """A test collection stored as plain files in a directory (layout in the module docstring).

    Every row is checked while reading: a malformed row raises :class:`DatasetError` naming the file
    and line rather than being skipped. ``qid`` and ``docno`` are always strings (``"001"`` stays ``"001"``).
    """

    def __init__(self, path: Union[str, Path]):
        """
        Args:
            path: The dataset directory.
        """
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f'Dataset directory not found: {str(self.path)!r}')
        if not any((self.path / name).exists() for name in ('corpus.jsonl', 'topics', 'qrels')):
            inside = sorted(p.name for p in self.path.iterdir() if (p / 'corpus.jsonl').exists())
            hint = f'; it holds the datasets {inside}' if inside else ''
            raise DatasetError(f'{str(self.path)!r} is not a dataset directory (no corpus.jsonl, topics/ or qrels/)'
                               f'{hint}')
        self._num_docs = None
        self._corpus_store = None

    def __repr__(self):
        return f'LocalDataset({str(self.path)!r})'

    def info_url(self) -> Optional[str]:
        return None

    # -- corpus ------------------------------------------------------------------------------------

    @property
    def _corpus_file(self) -> Path:
        return self.path / 'corpus.jsonl'

    def num_docs(self) -> int:
        """Returns the number of documents in the corpus (non-blank lines of ``corpus.jsonl``; cached)."""
        if self._num_docs is None:
            self._require(self._corpus_file)
            with self._corpus_file.open('rb') as fin:
                self._num_docs = sum(1 for line in fin if line.strip())
        return self._num_docs

    def get_corpus_iter(self, *, verbose: bool = True) -> Iterator[dict]:
        """Yields ``{'docno': str, 'text': str, ...}`` for each document in ``corpus.jsonl``.

        Fields other than ``docno`` and ``text`` are passed through unchanged. ``len()`` of the iterator is the
        number of documents, as for PyTerrier's own datasets.

        Args:
            verbose: Show a progress bar.

        Raises:
            DatasetError: A line is not a JSON object, or lacks a string ``docno``/``text``.
        """
        self._require(self._corpus_file)
        return _SizedIterator(self._read_corpus(verbose), self.num_docs)

    def _read_corpus(self, verbose: bool) -> Iterator[dict]:
        file = self._corpus_file
        with _decoded_lines(file) as lines:
            if verbose:
                lines = pt.tqdm(lines, total=self.num_docs(), desc=f'{self.path.name} corpus', unit='doc')
            for lineno, line in lines:
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError as ex:
                    raise DatasetError(f'{file}:{lineno}: not valid JSON ({ex.msg})') from None
                if not isinstance(doc, dict):
                    raise DatasetError(f'{file}:{lineno}: expected a JSON object, got {type(doc).__name__}')
                for field in ('docno', 'text'):
                    if field not in doc:
                        raise DatasetError(f'{file}:{lineno}: missing {field!r} field')
                # A JSON integer has no leading zeros to lose, so converting it is safe; anything else is not.
                if isinstance(doc['docno'], int) and not isinstance(doc['docno'], bool):
                    doc['docno'] = str(doc['docno'])
                if not isinstance(doc['docno'], str) or not doc['docno']:
                    raise DatasetError(f'{file}:{lineno}: docno must be a non-empty string, got {doc["docno"]!r}')
                if not isinstance(doc['text'], str):
                    raise DatasetError(f'{file}:{lineno}: text must be a string, got {type(doc["text"]).__name__}')
                yield doc

    def text_loader(self, fields='*', *, verbose: bool = False, **kwargs) -> pt.Transformer:
        """A transformer adding document fields (``text``, or any field of ``corpus.jsonl``) by ``docno``, so
        ``pt.text.get_text(dataset)`` works as with ir_datasets. The corpus is read into memory on first use: fine
        for test collections of this layout; for a large corpus use ``BM25(..., text=True).text_loader()``."""
        if self._corpus_store is None:
            self._corpus_store = _CorpusStore(self, verbose)
        return TextLoader(self._corpus_store, fields)

    # -- topics and qrels --------------------------------------------------------------------------

    @property
    def splits(self) -> List[str]:
        """The split names found in ``topics/`` (e.g. ``['dev', 'test', 'train']``), sorted."""
        return sorted(p.stem for p in (self.path / 'topics').glob('*.tsv'))

    def _split_file(self, kind: str, variant: Optional[str], suffix: str) -> Path:
        """Resolves the file of a split, choosing the only split when ``variant`` is None."""
        available = sorted(p.stem for p in (self.path / kind).glob(f'*{suffix}'))
        if variant is None:
            if len(available) != 1:
                raise ValueError(f'{self!r} has {len(available)} {kind} splits {available}; '
                                 'pass one of them as the split')
            variant = available[0]
        file = self.path / kind / f'{variant}{suffix}'
        if not file.is_file():
            raise KeyError(f'No {kind} split {variant!r} in {self!r} ({file} not found); available: {available}')
        return file

    def get_topics(self, variant: Optional[str] = None) -> pd.DataFrame:
        """Returns the topics of a split as a DataFrame with str columns ``qid`` and ``query``.

        Args:
            variant: The split name (e.g. ``'test'``); may be omitted when there is exactly one split.

        Empty queries are kept (as ``''``) with a warning, so that no topic silently disappears.

        Raises:
            KeyError: The split does not exist (the message lists the available ones).
            DatasetError: Missing ``qid<TAB>query`` header, a row with extra fields, an empty or duplicate qid.
        """
        file = self._split_file('topics', variant, '.tsv')
        qids, queries, first_line = [], [], {}
        with _decoded_lines(file) as lines:
            header = next(lines, (1, ''))[1].rstrip('\r\n')
            if header.split('\t') != ['qid', 'query']:
                raise DatasetError(f'{file}:1: expected the header "qid<TAB>query", found {header[:80]!r}')
            for lineno, line in lines:
                line = line.rstrip('\r\n')
                if not line.strip():
                    continue
                fields = line.split('\t')
                if len(fields) > 2:
                    raise DatasetError(f'{file}:{lineno}: expected 2 tab-separated fields (qid, query), '
                                       f'found {len(fields)}')
                qid = fields[0].strip()
                if not qid:
                    raise DatasetError(f'{file}:{lineno}: empty qid')
                if qid in first_line:
                    raise DatasetError(f'{file}:{lineno}: duplicate qid {qid!r} (first on line {first_line[qid]})')
                first_line[qid] = lineno
                qids.append(qid)
                # A row with only a qid is what pandas would read as a NaN query: keep it, as ''.
                queries.append(fields[1].strip() if len(fields) == 2 else '')
        empty = sum(1 for q in queries if not q)
        if empty:
            warnings.warn(f'{empty} of {len(queries)} topics in {file} have an empty query; kept as ""')
        return pd.DataFrame({'qid': pd.Series(qids, dtype=object), 'query': pd.Series(queries, dtype=object)})

    def get_qrels(self, variant: Optional[str] = None) -> pd.DataFrame:
        """Returns the relevance judgements of a split: ``qid`` (str), ``docno`` (str), ``label`` (int).

        Args:
            variant: The split name (e.g. ``'test'``); may be omitted when there is exactly one split.

        Raises:
            KeyError: The split does not exist (the message lists the available ones).
            DatasetError: A line without exactly 4 fields, a non-integer label, or a duplicate (qid, docno).
        """
        file = self._split_file('qrels', variant, '.txt')
        qids, docnos, labels, first_line = [], [], [], {}
        with _decoded_lines(file) as lines:
            for lineno, line in lines:
                fields = line.split()
                if not fields:
                    continue
                if len(fields) != 4:
                    raise DatasetError(f'{file}:{lineno}: expected 4 fields "qid iteration docno label", '
                                       f'found {len(fields)}: {line.strip()[:80]!r}')
                qid, _, docno, label = fields
                try:
                    label = int(label)
                except ValueError:
                    raise DatasetError(f'{file}:{lineno}: label must be an integer, found {label!r}') from None
                if (qid, docno) in first_line:
                    raise DatasetError(f'{file}:{lineno}: duplicate judgement for qid {qid!r}, docno {docno!r} '
                                       f'(first on line {first_line[qid, docno]})')
                first_line[qid, docno] = lineno
                qids.append(qid)
                docnos.append(docno)
                labels.append(label)
        return pd.DataFrame({
            'qid': pd.Series(qids, dtype=object),
            'docno': pd.Series(docnos, dtype=object),
            'label': pd.Series(labels, dtype='int64'),
        })

    # -- helpers -----------------------------------------------------------------------------------

    def _require(self, file: Path) -> Path:
        if not file.is_file():
            raise FileNotFoundError(f'{self!r}: {file} not found')
        return file


class _CorpusStore:
    """The documents of a :class:`LocalDataset`'s corpus by docno (for
    :class:`~pyterrier_coder.retrievers.TextLoader`)."""

    def __init__(self, dataset: LocalDataset, verbose: bool = False):
        self.label = str(dataset.path)
        self.docs = {doc['docno']: doc for doc in dataset.get_corpus_iter(verbose=verbose)}
        self.fields = list(dict.fromkeys(f for doc in itertools.islice(self.docs.values(), 1000) for f in doc
                                         if f != 'docno'))

    def get(self, docnos, field: str = 'text') -> list:
        docnos = [str(d) for d in docnos]
        missing = [d for d in dict.fromkeys(docnos) if d not in self.docs]
        if missing:
            raise KeyError(f'{len(missing)} docno(s) not in the corpus of {self.label!r}, e.g. {missing[:5]}')
        return [self.docs[d].get(field) for d in docnos]
