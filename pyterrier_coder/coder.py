"""CODER (Zerveas et al.): a query encoder fine-tuned against fixed, precomputed document embeddings.

``M_F → CODER(M_D, M_C)``: M_D is the base bi-encoder whose document index stays fixed, M_C the method that
retrieved the training candidates (whatever stage precedes CODER in the pipeline given to ``fit``), M_F the
first stage used at inference. Per training query the top-N candidates of M_C plus every judged positive are
scored jointly by the inner product with the (trainable) query embedding, and a listwise KL loss pulls the
score distribution towards the relevance labels. Only the query encoder receives gradients.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd
import pyterrier as pt
import pyterrier_alpha as pta
import pyterrier_dr
import torch
from torch import nn

from . import losses
from ._util import evaluate, infer_device, read_component_config, write_component_config, atomic_write_text
from .encoders import DenseEncoder, DenseIndex
from .mining import PAD, CandidateSet, EmbeddingStore, mine_candidates, normalise_frame
from .training import TrainingConfig, TrainingLoop, split_training_kwargs

# CODER paper, Table 3 (MS MARCO, TAS-B base).
PAPER_DEFAULTS = TrainingConfig(lr=1.73e-6, optimizer='radam', weight_decay=9.5e-5, warmup=9000, schedule='constant',
                                batch_size=32, grad_clip=1.0, epochs=1, eval_every=1000, patience=None,
                                metric='nDCG@10')
LOSSES = ('listnet', 'margin')
SCORERS = ('dot', 'transformer')


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

    def __init__(self, encoder: DenseEncoder, head: Optional[nn.Module]):
        super().__init__()
        self.encoder_model = encoder.model
        self.head = head


class Coder(pt.Estimator):
    """CODER reranker / query-encoder trainer.

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
        temperature: scores are divided by it before the softmax. Default: 0.05 for L2-normalised encoders
            (cosine scores in [-1, 1] are too flat for a softmax over 1000 candidates) else 1.
        min_label: judged documents with ``label >= min_label`` are positives (target mass ∝ ``label_weights``).
        label_weights: ``{label: target weight}``; default: the label value itself (graded).
        lower_labels: what happens to judged documents with ``0 < label < min_label``: ``'negative'`` (they stay
            in the list with zero target mass) or ``'ignore'`` (removed from the list).
        random_negatives: extra uniformly sampled (non-retrieved) documents per query and step (paper ablation).
        scorer: ``'dot'`` or ``'transformer'`` (Appendix A.3; then single-stage retrieval is impossible).
        refresh_every: re-retrieve the training candidates with the current query encoder every K steps
            (dynamic candidates; beyond the paper).
        validate_with: ``'rerank'`` the validation candidates of the preceding stage (the pipeline being
            trained) or ``'retrieve'`` over the whole index (single-stage use).
        on_missing: ``'error'`` or ``'drop'`` (with a warning) for docnos absent from the index.
        **training: any :class:`TrainingConfig` field (lr, max_steps, epochs, batch_size, eval_every, patience,
            metric, device, seed, ...); defaults are the paper's Table 3.
    """

    def __init__(self, index, encoder: DenseEncoder, *, num_candidates: int = 1000, loss: str = 'listnet',
                 temperature: Optional[float] = None, min_label: int = 1, label_weights: Optional[dict] = None,
                 lower_labels: str = 'negative', random_negatives: int = 0, scorer: str = 'dot',
                 refresh_every: Optional[int] = None, validate_with: str = 'rerank', on_missing: str = 'error',
                 inference_batch_size: int = 64, verbose: bool = True, **training):
        if loss not in LOSSES:
            raise ValueError(f'Coder: loss must be one of {LOSSES}, got {loss!r}')
        if scorer not in SCORERS:
            raise ValueError(f'Coder: scorer must be one of {SCORERS}, got {scorer!r}')
        if lower_labels not in ('negative', 'ignore'):
            raise ValueError(f"Coder: lower_labels must be 'negative' or 'ignore', got {lower_labels!r}")
        if validate_with not in ('rerank', 'retrieve'):
            raise ValueError(f"Coder: validate_with must be 'rerank' or 'retrieve', got {validate_with!r}")
        if isinstance(index, DenseIndex):
            index = index.flex
        elif not isinstance(index, pyterrier_dr.FlexIndex):
            index = pyterrier_dr.FlexIndex(str(index), verbose=False)
        self.flex = index
        self.store = EmbeddingStore(index)
        self.encoder = encoder.clone()
        self.num_candidates = num_candidates
        self.loss = loss
        self.temperature = temperature if temperature is not None else (0.05 if encoder.normalize else 1.0)
        self.min_label = min_label
        self.label_weights = {int(k): float(v) for k, v in label_weights.items()} if label_weights else None
        self.lower_labels = lower_labels
        self.random_negatives = random_negatives
        self.scorer = scorer
        self.refresh_every = refresh_every
        self.validate_with = validate_with
        self.on_missing = on_missing
        self.inference_batch_size = inference_batch_size
        self.verbose = verbose
        self.config = split_training_kwargs(PAPER_DEFAULTS.replace(verbose=verbose), training)
        self.head = CandidateTransformer(self.encoder.dim) if scorer == 'transformer' else None
        if self.head is not None:
            self.head.to(self.encoder.device)
        self.history = None
        self.fitted = False

    # --- scoring -------------------------------------------------------------------------------------------
    def _scores(self, queries, ids: np.ndarray, mask: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, L]`` of each query against its candidate rows (-1 = padding): the one function used
        for training, validation and inference, so they cannot disagree."""
        device = self.encoder.device
        q = self.encoder.encode_queries_torch(list(queries), batch_size=len(queries))
        docs = self.store.gather(ids, device=device)
        if self.head is not None:
            s = self.head(q, docs.to(q.dtype), mask)
        else:
            s = torch.einsum('bd,bld->bl', q, docs.to(q.dtype))
        return s / self.temperature

    def _rerank_arrays(self, queries, ids: np.ndarray) -> np.ndarray:
        """Inference scores for padded id rows, in chunks of queries, without gradients."""
        out = np.zeros(ids.shape, dtype=np.float32)
        was_training = self.encoder.model.training
        self.encoder.model.eval()
        if self.head is not None:
            self.head.eval()
        bs = self.inference_batch_size
        with torch.inference_mode():
            for start in range(0, len(queries), bs):
                chunk = ids[start:start + bs]
                mask = torch.from_numpy(chunk >= 0).to(self.encoder.device)
                out[start:start + bs] = self._scores(queries[start:start + bs], chunk, mask).float().cpu().numpy()
        self.encoder.model.train(was_training)
        return out

    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        """Re-ranks a result frame (``qid``, ``query``, ``docno``) with the fine-tuned query encoder."""
        pta.validate.result_frame(inp, extra_columns=['query'])
        if not len(inp):
            return inp.assign(score=pd.Series(dtype='float64'), rank=pd.Series(dtype='int64'))
        frame = normalise_frame(inp, 'Coder').reset_index(drop=True)
        ids = self.store.ids(frame['docno'].values, component='Coder', on_missing=self.on_missing)
        if (ids < 0).any():
            warnings.warn(f'Coder: dropped {int((ids < 0).sum())} rows whose docno is not in the index')
            frame, ids = frame[ids >= 0].reset_index(drop=True), ids[ids >= 0]
        codes, uniques = pd.factorize(frame['qid'])
        order = np.argsort(codes, kind='stable')
        counts = np.bincount(codes)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        width = counts.max()
        padded = np.full((len(uniques), width), PAD, dtype=np.int64)
        pos = np.arange(len(order)) - np.repeat(starts, counts)
        padded[codes[order], pos] = ids[order]
        queries = frame['query'].values[order][starts].tolist()
        scores = self._rerank_arrays(queries, padded)
        frame.loc[order, 'score'] = scores[codes[order], pos]
        frame = frame.drop(columns=['rank'], errors='ignore')
        return pt.model.add_ranks(frame).sort_values(['qid', 'rank'], kind='stable').reset_index(drop=True)

    def query_encoder(self) -> pt.Transformer:
        """The fine-tuned query encoder as a transformer (``query`` → ``query_vec``), for pyterrier-dr pipelines."""
        return self.encoder.query_encoder()

    def retriever(self, k: int = 1000, *, backend: str = 'exact', **kwargs) -> pt.Transformer:
        """Single-stage dense retrieval over the same (fixed) document index with the fine-tuned encoder."""
        if self.head is not None:
            raise ValueError('Coder: single-stage retrieval needs the dot-product scorer; this model scores with '
                             "scorer='transformer', which needs a candidate list: use it as a reranker (first_stage >> coder)")
        return DenseIndex(self.encoder, self.flex).retriever(k, backend=backend, **kwargs)

    # --- training ------------------------------------------------------------------------------------------
    def _targets(self, labels: np.ndarray) -> tuple:
        """Target weights and list mask from qrels labels (see ``min_label``/``label_weights``/``lower_labels``)."""
        if self.label_weights is not None:
            weights = np.vectorize(lambda l: self.label_weights.get(int(l), 0.0), otypes=[np.float32])(labels) \
                if labels.size else labels.astype(np.float32)
        else:
            weights = labels.astype(np.float32)
        weights = np.where(labels >= self.min_label, weights, 0.0).astype(np.float32)
        keep = np.ones_like(labels, dtype=bool)
        if self.lower_labels == 'ignore':
            keep = ~((labels > 0) & (labels < self.min_label))
        return weights, keep

    def _loss(self, batch_idx) -> torch.Tensor:
        data = self._train
        ids = data.docids[batch_idx].astype(np.int64)
        weights, keep = self._targets(data.labels[batch_idx])
        if self.random_negatives:
            rand = self._rng.integers(0, len(self.store), size=(len(batch_idx), self.random_negatives))
            ids = np.concatenate([ids, rand], 1)
            weights = np.concatenate([weights, np.zeros(rand.shape, np.float32)], 1)
            keep = np.concatenate([keep, np.ones(rand.shape, bool)], 1)
        device = self.encoder.device
        mask = torch.from_numpy((ids >= 0) & keep).to(device)
        scores = self._scores([data.queries[i] for i in batch_idx], ids, mask)
        target = torch.from_numpy(weights).to(device)
        if self.loss == 'listnet':
            return losses.listnet_kl(scores, target, mask)
        return losses.multilabel_margin(scores * self.temperature, target > 0, mask)

    def _sample_batches(self, epoch, rng):
        order = rng.permutation(len(self._train))
        bs = self.config.batch_size
        return [order[i:i + bs] for i in range(0, len(order), bs)]

    def _retrieve_ids(self, queries, k: int) -> np.ndarray:
        """Top-k row ids for ``queries`` with the current query encoder (exact search over the fixed index)."""
        out = []
        bs = self.inference_batch_size
        with torch.inference_mode():
            was_training = self.encoder.model.training
            self.encoder.model.eval()
            for start in range(0, len(queries), bs):
                q = self.encoder.encode_queries_torch(list(queries[start:start + bs]))
                out.append(self.store.search(q, k)[1].cpu().numpy())
            self.encoder.model.train(was_training)
        return np.concatenate(out) if out else np.empty((0, k), dtype=np.int64)

    def _refresh(self, step: int) -> None:
        if not self.refresh_every or step == 0 or step % self.refresh_every:
            return
        data = self._train
        retrieved = self._retrieve_ids(data.queries, self.num_candidates)
        width = retrieved.shape[1]
        rows, labs = [], []
        for i in range(len(data)):
            judged = data.labels[i] > 0
            pos = data.docids[i][judged]
            extra = np.setdiff1d(pos, retrieved[i])
            row = np.concatenate([retrieved[i], extra])
            lab_map = dict(zip(data.docids[i][judged], data.labels[i][judged]))
            rows.append(row)
            labs.append(np.array([lab_map.get(d, 0.0) for d in row], dtype=np.float32))
        full = max(len(r) for r in rows)
        docids = np.full((len(rows), full), PAD, dtype=np.int32)
        labels = np.zeros((len(rows), full), dtype=np.float32)
        for i, (r, l) in enumerate(zip(rows, labs)):
            docids[i, :len(r)], labels[i, :len(l)] = r, l
        self._train = CandidateSet(data.qids, data.queries, docids, labels,
                                   np.full(len(rows), width, dtype=np.int32), data.stats)

    def _prepare_validation(self, valid, valid_qrels):
        if valid is None or valid_qrels is None:
            return None
        valid_qrels = valid_qrels.assign(qid=valid_qrels['qid'].astype(str), docno=valid_qrels['docno'].astype(str))
        if self.validate_with == 'retrieve' or 'docno' not in valid.columns:
            topics = normalise_frame(valid.drop_duplicates('qid'), 'Coder')
            qids, queries = topics['qid'].tolist(), topics['query'].tolist()
            docnos = self.store.docnos

            def validate():
                ids = self._retrieve_ids(queries, 100)
                scores = self._rerank_arrays(queries, ids)
                res = pd.DataFrame({'qid': np.repeat(qids, ids.shape[1]), 'docno': docnos.fwd[ids.reshape(-1)],
                                    'score': scores.reshape(-1)})
                return evaluate(res, valid_qrels, self.config.metric)
            return validate

        frame = normalise_frame(valid, 'Coder')
        # validation candidates: every row of the preceding stage, positives are NOT injected (that would leak)
        ids = self.store.ids(frame['docno'].values, component='Coder', on_missing=self.on_missing)
        frame = frame.assign(_id=ids)[ids >= 0]
        groups = [(qid, g['query'].iloc[0], g['_id'].values) for qid, g in frame.groupby('qid', sort=False)]
        width = max((len(g[2]) for g in groups), default=0)
        padded = np.full((len(groups), width), PAD, dtype=np.int64)
        for i, (_, _, row) in enumerate(groups):
            padded[i, :len(row)] = row
        qids = [g[0] for g in groups]
        queries = [g[1] for g in groups]
        docnos = self.store.docnos

        def validate():
            scores = self._rerank_arrays(queries, padded)
            valid_cells = padded >= 0
            res = pd.DataFrame({'qid': np.repeat(qids, width)[valid_cells.reshape(-1)],
                                'docno': docnos.fwd[padded[valid_cells]],
                                'score': scores[valid_cells]})
            return evaluate(res, valid_qrels, self.config.metric)
        return validate

    def fit(self, train: pd.DataFrame, train_qrels: pd.DataFrame, valid: Optional[pd.DataFrame] = None,
            valid_qrels: Optional[pd.DataFrame] = None) -> 'Coder':
        """Fine-tunes the query encoder.

        ``train``/``valid`` are the results of the preceding pipeline stage on the training/validation topics
        (``qid``, ``query``, ``docno``, ``score``); given plain topics (no ``docno``), the candidates are
        retrieved from the index with the base encoder itself (M_C = M_D).
        """
        pta.validate.columns(train, includes=['qid', 'query'])
        device = infer_device(self.config.device)
        self.encoder.to(device)
        if self.head is not None:
            self.head.to(device)
        if 'docno' not in train.columns:
            train = self._self_candidates(train)
        self._train = mine_candidates(train, train_qrels, self.store, num_candidates=self.num_candidates,
                                      min_label=self.min_label, on_missing=self.on_missing, component='Coder')
        if not len(self._train):
            raise ValueError('Coder.fit: no training query has a judged positive in the index')
        self._rng = np.random.default_rng(self.config.seed)
        module = _CoderModel(self.encoder, self.head)
        loop = TrainingLoop(module, self.config, sample_batches=self._sample_batches, loss_fn=self._loss,
                            validate=self._prepare_validation(valid, valid_qrels), before_step=self._refresh,
                            name=f'Coder ({self.loss})')
        history = loop.run()
        history['training_data'] = self._train.stats | {'train_queries': len(self._train)}
        self.history = history
        self.fitted = True
        del self._train
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
        return dict(num_candidates=self.num_candidates, loss=self.loss, temperature=self.temperature,
                    min_label=self.min_label, label_weights=self.label_weights, lower_labels=self.lower_labels,
                    random_negatives=self.random_negatives, scorer=self.scorer, refresh_every=self.refresh_every,
                    validate_with=self.validate_with, on_missing=self.on_missing)

    def save(self, path) -> None:
        """Writes the fine-tuned encoder (HF files), the scorer head, settings and training history."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.encoder.save(path / 'encoder')
        if self.head is not None:
            torch.save({'config': self.head.config, 'state_dict': self.head.state_dict()}, path / 'head.pt')
        write_component_config(path, 'Coder', self.settings(), training=self.config.as_dict(),
                               index=str(self.flex.index_path), fitted=self.fitted)
        if self.history is not None:
            atomic_write_text(path / 'history.json', json.dumps(self.history, default=str))

    @classmethod
    def load(cls, path, index=None, *, device=None, **overrides) -> 'Coder':
        """Loads a saved Coder; ``index`` defaults to the index path it was trained with."""
        path = Path(path)
        conf = read_component_config(path, 'Coder')
        encoder = DenseEncoder.load(path / 'encoder', device=device)
        training = {k: v for k, v in conf.get('training', {}).items()}
        if device is not None:
            training['device'] = device
        kwargs = {**conf['settings'], **training, **overrides}
        coder = cls(index if index is not None else conf['index'], encoder, **kwargs)
        coder.encoder = encoder  # no need for the defensive clone: the loaded encoder is ours
        if coder.head is not None:
            state = torch.load(path / 'head.pt', map_location=encoder.device)
            coder.head.load_state_dict(state['state_dict'])
        coder.fitted = conf.get('fitted', False)
        if (path / 'history.json').exists():
            coder.history = json.loads((path / 'history.json').read_text())
        return coder

    def __repr__(self):
        return (f'Coder({self.flex!r}, {self.encoder!r}, loss={self.loss!r}, scorer={self.scorer!r}, '
                f'num_candidates={self.num_candidates}{", fitted" if self.fitted else ""})')
