"""The main job: build indexes, train every requested component, compare all pipelines with one pt.Experiment.

Everything is cached under ``--out`` (indexes, trained models, runs), so a rerun only evaluates unless asked
to ``--retrain``. Output: ``results.csv`` (the pt.Experiment frame, with p-value columns), ``perquery.csv``,
TREC runs under ``runs/``, ``report.md``, and PNG plots of training curves and per-query differences.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import hashlib
import re
import json
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pandas as pd
import pyterrier as pt

from ._util import atomic_write_text, infer_device
from .artifacts import private_directory, replace_directory
from .datasets import load_dataset
from .labels import choose_label_scale

COMPONENTS = ('bm25', 'dense', 'coder', 'adore', 'electra')
SPEC_FILE = 'experiment_spec.json'   # beside each trained model: the settings it was trained with
BASELINE = 'BM25 >> Dense'
MEASURES = ('nDCG@10', 'RR@10', 'R@100', 'R@1000', 'AP')
#: paired comparisons reported besides the baseline table: (system, reference) -- a reranker against its own
#: first stage, a fine-tuned single-stage retriever against the model it started from, an ablation against the
#: full method (same budget)
COMPARISONS = (
    ('BM25 >> CODER', 'BM25'), ('BM25 >> MonoELECTRA', 'BM25'), ('CODER', 'Dense'), ('ADORE', 'Dense'),
    ('BM25 >> CODER (margin loss)', 'BM25 >> CODER'), ('BM25 >> CODER (N=32)', 'BM25 >> CODER'),
    ('BM25 >> CODER(ADORE init)', 'BM25 >> CODER'), ('ADORE (static negatives)', 'ADORE'),
    ('ADORE (RankNet, no ΔM)', 'ADORE'), ('BM25 >> MonoELECTRA (CE)', 'BM25 >> MonoELECTRA'),
    ('BM25 >> MonoELECTRA (LCE, n=2)', 'BM25 >> MonoELECTRA'),
    ('BM25 >> CODER (+ BM25 score)', 'BM25'), ('BM25 >> CODER (+ BM25 score)', 'BM25 >> CODER'),
    ('BM25 >> MonoELECTRA (+ BM25 score)', 'BM25'), ('BM25 >> MonoELECTRA (+ BM25 score)', 'BM25 >> MonoELECTRA'),
)
#: the reranker rows that are also reported fused with BM25's score (``fusion.Interpolate``, weight chosen on dev)
FUSED_SUFFIX = ' (+ BM25 score)'

# The budgets. The positive threshold (min_label, lower_labels) is not here: it is read from each collection's
# training qrels (labels.choose_label_scale). The full budget trains each query encoder for at most `epochs` passes
# over the training queries that have a positive (capped at max_steps), validating every eval_every steps (fewer on a
# small collection, see Experiment._fit_budgets) and stopping after `patience` validations without improvement of the
# mean of the last `smoothing` ones. They were chosen on NFCorpus with the MiniLM base on a 2-core CPU
# (docs/results.md); --quick shrinks everything to a smoke run whose figures mean nothing.
FULL = dict(
    coder=dict(num_candidates=1000, lr=2e-5, optimizer='adamw', warmup=0.1, schedule='constant', epochs=30.0,
               max_steps=1000, eval_every=50, patience=4, smoothing=2, batch_size=32),
    adore=dict(k=200, delta_metric='MRR@200', lr=2e-5, warmup=0.1, epochs=20.0, max_steps=500, eval_every=50,
               patience=4, smoothing=2, batch_size=32),
    # a MiniLM backbone with a fresh head (no ELECTRA offline); 800 steps x 32 pairs at most, passages cut to 128
    # tokens, the fresh head at a higher lr (docs/electra.md). On a CPU with bf16 instructions the runner adds
    # amp=True (bf16 autocast: the same test figures as fp32, in about two thirds of the training time and half the
    # scoring time)
    electra=dict(group_size=8, negatives_from=100, loss='lce', lr=5e-5, head_lr=2e-3, warmup=0.1, epochs=4.0,
                 max_steps=800, eval_every=100, patience=3, smoothing=2, train_batch_size=4, max_length=128),
    rerank_depth=100, train_queries=None, dev_queries=None, test_queries=None, electra_dev_queries=60,
    electra_dev_depth=30,
)
QUICK = dict(
    coder=dict(num_candidates=100, lr=2e-5, optimizer='adamw', warmup=0, schedule='constant', max_steps=10,
               eval_every=5, batch_size=16),
    adore=dict(k=50, delta_metric='MRR@200', lr=2e-5, warmup=0, max_steps=10, eval_every=5, batch_size=16),
    electra=dict(group_size=4, negatives_from=20, loss='lce', lr=1e-4, head_lr=1e-3, max_steps=4,
                 eval_every=2, train_batch_size=2, max_length=128),
    rerank_depth=10, train_queries=200, dev_queries=30, test_queries=60, electra_dev_queries=10,
    electra_dev_depth=10,
)
#: a run validates at least about this many times: eval_every is lowered on a collection with few training queries
MIN_VALIDATIONS = 8
#: per trainer, its settings bounded by the number of documents, and its batch-size setting
DOCUMENT_BOUNDED = {'coder': ('num_candidates',), 'adore': ('k',), 'electra': ('negatives_from', 'group_size')}
BATCH_SETTING = {'coder': 'batch_size', 'adore': 'batch_size', 'electra': 'train_batch_size'}


def paired_comparisons(perquery: pd.DataFrame, names: List[str]) -> pd.DataFrame:
    """Paired t-tests of the :data:`COMPARISONS` whose two systems are both in ``names``, over a per-query frame
    (``qid``, ``name``, ``measure``, ``value``); uncorrected p-values: each pair is its own question."""
    from scipy import stats
    rows = []
    for measure in ('nDCG@10', 'RR@10'):
        table = perquery[perquery['measure'] == measure].pivot(index='qid', columns='name', values='value')
        for system, reference in COMPARISONS:
            if system in names and reference in names:
                a, b = table[system], table[reference]
                with warnings.catch_warnings():
                    warnings.simplefilter('ignore', RuntimeWarning)
                    p = stats.ttest_rel(a, b).pvalue
                rows.append({'system': system, 'reference': reference, 'measure': measure,
                             'system value': a.mean(), 'reference value': b.mean(), 'difference': a.mean() - b.mean(),
                             'wins': int((a > b).sum()), 'losses': int((a < b).sum()), 'p-value': p})
    return pd.DataFrame(rows, columns=['system', 'reference', 'measure', 'system value', 'reference value',
                                       'difference', 'wins', 'losses', 'p-value'])


@dataclasses.dataclass
class ExperimentSettings:
    dataset: str
    out: str
    base: str = 'minilm'
    cross_encoder: str = 'minilm'
    components: tuple = COMPONENTS
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
    verbose: bool = True


def parse_overrides(items) -> dict:
    """``['electra.max_steps=600', 'rerank_depth=50']`` -> ``{'electra': {'max_steps': 600}, 'rerank_depth': 50}``.
    Values are Python literals (numbers, strings, None, True/False); anything else is kept as a string."""
    overrides: dict = {}
    for item in items or ():
        key, sep, raw = item.partition('=')
        if not sep or not key.strip():
            raise ValueError(f'--set expects key=value or component.key=value, got {item!r}')
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = raw.strip()
        component, dot, name = key.strip().partition('.')
        if dot:
            overrides.setdefault(component, {})[name] = value
        else:
            overrides[component] = value
    return overrides


def _component_class(component: str):
    if component == 'coder':
        from .coder import Coder
        return Coder
    if component == 'adore':
        from .adore import Adore
        return Adore
    from .electra import MonoElectra
    return MonoElectra


def apply_overrides(budget: dict, overrides: dict) -> dict:
    """A copy of ``budget`` with ``overrides`` applied; unknown names fail here, before any index is built."""
    from .training import at_least, check_settings, setting_defaults
    budget = copy.deepcopy(budget)
    for key, value in overrides.items():
        if key not in budget:
            raise ValueError(f'--set: unknown budget entry {key!r}; known: {sorted(budget)}')
        if isinstance(budget[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f'--set: {key} is a component; set its settings as {key}.<name>=<value>')
            cls = _component_class(key)
            # the runner passes the index, models, device, seed and texts itself
            defaults = setting_defaults(cls)
            accepted = set(defaults) - {'index', 'encoder', 'model', 'device', 'seed', 'verbose', 'texts'}
            unknown = set(value) - accepted
            if unknown:
                raise ValueError(f'--set: {cls.__name__} has no setting {sorted(unknown)}')
            for name, item in value.items():
                _check_override_type(f'{key}.{name}', item, [budget[key].get(name), *(
                    b[key].get(name) for b in (FULL, QUICK)), defaults[name]])
            budget[key].update(value)
            try:   # the values the constructor would refuse (loss='foo', group_size=None ...), refused now
                check_settings(cls, budget[key])
            except ValueError as error:
                raise ValueError(f'--set: {error}') from None
        else:
            defaults = [budget[key], FULL[key], QUICK[key]]
            if value is None and None not in defaults:   # the runner's own entries: None only where a budget has it
                raise ValueError(f'--set: {key} cannot be None (its default is {FULL[key]!r})')
            _check_override_type(key, value, defaults)
            if value is not None and not at_least(value, 1):     # depths and query counts
                raise ValueError(f'--set: {key} must be >= 1' + (' or None' if None in defaults else '') +
                                 f', got {value!r}')
            budget[key] = value
    return budget


def _check_override_type(name: str, value, defaults: list) -> None:
    """A --set value must have the type of the setting's defaults (the budgets' and the component's), so that
    ``max_steps=ten`` fails here, naming the setting, and not after the indexes were built. A number is accepted
    where any default is a float (``warmup`` is 0.1 in one budget, 0 steps in the other). None is accepted (for a
    component's setting it can mean "off" or "the default", e.g. ``grad_clip``); settings without a typed default
    are not checked."""
    typed = [d for d in defaults if d is not None]
    if value is None or not typed:
        return

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)   # bool is a subclass of int
    if all(isinstance(d, bool) for d in typed):
        expected, ok = 'True or False', isinstance(value, bool)
    elif all(is_int(d) or isinstance(d, float) for d in typed):
        if any(isinstance(d, float) for d in typed):
            expected, ok = 'a number', is_int(value) or isinstance(value, float)
        else:
            expected, ok = 'an integer', is_int(value)
    elif all(isinstance(d, str) for d in typed):
        expected, ok = 'a string', isinstance(value, str)
    else:
        return
    if not ok:
        raise ValueError(f'--set: {name} must be {expected} (its default is {typed[0]!r}), got {value!r}')


def _log(msg: str) -> None:
    print(f'[pyterrier-coder] {msg}', flush=True)


def _measures():
    from pyterrier.measures import nDCG, RR, R, AP
    return [nDCG @ 10, RR @ 10, R @ 100, R @ 1000, AP]


class Experiment:
    """Runs the whole comparison described by :class:`ExperimentSettings`."""

    def __init__(self, settings: ExperimentSettings):
        self.s = settings
        self.out = Path(settings.out)
        self.budget = apply_overrides(QUICK if settings.quick else FULL, settings.overrides)
        unknown = set(settings.components) - set(COMPONENTS)
        if unknown:
            raise ValueError(f'unknown components {sorted(unknown)}; choose from {COMPONENTS}')
        self.device = str(infer_device(settings.device))
        from .training import cpu_computes_bf16
        if self.device == 'cpu' and 'amp' not in self.budget['electra'] and cpu_computes_bf16():
            self.budget['electra']['amp'] = True
            if 'electra' in settings.components:
                _log('this CPU has bf16 instructions: MonoELECTRA trains and scores under bf16 autocast '
                     '(--set electra.amp=False for fp32)')
        self.timings: Dict[str, float] = {}
        self.histories: Dict[str, dict] = {}
        self.fusion_weights: Dict[str, dict] = {}   # pipeline name -> Interpolate.history (weight chosen on dev)
        self._models: Dict[str, object] = {}
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
        needed = [self.s.test_split] + ([self.s.train_split, self.s.dev_split] if self._trains_anything() else [])
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
        if self._trains_anything():
            self.train = self._topics(self.s.train_split, b['train_queries'], what='train_queries')
            self.train_qrels = self.dataset.get_qrels(self.s.train_split)
            self.dev = self._topics(self.s.dev_split, b['dev_queries'], what='dev_queries')
            self.dev_qrels = self.dataset.get_qrels(self.s.dev_split)
            self.label_scale = choose_label_scale(self.train_qrels, self.train)
            _log(f'positives: label >= {self.label_scale.min_label} ({self.label_scale.reason})')

    def _fit_budgets(self) -> None:
        """Fits the budget to the collection (each change logged, the result in report.md): the label threshold chosen
        from the training qrels unless ``--set``; depths and candidate counts no larger than the corpus; batches no
        larger than the training queries with a positive; ``epochs`` resolved into steps, with ``eval_every`` lowered
        so that a run validates about :data:`MIN_VALIDATIONS` times."""
        b, docs = self.budget, len(self.dense)
        self.budget_notes: List[str] = []

        def note(message):
            self.budget_notes.append(message)
            _log(message)
        for key in ('rerank_depth', 'electra_dev_depth'):
            if b[key] > docs:
                note(f'{key}: {b[key]} is more than the {docs} documents of the collection: {docs}')
                b[key] = docs
        if not self._trains_anything():
            return
        scale = self.label_scale
        positive_qids = set(self.train_qrels.loc[self.train_qrels['label'] >= scale.min_label, 'qid'].astype(str))
        for component in ('coder', 'adore', 'electra'):
            settings, given = b[component], self.s.overrides.get(component, {})
            for name, value in scale.settings().items():
                if name not in given and (name != 'lower_labels' or component != 'adore'):
                    settings[name] = value
            threshold = settings.get('min_label', scale.min_label)
            n_train = int(self.train['qid'].astype(str).isin(
                positive_qids if threshold == scale.min_label else set(self.train_qrels.loc[
                    self.train_qrels['label'] >= threshold, 'qid'].astype(str))).sum())
            for name in DOCUMENT_BOUNDED[component]:
                if settings.get(name) is not None and settings[name] > docs:
                    note(f'{component}.{name}: {settings[name]} is more than the {docs} documents: {docs}')
                    settings[name] = docs
            batch = BATCH_SETTING[component]
            if n_train and settings.get(batch, 0) > n_train:
                note(f'{component}.{batch}: {settings[batch]} is more than the {n_train} training queries with a '
                     f'positive: {n_train}')
                settings[batch] = n_train
            epochs, cap = settings.get('epochs'), settings.get('max_steps')
            if epochs is None or not n_train:
                continue
            per_epoch = math.ceil(n_train / settings[batch])
            steps = math.ceil(epochs * per_epoch) if cap is None else min(cap, math.ceil(epochs * per_epoch))
            every = settings.get('eval_every')
            if every is not None and every > max(1, steps // MIN_VALIDATIONS):
                settings['eval_every'] = max(1, steps // MIN_VALIDATIONS)
            note(f'{component}: {n_train} training queries with a positive, {per_epoch} steps per epoch: at most '
                 f'{steps} steps ({epochs:g} epochs' + (f', at most {cap} steps' if cap is not None else '') +
                 f'), validating every {settings.get("eval_every")} steps' +
                 (f', stopping after {settings["patience"]} validations without improvement'
                  if settings.get('patience') else ''))

    def _check_models(self) -> None:
        """Fails before anything is built when a starting model cannot be found (its config is read): a typo in
        ``--base`` would otherwise surface after the BM25 index was built, one in ``--cross-encoder`` after the
        bi-encoders were trained."""
        from transformers import AutoConfig
        from ._util import explained_model_errors
        from .electra import model_path as cross_encoder_path
        from .encoders import model_path as bi_encoder_path
        paths = {'DenseEncoder': bi_encoder_path(self.s.base)}
        if 'electra' in self.s.components:
            paths['MonoElectra'] = cross_encoder_path(self.s.cross_encoder)
        for component, path in paths.items():
            with explained_model_errors(component, path):
                AutoConfig.from_pretrained(path)

    def _trains_anything(self) -> bool:
        return bool({'coder', 'adore', 'electra'} & set(self.s.components))

    # --- indexes -------------------------------------------------------------------------------------------
    def _build_indexes(self):
        """Builds the BM25 and dense indexes under ``--out``, or reuses them when they were built from this
        collection's corpus (and, for the dense index, by this ``--base`` encoder); an index built from another
        corpus or encoder (the same ``--out`` used with another ``--dataset`` or ``--base``) is rebuilt."""
        from .artifacts import CorpusFingerprint, describe_corpus
        from .encoders import DenseEncoder, DenseIndex, encoder_record, same_encoder
        from .retrievers import BM25
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
        path = self._model_dir(name) / SPEC_FILE
        return json.loads(path.read_text()) if path.exists() else None

    def _train_or_load(self, name: str, cls, spec: dict, make, fit):
        """Loads ``models/<name>`` when present and trained with the same ``spec`` (unless --retrain), else builds
        with ``make()``, trains with ``fit(model)`` and saves."""
        self._used_models.append(name)
        if name in self._models:   # already trained or loaded in this run
            return self._models[name]
        path = self._model_dir(name)
        saved = self._saved_spec(name) if path.exists() else None
        if saved == spec and not self.s.retrain:
            _log(f'reusing trained {name} from {path}')
            from .query_trainer import DenseQueryTrainer
            index = {'index': self.dense.flex} if issubclass(cls, DenseQueryTrainer) else {}
            model = cls.load(path, **index, device=self.s.device)
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
        if model.history is not None:
            self.histories[name] = model.history
        self._models[name] = model
        return model

    def _coder(self, name='coder', *, single_stage=False, init: Optional[str] = None, **overrides):
        """CODER(M_D, M_C): M_C = BM25 (the cascade ``BM25 >> CODER``), or M_C = M_D (``single_stage``: the
        candidates are the base model's own top-N and validation retrieves from the whole index). ``init`` names a
        trained model whose query encoder CODER starts from (default: the base encoder)."""
        from .coder import Coder
        kwargs = {**self.budget['coder'], **overrides}
        if single_stage:
            fit = lambda m: m.fit(self.train, self.train_qrels, self.dev, self.dev_qrels)
        else:
            candidates = self.bm25 % kwargs['num_candidates']
            fit = lambda m: (candidates >> m).fit(self.train, self.train_qrels, self.dev, self.dev_qrels)
        encoder = self._models_by_init[init]().encoder if init else self.encoder
        spec = self._spec(name, kwargs, single_stage=single_stage, init=init,
                          init_spec=self._saved_spec(init) if init else None)
        return self._train_or_load(
            name, Coder, spec,
            lambda: Coder(self.dense, encoder, seed=self.s.seed, device=self.s.device, verbose=self.s.verbose,
                          **kwargs), fit)

    def _adore(self, name='adore', **overrides):
        from .adore import Adore
        kwargs = {**self.budget['adore'], **overrides}
        return self._train_or_load(
            name, Adore, self._spec(name, kwargs),
            lambda: Adore(self.dense, self.encoder, seed=self.s.seed, device=self.s.device, verbose=self.s.verbose,
                          **kwargs),
            lambda m: m.fit(self.train, self.train_qrels, self.dev, self.dev_qrels))

    def _electra(self, name='electra', **overrides):
        from .electra import MonoElectra
        kwargs = {**self.budget['electra'], **overrides}
        # validation reranks a shallower list than the test (it runs several times during training)
        first = self.bm25 % self.budget['electra_dev_depth'] >> self.bm25.text_loader()
        negatives_from = kwargs.get('negatives_from', 200)
        dev = self._topics(self.s.dev_split, self.budget['electra_dev_queries'], what='electra_dev_queries')
        return self._train_or_load(
            name, MonoElectra, self._spec(name, kwargs, cross_encoder=self.s.cross_encoder),
            lambda: MonoElectra(self.s.cross_encoder, seed=self.s.seed, device=self.s.device,
                                verbose=self.s.verbose, texts=self.bm25.text_loader(), **kwargs),
            lambda m: m.fit((self.bm25 % negatives_from >> self.bm25.text_loader())(self.train), self.train_qrels,
                            first(dev), self.dev_qrels))

    def _fused(self, name: str, first: str, reranker, dev: pd.DataFrame):
        """``reranker()`` interpolated with the score of the first stage ``first`` (the same first stage as on test),
        the weight chosen on ``dev``'s candidates. The weight is kept in ``fusion_weights.json`` with a key like a
        test run's (:meth:`_key`, over the dev queries): an invocation that finds the same key reuses the weight
        instead of scoring ``dev`` again."""
        from .fusion import Interpolate
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
        if not self.s.ablations:
            return systems
        # the papers' ablation rows (CODER Fig. 2, ADORE static negatives / RankNet, LCE vs CE and group size)
        if 'coder' in comps:
            add('BM25 >> CODER (margin loss)', 'BM25', lambda: self._coder('coder_margin', loss='margin'))
            add('BM25 >> CODER (N=32)', 'BM25', lambda: self._coder('coder_n32', num_candidates=32))
        if 'adore' in comps:
            add('ADORE (static negatives)', None, lambda: self._adore('adore_static', dynamic=False).retriever(1000))
            add('ADORE (RankNet, no ΔM)', None,
                lambda: self._adore('adore_ranknet', lambda_weighting=False).retriever(1000))
        if 'electra' in comps:
            add('BM25 >> MonoELECTRA (CE)', text_stage, lambda: self._electra('electra_ce', loss='ce'))
            # LCE paper, Fig. 3: group size at an equal number of query-passage pairs per step
            e = self.budget['electra']
            pairs = e['group_size'] * e['train_batch_size']
            add('BM25 >> MonoELECTRA (LCE, n=2)', text_stage,
                lambda: self._electra('electra_n2', group_size=2, train_batch_size=max(1, pairs // 2)))
        return systems

    # --- evaluation and report -----------------------------------------------------------------------------
    def _file_stamps(self, models: List[str]) -> Dict[str, list]:
        """(file, size, modification time) of every file of the indexes and of the trained model directories
        ``models``, as they are now."""
        dirs = [self.out / 'indexes' / 'bm25', self.out / 'indexes' / 'dense.flex'] + \
            [self._model_dir(m) for m in models]
        return {str(path.relative_to(self.out)): sorted((str(f.relative_to(path)), f.stat().st_size,
                                                          f.stat().st_mtime_ns)
                                                         for f in path.rglob('*') if f.is_file())
                for path in dirs if path.exists()}

    def _key(self, name: str, first: Optional[str], qids, models: List[str]) -> str:
        """What a pipeline's output on the queries ``qids`` depends on: its name and first stage, the queries, the
        shared budget entries, and the files of the indexes and of the trained ``models`` it uses now
        (:meth:`_file_stamps`)."""
        # component budgets are not here: they reach a run only through its models, whose files are stamped
        blob = json.dumps([name, first, sorted(qids), self._shared_budget(), self.s.base, self.s.cross_encoder,
                           self._file_stamps(models)], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

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
            results = pt.Experiment(frames, self.test, self.test_qrels, _measures(), names=names,
                                    baseline=names.index(BASELINE), test='t', correction='holm')
            perquery = pt.Experiment(frames, self.test, self.test_qrels, _measures(), names=names, perquery=True)
        results['ms/query'] = [self.latency[name] for name in names]
        results.to_csv(self.out / 'results.csv', index=False)
        perquery.to_csv(self.out / 'perquery.csv', index=False)
        comparisons = paired_comparisons(perquery, names)
        comparisons.to_csv(self.out / 'comparisons.csv', index=False)
        if self.fusion_weights:
            atomic_write_text(self.out / 'fusion_weights.json', json.dumps(self.fusion_weights, indent=2))
        self.timings['total'] = time.perf_counter() - started
        plots = self._plots(perquery, names)
        self._report(results, plots, comparisons)
        self._write_run_info()
        _log(f'wrote {self.out / "report.md"}')
        return results

    def _write_run_info(self) -> None:
        """``run_info.json``: what produced these outputs (settings, command line, the package's commit, the machine)
        and how it went (wall time, training summaries, the label choice and budget changes), for reports made from
        the outputs (e.g. the docs' results tables)."""
        info = {'settings': json.loads(json.dumps(dataclasses.asdict(self.s), default=str)), 'argv': sys.argv,
                'commit': source_commit(), 'machine': machine_description(self.device),
                'wall_seconds': self.timings['total'], 'timings': self.timings, 'budget': self.budget,
                'budget_notes': getattr(self, 'budget_notes', []),
                'label_scale': dataclasses.asdict(self.label_scale) if self._trains_anything() else None,
                'test_queries': len(self.test), 'reused_runs': self.cached_runs,
                'training': {name: {key: h.get(key) for key in ('steps', 'seconds', 'best_step', 'best_metric',
                                                                 'stopped_early', 'metric', 'eval')}
                             for name, h in self.histories.items()}}
        atomic_write_text(self.out / 'run_info.json', json.dumps(info, indent=2, default=str))

    def _plots(self, perquery: pd.DataFrame, names: List[str]) -> List[str]:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        files = []
        for name, history in self.histories.items():
            fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
            steps, loss = zip(*history['loss']) if history['loss'] else ((), ())
            ax1.plot(steps, loss, lw=0.8)
            if len(loss) > 10:
                window = max(2, len(loss) // 20)
                smooth = np.convolve(loss, np.ones(window) / window, mode='valid')
                ax1.plot(steps[window - 1:], smooth, lw=2, label=f'mean of {window}')
                ax1.legend()
            ax1.set(title=f'{name}: training loss', xlabel='step', ylabel='loss')
            if history.get('eval'):
                s, v = zip(*history['eval'])
                ax2.plot(s, v, marker='o')
                ax2.axvline(history['best_step'], color='grey', ls='--', label='best (kept)')
                ax2.legend()
            ax2.set(title=f'{name}: validation {history["metric"]}', xlabel='step', ylabel=history['metric'])
            fig.tight_layout()
            path = self.out / f'training_{name}.png'
            fig.savefig(path, dpi=100)
            plt.close(fig)
            files.append(path.name)
        ndcg = perquery[perquery['measure'] == 'nDCG@10'].pivot(index='qid', columns='name', values='value')
        others = [n for n in names if n != BASELINE]
        if others:
            fig, axes = plt.subplots(len(others), 1, figsize=(10, 2.2 * len(others)), squeeze=False)
            for ax, name in zip(axes[:, 0], others):
                diff = (ndcg[name] - ndcg[BASELINE]).sort_values(ascending=False).to_numpy()
                ax.bar(np.arange(len(diff)), diff, width=1.0, color=np.where(diff >= 0, 'tab:green', 'tab:red'))
                ax.axhline(0, color='black', lw=0.5)
                ax.set(title=f'{name} − {BASELINE}: per-query nDCG@10 (mean {diff.mean():+.4f})', ylabel='Δ nDCG@10')
            axes[-1, 0].set_xlabel('queries (sorted)')
            fig.tight_layout()
            path = self.out / 'perquery_ndcg_diff.png'
            fig.savefig(path, dpi=100)
            plt.close(fig)
            files.append(path.name)
        return files

    def _report(self, results: pd.DataFrame, plots: List[str], comparisons: pd.DataFrame) -> None:
        cols = ['name'] + [m for m in MEASURES if m in results.columns]
        pcols = [f'{m} p-value corrected' for m in ('nDCG@10', 'RR@10') if f'{m} p-value corrected' in results.columns]
        table = results[cols + pcols + ['ms/query']].copy()
        lines = [f'# pyterrier-coder experiment: {self.s.dataset}', '',
                 f'Test split `{self.s.test_split}` ({len(self.test)} queries); baseline `{BASELINE}`; paired t-test '
                 f'with Holm correction over all pipelines; `ms/query` = wall time per query of the whole pipeline.',
                 '' if not self.s.quick else '\n**--quick smoke run: tiny budgets, the figures mean nothing.**\n',
                 markdown_table(table), '']
        if len(comparisons):
            lines += ['## Paired comparisons', '',
                      'Each reranker against its own first stage, each fine-tuned single-stage retriever against '
                      'the model it started from, each ablation against the full method (paired t-test over the '
                      'test queries, uncorrected).', '', markdown_table(comparisons), '']
        if self.cached_runs:
            lines += [f'Test runs reused from a previous invocation (unchanged indexes and models): '
                      f'{", ".join(self.cached_runs)}.', '']
        if self._trains_anything():
            scale = self.label_scale
            lines += ['## Training data and budgets', '',
                      f'- Positives: label >= {scale.min_label}, lower grades '
                      f'{"kept out of the negatives" if scale.lower_labels == "ignore" else "train as negatives"} '
                      f'({scale.reason}; `--set <component>.min_label=...` overrides).']
            lines += [f'- {note}' for note in getattr(self, 'budget_notes', [])] + ['']
        lines += ['## Settings', '', '```json',
                 json.dumps({**dataclasses.asdict(self.s), 'device': self.device,
                             'budget': self.budget}, indent=2, default=str), '```', '',
                 '## Training and indexing time (s)', '', '| what | seconds |', '|---|---|']
        lines += [f'| {k} | {v:.1f} |' for k, v in self.timings.items()]
        lines += ['', '## Latency per query (ms)', '', '| pipeline | ms/query |', '|---|---|']
        lines += [f'| {k} | {v:.2f} |' for k, v in self.latency.items()]
        lines += ['', '## Training summaries', '']
        for name, h in self.histories.items():
            extra = f', retrieval share of step time {h["retrieval_share"]:.1%}' if 'retrieval_share' in h else ''
            lines.append(f'- **{name}**: {h.get("steps")} steps in {h.get("seconds", 0):.0f} s; best validation '
                         f'{h.get("metric")} {h.get("best_metric")} at step {h.get("best_step")} '
                         f'(start {h["eval"][0][1] if h.get("eval") else "n/a"}){extra}')
        curves = {name: h['eval'] for name, h in self.histories.items() if h.get('eval')}
        if curves:
            lines += ['', '## Validation curves', '',
                      f'The validation metric at each validation (step: value); **bold**: the step kept.', '']
            for name, curve in curves.items():
                best = self.histories[name].get('best_step')
                lines.append(f'- **{name}** ({self.histories[name].get("metric")}): ' + ', '.join(
                    (f'**{step}: {value:.4f}**' if step == best else f'{step}: {value:.4f}') for step, value in curve))
        if self.fusion_weights:
            lines += ['', '## Interpolation weights', '',
                      'Each `(+ BM25 score)` row is `fusion.Interpolate`: weight × the reranker\'s score + (1 − weight) '
                      '× BM25\'s, both min-max normalised per query, the weight chosen on dev candidates at the test '
                      'depth.', '']
            for name, h in self.fusion_weights.items():
                curve = ', '.join(f'{a:g}: {v:.4f}' for a, v in h['by_alpha'])
                lines.append(f'- **{name}**: weight {h["alpha"]:g} ({h["validation_queries"]} dev queries; dev '
                             f'{h["metric"]} by weight: {curve})')
        lines += ['', '## Plots', ''] + [f'![{p}]({p})' for p in plots] + ['']
        atomic_write_text(self.out / 'report.md', '\n'.join(lines))


def source_commit() -> Optional[dict]:
    """The git commit of the package's source tree (and whether it had uncommitted changes), when it is a git
    checkout; None otherwise (an installed wheel)."""
    import subprocess
    root = Path(__file__).resolve().parents[1]
    if not (root / '.git').exists():
        return None
    try:
        commit = subprocess.run(['git', '-C', str(root), 'rev-parse', 'HEAD'], capture_output=True, text=True,
                                timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(['git', '-C', str(root), 'status', '--porcelain', '--untracked-files=no'],
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {'commit': commit, 'uncommitted_changes': bool(dirty)}


def machine_description(device: str) -> dict:
    """Cores, CPU model and the instruction sets that change the figures or the speed (bf16, AMX), torch, GPU."""
    import os
    import platform
    import torch
    from .training import cpu_computes_bf16
    flags, model = set(), platform.processor()
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('flags') and not flags:
                flags = set(line.split(':', 1)[1].split())
            elif line.startswith('model name') and ':' in line:
                model = line.split(':', 1)[1].strip()
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    return {'cpu': model, 'cores': os.cpu_count(), 'usable_cores': usable,
            'cpu_flags': sorted(flags & {'avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile'}),
            'cpu_computes_bf16': cpu_computes_bf16(), 'torch': torch.__version__, 'device': device,
            'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            'memory_gib': round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30, 1)
            if hasattr(os, 'sysconf') else None}


def markdown_table(frame: pd.DataFrame) -> str:
    """A DataFrame as a GitHub markdown table (4 decimals; no tabulate dependency)."""
    def fmt(v):
        if isinstance(v, float):
            return 'nan' if np.isnan(v) else (f'{v:.2e}' if 0 < abs(v) < 1e-3 else f'{v:.4f}')
        return str(v)
    head = '| ' + ' | '.join(frame.columns) + ' |'
    sep = '|' + '---|' * len(frame.columns)
    rows = ['| ' + ' | '.join(fmt(v) for v in row) + ' |' for row in frame.itertuples(index=False)]
    return '\n'.join([head, sep] + rows)
