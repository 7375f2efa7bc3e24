"""``gather``: ``EmbeddingStore.gather`` of 32 x 1000 candidate embeddings from a large memory-mapped index (time per
batch and memory), then one CODER epoch over that index (peak RSS); each part runs in a fresh child process so
that its peak RSS is its own."""
from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from .fixtures import SEED, candidate_frame, random_qrels, read_topics, synthetic_flex, tiny_model
from .harness import (Report, evict_page_cache, make_sync, proc_status, run_child, sizes, spread,
                      write_child_json)

SIZES = dict(full=dict(docs=1_000_000, dim=768, batch_queries=32, candidates=1000, repeats=10, epoch_queries=256),
             small=dict(docs=100_000, dim=128, batch_queries=32, candidates=1000, repeats=10, epoch_queries=64))


def run(args, report: Report):
    size = sizes(SIZES, args)
    path = args.workdir / f'gather_{size["docs"]}x{size["dim"]}.flex'
    gib = size['docs'] * size['dim'] * 4 / 2**30
    print(f'\n(gather: preparing a {size["docs"]:,} x {size["dim"]} float32 FlexIndex ({gib:.2f} GiB) at {path} ...)',
          flush=True)
    start = time.perf_counter()
    synthetic_flex(path, size['docs'], size['dim'], normalize=False, chunk=10_000)
    print(f'(gather: index ready in {time.perf_counter() - start:.1f} s)', flush=True)
    report.results['gather'] = {}
    # two fresh processes, so that each peak RSS is its own: the gather batches, then the CODER epoch
    for flag in ('--gather-child', '--epoch-child'):
        report.results['gather'].update(run_child(args, flag, path))
    if not args.keep_data:
        shutil.rmtree(path, ignore_errors=True)
        print(f'  (removed {path}; pass --keep-data to keep it)')


def gather_child(args):
    """Runs in a fresh process: nothing else has touched memory, so the peak RSS is the gather's own."""
    import tracemalloc
    import torch
    import pyterrier_dr
    from pyterrier_coder.devices import infer_device
    from pyterrier_coder.embeddings import EmbeddingStore
    report = Report()
    size = sizes(SIZES, args)
    device = infer_device(args.device)
    sync = make_sync(device)
    path = Path(args.gather_child)
    flex = pyterrier_dr.FlexIndex(str(path), verbose=False)
    store = EmbeddingStore(flex)
    vecs = store.vecs                       # opens the memmap (touches no page)
    n, dim = vecs.shape
    matrix_mib = n * dim * 4 / 2**20
    Q, C = size['batch_queries'], size['candidates']
    out_mib = Q * C * dim * 4 / 2**20
    rng = np.random.default_rng(SEED)

    def batch():
        return np.stack([rng.choice(n, size=C, replace=False) for _ in range(Q)])

    evicted = evict_page_cache(path / 'vecs.f4')

    report.section('gather', f"""
EmbeddingStore.gather of a {Q} x {C} batch of candidate rows from a memory-mapped FlexIndex of {n:,} x {dim} float32
({matrix_mib:,.0f} MiB on disk; batch output {out_mib:,.0f} MiB); device {device}; fresh child process.
Baseline: pyterrier-dr style fancy indexing of the memmap, torch.from_numpy(vecs[ids]), on the same ids.
Warm figures: {size['repeats']} fresh random batches (the two methods alternate which goes first), median.
""")
    before = proc_status()
    ids0 = batch()
    sync()
    start = time.perf_counter()
    store.gather(ids0, device=device)
    sync()
    cold = time.perf_counter() - start

    def baseline(ids):
        return torch.from_numpy(np.asarray(vecs[ids])).to(device)

    t_store, t_base = [], []
    for r in range(size['repeats']):
        ids = batch()
        pair = [('store', lambda: store.gather(ids, device=device)), ('base', lambda: baseline(ids))]
        for name, fn in (pair if r % 2 == 0 else pair[::-1]):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            (t_store if name == 'store' else t_base).append(time.perf_counter() - start)
    after = proc_status()

    tracemalloc.start()
    ids = batch()
    tracemalloc.reset_peak()
    kept = store.gather(ids)
    traced_peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    del kept
    final = proc_status()

    report.value('cold_ms', 'first batch, cold' + (' (page cache evicted)' if evicted else ''), cold * 1e3, 'ms')
    report.value('store_gather_ms', 'EmbeddingStore.gather, warm', statistics.median(t_store) * 1e3, 'ms/batch',
                 spread(t_store))
    report.value('baseline_ms', 'baseline torch.from_numpy(vecs[ids])', statistics.median(t_base) * 1e3,
                 'ms/batch', spread(t_base))
    report.ratio('ratio_store_over_baseline', 'ratio EmbeddingStore.gather / baseline',
                 statistics.median(t_store) / statistics.median(t_base))
    report.value('matrix_mib', 'matrix size (on disk)', matrix_mib, 'MiB')
    report.value('peak_rss_before_mib', 'peak RSS (VmHWM) before the first gather', before.get('VmHWM', 0.0), 'MiB')
    report.value('peak_rss_after_mib', f'peak RSS (VmHWM) after {1 + 2 * size["repeats"]} batches',
                 final.get('VmHWM', 0.0), 'MiB')
    report.value('peak_rss_growth_mib', 'peak RSS growth', final.get('VmHWM', 0.0) - before.get('VmHWM', 0.0), 'MiB',
                 f'= {(final.get("VmHWM", 0.0) - before.get("VmHWM", 0.0)) / matrix_mib:.0%} of the matrix')
    if 'RssAnon' in before:
        report.value('anon_rss_before_mib', 'anonymous RSS before', before['RssAnon'], 'MiB')
        report.value('anon_rss_after_mib', 'anonymous RSS after', after['RssAnon'], 'MiB')
        report.value('file_rss_after_mib', 'file-backed RSS after (mapped page-cache pages)', after['RssFile'], 'MiB',
                     f'{after["RssFile"] - before["RssFile"]:+,.0f} MiB')
    report.value('traced_peak_mib', 'peak numpy/Python allocation during one gather (tracemalloc)', traced_peak,
                 'MiB', f'= {traced_peak / out_mib:.1f}x the batch output, {traced_peak / matrix_mib:.1%} of the matrix')
    report.note("""File-backed RSS counts pages of vecs.f4 the kernel mapped into this process (shared, reclaimable page
cache, incl. fault-around neighbours of the rows read); they are not a copy of the matrix. The copy
never made is what the anonymous RSS and the traced allocation show.""")
    write_child_json(args, report)



def epoch_child(args):
    """One CODER epoch over the memory-mapped index, in a fresh process started with the index out of the page
    cache: peak RSS (target < 4 GB over a 1M-document index). The query encoder is a random 1-layer BERT with
    the index's width (no 768-d encoder is available offline; the encoder's size does not depend on the index)."""
    import pyterrier_dr
    from pyterrier_coder import Coder, DenseEncoder
    report = Report()
    report.section('gather', 'continued: one CODER epoch over the same index, in a second fresh process')
    size = sizes(SIZES, args)
    path = Path(args.epoch_child)
    evicted = evict_page_cache(path / 'vecs.f4')
    flex = pyterrier_dr.FlexIndex(str(path), verbose=False)
    n, dim = flex.np_vecs().shape
    encoder = DenseEncoder(str(tiny_model(args.workdir, 'bert', hidden=dim, layers=1)), pooling='mean',
                           normalize=False, query_max_length=32, device=args.device)
    rng = np.random.default_rng(SEED + 1)
    topics = read_topics('train', limit=size['epoch_queries'])
    frame = candidate_frame(topics, n, size['candidates'], rng)
    qrels = random_qrels(topics, n, rng, frame=frame)
    coder = Coder(flex, encoder, num_candidates=size['candidates'], batch_size=size['batch_queries'], epochs=1,
                  eval_every=None, verbose=False, device=args.device)
    before = proc_status()
    start = time.perf_counter()
    coder.fit(frame, qrels)
    seconds = time.perf_counter() - start
    del frame
    after = proc_status()
    steps = coder.history['steps']
    report.value('coder_epoch_seconds', f'CODER epoch: {len(topics)} queries x {size["candidates"]} candidates, '
                 f'{steps} steps of {size["batch_queries"]}', seconds, 's')
    peak = after.get('VmHWM', 0.0)
    # the target's "4 GB", read both ways: 4 GiB, and 4 x 10^9 bytes (the stricter)
    verdicts = [f'{"met" if peak < limit else "NOT met"} as {name} = {limit:,.0f} MiB'
                for name, limit in (('4 GiB', 4096), ('4e9 B', 4e9 / 2**20))]
    report.value('coder_epoch_peak_rss_mib', 'peak RSS (VmHWM) of this process after the epoch', peak,
                 'MiB', 'target < 4 GB: ' + ', '.join(verdicts))
    if 'RssAnon' in after:
        report.value('coder_epoch_anon_rss_mib', 'anonymous RSS after the epoch', after['RssAnon'], 'MiB',
                     f'{after["RssAnon"] - before["RssAnon"]:+,.0f} MiB over the epoch')
        report.value('coder_epoch_file_rss_mib', 'file-backed RSS after the epoch (mapped pages of the index)',
                     after['RssFile'], 'MiB', 'page cache evicted first' if evicted else 'page cache not evicted')
    write_child_json(args, report)
