"""What the trainers of *both* towers of a dense bi-encoder have in common (STAR; TAS-Balanced next).

CODER and ADORE train a query encoder against fixed document embeddings. These trainers change the document encoder
too, which changes three things, all owned here by :class:`BiEncoderTrainer`:

* **Documents are encoded during training**, with gradients, from their text: the first stage's text column when it
  has one, else a ``texts=`` source (callable, mapping or text loader), else the corpus (read once for all the
  documents training and validation need). Training cuts them to ``train_doc_max_length`` tokens (the costly side
  on a CPU), optionally with gradient checkpointing.
* **Validation cannot read a fixed index.** It ranks a fixed validation pool, re-encoded with the current document
  encoder at each validation: the judged positives (``label >= min_label``) of ``validation_queries`` dev queries
  sampled once, plus the top ``validation_depth`` first-stage candidates of each of them. Every sampled query ranks
  the whole pool (one pool for all of them: no query sees its own positives injected), and ``metric`` is computed
  on the top 1000. Cost per validation: encoding the pool (at most ``validation_queries × (depth + positives)``
  documents, at the encoder's ``doc_max_length``) and the sampled queries.
* **After training the corpus is encoded again**, into a new pyterrier-dr FlexIndex at ``index_path`` (progress
  bar, resumable), which serves retrieval (``retriever(k)``), reranking (``scorer()``, the transformer itself) and
  the fixed-index trainers: ``Adore(trainer.dense_index, trainer.encoder)``, or ``Adore(trainer, trainer.encoder)``.

One encoder serves queries and documents by default (as in STAR); ``separate_towers=True`` trains two copies.
Subclasses supply the training data (:meth:`BiEncoderTrainer._training_data`), the batches
(:meth:`~BiEncoderTrainer._sample_batches`) and the loss (:meth:`~BiEncoderTrainer._loss`); everything runs
through the one :class:`~pyterrier_coder.training.TrainingLoop`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import pandas as pd
import pyterrier as pt
import torch
from torch import nn

from .artifacts import (atomic_write_text, is_plain_model_directory, read_component_config, saving,
                        write_component_config)
from .devices import infer_device
from .embeddings import EmbeddingStore
from .encoders import DenseEncoder, DenseIndex, check_dimensions, plain_directory_encoder
from .evaluation import evaluate
from .frames import normalise_frame, normalise_qrels, unknown_qrels, warn_skipped
from .hub import HubMixin
from .inspection import InspectableSettings
from .labels import check_lower_labels
from .text import Corpus, TextSource, clean_texts, corpus_reader, lookup_texts, scan_corpus
from .training import TrainingConfig, TrainingLoop, fingerprint, is_number_at_least, split_training_kwargs
from .validation import validate_columns, validation_data

#: documents of the validation pool each sampled query's ranking keeps for the metric
VALIDATION_RANKING_DEPTH = 1000


class _Towers(nn.Module):
    """What the training loop optimises: the query tower and, when the towers are separate, the document tower."""

    def __init__(self, query: nn.Module, doc: Optional[nn.Module] = None):
        super().__init__()
        self.query = query
        self.doc = doc


class DocumentTexts:
    """The text of documents by docno, from (in this order) the text column of the frames ``fit`` was given, the
    ``texts=`` source, and the corpus. Docnos are first announced with :meth:`want`, so that one pass over the corpus
    finds the text of everything training and validation need; :meth:`get` returns what was found."""

    def __init__(self, frames: Sequence[Optional[pd.DataFrame]], source: Optional[TextSource], read_corpus,
                 text_field: str, component: str):
        self.found: Dict[str, str] = {}
        for frame in frames:
            if frame is not None and text_field in frame.columns and 'docno' in frame.columns:
                self.found.update(zip(frame['docno'].astype(str), clean_texts(frame[text_field].values)))
        self.source, self.read_corpus, self.text_field, self.component = source, read_corpus, text_field, component
        self._wanted, self._unfound = set(), set()

    def want(self, docnos: Iterable[str]) -> None:
        self._wanted.update(d for d in docnos if d not in self.found and d not in self._unfound)

    def get(self, docnos: Iterable[str]) -> Dict[str, str]:
        docnos = list(docnos)
        self.want(docnos)
        if self._wanted:
            missing = sorted(self._wanted)
            self.found.update(lookup_texts(missing, self.source, self.text_field, self.component))
            missing = {d for d in missing if d not in self.found}
            if missing and self.read_corpus is not None:
                found, _ = scan_corpus(self.read_corpus, missing, self.text_field)
                self.found.update(found)
            self._unfound.update(d for d in missing if d not in self.found)
            self._wanted.clear()
        return {d: self.found[d] for d in docnos if d in self.found}


@dataclasses.dataclass
class TrainingQueries:
    """Per usable training query: its text, its judged positives, its candidate negatives (the first stage's top
    candidates that are not judged relevant, in rank order) and the documents never used as its negatives (its
    positives; with ``lower_labels='ignore'`` every document judged above 0), each as ids into one table of
    documents (``docnos``, ``texts``) holding every document these lists name."""
    qids: List[str]
    queries: List[str]
    positives: List[np.ndarray]
    negatives: List[np.ndarray]
    excluded: List[np.ndarray]      #: sorted
    docnos: List[str]
    texts: List[str]
    stats: dict

    def __len__(self):
        return len(self.qids)

    def fingerprint_parts(self) -> tuple:
        """What identifies this training data in a checkpoint (see :func:`~pyterrier_coder.training.fingerprint`)."""
        return self.qids, self.queries, self.docnos, self.positives, self.negatives, self.excluded


def build_training_queries(frame: pd.DataFrame, qrels: pd.DataFrame, texts: DocumentTexts, *, min_label: int,
                           lower_labels: str, depth: int, component: str) -> TrainingQueries:
    """:class:`TrainingQueries` from a (normalised) first-stage frame -- or plain topics: no candidates -- and
    normalised qrels. Judged positives and candidates without text are left out (counted, warned about); queries
    left without a positive are skipped (counted, warned about)."""
    topics = frame.drop_duplicates('qid')[['qid', 'query']]
    stats = {'queries': len(topics), 'qrels_for_unknown_queries': unknown_qrels(qrels, topics['qid'], component)}
    judged = qrels[qrels['qid'].isin(set(topics['qid']))]
    positive_rows = judged[judged['label'] >= min_label]
    positives_of = {qid: list(dict.fromkeys(g['docno'])) for qid, g in positive_rows.groupby('qid')}
    excluded_rows = positive_rows if lower_labels == 'negative' else judged[judged['label'] > 0]
    excluded_of = {qid: set(g['docno']) for qid, g in excluded_rows.groupby('qid')}
    candidates_of = {}
    if 'docno' in frame.columns:
        candidates_of = {qid: [d for d in g['docno'].values[:depth] if d not in excluded_of.get(qid, ())]
                         for qid, g in frame.groupby('qid', sort=False)}
    found = texts.get({d for docs in (*positives_of.values(), *candidates_of.values()) for d in docs})

    table: Dict[str, int] = {}
    data = TrainingQueries([], [], [], [], [], [], [], stats)

    def ids(docnos) -> np.ndarray:
        return np.array([table.setdefault(d, len(table)) for d in docnos], dtype=np.int64)

    skipped = positives_without_text = negatives_without_text = without_negatives = 0
    for qid, query in zip(topics['qid'], topics['query']):
        positives = [d for d in positives_of.get(qid, []) if d in found]
        positives_without_text += len(positives_of.get(qid, [])) - len(positives)
        if not positives:
            skipped += 1
            continue
        candidates = candidates_of.get(qid, [])
        negatives = [d for d in candidates if d in found]
        negatives_without_text += len(candidates) - len(negatives)
        without_negatives += not negatives
        data.qids.append(qid)
        data.queries.append(query)
        data.positives.append(ids(positives))
        data.negatives.append(ids(negatives))
    data.docnos = list(table)
    data.texts = [found[d] for d in data.docnos]
    # a document of the table judged relevant to a query may reach that query as another query's document
    data.excluded = [np.sort(np.array([table[d] for d in excluded_of.get(qid, ()) if d in table], dtype=np.int64))
                     for qid in data.qids]
    stats.update(train_queries=len(data), skipped_no_positive=skipped, positives_without_text=positives_without_text,
                 negatives_without_text=negatives_without_text, queries_without_negatives=without_negatives,
                 documents=len(data.docnos))
    warn_skipped(skipped, len(topics), component, f'label >= {min_label} with text')
    if positives_without_text:
        warnings.warn(f'{component}: {positives_without_text} judged positives were left out: their docnos are not '
                      f'in the corpus (nor in the first stage\'s text column or texts=)')
    if negatives_without_text:
        warnings.warn(f'{component}: {negatives_without_text} candidates were left out: no text for their docnos')
    return data


@dataclasses.dataclass
class ValidationPool:
    """The fixed pool that validation ranks (see the module's docstring)."""
    qids: List[str]
    queries: List[str]
    qrels: pd.DataFrame
    docnos: List[str]
    texts: List[str] = dataclasses.field(default_factory=list)


class BiEncoderTrainer(HubMixin, InspectableSettings, pt.Estimator):
    """Base class of the trainers of both towers of a bi-encoder (:class:`~pyterrier_coder.Star`); not used directly.

    Args:
        encoder: the starting :class:`DenseEncoder` (copied: the caller's is never modified).
        index_path: where the corpus is encoded with the trained document encoder (a pyterrier-dr FlexIndex).
        corpus: the documents (a dataset, a function returning an iterable of ``{'docno', 'text'}`` dicts, or a list
            of them): read for the text of the training documents the first stage did not give, and encoded into
            ``index_path`` after training. Without it, call :meth:`index` with the corpus after ``fit``.
        texts: where to find document text by docno (callable, mapping or text loader such as
            ``bm25.text_loader()``), looked up before the corpus.
        text_field: the text column / field.
        separate_towers: train separate query and document encoders (both start as copies of ``encoder``, or the
            document one of ``doc_encoder``); default: one shared encoder.
        doc_encoder: the starting document encoder when the towers are separate.
        train_doc_max_length: documents are cut to this many tokens during training (the index uses the encoder's
            ``doc_max_length``).
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% more time).
        min_label: judged documents with ``label >= min_label`` are positives.
        lower_labels: judged documents with ``0 < label < min_label``: ``'negative'`` (may be negatives) or
            ``'ignore'`` (never negatives).
        base_index: an index of the corpus built with the starting encoder (DenseIndex, FlexIndex or path): the
            candidates of plain training / validation topics (no ``docno``) are retrieved from it.
        validation_queries / validation_depth: the validation pool (see the module's docstring).
        num_results: documents retrieved when the transformer receives plain topics.
        on_missing: reranking docnos absent from the index: ``'error'`` or ``'drop'`` (with a warning).
        inference_batch_size: queries per batch when retrieving candidates from ``base_index``.
        index_batch_size: documents per chunk when encoding the corpus (the unit of resumption).
        **training: any :class:`TrainingConfig` field.
    """

    COMPONENT = 'BiEncoderTrainer'
    DEFAULTS = TrainingConfig()

    @staticmethod
    def _check_values(values: dict, component: str) -> None:
        """The values of this class's own settings (see training.check_settings)."""
        check_lower_labels(values['lower_labels'], component)
        if values['on_missing'] not in ('error', 'drop'):
            raise ValueError(f"{component}: on_missing must be 'error' or 'drop', got {values['on_missing']!r}")
        for name, minimum in (('train_doc_max_length', 1), ('validation_queries', 1), ('validation_depth', 0),
                              ('num_results', 1)):
            if not is_number_at_least(values[name], minimum):
                raise ValueError(f'{component}: {name} must be >= {minimum}, got {values[name]!r}')

    def __init__(self, encoder: DenseEncoder, index_path, *, corpus: Optional[Corpus] = None,
                 texts: Optional[TextSource] = None, text_field: str = 'text', separate_towers: bool = False,
                 doc_encoder: Optional[DenseEncoder] = None, train_doc_max_length: int = 128,
                 gradient_checkpointing: bool = False, min_label: int = 1, lower_labels: str = 'negative',
                 base_index=None, validation_queries: int = 100, validation_depth: int = 20,
                 num_results: int = 1000, on_missing: str = 'error', inference_batch_size: int = 64,
                 index_batch_size: int = 1024, verbose: bool = True, **training):
        BiEncoderTrainer._check_values(dict(
            lower_labels=lower_labels, on_missing=on_missing, train_doc_max_length=train_doc_max_length,
            validation_queries=validation_queries, validation_depth=validation_depth, num_results=num_results),
            self.COMPONENT)
        for name, value in (('encoder', encoder), ('doc_encoder', doc_encoder)):
            if value is not None and not isinstance(value, DenseEncoder):
                raise TypeError(f'{self.COMPONENT}: {name} must be a pyterrier_coder.DenseEncoder, got '
                                f'{type(value).__name__}')
        if doc_encoder is not None and not separate_towers:
            raise ValueError(f'{self.COMPONENT}: doc_encoder is the starting document tower of separate towers: '
                             f'pass separate_towers=True with it')
        if doc_encoder is not None and doc_encoder.dim != encoder.dim:
            raise ValueError(f'{self.COMPONENT}: the query and document encoders give vectors of other sizes '
                             f'({encoder.dim} and {doc_encoder.dim})')
        self.config = split_training_kwargs(self.DEFAULTS.replace(verbose=verbose), training, self.COMPONENT)
        self.index_path = Path(index_path)
        self.base_index = base_index
        if base_index is not None and _same_path(_index_path_of(base_index), self.index_path):
            raise ValueError(f'{self.COMPONENT}: index_path is the base index ({str(self.index_path)!r}); training '
                             f're-encodes the corpus into index_path: give it another path')
        self._read_corpus = corpus_reader(corpus, self.COMPONENT) if corpus is not None else None
        self.corpus = corpus
        self.texts = texts
        self.text_field = text_field
        self.encoder = encoder.clone()
        self.separate_towers = separate_towers
        self.doc_encoder = (doc_encoder or encoder).clone() if separate_towers else self.encoder
        self.train_doc_max_length = train_doc_max_length
        self.gradient_checkpointing = gradient_checkpointing
        self.min_label = min_label
        self.lower_labels = lower_labels
        self.validation_queries = validation_queries
        self.validation_depth = validation_depth
        self.num_results = num_results
        self.on_missing = on_missing
        self.inference_batch_size = inference_batch_size
        self.index_batch_size = index_batch_size
        self.verbose = verbose
        self._dense_index = None
        self._weights_version = None
        self.history = None
        self.fitted = False

    # --- the towers -----------------------------------------------------------------------------------------
    def trainable_module(self) -> nn.Module:
        """Both towers (one module when they are shared), as the training loop optimises them."""
        return _Towers(self.encoder.trainable_module(),
                       self.doc_encoder.trainable_module() if self.separate_towers else None)

    def _towers(self) -> List[DenseEncoder]:
        return [self.encoder, self.doc_encoder] if self.separate_towers else [self.encoder]

    def _encode_training_queries(self, queries: Sequence[str]) -> torch.Tensor:
        return self.encoder.encode_queries_torch(list(queries), batch_size=max(1, len(queries)))

    def _encode_training_docs(self, texts: Sequence[str]) -> torch.Tensor:
        return self.doc_encoder.encode_docs_torch(list(texts), batch_size=max(1, len(texts)),
                                                  max_length=self.train_doc_max_length)

    @staticmethod
    def _inner_products(queries: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
        """``[Q, D]`` inner products in fp32, also under autocast (bf16 would tie close scores)."""
        with torch.autocast(queries.device.type, enabled=False):
            return queries.float() @ docs.float().T

    # --- the index of the trained towers ----------------------------------------------------------------------
    @property
    def dense_index(self) -> DenseIndex:
        """The corpus encoded by the trained document encoder, paired with the trained query encoder: what
        :class:`~pyterrier_coder.Adore` and :class:`~pyterrier_coder.Coder` take as their fixed index."""
        if self._dense_index is None:
            self._dense_index = DenseIndex(self.encoder, self.index_path, verbose=self.verbose)
        return self._dense_index

    def weights_version(self) -> str:
        """A hash of the document encoder's weights and settings: the index built with them is stamped with it.
        Computed once per trained state (``fit`` and ``load`` start a new one)."""
        if self._weights_version is None:
            self._weights_version = self._hash_doc_encoder()
        return self._weights_version

    def _hash_doc_encoder(self) -> str:
        digest = hashlib.sha256(json.dumps(self.doc_encoder.settings(), sort_keys=True, default=str).encode())
        for name, tensor in self.doc_encoder.trainable_module().state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def index(self, corpus: Optional[Corpus] = None, *, overwrite: bool = False) -> 'BiEncoderTrainer':
        """Encodes the corpus (default: the one given to the constructor) with the document encoder into
        ``index_path``, unless the index there was already built with these weights. Resumable: called again
        after an interruption, it continues from the chunks already encoded with the same weights. An index at
        ``index_path`` that this trainer did not write is never overwritten (an error says so)."""
        read = corpus_reader(corpus, self.COMPONENT) if corpus is not None else self._read_corpus
        if read is None:
            raise ValueError(f'{self.COMPONENT}.index: no corpus: pass one, index(corpus), or corpus= to the '
                             f'constructor')
        target = self._index_target('index')
        target.index(read(), batch_size=self.index_batch_size, overwrite=overwrite, version=self.weights_version())
        self._dense_index = None     # the new files are read afresh
        return self

    def _index_target(self, use: str) -> DenseIndex:
        """The index the document encoder writes, refused when an index that no trainer wrote is there."""
        target = DenseIndex(self.doc_encoder, self.index_path, verbose=self.verbose)
        if target.built() and target.version() is None:
            raise ValueError(f'{self.COMPONENT}.{use}: {str(self.index_path)!r} holds an index that this trainer did '
                             f'not write; give another index_path (or delete it)')
        return target

    def _require_index(self, use: str) -> DenseIndex:
        dense = self.dense_index
        if not dense.built():
            raise RuntimeError(f'{self.COMPONENT}.{use}: no index at {str(self.index_path)!r} yet: fit() encodes the '
                               f'corpus there after training (given corpus=), or call index(corpus)')
        if dense.version() != self.weights_version():
            warnings.warn(f'{self.COMPONENT}.{use}: the index at {str(self.index_path)!r} was not encoded with the '
                          f'current document encoder; call index() to encode the corpus again')
        return dense

    def retriever(self, k: int = 1000, *, backend: str = 'exact', **kwargs) -> pt.Transformer:
        """Single-stage dense retrieval over the re-encoded index with the trained query encoder."""
        return self._require_index('retriever').labelled_retriever(self, k, backend=backend, **kwargs)

    def scorer(self, *, on_missing: Optional[str] = None) -> pt.Transformer:
        """Re-ranks a result frame with the trained query encoder and the re-encoded document embeddings."""
        return self._require_index('scorer').labelled_scorer(self, on_missing=on_missing or self.on_missing)

    def query_encoder(self) -> pt.Transformer:
        """The trained query encoder as a transformer (``query`` → ``query_vec``), for pyterrier-dr pipelines."""
        return self.encoder.query_encoder()

    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        """A result frame (``qid``, ``query``, ``docno``) is re-ranked; a query frame (``qid``, ``query``) gets
        single-stage retrieval of ``num_results`` documents from the re-encoded index."""
        with validate_columns(inp, self.COMPONENT) as v:
            v.result_frame(extra_columns=['query'], mode='rerank')
            v.query_frame(extra_columns=['query'], mode='retrieve')
        if not len(inp):
            if v.mode == 'retrieve':
                inp = inp.assign(docno=pd.Series(dtype=str))
            return inp.assign(score=pd.Series(dtype='float64'), rank=pd.Series(dtype='int64'))
        if v.mode == 'retrieve':
            return self.retriever(self.num_results)(inp)
        return self.scorer()(inp)

    # --- fit ------------------------------------------------------------------------------------------------
    def fit(self, train: pd.DataFrame, train_qrels: pd.DataFrame, valid: Optional[pd.DataFrame] = None,
            valid_qrels: Optional[pd.DataFrame] = None, *, resume: bool = False) -> 'BiEncoderTrainer':
        """Trains both towers, keeps the best validated weights, then encodes the corpus into ``index_path``.

        ``train``/``valid`` are the preceding stage's results on the training/validation topics (``(bm25 % 200 >>
        trainer).fit(...)``), whose candidates are the negatives to sample from and the validation pool's
        candidates; plain topics take them from ``base_index``. ``resume=True`` continues from the checkpoint in
        ``checkpoint_dir`` (and an interrupted encoding of the corpus from its last chunk)."""
        component = f'{self.COMPONENT}.fit'
        with validate_columns(train, component, 'training frame') as v:
            v.columns(includes=['qid', 'query'])
        if validation_data(valid, valid_qrels, self.COMPONENT):
            with validate_columns(valid, component, 'validation frame') as v:
                v.columns(includes=['qid', 'query'])
            valid_qrels = normalise_qrels(valid_qrels, component)
        qrels = normalise_qrels(train_qrels, component)
        if not len(train):
            raise ValueError(f'{component}: the training frame is empty (did the preceding stage retrieve nothing '
                             f'for the training topics?)')
        self._check_corpus()
        self._index_target('fit')       # before training, not after it
        self._prepare_device()
        frame = normalise_frame(train, self.COMPONENT)
        if 'docno' not in frame.columns and self._needs_candidates():
            frame = self._base_candidates(frame, self._candidate_depth(), 'training')
        if valid is not None:
            valid = normalise_frame(valid, self.COMPONENT)
        texts = DocumentTexts([frame, valid], self.texts, self._read_corpus, self.text_field, self.COMPONENT)
        pool = self._validation_pool(valid, valid_qrels, texts) if valid is not None else None
        data = self._training_data(frame, qrels, texts)
        if pool is not None:
            pool = self._with_texts(pool, texts)
        history = self._run(data, pool, resume)
        history['training_data'] = dict(data.stats, **({'validation_queries': len(pool.qids),
                                                        'validation_pool': len(pool.docnos)} if pool else {}))
        self.history = history
        self.fitted = True
        if self._read_corpus is not None:
            self.index()
        else:
            warnings.warn(f'{self.COMPONENT}: no corpus was given, so the trained document encoder has not encoded '
                          f'one: call index(corpus) before retrieving or reranking')
        return self

    def _needs_candidates(self) -> bool:
        """Whether training needs first-stage candidates (plain topics then take them from ``base_index``)."""
        return True

    def _candidate_depth(self) -> int:
        """How many first-stage candidates per training query training uses."""
        raise NotImplementedError

    def _training_data(self, frame: pd.DataFrame, qrels: pd.DataFrame, texts: DocumentTexts):
        """The subclass's training data (with ``stats`` and ``fingerprint_parts()``); errors before training."""
        raise NotImplementedError

    def _sample_batches(self, epoch: int, rng: np.random.Generator) -> list:
        raise NotImplementedError

    def _loss(self, batch) -> torch.Tensor:
        raise NotImplementedError

    def _check_corpus(self) -> None:
        """An empty corpus fails now, not after training when the index is built."""
        if self._read_corpus is None:
            return
        first_two = [doc for _, doc in zip(range(2), self._read_corpus())]
        if len(first_two) < 2:
            raise ValueError(f'{self.COMPONENT}.fit: the corpus has {len(first_two)} document(s); the trained '
                             f'document encoder must encode at least 2 into the index')

    def _prepare_device(self) -> torch.device:
        device = infer_device(self.config.device)
        for tower in self._towers():
            tower.to(device)
        return device

    def _base_candidates(self, topics: pd.DataFrame, depth: int, what: str) -> pd.DataFrame:
        """The top ``depth`` documents of ``base_index`` for plain topics, retrieved with the current query encoder
        (the starting encoder on a first ``fit``)."""
        if self.base_index is None:
            raise ValueError(f'{self.COMPONENT}.fit: the {what} frame has no candidates (docno): fit after a first '
                             f'stage, e.g. (bm25 % 200 >> {self.COMPONENT.lower()}).fit(...), or pass base_index= '
                             f'(an index of the corpus built with the starting encoder) to retrieve them from')
        dense = self.base_index if isinstance(self.base_index, DenseIndex) else DenseIndex(self.encoder,
                                                                                            self.base_index)
        if not dense.built():
            raise FileNotFoundError(f'{self.COMPONENT}: no index at base_index {str(dense.flex.index_path)!r}')
        store = EmbeddingStore(dense.flex)
        check_dimensions(self.encoder, store.dim, dense.flex, self.COMPONENT)
        topics = topics.drop_duplicates('qid')
        queries, ids = topics['query'].tolist(), []
        for tower in self._towers():   # eval mode (no dropout), left so: see query_trainer's _inference
            tower.trainable_module().eval()
        with torch.inference_mode():
            for start in range(0, len(queries), self.inference_batch_size):
                q = self.encoder.encode_queries_torch(queries[start:start + self.inference_batch_size])
                ids.append(store.search(q, depth)[1].cpu().numpy())
        ids = np.concatenate(ids) if ids else np.empty((0, depth), dtype=np.int64)
        width = ids.shape[1]
        return pd.DataFrame({'qid': np.repeat(topics['qid'].values, width),
                             'query': np.repeat(topics['query'].values, width),
                             'docno': store.docnos.fwd[ids.reshape(-1)].astype(str),
                             'score': np.tile(-np.arange(width, dtype=np.float64), len(topics))})

    # --- validation ---------------------------------------------------------------------------------------------
    def _validation_pool(self, valid: pd.DataFrame, qrels: pd.DataFrame, texts: DocumentTexts) -> ValidationPool:
        """Samples the validation queries (those with a judged positive) and announces the pool's documents."""
        topics = valid.drop_duplicates('qid')
        with_positive = set(qrels.loc[qrels['label'] >= self.min_label, 'qid'])
        topics = topics[topics['qid'].isin(with_positive)]
        if not len(topics):
            raise ValueError(f'{self.COMPONENT}.fit: no validation query has a judged positive (label >= '
                             f'{self.min_label})')
        rng = np.random.default_rng(self.config.seed)
        chosen = np.sort(rng.choice(len(topics), size=min(self.validation_queries, len(topics)), replace=False))
        topics = topics.iloc[chosen]
        qids = topics['qid'].tolist()
        if self.validation_depth and 'docno' not in valid.columns and self.base_index is not None:
            valid = self._base_candidates(topics, self.validation_depth, 'validation')
        docnos = list(dict.fromkeys(qrels.loc[qrels['qid'].isin(qids) & (qrels['label'] >= self.min_label),
                                              'docno']))
        if self.validation_depth and 'docno' in valid.columns:
            candidates = valid[valid['qid'].isin(set(qids))].groupby('qid', sort=False).head(self.validation_depth)
            docnos = list(dict.fromkeys(docnos + candidates['docno'].tolist()))
        texts.want(docnos)
        return ValidationPool(qids, topics['query'].tolist(), qrels[qrels['qid'].isin(set(qids))], docnos)

    def _with_texts(self, pool: ValidationPool, texts: DocumentTexts) -> ValidationPool:
        found = texts.get(pool.docnos)
        docnos = [d for d in pool.docnos if d in found]
        if len(docnos) < len(pool.docnos):
            warnings.warn(f'{self.COMPONENT}: {len(pool.docnos) - len(docnos)} documents of the validation pool have '
                          f'no text and were left out')
        return dataclasses.replace(pool, docnos=docnos, texts=[found[d] for d in docnos])

    def _validate(self, pool: ValidationPool) -> float:
        """Every sampled query ranks the whole pool, encoded by the current document encoder."""
        docs = torch.from_numpy(self.doc_encoder.encode_docs(pool.texts))
        queries = torch.from_numpy(self.encoder.encode_queries(pool.queries))
        scores = self._inner_products(queries, docs)
        top = scores.topk(min(VALIDATION_RANKING_DEPTH, len(pool.docnos)), dim=1)
        docnos = np.asarray(pool.docnos, dtype=object)
        width = top.indices.shape[1]
        run = pd.DataFrame({'qid': np.repeat(pool.qids, width), 'docno': docnos[top.indices.numpy().reshape(-1)],
                            'score': top.values.numpy().reshape(-1).astype(np.float64)})
        return evaluate(run, pool.qrels, self.config.metric, pool.qids)

    # --- training -------------------------------------------------------------------------------------------
    def _training_name(self) -> str:
        return self.COMPONENT

    def _run(self, data, pool: Optional[ValidationPool], resume: bool) -> dict:
        self._data = data
        self._weights_version = None
        checkpointing = [tower.model for tower in self._towers()] if self.gradient_checkpointing else []
        for model in checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
        try:
            loop = TrainingLoop(self.trainable_module(), self.config, sample_batches=self._sample_batches,
                                loss_fn=self._loss, validate=(lambda: self._validate(pool)) if pool else None,
                                name=self._training_name(),
                                identity=lambda: {'settings': self.settings(),
                                                  'training_data': fingerprint(*data.fingerprint_parts())})
            return loop.run(resume=resume)
        finally:
            for model in checkpointing:   # the trained encoders are used as usual afterwards (Adore, Coder ...)
                model.gradient_checkpointing_disable()
            del self._data

    # --- persistence ------------------------------------------------------------------------------------------
    def settings(self) -> dict:
        return dict(text_field=self.text_field, separate_towers=self.separate_towers,
                    train_doc_max_length=self.train_doc_max_length,
                    gradient_checkpointing=self.gradient_checkpointing, min_label=self.min_label,
                    lower_labels=self.lower_labels, validation_queries=self.validation_queries,
                    validation_depth=self.validation_depth, num_results=self.num_results,
                    on_missing=self.on_missing)

    def init_arguments(self) -> dict:
        return dict(encoder=self.encoder, index_path=str(self.index_path), corpus=self.corpus, texts=self.texts,
                    doc_encoder=self.doc_encoder if self.separate_towers else None, base_index=self.base_index,
                    **self.settings(), inference_batch_size=self.inference_batch_size,
                    index_batch_size=self.index_batch_size, verbose=self.verbose,
                    **self.config.changes_from(self.DEFAULTS, exclude=['verbose']))

    def _adopt_trained_state(self, source, changes: dict) -> None:
        # __init__ cloned source's (possibly trained) towers: what was learnt came along unless a tower was replaced
        if not {'encoder', 'doc_encoder'} & set(changes):
            self.fitted, self.history = source.fitted, source.history

    #: the subdirectory of a saved model holding the document tower, when the towers are separate
    DOC_ENCODER_DIR = 'doc_encoder'

    def save(self, path) -> None:
        """Writes a Hugging Face directory of the query encoder (model + tokenizer files), which
        ``DenseEncoder(path)`` loads as it is; the document encoder, when separate, in ``path/doc_encoder``; this
        component's settings (and the encoder's) in ``pyterrier_coder.json``; the training history."""
        with saving(path, self.COMPONENT) as tmp:
            self.encoder.save(tmp)
            if self.separate_towers:
                self.doc_encoder.save(tmp / self.DOC_ENCODER_DIR)
            write_component_config(tmp, self.COMPONENT, self.settings(), encoder=self.encoder.settings(),
                                   training=self.config.as_dict(), index=str(self.index_path.resolve()),
                                   fitted=self.fitted)
            if self.history is not None:
                atomic_write_text(tmp / 'history.json', json.dumps(self.history, default=str))

    @classmethod
    def load(cls, path, index_path=None, *, device=None, **overrides) -> 'BiEncoderTrainer':
        """Loads a saved model; ``index_path`` defaults to where it encoded its corpus. Other arguments (``corpus``,
        ``texts``, ``base_index``, settings) go to the constructor. A plain Hugging Face directory (a released
        encoder, e.g. a converted DRhard STAR checkpoint) is the starting encoder of a model with default settings;
        its ``index_path`` must then be given."""
        path = Path(path)
        if is_plain_model_directory(path):
            if index_path is None:
                raise ValueError(f'{cls.COMPONENT}.load: {str(path)!r} is a plain Hugging Face model directory: pass '
                                 f'index_path= (where its corpus index is, or will be)')
            return cls(plain_directory_encoder(path, device, overrides), index_path, device=device, **overrides)
        conf = read_component_config(path, cls.COMPONENT)
        encoder = DenseEncoder(str(path), device=device)
        settings = dict(conf['settings'])
        if settings.get('separate_towers'):
            overrides.setdefault('doc_encoder', DenseEncoder(str(path / cls.DOC_ENCODER_DIR), device=device))
        training = dict(conf.get('training', {}))
        training.pop('device', None)   # the machine it was trained on may have other devices: choose afresh
        if device is not None:
            training['device'] = device
        model = cls(encoder, index_path if index_path is not None else conf['index'],
                    **{**settings, **training, **overrides})
        model.fitted = conf.get('fitted', False)
        if (path / 'history.json').exists():
            model.history = json.loads((path / 'history.json').read_text())
        return model

    def _repr_args(self) -> str:
        return ''

    def __repr__(self):
        towers = ', separate_towers=True' if self.separate_towers else ''
        return (f'{self.COMPONENT}({self.encoder!r}, {str(self.index_path)!r}{towers}{self._repr_args()}'
                f'{", fitted" if self.fitted else ""})')


def _index_path_of(index) -> Optional[Path]:
    if isinstance(index, DenseIndex):
        return Path(index.flex.index_path)
    flex = getattr(index, 'index_path', None)
    return Path(flex) if flex is not None else Path(str(index))


def _same_path(a: Optional[Path], b: Path) -> bool:
    return a is not None and a.expanduser().resolve() == b.expanduser().resolve()
