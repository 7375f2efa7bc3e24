"""The shared training loop: optimisation, best checkpoint, early stopping, NaN guard, reproducibility."""
import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from pyterrier_coder.training import NonFiniteLossError, TrainingConfig, TrainingLoop, split_training_kwargs


def _regression_problem():
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    return x, y


def _loop(module, config, validate=None, loss_hook=None):
    x, y = _regression_problem()

    def loss_fn(idx):
        loss = ((module(x[idx]).squeeze(-1) - y[idx]) ** 2).mean()
        return loss_hook(loss) if loss_hook else loss
    return TrainingLoop(module, config, sample_batches=lambda epoch, rng: np.array_split(rng.permutation(64), 4),
                        loss_fn=loss_fn, validate=validate, name='test')


def test_loss_decreases_and_history_is_recorded():
    module = torch.nn.Linear(4, 1)
    history = _loop(module, TrainingConfig(lr=0.1, max_steps=60, warmup=0, schedule='constant', grad_clip=None,
                                                   weight_decay=0, verbose=False, device='cpu')).run()
    assert len(history['loss']) == 60
    assert history['loss'][-1][1] < 0.1 * history['loss'][0][1]
    assert history['steps'] == 60 and history['seconds'] > 0


def test_best_checkpoint_is_restored_and_patience_stops():
    module = torch.nn.Linear(4, 1)
    values = iter([0.1, 0.5, 0.9, 0.3, 0.2, 0.1, 0.0])   # best at the 2nd eval after start (step 10)
    snapshots = {}

    def validate():
        snapshots[len(snapshots)] = module.weight.detach().clone()
        return next(values)
    config = TrainingConfig(lr=0.05, max_steps=100, eval_every=5, patience=3, warmup=0, verbose=False, device='cpu')
    history = _loop(module, config, validate).run()
    assert history['best_step'] == 10 and history['best_metric'] == 0.9
    assert history['stopped_early'] and history['steps'] == 25
    assert torch.equal(module.weight, snapshots[2])


def test_initial_model_kept_when_training_never_improves():
    module = torch.nn.Linear(4, 1)
    before = module.weight.detach().clone()
    values = iter([1.0] + [0.0] * 20)
    history = _loop(module, TrainingConfig(lr=0.05, max_steps=20, eval_every=5, warmup=0, verbose=False, device='cpu'),
                    lambda: next(values)).run()
    assert history['best_step'] == 0
    assert torch.equal(module.weight, before)


def test_non_finite_loss_stops_with_clear_error():
    module = torch.nn.Linear(4, 1)
    calls = {'n': 0}

    def hook(loss):
        calls['n'] += 1
        return loss * float('nan') if calls['n'] == 3 else loss
    with pytest.raises(NonFiniteLossError, match='step 3'):
        _loop(module, TrainingConfig(max_steps=10, verbose=False, device='cpu'), loss_hook=hook).run()


def test_same_seed_same_weights():
    weights = []
    for _ in range(2):
        torch.manual_seed(123)   # different init per run would make the test meaningless: fix it
        module = torch.nn.Linear(4, 1)
        _loop(module, TrainingConfig(lr=0.05, max_steps=10, seed=7, verbose=False, device='cpu')).run()
        weights.append(module.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])


def test_grad_accumulation_and_radam_and_epochs():
    module = torch.nn.Linear(4, 1)
    history = _loop(module, TrainingConfig(lr=0.05, epochs=2, grad_accumulation=2, optimizer='radam',
                                           schedule='constant', verbose=False, device='cpu')).run()
    assert history['total_steps'] == 8 and history['steps'] == 8


def test_grad_accumulation_gives_the_loss_and_weights_of_the_whole_batch():
    runs = []
    for accumulation in (1, 2):
        torch.manual_seed(0)
        module = torch.nn.Linear(4, 1)
        history = _loop(module, TrainingConfig(lr=0.05, max_steps=6, grad_accumulation=accumulation, grad_clip=None,
                                               warmup=0, verbose=False, device='cpu')).run()
        runs.append(([value for _, value in history['loss']], module.weight.detach().clone()))
    np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=1e-5)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-5, atol=1e-6)


def test_gradients_are_clipped_to_grad_clip():
    norms = []

    def record(optimizer, args, kwargs):   # runs before every optimiser step, after clipping
        grads = [p.grad for group in optimizer.param_groups for p in group['params'] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
    handle = register_optimizer_step_pre_hook(record)
    try:
        _loop(torch.nn.Linear(4, 1), TrainingConfig(lr=0.01, max_steps=3, warmup=0, grad_clip=0.5, verbose=False,
                                                    device='cpu'), loss_hook=lambda loss: loss * 1000).run()
    finally:
        handle.remove()
    assert norms == pytest.approx([0.5] * 3, rel=1e-4)


@pytest.mark.parametrize('schedule', ['linear', 'constant'])
def test_learning_rate_warms_up_then_follows_the_schedule(schedule):
    history = _loop(torch.nn.Linear(4, 1), TrainingConfig(lr=0.1, max_steps=10, warmup=4, schedule=schedule,
                                                          verbose=False, device='cpu')).run()
    lrs = [lr for _, lr in history['lr']]          # after step s: the lr of step s + 1
    ramp = [0.1 * (s + 1) / 4 for s in range(1, 4)]
    tail = [0.1 * ((10 - s) / 6 if schedule == 'linear' else 1.0) for s in range(4, 11)]
    assert lrs == pytest.approx(ramp + tail)


def test_each_epoch_draws_new_batches():
    orders = []

    def sample(epoch, rng):
        order = rng.permutation(8)
        orders.append(tuple(order))
        return [order[:4], order[4:]]
    module = torch.nn.Linear(4, 1)
    x = torch.randn(8, 4)
    TrainingLoop(module, TrainingConfig(max_steps=6, verbose=False, device='cpu'), sample_batches=sample,
                 loss_fn=lambda idx: module(x[idx]).pow(2).mean(), name='test').run()
    assert len(orders) == 3 and len(set(orders)) == 3     # three epochs of two batches, each reshuffled


def test_split_training_kwargs_rejects_unknown():
    cfg = split_training_kwargs(TrainingConfig(), {'lr': 3e-5})
    assert cfg.lr == 3e-5
    with pytest.raises(TypeError, match='unexpected'):
        split_training_kwargs(TrainingConfig(), {'lrr': 1})


def test_evaluate_counts_only_the_evaluated_topics():
    import pandas as pd
    from pyterrier_coder.evaluation import evaluate
    qrels = pd.DataFrame({'qid': ['1', '2', '3'], 'docno': ['a', 'b', 'c'], 'label': [1, 1, 1]})
    run = pd.DataFrame({'qid': ['1', '2'], 'docno': ['a', 'x'], 'score': [1.0, 1.0]})
    assert evaluate(run, qrels, 'RR@10', ['1', '2']) == pytest.approx(0.5)      # query 3 not evaluated
    assert evaluate(run, qrels, 'RR@10', ['1', '2', '3']) == pytest.approx(1 / 3)  # no results: counts 0


class _Interrupt(RuntimeError):
    pass


def _crash_at(call: int):
    """A loss hook that raises on its ``call``-th call, as an interruption mid-run would."""
    calls = {'n': 0}

    def hook(loss):
        calls['n'] += 1
        if calls['n'] == call:
            raise _Interrupt('simulated crash')
        return loss
    return hook


def _dropout_module():
    torch.manual_seed(5)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))


def test_resume_after_interruption_gives_the_same_weights(tmp_path):
    """Checkpoint every 3 steps, crash at step 8, resume: identical to an uninterrupted run (dropout, batch
    order, schedule, optimiser state all restored)."""
    config = TrainingConfig(lr=0.05, max_steps=14, eval_every=None, seed=3, verbose=False, device='cpu',
                            checkpoint_dir=str(tmp_path / 'ckpt'), checkpoint_every=3)
    reference = _dropout_module()
    _loop(reference, config.replace(checkpoint_dir=str(tmp_path / 'ref'))).run()

    interrupted = _dropout_module()
    with pytest.raises(_Interrupt):
        _loop(interrupted, config, loss_hook=_crash_at(8)).run()
    assert (tmp_path / 'ckpt' / 'checkpoint.pt').exists()
    assert not list((tmp_path / 'ckpt').glob('*.tmp'))

    resumed = _dropout_module()       # a fresh process would start from the initial weights
    history = _loop(resumed, config).run(resume=True)
    assert history['resumed_at'] == 6 and history['steps'] == 14
    assert [s for s, _ in history['loss']] == list(range(1, 15))
    for a, b in zip(reference.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_resume_needs_checkpoint_dir():
    with pytest.raises(ValueError, match='checkpoint_dir'):
        _loop(torch.nn.Linear(4, 1), TrainingConfig(max_steps=2, verbose=False, device='cpu')).run(resume=True)


# --- GPU-only branches, with torch's CUDA calls stood in for (no GPU here) ----------------------------------------

def test_cuda_amp_uses_bf16_only_where_the_gpu_computes_it(monkeypatch):
    """T4/V100 emulate bf16 (slow): torch's default ``is_bf16_supported()`` counts them, ours must not."""
    from pyterrier_coder.devices import cuda_amp_dtype
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: including_emulation)
    assert cuda_amp_dtype() == torch.float16            # emulation only (compute capability < 8)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: True)
    assert cuda_amp_dtype() == torch.bfloat16           # A100 and later
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda: False)     # an older torch without the argument
    assert cuda_amp_dtype() == torch.float16


def test_cuda_rng_is_restored_on_the_training_device_only(monkeypatch):
    from pyterrier_coder.training import restore_cuda_rng
    calls = []
    monkeypatch.setattr(torch.cuda, 'set_rng_state', lambda state, device: calls.append((state, device)))
    cuda1 = torch.device('cuda', 1)
    restore_cuda_rng('state1', cuda1)
    restore_cuda_rng(['s0', 's1'], cuda1)             # an earlier checkpoint: one state per visible GPU
    restore_cuda_rng(['s0'], cuda1)                   # ... saved on a machine with fewer GPUs: nothing to restore
    restore_cuda_rng('state', torch.device('cpu'))
    restore_cuda_rng(None, cuda1)
    assert calls == [('state1', cuda1), ('s1', cuda1)]


class _SkippingScaler:
    """The fp16 GradScaler's behaviour when a step's gradients overflow: the step is skipped, the scale halves."""

    def __init__(self, overflow_at):
        self.overflow_at, self.calls, self.scale = set(overflow_at), 0, 1024.0

    def is_enabled(self):
        return True

    def get_scale(self):
        return self.scale

    def unscale_(self, optimizer):
        pass

    def step(self, optimizer):
        self.calls += 1
        if self.calls not in self.overflow_at:
            optimizer.step()

    def update(self):
        if self.calls in self.overflow_at:
            self.scale /= 2


def test_schedule_does_not_advance_on_steps_the_fp16_scaler_skipped():
    module = torch.nn.Linear(4, 1)
    loop = _loop(module, TrainingConfig(max_steps=4, verbose=False, device='cpu'))
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    scaler = _SkippingScaler(overflow_at={1, 2})
    for _ in range(4):
        module(torch.ones(1, 4)).sum().backward()
        loop._optimizer_step(optimizer, scheduler, scaler)
    assert scheduler.last_epoch == 2                   # 4 steps, 2 skipped: the schedule counts the 2 real ones


def test_resume_ignores_the_state_of_a_scaler_that_was_off(tmp_path, monkeypatch):
    """A checkpoint written on CPU (or in bf16) holds an empty scaler state; resuming where fp16 AMP scales the loss
    must not fail on it (GradScaler.load_state_dict rejects an empty state)."""
    config = TrainingConfig(lr=0.05, max_steps=4, eval_every=None, verbose=False, device='cpu',
                            checkpoint_dir=str(tmp_path / 'ckpt'), checkpoint_every=2)
    with pytest.raises(_Interrupt):
        _loop(torch.nn.Linear(4, 1), config, loss_hook=_crash_at(3)).run()
    assert torch.load(tmp_path / 'ckpt' / 'checkpoint.pt', weights_only=False)['scaler'] == {}

    class EnabledScaler(torch.amp.GradScaler):
        def is_enabled(self):
            return True

        def load_state_dict(self, state):
            raise AssertionError('an empty scaler state was loaded')

        def step(self, optimizer):
            optimizer.step()

        def get_scale(self):
            return 1.0
    monkeypatch.setattr(torch.amp, 'GradScaler', lambda *a, **k: EnabledScaler('cpu', enabled=False))
    history = _loop(torch.nn.Linear(4, 1), config).run(resume=True)
    assert history['resumed_at'] == 2 and history['steps'] == 4


def test_warm_up_as_long_as_the_run_warns():
    """CODER's paper default warms up for 9,000 steps: a 10-step run would never reach its lr, silently."""
    with pytest.warns(UserWarning, match='never reaches lr'):
        _loop(torch.nn.Linear(4, 1), TrainingConfig(max_steps=10, warmup=9000, verbose=False, device='cpu')).run()


def test_unknown_keyword_lists_the_training_settings():
    from pyterrier_coder.training import TrainingConfig as Config
    with pytest.raises(TypeError, match=r"Coder: unexpected arguments \['learning_rate'\].*\blr\b.*max_steps"):
        split_training_kwargs(Config(), {'learning_rate': 1e-5}, 'Coder')


def test_resume_refuses_the_checkpoint_of_another_run(tmp_path):
    """A reused checkpoint_dir with resume=True must not silently continue a run of other settings or data."""
    config = TrainingConfig(lr=0.05, max_steps=4, eval_every=None, verbose=False, device='cpu',
                            checkpoint_dir=str(tmp_path / 'ckpt'), checkpoint_every=2)
    first = torch.nn.Linear(4, 1)
    _loop(first, config).run()
    module = torch.nn.Linear(4, 1)
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match=r"another run \(lr: 0.05 there, 0.001 here\)"):
        _loop(module, config.replace(lr=1e-3)).run(resume=True)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))     # nothing was restored
    loop = _loop(module, config)
    loop.identity = lambda: {'training_data': 'other'}
    with pytest.raises(ValueError, match='other training data'):
        loop.run(resume=True)
    history = _loop(module, config.replace(verbose=True, device='cpu')).run(resume=True)   # the same run
    assert history['resumed_at'] == 4


def test_unknown_metric_fails_when_the_component_is_made():
    with pytest.raises(ValueError, match=r"Coder: metric='nDCG10' is not an ir_measures measure"):
        split_training_kwargs(TrainingConfig(), {'metric': 'nDCG10'}, 'Coder')


def test_phase_timers_wait_for_the_gpu(monkeypatch):
    """CUDA kernels run asynchronously: each phase waits for them at its start and end, or it would be charged for
    the launches only (ADORE's retrieval share, history['timing']). On CPU nothing waits."""
    from pyterrier_coder.training import Timers
    waits = []
    monkeypatch.setattr(torch.cuda, 'synchronize', lambda device=None: waits.append(device))
    timers = Timers.for_device(torch.device('cuda', 0))
    with timers('retrieval'):
        pass
    assert waits == [torch.device('cuda', 0)] * 2 and 'retrieval' in timers.seconds
    with Timers.for_device(torch.device('cpu'))('retrieval'):
        pass
    assert len(waits) == 2


def test_config_check_refuses_values_the_loop_cannot_run():
    """Bad values fail when the config is checked (by every component's constructor and by the runner's --set),
    naming the setting (an unknown schedule would otherwise run as linear decay without a word)."""
    assert TrainingConfig().check() == TrainingConfig()
    TrainingConfig(lr=0.0, warmup=0, max_steps=None, eval_every=None, patience=None, grad_clip=None).check()
    for bad, match in [(dict(schedule='cosine'), 'schedule'), (dict(optimizer='sgd'), 'optimizer'),
                       (dict(lr=-1e-5), 'lr'), (dict(epochs=0), 'epochs'), (dict(warmup=-1), 'warmup'),
                       (dict(batch_size=0), 'batch_size'), (dict(batch_size=None), 'batch_size'),
                       (dict(grad_accumulation=0), 'grad_accumulation'), (dict(max_steps=0), 'max_steps'),
                       (dict(eval_every=0), 'eval_every'), (dict(patience=0), 'patience'),
                       (dict(grad_clip=0.0), 'grad_clip'), (dict(lr='fast'), 'lr'), (dict(metric='nDCG@'), 'metric')]:
        with pytest.raises(ValueError, match=f'X: {match}'):
            TrainingConfig(**bad).check('X')
        with pytest.raises(ValueError, match=match):
            split_training_kwargs(TrainingConfig(), dict(bad), 'X')
        with pytest.raises(ValueError, match=f'loop: {match}'):
            TrainingLoop(torch.nn.Linear(2, 1), TrainingConfig(**bad), sample_batches=lambda *a: [],
                         loss_fn=lambda *a: None, name='loop')


def test_epochs_with_max_steps_stop_at_whichever_comes_first():
    def steps(**settings):
        config = TrainingConfig(lr=0.01, warmup=0, verbose=False, device='cpu', **settings)
        return _loop(torch.nn.Linear(4, 1), config).run()['steps']
    assert steps() == 4                                  # one epoch of 4 batches
    assert steps(epochs=2.5) == 10
    assert steps(max_steps=7) == 7                       # max_steps alone: that many steps
    assert steps(epochs=10, max_steps=7) == 7            # a cap
    assert steps(epochs=1.5, max_steps=100) == 6         # the epochs come first


def test_smoothing_keeps_the_step_of_the_best_mean_not_a_lone_spike():
    module = torch.nn.Linear(4, 1)
    #          start  5    10   15   20   25   30   35   40: a spike at 25, a plateau at 35-40
    values = iter([0.30, 0.31, 0.32, 0.33, 0.30, 0.40, 0.30, 0.36, 0.37])
    history = _loop(module, TrainingConfig(lr=0.05, max_steps=40, eval_every=5, warmup=0, smoothing=2, verbose=False,
                                           device='cpu'), lambda: next(values)).run()
    assert history['best_step'] == 40 and history['best_metric'] == 0.37
    assert history['best_smoothed'] == pytest.approx(0.365)
    values = iter([0.30, 0.31, 0.32, 0.33, 0.30, 0.40, 0.30, 0.36, 0.37])
    unsmoothed = _loop(torch.nn.Linear(4, 1), TrainingConfig(lr=0.05, max_steps=40, eval_every=5, warmup=0,
                                                             verbose=False, device='cpu'), lambda: next(values)).run()
    assert unsmoothed['best_step'] == 25


def test_patience_counts_smoothed_validations_and_min_improvement():
    values = iter([0.30, 0.35, 0.351, 0.352, 0.353, 0.2, 0.2])
    history = _loop(torch.nn.Linear(4, 1), TrainingConfig(lr=0.05, max_steps=30, eval_every=5, warmup=0, patience=3,
                                                          min_improvement=0.005, verbose=False, device='cpu'),
                    lambda: next(values)).run()
    assert history['best_step'] == 5 and history['stopped_early'] and history['steps'] == 20
    with pytest.raises(ValueError, match='smoothing must be >= 1'):
        TrainingConfig(smoothing=0).check()
    with pytest.raises(ValueError, match='min_improvement must be a finite number >= 0'):
        TrainingConfig(min_improvement=-1).check()
    with pytest.raises(ValueError, match='epochs must be > 0 or None'):
        TrainingConfig(epochs=0).check()
