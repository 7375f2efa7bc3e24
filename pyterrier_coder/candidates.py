"""Training candidates for the query-encoder trainers, stored compactly.

:func:`mine_candidates` turns the result frame of a first stage into a :class:`CandidateSet`: per query an
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
import pyterrier as pt

from .artifacts import atomic_write_text, read_json
from .embeddings import EmbeddingStore
from .encoders import index_record
from .frames import PAD, normalise_frame, normalise_qrels, unknown_qrels, warn_skipped
from .validation import validate_columns


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
        meta = read_json(path / 'meta.json', 'CandidateSet.load', 'candidate set description')
        if meta.get('format') != cls.FORMAT:
            raise ValueError(f'{path}: not a {cls.FORMAT} (format {meta.get("format")!r})')
        topics = read_json(path / 'topics.json', 'CandidateSet.load', 'candidate set topics file')
        mode = 'r' if mmap else None
        return cls(topics['qids'], topics['queries'], np.load(path / 'docids.npy', mmap_mode=mode),
                   np.load(path / 'labels.npy', mmap_mode=mode), np.load(path / 'num_retrieved.npy'),
                   meta['stats'], meta.get('index'))

    def check_index(self, store: 'EmbeddingStore', component: str) -> None:
        """Refuses a set whose row ids were mined against an index of another size or, where both indexes recorded
        it, of another corpus: its row ids would point at other documents."""
        if self.index and self.index.get('docs') is not None and self.index['docs'] != len(store):
            raise ValueError(f'{component}: these candidates were mined against an index of {self.index["docs"]:,} '
                             f'documents ({self.index.get("path")}), not this one ({len(store):,} documents: '
                             f'{store.flex.index_path}); their row ids would point at other documents')
        mined = (self.index or {}).get('corpus')
        current = index_info(store).get('corpus')
        if mined and current and mined != current:
            raise ValueError(f'{component}: these candidates were mined against an index of another corpus (of the '
                             f'same size: {self.index.get("path")}) than {store.flex.index_path}; their row ids would '
                             f'point at other documents')


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
        atomic_write_text(self.path / 'topics.json', json.dumps({'qids': self.qids, 'queries': self.queries}))
        atomic_write_text(self.path / 'meta.json', json.dumps(
            {'format': CandidateSet.FORMAT, 'version': 1, 'queries': n, 'width': width, 'stats': stats,
             'index': index}, indent=1))
        shutil.rmtree(self.parts_dir)
        return CandidateSet.load(self.path)


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
    """What the row ids of a candidate set refer to: the index (its path, its size) and, when the index recorded it,
    the corpus it was built from (the same corpus in the same order gives the same row ids)."""
    record = index_record(store.flex)
    info = {'path': str(Path(store.flex.index_path).resolve()), 'docs': len(store)}
    return {**info, 'corpus': record['corpus']['sha256']} if record else info


def _fingerprint(frame: pd.DataFrame) -> str:
    return hashlib.sha256(pd.util.hash_pandas_object(frame, index=False).values.tobytes()).hexdigest()


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
