"""TAS-Balanced (Hofstätter et al., SIGIR 2021, "Efficiently Teaching an Effective Dense Retriever with Balanced
Topic Aware Sampling"): a bi-encoder trained by distillation from two teachers on batches composed by topic.

* **Batches** (:mod:`pyterrier_coder.sampling`): the training queries are clustered once by their embedding under the
  starting encoder; a batch takes its queries from ``clusters_per_batch`` random clusters (paper: one), so the other
  passages of a batch are on the query's topic. Each query brings one (positive, negative) pair, drawn from a
  random range of its pairs' teacher margins (``num_bins`` equal-width ranges), so that the few hard pairs (small
  margin) are drawn as often as the many easy ones. The negatives are the top ``negative_depth`` candidates of the
  stage that precedes TAS-Balanced in the pipeline it is fitted in (``(bm25 % 100 >> tasb).fit(...)``) that are not
  judged relevant.
* **Dual supervision** (:mod:`pyterrier_coder.teachers`, :mod:`pyterrier_coder.losses`), both terms Margin-MSE:
  ``L = L_pair + in_batch_weight * L_in-batch`` (paper: 0.75). ``L_pair`` matches the student's margin for the
  query's pair to the **pairwise teacher**'s (any transformer that scores a result frame, e.g. a trained
  MonoElectra or ``Interpolate(coder)`` fused with BM25's score; its scores are computed once before training and
  cached). ``L_in-batch`` pairs the query's positive with every other passage of the batch against the **in-batch
  teacher**'s scores (a dense model: a DenseEncoder or a fitted Coder, whose embeddings of the training queries and
  passages are computed once, so a batch's teacher scores are a matrix product; ColBERT in the paper).

Both towers are trained (:class:`~pyterrier_coder.bi_encoder_training.BiEncoderTrainer`: documents encoded with
gradients, validation by retrieval over a re-encoded pool, the corpus encoded into a new index after training,
``retriever()``, ``scorer()``, save/load as a Hugging Face directory) on the package's one training loop.
"""
from __future__ import annotations

import dataclasses
import hashlib
import warnings
from typing import List, Optional, Union

import numpy as np
import pandas as pd
import pyterrier as pt
import torch

from . import losses
from .bi_encoder_training import BiEncoderTrainer, DocumentTexts, TrainingQueries, build_training_queries
from .encoders import DenseEncoder
from .sampling import (SAMPLINGS, MarginPairs, TopicSampler, cluster_queries, default_num_clusters, pair_arrays,
                       warn_topped_up)
from .teachers import TeacherCache, dense_teacher_embeddings, encode_queries, frame_key, score_with_teacher
from .training import TrainingConfig, is_number_at_least

#: The paper's optimisation (matchmaker's defaults): Adam at lr 7e-6 without weight decay, constant, 32 queries per
#: batch; the paper kept the best validated model (early stopping). See docs/tasb.md for the budget used on a CPU.
PAPER_DEFAULTS = TrainingConfig(lr=7e-6, optimizer='adamw', weight_decay=0.0, warmup=0, schedule='constant',
                                batch_size=32, grad_clip=1.0, eval_every=500, patience=None,
                                metric='nDCG@10')
#: which teachers supervise: both (the paper's dual supervision), or one of them alone (its Table 2 ablations)
SUPERVISIONS = ('dual', 'pairwise', 'in-batch')


@dataclasses.dataclass
class TasbTrainingData:
    """The training queries that have a (positive, negative) pair, with everything their batches draw on."""
    training: TrainingQueries            #: the usable queries (their documents' ids index ``training.docnos``)
    pairs: MarginPairs                   #: per query, its pairs and their teacher margins (scaled; see fit)
    clusters: Optional[np.ndarray]       #: each query's topic cluster (None for random sampling)
    teacher_queries: Optional[np.ndarray]    #: the in-batch teacher's query embeddings [Q, D] (scaled)
    teacher_docs: Optional[np.ndarray]       #: and passage embeddings [N, D], by document id
    stats: dict

    def __len__(self):
        return len(self.training)

    def fingerprint_parts(self) -> tuple:
        pairs = self.pairs
        return (*self.training.fingerprint_parts(), pairs.offsets, pairs.positives, pairs.negatives, pairs.margins,
                self.clusters, self.teacher_queries, self.teacher_docs)


class TasBalanced(BiEncoderTrainer):
    """TAS-Balanced: trains the query and document encoders on topic-aware, margin-balanced batches with a pairwise
    and an in-batch teacher (Margin-MSE), then encodes the corpus into ``index_path``; afterwards a dense retriever
    (query frame) or reranker (result frame).

    .. code-block:: python

        tasb = TasBalanced(DenseEncoder.minilm(), 'indexes/tasb.flex', corpus=dataset,
                           pairwise_teacher=Interpolate(coder, alpha=0.8),   # fused with BM25's score
                           in_batch_teacher=coder_single_stage,              # a fitted Coder (dense)
                           min_label=2)
        (bm25 % 100 >> tasb).fit(train_topics, train_qrels, dev_topics, dev_qrels)
        tasb.retriever(k=1000)                                   # single-stage retrieval over the re-encoded corpus
        Coder(tasb.dense_index, tasb.encoder)                    # CODER fine-tunes the query encoder further

    Args:
        encoder, index_path: the starting encoder and where the trained document encoder encodes the corpus.
        pairwise_teacher: a transformer scoring result frames (``qid``, ``query``, ``docno``, the text, and the
            preceding stage's columns such as its ``score``), e.g. a trained MonoElectra or ``Interpolate(...)``;
            it scores every training query's positives and negatives once (judged positives the preceding stage
            did not retrieve come with NaN in its columns). Needed unless ``supervision='in-batch'``; there it is
            optional, and when given its margins still decide which pairs ``sampling='tas-balanced'`` draws (as in
            the paper); without it the in-batch teacher's margins do.
        in_batch_teacher: a dense model (DenseEncoder, DenseIndex, fitted Coder/Adore, ...) whose inner products
            score every query of a batch against every passage of it. Needed unless ``supervision='pairwise'``.
        supervision: ``'dual'`` (``L_pair + in_batch_weight * L_in-batch``), ``'pairwise'`` (``L_pair`` alone) or
            ``'in-batch'`` (the in-batch teacher alone, the query's own negative included among its passages).
        in_batch_weight: α of the dual loss (paper: 0.75).
        sampling: ``'tas-balanced'`` (topic clusters and balanced margins), ``'tas'`` (topic clusters, a pair drawn
            uniformly) or ``'random'`` (queries in random order, a pair drawn uniformly).
        num_clusters: k-means clusters of the training queries (default: one per 200 queries, the paper's 2,000
            for 400,000); more clusters than usable training queries is an error.
        clusters_per_batch: n, clusters a batch draws its queries from (paper: 1).
        num_bins: h, margin ranges per query (paper: 10).
        negative_depth: negatives are the preceding stage's top this-many candidates that are not judged relevant.
        pairwise_scale / in_batch_scale: the teachers' scores are multiplied by these before margins are taken
            (Margin-MSE matches margins in the student's units: e.g. 0.1 for a cross-encoder's logits taught to
            a cosine student). ``pairwise_scale='auto'`` puts the pairwise teacher's margins on the in-batch
            teacher's scale: the ratio of the standard deviations of the two teachers' margins over all training
            pairs (recorded as ``history['training_data']['pairwise_scale']``); it needs an ``in_batch_teacher``.
        teacher_cache: a directory where the pairwise teacher's scores are kept, keyed by the teacher's ``repr``
            and the frame it scores: a later fit (another process, a resumed run) with the same teacher and
            training data reads them instead of asking the teacher again. Without it they are kept in memory for
            the next ``fit`` of this object.
        **kwargs: the :class:`~pyterrier_coder.bi_encoder_training.BiEncoderTrainer` arguments (``corpus``,
            ``texts``, ``min_label``, ``lower_labels``, ``train_doc_max_length``, validation, ...) and
            :class:`TrainingConfig` fields (defaults: the paper's, lr 7e-6, 32 queries per batch).
    """

    COMPONENT = 'TasBalanced'
    DEFAULTS = PAPER_DEFAULTS

    @staticmethod
    def _check_values(values: dict, component: str) -> None:
        """The values of this class's own settings (see training.check_settings)."""
        if values['supervision'] not in SUPERVISIONS:
            raise ValueError(f"{component}: supervision must be one of {SUPERVISIONS}, got {values['supervision']!r}")
        if values['sampling'] not in SAMPLINGS:
            raise ValueError(f"{component}: sampling must be one of {SAMPLINGS}, got {values['sampling']!r}")
        for name in ('clusters_per_batch', 'num_bins', 'negative_depth'):
            if not is_number_at_least(values[name], 1) or not float(values[name]).is_integer():
                raise ValueError(f'{component}: {name} must be an integer >= 1, got {values[name]!r}')
        if values['num_clusters'] is not None and (not is_number_at_least(values['num_clusters'], 1) or
                                                    not float(values['num_clusters']).is_integer()):
            raise ValueError(f"{component}: num_clusters must be an integer >= 1 or None, got "
                             f"{values['num_clusters']!r}")
        for name in ('in_batch_weight', 'pairwise_scale', 'in_batch_scale'):
            if not (is_number_at_least(values[name], 0, strict=True) or name == 'pairwise_scale' and values[name] == 'auto'):
                expected = "> 0 or 'auto'" if name == 'pairwise_scale' else '> 0'
                raise ValueError(f'{component}: {name} must be {expected}, got {values[name]!r}')

    def __init__(self, encoder: DenseEncoder, index_path, *, pairwise_teacher: Optional[pt.Transformer] = None,
                 in_batch_teacher=None, supervision: str = 'dual', in_batch_weight: float = 0.75,
                 sampling: str = 'tas-balanced', num_clusters: Optional[int] = None, clusters_per_batch: int = 1,
                 num_bins: int = 10, negative_depth: int = 200, pairwise_scale: Union[float, str] = 1.0,
                 in_batch_scale: float = 1.0, teacher_cache=None, **kwargs):
        TasBalanced._check_values(dict(
            supervision=supervision, sampling=sampling, clusters_per_batch=clusters_per_batch, num_bins=num_bins,
            negative_depth=negative_depth, num_clusters=num_clusters, in_batch_weight=in_batch_weight,
            pairwise_scale=pairwise_scale, in_batch_scale=in_batch_scale), 'TasBalanced')
        if pairwise_teacher is not None and not isinstance(pairwise_teacher, pt.Transformer):
            raise TypeError(f'TasBalanced: pairwise_teacher must be a pt.Transformer that scores result frames, got '
                            f'{type(pairwise_teacher).__name__}')
        super().__init__(encoder, index_path, **kwargs)
        self.pairwise_teacher = pairwise_teacher
        self.in_batch_teacher = in_batch_teacher
        self.supervision = supervision
        self.in_batch_weight = in_batch_weight
        self.sampling = sampling
        self.num_clusters = None if num_clusters is None else int(num_clusters)
        self.clusters_per_batch = int(clusters_per_batch)
        self.num_bins = int(num_bins)
        self.negative_depth = int(negative_depth)
        self.pairwise_scale = pairwise_scale
        self.in_batch_scale = in_batch_scale
        self.teacher_cache = teacher_cache
        self._teacher_scores = TeacherCache(teacher_cache)

    @property
    def uses_pairwise_teacher(self) -> bool:
        return self.supervision in ('dual', 'pairwise')

    @property
    def uses_in_batch_teacher(self) -> bool:
        return self.supervision in ('dual', 'in-batch')

    # --- training data ---------------------------------------------------------------------------------------
    def _candidate_depth(self) -> int:
        return self.negative_depth

    def _training_data(self, frame: pd.DataFrame, qrels: pd.DataFrame, texts: DocumentTexts) -> TasbTrainingData:
        component = f'{self.COMPONENT}.fit'
        if self.uses_pairwise_teacher and self.pairwise_teacher is None:
            raise ValueError(f"{component}: supervision={self.supervision!r} needs a pairwise_teacher")
        if self.uses_in_batch_teacher and self.in_batch_teacher is None:
            raise ValueError(f"{component}: supervision={self.supervision!r} needs an in_batch_teacher")
        data = build_training_queries(frame, qrels, texts, min_label=self.min_label, lower_labels=self.lower_labels,
                                      depth=self.negative_depth, component=self.COMPONENT)
        keep = [i for i in range(len(data)) if len(data.negatives[i])]
        if not keep:
            raise ValueError(f'{component}: no training query has both a judged positive (label >= {self.min_label}) '
                             f'with text and a negative among the top {self.negative_depth} candidates of the '
                             f'preceding stage; check the stage before TasBalanced')
        if len(keep) < len(data):
            warnings.warn(f'{self.COMPONENT}: skipped {len(data) - len(keep)} of {len(data)} training queries without '
                          f'a negative (no candidate among the top {self.negative_depth} that is not judged relevant)')
        data = _select(data, keep)
        stats = dict(data.stats, skipped_no_negative=data.stats['queries_without_negatives'],
                     train_queries=len(data))
        del stats['queries_without_negatives']

        teacher_queries = teacher_docs = None
        if self.uses_in_batch_teacher or self.pairwise_scale == 'auto':
            if self.in_batch_teacher is None:
                raise ValueError(f"{component}: pairwise_scale='auto' matches the pairwise teacher's margins to the "
                                 f"in-batch teacher's: it needs an in_batch_teacher")
            text_of = dict(zip(data.docnos, data.texts))
            teacher_queries, teacher_docs = dense_teacher_embeddings(
                self.in_batch_teacher, data.queries, data.docnos, lambda docnos: [text_of[d] for d in docnos],
                verbose=self.verbose, component=self.COMPONENT)
            teacher_queries = teacher_queries * np.float32(self.in_batch_scale)
        balanced = self.sampling == 'tas-balanced'
        # the paper balances by the static pairwise-teacher margins whatever teaches the loss, so with in-batch
        # supervision a given pairwise teacher still scores the pairs; without one, its in-batch teacher's margins do
        asks_pairwise = self.pairwise_teacher is not None and (self.uses_pairwise_teacher or balanced)
        margins_of = self._pairwise_scores(frame, data) if asks_pairwise else None
        if margins_of is None:
            margins_of = ([np.zeros(len(p)) for p in data.positives], [np.zeros(len(n)) for n in data.negatives])
        query, pos, neg, margin = pair_arrays(data.positives, data.negatives, *margins_of)
        scale = self.pairwise_scale
        if not asks_pairwise:
            scale = 1.0   # these margins only balance the draw: no L_pair
            if balanced:
                margin = dense_margins(query, pos, neg, teacher_queries, teacher_docs)
        if balanced:
            stats['balanced_by'] = 'pairwise teacher' if asks_pairwise else 'in-batch teacher'
        if scale == 'auto':
            scale = stats['pairwise_scale'] = matched_scale(margin, query, pos, neg, teacher_queries, teacher_docs)
        if not self.uses_in_batch_teacher:   # embedded only to find the scale
            teacher_queries = teacher_docs = None
        pairs = MarginPairs.build(query, pos, neg, margin * scale, num_queries=len(data),
                                  num_bins=self.num_bins if self.sampling == 'tas-balanced' else 1,
                                  component=self.COMPONENT)
        stats['pairs'] = pairs.num_pairs
        clusters = None
        if self.sampling != 'random':
            k = self.num_clusters if self.num_clusters is not None else default_num_clusters(len(data))
            embeddings = encode_queries(self.encoder, data.queries, desc=f'{self.COMPONENT}: encoding the training '
                                        f'queries for clustering', verbose=self.verbose)
            clusters = cluster_queries(embeddings, k, seed=self.config.seed, verbose=self.verbose,
                                       component=self.COMPONENT)
            stats['clusters'] = int(clusters.max()) + 1
        self._topics = TopicSampler(clusters, len(data), self.config.batch_size,
                                    clusters_per_batch=self.clusters_per_batch, component=self.COMPONENT)
        if clusters is not None:   # an epoch drawn aside tells how often a cluster is too small for a batch
            self._topics(np.random.default_rng(0))
            stats['batches_mixing_topics'] = self._topics.topped_up
            warn_topped_up(self._topics, -(-len(data) // self.config.batch_size), self.COMPONENT)
        return TasbTrainingData(data, pairs, clusters, teacher_queries, teacher_docs, stats)

    def _pairwise_scores(self, frame: pd.DataFrame, data: TrainingQueries) -> tuple:
        """The pairwise teacher's scores of every training query's positives and negatives, ``(per query the
        positives' scores, per query the negatives' scores)``: from the cache, or asked once and cached."""
        rows = self._teacher_frame(frame, data)
        key = hashlib.sha256(repr(self.pairwise_teacher).encode() + b'\x1f' +
                             frame_key(rows, list(rows.columns)).encode()).hexdigest()
        cached = self._teacher_scores.get('pairwise_teacher', key)
        if cached is not None:
            scores = cached['scores']
        else:
            scores = score_with_teacher(self.pairwise_teacher, rows, verbose=self.verbose, component=self.COMPONENT)
            self._teacher_scores.put('pairwise_teacher', key, {'scores': scores})
        bounds = np.cumsum([0] + [len(p) + len(n) for p, n in zip(data.positives, data.negatives)])
        positive_scores, negative_scores = [], []
        for i, (p, start) in enumerate(zip(data.positives, bounds[:-1])):
            positive_scores.append(scores[start:start + len(p)])
            negative_scores.append(scores[start + len(p):bounds[i + 1]])
        return positive_scores, negative_scores

    def _teacher_frame(self, frame: pd.DataFrame, data: TrainingQueries) -> pd.DataFrame:
        """What the pairwise teacher scores: per training query its positives then its negatives (``qid``,
        ``query``, ``docno``, the text), with the preceding stage's other columns for the documents it retrieved
        (e.g. BM25's ``score``, which a fused teacher interpolates with; NaN for positives it missed)."""
        docs = [np.concatenate([p, n]) for p, n in zip(data.positives, data.negatives)]
        lengths = [len(d) for d in docs]
        ids = np.concatenate(docs)
        docnos = np.asarray(data.docnos, dtype=object)
        rows = pd.DataFrame({'qid': np.repeat(np.asarray(data.qids, dtype=object), lengths),
                             'query': np.repeat(np.asarray(data.queries, dtype=object), lengths),
                             'docno': docnos[ids]})
        extra = [c for c in frame.columns if c not in ('qid', 'query', 'docno', self.text_field)]
        if extra and 'docno' in frame.columns:
            stage = frame[['qid', 'docno', *extra]].drop_duplicates(['qid', 'docno'])
            rows = rows.merge(stage, on=['qid', 'docno'], how='left')   # a left merge keeps the rows' order
        rows[self.text_field] = np.asarray(data.texts, dtype=object)[ids]
        return rows

    # --- batches and loss ----------------------------------------------------------------------------------------
    def _sample_batches(self, epoch: int, rng: np.random.Generator) -> List[np.ndarray]:
        """Batches are ``[B, 2]`` int arrays: a query (by topic) and one of its pairs (by margin range), drawn from
        the loop's generator, so that a resumed run replays them."""
        data = self._data
        batches = self._topics(rng)
        rows = data.pairs.sample(np.concatenate(batches), rng, balanced=self.sampling == 'tas-balanced')
        out, start = [], 0
        for queries in batches:
            out.append(np.stack([queries, rows[start:start + len(queries)]], 1))
            start += len(queries)
        return out

    def _loss(self, batch: np.ndarray) -> torch.Tensor:
        data = self._data
        queries, rows = batch[:, 0], batch[:, 1]
        size = len(batch)
        # the batch's passages once each: a passage two queries brought is one column
        unique, columns = np.unique(np.concatenate([data.pairs.positives[rows], data.pairs.negatives[rows]]),
                                    return_inverse=True)
        positive, negative = columns[:size], columns[size:]
        q = self._encode_training_queries([data.training.queries[i] for i in queries])
        d = self._encode_training_docs([data.training.texts[j] for j in unique])
        scores = self._inner_products(q, d)                 # [B, passages of the batch]
        device = scores.device
        at = torch.arange(size, device=device)
        pos_t, neg_t = torch.from_numpy(positive).to(device), torch.from_numpy(negative).to(device)
        loss = scores.new_zeros(())
        if self.uses_pairwise_teacher:
            margins = torch.from_numpy(data.pairs.margins[rows]).to(device)
            loss = loss + losses.margin_mse(scores[at, pos_t], scores[at, neg_t], margins)
        if self.uses_in_batch_teacher:
            teacher = torch.from_numpy(data.teacher_queries[queries] @ data.teacher_docs[unique].T).to(device)
            mask = torch.ones_like(scores, dtype=torch.bool)
            mask[at, pos_t] = False
            if self.uses_pairwise_teacher:   # dual: the query's own pair is L_pair's
                mask[at, neg_t] = False
            in_batch = losses.in_batch_margin_mse(scores, teacher, pos_t, mask)
            loss = loss + (self.in_batch_weight * in_batch if self.uses_pairwise_teacher else in_batch)
        return loss

    def _training_name(self) -> str:
        return f'TAS-Balanced ({self.sampling}, {self.supervision} supervision)'

    # --- persistence -------------------------------------------------------------------------------------------
    def settings(self) -> dict:
        return super().settings() | dict(
            supervision=self.supervision, in_batch_weight=self.in_batch_weight, sampling=self.sampling,
            num_clusters=self.num_clusters, clusters_per_batch=self.clusters_per_batch, num_bins=self.num_bins,
            negative_depth=self.negative_depth, pairwise_scale=self.pairwise_scale,
            in_batch_scale=self.in_batch_scale)

    def init_arguments(self) -> dict:
        return super().init_arguments() | dict(pairwise_teacher=self.pairwise_teacher,
                                               in_batch_teacher=self.in_batch_teacher,
                                               teacher_cache=self.teacher_cache)

    def _repr_args(self) -> str:
        return f', sampling={self.sampling!r}, supervision={self.supervision!r}'


def dense_margins(query: np.ndarray, positives: np.ndarray, negatives: np.ndarray, teacher_queries: np.ndarray,
                  teacher_docs: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """A dense teacher's margins ``<q, d+> - <q, d->`` of the pairs (one per pair), from its embeddings of the
    training queries and passages."""
    if not len(query):
        return np.empty(0, dtype=np.float32)
    return np.concatenate([np.einsum('ij,ij->i', teacher_queries[query[i:i + chunk]],
                                     teacher_docs[positives[i:i + chunk]] - teacher_docs[negatives[i:i + chunk]])
                           for i in range(0, len(query), chunk)])


def matched_scale(margins: np.ndarray, query: np.ndarray, positives: np.ndarray, negatives: np.ndarray,
                  teacher_queries: np.ndarray, teacher_docs: np.ndarray) -> float:
    """The factor that gives ``margins`` (a pairwise teacher's, one per pair) the standard deviation of the in-batch
    teacher's margins ``<q, d+> - <q, d->`` of the same pairs (1 when the pairwise margins are all equal)."""
    other = dense_margins(query, positives, negatives, teacher_queries, teacher_docs)
    spread = float(np.std(margins))
    return float(np.std(other)) / spread if spread > 0 else 1.0


def _select(data: TrainingQueries, keep: List[int]) -> TrainingQueries:
    """The queries ``keep`` of ``data`` (the document table is kept whole)."""
    pick = lambda values: [values[i] for i in keep]   # noqa: E731
    return dataclasses.replace(data, qids=pick(data.qids), queries=pick(data.queries),
                               positives=pick(data.positives), negatives=pick(data.negatives),
                               excluded=pick(data.excluded), stats=dict(data.stats))
