"""``train_step``: CODER and ADORE training steps split into phases; CODER with and without prefetching; ADORE's
exact search vs an in-memory floor; ``TrainingLoop`` overhead over a bare loop."""
from __future__ import annotations

import statistics
import time
import warnings

import numpy as np

from .fixtures import SEED, candidate_frame, dense_encoder, random_qrels, read_topics, synthetic_flex
from .harness import PhaseTimer, Report, bare_update, interleaved, make_sync, sizes, spread

SIZES = dict(full=dict(docs=50_000, train_queries=256, batch_size=32, steps=10, candidates=1000, adore_k=200,
                       warmup=1, repeats=3),
             small=dict(docs=5_000, train_queries=32, batch_size=8, steps=3, candidates=1000, adore_k=100,
                        warmup=1, repeats=3))


def _torch_optimizer(params, config):
    import torch
    params = [p for p in params if p.requires_grad]
    if config.optimizer == 'radam':
        return torch.optim.RAdam(params, lr=config.lr, weight_decay=config.weight_decay, decoupled_weight_decay=True)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def run(args, report: Report):
    import torch
    from pyterrier_coder import Adore, Coder
    from pyterrier_coder.candidates import mine_candidates
    from pyterrier_coder.training import TrainingLoop
    size = sizes(SIZES, args)
    encoder, model_label = dense_encoder(args, batch_size=64)
    flex = synthetic_flex(args.workdir / f'rerank_{size["docs"]}x{encoder.dim}.flex', size['docs'], encoder.dim)
    rng = np.random.default_rng(SEED)
    topics = read_topics('train', limit=size['train_queries'])
    frame = candidate_frame(topics, size['docs'], size['candidates'], rng)
    qrels = random_qrels(topics, size['docs'], rng, frame=frame)
    B, S = size['batch_size'], size['steps']
    device = encoder.device
    sync = make_sync(device)
    report.section('train_step', f"""
Training steps of CODER (listnet, {size['candidates']} candidates + injected positives per query) and ADORE (dynamic,
exact search, k={size['adore_k']}); {len(topics)} training queries, batch {B} queries, {S} steps per fit, over the
synthetic {size['docs']:,} x {encoder.dim} FlexIndex; encoder {model_label}; device {device}.
Method: Coder.fit / Adore.fit run unmodified; the instance attributes store.gather and encoder.encode_queries_torch
are wrapped with timers (synchronising on CUDA). TrainingLoop's own timers give forward_backward and optimizer;
ADORE's give retrieval. "loss + backward" = forward_backward - gather - encoder forward - retrieval.
One warm-up fit, then the median over {size['repeats']} fits of the per-step means.
""")
    common = dict(verbose=False, max_steps=S, batch_size=B, device=str(device), eval_every=None)

    def phase_split(model, fit, retrieval_key=None):
        timer = PhaseTimer(sync)
        timer.wrap(model.store, 'gather', 'gather')
        timer.wrap(model.encoder, 'encode_queries_torch', 'encoder_forward')
        model.config = model.config.replace(max_steps=1)
        fit()   # warm-up
        model.config = model.config.replace(max_steps=S)
        rows = []
        for _ in range(size['repeats']):
            with timer.armed_():
                start = time.perf_counter()
                fit()
                wall = time.perf_counter() - start
            h = model.history
            steps = h['steps']
            fb = h['timing'].get('forward_backward', 0.0)
            retr = h['timing'].get(retrieval_key, 0.0) if retrieval_key else 0.0
            g, e = timer.seconds.get('gather', 0.0), timer.seconds.get('encoder_forward', 0.0)
            rows.append(dict(gather=g / steps, encoder_forward=e / steps, retrieval=retr / steps,
                             loss_backward=(fb - g - e - retr) / steps,
                             optimizer=h['timing'].get('optimizer', 0.0) / steps,
                             loop_step=h['seconds'] / steps, fit_wall=wall))
        timer.restore()
        return {k: statistics.median(r[k] for r in rows) for k in rows[0]}

    # the phase split times the gather where the step waits for it: without prefetching (compared below)
    coder = Coder(flex, encoder, num_candidates=size['candidates'], prefetch=False, **common)
    c = phase_split(coder, lambda: coder.fit(frame, qrels), None)
    adore = Adore(flex, encoder, k=size['adore_k'], **common)
    a = phase_split(adore, lambda: adore.fit(frame[['qid', 'query']].drop_duplicates('qid'), qrels), 'retrieval')

    labels = [('gather', 'candidate-embedding gather (store.gather)'),
              ('encoder_forward', 'encoder forward (encode_queries_torch)'),
              ('retrieval', 'retrieval of negatives (ADORE)'),
              ('loss_backward', 'scoring + loss + backward (remainder)'),
              ('optimizer', 'optimiser (clip + step + zero_grad + schedule)'),
              ('loop_step', 'whole step inside TrainingLoop.run')]
    for name, res in (('CODER', c), ('ADORE', a)):
        print(f'  {name} per step (ms):')
        step = res['loop_step']
        for key, label in labels:
            if key == 'retrieval' and name == 'CODER':
                continue
            report.value(f'{name.lower()}_{key}_ms', f'  {label}', res[key] * 1e3, 'ms',
                         f'{res[key] / step:.0%} of step' if key != 'loop_step' else '')
        report.value(f'{name.lower()}_fit_wall_s', f'  whole fit() incl. setup ({S} steps)', res['fit_wall'], 's')

    # CODER with and without prefetching (the next batch's candidate embeddings gathered in a background thread)
    steps = {True: [], False: []}

    def fit_with(prefetch):
        model = Coder(flex, encoder, num_candidates=size['candidates'], prefetch=prefetch, **common)

        def run():
            model.fit(frame, qrels)
            steps[prefetch].append((model.history['seconds'] / model.history['steps'],
                                    model.history.get('prefetched_batches', 0)))
        return run
    interleaved({'prefetch': fit_with(True), 'no_prefetch': fit_with(False)}, warmup=size['warmup'],
                repeats=size['repeats'], sync=sync)
    with_pf = statistics.median(t for t, _ in steps[True][size['warmup']:])
    without = statistics.median(t for t, _ in steps[False][size['warmup']:])
    report.note(f"""CODER prefetching: the same fit ({S} steps) with prefetch=True (default) and prefetch=False, interleaved,
{size['repeats']} repeats; {steps[True][-1][1]} of {S} batches were served from the background (the first batch of
each epoch is not). Step time = TrainingLoop seconds / steps.""")
    report.value('coder_step_prefetch_ms', '  CODER step, prefetching (default)', with_pf * 1e3, 'ms',
                 spread([t for t, _ in steps[True][size['warmup']:]]))
    report.value('coder_step_no_prefetch_ms', '  CODER step, prefetch=False', without * 1e3, 'ms',
                 spread([t for t, _ in steps[False][size['warmup']:]]))
    report.ratio('prefetch_step_ratio', 'ratio step time with / without prefetching', with_pf / without)

    # ADORE's exact search vs an in-memory floor (same queries, same k)
    q = torch.nn.functional.normalize(torch.randn(B, encoder.dim, device=device), dim=-1)
    dense = torch.from_numpy(np.array(adore.store.vecs)).to(device)
    k = size['adore_k']
    st = interleaved({'store': lambda: adore.store.search(q, k),
                      'floor': lambda x=dense: torch.topk(q @ x.T, k, dim=1)},
                     warmup=1, repeats=max(5, size['repeats']), sync=sync)
    ms, mf = statistics.median(st['store']), statistics.median(st['floor'])
    report.value('adore_search_ms', 'ADORE exact search: EmbeddingStore.search (reads the memory map)', ms * 1e3, 'ms',
                 spread(st['store']))
    report.value('inmemory_search_ms', 'floor: topk(q @ X.T) with X already a tensor in memory', mf * 1e3, 'ms',
                 spread(st['floor']))
    report.ratio('search_ratio', 'ratio EmbeddingStore.search / in-memory floor', ms / mf)
    del dense

    # TrainingLoop overhead over a bare loop: same module, same loss function, same batches, same optimiser
    coder2 = Coder(flex, encoder, num_candidates=size['candidates'], **common)
    coder2._prepare_device()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        coder2._train = mine_candidates(frame, qrels, coder2.store, num_candidates=size['candidates'],
                                        component='Coder')
    coder2._rng = np.random.default_rng(SEED)
    module = coder2.trainable_module()
    config = coder2.config.replace(max_steps=S)
    sampler = coder2._sample_batches(len(coder2._train))

    def loop_run():
        TrainingLoop(module, config, sample_batches=sampler, loss_fn=coder2._loss).run()

    def bare_run():
        from pyterrier_coder.devices import autocast_for
        torch.manual_seed(config.seed)
        batches = sampler(0, np.random.default_rng(config.seed))
        module.to(device).train()
        opt = _torch_optimizer(module.parameters(), config)
        amp = config.amp if config.amp is not None else device.type == 'cuda'
        for step in range(S):
            with autocast_for(device, amp):
                loss = coder2._loss(batches[step % len(batches)])
            bare_update(loss, module, opt, config.grad_clip)
        module.eval()

    lt = interleaved({'loop': loop_run, 'bare': bare_run}, warmup=size['warmup'],
                     repeats=max(3, size['repeats']), sync=sync)
    ml, mb = statistics.median(lt['loop']), statistics.median(lt['bare'])
    report.note(f"""TrainingLoop overhead: TrainingLoop(...).run() vs a bare loop (optimizer created, then per step:
Coder._loss -> backward -> clip_grad_norm_ -> {config.optimizer} step -> zero_grad) on the same module, loss
function and batches, {S} steps each, {len(lt['loop'])} interleaved repeats.""")
    report.value('loop_step_ms', 'TrainingLoop.run', ml / S * 1e3, 'ms/step', spread([t / S for t in lt['loop']]))
    report.value('bare_step_ms', 'bare loop', mb / S * 1e3, 'ms/step', spread([t / S for t in lt['bare']]))
    report.ratio('trainingloop_overhead', 'TrainingLoop overhead over the bare loop', (ml - mb) / mb, '<= 15%',
                 (ml - mb) / mb <= 0.15, pct=True)
