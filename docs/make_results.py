"""Regenerates the measured tables of the documentation from the experiment runner's outputs.

    python docs/make_results.py runs/nfcorpus [runs/vaswani ...] [--ablations runs/nfcorpus-ablations]
        [--bi-encoders runs/nfcorpus-bi-encoders] [--check]

Each RUN directory is the ``--out`` of one ``pyterrier-coder experiment`` (``results.csv``, ``comparisons.csv``,
``run_info.json``, and ``fusion_weights.json`` when it has fused rows). The script rewrites only the text between
marker comments, leaving everything around them as written by hand:

- ``<!-- results:begin DATASET -->`` ... ``<!-- results:end DATASET -->`` in ``docs/results.md``: the run's command,
  commit, machine, wall time, the table of every pipeline (nDCG@10, RR@10, R@100, R@1000, AP, Holm-corrected
  p-values against the baseline, ms/query), the paired comparisons, the interpolation weights and the training
  summaries. DATASET is the last component of the run's ``--dataset`` (``nfcorpus``, ``vaswani``).
- ``<!-- results:begin ablations -->`` in ``docs/results.md``: the ablation rows of the ``--ablations`` run, each
  against the full method it ablates (the rows of that run that the first RUN does not have).
- ``<!-- results:begin bi-encoders -->`` in ``docs/results.md``: the rows the ``--bi-encoders`` run (the main job's
  output with ``--components ...,star,tasb`` added) has beyond the first RUN's.
- ``<!-- results:begin PAGE -->`` in ``README.md`` (PAGE ``readme``) and in the method pages (``retrievers``,
  ``coder``, ``adore``, ``electra``, ``fusion``, ``training``, ``performance``; ``star`` and ``tasb`` from the
  ``--bi-encoders`` run): each page's rows of the first RUN. A page without the markers is left alone.
- ``<!-- results:begin PAGE-ablations -->`` in the method pages (``coder``, ``adore``, ``electra``, ``star``,
  ``tasb``): the page's rows of the ``--ablations`` run. Without ``--ablations`` these blocks, like every block
  whose run is not given, are left as they are.

``--check`` changes nothing and exits with 1 when a file is not what the outputs give (for CI). The script needs
only pandas; it does not import pyterrier_coder.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
MEASURES = ('nDCG@10', 'RR@10', 'R@100', 'R@1000', 'AP')
BEGIN = '<!-- results:begin {} -->'
END = '<!-- results:end {} -->'
MARKER = re.compile(r'<!-- results:begin (\S+) -->\n.*?<!-- results:end \1 -->', re.S)


# --- reading a run ----------------------------------------------------------------------------------------------
class Run:
    """The outputs of one runner invocation (its ``--out`` directory)."""

    def __init__(self, path):
        self.path = Path(path)
        missing = [f for f in ('results.csv', 'comparisons.csv', 'run_info.json') if not (self.path / f).exists()]
        if missing:
            raise SystemExit(f'{self.path}: not a finished runner output (no {", ".join(missing)})')
        self.results = pd.read_csv(self.path / 'results.csv')
        self.comparisons = pd.read_csv(self.path / 'comparisons.csv')
        self.info = json.loads((self.path / 'run_info.json').read_text())
        weights = self.path / 'fusion_weights.json'
        self.fusion = json.loads(weights.read_text()) if weights.exists() else {}
        self.names = list(self.results['name'])

    @property
    def settings(self) -> dict:
        return self.info.get('settings') or {}

    @property
    def dataset(self) -> str:
        spec = str(self.settings.get('dataset') or self.path.name).rstrip('/')
        return re.split(r'[/:]', spec)[-1]

    def rows(self, names: List[str]) -> pd.DataFrame:
        """The rows of results.csv named ``names``, in that order."""
        present = [n for n in dict.fromkeys(names) if n in self.names]
        return self.results.drop_duplicates('name').set_index('name').loc[present].reset_index()


# --- formatting -------------------------------------------------------------------------------------------------
def fmt(value, decimals: int = 4) -> str:
    """A number as the tables show it: 4 decimals; p-values below 1e-3 in scientific notation; NaN as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '—'
    if isinstance(value, (int,)) and not isinstance(value, bool):
        return str(value)
    value = float(value)
    if 0 < abs(value) < 1e-3 and decimals == 4:
        return f'{value:.2e}'
    return f'{value:.{decimals}f}'


def table(header: List[str], rows: List[List[str]]) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
    return '\n'.join(lines)


def duration(seconds) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return '—'
    seconds = int(round(float(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f'{hours} h {minutes} min {secs} s'
    return f'{minutes} min {secs} s' if minutes else f'{secs} s'


def command(run: Run) -> str:
    """The command line as a reader types it from the repository root."""
    argv = list(run.info.get('argv') or [])
    args = argv[1:] if argv else []
    if args and args[0] != 'experiment':
        args = ['experiment', *args]
    shown = []
    for arg in args:
        # an absolute path into the shared collections, as the docs write it (relative to the repository root)
        match = re.search(r'(?:^|/)shared/datasets/(.*)$', arg)
        shown.append(f'../shared/datasets/{match.group(1)}' if match and arg.startswith('/') else arg)
    quoted = [a if re.fullmatch(r'[\w@%+=:,./-]+', a) else "'" + a.replace("'", "'\\''") + "'" for a in shown]
    return 'pyterrier-coder ' + ' '.join(quoted)


def commit(run: Run) -> str:
    c = run.info.get('commit')
    if not c:
        return 'not recorded (the package was not a git checkout)'
    text = f'`{c["commit"][:10]}`'
    return text + (' with uncommitted changes' if c.get('uncommitted_changes') else '')


def commit_phrase(run: Run) -> str:
    c = run.info.get('commit')
    if not c:
        return 'commit not recorded: the package was not a git checkout'
    return f'commit `{c["commit"][:10]}`' + (' with uncommitted changes' if c.get('uncommitted_changes') else '')


def machine(run: Run) -> str:
    m = run.info.get('machine') or {}
    flags = ', '.join(m.get('cpu_flags') or []) or 'none of avx2/avx512f/avx512_bf16/amx_bf16/amx_tile'
    parts = [f'{m.get("cpu", "unknown CPU")}', f'{m.get("usable_cores", "?")} usable of {m.get("cores", "?")} cores',
             f'CPU flags: {flags}',
             'bf16 computed natively' if m.get('cpu_computes_bf16') else 'no native bf16 (fp32 cross-encoder)',
             f'torch {m.get("torch", "?")} on {m.get("device", "?")}']
    if m.get('gpu'):
        parts.append(f'GPU: {m["gpu"]}')
    if m.get('memory_gib') is not None:
        parts.append(f'{m["memory_gib"]} GiB RAM')
    return '; '.join(parts)


# --- the blocks -------------------------------------------------------------------------------------------------
def pvalue_cell(row, column: str) -> str:
    """A Holm-corrected p-value; for the baseline row ``baseline``, and ``identical`` for a row with the baseline's
    value on every test query (pt.Experiment gives neither a p-value)."""
    value = row[column]
    if not (isinstance(value, float) and math.isnan(value)):
        return fmt(value)
    measure = column.split()[0]
    wins, losses = row.get(f'{measure} +'), row.get(f'{measure} -')
    if isinstance(wins, float) and math.isnan(wins):
        return 'baseline'
    return 'identical' if wins == 0 and losses == 0 else '—'


def results_table(run: Run, names: Optional[List[str]] = None, measures=MEASURES, pvalues: bool = True,
                  latency: bool = True) -> str:
    frame = run.rows(names) if names is not None else run.results
    measures = [m for m in measures if m in frame.columns]
    pcols = [f'{m} p-value corrected' for m in ('nDCG@10', 'RR@10')
             if pvalues and f'{m} p-value corrected' in frame.columns]
    best = {m: frame[m].max() for m in measures}
    header = ['pipeline', *measures, *[f'{c.split()[0]} p (Holm)' for c in pcols]]
    header += ['ms/query'] if latency and 'ms/query' in frame.columns else []
    rows = []
    for _, r in frame.iterrows():
        cells = [r['name']]
        cells += [f'**{fmt(r[m])}**' if len(frame) > 1 and r[m] == best[m] else fmt(r[m]) for m in measures]
        cells += [pvalue_cell(r, c) for c in pcols]
        if latency and 'ms/query' in frame.columns:
            cells.append(fmt(r['ms/query'], 2))
        rows.append(cells)
    return table(header, rows)


def comparisons_table(run: Run, pairs: Optional[List[tuple]] = None) -> str:
    """One row per (system, reference) pair, nDCG@10 and RR@10 side by side (paired t-test, uncorrected)."""
    c = run.comparisons
    if pairs is not None:
        c = c[[(s, r) in pairs for s, r in zip(c['system'], c['reference'])]]
    order = list(dict.fromkeys(zip(c['system'], c['reference'])))
    measures = [m for m in ('nDCG@10', 'RR@10') if m in set(c['measure'])]
    header = ['system', 'reference']
    for m in measures:
        header += [f'Δ {m}', f'{m} wins / losses', f'{m} p']
    rows = []
    for system, reference in order:
        cells = [system, reference]
        for m in measures:
            hit = c[(c['system'] == system) & (c['reference'] == reference) & (c['measure'] == m)]
            if len(hit):
                h = hit.iloc[0]
                same = int(h['wins']) == 0 and int(h['losses']) == 0 and h['difference'] == 0
                p = 'identical' if same and math.isnan(float(h['p-value'])) else fmt(h['p-value'])
                cells += [f'{h["difference"]:+.4f}', f'{int(h["wins"])} / {int(h["losses"])}', p]
            else:
                cells += ['—', '—', '—']
        rows.append(cells)
    return table(header, rows)


def fusion_lines(run: Run, names: Optional[List[str]] = None) -> List[str]:
    lines = []
    for name, h in run.fusion.items():
        if names is not None and name not in names or name not in run.names:
            continue
        curve = ', '.join(f'{a:g}: {v:.4f}' for a, v in h.get('by_alpha', []))
        lines.append(f'- `{name}`: weight {h["alpha"]:g}, chosen on {h.get("validation_queries", "?")} dev queries '
                     f'(dev {h.get("metric", "nDCG@10")} by weight: {curve}).')
    return lines


def training_table(run: Run, models: Optional[List[str]] = None) -> str:
    training = run.info.get('training') or {}
    rows = []
    for model, t in training.items():
        if models is not None and model not in models:
            continue
        curve = t.get('eval') or []
        start = fmt(curve[0][1]) if curve else '—'
        rows.append([f'`{model}`', str(t.get('steps', '—')), fmt(t.get('seconds'), 0), start,
                     fmt(t.get('best_metric')), str(t.get('best_step', '—')),
                     'yes' if t.get('stopped_early') else 'no'])
    metric = next((t.get('metric') for t in training.values() if t.get('metric')), 'nDCG@10')
    return table(['model', 'steps', 'seconds', f'dev {metric} at step 0', f'best dev {metric}', 'at step',
                  'stopped early'], rows)


def run_header(run: Run) -> List[str]:
    info = run.info
    lines = [f'- Command: `{command(run)}`',
             f'- Commit: {commit(run)}',
             f'- Machine: {machine(run)}',
             f'- Wall time: {duration(info.get("wall_seconds"))}; test queries: {info.get("test_queries", "?")}']
    scale = info.get('label_scale')
    if scale:
        lines.append(f'- Positives: label >= {scale.get("min_label")} ({scale.get("reason", "")})')
    if run.settings.get('quick'):
        lines.append('- `--quick`: a smoke run on samples with a few training steps; its figures are not results.')
    if info.get('reused_runs'):
        lines.append(f'- Test runs reused from an earlier invocation with unchanged models: '
                     f'{", ".join(info["reused_runs"])}')
    return lines


def baseline(run: Run) -> Optional[str]:
    """The row pt.Experiment compared the others with: the one without p-values."""
    column = 'nDCG@10 +'
    if column not in run.results.columns:
        return None
    rows = run.results[run.results[column].isna()]
    return rows['name'].iloc[0] if len(rows) == 1 else None


def dataset_block(run: Run) -> str:
    parts = ['\n'.join(run_header(run)), results_table(run)]
    if baseline(run):
        parts.append(f'Bold: the best value of each measure. p (Holm): paired t-test of each row against the baseline '
                     f'`{baseline(run)}`, Holm-corrected over all rows (`identical`: the row has the baseline\'s value '
                     f'on every test query). `ms/query`: wall time per test query of the whole pipeline on the machine '
                     f'above.')
    if len(run.comparisons):
        parts += ['Paired comparisons (paired t-test over the test queries, uncorrected):', comparisons_table(run)]
    weights = fusion_lines(run)
    if weights:
        parts += ['Interpolation weights (`Interpolate`, chosen on dev):', '\n'.join(weights)]
    if run.info.get('training'):
        parts += ['Training (validation on dev; the step with the best smoothed value is kept):',
                  training_table(run)]
    timings = {k: v for k, v in (run.info.get('timings') or {}).items() if k.startswith('index')}
    if timings:
        parts.append('Indexing: ' + '; '.join(f'{k.split(": ", 1)[-1]} {fmt(v, 0)} s' for k, v in timings.items())
                     + '.')
    return '\n\n'.join(parts)


def ablation_pairs(ablations: Run, *methods: Run) -> List[tuple]:
    """(ablation, full method) pairs: comparisons of the ablations run whose system none of the ``methods`` runs
    (the main run, and the run adding the bi-encoders) has."""
    known = set().union(*(run.names for run in methods))
    c = ablations.comparisons
    return list(dict.fromkeys((s, r) for s, r in zip(c['system'], c['reference'])
                              if s not in known and s in ablations.names))


def ablations_block(main: Run, ablations: Run, *, besides: Sequence[Run] = (),
                    against: str = 'Each ablation against the full method',
                    trained: str = 'Training of the ablation models:') -> str:
    """The rows of ``ablations`` that neither ``main`` nor the runs ``besides`` have, each with the row it is
    compared with."""
    pairs = ablation_pairs(ablations, main, *besides)
    names = []
    for reference in dict.fromkeys(r for _, r in pairs):   # each full method, then its ablations
        names += [reference] + [s for s, r in pairs if r == reference]
    parts = ['\n'.join([f'- Command: `{command(ablations)}`', f'- Commit: {commit(ablations)}',
                        f'- Machine: {machine(ablations)}',
                        f'- Wall time: {duration(ablations.info.get("wall_seconds"))}']),
             results_table(ablations, names, pvalues=False),
             f'{against} (paired t-test, uncorrected):',
             comparisons_table(ablations, pairs)]
    training = ablations.info.get('training') or {}
    new_models = [m for m in training if m not in (main.info.get('training') or {})]
    if new_models:
        parts += [trained, training_table(ablations, new_models)]
    return '\n\n'.join(parts)


# what each page shows of the first run: rows selected by name, the comparisons among them, and extras
def _has(*words: str) -> Callable[[str], bool]:
    return lambda name: any(w in name for w in words)


PAGES: Dict[str, dict] = {
    'readme': dict(rows=lambda n: True, measures=('nDCG@10', 'RR@10', 'R@1000'), pvalues=False,
                   comparisons=False),
    'retrievers': dict(rows=lambda n: n in ('BM25', 'Dense', 'BM25 >> Dense'), comparisons=False),
    'coder': dict(rows=lambda n: n in ('BM25', 'Dense', 'BM25 >> Dense') or 'CODER' in n,
                  ablations=_has('CODER'), training=lambda m: m.startswith('coder')),
    'adore': dict(rows=lambda n: n in ('Dense',) or 'ADORE' in n, ablations=lambda n: n.startswith('ADORE'),
                  training=lambda m: 'adore' in m),
    'electra': dict(rows=lambda n: n == 'BM25' or 'MonoELECTRA' in n, ablations=_has('MonoELECTRA'),
                    training=lambda m: m.startswith('electra')),
    'fusion': dict(rows=lambda n: n == 'BM25' or n.endswith('(+ BM25 score)') or n in ('BM25 >> CODER',
                                                                                        'BM25 >> MonoELECTRA'),
                   fusion=True),
    'star': dict(rows=lambda n: n == 'Dense' or 'STAR' in n, ablations=_has('STAR'),
                 training=lambda m: m.startswith('star') or m == 'adore_star', source='bi-encoders'),
    'tasb': dict(rows=lambda n: n in ('BM25', 'Dense') or 'TAS-Balanced' in n,
                 ablations=_has('TAS-Balanced'), training=lambda m: 'tasb' in m,
                 source='bi-encoders'),
    'training': dict(rows=None, training=lambda m: True),
    'performance': dict(rows=lambda n: True, measures=('nDCG@10',), pvalues=False, comparisons=False,
                        timings=True),
}


def page_block(page: str, run: Run) -> str:
    """A method page's block (``<!-- results:begin PAGE -->``): its rows of ``run``, their comparisons, fusion
    weights and training."""
    spec = PAGES[page]
    source = f'`{command(run)}` ({commit_phrase(run)})'
    parts = [f'From {source}; {run.info.get("test_queries", "?")} test queries '
             f'([all figures and the machine](results.md)).' if page != 'readme' else
             f'Test split of {run.dataset} ({run.info.get("test_queries", "?")} queries), from {source} '
             f'([all measures, p-values and the machine](docs/results.md)).']
    if run.settings.get('quick'):
        parts[0] += ' A `--quick` smoke run: its figures are not results.'
    if spec.get('rows'):
        names = [n for n in run.names if spec['rows'](n)]
        if names:
            parts.append(results_table(run, names, measures=spec.get('measures', MEASURES),
                                       pvalues=spec.get('pvalues', True)))
        if spec.get('comparisons', True):
            pairs = [(s, r) for s, r in zip(run.comparisons['system'], run.comparisons['reference'])
                     if s in names and r in names]
            if pairs:
                parts += ['Paired comparisons (paired t-test, uncorrected):', comparisons_table(run, pairs)]
        if spec.get('fusion'):
            weights = fusion_lines(run, names)
            if weights:
                parts += ['Weights chosen on dev:', '\n'.join(weights)]
    if spec.get('training'):
        models = [m for m in (run.info.get('training') or {}) if spec['training'](m)]
        if models:
            parts += ['Training:' if page != 'training' else
                      'Each trainer of the run (validation on dev; the step with the best smoothed value is kept):',
                      training_table(run, models)]
    if spec.get('timings'):
        timings = run.info.get('timings') or {}
        if timings:
            parts += ['Indexing and training time:', table(['what', 'seconds'],
                                                          [[k, fmt(v, 1)] for k, v in timings.items()])]
    return '\n\n'.join(parts)


def page_ablations_block(page: str, ablations: Run, methods: Sequence[Run]) -> Optional[str]:
    """A method page's ablations block (``<!-- results:begin PAGE-ablations -->``): its rows of the ``ablations``
    run that none of the ``methods`` runs has, each beside and against its full method; None when the page has
    none. A block of its own, so that the pages' main tables can be regenerated from a new main job while the
    ablations stay as their (longer) run gave them."""
    spec = PAGES[page]
    if not spec.get('ablations'):
        return None
    ablation_rows = [(s, r) for s, r in ablation_pairs(ablations, *methods) if spec['ablations'](s)]
    if not ablation_rows:
        return None
    extra = [s for s, _ in ablation_rows]
    references = list(dict.fromkeys(r for _, r in ablation_rows))
    return '\n\n'.join([f'Ablations, from `{command(ablations)}` ({commit_phrase(ablations)}; '
                         f'[the ablations run](results.md#ablations---ablations)):',
                         results_table(ablations, references + extra, pvalues=False),
                         'Each ablation against the full method:', comparisons_table(ablations, ablation_rows)])


# --- writing ----------------------------------------------------------------------------------------------------
def replace_blocks(text: str, blocks: Dict[str, str]) -> str:
    def sub(match):
        key = match.group(1)
        if key not in blocks:
            return match.group(0)
        return f'{BEGIN.format(key)}\n{blocks[key].rstrip()}\n{END.format(key)}'
    return MARKER.sub(sub, text)


def markers(text: str) -> List[str]:
    return [m.group(1) for m in MARKER.finditer(text)]


def generate(runs: List[Run], ablations: Optional[Run], files: List[Path],
             bi_encoders: Optional[Run] = None) -> Dict[Path, str]:
    """The new text of each of ``files`` (only the marked blocks change). ``bi_encoders``: the run that adds the
    STAR and TAS-Balanced components to the first run's (block ``bi-encoders``, and the star and tasb pages)."""
    blocks = {run.dataset: dataset_block(run) for run in runs}
    main = runs[0]
    methods = [r for r in (main, bi_encoders) if r is not None]   # their rows are methods, not ablations
    if ablations is not None:
        blocks['ablations'] = ablations_block(main, ablations, besides=methods)
    if bi_encoders is not None:
        blocks['bi-encoders'] = ablations_block(main, bi_encoders, against='Each against the model it starts from',
                                                trained='Training of the STAR and TAS-Balanced models:')
    for page, spec in PAGES.items():
        source = bi_encoders if spec.get('source') == 'bi-encoders' else main
        if source is None:      # the star and tasb pages without the bi-encoder run: its rows would pass for ablations
            continue
        blocks.setdefault(page, page_block(page, source))
        block = page_ablations_block(page, ablations, methods) if ablations is not None else None
        if block is not None:
            blocks[f'{page}-ablations'] = block
    out = {}
    for path in files:
        text = path.read_text()
        out[path] = replace_blocks(text, blocks)
    return out


def default_files(root: Path) -> List[Path]:
    return [root / 'README.md', *sorted((root / 'docs').glob('*.md'))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('runs', nargs='+', help="runner output directories (--out); the first one feeds the pages")
    parser.add_argument('--ablations', help='the output directory of the --ablations run')
    parser.add_argument('--bi-encoders', help='the output directory of the run adding --components star,tasb')
    parser.add_argument('--root', default=str(ROOT), help='the repository root (README.md and docs/)')
    parser.add_argument('--check', action='store_true', help='change nothing; exit 1 if a file would change')
    args = parser.parse_args(argv)
    runs = [Run(p) for p in args.runs]
    ablations = Run(args.ablations) if args.ablations else None
    bi_encoders = Run(args.bi_encoders) if args.bi_encoders else None
    root = Path(args.root)
    new = generate(runs, ablations, default_files(root), bi_encoders)
    found = {key for path in new for key in markers(path.read_text())}
    datasets = {run.dataset for run in runs}
    missing = sorted((datasets | ({'ablations'} if ablations else set()) |
                      ({'bi-encoders'} if bi_encoders else set())) - found)
    if missing:
        print(f'make_results: no markers for {", ".join(missing)} in {root}/docs/results.md '
              f'(add <!-- results:begin KEY --> and <!-- results:end KEY -->)', file=sys.stderr)
        return 2
    changed = [path for path, text in new.items() if text != path.read_text()]
    if args.check:
        for path in changed:
            print(f'make_results: {path.relative_to(root)} differs from the run outputs', file=sys.stderr)
        return 1 if changed else 0
    for path in changed:
        path.write_text(new[path])
        print(f'make_results: updated {path.relative_to(root)}')
    if not changed:
        print('make_results: nothing to change')
    return 0


if __name__ == '__main__':
    sys.exit(main())
