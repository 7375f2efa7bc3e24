"""Loading Hugging Face models and tokenizers with errors that name what is wrong (a missing directory, weights that
do not fit the architecture, a directory without tokenizer files), and truncating long texts for them."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence


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
