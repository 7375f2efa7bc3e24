"""CODER (Zerveas et al.): a query encoder fine-tuned against fixed, precomputed document embeddings.

``M_F → CODER(M_D, M_C)``: M_D is the base bi-encoder whose document index stays fixed, M_C the method that
retrieved the training candidates (whatever stage precedes CODER in the pipeline given to ``fit``), M_F the
first stage used at inference. Per training query the top-N candidates of M_C plus every judged positive are
scored jointly by the inner product with the (trainable) query embedding, and a listwise KL loss pulls the
score distribution towards the relevance labels. Only the query encoder receives gradients.
"""
from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pyterrier as pt
import torch
from torch import nn

from . import losses
from .artifacts import load_tensors
from .candidates import CandidateSet, CandidateSetWriter, mine_candidates, mine_candidates_to_disk
from .encoders import DenseEncoder
from .frames import normalise_frame, pad_rows
from .labels import check_lower_labels
from .query_trainer import DenseQueryTrainer
from .training import TrainingConfig, is_number_at_least


# CODER paper, Table 3 (MS MARCO, TAS-B base).
PAPER_DEFAULTS = TrainingConfig(lr=1.73e-6, optimizer='radam', weight_decay=9.5e-5, warmup=9000, schedule='constant',
                                batch_size=32, grad_clip=1.0, eval_every=1000, patience=None,
                                metric='nDCG@10')
#: queries re-retrieved and written per chunk when ``refresh_every`` rebuilds a candidate set stored on disk
REFRESH_CHUNK = 4096
SCORERS = ('dot', 'transformer')
#: how the listwise loss turns the target weights of a query's candidates into a distribution: in proportion to the
#: weights (the positives share all the mass) or the paper's softmax over all candidates (Eq. 3)
TARGETS = ('proportional', 'softmax')


def _is_label(key) -> bool:
    """An integer label, also as the string a JSON round trip makes of it (saved settings)."""
    if isinstance(key, str):
        return key.lstrip('-').isdigit()
    return isinstance(key, (int, np.integer)) and not isinstance(key, bool)


class CandidateTransformer(nn.Module):
    """The paper's optional scoring module (Appendix A.3): self-attention over the query and its N candidate
    embeddings with no positional encodings, so the scores do not depend on the candidates' order. The output
    is added to the plain inner product (a residual), so an untrained head starts as the dot-product scorer."""

    def __init__(self, dim: int, num_layers: int = 2, num_heads: int = 8, dropout: float = 0.1):
        super().__init__()
        heads = num_heads if dim % num_heads == 0 else 1
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=dropout, batch_first=True)
        self.layers = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.config = dict(dim=dim, num_layers=num_layers, num_heads=num_heads, dropout=dropout)

    def forward(self, q: torch.Tensor, docs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        seq = torch.cat([q.unsqueeze(1), docs], 1)
        pad = torch.cat([torch.zeros_like(mask[:, :1]), ~mask], 1)
        h = self.layers(seq, src_key_padding_mask=pad)
        h = self.out(h)
        return ((q.unsqueeze(1) + h[:, :1]) * (docs + h[:, 1:])).sum(-1)


class _CoderModel(nn.Module):
    """What the training loop optimises: the query encoder (+ the optional transformer scorer)."""

    def __init__(self, encoder_model: nn.Module, head: Optional[nn.Module]):
        super().__init__()
        self.encoder_model = encoder_model
        self.head = head


class Coder(DenseQueryTrainer):
    """CODER reranker / query-encoder trainer (Zerveas, Rekabsaz, Cohen, Eickhoff: "CODER: An efficient framework
    for improving retrieval through COntextual Document Embedding Reranking", EMNLP 2022).

    Input: a result frame (``qid, query, docno``, any ``score``) is reranked, giving ``qid, query, docno, score,
    rank`` (the inner products of the fine-tuned query embedding with the fixed document embeddings); a query frame
    (``qid, query``) gets single-stage retrieval of ``num_results`` documents. ``fit`` takes the preceding stage's
    results on the training and validation topics (or plain topics: the candidates then come from the index).

    .. code-block:: python

        coder = Coder(index=dense.flex, encoder=DenseEncoder.minilm())
        (bm25 % 1000 >> coder).fit(train_topics, train_qrels, dev_topics, dev_qrels)   # M_C = BM25
        bm25 >> coder                 # reranker (M_F = BM25)
        coder.retriever(k=1000)       # single-stage dense retrieval with the fine-tuned query encoder

    Args:
        index: the base model's document index (a pyterrier-dr ``FlexIndex``, a :class:`DenseIndex` or a path);
            its embeddings are never recomputed nor trained.
        encoder: the base query encoder (:class:`DenseEncoder`); CODER fine-tunes a copy of it.
        num_candidates: N, candidates per training query kept from the preceding stage (paper: 1000).
        loss: ``'listnet'`` (KL between softmax of the target weights and of the scores) or ``'margin'``
            (pairwise multi-label max-margin; the paper's ablation).
        temperature: scores are divided by it in the loss's softmax; the scores the model outputs are the plain
            inner products (as from ``retriever()`` and pyterrier-dr). Default: 0.05 for L2-normalised encoders
            (cosine scores in [-1, 1] are too flat for a softmax over 1000 candidates) else 1.
        target: how the listnet loss turns a query's target weights into a distribution: ``'proportional'`` (the
            positives share all the mass in proportion to their weights; the default, which trains better here, see
            docs/coder.md) or ``'softmax'``, the paper's Eq. 3: ``softmax(weights / label_temperature)`` over all the
            query's candidates, so that unjudged candidates get some mass too.
        label_temperature: the temperature of ``target='softmax'`` (1: the paper's exact form).
        min_label: judged documents with ``label >= min_label`` are positives (target mass ∝ ``label_weights``).
        label_weights: ``{label: target weight}``; default: the label value itself (graded).
        lower_labels: what happens to judged documents with ``0 < label < min_label``: ``'negative'`` (they stay
            in the list with zero target mass) or ``'ignore'`` (removed from the list).
        random_negatives: extra uniformly sampled (non-retrieved) documents per query and step (paper ablation;
            with ``num_candidates=0`` the list is the judged positives and random negatives only).
        in_batch_negatives: the other queries of the batch lend their positives and their top ``in_batch_negatives``
            candidates as extra negatives (documents of the query's own list excepted; paper ablation).
        scorer: ``'dot'`` or ``'transformer'`` (Appendix A.3; then single-stage retrieval is impossible).
        refresh_every: re-retrieve the training candidates with the current query encoder every K steps
            (dynamic candidates; beyond the paper).
        validate_with: ``'rerank'`` the validation candidates of the preceding stage (the pipeline being
            trained) or ``'retrieve'`` over the whole index (single-stage use).
        num_results: documents retrieved when a query frame (no ``docno``) is given to the transformer.
        on_missing: ``'error'`` or ``'drop'`` (with a warning) for docnos absent from the index.
        **training: any :class:`TrainingConfig` field (lr, max_steps, epochs, batch_size, eval_every, patience,
            metric, device, seed, ...); defaults are the paper's Table 3.
    """

    COMPONENT = 'Coder'
    DEFAULTS = PAPER_DEFAULTS

    @staticmethod
    def _check_values(values: dict, component: str) -> None:
        """The values of this class's own settings (see training.check_settings)."""
        losses.loss_function(values['loss'], losses.CANDIDATE_LIST_LOSSES, component)
        if values['scorer'] not in SCORERS:
            raise ValueError(f"{component}: scorer must be one of {SCORERS}, got {values['scorer']!r}")
        check_lower_labels(values['lower_labels'], component)
        counts = {name: values[name] for name in ('num_candidates', 'random_negatives', 'in_batch_negatives')}
        if not all(is_number_at_least(v, 0) for v in counts.values()) or not any(counts.values()):
            raise ValueError(f"{component}: num_candidates, random_negatives and in_batch_negatives must be >= 0, "
                             f"and one of them > 0 (negatives to train against), got {counts}")
        if values['target'] not in TARGETS:
            raise ValueError(f"{component}: target must be one of {TARGETS}, got {values['target']!r}")
        if not (is_number_at_least(values['label_temperature'], 0, strict=True)
                and math.isfinite(values['label_temperature'])):
            raise ValueError(f"{component}: label_temperature must be a finite number > 0, got "
                             f"{values['label_temperature']!r}")
        if values['target'] == 'softmax' and values['loss'] == 'margin':
            raise ValueError(f"{component}: target='softmax' is a distribution for the listnet loss; the margin loss "
                             f"uses the positives only")
        weights = values['label_weights']
        if weights is not None and not (isinstance(weights, dict) and all(
                _is_label(k) and is_number_at_least(v, 0) and math.isfinite(v)
                for k, v in weights.items())):
            raise ValueError(f"{component}: label_weights must be a dict {{label (int): weight (a finite number >= 0)}}, "
                             f"got {weights!r}")
        if values['refresh_every'] is not None and not is_number_at_least(values['refresh_every'], 1):
            raise ValueError(f"{component}: refresh_every must be >= 1 or None, got {values['refresh_every']!r}")

    def __init__(self, index, encoder: DenseEncoder, *, num_candidates: int = 1000, loss: str = 'listnet',
                 temperature: Optional[float] = None, target: str = 'proportional', label_temperature: float = 1.0,
                 min_label: int = 1, label_weights: Optional[dict] = None, lower_labels: str = 'negative',
                 random_negatives: int = 0, in_batch_negatives: int = 0, scorer: str = 'dot',
                 refresh_every: Optional[int] = None, **kwargs):
        Coder._check_values(dict(loss=loss, scorer=scorer, lower_labels=lower_labels, num_candidates=num_candidates,
                                 random_negatives=random_negatives, in_batch_negatives=in_batch_negatives,
                                 refresh_every=refresh_every, label_weights=label_weights, target=target,
                                 label_temperature=label_temperature), 'Coder')
        super().__init__(index, encoder, **kwargs)
        self.num_candidates = num_candidates
        self.loss = loss
        self._loss_fn = losses.loss_function(loss, losses.CANDIDATE_LIST_LOSSES, 'Coder')
        self.temperature = temperature if temperature is not None else (0.05 if self.encoder.normalize else 1.0)
        self.min_label = min_label
        self.label_weights = {int(k): float(v) for k, v in label_weights.items()} if label_weights else None
        self.lower_labels = lower_labels
        self.random_negatives = random_negatives
        self.in_batch_negatives = in_batch_negatives
        self.target = target
        self.label_temperature = label_temperature
        self.scorer = scorer
        self.refresh_every = refresh_every
        self.head = CandidateTransformer(self.encoder.dim).to(self.encoder.device) if scorer == 'transformer' else None

    # --- scoring -------------------------------------------------------------------------------------------
    def trainable_module(self) -> nn.Module:
        return _CoderModel(self.encoder.trainable_module(), self.head)

    def _scores(self, queries, ids: np.ndarray, mask: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            return super()._scores(queries, ids, mask)
        q = self.encoder.encode_queries_torch(list(queries), batch_size=len(queries))
        return self.head(q, self._candidate_embeddings(ids).to(q.dtype), mask)

    def retriever(self, k: int = 1000, *, backend: str = 'exact', **kwargs) -> pt.Transformer:
        if self.head is not None:
            raise ValueError('Coder: single-stage retrieval needs the dot-product scorer; this model scores with '
                             "scorer='transformer', which needs a candidate list: use it as a reranker (first_stage >> coder)")
        return super().retriever(k, backend=backend, **kwargs)

    # --- training ------------------------------------------------------------------------------------------
    def _targets(self, labels: np.ndarray) -> tuple:
        """Target weights and list mask from qrels labels (see ``min_label``/``label_weights``/``lower_labels``)."""
        if self.label_weights is not None:
            weights = np.zeros_like(labels, dtype=np.float32)
            for label, weight in self.label_weights.items():
                weights[labels == label] = weight
        else:
            weights = labels.astype(np.float32)
        weights = np.where(labels >= self.min_label, weights, 0.0).astype(np.float32)
        keep = np.ones_like(labels, dtype=bool)
        if self.lower_labels == 'ignore':
            keep = ~((labels > 0) & (labels < self.min_label))
        return weights, keep

    def _sample_batches(self, n_queries: int):
        """Batches are ``[B, 1 + random_negatives]`` int arrays: the training-query index, then the random
        negatives drawn for it. Drawing them here, from the loop's generator, makes them part of the sequence a
        resumed run replays (and rows slice cleanly into micro-batches)."""
        bs, extra = self.config.batch_size, self.random_negatives

        def sample(epoch, rng):
            rows = rng.permutation(n_queries)[:, None]
            if extra:
                rows = np.concatenate([rows, rng.integers(0, len(self.store), size=(n_queries, extra))], 1)
            return [rows[i:i + bs] for i in range(0, n_queries, bs)]
        return sample

    def _batch_ids(self, batch) -> np.ndarray:
        """The candidate row ids ``[B, L]`` of a batch: its queries' candidates, then its random negatives, then its
        in-batch negatives."""
        ids = self._train.docids[batch[:, 0]].astype(np.int64)
        parts = [ids, batch[:, 1:]] if self.random_negatives else [ids]
        if self.in_batch_negatives:
            parts.append(self._in_batch_ids(batch[:, 0]))
        return np.concatenate(parts, 1) if len(parts) > 1 else ids

    def _in_batch_ids(self, batch_idx: np.ndarray) -> np.ndarray:
        """``[B, E]`` (-1 padded): per query of the batch, the other queries' positives and their top
        ``in_batch_negatives`` candidates, except the documents of its own list (so that none of its judged documents,
        and no candidate twice, is among them)."""
        rows = np.asarray(self._train.docids[batch_idx], dtype=np.int64)
        labels = np.asarray(self._train.labels[batch_idx])
        shared = [np.concatenate([row[:self.in_batch_negatives], row[labels[b] >= self.min_label]])
                  for b, row in enumerate(rows)]
        extra = []
        for b, own in enumerate(rows):
            others = [shared[o] for o in range(len(rows)) if o != b]
            pool = np.unique(np.concatenate(others)) if others else np.empty(0, np.int64)
            extra.append(np.setdiff1d(pool[pool >= 0], own))
        return pad_rows(extra, -1, np.int64)

    def _loss(self, batch) -> torch.Tensor:
        data = self._train
        batch_idx = batch[:, 0]
        ids = self._batch_ids(batch)
        weights, keep = self._targets(data.labels[batch_idx])
        added = ids.shape[1] - weights.shape[1]         # random and in-batch negatives: no target, always kept
        if added:
            weights = np.concatenate([weights, np.zeros((len(ids), added), np.float32)], 1)
            keep = np.concatenate([keep, np.ones((len(ids), added), bool)], 1)
        device = self.encoder.device
        mask = torch.from_numpy((ids >= 0) & keep).to(device)
        scores = self._scores([data.queries[i] for i in batch_idx], ids, mask)
        target = torch.from_numpy(weights).to(device)
        if self.target == 'softmax':
            target = losses.softmax_target(target, mask, self.label_temperature)
        # the temperature belongs to the loss: output scores stay inner products
        return self._loss_fn(scores, target, mask, temperature=self.temperature)

    def _refresh(self, step: int) -> None:
        """Dynamic candidates: re-retrieve the top-N with the current encoder and re-inject the positives. A set on
        disk (memory-mapped) is rebuilt on disk, :data:`REFRESH_CHUNK` queries at a time, beside the old one."""
        if not self.refresh_every or step == 0 or step % self.refresh_every:
            return
        data = self._train
        on_disk = isinstance(data.docids, np.memmap)
        writer = CandidateSetWriter(self._refresh_path(data)) if on_disk else None
        chunk = REFRESH_CHUNK if on_disk else max(1, len(data))
        for start in range(0, len(data), chunk):
            stop = min(start + chunk, len(data))
            retrieved = self._retrieve_ids(data.queries[start:stop], self.num_candidates)
            rows, labels = [], []
            for i, top in zip(range(start, stop), retrieved):
                ids, row_labels = np.asarray(data.docids[i]), np.asarray(data.labels[i])
                judged = row_labels > 0
                label_of = dict(zip(ids[judged], row_labels[judged]))
                row = np.concatenate([top, np.setdiff1d(ids[judged], top)])
                rows.append(row)
                labels.append(np.array([label_of.get(d, 0.0) for d in row], dtype=np.float32))
            part = CandidateSet.from_rows(data.qids[start:stop], data.queries[start:stop], rows, labels,
                                          np.full(len(rows), retrieved.shape[1]), data.stats, data.index)
            if writer is None:
                self._train = part
            else:
                writer.append(part)
        if writer is not None:
            self._train = writer.finish(data.stats, data.index)

    def _refresh_path(self, data: CandidateSet) -> Path:
        """Alternates between two directories in a temporary folder beside the stored set (same disk), removed
        when training ends: the set being read is never the one being written."""
        if self._refresh_root is None:
            parent = Path(data.docids.filename).parent.parent
            self._refresh_root = Path(tempfile.mkdtemp(prefix='.coder-refresh-', dir=parent))
        current = Path(data.docids.filename).parent
        return self._refresh_root / ('b' if current == self._refresh_root / 'a' else 'a')

    def fit(self, train: pd.DataFrame, train_qrels: pd.DataFrame, valid: Optional[pd.DataFrame] = None,
            valid_qrels: Optional[pd.DataFrame] = None, *, resume: bool = False) -> 'Coder':
        """Fine-tunes the query encoder.

        ``train``/``valid`` are the results of the preceding pipeline stage on the training/validation topics
        (``qid``, ``query``, ``docno``, ``score``); given plain topics (no ``docno``), the candidates are
        retrieved from the index with the base encoder itself (M_C = M_D). ``resume=True`` continues from the
        checkpoint in ``checkpoint_dir`` (see :class:`TrainingConfig`). For training sets whose candidate frame
        would not fit in memory, mine to disk first (:meth:`mine`) and train with :meth:`fit_candidates`.
        """
        self._check_training_frame(train)
        self._prepare_device()
        if 'docno' not in train.columns and self.num_candidates:   # with none, the lists are the positives only
            train = self._self_candidates(train)
        candidates = mine_candidates(train, train_qrels, self.store, num_candidates=self.num_candidates,
                                     min_label=self.min_label, on_missing=self.on_missing, component='Coder')
        return self.fit_candidates(candidates, valid, valid_qrels, resume=resume)

    def mine(self, first_stage: pt.Transformer, topics: pd.DataFrame, qrels: pd.DataFrame, path, *,
             chunk_size: int = 1000, resume: bool = False) -> CandidateSet:
        """Mines this model's training candidates (M_C = ``first_stage``, e.g. ``bm25 % 1000``) to the directory
        ``path``, ``chunk_size`` queries at a time (see :func:`~pyterrier_coder.candidates.mine_candidates_to_disk`),
        with this model's ``num_candidates``, ``min_label`` and ``on_missing``; returns the memory-mapped set
        for :meth:`fit_candidates`. ``resume=True`` continues an interrupted call with the same arguments."""
        return mine_candidates_to_disk(first_stage, topics, qrels, self.store, path, chunk_size=chunk_size,
                                       num_candidates=self.num_candidates, min_label=self.min_label,
                                       on_missing=self.on_missing, resume=resume, component='Coder',
                                       verbose=self.verbose)

    def fit_candidates(self, candidates, valid: Optional[pd.DataFrame] = None,
                       valid_qrels: Optional[pd.DataFrame] = None, *, resume: bool = False) -> 'Coder':
        """Fine-tunes the query encoder on mined candidates: a :class:`~pyterrier_coder.candidates.CandidateSet` or
        the directory of a saved one (opened memory-mapped: only each batch's rows are read). Given the set
        :meth:`fit` would mine from a frame, it trains exactly as :meth:`fit` does."""
        if not isinstance(candidates, CandidateSet):
            candidates = CandidateSet.load(candidates)
        candidates.check_index(self.store, 'Coder')
        if not len(candidates):
            raise ValueError(f'Coder.fit: no training query has a judged positive (label >= {self.min_label}) '
                             f'in the index')
        self._prepare_device()
        self._train = data = candidates
        self._refresh_root = None
        try:
            history = self._run(self._loss, self._sample_batches(len(self._train)),
                                self._validation_fn(valid, valid_qrels), before_step=self._refresh,
                                name=f'Coder ({losses.loss_name(self.loss)})', resume=resume, batch_ids=self._batch_ids,
                                training_data=(data.qids, data.queries, data.docids, data.labels))
            history['training_data'] = self._train.stats | {'train_queries': len(self._train)}
        finally:
            del self._train
            if self._refresh_root is not None:
                shutil.rmtree(self._refresh_root, ignore_errors=True)
        return self

    def _self_candidates(self, topics: pd.DataFrame) -> pd.DataFrame:
        topics = normalise_frame(topics.drop_duplicates('qid'), 'Coder')
        ids = self._retrieve_ids(topics['query'].tolist(), self.num_candidates)
        return pd.DataFrame({'qid': np.repeat(topics['qid'].values, ids.shape[1]),
                             'query': np.repeat(topics['query'].values, ids.shape[1]),
                             'docno': self.store.docnos.fwd[ids.reshape(-1)],
                             'score': np.tile(-np.arange(ids.shape[1], dtype=np.float32), len(topics))})

    # --- persistence ---------------------------------------------------------------------------------------
    def settings(self) -> dict:
        return super().settings() | dict(
            num_candidates=self.num_candidates, loss=losses.loss_name(self.loss), temperature=self.temperature,
            min_label=self.min_label, label_weights=self.label_weights, lower_labels=self.lower_labels,
            random_negatives=self.random_negatives, in_batch_negatives=self.in_batch_negatives, target=self.target,
            label_temperature=self.label_temperature, scorer=self.scorer, refresh_every=self.refresh_every)

    def _adopt_trained_state(self, source, changes: dict) -> None:
        super()._adopt_trained_state(source, changes)
        if self.head is not None and source.head is not None and 'encoder' not in changes:
            self.head.load_state_dict(source.head.state_dict())

    def _save_extra(self, path: Path) -> None:
        if self.head is not None:
            torch.save({'config': self.head.config, 'state_dict': self.head.state_dict()}, path / 'head.pt')

    def _load_extra(self, path: Path) -> None:
        if self.head is not None:
            state = load_tensors(path / 'head.pt', 'Coder', map_location=self.encoder.device)
            self.head.load_state_dict(state['state_dict'])

    def _repr_args(self) -> str:
        return f', loss={self.loss!r}, scorer={self.scorer!r}, num_candidates={self.num_candidates}'
