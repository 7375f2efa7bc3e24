"""Interpolating a reranker's score with the score of the stage before it.

A reranker trained on little data (or from a weak initialisation) often ranks differently from the first stage
without ranking better on its own; a per-query weighted sum of the two normalised scores then beats both, as
widely reported for BERT rerankers and dense retrievers over BM25. PyTerrier's ``a + b`` adds raw scores, whose
scales differ by orders of magnitude between BM25 and a cross-encoder, and runs the first stage twice; this
transformer reuses the scores the reranker receives and normalises both per query."""
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import pyterrier as pt

from .evaluation import evaluate
from .validation import validate_columns


COMPONENT = 'Interpolate'
NORMALISATIONS = ('minmax', 'zscore')
#: the weights tried by :meth:`Interpolate.tune` (0 = the first stage alone, 1 = the reranker alone)
DEFAULT_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


def normalise_per_query(qids: pd.Series, scores: pd.Series, how: str) -> np.ndarray:
    """``minmax``: (s - min) / (max - min) per query; ``zscore``: (s - mean) / std per query. A query whose scores
    are all equal (or that has a single row) gets 0 for all of them, so it keeps the other score's order."""
    groups = scores.groupby(qids.to_numpy(), sort=False)
    if how == 'minmax':
        low, spread = groups.transform('min'), groups.transform('max') - groups.transform('min')
    else:
        low, spread = groups.transform('mean'), groups.transform('std', ddof=0)
    spread = spread.where(spread > 0)   # NaN where constant: (s - low) / NaN -> NaN -> 0 below
    return ((scores - low) / spread).fillna(0.0).to_numpy(dtype=np.float64)


class Interpolate(pt.Estimator):
    """``first_stage >> Interpolate(reranker, alpha)`` reranks with ``reranker`` and scores each document by
    ``alpha * norm(reranker score) + (1 - alpha) * norm(incoming score)``, both normalised per query.

    With ``alpha=None`` the weight is chosen on validation data: :meth:`fit` trains the reranker (when it is a
    ``pt.Estimator`` and ``fit_reranker``) and then calls :meth:`tune` on the validation candidates, which scores
    them once and keeps the weight of ``alphas`` with the best ``metric`` (ties: the larger weight, i.e. more of
    the reranker). ``tune`` can also be called directly on a reranker that is already trained.

    Input: a result frame with the incoming ``score`` (and whatever columns the reranker needs, e.g. ``text``);
    output: the same rows with the interpolated ``score`` and its ``rank``.
    """

    def __init__(self, reranker: pt.Transformer, alpha: Optional[float] = None, *, normalise: str = 'minmax',
                 alphas: Sequence[float] = DEFAULT_ALPHAS, metric: str = 'nDCG@10', fit_reranker: bool = True):
        if normalise not in NORMALISATIONS:
            raise ValueError(f'{COMPONENT}: normalise must be one of {NORMALISATIONS}, not {normalise!r}')
        for a in ([alpha] if alpha is not None else []) + list(alphas):
            if not 0.0 <= float(a) <= 1.0:
                raise ValueError(f'{COMPONENT}: weights must be in [0, 1], got {a}')
        if not len(alphas):
            raise ValueError(f'{COMPONENT}: alphas must not be empty')
        self.reranker = reranker
        self.alpha = None if alpha is None else float(alpha)
        self.tunes_alpha = alpha is None   # a given weight is kept; a chosen one is chosen again by every fit
        self.normalise = normalise
        self.alphas = tuple(float(a) for a in alphas)
        self.metric = metric
        self.fit_reranker = fit_reranker
        #: ``{'metric': ..., 'by_alpha': [[alpha, value], ...], 'alpha': best}`` after :meth:`tune`
        self.history: Optional[dict] = None

    def _check_input(self, inp: pd.DataFrame, what: str = 'input frame') -> None:
        with validate_columns(inp, COMPONENT, what, hint='it interpolates with the score of the stage before it'
                              ) as v:
            v.result_frame(extra_columns=['query', 'score'])

    def _pairs(self, inp: pd.DataFrame, out: pd.DataFrame) -> tuple:
        """``(out, reranker, incoming)``: the reranker's output ``out`` on ``inp``, and per row of it the reranker's
        and the incoming score of its (qid, docno), each normalised per query. The rows are those the reranker
        returns (it may drop some, e.g. duplicates or documents it cannot score)."""
        if 'score' not in out.columns:
            raise KeyError(f'{COMPONENT}: the reranker {self.reranker!r} returned no score column')
        out = out.reset_index(drop=True)
        # joined on strings: the package's rerankers return str qid/docno whatever the input's types
        incoming = pd.DataFrame({'qid': inp['qid'].astype(str), 'docno': inp['docno'].astype(str),
                                 '_first_score': inp['score'].to_numpy()}).drop_duplicates(['qid', 'docno'])
        keys = pd.DataFrame({'qid': out['qid'].astype(str), 'docno': out['docno'].astype(str)})
        first = keys.merge(incoming, on=['qid', 'docno'], how='left')['_first_score']
        # a document the first stage did not send (some rerankers add rows) gets the query's lowest score
        low = first.groupby(out['qid'].to_numpy(), sort=False).transform('min')
        first = first.fillna(low).fillna(0.0)
        return (out, normalise_per_query(out['qid'], out['score'], self.normalise),
                normalise_per_query(out['qid'], first, self.normalise))

    def _check_ready(self, inp: pd.DataFrame) -> None:
        self._check_input(inp)
        # an empty frame needs no weight: pt.inspect and pt.Experiment's validation run stages on one
        if self.alpha is None and len(inp):
            raise RuntimeError(f'{COMPONENT}: no weight yet: pass alpha=..., or choose it on validation data with '
                               f'fit(train, train_qrels, valid, valid_qrels) or tune(valid, valid_qrels)')

    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        """Reranks a result frame (``qid``, ``query``, ``docno``, ``score`` and whatever the reranker needs) and
        ranks by the interpolated score."""
        self._check_ready(inp)   # before the reranker runs, which may take long
        return self.combine(inp, self.reranker(inp) if len(inp) else inp)   # an empty frame is not reranked

    def combine(self, inp: pd.DataFrame, reranked: pd.DataFrame) -> pd.DataFrame:
        """What :meth:`transform` returns for ``inp``, given the reranker's output on it, ``reranked`` (for
        example its saved run on the same candidates), so that the reranker does not score them a second time.
        ``reranked`` needs ``qid``, ``docno`` and ``score``; its rows are the rows of the result."""
        self._check_ready(inp)
        if not len(inp):
            return inp.assign(score=pd.Series(dtype='float64'), rank=pd.Series(dtype='int64'))
        out, reranker, incoming = self._pairs(inp, reranked)
        out = out.assign(score=self.alpha * reranker + (1.0 - self.alpha) * incoming)
        return pt.model.add_ranks(out).sort_values(['qid', 'rank'], kind='stable').reset_index(drop=True)

    def tune(self, valid: pd.DataFrame, valid_qrels: pd.DataFrame) -> float:
        """Scores the validation candidates ``valid`` (the results of the preceding stage on validation topics)
        with the reranker once, and sets ``alpha`` to the weight of ``alphas`` with the best mean ``metric`` over
        the validation topics that have qrels. Returns it; ``history`` keeps the metric of every weight."""
        self._check_input(valid, 'validation frame')
        qids = set(valid['qid'].astype(str)) & set(valid_qrels['qid'].astype(str))
        if not qids:
            raise ValueError(f'{COMPONENT}: none of the validation topics has qrels, so no weight can be chosen')
        out, reranker, incoming = self._pairs(valid, self.reranker(valid))
        run = out[['qid', 'docno']]   # the metric needs the scores only: nothing is ranked or sorted per weight
        by_alpha = [[a, evaluate(run.assign(score=a * reranker + (1.0 - a) * incoming), valid_qrels, self.metric,
                                 qids)] for a in self.alphas]
        best = max(by_alpha, key=lambda av: (av[1], av[0]))
        self.alpha = best[0]
        self.history = {'metric': self.metric, 'by_alpha': by_alpha, 'alpha': self.alpha,
                        'validation_queries': len(qids)}
        return self.alpha

    def fit(self, train: pd.DataFrame, train_qrels: pd.DataFrame, valid: Optional[pd.DataFrame] = None,
            valid_qrels: Optional[pd.DataFrame] = None):
        """Trains the reranker on ``train`` (when it is an estimator and ``fit_reranker``), then, if no ``alpha``
        was given to the constructor, chooses it on ``valid`` with :meth:`tune`."""
        if self.tunes_alpha and (valid is None or valid_qrels is None):
            raise ValueError(f'{COMPONENT}: choosing the weight needs validation data: fit(train, train_qrels, '
                             f'valid, valid_qrels), or pass alpha=...')
        if self.fit_reranker and isinstance(self.reranker, pt.Estimator):
            self.reranker.fit(train, train_qrels, valid, valid_qrels)
        if self.tunes_alpha:
            self.tune(valid, valid_qrels)
        return self

    def __repr__(self):
        alpha = 'alpha not chosen' if self.alpha is None else f'alpha={self.alpha:g}'
        return f'{COMPONENT}({self.reranker!r}, {alpha}, normalise={self.normalise!r})'
