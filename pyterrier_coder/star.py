"""STAR (Zhan et al., SIGIR 2021, "Optimizing Dense Retrieval Model Training with Hard Negatives"): Stable Training
Algorithm for dense Retrieval.

Both towers of the bi-encoder are trained (one shared encoder by default). Each training query's judged positive is
scored against

* **static hard negatives**: documents retrieved once, before training, by the stage that precedes STAR in the
  pipeline it is fitted in (``(bm25 % 200 >> star).fit(...)``; plain topics: the starting encoder's own index), and
  never refreshed; each step draws ``negatives_per_query`` of each query's top ``hard_negative_depth``
  candidates that are not judged relevant;
* **random in-batch negatives**: the documents of the other queries of the batch -- their positives and, as in the
  authors' code, their hard negatives (``share_hard_negatives=False``: their positives only) --

where no document judged relevant to a query is ever its negative. The paper's loss scores every (positive,
negative) pair with a pairwise logistic (RankNet) loss averaged over all pairs of the batch
(:func:`~pyterrier_coder.losses.in_batch_pairwise_logistic`); ``loss='softmax'`` is the listwise alternative on the
same documents (:func:`~pyterrier_coder.losses.in_batch_softmax`). The random negatives stabilise training; the hard
negatives make it optimise the top of the ranking.
"""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import pandas as pd
import torch

from . import losses
from .bi_encoder_training import BiEncoderTrainer, DocumentTexts, TrainingQueries, build_training_queries
from .encoders import DenseEncoder
from .training import TrainingConfig, is_number_at_least

#: Defaults for AdamW (the paper's LAMB at lr 1e-4 is not among the loop's optimisers); see docs/star.md for the
#: paper's MS MARCO settings and the budget measured on a CPU.
STAR_DEFAULTS = TrainingConfig(lr=2e-5, optimizer='adamw', weight_decay=0.01, warmup=0.1, schedule='linear',
                               batch_size=32, grad_clip=1.0, eval_every=100, patience=None,
                               metric='nDCG@10')
LOSSES = ('pairwise', 'softmax')
_LOSS_FUNCTIONS = {'pairwise': losses.in_batch_pairwise_logistic, 'softmax': losses.in_batch_softmax}


def negative_mask(documents: np.ndarray, excluded: list, *, hard_negatives: bool, random_negatives: bool,
                  share_hard_negatives: bool = True) -> tuple:
    """Which documents of a batch are negatives for which query.

    ``documents [B, 1 + h]``: per query of the batch, its positive then its ``h`` hard negatives, as document ids
    (-1 = none); ``excluded``: per query, the sorted ids never to be its negatives (the documents judged relevant to
    it). Returns ``(unique ids [N], the column of each query's positive [B], negatives [B, N] bool)``: a query's own
    hard negatives (``hard_negatives``) and the documents the other queries of the batch brought
    (``random_negatives``: their positives, and their hard negatives if ``share_hard_negatives``), except its positive
    and the documents excluded for it."""
    present = documents >= 0
    unique, inverse = np.unique(documents[present], return_inverse=True)
    columns = np.full(documents.shape, -1, dtype=np.int64)
    columns[present] = inverse
    rows = np.arange(len(documents))
    brought = np.zeros((len(documents), len(unique)), dtype=bool)
    r, c = np.nonzero(present)
    brought[r, columns[r, c]] = True
    negatives = np.zeros_like(brought)
    if hard_negatives:
        r, c = np.nonzero(present[:, 1:])
        negatives[r, columns[:, 1:][r, c]] = True
    if random_negatives:
        if not share_hard_negatives:
            brought = np.zeros_like(brought)
            brought[rows, columns[:, 0]] = True
        negatives |= (brought.sum(0, keepdims=True) - brought) > 0
    for i, judged in enumerate(excluded):
        if len(judged):
            negatives[i, np.isin(unique, judged, assume_unique=True)] = False
    negatives[rows, columns[:, 0]] = False
    return unique, columns[:, 0], negatives


class Star(BiEncoderTrainer):
    """STAR: trains the query and document encoders with static hard negatives and random in-batch negatives, then
    encodes the corpus into ``index_path``; afterwards a dense retriever (query frame) or reranker (result frame).

    .. code-block:: python

        star = Star(DenseEncoder.minilm(), 'indexes/star.flex', corpus=dataset, min_label=2)
        (bm25 % 200 >> star).fit(train_topics, train_qrels, dev_topics, dev_qrels)
        star.retriever(k=1000)                         # single-stage retrieval over the re-encoded corpus
        Adore(star.dense_index, star.encoder)          # ADORE+STAR: the query encoder trained further

    Args:
        encoder, index_path: the starting encoder and where the trained document encoder encodes the corpus.
        hard_negatives: use the static hard negatives (False: the paper's "random negatives only" ablation).
        random_negatives: use the other queries' documents as negatives (False: "hard negatives only").
        share_hard_negatives: the other queries' documents include their hard negatives, as in the authors' code
            (False: their positives only).
        negatives_per_query: hard negatives drawn per query and step (paper: 1).
        hard_negative_depth: they are drawn from the preceding stage's top this-many candidates (paper: 200).
        loss: ``'pairwise'`` (the paper's RankNet over all pairs) or ``'softmax'`` (listwise cross-entropy).
        temperature: scores are divided by it in the loss (default 0.05 for L2-normalised encoders, else 1).
        min_label, lower_labels: which judged documents are positives, and whether lower grades may be negatives.
        **kwargs: the :class:`~pyterrier_coder.bi_encoder_training.BiEncoderTrainer` arguments (``corpus``,
            ``texts``, ``separate_towers``, ``train_doc_max_length``, ``gradient_checkpointing``, validation,
            ...) and :class:`TrainingConfig` fields (defaults: AdamW, lr 2e-5, 32 queries per step).
    """

    COMPONENT = 'Star'
    DEFAULTS = STAR_DEFAULTS

    @staticmethod
    def _check_values(values: dict, component: str) -> None:
        """The values of this class's own settings (see training.check_settings)."""
        if values['loss'] not in LOSSES:
            raise ValueError(f"{component}: loss must be one of {LOSSES}, got {values['loss']!r}")
        if not (values['hard_negatives'] or values['random_negatives']):
            raise ValueError(f'{component}: hard_negatives and random_negatives are both off: no negatives to '
                             f'train with')
        for name in ('negatives_per_query', 'hard_negative_depth'):
            if not is_number_at_least(values[name], 1):
                raise ValueError(f'{component}: {name} must be >= 1, got {values[name]!r}')
        if values['temperature'] is not None and not is_number_at_least(values['temperature'], 0, strict=True):
            raise ValueError(f"{component}: temperature must be > 0 or None, got {values['temperature']!r}")

    def __init__(self, encoder: DenseEncoder, index_path, *, hard_negatives: bool = True,
                 random_negatives: bool = True, share_hard_negatives: bool = True, negatives_per_query: int = 1,
                 hard_negative_depth: int = 200, loss: str = 'pairwise', temperature: Optional[float] = None,
                 **kwargs):
        Star._check_values(dict(loss=loss, hard_negatives=hard_negatives, random_negatives=random_negatives,
                                negatives_per_query=negatives_per_query, hard_negative_depth=hard_negative_depth,
                                temperature=temperature), 'Star')
        super().__init__(encoder, index_path, **kwargs)
        self.hard_negatives = hard_negatives
        self.random_negatives = random_negatives
        self.share_hard_negatives = share_hard_negatives
        self.negatives_per_query = negatives_per_query
        self.hard_negative_depth = hard_negative_depth
        self.loss = loss
        self.temperature = temperature if temperature is not None else (0.05 if encoder.normalize else 1.0)

    # --- training data ---------------------------------------------------------------------------------------
    def _needs_candidates(self) -> bool:
        return self.hard_negatives

    def _candidate_depth(self) -> int:
        return self.hard_negative_depth

    def _training_data(self, frame: pd.DataFrame, qrels: pd.DataFrame, texts: DocumentTexts) -> TrainingQueries:
        if not self.hard_negatives:
            frame = frame.drop(columns=['docno'], errors='ignore').drop_duplicates('qid')
        data = build_training_queries(frame, qrels, texts, min_label=self.min_label, lower_labels=self.lower_labels,
                                      depth=self.hard_negative_depth, component=self.COMPONENT)
        if not len(data):
            raise ValueError(f'Star.fit: no training query has a judged positive (label >= {self.min_label}) with '
                             f'text (from the corpus, texts= or the first stage\'s text column)')
        without = data.stats['queries_without_negatives']
        if self.hard_negatives and without == len(data):
            raise ValueError('Star.fit: the hard-negative source gave no candidates that are not judged relevant for '
                             'any training query; check the stage before Star (or pass hard_negatives=False for '
                             'in-batch negatives only)')
        if self.hard_negatives and without:
            warnings.warn(f'Star: {without} of {len(data)} training queries have no hard negative among their '
                          f'candidates; they train with in-batch negatives only')
        return data

    def _sample_batches(self, epoch: int, rng: np.random.Generator) -> list:
        """Batches are ``[B, 2 + h]`` int arrays: the query, its positive (one of its judged positives, drawn each
        epoch), then ``h = negatives_per_query`` of its hard negatives drawn without replacement (-1 when it has
        fewer). Drawn from the loop's generator, so that a resumed run replays them."""
        data = self._data
        width = self.negatives_per_query if self.hard_negatives else 0
        rows = np.full((len(data), 2 + width), -1, dtype=np.int64)
        for row, i in enumerate(rng.permutation(len(data))):
            rows[row, 0] = i
            rows[row, 1] = data.positives[i][rng.integers(len(data.positives[i]))]
            pool = data.negatives[i]
            if width and len(pool):
                drawn = pool[rng.choice(len(pool), size=min(width, len(pool)), replace=False)]
                rows[row, 2:2 + len(drawn)] = drawn
        bs = self.config.batch_size
        return [rows[start:start + bs] for start in range(0, len(rows), bs)]

    def _loss(self, batch: np.ndarray) -> torch.Tensor:
        data = self._data
        queries = batch[:, 0]
        unique, positives, negatives = negative_mask(
            batch[:, 1:], [data.excluded[i] for i in queries], hard_negatives=self.hard_negatives,
            random_negatives=self.random_negatives, share_hard_negatives=self.share_hard_negatives)
        q = self._encode_training_queries([data.queries[i] for i in queries])
        d = self._encode_training_docs([data.texts[j] for j in unique])
        scores = self._inner_products(q, d) / self.temperature
        device = scores.device
        return _LOSS_FUNCTIONS[self.loss](scores, torch.from_numpy(positives).to(device),
                                          torch.from_numpy(negatives).to(device))

    def _training_name(self) -> str:
        kind = ('hard + in-batch negatives' if self.hard_negatives and self.random_negatives else
                'hard negatives only' if self.hard_negatives else 'in-batch negatives only')
        return f'STAR ({kind}, {self.loss})'

    # --- persistence -------------------------------------------------------------------------------------------
    def settings(self) -> dict:
        return super().settings() | dict(hard_negatives=self.hard_negatives, random_negatives=self.random_negatives,
                                         share_hard_negatives=self.share_hard_negatives,
                                         negatives_per_query=self.negatives_per_query,
                                         hard_negative_depth=self.hard_negative_depth, loss=self.loss,
                                         temperature=self.temperature)

    def _repr_args(self) -> str:
        ablation = ('' if self.hard_negatives and self.random_negatives else
                    ', random_negatives=False' if self.hard_negatives else ', hard_negatives=False')
        shared = '' if self.share_hard_negatives else ', share_hard_negatives=False'
        return f', loss={self.loss!r}{ablation}{shared}'
