"""The main job: build indexes, train every requested component, compare all pipelines with one pt.Experiment.

Everything is cached under ``--out`` (indexes, trained models, runs), so a rerun only evaluates unless asked
to ``--retrain``. Output: ``results.csv`` (the pt.Experiment frame, with p-value columns), ``perquery.csv``,
TREC runs under ``runs/``, ``report.md``, and PNG plots of training curves and per-query differences.
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import re
import json
import os
import shutil
import time
import warnings
import weakref
from pathlib import Path
from typing import Dict, List, Optional

import pandas as pd
import pyterrier as pt
from transformers import AutoConfig

from ..adore import Adore
from ..artifacts import atomic_write_text, private_directory, replace_directory
from ..coder import Coder
from ..corpora import CorpusFingerprint, describe_corpus
from ..cross_encoders import model_path as cross_encoder_path
from ..datasets import load_dataset
from ..devices import cpu_computes_bf16, infer_device
from ..electra import MonoElectra
from ..encoders import DenseEncoder, DenseIndex, encoder_record, same_encoder
from ..encoders import model_path as bi_encoder_path
from ..fusion import Interpolate
from ..hf_models import explained_model_errors
from ..labels import choose_label_scale
from ..query_trainer import DenseQueryTrainer
from ..retrievers import BM25
from ..star import Star
from ..tasb import TasBalanced
from .budgets import (COMPONENTS, DEFAULT_COMPONENTS, FULL, QUICK, TRAINED, apply_overrides, component_settings,
                      fit_budget)
from .comparisons import BASELINE, FUSED_SUFFIX, measures, paired_comparisons
from .plots import write_plots
from .report import write_report, write_run_info
from .run_cache import SPEC_FILE, cache_key, file_stamps, read_spec

@dataclasses.dataclass
class ExperimentSettings:
    dataset: str
    out: str
    base: str = 'minilm'
    cross_encoder: str = 'minilm'
    components: tuple = DEFAULT_COMPONENTS
    ablations: bool = False
    seed: int = 42
    quick: bool = False
    device: Optional[str] = None
    retrain: bool = False
    train_split: str = 'train'
    dev_split: str = 'dev'
    test_split: str = 'test'
    #: budget changes, e.g. ``{'electra': {'max_steps': 600}, 'rerank_depth': 50}`` (CLI: ``--set``)
    overrides: dict = dataclasses.field(default_factory=dict)
    #: measures beside the default ones (ir_measures names, e.g. ``('R@10',)``; CLI: ``--measures``)
    measures: tuple = ()
    #: also report binary measures at this relevance threshold (TREC DL: 2; CLI: ``--rel``)
    rel: Optional[int] = None
    verbose: bool = True


def _log(msg: str) -> None:
    print(f'[pyterrier-coder] {msg}', flush=True)


class ExperimentRunner:
    """Runs the whole comparison described by :class:`ExperimentSettings`."""

    def __init__(self, settings: ExperimentSettings):
        self.s = settings
        self.out = Path(settings.out)
        self.budget = apply_overrides(QUICK if settings.quick else FULL, settings.overrides)
        measures(settings.measures, settings.rel)      # an unknown measure fails now, not after the training
        unknown = set(settings.components) - set(COMPONENTS)
        if unknown:
            raise ValueError(f'unknown components {sorted(unknown)}; choose from {COMPONENTS}')
        self.device = str(infer_device(settings.device))
        if self.device == 'cpu' and cpu_computes_bf16():
            # the transformers the runner trains on both sides (a cross-encoder, document towers) gain most from bf16
            for component, what in (('electra', 'MonoELECTRA'), ('star', 'STAR'), ('tasb', 'TAS-Balanced')):
                if 'amp' not in self.budget[component]:
                    self.budget[component]['amp'] = True
                    if component in settings.components:
                        _log(f'this CPU has bf16 instructions: {what} trains under bf16 autocast '
                             f'(--set {component}.amp=False for fp32)')
        self.timings: Dict[str, float] = {}
        self.histories: Dict[str, dict] = {}
        self.fusion_weights: Dict[str, dict] = {}   # pipeline name -> Interpolate.history (weight chosen on dev)
        # a model stays in memory while a pipeline or another model holds it, and is read again from models/<name>
        # when a later pipeline asks for it: an --ablations run builds dozens of models, which do not fit at once
        self._models: 'weakref.WeakValueDictionary[str, object]' = weakref.WeakValueDictionary()
        self._trained_now: set = set()   # trained (and saved) by this run: read again, never retrained
        self._used_models: List[str] = []
        weights = self.out / 'fusion_weights.json'   # weights chosen by a previous invocation (see _fused)
        self._saved_fusion_weights = json.loads(weights.read_text()) if weights.exists() and not settings.retrain \
            else {}
        self._models_by_init = {'adore': self._adore}   # trained models another one can start from

    # --- data ------------------------------------------------------------------------------------------------
    def _topics(self, split: str, limit: Optional[int], only: Optional[set] = None, *,
                what: Optional[str] = None) -> pd.DataFrame:
        """The topics of ``split`` (those in ``only``), a sample of ``limit`` of them when there are more; fewer is
        logged once (as ``what``) when ``what`` is given."""
        topics = self.dataset.get_topics(split)
        if only is not None:
            topics = topics[topics['qid'].isin(only)]
        if limit is not None and len(topics) > limit:
            topics = topics.sample(n=limit, random_state=self.s.seed).sort_values('qid')
        elif limit is not None and len(topics) < limit and what is not None:
            _log(f'{what}: {split} has {len(topics)} topics, fewer than the {limit} asked for: using all of them')
        return topics.reset_index(drop=True)

    def _load_data(self):
        self.dataset = load_dataset(self.s.dataset)
        b = self.budget
        splits = getattr(self.dataset, 'splits', None)
        needed = [self.s.test_split] + ([self.s.train_split, self.s.dev_split] if self.trains_anything() else [])
        if splits is not None:
            missing = [s for s in needed if s not in splits]
            if missing:
                raise ValueError(f'dataset {self.s.dataset} has splits {splits}; missing {missing} '
                                 f'(use --train-split/--dev-split/--test-split)')
        self.test_qrels = self.dataset.get_qrels(self.s.test_split)
        test = self.dataset.get_topics(self.s.test_split)
        judged = test['qid'].isin(set(self.test_qrels['qid']))
        if not judged.all():
            _log(f'{int((~judged).sum())} {self.s.test_split} topics have no qrels: evaluating the {int(judged.sum())} judged ones')
        self.test = self._topics(self.s.test_split, b['test_queries'], only=set(test.loc[judged, 'qid']),
                                 what='test_queries')
        if self.trains_anything():
            self.train = self._topics(self.s.train_split, b['train_queries'], what='train_queries')
            self.train_qrels = self.dataset.get_qrels(self.s.train_split)
            self.dev = self._topics(self.s.dev_split, b['dev_queries'], what='dev_queries')
            self.dev_qrels = self.dataset.get_qrels(self.s.dev_split)
            self.label_scale = choose_label_scale(self.train_qrels, self.train)
            _log(f'positives: label >= {self.label_scale.min_label} ({self.label_scale.reason})')

    def _fit_budgets(self) -> None:
        """Fits the budget to the collection (:func:`~pyterrier_coder.experiment.budgets.fit_budget`), logging each
        change; the changes are listed in report.md."""
        training = (self.label_scale, self.train, self.train_qrels) if self.trains_anything() else None
        self.budget_notes = fit_budget(self.budget, self.s.overrides, len(self.dense), training)
        for note in self.budget_notes:
            _log(note)

    def _check_models(self) -> None:
        """Fails before anything is built when a starting model cannot be found (its config is read): a typo in
        ``--base`` would otherwise surface after the BM25 index was built, one in ``--cross-encoder`` after the
        bi-encoders were trained."""
        paths = {'DenseEncoder': bi_encoder_path(self.s.base)}
        if 'electra' in self.s.components:
            paths['MonoElectra'] = cross_encoder_path(self.s.cross_encoder)
        for component, path in paths.items():
            with explained_model_errors(component, path):
                AutoConfig.from_pretrained(path)

    def trains_anything(self) -> bool:
        return bool(set(TRAINED) & set(self.s.components))

    # --- indexes -------------------------------------------------------------------------------------------
    def _build_indexes(self):
        """Builds the BM25 and dense indexes under ``--out``, or reuses them when they were built from this
        collection's corpus (and, for the dense index, by this ``--base`` encoder); an index built from another
        corpus or encoder (the same ``--out`` used with another ``--dataset`` or ``--base``) is rebuilt."""
        corpus = lambda: self.dataset.get_corpus_iter(verbose=False)     # noqa: E731 -- read again by each index
        self.corpus_record = CorpusFingerprint.of(corpus())
        start = time.perf_counter()
        self.bm25 = BM25(self.out / 'indexes' / 'bm25')
        stale = self.bm25.built() and self.bm25.record() != self.corpus_record
        if stale:
            _log(f'rebuilding the BM25 index: it was built from {describe_corpus(self.bm25.record())}, not from '
                 f'{self.s.dataset} ({describe_corpus(self.corpus_record)})')
        self.bm25.index(corpus(), overwrite=stale, verbose=self.s.verbose)
        self.timings['index: BM25'] = time.perf_counter() - start
        self.encoder = DenseEncoder(self.s.base, device=self.s.device, batch_size=64)
        start = time.perf_counter()
        self.dense = DenseIndex(self.encoder, self.out / 'indexes' / 'dense.flex', verbose=self.s.verbose)
        record = self.dense.record() if self.dense.built() else None
        self.encoder_record = encoder_record(self.encoder)
        stale = self.dense.built() and (record is None or record['corpus'] != self.corpus_record
                                        or not same_encoder(record['encoder'], self.encoder_record))
        if stale:
            _log(f'rebuilding the dense index: it was built from another corpus or by another encoder than '
                 f'{self.s.dataset} and --base {self.s.base}')
        self.dense.index(corpus(), overwrite=stale)
        self.timings['index: Dense'] = time.perf_counter() - start
        #: what the trained models depend on in the indexes (part of their spec: a rebuilt index retrains them)
        self.index_identity = {'corpus': self.corpus_record, 'dense': hashlib.sha256(
            json.dumps(self.dense.record()['encoder'], sort_keys=True).encode()).hexdigest()}

    # --- components ------------------------------------------------------------------------------------------
    def _model_dir(self, name: str) -> Path:
        return self.out / 'models' / name

    def _spec(self, name: str, settings: dict, **extra) -> dict:
        """What a trained model depends on besides the data files: its settings, the starting models, the seed, the
        training splits and their budgets. Stored beside the model; a model is reused only when it matches."""
        spec = dict(name=name, settings=settings, base=self.s.base, seed=self.s.seed, train_split=self.s.train_split,
                    dev_split=self.s.dev_split, budget=self._shared_budget('rerank_depth', 'test_queries'),
                    indexes=self.index_identity, **extra)
        return json.loads(json.dumps(spec, sort_keys=True, default=str))

    def _shared_budget(self, *leave_out: str) -> dict:
        """The budget entries that are not a component's settings (query samples, depths), minus ``leave_out``."""
        return {k: v for k, v in self.budget.items() if not isinstance(v, dict) and k not in leave_out}

    def _saved_spec(self, name: str) -> Optional[dict]:
        return read_spec(self._model_dir(name))

    def _train_or_load(self, name: str, cls, spec: dict, make, fit, load_kwargs: Optional[dict] = None):
        """Loads ``models/<name>`` when present and trained with the same ``spec`` (unless --retrain), else builds
        with ``make()``, trains with ``fit(model)`` and saves. ``load_kwargs`` go to ``cls.load`` (default: the
        dense index, for the query-encoder trainers)."""
        self._used_models.append(name)
        model = self._models.get(name)
        if model is not None:   # trained or loaded in this run, and still in use
            return model
        path = self._model_dir(name)
        saved = self._saved_spec(name) if path.exists() else None
        if saved == spec and (not self.s.retrain or name in self._trained_now):
            if load_kwargs is None:
                load_kwargs = {'index': self.dense.flex} if issubclass(cls, DenseQueryTrainer) else {}
            model = cls.load(path, **load_kwargs, device=self.s.device)
            if f'train: {name}' not in self.timings:   # its first use in this run (else it is read again)
                _log(f'reusing trained {name} from {path}')
                self.timings[f'train: {name}'] = (model.history or {}).get('seconds', float('nan'))
        else:
            if path.exists() and not self.s.retrain:
                changed = sorted(k for k in set(spec) | set(saved or {}) if (saved or {}).get(k) != spec.get(k))
                _log(f'retraining {name}: ' + (f'its settings changed ({", ".join(changed)})' if saved else
                                                f'{path} has no {SPEC_FILE} to compare settings with'))
            model = make()
            _log(f'training {name}: {model!r}')
            start = time.perf_counter()
            fit(model)
            self.timings[f'train: {name}'] = time.perf_counter() - start
            # saved beside the old model and swapped in whole: a run that fails before this point (a bad setting, a
            # NaN loss, Ctrl-C, a full disk) leaves the model trained before
            staged = private_directory(path)
            try:
                model.save(staged)
                atomic_write_text(staged / SPEC_FILE, json.dumps(spec, indent=2, sort_keys=True))
                replace_directory(staged, path)
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                raise
            self._trained_now.add(name)
        if model.history is not None:
            self.histories[name] = model.history
        self._models[name] = model
        return model

    def _coder(self, name='coder', *, single_stage=False, init: Optional[str] = None, **overrides):
        """CODER(M_D, M_C): M_C = BM25 (the cascade ``BM25 >> CODER``), or M_C = M_D (``single_stage``: the
        candidates are the base model's own top-N and validation retrieves from the whole index). ``init`` names a
        trained model whose query encoder CODER starts from (default: the base encoder)."""
        kwargs = {**self.budget['coder'], **overrides}
        if single_stage:
            fit = lambda m: m.fit(self.train, self.train_qrels, self.dev, self.dev_qrels)
        elif kwargs['num_candidates']:
            candidates = self.bm25 % kwargs['num_candidates']
            fit = lambda m: (candidates >> m).fit(self.train, self.train_qrels, self.dev, self.dev_qrels)
        else:   # no candidates (random or in-batch negatives only): validated as the reranker of BM25 it will be
            dev = self.bm25 % self.budget['coder']['num_candidates']
            fit = lambda m: m.fit(self.train, self.train_qrels, dev(self.dev), self.dev_qrels)
        encoder = self._models_by_init[init]().encoder if init else self.encoder
        spec = self._spec(name, kwargs, single_stage=single_stage, init=init,
                          init_spec=self._saved_spec(init) if init else None)
        return self._train_or_load(
            name, Coder, spec,
            lambda: Coder(self.dense, encoder, seed=self.s.seed, device=self.s.device, verbose=self.s.verbose,
                          **kwargs), fit)

    def _adore(self, name='adore', *, over: Optional[str] = None, **overrides):
        """ADORE over the base model's index, or ``over`` a trained bi-encoder (``'star'``: ADORE+STAR, starting from
        its query encoder over its re-encoded index)."""
        kwargs = {**self.budget['adore'], **overrides}
        trainer = self._bi_encoder(over) if over else None
        index, encoder = (trainer.dense_index, trainer.encoder) if trainer else (self.dense, self.encoder)
        spec = self._spec(name, kwargs, **({'over': over, 'over_spec': self._saved_spec(over)} if over else {}))
        return self._train_or_load(
            name, Adore, spec,
            lambda: Adore(index, encoder, seed=self.s.seed, device=self.s.device, verbose=self.s.verbose, **kwargs),
            lambda m: m.fit(self.train, self.train_qrels, self.dev, self.dev_qrels),
            load_kwargs={'index': index.flex})

    def _bi_encoder(self, name: str):
        """The trained STAR or TAS-Balanced model ``name`` (``'star'``, ``'tasb'``), trained or loaded once."""
        return self._star() if name == 'star' else self._tasb()

    def _star(self, name='star', **overrides):
        """STAR: both towers trained on static hard negatives from the starting encoder's own index (fitted on plain
        topics, as the paper took them from its warm-up dense model) and on the other queries' positives as random
        negatives; the corpus is then encoded into ``indexes/<name>.flex``."""
        kwargs = {**self.budget['star'], **overrides}
        index_path = self.out / 'indexes' / f'{name}.flex'
        return self._train_or_load(
            name, Star, self._spec(name, kwargs, hard_negatives_from='dense'),
            lambda: Star(self.encoder, index_path, corpus=self.dataset, texts=self.bm25.text_loader(),
                         base_index=self.dense, seed=self.s.seed, device=self.s.device, verbose=self.s.verbose,
                         **kwargs),
            lambda m: m.fit(self.train, self.train_qrels, self.dev, self.dev_qrels),
            load_kwargs={'index_path': index_path, 'corpus': self.dataset})

    def _tasb(self, name='tasb', **overrides):
        """TAS-Balanced with the runner's own teachers: the fused ``BM25 >> CODER (+ BM25 score)`` scores the
        training pairs, the single-stage CODER is the in-batch teacher; the corpus is then encoded into
        ``indexes/<name>.flex``."""
        kwargs = {**self.budget['tasb'], **overrides}
        index_path = self.out / 'indexes' / f'{name}.flex'
        depth = kwargs['negative_depth']
        teachers = {'pairwise_teacher': self._fused('BM25 >> CODER' + FUSED_SUFFIX, 'BM25', self._coder, self.dev),
                    'in_batch_teacher': self._coder('coder_single_stage', single_stage=True)}
        spec = self._spec(name, kwargs, teachers={'pairwise': self._saved_spec('coder'),
                                                  'in_batch': self._saved_spec('coder_single_stage')})
        return self._train_or_load(
            name, TasBalanced, spec,
            lambda: TasBalanced(self.encoder, index_path, corpus=self.dataset, texts=self.bm25.text_loader(),
                                teacher_cache=self.out / 'teacher_cache' / name, seed=self.s.seed,
                                device=self.s.device, verbose=self.s.verbose, **teachers, **kwargs),
            lambda m: (self.bm25 % depth >> m).fit(self.train, self.train_qrels, self.dev, self.dev_qrels),
            load_kwargs={'index_path': index_path, 'corpus': self.dataset})

    def _coder_over(self, name: str, over: str):
        """CODER over a trained bi-encoder's index, starting from its query encoder, trained for single-stage
        retrieval (the CODER paper's setting with M_D = TAS-B), with the coder budget changed by ``coder_over``."""
        kwargs = component_settings(self.budget, 'coder_over')
        trainer = self._bi_encoder(over)
        index = trainer.dense_index
        spec = self._spec(name, kwargs, single_stage=True, over=over, over_spec=self._saved_spec(over))
        return self._train_or_load(
            name, Coder, spec,
            lambda: Coder(index, trainer.encoder, seed=self.s.seed, device=self.s.device, verbose=self.s.verbose,
                          validate_with='retrieve', **kwargs),
            lambda m: m.fit(self.train, self.train_qrels, self.dev, self.dev_qrels),
            load_kwargs={'index': index.flex})

    def _electra(self, name='electra', *, negatives: str = 'bm25', **overrides):
        """The cross-encoder trained with LCE on the candidates of ``negatives``, the first stage it is trained to
        follow (``'bm25'``, or ``'dense'`` for the train/test-retriever ablation), validated on that stage's
        candidates."""
        kwargs = {**self.budget['electra'], **overrides}
        stage = (lambda k: self.bm25 % k) if negatives == 'bm25' else self.dense.retriever
        # validation reranks a shallower list than the test (it runs several times during training)
        first = stage(self.budget['electra_dev_depth']) >> self.bm25.text_loader()
        negatives_from = kwargs.get('negatives_from', 200)
        dev = self._topics(self.s.dev_split, self.budget['electra_dev_queries'], what='electra_dev_queries')
        extra = {} if negatives == 'bm25' else {'negatives': negatives}
        return self._train_or_load(
            name, MonoElectra, self._spec(name, kwargs, cross_encoder=self.s.cross_encoder, **extra),
            lambda: MonoElectra(self.s.cross_encoder, seed=self.s.seed, device=self.s.device,
                                verbose=self.s.verbose, texts=self.bm25.text_loader(), **kwargs),
            lambda m: m.fit((stage(negatives_from) >> self.bm25.text_loader())(self.train), self.train_qrels,
                            first(dev), self.dev_qrels))

    def _fused(self, name: str, first: str, reranker, dev: pd.DataFrame):
        """``reranker()`` interpolated with the score of the first stage ``first`` (the same first stage as on test),
        the weight chosen on ``dev``'s candidates. The weight is kept in ``fusion_weights.json`` with a key like a
        test run's (:meth:`_key`, over the dev queries): an invocation that finds the same key reuses the weight
        instead of scoring ``dev`` again."""
        used_before = len(self._used_models)
        model = reranker()
        models = sorted(set(self._used_models[used_before:]))
        saved = self._saved_fusion_weights.get(name)
        if saved is not None and saved.get('key') == self._key(name, first, dev['qid'], models):
            history = saved
            fused = Interpolate(model, alpha=history['alpha'])
            how = 'chosen by a previous invocation'
        else:
            fused = Interpolate(model)
            fused.tune(self.first_stages[first](dev), self.dev_qrels)
            # keyed after tuning: PISA writes some files on first use
            history = {**fused.history, 'key': self._key(name, first, dev['qid'], models)}
            how = 'chosen'
        self.fusion_weights[name] = history
        # written now, not only with the report: a job stopped later keeps the weight
        atomic_write_text(self.out / 'fusion_weights.json',
                          json.dumps({**self._saved_fusion_weights, **self.fusion_weights}, indent=2))
        _log(f'{name}: weight of the reranker {fused.alpha:g}, {how} on {history["validation_queries"]} '
             f'{self.s.dev_split} queries')
        return fused

    def pipelines(self) -> Dict[str, tuple]:
        """The requested pipelines, ``{name: (first stage name or None, build)}`` in report order: ``build()`` trains
        or loads what the pipeline needs and returns its transformer (:meth:`_run_systems` calls it just before
        the pipeline runs, so each test run is written as soon as its model is trained). A pipeline with a first
        stage is ``first_stage >> transformer``; first stages run once and are shared."""
        comps = set(self.s.components)
        depth = self.budget['rerank_depth']
        text_stage = f'BM25 top-{depth} + text'
        self.first_stages = {'BM25': self.bm25, text_stage: self.bm25 % depth >> self.bm25.text_loader()}
        systems, self.system_models = {}, {}

        def add(name, first, build):
            systems[name] = (first, build)

        def add_fused(name, first, reranker, dev):
            """The reranker row ``name`` again, fused with its first stage's BM25 score (weight chosen on ``dev()``)."""
            fused = name + FUSED_SUFFIX
            add(fused, first, lambda: self._fused(fused, first, reranker, dev()))

        if 'bm25' in comps:
            add('BM25', None, lambda: self.bm25)
        if 'dense' in comps:
            add('Dense', None, lambda: self.dense.retriever(1000))
        add(BASELINE, 'BM25', self.dense.scorer)     # the baseline is always there
        if 'coder' in comps:
            add('BM25 >> CODER', 'BM25', self._coder)
            add_fused('BM25 >> CODER', 'BM25', self._coder, lambda: self.dev)
            add('CODER', None, lambda: self._coder('coder_single_stage', single_stage=True).retriever(1000))
        if 'adore' in comps:
            add('ADORE', None, lambda: self._adore().retriever(1000))
            if 'coder' in comps and self.s.ablations:
                add('BM25 >> CODER(ADORE init)', 'BM25', lambda: self._coder('coder_from_adore', init='adore'))
        if 'electra' in comps:
            add('BM25 >> MonoELECTRA', text_stage, self._electra)
            # on the cross-encoder's (smaller) validation sample, but at the test depth: min-max normalisation
            # depends on how many candidates a query has
            add_fused('BM25 >> MonoELECTRA', text_stage, self._electra,
                      lambda: self._topics(self.s.dev_split, self.budget['electra_dev_queries']))
        if 'star' in comps:
            add('STAR', None, lambda: self._star().retriever(1000))
            add('ADORE+STAR', None, lambda: self._adore('adore_star', over='star').retriever(1000))
        if 'tasb' in comps:
            add('TAS-Balanced', None, lambda: self._tasb().retriever(1000))
            add('CODER+TAS-Balanced', None, lambda: self._coder_over('coder_tasb', 'tasb').retriever(1000))
            add('BM25 >> CODER+TAS-Balanced', 'BM25', lambda: self._coder_over('coder_tasb', 'tasb'))
        if not self.s.ablations:
            return systems
        # the papers' ablation rows (CODER Fig. 2, ADORE static negatives / RankNet, LCE vs CE and group size)
        if 'coder' in comps:
            n = self.budget['coder']['num_candidates']
            add('BM25 >> CODER (margin loss)', 'BM25', lambda: self._coder('coder_margin', loss='margin'))
            add('BM25 >> CODER (softmax target)', 'BM25', lambda: self._coder('coder_softmax', target='softmax'))
            # CODER paper, Fig. 2: the negatives' composition and number
            for size in (32, 100, 300):
                if size < n:
                    add(f'BM25 >> CODER (N={size})', 'BM25',
                        lambda size=size: self._coder(f'coder_n{size}', num_candidates=size))
            add('BM25 >> CODER (random negatives)', 'BM25',
                lambda: self._coder('coder_random', num_candidates=0, random_negatives=n))
            add('BM25 >> CODER (in-batch negatives)', 'BM25',
                lambda: self._coder('coder_in_batch', num_candidates=0, in_batch_negatives=30))
        if 'adore' in comps:
            add('ADORE (static negatives)', None, lambda: self._adore('adore_static', dynamic=False).retriever(1000))
            add('ADORE (RankNet, no ΔM)', None,
                lambda: self._adore('adore_ranknet', lambda_weighting=False).retriever(1000))
            # the index that will be deployed compressed: training against its product-quantised vectors
            # (one 4-bit code per 8 dimensions: 48 bytes for a 384-d MiniLM vector instead of 1,536)
            pq = f'faiss:PQ{max(1, self.encoder.dim // 8)}x4'
            add('ADORE (PQ index)', None, lambda: self._adore('adore_pq', search=pq).retriever(1000))
        if 'electra' in comps:
            add('BM25 >> MonoELECTRA (CE)', text_stage, lambda: self._electra('electra_ce', loss='ce'))
            add('BM25 >> MonoELECTRA (hinge)', text_stage, lambda: self._electra('electra_hinge', loss='hinge'))
            # LCE paper, Fig. 3: group size at an equal number of query-passage pairs per step
            e = self.budget['electra']
            pairs = e['group_size'] * e['train_batch_size']
            add('BM25 >> MonoELECTRA (LCE, n=2)', text_stage,
                lambda: self._electra('electra_n2', group_size=2, train_batch_size=max(1, pairs // 2)))
            # the replication paper's train retriever x test retriever: negatives from BM25 or from the dense
            # model, reranking BM25 or the dense model
            dense_stage = f'Dense top-{depth} + text'
            self.first_stages[dense_stage] = self.dense.retriever(depth) >> self.bm25.text_loader()
            add('Dense >> MonoELECTRA', dense_stage, self._electra)
            add('BM25 >> MonoELECTRA (dense negatives)', text_stage,
                lambda: self._electra('electra_dense_negatives', negatives='dense'))
            add('Dense >> MonoELECTRA (dense negatives)', dense_stage,
                lambda: self._electra('electra_dense_negatives', negatives='dense'))
        if 'star' in comps:     # STAR paper: each kind of negative alone
            add('STAR (random negatives only)', None,
                lambda: self._star('star_random', hard_negatives=False).retriever(1000))
            add('STAR (hard negatives only)', None,
                lambda: self._star('star_hard', random_negatives=False).retriever(1000))
        if 'tasb' in comps:     # TAS-Balanced paper, Table 2: sampling x teachers
            for sampling in ('random', 'tas', 'tas-balanced'):
                for supervision in ('pairwise', 'in-batch', 'dual'):
                    if (sampling, supervision) != ('tas-balanced', 'dual'):
                        add(f'TAS-Balanced ({sampling}, {supervision})', None,
                            lambda sampling=sampling, supervision=supervision: self._tasb(
                                f'tasb_{sampling}_{supervision}'.replace('-', '_'), sampling=sampling,
                                supervision=supervision).retriever(1000))
        return systems

    # --- evaluation and report -----------------------------------------------------------------------------
    def _key(self, name: str, first: Optional[str], qids, models: List[str]) -> str:
        """What a pipeline's output on the queries ``qids`` depends on: its name and first stage, the queries, the
        shared budget entries, and the files of the indexes and of the trained ``models`` it uses now
        (:func:`~.run_cache.file_stamps`)."""
        # component budgets are not here: they reach a run only through its models, whose files are stamped
        # the corpus indexes, the models, and the indexes the bi-encoder models encoded the corpus into
        dirs = [self.out / 'indexes' / 'bm25', self.out / 'indexes' / 'dense.flex'] + \
            [self._model_dir(m) for m in models] + [self.out / 'indexes' / f'{m}.flex' for m in models]
        return cache_key(name, first, sorted(qids), self._shared_budget(), self.s.base, self.s.cross_encoder,
                         file_stamps(self.out, dirs))

    def _run_key(self, name: str, first: Optional[str]) -> str:
        """The key of pipeline ``name``'s test run (:meth:`_key` over the test queries and its models)."""
        return self._key(name, first, self.test['qid'], self.system_models.get(name, []))

    def _run_systems(self, systems: Dict[str, tuple]) -> Dict[str, pd.DataFrame]:
        """Builds (trains or loads) and runs every pipeline on the test topics in turn, timing first stages and
        rerankers separately, and writes each TREC run as it is done. A run whose inputs did not change since a
        previous invocation (same ``--out``, see :meth:`_run_key`) is read back with its measured latency instead
        of recomputed, unless ``--retrain``; the manifest is written after every pipeline, so a stopped job keeps
        the runs it finished."""
        runs_dir = self.out / 'runs'
        runs_dir.mkdir(parents=True, exist_ok=True)
        manifest_path = runs_dir / 'manifest.json'
        old = json.loads(manifest_path.read_text()) if manifest_path.exists() and not self.s.retrain else {}
        manifest = {}
        n = max(1, len(self.test))
        first_results, runs, self.latency, self.cached_runs = {}, {}, {}, []
        for name, (first, build) in systems.items():
            used_before = len(self._used_models)
            transformer = build()
            self.system_models[name] = sorted(set(self._used_models[used_before:]))
            slug = re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')
            path = runs_dir / f'{slug}.res.gz'
            key = self._run_key(name, first)
            entry = old.get(name)
            if entry and entry['key'] == key and path.exists():
                _log(f'reusing the test run of {name!r} ({path.name}): its indexes and models did not change')
                res = pt.io.read_results(str(path))
                self.latency.update(entry['latency'])
                self.cached_runs.append(name)
            else:
                if first is not None and first not in first_results:
                    start = time.perf_counter()
                    first_results[first] = self.first_stages[first](self.test)
                    self.latency[f'first stage: {first}'] = 1000 * (time.perf_counter() - start) / n
                start = time.perf_counter()
                plain = name[:-len(FUSED_SUFFIX)] if name.endswith(FUSED_SUFFIX) else None   # its reranker row
                if plain in runs:
                    # the reranker's own test run, on the same candidates: its scores are fused, not computed again,
                    # and the reranker's time is counted in the latency (a run read back from its TREC file has
                    # scores rounded to about 6 significant digits)
                    _log(f'{name}: fusing the test scores of {plain!r} with those of {first!r}')
                    res = transformer.combine(first_results[first], runs[plain])
                    elapsed = 1000 * (time.perf_counter() - start) / n + self.latency[f'{plain} (reranking only)']
                else:
                    res = transformer(first_results[first] if first is not None else self.test)
                    elapsed = 1000 * (time.perf_counter() - start) / n
                self.latency[name] = elapsed + (self.latency[f'first stage: {first}'] if first else 0.0)
                if first is not None:
                    self.latency[f'{name} (reranking only)'] = elapsed
                tmp = path.with_name(f'.{path.name}.tmp.gz')     # a run file is complete or absent
                pt.io.write_results(res, str(tmp), format='trec', run_name=slug)
                os.replace(tmp, path)
                entry = {'key': key, 'latency': {k: v for k, v in self.latency.items()
                                                 if k in (name, f'{name} (reranking only)', f'first stage: {first}')}}
            # keyed by the files as they are after the run: some are written on first use (PISA's BM25 data)
            manifest[name] = {**entry, 'key': self._run_key(name, first), 'file': path.name}
            runs[name] = res
            atomic_write_text(manifest_path, json.dumps({**old, **manifest}, indent=2))
            del transformer
            gc.collect()   # frees the models only this pipeline held (see self._models)
        for name, (first, _) in systems.items():   # the state the next invocation will find
            manifest[name]['key'] = self._run_key(name, first)
        for stale in set(p.name for p in runs_dir.glob('*.res.gz')) - {e['file'] for e in manifest.values()}:
            (runs_dir / stale).unlink()   # never leave a run of a pipeline that is not in this report
        atomic_write_text(manifest_path, json.dumps(manifest, indent=2))
        return runs

    def run(self) -> pd.DataFrame:
        self.out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        self._check_models()
        self._load_data()
        self._build_indexes()
        self._fit_budgets()
        systems = self.pipelines()
        names = list(systems)
        _log(f'{len(names)} pipelines, each trained or loaded and then run on {len(self.test)} {self.s.test_split} '
             f'queries: {", ".join(names)}')
        runs = self._run_systems(systems)
        frames = [runs[name] for name in names]
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', RuntimeWarning)   # t-test between identical runs gives nan
            results = pt.Experiment(frames, self.test, self.test_qrels, measures(self.s.measures, self.s.rel), names=names,
                                    baseline=names.index(BASELINE), test='t', correction='holm')
            perquery = pt.Experiment(frames, self.test, self.test_qrels, measures(self.s.measures, self.s.rel), names=names, perquery=True)
        results['ms/query'] = [self.latency[name] for name in names]
        results.to_csv(self.out / 'results.csv', index=False)
        perquery.to_csv(self.out / 'perquery.csv', index=False)
        comparisons = paired_comparisons(perquery, names)
        comparisons.to_csv(self.out / 'comparisons.csv', index=False)
        if self.fusion_weights:
            atomic_write_text(self.out / 'fusion_weights.json', json.dumps(self.fusion_weights, indent=2))
        self.timings['total'] = time.perf_counter() - started
        plots = write_plots(self, perquery, names)
        write_report(self, results, plots, comparisons)
        write_run_info(self)
        _log(f'wrote {self.out / "report.md"}')
        return results
