"""The run's written outputs besides the CSVs: ``report.md`` and ``run_info.json`` (with the commit and machine)."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np
import pandas as pd

from ..artifacts import atomic_write_text
from .comparisons import BASELINE, measure_names
from ..devices import cpu_computes_bf16


def source_commit() -> Optional[dict]:
    """The git commit of the package's source tree (and whether it had uncommitted changes), when it is a git
    checkout; None otherwise (an installed wheel)."""
    import subprocess
    root = Path(__file__).resolve().parents[2]
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


def write_report(runner, results: pd.DataFrame, plots: List[str], comparisons: pd.DataFrame) -> None:
    """Writes ``report.md``: the results table, the paired comparisons, the label choice and budget changes, the
    settings, times, latency, training summaries, validation curves, interpolation weights and plots of a run."""
    cols = ['name'] + [m for m in measure_names(runner.s.measures, runner.s.rel) if m in results.columns]
    pcols = [f'{m} p-value corrected' for m in ('nDCG@10', 'RR@10') if f'{m} p-value corrected' in results.columns]
    table = results[cols + pcols + ['ms/query']].copy()
    lines = [f'# pyterrier-coder experiment: {runner.s.dataset}', '',
             f'Test split `{runner.s.test_split}` ({len(runner.test)} queries); baseline `{BASELINE}`; paired t-test '
             f'with Holm correction over all pipelines; `ms/query` = wall time per query of the whole pipeline.',
             '' if not runner.s.quick else '\n**--quick smoke run: tiny budgets, the figures mean nothing.**\n',
             markdown_table(table), '']
    if len(comparisons):
        lines += ['## Paired comparisons', '',
                  'Each reranker against its own first stage, each fine-tuned single-stage retriever against '
                  'the model it started from, each ablation against the full method (paired t-test over the '
                  'test queries, uncorrected).', '', markdown_table(comparisons), '']
    if runner.cached_runs:
        lines += [f'Test runs reused from a previous invocation (unchanged indexes and models): '
                  f'{", ".join(runner.cached_runs)}.', '']
    if runner.trains_anything():
        scale = runner.label_scale
        lines += ['## Training data and budgets', '',
                  f'- Positives: label >= {scale.min_label}, lower grades '
                  f'{"kept out of the negatives" if scale.lower_labels == "ignore" else "train as negatives"} '
                  f'({scale.reason}; `--set <component>.min_label=...` overrides).']
        lines += [f'- {note}' for note in runner.budget_notes] + ['']
    lines += ['## Settings', '', '```json',
             json.dumps({**dataclasses.asdict(runner.s), 'device': runner.device,
                         'budget': runner.budget}, indent=2, default=str), '```', '',
             '## Training and indexing time (s)', '', '| what | seconds |', '|---|---|']
    lines += [f'| {k} | {v:.1f} |' for k, v in runner.timings.items()]
    lines += ['', '## Latency per query (ms)', '', '| pipeline | ms/query |', '|---|---|']
    lines += [f'| {k} | {v:.2f} |' for k, v in runner.latency.items()]
    lines += ['', '## Training summaries', '']
    for name, h in runner.histories.items():
        extra = f', retrieval share of step time {h["retrieval_share"]:.1%}' if 'retrieval_share' in h else ''
        lines.append(f'- **{name}**: {h.get("steps")} steps in {h.get("seconds", 0):.0f} s; best validation '
                     f'{h.get("metric")} {h.get("best_metric")} at step {h.get("best_step")} '
                     f'(start {h["eval"][0][1] if h.get("eval") else "n/a"}){extra}')
    curves = {name: h['eval'] for name, h in runner.histories.items() if h.get('eval')}
    if curves:
        lines += ['', '## Validation curves', '',
                  'The validation metric at each validation (step: value); **bold**: the step kept.', '']
        for name, curve in curves.items():
            best = runner.histories[name].get('best_step')
            lines.append(f'- **{name}** ({runner.histories[name].get("metric")}): ' + ', '.join(
                (f'**{step}: {value:.4f}**' if step == best else f'{step}: {value:.4f}') for step, value in curve))
    if runner.fusion_weights:
        lines += ['', '## Interpolation weights', '',
                  'Each `(+ BM25 score)` row is `fusion.Interpolate`: weight × the reranker\'s score + (1 − weight) '
                  '× BM25\'s, both min-max normalised per query, the weight chosen on dev candidates at the test '
                  'depth.', '']
        for name, h in runner.fusion_weights.items():
            curve = ', '.join(f'{a:g}: {v:.4f}' for a, v in h['by_alpha'])
            lines.append(f'- **{name}**: weight {h["alpha"]:g} ({h["validation_queries"]} dev queries; dev '
                         f'{h["metric"]} by weight: {curve})')
    lines += ['', '## Plots', ''] + [f'![{p}]({p})' for p in plots] + ['']
    atomic_write_text(runner.out / 'report.md', '\n'.join(lines))


def write_run_info(runner) -> None:
    """``run_info.json``: what produced these outputs (settings, command line, the package's commit, the machine)
    and how it went (wall time, training summaries, the label choice and budget changes), for reports made from
    the outputs (e.g. the docs' results tables)."""
    info = {'settings': json.loads(json.dumps(dataclasses.asdict(runner.s), default=str)), 'argv': sys.argv,
            'commit': source_commit(), 'machine': machine_description(runner.device),
            'wall_seconds': runner.timings['total'], 'timings': runner.timings, 'budget': runner.budget,
            'budget_notes': runner.budget_notes,
            'label_scale': dataclasses.asdict(runner.label_scale) if runner.trains_anything() else None,
            'test_queries': len(runner.test), 'reused_runs': runner.cached_runs,
            'training': {name: {key: h.get(key) for key in ('steps', 'seconds', 'best_step', 'best_metric',
                                                             'stopped_early', 'metric', 'eval')}
                         for name, h in runner.histories.items()}}
    atomic_write_text(runner.out / 'run_info.json', json.dumps(info, indent=2, default=str))
