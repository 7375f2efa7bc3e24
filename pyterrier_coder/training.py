"""The one training loop shared by every trainer (CODER, ADORE, monoELECTRA).

A trainer supplies a module, a batch sampler, a loss function and (optionally) a validation function; the loop
owns everything else: device placement of the module, AMP on CUDA, optimiser and warm-up schedule, gradient
accumulation and clipping, periodic validation with best-checkpoint keeping and early stopping, a progress bar
with the running loss and metric, a NaN/inf guard, timing and the training history.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import random
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, List, Optional, Sequence

import numpy as np
import pyterrier as pt
import torch

from .artifacts import load_tensors
from .devices import autocast_for, cuda_amp_dtype, infer_device
from .distributed import DataParallel


OPTIMIZERS = ('adamw', 'radam')
SCHEDULES = ('linear', 'constant')


def is_number_at_least(value, minimum, *, strict: bool = False) -> bool:
    """Whether ``value`` is a number (not a bool) >= ``minimum`` (> with ``strict``); False for None and strings."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return value > minimum if strict else value >= minimum


@dataclasses.dataclass
class TrainingConfig:
    """Optimisation settings common to all trainers. Each component sets its own defaults (from its paper)
    and lets users override any field through its constructor keywords."""
    lr: float = 1e-5
    optimizer: str = 'adamw'            #: 'adamw' or 'radam' (both with decoupled weight decay)
    weight_decay: float = 0.01
    warmup: float = 0.1                 #: warm-up steps (int >= 1) or a fraction of all steps (float < 1)
    schedule: str = 'linear'            #: after warm-up: 'linear' decay to 0 or 'constant'
    #: passes over the training queries; with ``max_steps`` too, training stops at whichever comes first
    #: (None: one pass, or ``max_steps`` when that is set)
    epochs: Optional[float] = None
    max_steps: Optional[int] = None     #: optimiser steps at most (with ``epochs``: a cap)
    batch_size: int = 32                #: queries per optimiser step
    grad_accumulation: int = 1          #: micro-batches per optimiser step (batch_size is split across them)
    grad_clip: Optional[float] = 1.0
    eval_every: Optional[int] = 100     #: validate every k steps (and before training and at the end)
    patience: Optional[int] = None      #: stop after this many validations without improvement
    #: validation values are averaged over this many consecutive validations before the best step is chosen and
    #: patience is counted, so that one lucky evaluation of a small dev set is not what is kept
    smoothing: int = 1
    min_improvement: float = 0.0        #: a validation improves on the best only by more than this
    metric: str = 'nDCG@10'             #: validation metric (ir_measures name)
    amp: Optional[bool] = None          #: mixed precision; default: on when training on CUDA (CPU: bf16, opt-in)
    device: Optional[str] = None        #: default: CUDA when present, else CPU
    seed: int = 42
    checkpoint_dir: Optional[str] = None    #: write a resumable checkpoint here (atomically)
    checkpoint_every: Optional[int] = None  #: steps between checkpoints (default: eval_every)
    verbose: bool = True

    def replace(self, **overrides) -> 'TrainingConfig':
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f'unknown training settings {sorted(unknown)}; '
                            f'valid: {[f.name for f in dataclasses.fields(self)]}')
        return dataclasses.replace(self, **overrides)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self, component: str = 'TrainingConfig') -> 'TrainingConfig':
        """Refuses values the loop cannot run, naming ``component``: before any model or index is built, not when
        training starts, where an unknown ``schedule`` would otherwise run as linear decay without a word."""
        def fail(name, expected):
            raise ValueError(f'{component}: {name} must be {expected}, got {getattr(self, name)!r}')
        if self.optimizer not in OPTIMIZERS:
            fail('optimizer', f'one of {OPTIMIZERS}')
        if self.schedule not in SCHEDULES:
            fail('schedule', f'one of {SCHEDULES}')
        if self.epochs is not None and not (is_number_at_least(self.epochs, 0, strict=True) and math.isfinite(self.epochs)):
            fail('epochs', '> 0 or None')
        if not (is_number_at_least(self.min_improvement, 0) and math.isfinite(self.min_improvement)):
            fail('min_improvement', 'a finite number >= 0')
        for name in ('lr', 'weight_decay', 'warmup'):   # lr=0 freezes what head_lr does not train
            if not is_number_at_least(getattr(self, name), 0) or not math.isfinite(getattr(self, name)):
                fail(name, 'a finite number >= 0')
        if self.lr > 1:     # a learning rate above 1 (e.g. a typo for 1e-5) diverges at once with these optimisers
            fail('lr', '<= 1')
        for name, optional in (('batch_size', False), ('grad_accumulation', False), ('max_steps', True),
                               ('eval_every', True), ('patience', True), ('checkpoint_every', True),
                               ('smoothing', False)):
            value = getattr(self, name)
            if not (optional and value is None) and not is_number_at_least(value, 1):
                fail(name, '>= 1' + (' or None' if optional else ''))
        if self.grad_clip is not None and not (is_number_at_least(self.grad_clip, 0, strict=True)
                                               and math.isfinite(self.grad_clip)):
            fail('grad_clip', '> 0 or None (no clipping)')
        import ir_measures
        try:   # checked here, not after candidates were mined for the first validation
            ir_measures.parse_measure(self.metric)
        except (NameError, ValueError, TypeError, AttributeError) as error:
            raise ValueError(f"{component}: metric={self.metric!r} is not an ir_measures measure (e.g. 'nDCG@10', "
                             f"'RR@10', 'AP', 'R@100'): {error}") from None
        return self

    def changes_from(self, defaults: 'TrainingConfig', exclude: Sequence[str] = ()) -> dict:
        """The fields whose value differs from ``defaults`` (what a user passed), except ``exclude``."""
        return {name: value for name, value in self.as_dict().items()
                if name not in exclude and value != getattr(defaults, name)}


def setting_defaults(component: type) -> dict:
    """Every keyword the constructor of ``component`` accepts, with its default (None where it has none): the named
    parameters of its own and its base classes' ``__init__`` (the most derived class's default wins) and, for
    trainers (whose ``**training`` reaches :func:`split_training_kwargs`), the TrainingConfig fields at the
    component's ``DEFAULTS``. Used to check settings before anything is built (the runner's ``--set``, the docs)."""
    defaults, trainer = {}, False
    for klass in component.__mro__:
        if '__init__' in vars(klass):
            params = inspect.signature(klass.__init__).parameters
            for name, p in params.items():
                if name != 'self' and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                    defaults.setdefault(name, None if p.default is p.empty else p.default)
            trainer |= 'training' in params
    if trainer:
        config = getattr(component, 'DEFAULTS', TrainingConfig())
        for field in dataclasses.fields(TrainingConfig):
            defaults.setdefault(field.name, getattr(config, field.name))
    return defaults


def accepted_settings(component: type) -> set:
    """The names of :func:`setting_defaults`: every keyword the constructor of ``component`` accepts."""
    return set(setting_defaults(component))


def split_training_kwargs(defaults: TrainingConfig, kwargs: dict, component: str = 'TrainingConfig') -> TrainingConfig:
    """Pops the TrainingConfig fields out of a component's ``**kwargs`` (so ``Coder(lr=1e-5)`` works); anything
    else fails with the list of training settings (the component's own arguments are named in its signature)."""
    names = [f.name for f in dataclasses.fields(TrainingConfig)]
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
    if kwargs:
        raise TypeError(f'{component}: unexpected arguments {sorted(kwargs)}; besides its own arguments it takes '
                        f'these training settings: {", ".join(names)}')
    return defaults.replace(**overrides).check(component)


def check_settings(component: type, settings: dict) -> None:
    """The checks ``component``'s constructor makes on these setting values, made without building anything (the
    runner calls it for ``--set`` before any index is built). Every class of the component that defines a static
    ``_check_values`` checks its own settings (the constructor calls the same function); a trainer's training
    settings are checked by :meth:`TrainingConfig.check`. Names are not checked here (see :func:`accepted_settings`)."""
    values = {**setting_defaults(component), **settings}
    for klass in component.__mro__:
        if '_check_values' in vars(klass):
            vars(klass)['_check_values'].__func__(values, component.__name__)
    fields = {f.name for f in dataclasses.fields(TrainingConfig)}
    if fields <= set(values):
        TrainingConfig(**{name: values[name] for name in fields}).check(component.__name__)


def seed_everything(seed: int) -> np.random.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


class Timers:
    """Accumulates wall time per phase, so a trainer can report e.g. the share of a step spent retrieving.

    On a GPU, kernels run asynchronously: without waiting for them at each phase boundary a phase would be
    charged for its kernel launches only, and the next phase for its kernels. ``Timers.for_device(device)`` waits
    on CUDA (a few microseconds per phase next to steps of many milliseconds)."""

    def __init__(self, sync: Optional[Callable[[], None]] = None):
        self.seconds = defaultdict(float)
        self.sync = sync

    @classmethod
    def for_device(cls, device: torch.device) -> 'Timers':
        return cls(lambda: torch.cuda.synchronize(device)) if device.type == 'cuda' else cls()

    @contextmanager
    def __call__(self, phase: str):
        if self.sync is not None:
            self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync is not None:
                self.sync()
            self.seconds[phase] += time.perf_counter() - start

    def shares(self, of: Sequence[str]) -> dict:
        total = sum(self.seconds[p] for p in of) or 1.0
        return {p: self.seconds[p] / total for p in of}


class NonFiniteLossError(FloatingPointError):
    pass


def _lr_lambda(warmup_steps: int, total_steps: int, schedule: str):
    def fn(step):
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == 'constant':
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return fn


def make_optimizer(params, config: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW or RAdam over ``params``: tensors, or torch parameter groups (dicts with ``'params'`` and optionally
    their own ``'lr'``, which the schedule then scales like ``config.lr``). Frozen parameters are left out."""
    params = list(params)
    if params and isinstance(params[0], dict):
        params = [{**g, 'params': [p for p in g['params'] if p.requires_grad]} for g in params]
        params = [g for g in params if g['params']]
    else:
        params = [p for p in params if p.requires_grad]
    if config.optimizer == 'adamw':
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == 'radam':
        return torch.optim.RAdam(params, lr=config.lr, weight_decay=config.weight_decay, decoupled_weight_decay=True)
    raise ValueError(f'optimizer must be one of {OPTIMIZERS}, got {config.optimizer!r}')   # a config built unchecked


def restore_cuda_rng(state, device: torch.device) -> None:
    """Restores the CUDA generator state saved by a checkpoint on the training device. Only that device's state is
    saved (the others are not used); checkpoints of earlier versions hold one state per visible GPU."""
    if state is None or device.type != 'cuda':
        return
    if isinstance(state, (list, tuple)):
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= len(state):
            return
        state = state[index]
    torch.cuda.set_rng_state(state, device)


class TrainingLoop:
    """Runs the optimisation of ``module``.

    Args:
        module: the torch module whose parameters are trained (moved to the configured device).
        config: a :class:`TrainingConfig`.
        sample_batches: ``fn(epoch, rng) -> list of batches`` (a batch is whatever ``loss_fn`` takes, usually an
            array of training-query indices; it is split into ``grad_accumulation`` micro-batches by slicing).
        loss_fn: ``fn(batch) -> scalar tensor``.
        validate: ``fn() -> float`` (higher is better), called in eval mode without gradients.
        before_step: ``fn(step)`` called before each optimiser step (e.g. CODER's candidate refresh).
        param_groups: torch parameter groups to optimise instead of all of ``module``'s parameters (e.g. a fresh
            head with its own ``'lr'``); they must be parameters of ``module``.
        prefetch: ``fn(micro_batch)`` called with each micro-batch of this rank's *next* batch before the current
            step runs, so the trainer can read that batch's data in the background (CODER's candidate embeddings);
            not called for the first batch of an epoch (it is drawn when the epoch starts).
        name: shown on the progress bar.
        identity: ``fn() -> dict`` describing what is trained beyond the config (the component's settings, a
            fingerprint of its training data); with ``checkpoint_dir`` it is saved, and ``resume=True`` refuses a
            checkpoint of another run instead of silently continuing it.
    """

    def __init__(self, module: torch.nn.Module, config: TrainingConfig, *,
                 sample_batches: Callable[[int, np.random.Generator], List], loss_fn: Callable,
                 validate: Optional[Callable[[], float]] = None,
                 before_step: Optional[Callable[[int], None]] = None, name: str = 'training',
                 prefetch: Optional[Callable] = None, param_groups: Optional[List[dict]] = None,
                 identity: Optional[Callable[[], dict]] = None):
        self.module = module
        self.identity = identity
        self.config = config.check(name)
        self.sample_batches = sample_batches
        self.loss_fn = loss_fn
        self.validate = validate
        self.before_step = before_step
        self.prefetch = prefetch
        self.param_groups = param_groups
        self.name = name
        self.device = infer_device(config.device)
        self.amp = config.amp if config.amp is not None else self.device.type == 'cuda'
        self.timers = Timers.for_device(self.device)
        #: data parallelism under torchrun (a no-op in a single process), see pyterrier_coder.distributed
        self.dp = DataParallel(self.device)

    def _batches(self, rng, cursor: dict):
        """Yields (batch, the next batch of the same epoch or None) forever, epoch after epoch. ``cursor`` (saved in
        checkpoints) records the epoch, the position within it and the generator state at the epoch's start, so
        a resumed run replays the same sequence from where it stopped."""
        while True:
            if cursor['rng_state'] is None:
                cursor['rng_state'] = rng.bit_generator.state
            else:
                rng.bit_generator.state = cursor['rng_state']
            batches = self.sample_batches(cursor['epoch'], rng)
            if not batches:
                raise ValueError(f'{self.name}: no training batches (no usable training queries)')
            while cursor['position'] < len(batches):
                cursor['position'] += 1
                position = cursor['position']
                yield batches[position - 1], batches[position] if position < len(batches) else None
            cursor.update(epoch=cursor['epoch'] + 1, position=0, rng_state=None)

    def _total_steps(self, rng) -> int:
        epochs, cap = self.config.epochs, self.config.max_steps
        if epochs is None and cap is not None:
            return int(cap)
        # sampling one epoch is cheap (index arrays); use a throw-away generator so the real sequence is unchanged
        per_epoch = len(self.sample_batches(0, np.random.default_rng(0)))
        steps = max(1, int(math.ceil(per_epoch * (epochs if epochs is not None else 1))))
        return min(steps, int(cap)) if cap is not None else steps

    def _micro_batches(self, batch):
        n = self.config.grad_accumulation
        if n <= 1 or not len(batch):
            return [batch] if len(batch) else []
        size = int(math.ceil(len(batch) / n))
        return [batch[i:i + size] for i in range(0, len(batch), size)]

    def _forward_backward(self, batch, step, scaler) -> float:
        """Backpropagates this rank's shard of the global ``batch`` in micro-batches, each loss weighted by its
        share of the global batch, so that (summed over micro-batches and ranks) the gradient is the one of the
        mean loss over the whole batch. Returns that mean loss (over all ranks)."""
        total = len(batch)
        step_loss, bad = 0.0, None
        for part in self._micro_batches(self.dp.shard(batch)):
            with autocast_for(self.device, self.amp):
                loss = self.loss_fn(part)
            if not torch.isfinite(loss.detach()):
                bad = loss.item()
                break
            weight = len(part) / total
            scaler.scale(loss * weight).backward()
            step_loss += loss.item() * weight
        if self.dp.any(bad is not None):   # every rank stops together, never one left waiting in a collective
            raise NonFiniteLossError(
                f'{self.name}: loss became {bad if bad is not None else "non-finite on another rank"} at step '
                f'{step + 1}; training stopped (the best validated weights so far are kept). Try a lower lr or '
                f'a larger temperature.')
        return self.dp.sum_scalar(step_loss)

    def _optimizer_step(self, optimizer, scheduler, scaler) -> None:
        """Clips, steps and advances the schedule; a step that the fp16 gradient scaler skips (inf/NaN gradients,
        as happens while it finds its scale) does not advance the schedule, so warm-up and decay keep their length
        in real optimiser steps."""
        if self.config.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.config.grad_clip)
        scale = scaler.get_scale() if scaler.is_enabled() else None
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if scale is None or scaler.get_scale() >= scale:
            scheduler.step()

    def _run_validation(self, step, history, progress):
        with self.timers('validation'):
            value = None
            if self.dp.is_main:   # rank 0 validates; the others get its value, so their decisions agree
                self.module.eval()
                with torch.inference_mode():
                    value = float(self.validate())
            value = self.dp.broadcast(value)
        history['eval'].append([step, value])
        progress.set_postfix_str(f'{self.config.metric}={value:.4f}', refresh=False)
        return value

    def _checkpoint_path(self):
        from pathlib import Path
        return Path(self.config.checkpoint_dir) / 'checkpoint.pt' if self.config.checkpoint_dir else None

    #: bumped when the checkpoint's layout changes
    CHECKPOINT_FORMAT = 2
    #: entries of the loop's state that are tensors (saved as such); the rest is saved as JSON text, so that the
    #: file holds tensors and plain values only and is loaded with ``weights_only=True`` (see :meth:`_load_checkpoint`)
    _TENSOR_STATE = ('best_state',)

    def _save_checkpoint(self, state: dict, optimizer, scheduler, scaler) -> None:
        """Everything needed to continue exactly: weights, optimiser, schedule, scaler, RNG states, the batch
        cursor, history and the best weights so far; written to a temp file then renamed (atomic)."""
        import os
        path = self._checkpoint_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        plain = {k: v for k, v in state.items() if k not in self._TENSOR_STATE}
        numpy_state = np.random.get_state()
        plain['rng'] = {'python': random.getstate(),
                        'numpy': [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]]}
        payload = {'format': self.CHECKPOINT_FORMAT, 'state': json.dumps(plain),
                   **{k: state[k] for k in self._TENSOR_STATE},
                   'model': self.module.state_dict(), 'optimizer': optimizer.state_dict(),
                   'scheduler': scheduler.state_dict(), 'scaler': scaler.state_dict(),
                   'torch_rng': torch.get_rng_state(),
                   'cuda_rng': torch.cuda.get_rng_state(self.device) if self.device.type == 'cuda' else None}
        tmp = path.with_name(path.name + '.tmp')
        try:
            torch.save(payload, tmp)
            os.replace(tmp, path)
        except OSError as error:     # e.g. a full disk: the previous checkpoint stays as it was
            tmp.unlink(missing_ok=True)
            raise OSError(error.errno, f'{self.name}: could not write the checkpoint {str(path)!r} '
                                       f'({error.strerror or error}); the previous checkpoint, if any, is unchanged. '
                                       f'Free space or choose another checkpoint_dir, then resume=True') from error

    def _read_checkpoint(self) -> Optional[dict]:
        """The checkpoint's contents (the loop's state with its tensors), or None when there is none. Only tensors
        and plain values are loaded: a file that holds anything else is refused, never executed."""
        path = self._checkpoint_path()
        if path is None or not path.exists():
            return None
        payload = load_tensors(path, self.name, what='checkpoint')
        if not isinstance(payload, dict) or payload.get('format') != self.CHECKPOINT_FORMAT:
            raise ValueError(f'{self.name}: {str(path)!r} is not a checkpoint of this version of pyterrier-coder; '
                             f'delete it to start afresh')
        state = json.loads(payload.pop('state'))
        return {**payload, **state}

    def _load_checkpoint(self, optimizer, scheduler, scaler, identity: Optional[dict]) -> Optional[dict]:
        payload = self._read_checkpoint()
        if payload is None:
            return None
        self._check_same_run(payload.get('identity'), identity)    # before anything is restored
        self.module.load_state_dict(payload.pop('model'))
        optimizer.load_state_dict(payload.pop('optimizer'))
        scheduler.load_state_dict(payload.pop('scheduler'))
        scaler_state = payload.pop('scaler')
        if scaler_state and scaler.is_enabled():   # a scaler that was off (CPU, bf16) saved nothing: start fresh
            scaler.load_state_dict(scaler_state)
        rng = payload.pop('rng')
        version, internal, gauss = rng['python']
        random.setstate((version, tuple(internal), gauss))
        name, keys, *rest = rng['numpy']
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
        torch.set_rng_state(payload.pop('torch_rng'))
        restore_cuda_rng(payload.pop('cuda_rng'), self.device)
        payload.pop('format')
        return payload

    def _refuse_to_overwrite_a_checkpoint(self) -> None:
        """A new run (``resume=False``) would overwrite the checkpoint an earlier run left in ``checkpoint_dir``: its
        saved progress is never dropped silently."""
        path = self._checkpoint_path()
        if path is None or not path.exists():
            return
        try:
            saved = self._read_checkpoint()
            step, total = saved['step'], saved['history'].get('total_steps')
            what = (f'of a finished run ({step} steps)' if step == total else
                    f'of an interrupted run (step {step} of {total})')
        except ValueError as error:
            what = f'that cannot be read ({error})'
        raise ValueError(f'{self.name}: {str(path)!r} holds the checkpoint {what}; fit(..., resume=True) continues '
                         f'it. To start afresh, delete that file or set another checkpoint_dir')

    #: config fields that may change between an interrupted run and its resumption (where and how it runs, not what)
    RESUMABLE_CHANGES = ('verbose', 'device', 'amp', 'checkpoint_dir', 'checkpoint_every')

    def _run_identity(self) -> dict:
        config = {k: v for k, v in self.config.as_dict().items() if k not in self.RESUMABLE_CHANGES}
        return json.loads(json.dumps({'config': config, **(self.identity() if self.identity else {})}, default=str))

    def _check_same_run(self, saved: Optional[dict], current: dict) -> None:
        """Fails when the checkpoint was written by another run (checkpoints of earlier versions carry no identity)."""
        if saved is None or saved == current:
            return
        changes = [f'{name}: {saved["config"].get(name)!r} there, {value!r} here'
                   for name, value in current['config'].items() if saved['config'].get(name) != value]
        changes += [f'other {key.replace("_", " ")}' for key in current
                    if key != 'config' and saved.get(key) != current[key]]
        raise ValueError(f'{self.name}: the checkpoint in {self.config.checkpoint_dir} was written by another run '
                         f'({"; ".join(changes)}); resume=True only continues the same run. Delete it, or use '
                         f'another checkpoint_dir, to start over')

    def run(self, resume: bool = False) -> dict:
        """Trains, restores the best validated weights, and returns the history dict.

        With ``config.checkpoint_dir`` a checkpoint is written every ``checkpoint_every`` steps; ``resume=True``
        continues from it (same seed on CPU: the same final weights as an uninterrupted run)."""
        config = self.config
        if resume and not config.checkpoint_dir:
            raise ValueError(f'{self.name}: resume=True needs checkpoint_dir to be set')
        if not resume:
            self._refuse_to_overwrite_a_checkpoint()
        rng = seed_everything(config.seed)
        self.module.to(self.device)
        total = self._total_steps(rng)
        warmup = int(config.warmup) if config.warmup >= 1 else int(round(config.warmup * total))
        if warmup >= total and self.dp.is_main:
            warnings.warn(f'{self.name}: the warm-up ({warmup} steps) is not shorter than the run ({total} steps), '
                          f'so the learning rate never reaches lr={config.lr:g}; give warmup as a fraction of the '
                          f'run (warmup=0.1) or train for more steps')
        optimizer = make_optimizer(self.param_groups or self.module.parameters(), config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(warmup, total, config.schedule))
        use_scaler = self.amp and self.device.type == 'cuda' and cuda_amp_dtype() == torch.float16
        scaler = torch.amp.GradScaler('cuda', enabled=use_scaler)
        state = {'step': 0, 'cursor': {'epoch': 0, 'position': 0, 'rng_state': None},
                 'history': {'metric': config.metric, 'loss': [], 'eval': [], 'lr': [], 'total_steps': total,
                             'best_step': 0, 'best_metric': None, 'stopped_early': False, 'config': config.as_dict()},
                 'best_state': None, 'best_value': -math.inf, 'bad_evals': 0}
        if config.checkpoint_dir:
            state['identity'] = self._run_identity()
        restored = self._load_checkpoint(optimizer, scheduler, scaler, state.get('identity')) if resume else None
        if restored is not None:
            state = restored
            state['history']['resumed_at'] = state['step']
        history = state['history']
        prior_seconds = state.get('elapsed', 0.0)
        start = time.perf_counter()
        progress = pt.tqdm(total=total, initial=state['step'], desc=self.name, unit='step',
                           disable=not (config.verbose and self.dp.is_main))
        every = config.checkpoint_every or config.eval_every or 100

        def consider(step, value):
            # the mean of the last `smoothing` validations (this one included) decides; the raw value is recorded
            recent = [v for _, v in history['eval'][-config.smoothing:]]
            smoothed = sum(recent) / len(recent)
            if smoothed > state['best_value'] + (config.min_improvement if state['best_state'] is not None else 0):
                state['best_value'], state['bad_evals'] = smoothed, 0
                state['best_state'] = {k: v.detach().to('cpu', copy=True) for k, v in self.module.state_dict().items()}
                history['best_step'], history['best_metric'] = step, value
                history['best_smoothed'] = smoothed
            else:
                state['bad_evals'] += 1

        if self.validate is not None and restored is None:
            consider(0, self._run_validation(0, history, progress))

        batches = self._batches(rng, state['cursor'])
        try:
            while state['step'] < total:
                step = state['step']
                if self.before_step is not None:
                    self.before_step(step)
                self.module.train()
                batch, upcoming = next(batches)
                if self.prefetch is not None and upcoming is not None:
                    for part in self._micro_batches(self.dp.shard(upcoming)):
                        self.prefetch(part)
                with self.timers('forward_backward'):
                    step_loss = self._forward_backward(batch, step, scaler)
                if self.dp.enabled:
                    with self.timers('gradient_sync'):
                        self.dp.sum_gradients(self.module.parameters())
                with self.timers('optimizer'):
                    self._optimizer_step(optimizer, scheduler, scaler)
                step = state['step'] = step + 1
                history['loss'].append([step, step_loss])
                history['lr'].append([step, scheduler.get_last_lr()[0]])
                progress.update(1)
                progress.set_postfix_str(f'loss={step_loss:.4f}' + (
                    f' {config.metric}={history["eval"][-1][1]:.4f}' if history['eval'] else ''), refresh=False)
                if self.validate is not None and config.eval_every and (step % config.eval_every == 0 or step == total):
                    consider(step, self._run_validation(step, history, progress))
                    if config.patience is not None and state['bad_evals'] >= config.patience:
                        history['stopped_early'] = True
                        break
                if config.checkpoint_dir and (step % every == 0 or step == total):
                    with self.timers('checkpoint'):
                        state['elapsed'] = prior_seconds + time.perf_counter() - start
                        if self.dp.is_main:
                            self._save_checkpoint(state, optimizer, scheduler, scaler)
                        self.dp.barrier()
            if self.validate is not None and history['eval'][-1][0] != state['step']:
                consider(state['step'], self._run_validation(state['step'], history, progress))
        finally:
            progress.close()
            if state['best_state'] is not None:
                self.module.load_state_dict(state['best_state'])
            self.module.eval()
            history['steps'] = state['step']
            history['seconds'] = prior_seconds + time.perf_counter() - start
            history['timing'] = dict(self.timers.seconds)
        if state['best_state'] is None:
            history['best_step'] = state['step']
        return history


def fingerprint(*parts) -> str:
    """sha256 of training data: numeric arrays (read in chunks of rows, so a memory-mapped candidate set is not
    loaded whole), strings and numbers, and sequences of these (e.g. per-query arrays of docnos)."""
    digest = hashlib.sha256()

    def feed(part):
        if isinstance(part, np.ndarray) and part.dtype != object:
            digest.update(f'{part.dtype}{part.shape}'.encode())
            for start in range(0, len(part), 65536):
                digest.update(np.ascontiguousarray(part[start:start + 65536]).tobytes())
        elif part is None or isinstance(part, (str, bytes, int, float, np.generic)):
            digest.update(repr(part).encode() + b'\x1f')
        elif isinstance(part, np.ndarray) or (isinstance(part, list) and all(isinstance(s, str) for s in part)):
            digest.update(('\x1e'.join(map(str, part)) + '\x1d').encode())    # strings, in one call
        else:
            digest.update(b'[')
            for item in part:
                feed(item)
            digest.update(b']')
    for part in parts:
        feed(part)
    return digest.hexdigest()
