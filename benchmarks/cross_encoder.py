"""``cross_encoder``: MonoElectra inference and LCE training pairs/s vs a bare transformers loop on the same model
and batches, and MonoElectra with and without ``amp``. Its parts run alone with ``--only cross_encoder:<part>``."""
from __future__ import annotations

import statistics
import warnings

import numpy as np

from .fixtures import read_texts, read_topics, source_label, tiny_model
from .harness import Report, bare_update, interleaved, make_sync, sizes

PARTS = ('inference', 'training', 'amp')
SIZES = dict(full=dict(infer_queries=20, infer_candidates=50, batch_size=32, max_length=256, train_queries=64,
                       train_batch_size=8, group_size=8, steps=10, warmup=1, repeats=3),
             small=dict(infer_queries=4, infer_candidates=16, batch_size=16, max_length=128, train_queries=16,
                        train_batch_size=2, group_size=8, steps=3, warmup=1, repeats=3))


def run(args, report: Report):
    from pyterrier_coder import MonoElectra
    size = sizes(SIZES, args)
    if args.small:
        model, model_label = str(tiny_model(args.workdir, 'electra')), 'tiny random ELECTRA (2 layers, hidden 32)'
    else:
        model, model_label = 'minilm', 'all-MiniLM-L6-v2 backbone + fresh 1-logit head'
    bs = size['batch_size']
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        electra = MonoElectra(model, batch_size=bs, max_length=size['max_length'], verbose=False, device=args.device, eval_every=None,
                              group_size=size['group_size'], negatives_from=200,
                              train_batch_size=size['train_batch_size'], max_steps=size['steps'])
    device = electra.device
    sync = make_sync(device)
    nq, nc = size['infer_queries'], size['infer_candidates']
    n = nq * nc
    report.section('cross_encoder', f"""
MonoElectra vs a bare transformers loop on the same model object and the same batches; model {model_label};
device {device}; max_length {electra.max_length}; {source_label()}.
Inference: {nq} queries x {nc} passages = {n} pairs, batch {bs}. MonoElectra sorts pairs by length (less padding); the
bare loop is given that same order for free ("same batches") and, for context, also run in input order.
Training (LCE): {size['train_batch_size']} queries x group {size['group_size']} = {size['train_batch_size'] * size['group_size']} pairs per step, {size['steps']} steps; MonoElectra.fit
(TrainingLoop) vs a bare loop (tokenise -> forward -> softmax CE over each group -> backward -> clip -> AdamW)
on the same sampled groups.
""")

    parts = args.parts.get('cross_encoder', set(PARTS))
    if 'inference' in parts:
        infer_cross_encoder(args, report, electra, size, sync)
    if 'training' in parts:
        train_cross_encoder(args, report, electra, size, sync)
    if 'amp' in parts:
        amp_cross_encoder(args, report, electra, size, sync)


def inference_frame(size: dict):
    """Inference data: real queries x real passages, as a result frame."""
    import pandas as pd
    nq, nc = size['infer_queries'], size['infer_candidates']
    texts = read_texts(max(nc * nq, 200))
    topics = read_topics('test', limit=nq)
    return pd.DataFrame({'qid': np.repeat([q for q, _ in topics], nc), 'query': np.repeat([t for _, t in topics], nc),
                         'docno': [f'd{i}' for i in range(nq * nc)], 'text': texts[:nq * nc],
                         'score': np.tile(-np.arange(nc, dtype=float), nq), 'rank': np.tile(np.arange(nc), nq)})


def training_frame(size: dict):
    """Training data: candidates with text and one judged positive among them per query; ``(frame, qrels)``."""
    import pandas as pd
    tq, per = size['train_queries'], 40
    ttexts = read_texts(tq * per)
    ttopics = read_topics('train', limit=tq)
    train = pd.DataFrame({'qid': np.repeat([q for q, _ in ttopics], per),
                          'query': np.repeat([t for _, t in ttopics], per),
                          'docno': [f't{i}' for i in range(tq * per)], 'text': ttexts[:tq * per],
                          'score': np.tile(-np.arange(per, dtype=float), tq)})
    qrels = pd.DataFrame({'qid': [q for q, _ in ttopics], 'docno': [f't{i * per + 3}' for i in range(tq)],
                          'label': 1})
    return train, qrels


def infer_cross_encoder(args, report: Report, electra, size: dict, sync):
    import torch
    from pyterrier_coder.devices import autocast_for
    device, bs, tok, net, amp = electra.device, size['batch_size'], electra.tokenizer, electra.model, electra.amp
    frame = inference_frame(size)
    queries, docs = frame['query'].tolist(), frame['text'].tolist()
    n = len(frame)

    # the order score_pairs uses: tokenise chunks of 32 * batch_size pairs, sort each by length (descending)
    sorted_order = []
    chunk = max(1, bs) * 32
    for start in range(0, n, chunk):
        enc = tok(queries[start:start + chunk], docs[start:start + chunk], truncation='only_second',
                  max_length=electra.max_length)
        lengths = np.array([len(x) for x in enc['input_ids']])
        sorted_order.append(start + np.argsort(-lengths, kind='stable'))
    sorted_order = np.concatenate(sorted_order)

    def bare_infer(order):
        out = np.zeros(n, dtype=np.float32)
        net.eval()
        with torch.inference_mode():
            for b in range(0, n, bs):
                idx = order[b:b + bs]
                enc = tok([queries[i] for i in idx], [docs[i] for i in idx], truncation='only_second',
                          max_length=electra.max_length, padding=True, return_tensors='pt').to(device)
                with autocast_for(device, amp):
                    logits = net(**enc).logits
                out[idx] = logits[:, 0].float().cpu().numpy()
        return out

    res = {}
    times = interleaved({
        'transform': lambda: res.__setitem__('transform', electra.transform(frame)),
        'score_pairs': lambda: res.__setitem__('score_pairs', electra.score_pairs(queries, docs)),
        'bare_sorted': lambda: res.__setitem__('bare', bare_infer(sorted_order)),
        'bare_input_order': lambda: bare_infer(np.arange(n)),
    }, warmup=size['warmup'], repeats=size['repeats'], sync=sync)
    max_diff = float(np.abs(res['score_pairs'] - res['bare']).max())
    med = {k: statistics.median(v) for k, v in times.items()}
    pps = {k: n / v for k, v in med.items()}
    report.value('infer_transform_pairs_s', 'inference: MonoElectra.transform(frame)', pps['transform'], 'pairs/s')
    report.value('infer_score_pairs_pairs_s', 'inference: MonoElectra.score_pairs(queries, docs)', pps['score_pairs'],
                 'pairs/s')
    report.value('infer_bare_pairs_s', 'inference: bare loop, same (length-sorted) batches', pps['bare_sorted'],
                 'pairs/s')
    report.value('infer_bare_unsorted_pairs_s', 'inference: bare loop, input order (context)',
                 pps['bare_input_order'], 'pairs/s')
    r1 = pps['transform'] / pps['bare_sorted']
    r2 = pps['score_pairs'] / pps['bare_sorted']
    report.ratio('infer_ratio_transform', 'ratio transform / bare (same batches)', r1, '>= 0.9', r1 >= 0.9)
    report.ratio('infer_ratio_score_pairs', 'ratio score_pairs / bare (same batches)', r2, '>= 0.9', r2 >= 0.9)
    report.value('infer_max_abs_score_diff', 'max |score_pairs - bare| (same model, same pairs)', max_diff)


def train_cross_encoder(args, report: Report, electra, size: dict, sync):
    import torch
    import torch.nn.functional as F
    from pyterrier_coder.lce_groups import build_training_groups, sample_groups
    from pyterrier_coder.devices import autocast_for
    device, tok, net, amp = electra.device, electra.tokenizer, electra.model, electra.amp
    train, qrels = training_frame(size)
    groups = build_training_groups(train, qrels, text_field='text', negatives_from=electra.negatives_from,
                                   group_size=electra.group_size, min_label=1)
    groups.queries = electra._truncate_queries(groups.queries)
    config = electra.config
    S, TB, G = size['steps'], config.batch_size, electra.group_size

    def bare_train():
        torch.manual_seed(config.seed)
        rng = np.random.default_rng(config.seed)
        epoch = sample_groups(groups, G, rng)
        batches = [epoch[i:i + TB] for i in range(0, len(epoch), TB)]
        net.to(device).train()
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=config.lr,
                                weight_decay=config.weight_decay)
        for step in range(S):
            batch = batches[step % len(batches)]
            q = [groups.queries[i] for i, dd in batch for _ in dd]
            d = [groups.texts[x] for _, dd in batch for x in dd]
            enc = tok(q, d, truncation='only_second', max_length=electra.max_length, padding=True,
                      return_tensors='pt').to(device)
            with autocast_for(device, amp):
                scores = net(**enc).logits[:, 0].float().view(len(batch), G)
            loss = F.cross_entropy(scores, torch.zeros(len(batch), dtype=torch.long, device=device))
            bare_update(loss, net, opt, config.grad_clip)
        net.eval()

    loop_seconds = []

    def electra_fit():
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            electra.fit(train, qrels)
        loop_seconds.append(electra.history['seconds'])

    tt = interleaved({'fit': electra_fit, 'bare': bare_train}, warmup=size['warmup'], repeats=size['repeats'],
                     sync=sync)
    loop_seconds = loop_seconds[size['warmup']:]
    pairs = S * TB * G
    fit_pps = pairs / statistics.median(tt['fit'])
    loop_pps = pairs / statistics.median(loop_seconds)
    bare_pps = pairs / statistics.median(tt['bare'])
    report.value('train_loop_pairs_s', 'training: MonoElectra TrainingLoop.run (history seconds)', loop_pps,
                 'pairs/s')
    report.value('train_fit_pairs_s', 'training: whole MonoElectra.fit() incl. group building', fit_pps, 'pairs/s')
    report.value('train_bare_pairs_s', 'training: bare loop, same groups', bare_pps, 'pairs/s')
    report.ratio('train_ratio_loop', 'ratio TrainingLoop / bare', loop_pps / bare_pps, '>= 0.9',
                 loop_pps / bare_pps >= 0.9)
    report.ratio('train_ratio_fit', 'ratio fit() / bare', fit_pps / bare_pps, '>= 0.9', fit_pps / bare_pps >= 0.9)


def amp_cross_encoder(args, report: Report, electra, size: dict, sync):
    """MonoElectra with and without mixed precision (``amp``), interleaved on the same pairs and groups: bf16
    autocast on CPU (worth it with AVX512-BF16 or AMX), bf16/fp16 on CUDA. No target: it says whether
    ``amp=True`` pays on this machine."""
    frame = inference_frame(size)
    queries, docs = frame['query'].tolist(), frame['text'].tolist()
    train, qrels = training_frame(size)
    base, loop_seconds = electra.config, {False: [], True: []}

    def infer(amp):
        electra.config = base.replace(amp=amp)
        electra.score_pairs(queries, docs)

    def fit(amp):   # speed does not depend on the weights, so both settings keep training the same model
        electra.config = base.replace(amp=amp)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            electra.fit(train, qrels)
        loop_seconds[amp].append(electra.history['seconds'])

    try:
        ti = interleaved({'fp32': lambda: infer(False), 'amp': lambda: infer(True)}, warmup=size['warmup'],
                         repeats=size['repeats'], sync=sync)
        interleaved({'fp32': lambda: fit(False), 'amp': lambda: fit(True)}, warmup=size['warmup'],
                    repeats=size['repeats'], sync=sync)
    finally:
        electra.config = base
    n, pairs = len(frame), size['steps'] * base.batch_size * electra.group_size
    infer_pps = {k: n / statistics.median(v) for k, v in ti.items()}
    train_pps = {k: pairs / statistics.median(v[size['warmup']:]) for k, v in loop_seconds.items()}
    report.value('amp_infer_fp32_pairs_s', 'amp: score_pairs without amp', infer_pps['fp32'], 'pairs/s')
    report.value('amp_infer_amp_pairs_s', 'amp: score_pairs with amp=True', infer_pps['amp'], 'pairs/s')
    report.value('amp_infer_speedup', 'amp: inference speed-up (amp / fp32)', infer_pps['amp'] / infer_pps['fp32'])
    report.value('amp_train_fp32_pairs_s', 'amp: TrainingLoop without amp', train_pps[False], 'pairs/s')
    report.value('amp_train_amp_pairs_s', 'amp: TrainingLoop with amp=True', train_pps[True], 'pairs/s')
    report.value('amp_train_speedup', 'amp: training speed-up (amp / fp32)', train_pps[True] / train_pps[False])
