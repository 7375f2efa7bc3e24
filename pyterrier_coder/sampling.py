"""How TAS-Balanced (Hofstätter et al., SIGIR 2021) composes a training batch.

* **Topic-aware sampling (TAS)**: the training queries are embedded once with the starting encoder and clustered with
  k-means (:func:`cluster_queries`); a batch holds ``batch_size / clusters_per_batch`` queries from each of
  ``clusters_per_batch`` random clusters (:class:`TopicSampler`), so its in-batch negatives are on the same topic.
* **Balanced margin sampling**: a query's (positive, negative) passage pairs are put into ``num_bins`` equal-width
  ranges of their teacher margin, and a pair is drawn from a random non-empty range (:class:`MarginPairs`), so that
  pairs with a small margin (hard) are drawn as often as the many easy ones.

Everything draws from the generator it is given (the training loop's), so a resumed run replays the same batches.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import List, Optional

import numpy as np
import pyterrier as pt

SAMPLINGS = ('random', 'tas', 'tas-balanced')
#: the paper's ratio of training queries to clusters (2,000 clusters for 400,000 MS MARCO queries)
QUERIES_PER_CLUSTER = 200


def default_num_clusters(num_queries: int) -> int:
    """The paper's number of clusters scaled to ``num_queries``: one per :data:`QUERIES_PER_CLUSTER` queries."""
    return max(1, int(round(num_queries / QUERIES_PER_CLUSTER)))


def cluster_queries(embeddings: np.ndarray, num_clusters: int, *, iterations: int = 20, seed: int = 0,
                    verbose: bool = True, component: str = 'TasBalanced') -> np.ndarray:
    """k-means (faiss, L2) of the query ``embeddings [Q, D]`` into ``num_clusters`` clusters; returns each query's
    cluster (0..K-1, clusters left empty at the end are dropped and the rest renumbered). One k-means iteration per
    step of the progress bar. Fewer queries than clusters is an error (k-means cannot make them)."""
    import faiss
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, (int, np.integer)) or num_clusters < 1:
        raise ValueError(f'{component}: num_clusters must be an integer >= 1, got {num_clusters!r}')
    if len(x) < num_clusters:
        raise ValueError(f'{component}: {len(x)} training queries cannot be clustered into num_clusters='
                         f'{num_clusters} topics; use num_clusters <= {len(x)} (None chooses one cluster per '
                         f'{QUERIES_PER_CLUSTER} queries)')
    if num_clusters == 1:
        return np.zeros(len(x), dtype=np.int64)
    centroids = None
    with pt.tqdm(total=iterations, desc=f'{component}: clustering {len(x):,} queries into {num_clusters:,} topics',
                 unit='iteration', disable=not verbose) as progress:
        for _ in range(iterations):
            # one iteration per call, each starting from the last one's centroids: the same k-means as niter=iterations
            # (faiss re-seeds its sampling per call, so every call draws the same subsample, if any)
            kmeans = faiss.Kmeans(x.shape[1], num_clusters, niter=1, seed=seed, verbose=False)
            kmeans.train(x, init_centroids=centroids)
            centroids = kmeans.centroids
            progress.update(1)
    labels = kmeans.index.search(x, 1)[1][:, 0]
    return np.unique(labels, return_inverse=True)[1].astype(np.int64)


class TopicSampler:
    """Batches of training queries (indices) for one epoch (``ceil(Q / batch_size)`` batches).

    ``'random'``: a permutation of the queries cut into batches. ``'tas'`` (and ``'tas-balanced'``, which differs in
    its pairs only): each batch draws ``clusters_per_batch`` distinct clusters uniformly and ``batch_size /
    clusters_per_batch`` queries from each without replacement (the paper's n = 1 fills a batch from one topic).
    A cluster with fewer queries gives all it has and the batch is topped up from a further random cluster, as the
    paper's sampler does; :attr:`topped_up` counts those batches. Queries are drawn with replacement across batches.
    """

    def __init__(self, clusters: Optional[np.ndarray], num_queries: int, batch_size: int, *,
                 clusters_per_batch: int = 1, component: str = 'TasBalanced'):
        self.num_queries = num_queries
        self.batch_size = batch_size
        self.clusters_per_batch = clusters_per_batch
        self.topped_up = 0
        if clusters is None:
            self.members = None
            return
        clusters = np.asarray(clusters)
        if len(clusters) != num_queries:
            raise ValueError(f'{component}: {len(clusters)} cluster labels for {num_queries} queries')
        order = np.argsort(clusters, kind='stable')
        self.members = np.split(order, np.flatnonzero(np.diff(clusters[order])) + 1)
        if clusters_per_batch > len(self.members):
            raise ValueError(f'{component}: clusters_per_batch={clusters_per_batch} is more than the {len(self.members)} '
                             f'topic clusters of the training queries')

    def __call__(self, rng: np.random.Generator) -> List[np.ndarray]:
        self.topped_up = 0   # of this epoch
        n_batches = -(-self.num_queries // self.batch_size)
        if self.members is None:
            order = rng.permutation(self.num_queries)
            return [order[i:i + self.batch_size] for i in range(0, self.num_queries, self.batch_size)]
        return [self._topic_batch(rng) for _ in range(n_batches)]

    def _topic_batch(self, rng: np.random.Generator) -> np.ndarray:
        n = self.clusters_per_batch
        # queries per cluster: batch_size split as evenly as it goes
        shares = np.full(n, self.batch_size // n) + (np.arange(n) < self.batch_size % n)
        chosen = list(rng.choice(len(self.members), size=n, replace=False))
        parts, missing = [], 0
        for cluster, share in zip(chosen, shares):
            members = self.members[cluster]
            take = min(int(share), len(members))
            parts.append(members[rng.choice(len(members), size=take, replace=False)])
            missing += int(share) - take
        if missing:
            self.topped_up += 1
            used = set(int(c) for c in chosen)
            while missing and len(used) < len(self.members):
                # a cluster not yet in this batch; its queries are never in the batch already
                rest = [c for c in range(len(self.members)) if c not in used]
                cluster = rest[int(rng.integers(len(rest)))]
                used.add(cluster)
                members = self.members[cluster]
                take = min(missing, len(members))
                parts.append(members[rng.choice(len(members), size=take, replace=False)])
                missing -= take
        return np.concatenate(parts)


@dataclasses.dataclass
class MarginPairs:
    """Every training query's (positive, negative) pairs with the teacher's margin, grouped by margin range.

    Pairs of query q are rows ``offsets[q]:offsets[q + 1]`` of the flat arrays, sorted by their range (bin); a query's
    non-empty bins are entries ``bin_offsets[q]:bin_offsets[q + 1]`` of ``bin_starts`` / ``bin_counts`` (the rows of
    each bin). ``positives``/``negatives`` are passage numbers of the caller's choosing (e.g. into a list of docnos)."""
    offsets: np.ndarray
    positives: np.ndarray
    negatives: np.ndarray
    margins: np.ndarray
    bins: np.ndarray          #: each pair's margin range (0..num_bins-1) within its query
    bin_offsets: np.ndarray
    bin_starts: np.ndarray
    bin_counts: np.ndarray
    num_bins: int

    def __len__(self):
        return len(self.offsets) - 1

    @property
    def num_pairs(self) -> int:
        return len(self.margins)

    def __repr__(self):
        return f'MarginPairs({len(self)} queries, {self.num_pairs:,} pairs, num_bins={self.num_bins})'

    @classmethod
    def build(cls, query: np.ndarray, positives: np.ndarray, negatives: np.ndarray, margins: np.ndarray, *,
              num_queries: int, num_bins: int = 10, component: str = 'TasBalanced') -> 'MarginPairs':
        """From flat pair arrays (``query`` numbers each pair's query, 0..num_queries-1). Each query's margins are
        split into ``num_bins`` equal-width ranges between its smallest and largest margin (the paper's h = 10): a
        query whose pairs all have one margin has one bin. Every query needs at least one pair."""
        if not (isinstance(num_bins, (int, np.integer)) and not isinstance(num_bins, bool) and num_bins >= 1):
            raise ValueError(f'{component}: num_bins must be an integer >= 1, got {num_bins!r}')
        query = np.asarray(query, dtype=np.int64)
        margins = np.asarray(margins, dtype=np.float32)
        if not np.isfinite(margins).all():
            raise ValueError(f'{component}: {int((~np.isfinite(margins)).sum())} teacher margins are not finite')
        counts = np.bincount(query, minlength=num_queries)
        if (counts == 0).any():
            raise ValueError(f'{component}: {int((counts == 0).sum())} training queries have no (positive, negative) '
                             f'pair')
        lo = np.full(num_queries, np.inf, dtype=np.float64)
        hi = np.full(num_queries, -np.inf, dtype=np.float64)
        np.minimum.at(lo, query, margins)
        np.maximum.at(hi, query, margins)
        width = (hi - lo)[query]
        position = np.where(width > 0, (margins - lo[query]) / np.where(width > 0, width, 1), 0.0)
        bins = np.minimum((position * num_bins).astype(np.int64), num_bins - 1)   # the largest margin: last bin
        order = np.lexsort((bins, query))
        query, bins = query[order], bins[order]
        # runs of equal (query, bin) are the non-empty bins, in order
        key = query * num_bins + bins
        starts = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
        bin_counts = np.diff(np.append(starts, len(key)))
        bin_offsets = np.concatenate([[0], np.cumsum(np.bincount(query[starts], minlength=num_queries))])
        return cls(np.concatenate([[0], np.cumsum(counts)]), np.asarray(positives)[order],
                   np.asarray(negatives)[order], margins[order], bins, bin_offsets, starts, bin_counts, num_bins)

    def sample(self, queries: np.ndarray, rng: np.random.Generator, *, balanced: bool = True) -> np.ndarray:
        """One pair (row) per entry of ``queries``: with ``balanced``, a non-empty margin range of the query drawn
        uniformly, then a pair of it uniformly; else a pair of the query uniformly."""
        queries = np.asarray(queries, dtype=np.int64)
        if not balanced:
            counts = self.offsets[queries + 1] - self.offsets[queries]
            return self.offsets[queries] + rng.integers(0, counts)
        n_bins = self.bin_offsets[queries + 1] - self.bin_offsets[queries]
        chosen = self.bin_offsets[queries] + rng.integers(0, n_bins)
        return self.bin_starts[chosen] + rng.integers(0, self.bin_counts[chosen])


def pair_arrays(positives: List[np.ndarray], negatives: List[np.ndarray], positive_scores: List[np.ndarray],
                negative_scores: List[np.ndarray]) -> tuple:
    """Flat ``(query, positive, negative, margin)`` arrays of every (positive, negative) combination of each query q:
    ``positives[q]``/``negatives[q]`` are passage numbers and ``positive_scores[q]``/``negative_scores[q]`` the
    teacher's scores of those passages for q; a pair's margin is score(positive) - score(negative). Queries without a
    positive or without a negative have no pair."""
    parts = [], [], [], []
    for q, (pos, neg, sp, sn) in enumerate(zip(positives, negatives, positive_scores, negative_scores)):
        pos, neg = np.asarray(pos, dtype=np.int64), np.asarray(neg, dtype=np.int64)
        if not len(pos) or not len(neg):
            continue
        sp, sn = np.asarray(sp, dtype=np.float64), np.asarray(sn, dtype=np.float64)
        parts[0].append(np.full(len(pos) * len(neg), q, dtype=np.int64))
        parts[1].append(np.repeat(pos, len(neg)))
        parts[2].append(np.tile(neg, len(pos)))
        parts[3].append((sp[:, None] - sn[None, :]).reshape(-1))
    if not parts[0]:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    return (*(np.concatenate(part) for part in parts[:3]), np.concatenate(parts[3]).astype(np.float32))


def warn_topped_up(sampler: TopicSampler, batches: int, component: str) -> None:
    if sampler.topped_up:
        warnings.warn(f'{component}: {sampler.topped_up} of {batches} batches mixed topics: their cluster had fewer '
                      f'queries than batch_size / clusters_per_batch (use fewer, larger clusters: num_clusters)')
