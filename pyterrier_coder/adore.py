"""ADORE (Zhan et al., "Optimizing Dense Retrieval Model Training with Hard Negatives").

The document encoder is frozen and its embeddings precomputed into a fixed index; only the query encoder is
trained. At every step the batch's queries are encoded with the *current* encoder and their top-k documents
retrieved from the fixed index: the retrieved non-relevant documents are the dynamic hard negatives. Each
(relevant d+, negative d-) pair contributes ``ΔM · log(1 + exp(f(q,d-) - f(q,d+)))`` where ΔM is the change of
the target metric if d+ and d- swapped ranks (LambdaRank). Judged positives that were not retrieved are placed
at rank k+1, just below the retrieved list (so a positive the model misses still yields pairs with every
retrieved negative, weighted by how much pulling it up would gain). With graded qrels, ``lower_labels='ignore'``
keeps the retrieved documents judged below ``min_label`` (but above 0) out of the negatives: they are partly
relevant, and training them down would cost a graded evaluation.
"""
from __future__ import annotations

import re
from typing import Optional

import numpy as np
import pandas as pd
import torch

from . import losses
from .candidates import CandidateSet
from .devices import check_faiss_gpu_k, faiss_gpu_count, faiss_to_gpus
from .encoders import DenseEncoder
from .frames import normalise_frame, normalise_qrels, pad_rows, unknown_qrels, warn_skipped
from .labels import check_lower_labels
from .query_trainer import DenseQueryTrainer
from .training import Timers, TrainingConfig, is_number_at_least


# ADORE paper defaults: AdamW, lr 5e-6, 32 queries per batch, top-200 negatives.
ADORE_DEFAULTS = TrainingConfig(lr=5e-6, optimizer='adamw', weight_decay=0.01, warmup=0.1, schedule='linear',
                                batch_size=32, grad_clip=1.0, eval_every=200, metric='nDCG@10')

SEARCH_BACKENDS = ('exact', 'faiss')
MRR_DELTAS = ('each_relevant', 'first_relevant')


def parse_delta_metric(spec: str) -> tuple:
    match = re.fullmatch(r'(MRR|RR|nDCG)@(\d+)', spec)
    if not match:
        raise ValueError(f"Adore: delta_metric must look like 'MRR@200' or 'nDCG@10', got {spec!r}")
    name = 'nDCG' if match.group(1) == 'nDCG' else 'MRR'
    return name, int(match.group(2))


class Adore(DenseQueryTrainer):
    """ADORE query-encoder trainer over a fixed dense index; after ``fit`` a single-stage dense retriever (Zhan,
    Mao, Liu, Guo, Zhang, Ma: "Optimizing Dense Retrieval Model Training with Hard Negatives", SIGIR 2021).

    Input: a query frame (``qid, query``) gets ``qid, query, docno, score, rank`` (retrieval of ``num_results``
    documents with the fine-tuned query encoder); a result frame (``qid, query, docno``) is reranked. ``fit`` takes
    training topics (a result frame too: only ``qid``/``query`` are used, ADORE retrieves its own negatives).

    .. code-block:: python

        adore = Adore(index=dense.flex, encoder=DenseEncoder.minilm())
        adore.fit(train_topics, train_qrels, dev_topics, dev_qrels)
        adore.retriever(k=1000)                              # single-stage retrieval
        adore.query_encoder() >> dense.flex.retriever()      # the same, as a pyterrier-dr pipeline

    Args:
        index: the fixed document index (FlexIndex, :class:`DenseIndex` or path).
        encoder: the base query encoder (a copy is trained).
        k: documents retrieved per query and step (paper: 200).
        delta_metric: the metric whose swap change weights each pair: ``'MRR@k'`` or ``'nDCG@k'`` (graded).
        mrr_delta: how ``'MRR@k'`` weighs a pair when a query has several relevant documents: ``'each_relevant'``
            (the positive's own change of reciprocal rank, ``|1/r+ - 1/r-|``, as if it were the only relevant
            document: the weights of ADORE's reference implementation) or ``'first_relevant'`` (the exact change of
            the query's reciprocal rank: only pairs that move its first relevant document count). The same with one
            relevant document.
        lambda_weighting: False gives the paper's RankNet ablation (all pairs weight 1).
        dynamic: False retrieves the negatives once, with the base encoder, before training (static baseline).
        min_label: judged documents with ``label >= min_label`` are relevant.
        lower_labels: judged documents with ``0 < label < min_label``: ``'negative'`` (retrieved, they are negatives
            like any other) or ``'ignore'`` (never paired with a positive).
        search: ``'exact'`` (blocked torch matmul over the memory-mapped index, on the training device) or
            ``'faiss'`` (faiss flat, or ``'faiss:<factory>'`` e.g. ``'faiss:IVF256,PQ32'`` to train against the
            compressed index that will be deployed; sharded over all GPUs when present).
        temperature: scores are divided by it in the loss (default 0.05 for L2-normalised encoders, else 1).
        **training: :class:`TrainingConfig` fields (defaults: AdamW, lr 5e-6, 32 queries per batch).
    """

    COMPONENT = 'Adore'
    DEFAULTS = ADORE_DEFAULTS
    SETTINGS_OF_OLDER_SAVES = {'mrr_delta': 'first_relevant'}

    @staticmethod
    def _check_values(values: dict, component: str) -> None:
        """The values of this class's own settings (see training.check_settings)."""
        parse_delta_metric(values['delta_metric'])
        search = values['search']
        if not (search in SEARCH_BACKENDS or isinstance(search, str) and search.startswith('faiss:')):
            raise ValueError(f"{component}: search must be 'exact', 'faiss' or 'faiss:<factory string>', "
                             f"got {search!r}")
        if not is_number_at_least(values['k'], 1):
            raise ValueError(f"{component}: k must be >= 1, got {values['k']!r}")
        check_lower_labels(values['lower_labels'], component)
        if values['mrr_delta'] not in MRR_DELTAS:
            raise ValueError(f"{component}: mrr_delta must be 'each_relevant' or 'first_relevant', "
                             f"got {values['mrr_delta']!r}")

    def __init__(self, index, encoder: DenseEncoder, *, k: int = 200, delta_metric: str = 'MRR@200',
                 mrr_delta: str = 'each_relevant', lambda_weighting: bool = True, dynamic: bool = True,
                 min_label: int = 1, lower_labels: str = 'negative', search: str = 'exact',
                 temperature: Optional[float] = None, validate_with: str = 'retrieve', **kwargs):
        Adore._check_values(dict(k=k, delta_metric=delta_metric, search=search, lower_labels=lower_labels,
                                 mrr_delta=mrr_delta), 'Adore')
        # validation by retrieval by default: ADORE trains a single-stage retriever
        super().__init__(index, encoder, validate_with=validate_with, **kwargs)
        self.delta_name, self.delta_k = parse_delta_metric(delta_metric)
        self.k = k
        self.delta_metric = delta_metric
        self.mrr_delta = mrr_delta
        self.lambda_weighting = lambda_weighting
        self.dynamic = dynamic
        self.min_label = min_label
        self.lower_labels = lower_labels
        self.search = search
        self.temperature = temperature if temperature is not None else (0.05 if self.encoder.normalize else 1.0)
        self._faiss = None

    # --- retrieval of the negatives ----------------------------------------------------------------------------
    def _search_ids(self, q: torch.Tensor, k: int) -> np.ndarray:
        if self.search == 'exact':
            return self.store.search(q, k)[1].cpu().numpy()
        return self._faiss_index().search(np.ascontiguousarray(q.detach().float().cpu().numpy()), k)[1]

    def _faiss_index(self):
        """A faiss index over the fixed embeddings (built once): flat inner product or a factory string
        (IVF/PQ ...), trained on a sample; on the GPUs when faiss sees any (sharded over all of them; under torchrun
        each rank's copy on its own GPU)."""
        if self._faiss is None:
            import faiss
            spec = 'Flat' if self.search == 'faiss' else self.search.split(':', 1)[1]
            index = faiss.index_factory(self.store.dim, spec, faiss.METRIC_INNER_PRODUCT)
            vecs = self.store.vecs
            if not index.is_trained:
                sample = np.random.default_rng(0).choice(len(vecs), size=min(len(vecs), 100_000), replace=False)
                index.train(np.ascontiguousarray(vecs[np.sort(sample)], dtype=np.float32))
            for start in range(0, len(vecs), 65536):
                index.add(np.ascontiguousarray(vecs[start:start + 65536], dtype=np.float32))
            if faiss_gpu_count() > 0:
                check_faiss_gpu_k(self.k, self.COMPONENT, "search='exact'")
                index = faiss_to_gpus(index)
            self._faiss = index
        return self._faiss

    # --- the loss --------------------------------------------------------------------------------------------
    def _loss(self, batch_idx) -> torch.Tensor:
        device = self.encoder.device
        queries = [self._queries[i] for i in batch_idx]
        q = self.encoder.encode_queries_torch(queries, batch_size=len(queries))
        with self._timers('retrieval'):
            if self.dynamic:
                retrieved = self._search_ids(q.detach(), self.k)
            else:
                retrieved = self._static[batch_idx]
        k = retrieved.shape[1]
        pos_ids = self._positives[batch_idx]                       # [B, P] (-1 padded)
        pos_gain = self._gains[batch_idx]
        pos_mask = pos_ids >= 0
        # rank (1-based) of each positive in the retrieved list, k+1 when it was not retrieved
        hit = (pos_ids[:, :, None] == retrieved[:, None, :]) & pos_mask[:, :, None]
        pos_rank = np.where(hit.any(-1), hit.argmax(-1) + 1, k + 1)
        is_pos = _in_rows(retrieved, pos_ids)
        neg_rank = np.broadcast_to(np.arange(1, k + 1), retrieved.shape)
        neg_mask = ~is_pos & ~_in_rows(retrieved, self._lower[batch_idx])

        s_pos = self._dot_candidates(q, np.where(pos_mask, pos_ids, 0)) / self.temperature
        s_neg = self._dot_candidates(q, retrieved) / self.temperature

        def t(array, dtype=None):
            return torch.as_tensor(np.array(array), device=device, dtype=dtype)
        pair_mask = t(pos_mask)[:, :, None] & t(neg_mask)[:, None, :]
        if not self.lambda_weighting:
            weights = torch.ones(pair_mask.shape, device=device)
        elif self.delta_name == 'MRR':
            delta = losses.delta_rr_each if self.mrr_delta == 'each_relevant' else losses.delta_mrr
            weights = delta(t(pos_rank), t(neg_rank), t(pos_mask), self.delta_k)
        else:
            ideal_gains = -np.sort(-pos_gain, axis=1)[:, :self.delta_k]
            ideal = (ideal_gains / np.log2(np.arange(2, ideal_gains.shape[1] + 2))).sum(1)
            weights = losses.delta_ndcg(t(pos_rank), t(neg_rank), t(pos_gain, torch.float32), t(pos_mask),
                                        self.delta_k, t(ideal, torch.float32))
        return losses.weighted_pairwise_logistic(s_pos, s_neg, weights, pair_mask)

    # --- fit ---------------------------------------------------------------------------------------------------
    def fit(self, train: pd.DataFrame, train_qrels: pd.DataFrame, valid: Optional[pd.DataFrame] = None,
            valid_qrels: Optional[pd.DataFrame] = None, *, resume: bool = False) -> 'Adore':
        """Trains the query encoder on the training topics (a result frame is accepted too: ADORE retrieves
        its own negatives, so only ``qid``/``query`` are used). ``resume=True`` continues from the checkpoint
        in ``checkpoint_dir``."""
        self._check_training_frame(train)
        topics = normalise_frame(train[['qid', 'query']], 'Adore').drop_duplicates('qid')
        qrels = normalise_qrels(train_qrels, 'Adore')
        unknown = unknown_qrels(qrels, topics['qid'], 'Adore')
        judged = qrels[qrels['label'] > 0]
        ids = self.store.ids(judged['docno'].values, component='Adore', on_missing='drop')
        judged = judged.assign(_id=ids)[ids >= 0]
        by_qid = {qid: (g['_id'].to_numpy(), g['label'].to_numpy(np.float32)) for qid, g in judged.groupby('qid')}
        empty = (np.empty(0, np.int64), np.empty(0, np.float32))
        return self._fit_judged(topics['query'].tolist(), [by_qid.get(qid, empty) for qid in topics['qid']],
                                {'qrels_for_unknown_queries': unknown}, valid, valid_qrels, resume)

    def fit_candidates(self, candidates, valid: Optional[pd.DataFrame] = None,
                       valid_qrels: Optional[pd.DataFrame] = None, *, resume: bool = False) -> 'Adore':
        """Trains on the queries and judged positives of a mined :class:`~pyterrier_coder.candidates.CandidateSet`
        (or the directory of a saved one, opened memory-mapped), e.g. the set mined for CODER: its rows with
        ``label >= min_label`` are the positives (ADORE retrieves its negatives itself). The set holds every
        positive when it was mined with injected positives and a ``min_label`` no higher than this one's; with
        ``lower_labels='ignore'`` the lower grades kept out of the negatives are those the set holds."""
        if not isinstance(candidates, CandidateSet):
            candidates = CandidateSet.load(candidates)
        candidates.check_index(self.store, 'Adore')
        judged = []
        for start in range(0, len(candidates), 4096):      # a block of rows at a time: the set may be on disk
            ids = np.asarray(candidates.docids[start:start + 4096], dtype=np.int64)
            labels = np.asarray(candidates.labels[start:start + 4096])
            keep = (labels > 0) & (ids >= 0)
            judged += [(i[k], l[k]) for i, l, k in zip(ids, labels, keep)]
        return self._fit_judged(list(candidates.queries), judged,
                                {'qrels_for_unknown_queries': candidates.stats.get('qrels_for_unknown_queries', 0)},
                                valid, valid_qrels, resume)

    def _fit_judged(self, queries: list, judged: list, training_data: dict, valid, valid_qrels,
                    resume: bool) -> 'Adore':
        """Trains on ``queries`` and their judged documents (``(row ids, labels)`` per query, labels > 0): those with
        ``label >= min_label`` are the positives, the others are negatives or ignored (``lower_labels``). Queries
        without a positive are skipped (counted, warned)."""
        self._prepare_device()
        positives = [(ids[labels >= self.min_label], labels[labels >= self.min_label]) for ids, labels in judged]
        keep = [i for i, (ids, _) in enumerate(positives) if len(ids)]
        skipped = len(queries) - len(keep)
        warn_skipped(skipped, len(queries), 'Adore', f'label >= {self.min_label} in the index')
        if not keep:
            raise ValueError(f'Adore.fit: no training query has a judged positive (label >= {self.min_label}) '
                             f'in the index')
        self._positives = pad_rows([positives[i][0] for i in keep], -1, np.int64)
        self._gains = pad_rows([positives[i][1] for i in keep], 0, np.float32)
        lower = [ids[labels < self.min_label] if self.lower_labels == 'ignore' else ids[:0] for ids, labels in judged]
        self._lower = pad_rows([lower[i] for i in keep], -1, np.int64)
        self._queries = [queries[i] for i in keep]
        ignored = int((self._lower >= 0).sum())
        self._timers = Timers.for_device(self.encoder.device)
        if not self.dynamic:
            with self._timers('static_retrieval'):
                self._static = self._retrieve_ids(self._queries, self.k)
        try:
            history = self._run(self._loss, self._batches_of_queries(len(self._queries)),
                                self._validation_fn(valid, valid_qrels),
                                name=f'ADORE ({"dynamic" if self.dynamic else "static"})', resume=resume,
                                training_data=(self._queries, self._positives, self._gains, self._lower))
        finally:
            for name in ('_positives', '_gains', '_lower', '_queries', '_static'):
                self.__dict__.pop(name, None)
        timing = history['timing']
        timing.update(self._timers.seconds)
        step_time = timing.get('forward_backward', 0.0) + timing.get('optimizer', 0.0)
        history['retrieval_share'] = timing.get('retrieval', 0.0) / step_time if step_time else 0.0
        history['training_data'] = {'train_queries': len(keep), 'skipped_no_positive': skipped,
                                    'lower_grades_ignored': ignored, **training_data}
        return self

    # --- persistence -------------------------------------------------------------------------------------------
    def settings(self) -> dict:
        return super().settings() | dict(k=self.k, delta_metric=self.delta_metric, mrr_delta=self.mrr_delta,
                                         lambda_weighting=self.lambda_weighting, dynamic=self.dynamic,
                                         min_label=self.min_label, lower_labels=self.lower_labels, search=self.search,
                                         temperature=self.temperature)

    def _repr_args(self) -> str:
        mrr_delta = f', mrr_delta={self.mrr_delta!r}' if self.delta_name == 'MRR' else ''
        return f', k={self.k}, delta_metric={self.delta_metric!r}{mrr_delta}, dynamic={self.dynamic}'


def _in_rows(values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``[B, K]`` mask: whether each of row i's ``values`` is among row i of ``ids`` (``[B, M]``, -1 padded)."""
    return (values[:, :, None] == ids[:, None, :]).any(-1)
