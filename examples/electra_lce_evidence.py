#!/usr/bin/env python
"""LCE evidence runs (issue #4): does MonoElectra trained with LCE beat its BM25 first stage, does LCE beat
pointwise CE at an equal budget, and does a larger group help?

    python examples/electra_lce_evidence.py --dataset ../shared/datasets/nfcorpus --out runs/electra-evidence

Trains on ``train`` (groups from BM25's top ``--negatives-from``), selects on a sample of ``dev`` (BM25 top-30
reranked), reports on every judged ``test`` query, reranking BM25's top 100. The runs share every setting except
the one they ablate, and see the same number of query-passage pairs per step:

* ``lce8``: LCE, group size n=8, ``--queries-per-step`` queries per step;
* ``ce8``: pointwise BCE on the same groups (same steps, same pairs);
* ``lce2``: LCE with n=2 and four times as many queries per step (same pairs per step).

Trained models (``models/<run>``) and test runs (``runs/<run>.res.gz``) are kept under ``--out`` and reused, so
runs can be trained one invocation at a time (``--runs lce8``) and compared at the end. Output: ``evidence.md``
(tables) and ``results.csv`` / ``comparisons.csv``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import pandas as pd
import pyterrier as pt
from scipy import stats

from pyterrier_coder import BM25, MonoElectra, load_dataset
from pyterrier_coder.experiment import markdown_table

DEPTH = 100


def run_settings(args) -> dict:
    common = dict(lr=args.lr, max_steps=args.steps, warmup=0.1, schedule='linear', eval_every=args.eval_every,
                  max_length=args.max_length, negatives_from=args.negatives_from, min_label=args.min_label,
                  seed=args.seed)
    b = args.queries_per_step
    return {'lce8': dict(common, loss='lce', group_size=8, train_batch_size=b),
            'ce8': dict(common, loss='ce', group_size=8, train_batch_size=b),
            'lce2': dict(common, loss='lce', group_size=2, train_batch_size=4 * b)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--dataset', default='../shared/datasets/nfcorpus')
    p.add_argument('--out', default='runs/electra-evidence')
    p.add_argument('--model', default='minilm', help='cross-encoder preset, hub id or directory')
    p.add_argument('--runs', default='lce8,ce8,lce2')
    p.add_argument('--steps', type=int, default=300)
    p.add_argument('--queries-per-step', type=int, default=4, help='for n=8; n=2 uses four times as many')
    p.add_argument('--lr', type=float, default=1e-4)
    p.add_argument('--max-length', type=int, default=128)
    p.add_argument('--negatives-from', type=int, default=100)
    p.add_argument('--min-label', type=int, default=1)
    p.add_argument('--eval-every', type=int, default=100)
    p.add_argument('--dev-queries', type=int, default=60)
    p.add_argument('--test-queries', type=int, default=None, help='a sample of the test queries (smoke runs)')
    p.add_argument('--seed', type=int, default=42)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = run_settings(args)
    wanted = [r for r in args.runs.split(',') if r]
    unknown = set(wanted) - set(settings)
    if unknown:
        p.error(f'unknown runs {sorted(unknown)}; choose from {sorted(settings)}')

    ds = load_dataset(args.dataset)
    bm25 = BM25.from_dataset(ds, out / 'indexes' / 'bm25')
    text = bm25.text_loader()
    test_qrels = ds.get_qrels('test')
    test = ds.get_topics('test')
    test = test[test['qid'].isin(set(test_qrels['qid']))].reset_index(drop=True)
    if args.test_queries is not None:
        test = test.sample(n=args.test_queries, random_state=args.seed).reset_index(drop=True)
    first_stage = bm25 % DEPTH >> text
    test_candidates = first_stage(test)

    for name in wanted:
        model_dir = out / 'models' / name
        if model_dir.exists():
            print(f'[evidence] reusing {model_dir}')
            continue
        train = (bm25 % args.negatives_from >> text)(ds.get_topics('train'))
        dev = ds.get_topics('dev').sample(n=args.dev_queries, random_state=args.seed)
        electra = MonoElectra(args.model, texts=text, **settings[name])
        print(f'[evidence] training {name}: {electra!r} {json.dumps(settings[name])}', flush=True)
        start = time.perf_counter()
        electra.fit(train, ds.get_qrels('train'), (bm25 % 30 >> text)(dev), ds.get_qrels('dev'))
        electra.history['wall_seconds'] = time.perf_counter() - start
        electra.save(model_dir)

    names, frames = ['BM25'], [(bm25 % DEPTH)(test)]
    summary = []
    for name in [r for r in settings if (out / 'models' / r).exists()]:
        model_dir = out / 'models' / name
        run_file = out / 'runs' / f'{name}.res.gz'
        history = json.loads((model_dir / 'history.json').read_text())
        if not run_file.exists() or run_file.stat().st_mtime < (model_dir / 'pyterrier_coder.json').stat().st_mtime:
            electra = MonoElectra.load(model_dir)
            start = time.perf_counter()
            res = electra(test_candidates)
            history_latency = 1000 * (time.perf_counter() - start) / len(test)
            run_file.parent.mkdir(parents=True, exist_ok=True)
            pt.io.write_results(res, str(run_file), format='trec', run_name=name)
            (run_file.with_suffix('.latency')).write_text(str(history_latency))
        names.append(name)
        frames.append(pt.io.read_results(str(run_file)))
        summary.append({'run': name, **{k: settings[name][k] for k in ('loss', 'group_size', 'train_batch_size')},
                        'pairs/step': settings[name]['group_size'] * settings[name]['train_batch_size'],
                        'steps': history['steps'], 'training s': round(history.get('wall_seconds', history['seconds'])),
                        'best dev step': history['best_step'], 'dev nDCG@10 start': history['eval'][0][1],
                        'dev nDCG@10 best': history['best_metric'],
                        'rerank ms/query': float(run_file.with_suffix('.latency').read_text())
                        if run_file.with_suffix('.latency').exists() else float('nan')})

    from pyterrier.measures import nDCG, RR, AP
    measures = [nDCG @ 10, RR @ 10, AP]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)
        results = pt.Experiment(frames, test, test_qrels, measures, names=names, baseline=0, test='t',
                                correction='holm')
        perquery = pt.Experiment(frames, test, test_qrels, measures, names=names, perquery=True)
    table = perquery[perquery['measure'] == 'nDCG@10'].pivot(index='qid', columns='name', values='value')
    pairs = [('lce8', 'BM25'), ('ce8', 'BM25'), ('lce2', 'BM25'), ('lce8', 'ce8'), ('lce8', 'lce2')]
    comparisons = pd.DataFrame([
        {'system': a, 'reference': b, 'nDCG@10 system': table[a].mean(), 'nDCG@10 reference': table[b].mean(),
         'difference': table[a].mean() - table[b].mean(), 'wins': int((table[a] > table[b]).sum()),
         'losses': int((table[a] < table[b]).sum()), 'p-value (paired t)': stats.ttest_rel(table[a], table[b]).pvalue}
        for a, b in pairs if a in table and b in table])
    results.to_csv(out / 'results.csv', index=False)
    results = results[['name', 'nDCG@10', 'RR@10', 'AP', 'nDCG@10 +', 'nDCG@10 -', 'nDCG@10 p-value',
                       'nDCG@10 p-value corrected']]
    comparisons.to_csv(out / 'comparisons.csv', index=False)
    text_out = ['# LCE evidence (BM25 top-100 reranked, test split)', '',
                f'{len(test)} judged test queries; settings: `{json.dumps(vars(args))}`', '',
                markdown_table(results), '', markdown_table(comparisons),
                '', markdown_table(pd.DataFrame(summary)), '']
    (out / 'evidence.md').write_text('\n'.join(text_out))
    print('\n'.join(text_out))


if __name__ == '__main__':
    main()
