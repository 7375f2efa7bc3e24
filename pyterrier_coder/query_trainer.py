"""What CODER and ADORE have in common: a trainable copy of a dense query encoder scored against the fixed,
memory-mapped document embeddings of a FlexIndex.

:class:`DenseQueryTrainer` is the PyTerrier face of both: on a result frame it re-ranks (``first_stage >> it``),
on a query frame it retrieves from the whole index (single-stage), ``retriever(k)`` and ``query_encoder()`` plug
the fine-tuned encoder into pyterrier-dr pipelines, and ``save``/``load`` round-trip it. Subclasses add their
training objective; validation, scoring and persistence live here once.
"""
from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pyterrier as pt
import pyterrier_dr
import torch
from torch import nn

from .artifacts import (atomic_write_text, is_plain_model_directory, read_component_config, saving,
                        write_component_config)
from .corpora import describe_corpus
from .devices import infer_device
from .embeddings import EmbeddingStore, GatherPrefetcher
from .encoders import (DenseEncoder, DenseIndex, check_dimensions, flex_problem, index_record, plain_directory_encoder,
                       same_encoder)
from .evaluation import evaluate
from .frames import group_order, normalisation_plan, normalise_frame, normalise_qrels, pad_groups
from .hub import HubMixin
from .inspection import InspectableSettings
from .training import TrainingConfig, TrainingLoop, fingerprint, split_training_kwargs
from .validation import validate_columns, validation_data


VALIDATE_WITH = ('rerank', 'retrieve')


def as_flex_index(index, component: str) -> pyterrier_dr.FlexIndex:
    """The built FlexIndex of a DenseIndex, a FlexIndex, a path, or a trainer that encoded its corpus into one (its
    ``dense_index``, e.g. a fitted :class:`~pyterrier_coder.Star`) (else FileNotFoundError saying how to build it)."""
    index = getattr(index, 'dense_index', index)
    if isinstance(index, DenseIndex):
        flex = index.flex
    elif isinstance(index, pyterrier_dr.FlexIndex):
        flex = index
    else:
        flex = pyterrier_dr.FlexIndex(str(index), verbose=False)
    problem = flex_problem(flex)
    if problem == 'not built':
        raise FileNotFoundError(f'{component}: no dense index at {str(flex.index_path)!r}; build it first with '
                                f'DenseIndex(encoder, path).index(corpus_iter)')
    if problem is not None:
        raise ValueError(f'{component}: the dense index at {str(flex.index_path)!r} cannot be used: {problem}; rebuild '
                         f'it with DenseIndex(encoder, path).index(corpus_iter, overwrite=True)')
    return flex


def ranked(frame: pd.DataFrame, rows: np.ndarray, codes: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """The rows ``rows`` of ``frame`` with their new ``scores`` (in place of the old column) and ``rank`` (last
    column), sorted by (qid, rank): the frame of ``pt.model.add_ranks(frame.iloc[rows]).sort_values(['qid',
    'rank'], kind='stable')``, moving the rows once. ``codes`` number the qids of ``rows`` in sorted order; ties
    keep the order of ``rows`` (``rank(method='first')``)."""
    if np.isnan(scores).any():     # pyterrier's own ranking decides what NaN scores do
        frame = frame.iloc[rows].drop(columns=['rank'], errors='ignore').assign(score=scores)
        return pt.model.add_ranks(frame).sort_values(['qid', 'rank'], kind='stable').reset_index(drop=True)
    final = group_order(codes, -scores)
    starts = np.concatenate([[0], np.cumsum(np.bincount(codes))[:-1]])
    frame = frame.iloc[rows[final]].drop(columns=['rank'], errors='ignore').reset_index(drop=True)
    frame['score'] = scores[final]
    frame['rank'] = np.arange(len(final), dtype=np.int64) - starts[codes[final]]
    return frame


class DenseQueryTrainer(HubMixin, InspectableSettings, pt.Estimator):
    """Base class of :class:`~pyterrier_coder.Coder` and :class:`~pyterrier_coder.Adore` (not used directly): a
    trainable copy of a query encoder scored against the fixed document embeddings of an index.

    Args:
        index: the document index (a FlexIndex, a :class:`DenseIndex` or its path, or a trainer with a
            ``dense_index``); never modified.
        encoder: the query encoder to start from (a :class:`DenseEncoder`, or a pyterrier-dr bi-encoder such as
            ``TasB``); a copy is trained.
        num_results: documents retrieved for a query frame.
        validate_with: ``'rerank'`` the preceding stage's validation candidates or ``'retrieve'`` from the index.
        on_missing: ``'error'`` or ``'drop'`` (warned) for docnos absent from the index.
        inference_batch_size: queries encoded together at inference.
        prefetch: gather the next training batch's candidate embeddings in a background thread.
        verbose: progress bars.
        **training: :class:`~pyterrier_coder.TrainingConfig` fields.
    """

    COMPONENT = 'DenseQueryTrainer'
    DEFAULTS = TrainingConfig()
    #: settings added after models were first saved, with the value that reproduces how a model saved without them
    #: was trained (their default for new models may differ): ``load`` fills them in
    SETTINGS_OF_OLDER_SAVES: dict = {}

    @staticmethod
    def _check_values(values: dict, component: str) -> None:
        """The values of this class's own settings (see training.check_settings)."""
        if values['validate_with'] not in VALIDATE_WITH:
            raise ValueError(f"{component}: validate_with must be one of {VALIDATE_WITH}, "
                             f"got {values['validate_with']!r}")
        if values['on_missing'] not in ('error', 'drop'):
            raise ValueError(f"{component}: on_missing must be 'error' or 'drop', got {values['on_missing']!r}")

    def __init__(self, index, encoder: DenseEncoder, *, num_results: int = 1000, validate_with: str = 'rerank',
                 on_missing: str = 'error', inference_batch_size: int = 64, prefetch: bool = True,
                 verbose: bool = True, **training):
        DenseQueryTrainer._check_values(dict(validate_with=validate_with, on_missing=on_missing), self.COMPONENT)
        if not isinstance(encoder, DenseEncoder):      # e.g. pyterrier-dr's TasB or HgfBiEncoder: the same encoding
            if not isinstance(encoder, pyterrier_dr.BiEncoder):
                raise TypeError(f'{self.COMPONENT}: encoder must be a pyterrier_coder.DenseEncoder or a pyterrier-dr '
                                f'BiEncoder, got {type(encoder).__name__}')
            encoder = DenseEncoder.from_bi_encoder(encoder)
        self.flex = as_flex_index(index, self.COMPONENT)
        self.store = EmbeddingStore(self.flex)
        check_dimensions(encoder, self.store.dim, self.flex, self.COMPONENT)
        self.encoder = encoder.clone()
        self.num_results = num_results
        self.validate_with = validate_with
        self.on_missing = on_missing
        self.inference_batch_size = inference_batch_size
        self.prefetch = prefetch
        self._prefetcher = None
        self.verbose = verbose
        self.config = split_training_kwargs(self.DEFAULTS.replace(verbose=verbose), training, self.COMPONENT)
        self.history = None
        self.fitted = False

    # --- scoring (subclasses may override _scores and trainable_module) ---------------------------------------
    def trainable_module(self) -> nn.Module:
        """The module whose parameters the training loop optimises (by default the query encoder)."""
        return self.encoder.trainable_module()

    def _scores(self, queries, ids: np.ndarray, mask: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, L]`` of each query against its candidate rows (-1 = padding). The one function used for
        training, validation and inference, so they cannot disagree."""
        q = self.encoder.encode_queries_torch(list(queries), batch_size=len(queries))
        return self._dot_candidates(q, ids)

    #: on CPU, candidates are gathered and multiplied a few queries at a time, so that the gathered rows are still
    #: in cache for the product: about this many bytes of embeddings per block (measured 2x faster than gathering
    #: [64, 1000, 384] at once; the same arithmetic per query, so identical scores). One block on GPUs.
    CPU_SCORE_BLOCK_BYTES = 4 * 1024 ** 2

    def _dot_candidates(self, q: torch.Tensor, ids: np.ndarray) -> torch.Tensor:
        """Inner products ``[B, L]`` of the query embeddings ``q`` with their candidates' embeddings, in fp32 even
        under autocast (which would run the product in bf16: ties among a thousand close scores, and training
        scores that differ from the fp32 ones of validation and inference); the encoder itself still runs in AMP."""
        per_query = max(1, ids.shape[1] * self.store.dim * 4)
        block = len(ids) if q.device.type != 'cpu' else max(1, self.CPU_SCORE_BLOCK_BYTES // per_query)
        docs = self._prefetched(ids)
        q = q.float()
        with torch.autocast(q.device.type, enabled=False):
            parts = [torch.einsum('bd,bld->bl', q[start:start + block], (
                docs[start:start + block] if docs is not None else self.store.gather(ids[start:start + block])
            ).to(q.device, non_blocking=True).float()) for start in range(0, len(ids), block)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _prefetched(self, ids: np.ndarray) -> Optional[torch.Tensor]:
        """The embeddings of ``ids`` gathered in the background during training, if they were requested."""
        return self._prefetcher.take(ids) if self._prefetcher is not None else None

    def _candidate_embeddings(self, ids: np.ndarray) -> torch.Tensor:
        """``[B, L, D]`` embeddings of the candidate rows ``ids`` on the encoder's device (prefetched or read now)."""
        docs = self._prefetched(ids)
        if docs is None:
            return self.store.gather(ids, device=self.encoder.device)
        return docs.to(self.encoder.device, non_blocking=True)

    @contextmanager
    def _inference(self):
        """Inference runs in eval mode (no dropout). The models are in eval mode whenever no training step runs (the
        training loop leaves them so), and the mode is never switched back afterwards: transforms running in several
        threads at once must not see each other's mode changes."""
        self.trainable_module().eval()
        with torch.inference_mode():
            yield

    def _rerank_arrays(self, queries, ids: np.ndarray) -> np.ndarray:
        """Inference scores for padded id rows, in chunks of queries."""
        out = np.zeros(ids.shape, dtype=np.float32)
        bs = self.inference_batch_size
        with self._inference():
            for start in range(0, len(queries), bs):
                chunk = ids[start:start + bs]
                mask = torch.from_numpy(chunk >= 0).to(self.encoder.device)
                out[start:start + bs] = self._scores(queries[start:start + bs], chunk, mask).float().cpu().numpy()
        return out

    def _retrieve_ids(self, queries, k: int) -> np.ndarray:
        """Top-k row ids for ``queries`` with the current query encoder (exact search over the fixed index)."""
        out = []
        bs = self.inference_batch_size
        with self._inference():
            for start in range(0, len(queries), bs):
                q = self.encoder.encode_queries_torch(list(queries[start:start + bs]))
                out.append(self.store.search(q, k)[1].cpu().numpy())
        return np.concatenate(out) if out else np.empty((0, k), dtype=np.int64)

    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        """A result frame (``qid``, ``query``, ``docno``) is re-ranked; a query frame (``qid``, ``query``) gets
        single-stage retrieval of ``num_results`` documents from the index."""
        with validate_columns(inp, self.COMPONENT) as v:
            v.result_frame(extra_columns=['query'], mode='rerank')
            v.query_frame(extra_columns=['query'], mode='retrieve')
        if v.mode == 'retrieve':
            return self.retriever(self.num_results)(normalise_frame(inp, self.COMPONENT))
        if not len(inp):
            return inp.assign(score=pd.Series(dtype='float64'), rank=pd.Series(dtype='int64'))
        frame, rows, codes, (padded, order, positions) = self._candidate_groups(inp, warn=True)
        queries = frame['query'].values[rows[order[positions == 0]]].tolist()
        scores = np.empty(len(rows), dtype=np.float32)
        scores[order] = self._rerank_arrays(queries, padded)[codes[order], positions]
        return ranked(frame, rows, codes, scores.astype(np.float64))

    def _candidate_groups(self, inp: pd.DataFrame, *, warn: bool) -> tuple:
        """``normalisation_plan(inp)`` -- the converted frame, the positions of its rows in normalised order, their qid
        codes -- without the rows whose docno is absent from the index (an error, or dropped with a warning
        when ``warn``), and ``pad_groups`` of those rows' ids per qid. Docnos and qids are each hashed once."""
        row_ids = self.store.ids(inp['docno'], component=self.COMPONENT, on_missing=self.on_missing)
        frame, rows, codes = normalisation_plan(inp, self.COMPONENT, row_ids=row_ids)
        ids = row_ids[rows]
        if (ids < 0).any():
            if warn:
                warnings.warn(f'{self.COMPONENT}: dropped {int((ids < 0).sum())} rows whose docno is not in the index')
            rows, codes, ids = rows[ids >= 0], np.unique(codes[ids >= 0], return_inverse=True)[1], ids[ids >= 0]
        return frame, rows, codes, pad_groups(codes, ids, int(codes.max(initial=-1)) + 1)

    def query_encoder(self) -> pt.Transformer:
        """The fine-tuned query encoder as a transformer (``query`` → ``query_vec``), for pyterrier-dr pipelines."""
        return self.encoder.query_encoder()

    def retriever(self, k: int = 1000, *, backend: str = 'exact', **kwargs) -> pt.Transformer:
        """Single-stage dense retrieval over the same (fixed) document index with the fine-tuned encoder."""
        return DenseIndex(self.encoder, self.flex).labelled_retriever(self, k, backend=backend, **kwargs)

    # --- training plumbing ------------------------------------------------------------------------------------
    def _validation_fn(self, valid: Optional[pd.DataFrame], valid_qrels: Optional[pd.DataFrame], depth: int = 100):
        """``fn() -> metric`` on the validation data: re-ranking the preceding stage's validation results (the
        pipeline being trained) or, for query frames / ``validate_with='retrieve'``, retrieval of ``depth``
        documents from the whole index. Judged positives are never injected here (that would leak)."""
        if not validation_data(valid, valid_qrels, self.COMPONENT):
            return None
        with validate_columns(valid, f'{self.COMPONENT}.fit', 'validation frame') as v:
            v.columns(includes=['qid', 'query'])
        valid_qrels = normalise_qrels(valid_qrels, f'{self.COMPONENT}.fit')
        docnos = self.store.docnos
        if self.validate_with == 'retrieve' or 'docno' not in valid.columns:
            topics = normalise_frame(valid, self.COMPONENT).drop_duplicates('qid')
            qids, queries = topics['qid'].to_numpy(), topics['query'].tolist()
            fixed_ids = None
        else:
            frame, rows, _, (fixed_ids, order, positions) = self._candidate_groups(valid, warn=False)
            first_rows = rows[order[positions == 0]]
            qids, queries = frame['qid'].to_numpy()[first_rows], frame['query'].values[first_rows].tolist()

        def validate():
            ids = fixed_ids if fixed_ids is not None else self._retrieve_ids(queries, depth)
            scores = self._rerank_arrays(queries, ids)
            cells = ids >= 0
            res = pd.DataFrame({'qid': np.repeat(qids, ids.shape[1])[cells.reshape(-1)],
                                'docno': docnos.fwd[ids[cells]], 'score': scores[cells]})
            return evaluate(res, valid_qrels, self.config.metric, qids)
        return validate

    def _check_training_frame(self, train: pd.DataFrame) -> None:
        with validate_columns(train, f'{self.COMPONENT}.fit', 'training frame') as v:
            v.columns(includes=['qid', 'query'])

    def _prepare_device(self) -> torch.device:
        device = infer_device(self.config.device)
        self.encoder.to(device)
        self.trainable_module().to(device)
        return device

    def _run(self, loss_fn, sample_batches, validate, *, before_step=None, name=None, resume=False,
             batch_ids=None, training_data=None) -> dict:
        """Runs the TrainingLoop. ``batch_ids``: ``fn(micro_batch)`` -> the candidate row ids its loss will gather;
        when given (and ``prefetch`` is on), the next batch's are gathered in the background while a step runs.
        ``training_data``: the parts of the training data that :func:`~pyterrier_coder.training.fingerprint` hashes
        for the checkpoint's identity (with the settings), so ``resume=True`` cannot continue another run."""
        if batch_ids is not None and self.prefetch:
            self._prefetcher = GatherPrefetcher(self.store, self.encoder.device)
        prefetch = (lambda part: self._prefetcher.request(batch_ids(part))) if self._prefetcher is not None else None
        try:
            loop = TrainingLoop(self.trainable_module(), self.config, sample_batches=sample_batches, loss_fn=loss_fn,
                                validate=validate, before_step=before_step, name=name or self.COMPONENT,
                                prefetch=prefetch, identity=lambda: {'settings': self.settings(),
                                                                     'training_data': fingerprint(training_data)})
            history = loop.run(resume=resume)
            if self._prefetcher is not None:
                history['prefetched_batches'] = self._prefetcher.hits
        finally:
            if self._prefetcher is not None:
                self._prefetcher.close()
                self._prefetcher = None
        self.history = history
        self.fitted = True
        return history

    def _batches_of_queries(self, n_queries: int):
        """A ``sample_batches`` function: a fresh permutation of the training queries every epoch."""
        bs = self.config.batch_size

        def sample(epoch, rng):
            order = rng.permutation(n_queries)
            return [order[i:i + bs] for i in range(0, n_queries, bs)]
        return sample

    # --- persistence --------------------------------------------------------------------------------------------
    def settings(self) -> dict:
        return dict(num_results=self.num_results, validate_with=self.validate_with, on_missing=self.on_missing)

    def init_arguments(self) -> dict:
        return dict(index=self.flex, encoder=self.encoder, **self.settings(),
                    inference_batch_size=self.inference_batch_size, prefetch=self.prefetch, verbose=self.verbose,
                    **self.config.changes_from(self.DEFAULTS, exclude=['verbose']))

    def _adopt_trained_state(self, source, changes: dict) -> None:
        # __init__ cloned source's (possibly fine-tuned) encoder: what was learnt came along unless it was replaced
        if 'encoder' not in changes:
            self.fitted, self.history = source.fitted, source.history

    def _save_extra(self, path: Path) -> None:
        pass

    def _load_extra(self, path: Path) -> None:
        pass

    def save(self, path) -> None:
        """Writes the fine-tuned encoder (Hugging Face files), settings, training history (+ subclass extras)."""
        with saving(path, self.COMPONENT) as tmp:
            self.encoder.save(tmp / 'encoder')
            self._save_extra(tmp)
            write_component_config(tmp, self.COMPONENT, self.settings(), training=self.config.as_dict(),
                                   index=str(Path(self.flex.index_path).resolve()),
                                   index_record=index_record(self.flex), fitted=self.fitted)
            if self.history is not None:
                atomic_write_text(tmp / 'history.json', json.dumps(self.history, default=str))

    @classmethod
    def load(cls, path, index=None, *, device=None, **overrides):
        """Loads a saved model; ``index`` defaults to the index path it was trained with. A plain Hugging Face
        directory (a released query encoder, e.g. the CODER authors') is loaded as the query encoder, with the
        component's default settings (``overrides`` change them); its ``index`` must then be given."""
        path = Path(path)
        if is_plain_model_directory(path):
            if index is None:
                raise ValueError(f'{cls.COMPONENT}.load: {str(path)!r} is a plain Hugging Face model directory (a '
                                 f'query encoder without the index it was trained over): pass index=...')
            return cls(index, plain_directory_encoder(path, device, overrides), device=device, **overrides)
        conf = read_component_config(path, cls.COMPONENT)
        if index is None and not Path(conf['index']).exists():
            raise FileNotFoundError(f'{cls.COMPONENT}: the document index this model was trained with '
                                    f'({conf["index"]!r}) is not here; pass the same index: '
                                    f'{cls.COMPONENT}.load(path, index=...) / from_pretrained(..., index=...)')
        encoder = DenseEncoder.load(path / 'encoder', device=device)
        if index is not None:
            cls._check_same_index(path, conf.get('index_record'), as_flex_index(index, cls.COMPONENT))
        training = dict(conf.get('training', {}))
        training.pop('device', None)   # the machine it was trained on may have other devices: choose afresh
        if device is not None:
            training['device'] = device
        settings = {**cls.SETTINGS_OF_OLDER_SAVES, **conf['settings']}
        model = cls(index if index is not None else conf['index'], encoder, **{**settings, **training, **overrides})
        model.encoder = encoder   # the clone made by __init__ is not needed: the loaded encoder is ours
        model._load_extra(path)
        model.fitted = conf.get('fitted', False)
        if (path / 'history.json').exists():
            model.history = json.loads((path / 'history.json').read_text())
        return model

    @classmethod
    def _check_same_index(cls, path: Path, saved: Optional[dict], flex) -> None:
        """Refuses an index other than the one the model was trained over (another corpus, or vectors of another
        encoder): its scores would be meaningless. A copy of the same index elsewhere is fine; an index without a
        record (built outside :class:`DenseIndex`) cannot be checked."""
        given = index_record(flex)
        if saved is None or given is None:
            return
        where = f'{cls.COMPONENT}.load: {str(path)!r} was trained over'
        if saved['corpus'] != given['corpus']:
            raise ValueError(f'{where} an index of another corpus ({describe_corpus(saved["corpus"])}) than '
                             f'{str(flex.index_path)!r} ({describe_corpus(given["corpus"])}); pass the index it was '
                             f'trained over')
        if not same_encoder(saved['encoder'], given['encoder']):
            raise ValueError(f'{where} an index built by another encoder ({saved["encoder"]["model"]!r}, '
                             f'{saved["encoder"]["settings"]}) than {str(flex.index_path)!r} '
                             f'({given["encoder"]["model"]!r}, {given["encoder"]["settings"]}); pass the index it '
                             f'was trained over')

    def _repr_args(self) -> str:
        return ''

    def __repr__(self):
        return (f'{self.COMPONENT}({self.flex!r}, {self.encoder!r}{self._repr_args()}'
                f'{", fitted" if self.fitted else ""})')
