"""The runner's budgets: the settings of each trained component (full and --quick), the `--set` changes to them
(checked before anything is built) and their fitting to a collection (its size, its training queries)."""
from __future__ import annotations

import ast
import copy
import math
from typing import List, Optional

from ..adore import Adore
from ..coder import Coder
from ..electra import MonoElectra
from ..star import Star
from ..tasb import TasBalanced
from ..training import check_settings, is_number_at_least, setting_defaults

#: the components the runner can build and train
COMPONENTS = ('bm25', 'dense', 'coder', 'adore', 'electra', 'star', 'tasb')
#: what the main job builds when --components is not given (STAR and TAS-Balanced train document encoders: slower)
DEFAULT_COMPONENTS = ('bm25', 'dense', 'coder', 'adore', 'electra')
#: the components that are trained, each with its budget entry
TRAINED = ('coder', 'adore', 'electra', 'star', 'tasb')

# The budgets. The positive threshold (min_label, lower_labels) is not here: it is read from each collection's
# training qrels (labels.choose_label_scale). The full budget trains each query encoder for at most `epochs` passes
# over the training queries that have a positive (capped at max_steps), validating every eval_every steps (fewer on a
# small collection, see fit_budget) and stopping after `patience` validations without improvement of the
# mean of the last `smoothing` ones. They were chosen on NFCorpus with the MiniLM base on a 2-core CPU
# (docs/results.md); --quick shrinks everything to a smoke run whose figures mean nothing.
FULL = dict(
    coder=dict(num_candidates=1000, lr=2e-5, optimizer='adamw', warmup=0.1, schedule='constant', epochs=30.0,
               max_steps=1000, eval_every=50, patience=4, smoothing=2, batch_size=32),
    # ADORE: each positive's own change of reciprocal rank weighs its pairs (the reference implementation's weights;
    # NFCorpus' training queries have 4.6 label-2 documents on average, and the exact ΔMRR, which moves only the
    # first, validated lower: docs/adore.md)
    adore=dict(k=200, delta_metric='MRR@200', mrr_delta='each_relevant', lr=2e-5, warmup=0.1, epochs=20.0,
               max_steps=500, eval_every=50, patience=4, smoothing=2, batch_size=32),
    # a MiniLM backbone with a fresh head (no ELECTRA offline); 800 steps x 32 pairs at most, passages cut to 128
    # tokens, the fresh head at a higher lr (docs/electra.md). On a CPU with bf16 instructions the runner adds
    # amp=True (bf16 autocast: the same test figures as fp32, in about two thirds of the training time and half the
    # scoring time)
    electra=dict(group_size=8, negatives_from=100, loss='lce', lr=5e-5, head_lr=2e-3, warmup=0.1, epochs=4.0,
                 max_steps=800, eval_every=100, patience=3, smoothing=2, train_batch_size=4, max_length=128),
    # STAR: both towers of the MiniLM bi-encoder, 16 queries per step, one static hard negative each from the
    # starting encoder's own top 200 (the paper's: its warm-up dense model's top 200; the runner fits STAR on plain
    # topics over the zero-shot index) plus the other queries' positives as random negatives, softmax
    # cross-entropy, documents cut to 128 tokens for training. With BM25's top 30 as the hard negatives it trained
    # worse on NFCorpus' dev queries (docs/star.md); sharing the other queries' hard negatives changed nothing there.
    # Validated only before and after its 150 steps: between steps, the 50-query pool's differences are within its
    # noise; the final validation still rejects a run that made things worse
    star=dict(batch_size=16, negatives_per_query=1, hard_negative_depth=200, share_hard_negatives=False,
              loss='softmax', lr=2e-5, warmup=0.1, max_steps=150, eval_every=150, validation_queries=50,
              validation_depth=10, train_doc_max_length=128),
    # TAS-Balanced: 32 queries of one topic cluster per step, margin-balanced pairs from BM25's top 100, the fused
    # CODER as pairwise teacher and the single-stage CODER as in-batch teacher (docs/tasb.md)
    tasb=dict(negative_depth=100, batch_size=32, lr=2e-5, warmup=0.1, schedule='linear', max_steps=100,
              eval_every=25, validation_queries=50, validation_depth=10, train_doc_max_length=128,
              pairwise_scale='auto', in_batch_weight=0.75),
    # CODER over a trained bi-encoder's index (CODER+TAS-Balanced): the coder budget with these changes. Its
    # candidates are re-retrieved by the query encoder being trained every 100 steps (dynamic candidates, the CODER
    # paper's future work): over an index distilled from CODER's own scores, CODER with its static candidates
    # validated lower (docs/tasb.md)
    coder_over=dict(refresh_every=100),
    rerank_depth=100, train_queries=None, dev_queries=None, test_queries=None, electra_dev_queries=60,
    electra_dev_depth=30,
)

QUICK = dict(
    coder=dict(num_candidates=100, lr=2e-5, optimizer='adamw', warmup=0, schedule='constant', max_steps=10,
               eval_every=5, batch_size=16),
    adore=dict(k=50, delta_metric='MRR@200', mrr_delta='each_relevant', lr=2e-5, warmup=0, max_steps=10, eval_every=5,
               batch_size=16),
    electra=dict(group_size=4, negatives_from=20, loss='lce', lr=1e-4, head_lr=1e-3, max_steps=4,
                 eval_every=2, train_batch_size=2, max_length=128),
    star=dict(batch_size=8, negatives_per_query=1, hard_negative_depth=10, lr=2e-5, warmup=0, max_steps=4,
              eval_every=2, validation_queries=10, validation_depth=5, train_doc_max_length=64),
    tasb=dict(negative_depth=10, batch_size=8, lr=2e-5, warmup=0, max_steps=4, eval_every=2, validation_queries=10,
              validation_depth=5, train_doc_max_length=64, pairwise_scale='auto'),
    coder_over=dict(refresh_every=5),
    rerank_depth=10, train_queries=200, dev_queries=30, test_queries=60, electra_dev_queries=10,
    electra_dev_depth=10,
)

#: a run validates at least about this many times: eval_every is lowered on a collection with few training queries
MIN_VALIDATIONS = 8

#: per trainer, its settings bounded by the number of documents, and its batch-size setting
DOCUMENT_BOUNDED = {'coder': ('num_candidates',), 'adore': ('k',), 'electra': ('negatives_from', 'group_size'),
                    'star': ('hard_negative_depth',), 'tasb': ('negative_depth',)}
BATCH_SETTING = {'coder': 'batch_size', 'adore': 'batch_size', 'electra': 'train_batch_size', 'star': 'batch_size',
                 'tasb': 'batch_size'}


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

#: the class of each trained component, whose constructor checks its settings
COMPONENT_CLASSES = {'coder': Coder, 'adore': Adore, 'electra': MonoElectra, 'star': Star, 'tasb': TasBalanced}
#: budget entries that are changes to another component's budget: ``coder_over`` is CODER over a trained
#: bi-encoder's index, trained with the coder budget (as fitted to the collection) updated by it
CHANGES_TO = {'coder_over': 'coder'}


def component_settings(budget: dict, key: str) -> dict:
    """The settings the budget entry ``key`` builds its component with: the entry, over the entry it changes
    (:data:`CHANGES_TO`)."""
    base = CHANGES_TO.get(key)
    return {**(budget[base] if base else {}), **budget[key]}


def apply_overrides(budget: dict, overrides: dict) -> dict:
    """A copy of ``budget`` with ``overrides`` applied; unknown names fail here, before any index is built."""
    budget = copy.deepcopy(budget)
    for key, value in overrides.items():
        if key not in budget:
            raise ValueError(f'--set: unknown budget entry {key!r}; known: {sorted(budget)}')
        if isinstance(budget[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f'--set: {key} is a component; set its settings as {key}.<name>=<value>')
            cls = COMPONENT_CLASSES[CHANGES_TO.get(key, key)]
            # the runner passes the index, models, device, seed and texts itself
            defaults = setting_defaults(cls)
            accepted = set(defaults) - {'index', 'encoder', 'model', 'device', 'seed', 'verbose', 'texts', 'corpus',
                                        'index_path', 'pairwise_teacher', 'in_batch_teacher', 'teacher_cache',
                                        'base_index', 'doc_encoder'}
            unknown = set(value) - accepted
            if unknown:
                raise ValueError(f'--set: {cls.__name__} has no setting {sorted(unknown)}')
            for name, item in value.items():
                _check_override_type(f'{key}.{name}', item, [budget[key].get(name), *(
                    b[key].get(name) for b in (FULL, QUICK)), defaults[name]])
            budget[key].update(value)
        else:
            defaults = [budget[key], FULL[key], QUICK[key]]
            if value is None and None not in defaults:   # the runner's own entries: None only where a budget has it
                raise ValueError(f'--set: {key} cannot be None (its default is {FULL[key]!r})')
            _check_override_type(key, value, defaults)
            if value is not None and not is_number_at_least(value, 1):     # depths and query counts
                raise ValueError(f'--set: {key} must be >= 1' + (' or None' if None in defaults else '') +
                                 f', got {value!r}')
            budget[key] = value
    # the values the constructor would refuse (loss='foo', group_size=None ...), refused now: each changed component
    # with the settings it will be built with, so an entry of CHANGES_TO also when only the entry it changes was set
    changed = [key for key in overrides if isinstance(budget[key], dict)]
    changed += [key for key, base in CHANGES_TO.items() if base in changed and key not in changed]
    for key in changed:
        try:
            check_settings(COMPONENT_CLASSES[CHANGES_TO.get(key, key)], component_settings(budget, key))
        except ValueError as error:
            raise ValueError(f'--set: {error}') from None
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


def fit_budget(budget: dict, overrides: dict, documents: int, training: Optional[tuple] = None) -> List[str]:
    """Fits ``budget`` (changed in place) to a collection of ``documents`` documents and returns one line per
    change. Depths and candidate counts become at most the number of documents. With ``training`` = (label scale,
    training topics, training qrels): each trainer takes the label scale's ``min_label``/``lower_labels`` unless
    ``overrides`` set them, its batch is at most the number of training queries with a positive, and ``epochs`` (with
    ``max_steps`` as a cap) becomes a number of steps, with ``eval_every`` lowered so that a run validates about
    :data:`MIN_VALIDATIONS` times."""
    notes = []
    for key in ('rerank_depth', 'electra_dev_depth'):
        if budget[key] > documents:
            notes.append(f'{key}: {budget[key]} is more than the {documents} documents of the collection: {documents}')
            budget[key] = documents
    if training is None:
        return notes
    scale, topics, qrels = training
    train_qids = topics['qid'].astype(str)
    for component in TRAINED:
        settings, given = budget[component], overrides.get(component, {})
        for name, value in scale.settings().items():
            if name not in given:
                settings[name] = value
        positives = set(qrels.loc[qrels['label'] >= settings.get('min_label', scale.min_label), 'qid'].astype(str))
        n_train = int(train_qids.isin(positives).sum())
        for name in DOCUMENT_BOUNDED[component]:
            if settings.get(name) is not None and settings[name] > documents:
                notes.append(f'{component}.{name}: {settings[name]} is more than the {documents} documents: '
                             f'{documents}')
                settings[name] = documents
        batch = BATCH_SETTING[component]
        if n_train and settings.get(batch, 0) > n_train:
            notes.append(f'{component}.{batch}: {settings[batch]} is more than the {n_train} training queries with a '
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
        notes.append(f'{component}: {n_train} training queries with a positive, {per_epoch} steps per epoch: at most '
                     f'{steps} steps ({epochs:g} epochs' + (f', at most {cap} steps' if cap is not None else '') +
                     f'), validating every {settings.get("eval_every")} steps' +
                     (f', stopping after {settings["patience"]} validations without improvement'
                      if settings.get('patience') else ''))
    return notes
