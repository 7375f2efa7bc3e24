"""Small helpers shared by every component: device choice, component directories, evaluation."""
from __future__ import annotations

import inspect
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd
import pyterrier_alpha as pta

try:
    from pyterrier.validate import InputValidationError
except ImportError:  # older pyterrier: pyterrier-alpha's own
    from pyterrier_alpha.validate import InputValidationError

from .artifacts import CONFIG_FILE, read_json


def infer_device(device=None) -> 'torch.device':
    """``device`` if given, else CUDA when present, else CPU; under torchrun, ``'cuda'`` is this rank's GPU."""
    import torch
    from .distributed import device_for_rank
    device = device_for_rank(device)
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    return torch.device(device)


def cuda_amp_dtype() -> 'torch.dtype':
    """The autocast dtype on CUDA: bf16 where the GPU computes it natively (compute capability >= 8: A100, H100,
    RTX 30xx...), else fp16 (with a gradient scaler when training). ``torch.cuda.is_bf16_supported()`` alone also
    says yes for GPUs that only emulate bf16 (T4, V100), where it is slow."""
    import torch
    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:   # torch < 2.3 has no such argument and did not count emulation either
        native = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if native else torch.float16


#: the largest k a faiss GPU index answers (faiss's GPU k-selection limit)
FAISS_GPU_MAX_K = 2048


def faiss_gpu_count() -> int:
    """GPUs that the installed faiss can use (0 with faiss-cpu, whatever torch sees)."""
    import faiss
    return faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0


def check_faiss_gpu_k(k: int, component: str, instead: str) -> None:
    """A faiss GPU index cannot return more than :data:`FAISS_GPU_MAX_K` results per query."""
    if k > FAISS_GPU_MAX_K:
        raise ValueError(f'{component}: k={k} is more than a faiss GPU index returns ({FAISS_GPU_MAX_K} per '
                         f'query); use a smaller k, or {instead}')


def faiss_to_gpus(index):
    """``index`` copied onto the GPUs faiss sees: sharded over all of them in a single process; under torchrun
    only onto this rank's GPU, since every rank holds its own index (sharding each over all GPUs would put
    ``world_size`` shards and scratch reservations on every GPU)."""
    import faiss
    from .distributed import launched, local_gpu
    if faiss_gpu_count() == 0:
        raise RuntimeError('faiss sees no GPU (faiss-cpu is installed, or no GPU is visible): use gpu=False, or '
                           "install faiss-gpu instead of faiss-cpu (pip install -e '.[gpu]')")
    options = faiss.GpuMultipleClonerOptions()
    if launched():
        return faiss.index_cpu_to_gpus_list(index, co=options, gpus=[local_gpu(faiss_gpu_count())])
    options.shard = True
    return faiss.index_cpu_to_all_gpus(index, co=options)


def check_document(doc, number: int, seen: set, *, text_field: str = 'text') -> dict:
    """``{'docno', text_field}`` of the ``number``-th document of a corpus being indexed, or a ValueError naming it:
    not a dict, a docno that is not a non-empty str without whitespace, a text that is not a str, or a docno
    already in ``seen`` (to which it is then added). Every indexer checks its corpus with it."""
    if not isinstance(doc, dict):
        raise ValueError(f'Document {number}: expected a dict, got {type(doc).__name__}')
    docno, text = doc.get('docno'), doc.get(text_field)
    if not isinstance(docno, str) or not docno:
        raise ValueError(f'Document {number}: docno must be a non-empty str, got {docno!r}')
    if not isinstance(text, str):
        found = f'no {text_field!r} field (fields: {sorted(doc)})' if text_field not in doc else type(text).__name__
        raise ValueError(f'Document {number} ({docno!r}): {text_field} must be a str, got {found}')
    if re.search(r'[\s\x00]', docno):
        raise ValueError(f'Document {number}: docno {docno!r} contains whitespace or NUL')
    if docno in seen:
        raise ValueError(f'Document {number}: duplicate docno {docno!r}')
    seen.add(docno)
    return {'docno': docno, text_field: text}


@contextmanager
def explained_model_errors(component: str, model: str):
    """Turns transformers' error for a model that is neither a local directory nor obtainable from the hub (a typo
    in a path reads as "couldn't connect to huggingface.co" or "Repo id must be in the form...") into one that
    says so. Errors about a directory that exists pass unchanged."""
    try:
        yield
    except (OSError, ValueError) as error:
        if Path(str(model)).expanduser().exists():
            raise
        offline = ' (HF_HUB_OFFLINE is set)' if os.environ.get('HF_HUB_OFFLINE', '0') not in ('', '0') else ''
        raise OSError(f'{component}: cannot load the model {str(model)!r}: there is no such local directory (from '
                      f'{os.getcwd()}), and the Hugging Face hub could not provide it{offline}. Give an existing '
                      f'model directory or a hub id. ({type(error).__name__}: {str(error)[:200]})') from error


#: files one of which every tokenizer directory has
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'vocab.txt', 'vocab.json', 'spiece.model',
                   'sentencepiece.bpe.model', 'tokenizer.model')


def load_tokenizer(source, component: str, *, hint: str = ''):
    """The tokenizer at ``source`` (a directory or hub id; a tokenizer object is returned as it is). A directory
    without tokenizer files, or a tokenizer without a vocabulary, is an error naming ``source`` (followed by
    ``hint``): recent transformers would otherwise build a tokenizer of special tokens only, which maps every word
    to [UNK], and every text would get the same vector or score."""
    from transformers import AutoTokenizer, PreTrainedTokenizerBase
    if isinstance(source, PreTrainedTokenizerBase):
        return source
    if Path(str(source)).is_dir() and not any((Path(str(source)) / f).exists() for f in TOKENIZER_FILES):
        raise OSError(f'{component}: no tokenizer files in {str(source)!r}.{hint}')
    with explained_model_errors(component, source):
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (ValueError, TypeError) as error:
            raise OSError(f'{component}: could not load a tokenizer from {str(source)!r}: {error}.{hint}') from error
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise OSError(f'{component}: the tokenizer loaded from {str(source)!r} has no vocabulary.{hint}')
    return tokenizer


#: weights of pre-training heads (masked language modelling, next sentence, ELECTRA's discriminator, DistilBERT's
#: vocabulary projection...) and the pooler, which a checkpoint may have and a bi-encoder never uses
UNUSED_HEAD_PREFIXES = ('cls.', 'lm_head.', 'pooler.', 'generator_', 'discriminator_predictions.', 'predictions.',
                        'vocab_transform.', 'vocab_layer_norm.', 'vocab_projector.', 'qa_outputs.', 'classifier.',
                        'pre_classifier.', 'sop_classifier.')


def load_model_checked(load, path, component: str, *, fresh=lambda model, name: name.startswith('pooler.'),
                       allowed_unexpected=UNUSED_HEAD_PREFIXES, hint: str = '', **kwargs):
    """``load(path, output_loading_info=True, **kwargs)`` (a transformers ``from_pretrained``) that refuses a
    checkpoint whose weights do not fit the architecture: weights the model needs that the checkpoint lacks
    (transformers would initialise them at random), except those for which ``fresh(model, name)`` says a fresh
    initialisation is meant (by default the pooler, which no pooling here uses), and weights the checkpoint has that
    the model would drop, except names starting with ``allowed_unexpected``. The error names them. transformers' own
    report of them is not printed (this error replaces it). Returns the model and transformers' loading info."""
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with explained_model_errors(component, path):
            model, info = load(path, output_loading_info=True, **kwargs)
    except Exception as error:      # noqa: BLE001 -- safetensors, torch and json each raise their own
        if not Path(str(path)).is_dir():
            raise
        raise OSError(f'{component}: could not read the model in {str(path)!r} ({type(error).__name__}: '
                      f'{str(error)[:300]}); a file of it may be cut short (a full disk, an interrupted copy): '
                      f'restore it, or save the model again') from error
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(k for k in info.get('missing_keys') or () if not fresh(model, str(k)))
    unexpected = sorted(k for k in info.get('unexpected_keys') or () if not str(k).startswith(tuple(allowed_unexpected)))
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get('mismatched_keys') or ())
    if missing or unexpected or mismatched:
        parts = [f'{len(names)} {what} (e.g. {names[:4]})' for names, what in (
            (missing, "weights the model needs are not in the checkpoint"),
            (unexpected, "weights of the checkpoint do not belong to this architecture"),
            (mismatched, "weights have another shape")) if names]
        raise ValueError(f'{component}: the checkpoint {str(path)!r} does not fit its architecture '
                         f'({type(model).__name__}): {"; ".join(parts)}. Loading it anyway would compute with '
                         f'randomly initialised or missing layers.{hint}')
    return model, info


def validation_data(valid, valid_qrels, component: str) -> bool:
    """Whether ``fit`` was given validation data; one of the two without the other is a mistake, not a request to
    train without validation (which would silently keep the last weights instead of the best)."""
    if (valid is None) != (valid_qrels is None):
        given, missing = ('valid', 'valid_qrels') if valid_qrels is None else ('valid_qrels', 'valid')
        raise ValueError(f'{component}.fit: {given} was given without {missing}; validation needs both')
    return valid is not None


def write_component_config(path, component: str, settings: dict, **extra) -> None:
    """Writes the json that tells which component a directory holds (checked again by ``load``)."""
    from ._version import __version__
    atomic_write_text(Path(path) / CONFIG_FILE, json.dumps(
        {'component': component, 'version': __version__, 'settings': settings, **extra}, indent=2, default=str))


def read_component_config(path, component: str) -> dict:
    check_component_dir(path, component)
    return read_json(Path(path) / CONFIG_FILE, component, 'saved model\'s settings file')


def check_component_dir(path, component: str) -> None:
    """Fails clearly when ``path`` is missing or was written by another component type."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f'{component}: no saved model directory at {str(path)!r}')
    conf_path = path / CONFIG_FILE
    if not conf_path.is_file():
        raise ValueError(f'{component}: {str(path)!r} was not written by pyterrier-coder (no {CONFIG_FILE})')
    found = read_json(conf_path, component, 'saved model\'s settings file').get('component')
    if found != component:
        raise ValueError(f'{component}: {str(path)!r} holds a saved {found}, not a {component}; '
                         f'load it with {found}.load(...)')


def known_length(items) -> Optional[int]:
    """``len(items)`` when the iterable has one (a list, a dataset's ``get_corpus_iter()``), else None: the total of
    an indexing progress bar."""
    return len(items) if hasattr(items, '__len__') else None


def atomic_write_text(path, text: str) -> None:
    """Temp file + rename, so an interrupted write never leaves a truncated file behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.')
    with os.fdopen(fd, 'w') as f:
        f.write(text)
    os.replace(tmp, path)


def evaluate(results: pd.DataFrame, qrels: pd.DataFrame, metric: str, qids) -> float:
    """Mean of ``metric`` (an ir_measures name such as ``nDCG@10``) over the evaluated topics ``qids`` that have
    qrels; a topic without results counts as 0. Qrels of other queries are ignored (they belong to topics that
    were not evaluated, e.g. the rest of a split when validating on a sample)."""
    import ir_measures
    measure = ir_measures.parse_measure(metric)
    qids = set(map(str, qids))
    qrels = qrels[qrels['qid'].astype(str).isin(qids)]
    qrels = qrels.assign(qid=qrels['qid'].astype(str), docno=qrels['docno'].astype(str))
    qrels = qrels.rename(columns={'qid': 'query_id', 'docno': 'doc_id', 'label': 'relevance'})
    run = results[['qid', 'docno', 'score']].rename(columns={'qid': 'query_id', 'docno': 'doc_id'})
    run = run.assign(query_id=run['query_id'].astype(str), doc_id=run['doc_id'].astype(str))
    per_query = {m.query_id: m.value for m in measure.iter_calc(qrels, run)}
    n = qrels['query_id'].nunique()
    return float(sum(per_query.values()) / n) if n else 0.0


# ----------------------------------------------------------------------------------------------------------
# input validation that names the component

def _describe_modes(modes) -> str:
    parts = []
    for m in modes:
        what = []
        if m.missing_columns:
            what.append(f'missing {list(m.missing_columns)}')
        if m.extra_columns:
            what.append(f'must not have {list(m.extra_columns)}')
        parts.append(f'{m.mode_name + " mode: " if m.mode_name else ""}{", ".join(what)}')
    return ' or '.join(parts)


@contextmanager
def validate_columns(inp, component: str, what: str = 'input frame', hint: Optional[str] = None):
    """``pta.validate.any(inp)`` whose error names the component and the missing columns, e.g.
    ``Coder: the input frame does not have the required columns (rerank mode: missing ['docno', 'query'] or
    retrieve mode: missing ['query']); its columns are ['qid', 'x']``. Raises pyterrier's
    ``InputValidationError`` (a ``KeyError``), like ``pta.validate`` itself."""
    try:
        with pta.validate.any(inp) as v:
            yield v
    except InputValidationError as e:
        columns = list(inp.columns) if isinstance(inp, pd.DataFrame) else list(inp)
        message = (f'{component}: the {what} does not have the required columns ({_describe_modes(e.modes)}); '
                   f'its columns are {columns}' + (f'. {hint}' if hint else ''))
        raise InputValidationError(message, e.modes) from None


# ----------------------------------------------------------------------------------------------------------
# truncation of long texts

#: a passage is cut (at a word boundary) to this many characters per allowed token before tokenisation
CHARS_PER_TOKEN = 16


def model_max_tokens(model, tokenizer, configured: int) -> int:
    """``configured``, capped by what the model can embed (position embeddings) and the tokenizer's limit, so an
    over-long setting truncates instead of crashing inside the model."""
    limits = [int(configured)]
    positions = getattr(getattr(model, 'config', None), 'max_position_embeddings', None)
    if positions and positions > 0:     # XLNet's config says -1: no limit
        limits.append(int(positions))
    tok_max = getattr(tokenizer, 'model_max_length', None)
    if tok_max and 0 < tok_max < 1_000_000:
        limits.append(int(tok_max))
    return min(limits)


def _clip(text: str, max_tokens: int) -> Optional[str]:
    """The text cut before the last whitespace within ``max_tokens * CHARS_PER_TOKEN`` characters, or None when
    it is short enough (or has no whitespace to cut at)."""
    limit = max_tokens * CHARS_PER_TOKEN
    if len(text) <= limit:
        return None
    cut = max(text.rfind(c, 0, limit) for c in ' \n\t\r')
    return text[:cut].rstrip() if cut > 0 else None


def tokenize_truncated(tokenizer, texts: Sequence[str], pairs: Optional[Sequence[str]] = None, *, max_length: int,
                       padding: bool = False):
    """``tokenizer(texts[, pairs], truncation=...)`` (the second text of pairs is the one truncated) without
    tokenising what truncation throws away: a very long text is first cut at a word boundary after
    ``max_length * CHARS_PER_TOKEN`` characters; when the cut text no longer fills ``max_length`` tokens it is
    encoded again in full, so the result is the same as truncating the full text (for tokenizers that split
    words at whitespace: WordPiece, byte-level BPE, SentencePiece with Metaspace)."""
    texts = list(texts)
    long = list(pairs) if pairs is not None else texts
    clipped = [_clip(t, max_length) for t in long]
    cut = [c if c is not None else t for c, t in zip(clipped, long)]
    kwargs = dict(truncation='only_second' if pairs is not None else True, max_length=max_length)
    enc = tokenizer(texts, cut, **kwargs) if pairs is not None else tokenizer(cut, **kwargs)
    redo = [i for i, c in enumerate(clipped) if c is not None and len(enc['input_ids'][i]) < max_length]
    if redo:
        full = (tokenizer([texts[i] for i in redo], [long[i] for i in redo], **kwargs) if pairs is not None
                else tokenizer([long[i] for i in redo], **kwargs))
        for key in enc.keys():
            for j, i in enumerate(redo):
                enc[key][i] = full[key][j]
    if padding:
        return tokenizer.pad(dict(enc), return_tensors='pt')
    return enc


# ----------------------------------------------------------------------------------------------------------
# Hugging Face Hub sharing

def _hf_hub(component: str, what: str):
    try:
        import huggingface_hub
    except ImportError as e:
        raise ImportError(f'{component}.{what} needs the huggingface_hub package: pip install huggingface_hub') from e
    return huggingface_hub


class HubMixin:
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` on top of a component's ``save`` and ``load``
    (a saved directory is uploaded as-is, so a hub repository and a local directory load the same way)."""

    COMPONENT = 'component'

    def save_pretrained(self, path) -> Path:
        """Same as ``save(path)``; returns the path."""
        self.save(path)
        return Path(path)

    @classmethod
    def from_pretrained(cls, name_or_path, *args, revision: Optional[str] = None, token=None,
                        cache_dir=None, **kwargs):
        """Loads from a local directory written by ``save``/``save_pretrained``, or else from a Hugging Face
        Hub repository id (downloaded with ``huggingface_hub.snapshot_download``). Other arguments go to
        ``load`` (e.g. ``index=`` for Coder/Adore, whose document index is never uploaded)."""
        path = Path(str(name_or_path)).expanduser()
        if not path.exists() and not _looks_like_path(str(name_or_path)):
            hub = _hf_hub(cls.COMPONENT, 'from_pretrained')
            path = Path(hub.snapshot_download(repo_id=str(name_or_path), revision=revision, token=token,
                                              cache_dir=cache_dir))
        return cls.load(path, *args, **kwargs)

    def push_to_hub(self, repo_id: str, *, private: Optional[bool] = None, token=None,
                    commit_message: Optional[str] = None, revision: Optional[str] = None, create_repo: bool = True):
        """Saves to a temporary directory and uploads it to the Hugging Face Hub model repository ``repo_id``
        (created if needed); returns ``upload_folder``'s commit info. Load it back with ``from_pretrained``."""
        hub = _hf_hub(self.COMPONENT, 'push_to_hub')
        api = hub.HfApi(token=token)
        if create_repo:
            api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type='model')
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            card = Path(tmp) / 'README.md'
            if not card.exists():
                card.write_text(_model_card(self.COMPONENT, repo_id))
            return api.upload_folder(repo_id=repo_id, folder_path=tmp, repo_type='model', revision=revision,
                                     commit_message=commit_message or f'Upload {self.COMPONENT} (pyterrier-coder)')


class InspectableSettings:
    """PyTerrier's ``pt.inspect`` protocols (``HasAttributes``, ``HasApplyAttributes``) for components whose
    constructor does not keep every argument under its own name (training settings live in a TrainingConfig, an
    encoder is cloned, a checkpoint is loaded), where pt.inspect's reading of the signature fails.

    ``attributes()`` lists the settings (what a pipeline's schematic in Jupyter shows);
    ``apply_attributes(**changes)`` (``pt.inspect.transformer_apply_attributes``) builds a new instance with some
    settings changed that keeps what this one has learnt, where rebuilding from the arguments alone would start
    again from the original checkpoint."""

    def init_arguments(self) -> dict:
        """Constructor keyword -> value describing this instance (named parameters, then the training settings
        that differ from the component's defaults)."""
        raise NotImplementedError

    def _rebuild_arguments(self) -> dict:
        """The constructor keywords that rebuild this instance with its current weights."""
        return self.init_arguments()

    def _adopt_trained_state(self, source, changes: dict) -> None:
        """Called on the instance built by ``apply_attributes``: take over what ``source`` learnt that the
        constructor did not copy."""

    def attributes(self) -> list:
        import pyterrier as pt
        values = dict(self.init_arguments())
        out = []
        for param in list(inspect.signature(type(self).__init__).parameters.values())[1:]:
            if param.kind == inspect.Parameter.VAR_KEYWORD:   # last: whatever no named parameter took
                value, values = values, {}
            elif param.name in values:
                value = values.pop(param.name)
            else:
                continue
            out.append(pt.inspect.TransformerAttribute(name=param.name, value=value, init_default_value=param.default,
                                                       init_parameter_kind=param.kind))
        return out

    def apply_attributes(self, **changes):
        new = type(self)(**{**self._rebuild_arguments(), **changes})
        new._adopt_trained_state(self, changes)
        return new


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else (absolute, ./, ~, deeper) is meant as a path."""
    return name.startswith(('/', '.', '~')) or '\\' in name or name.count('/') > 1


def _model_card(component: str, repo_id: str) -> str:
    from ._version import __version__
    extra = ', index="<the document index it was trained on>"' if component in ('Coder', 'Adore') else ''
    return (f'---\nlibrary_name: pyterrier-coder\ntags:\n- pyterrier\n- pyterrier-coder\n---\n\n'
            f'# {component} ({repo_id})\n\nA pyterrier-coder {component} (version {__version__}).\n\n'
            f'```python\nfrom pyterrier_coder import {component}\n'
            f'model = {component}.from_pretrained("{repo_id}"{extra})\n```\n')
