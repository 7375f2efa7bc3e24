"""The Python examples in README.md and docs/*.md against the real package.

Running them needs models, data and minutes of training, so they are checked statically instead: every block parses,
every name it imports from pyterrier_coder exists, and every call of a pyterrier_coder class, function or method
binds to the real signature (a renamed or removed argument breaks the docs here, not in a reader's notebook). The
blocks of one file are read in order, so a variable assigned in one block (``coder = Coder(...)``) types the method
calls of the next ones (``coder.fit(...)``). Relative links between the documents must point at existing files.
"""
import ast
import importlib.util
import importlib
import inspect
import re
from pathlib import Path

import pytest

import pyterrier_coder
from pyterrier_coder.training import accepted_settings

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
#: classmethods that return an instance of their class
CONSTRUCTORS = {'load', 'from_dataset', 'from_pretrained', 'minilm', 'tasb'}


def fenced_blocks(text: str):
    """``(language, first line number, source)`` of each fenced code block of a markdown text."""
    language, start, lines = None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith('```'):
            if language is None:
                language, start, lines = line[3:].strip(), number + 1, []
            else:
                yield language, start, ''.join(f'{l}\n' for l in lines)
                language = None
        elif language is not None:
            lines.append(line)


def python_blocks(path: Path):
    """``(first line number, source)`` of each ```python block of a markdown file."""
    for language, start, source in fenced_blocks(path.read_text()):
        if language == 'python':
            yield start, source


class Instance:
    """A variable known to hold an instance of ``cls``."""

    def __init__(self, cls):
        self.cls = cls


class DocChecker:
    """Walks the blocks of one document, keeping track of the names they import and assign."""

    def __init__(self, path: Path):
        self.label = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name
        # fragments use the package's names without importing them
        self.names = {name: getattr(pyterrier_coder, name) for name in pyterrier_coder.__all__ if name[0] != '_'}
        self.errors = []

    def error(self, line: int, node, msg: str):
        self.errors.append(f'{self.label}:{line + node.lineno - 1}: {msg}')

    def check_block(self, line: int, source: str):
        try:
            tree = ast.parse(source)
        except SyntaxError as e:
            self.errors.append(f'{self.label}:{line + (e.lineno or 1) - 1}: does not parse: {e.msg}')
            return
        for stmt in tree.body:
            if isinstance(stmt, ast.ImportFrom) and (stmt.module or '').split('.')[0] == 'pyterrier_coder':
                module = importlib.import_module(stmt.module)
                for alias in stmt.names:
                    if not hasattr(module, alias.name):
                        self.error(line, stmt, f'{stmt.module} has no {alias.name}')
                    else:
                        self.names[alias.asname or alias.name] = getattr(module, alias.name)
                continue
            for node in ast.walk(stmt):
                if isinstance(node, ast.Call):
                    self.check_call(line, node)
            if isinstance(stmt, ast.Assign):
                value = self.returned(stmt.value)
                for target in stmt.targets:
                    if isinstance(target, ast.Name):
                        if value is None:
                            self.names.pop(target.id, None)
                        else:
                            self.names[target.id] = value

    def resolve(self, node):
        """What an expression refers to, when it is known: a package object or an :class:`Instance`."""
        if isinstance(node, ast.Name):
            return self.names.get(node.id)
        if isinstance(node, ast.Call):
            return self.returned(node)
        if isinstance(node, ast.Attribute):
            owner = self.resolve(node.value)
            cls = owner.cls if isinstance(owner, Instance) else owner
            if inspect.isclass(cls) or inspect.ismodule(cls):
                return getattr(cls, node.attr, None)
        return None

    def returned(self, call):
        """An :class:`Instance` for calls known to build one: a class, or a constructor classmethod of a class."""
        if not isinstance(call, ast.Call):
            return None
        target = self.resolve(call.func)
        if inspect.isclass(target) and target.__module__.startswith('pyterrier_coder'):
            return Instance(target)
        if inspect.ismethod(target) and inspect.isclass(target.__self__) and target.__name__ in CONSTRUCTORS:
            return Instance(target.__self__)
        if isinstance(call.func, ast.Attribute):
            owner = self.resolve(call.func.value)
            annotation = getattr(target, '__annotations__', {}).get('return')
            if isinstance(owner, Instance) and annotation in (owner.cls, owner.cls.__name__, f"'{owner.cls.__name__}'"):
                return owner   # fluent methods, e.g. DenseIndex(...).index(corpus)
        return None

    def check_call(self, line: int, call: ast.Call):
        if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
            return
        target = self.resolve(call.func)
        if target is None or not callable(target) or isinstance(target, Instance):
            return
        if not getattr(target, '__module__', '').startswith('pyterrier_coder'):
            return   # pyterrier, pandas...: not ours to check
        args = [None] * len(call.args)
        kwargs = {k.arg: None for k in call.keywords}
        owner = self.resolve(call.func.value) if isinstance(call.func, ast.Attribute) else None
        if isinstance(owner, Instance) and inspect.isfunction(target):
            args = [None] + args   # a method called on an instance: bind self
        name = ast.unparse(call.func)
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):
            return
        try:
            signature.bind(*args, **kwargs)
        except TypeError as e:
            self.error(line, call, f'{name}(...) does not match {name}{signature}: {e}')
            return
        if inspect.isclass(target) and any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            unknown = set(kwargs) - accepted_settings(target)
            if unknown:
                self.error(line, call, f'{name} has no setting {sorted(unknown)}')


@pytest.mark.parametrize('path', DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_examples_match_the_package(path):
    checker = DocChecker(path)
    blocks = list(python_blocks(path))
    for line, source in blocks:
        checker.check_block(line, source)
    assert not checker.errors, '\n'.join(checker.errors)


def test_checker_catches_wrong_calls(tmp_path):
    """The checker itself: a wrong argument count, an unknown keyword or setting, a missing import are reported."""
    doc = tmp_path / 'doc.md'
    doc.write_text('```python\n'
                   'from pyterrier_coder import MonoElectra, Nonexistent\n'
                   'from pyterrier_coder.evaluation import evaluate\n'
                   "electra = MonoElectra('minilm', group_size=8, lr=1e-5, no_such_setting=1)\n"
                   'electra.fit(1, 2, 3, 4, 5, 6)\n'
                   "evaluate(1, 2, 'nDCG@10')\n"
                   "Coder.load('x', wrong_keyword=1)\n"
                   '```\n')
    checker = DocChecker(doc)
    for line, source in python_blocks(doc):
        checker.check_block(line, source)
    messages = '\n'.join(checker.errors)
    assert 'has no Nonexistent' in messages
    assert "no setting ['no_such_setting']" in messages
    assert 'electra.fit(...)' in messages
    assert "evaluate(...) does not match" in messages and 'doc.md:6' in messages
    assert len(checker.errors) == 4, messages   # Coder.load takes **overrides: accepted


def heading_anchors(path: Path) -> set:
    """The anchors GitHub gives the headings of a markdown file (lower case, punctuation dropped, spaces to
    hyphens, a repeated heading numbered)."""
    anchors, seen = set(), {}
    inside = False
    for line in path.read_text().splitlines():
        inside ^= line.startswith('```')
        match = re.match(r'#{1,6} (.+)', line) if not inside else None
        if match:
            slug = re.sub(r'[^\w\- ]', '', match.group(1).strip().lower()).replace(' ', '-')
            anchors.add(slug if slug not in seen else f'{slug}-{seen[slug]}')
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


#: pages whose own links are not checked for anchors (docs/performance.md is maintained on its own branch)
ANCHORS_NOT_CHECKED_FROM = {'performance.md'}


def test_links_between_documents_exist():
    """Relative links point at existing files, and their #anchors at headings of those files."""
    missing = []
    for path in DOC_FILES:
        for target, anchor in re.findall(r'\]\(([^)#\s]*)(?:#([^)\s]*))?\)', path.read_text()):
            if '://' in target or target.startswith('mailto:'):
                continue
            file = (path.parent / target) if target else path
            if not file.exists():
                missing.append(f'{path.relative_to(ROOT)} -> {target}')
            elif anchor and file.suffix == '.md' and path.name not in ANCHORS_NOT_CHECKED_FROM \
                    and anchor not in heading_anchors(file):
                missing.append(f'{path.relative_to(ROOT)} -> {target}#{anchor}')
    assert not missing, missing


def runner_commands(path: Path):
    """The ``pyterrier-coder experiment`` command lines of a document (shell blocks and inline code)."""
    text = path.read_text()
    commands = [source.replace('\\\n', ' ') for language, _, source in fenced_blocks(text)
                if language in ('bash', 'sh', 'shell', '')]
    inside, prose = False, []
    for line in text.splitlines():   # the text outside the fenced blocks (inline code may span lines)
        inside ^= line.startswith('```')
        if not inside and not line.startswith('```'):
            prose.append(line)
    prose = '\n'.join(prose)
    commands += [m.group(1).replace('\n', ' ') for m in re.finditer(r'(?<!`)`([^`]+)`(?!`)', prose)]
    for command in commands:
        for segment in re.split(r'&&|\n', command):
            if 'pyterrier-coder experiment' in segment:
                yield segment.strip()


def test_runner_commands_in_the_docs_parse():
    """Every ``pyterrier-coder experiment`` command in the docs has options the CLI knows, components that exist
    and ``--set`` entries the runner accepts."""
    import shlex
    from pyterrier_coder.cli import build_parser
    from pyterrier_coder.experiment import COMPONENTS, FULL, QUICK, apply_overrides, parse_overrides
    commands = [(path, c) for path in DOC_FILES for c in runner_commands(path)]
    assert len(commands) >= 5   # the README's main job, the runner's docs, the measured results
    for path, command in commands:
        tokens = shlex.split(command.replace('\n', ' '))
        args = tokens[[i for i, t in enumerate(tokens) if t.endswith('pyterrier-coder')][0] + 1:]
        if '...' in args:
            continue   # "python -m pyterrier_coder experiment ...": a placeholder
        try:
            parsed = build_parser().parse_args(args)
        except SystemExit:
            pytest.fail(f'{path.relative_to(ROOT)}: the CLI rejects {command!r}')
        assert set(parsed.components.split(',')) <= set(COMPONENTS), command
        apply_overrides(QUICK if parsed.quick else FULL, parse_overrides(parsed.overrides))


# --- docs/make_results.py: the measured tables are generated from the runner's outputs -----------------------------
def _make_results():
    spec = importlib.util.spec_from_file_location('make_results', ROOT / 'docs' / 'make_results.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _synthetic_run(out: Path, names, *, ablations=False, seed=0, more_pairs=()):
    """A runner output directory as ``pyterrier-coder experiment`` writes it: results.csv, comparisons.csv,
    fusion_weights.json and run_info.json, with made-up figures."""
    import json
    import numpy as np
    import pandas as pd
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    rows = []
    for name in names:
        row = {'name': name}
        for measure in ('nDCG@10', 'RR@10', 'R@100', 'R@1000', 'AP'):
            row[measure] = rng.uniform(0.1, 0.7)
            for suffix in (' +', ' -'):
                row[measure + suffix] = np.nan if name == 'BM25 >> Dense' else float(rng.integers(0, 200))
            row[f'{measure} p-value'] = np.nan if name == 'BM25 >> Dense' else rng.uniform(1e-6, 1)
            row[f'{measure} reject'] = False
            row[f'{measure} p-value corrected'] = np.nan if name == 'BM25 >> Dense' else rng.uniform(1e-6, 1)
        row['ms/query'] = rng.uniform(0.1, 900)
        rows.append(row)
    pd.DataFrame(rows).to_csv(out / 'results.csv', index=False)
    pairs = [('BM25 >> CODER', 'BM25'), ('CODER', 'Dense'), ('BM25 >> CODER (+ BM25 score)', 'BM25')]
    if ablations:
        pairs += [('BM25 >> CODER (margin loss)', 'BM25 >> CODER'), ('ADORE (static negatives)', 'ADORE')]
    pairs += list(more_pairs)
    comparisons = [{'system': s, 'reference': r, 'measure': m, 'system value': rng.uniform(), 'reference value':
                    rng.uniform(), 'difference': rng.uniform(-0.1, 0.1), 'wins': int(rng.integers(0, 150)),
                    'losses': int(rng.integers(0, 150)), 'p-value': rng.uniform(1e-8, 1)}
                   for m in ('nDCG@10', 'RR@10') for s, r in pairs if s in names and r in names]
    pd.DataFrame(comparisons).to_csv(out / 'comparisons.csv', index=False)
    (out / 'fusion_weights.json').write_text(json.dumps({'BM25 >> CODER (+ BM25 score)': {
        'alpha': 0.8, 'metric': 'nDCG@10', 'validation_queries': 301,
        'by_alpha': [[a / 10, 0.3 + a / 100] for a in range(11)], 'key': 'x'}}))
    training = {'coder': {'steps': 400, 'seconds': 157.2, 'best_step': 350, 'best_metric': 0.3456,
                          'stopped_early': True, 'metric': 'nDCG@10', 'eval': [[0, 0.3251], [50, 0.33]]}}
    if ablations:
        training['coder_margin'] = dict(training['coder'], steps=100)
    (out / 'run_info.json').write_text(json.dumps({
        'settings': {'dataset': '../shared/datasets/synthetic', 'out': str(out), 'ablations': ablations,
                     'quick': False},
        'argv': ['/x/.venv/bin/pyterrier-coder', 'experiment', '--dataset', '/abs/shared/datasets/synthetic',
                 '--base', 'minilm', '--out', 'runs/synthetic'] + (['--ablations'] if ablations else []),
        'commit': {'commit': 'f' * 40, 'uncommitted_changes': False},
        'machine': {'cpu': 'Test CPU', 'cores': 2, 'usable_cores': 2, 'cpu_flags': ['avx2', 'avx512_bf16'],
                    'cpu_computes_bf16': True, 'torch': '2.13.0', 'device': 'cpu', 'gpu': None, 'memory_gib': 7.7},
        'wall_seconds': 2460.4, 'timings': {'index: BM25': 2.0, 'index: Dense': 96.0, 'train: coder': 157.2},
        'budget': {}, 'budget_notes': [], 'label_scale': {'min_label': 2, 'lower_labels': 'ignore', 'reason': 'r'},
        'test_queries': 323, 'reused_runs': [], 'training': training}))
    return out


def _markdown_tables(text: str):
    """Every markdown table of ``text``: a list of ``{column: cell}`` rows (bold marks removed)."""
    tables, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith('| ') and i + 1 < len(lines) and lines[i + 1].startswith('|---'):
            header = [c.strip() for c in lines[i].strip('|').split('|')]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith('| '):
                cells = [c.strip().replace('**', '') for c in lines[i].strip('|').split('|')]
                rows.append(dict(zip(header, cells)))
                i += 1
            tables.append(rows)
        else:
            i += 1
    return tables


def test_make_results_generates_the_tables_from_the_run_outputs(tmp_path):
    import math
    import pandas as pd
    make_results = _make_results()
    main_names = ['BM25', 'Dense', 'BM25 >> Dense', 'BM25 >> CODER', 'BM25 >> CODER (+ BM25 score)', 'CODER',
                  'ADORE']
    run = _synthetic_run(tmp_path / 'runs' / 'synthetic', main_names)
    ablation_run = _synthetic_run(tmp_path / 'runs' / 'ablations', main_names + [
        'BM25 >> CODER (margin loss)', 'ADORE (static negatives)'], ablations=True, seed=1)
    root = tmp_path / 'repo'
    (root / 'docs').mkdir(parents=True)
    (root / 'README.md').write_text('# title\n\n<!-- results:begin readme -->\nold\n<!-- results:end readme -->\n')
    (root / 'docs' / 'results.md').write_text(
        '# Results\n\nHand-written introduction.\n\n<!-- results:begin synthetic -->\nstale table\n'
        '<!-- results:end synthetic -->\n\n## Ablations\n\n<!-- results:begin ablations -->\n'
        '<!-- results:end ablations -->\n\n## Findings\n\nHand-written findings.\n')
    (root / 'docs' / 'coder.md').write_text('# CODER\n\n<!-- results:begin coder -->\n<!-- results:end coder -->\n'
                                            '\nBetween the tables.\n\n<!-- results:begin coder-ablations -->\n'
                                            '<!-- results:end coder-ablations -->\n\nAfter the table.\n')
    (root / 'docs' / 'plain.md').write_text('# A page without markers\n')
    args = [str(run), '--ablations', str(ablation_run), '--root', str(root)]
    assert make_results.main(args) == 0
    results_md = (root / 'docs' / 'results.md').read_text()
    assert 'Hand-written introduction.' in results_md and 'Hand-written findings.' in results_md
    assert 'stale table' not in results_md
    assert '`pyterrier-coder experiment --dataset ../shared/datasets/synthetic --base minilm --out runs/synthetic`' \
        in results_md
    assert '`ffffffffff`' in results_md and '41 min 0 s' in results_md and 'avx512_bf16' in results_md
    assert 'against the baseline `BM25 >> Dense`' in results_md

    # the main table equals results.csv to 4 decimals, every row, in order
    frame = pd.read_csv(run / 'results.csv')
    block = results_md.split('<!-- results:begin synthetic -->')[1].split('<!-- results:end synthetic -->')[0]
    tables = _markdown_tables(block)
    main_table = tables[0]
    assert [r['pipeline'] for r in main_table] == main_names
    for row, (_, expected) in zip(main_table, frame.iterrows()):
        for measure in ('nDCG@10', 'RR@10', 'R@100', 'R@1000', 'AP'):
            assert float(row[measure]) == round(expected[measure], 4), (row['pipeline'], measure)
        for measure in ('nDCG@10', 'RR@10'):
            cell, value = row[f'{measure} p (Holm)'], expected[f'{measure} p-value corrected']
            if math.isnan(value):
                assert cell == ('baseline' if row['pipeline'] == 'BM25 >> Dense' else '—'), (row['pipeline'], cell)
            else:
                assert math.isclose(float(cell), value, rel_tol=5e-3, abs_tol=5e-5), (row['pipeline'], measure)
        assert float(row['ms/query']) == round(expected['ms/query'], 2)
    # the paired comparisons equal comparisons.csv
    comparisons = pd.read_csv(run / 'comparisons.csv')
    for row in tables[1]:
        for measure in ('nDCG@10', 'RR@10'):
            hit = comparisons[(comparisons['system'] == row['system']) & (comparisons['reference'] == row['reference'])
                              & (comparisons['measure'] == measure)].iloc[0]
            assert float(row[f'Δ {measure}']) == round(hit['difference'], 4)
            assert row[f'{measure} wins / losses'] == f'{hit["wins"]} / {hit["losses"]}'
            assert math.isclose(float(row[f'{measure} p']), hit['p-value'], rel_tol=5e-3, abs_tol=5e-5)
    assert len(tables[1]) == 3

    # the ablations block lists only the rows the main run does not have, each against its full method
    block = results_md.split('<!-- results:begin ablations -->')[1].split('<!-- results:end ablations -->')[0]
    ablation_tables = _markdown_tables(block)
    assert [r['pipeline'] for r in ablation_tables[0]] == ['BM25 >> CODER', 'BM25 >> CODER (margin loss)', 'ADORE',
                                                           'ADORE (static negatives)']
    assert [(r['system'], r['reference']) for r in ablation_tables[1]] == [
        ('BM25 >> CODER (margin loss)', 'BM25 >> CODER'), ('ADORE (static negatives)', 'ADORE')]
    ablation_frame = pd.read_csv(ablation_run / 'results.csv').set_index('name')
    for row in ablation_tables[0]:
        assert float(row['nDCG@10']) == round(ablation_frame.loc[row['pipeline'], 'nDCG@10'], 4)

    # the method page and the README get their rows; text outside the markers is kept
    coder_md = (root / 'docs' / 'coder.md').read_text()
    assert coder_md.startswith('# CODER\n') and coder_md.endswith('\nAfter the table.\n')
    assert '\nBetween the tables.\n' in coder_md
    coder_rows = [r['pipeline'] for r in _markdown_tables(coder_md)[0]]
    assert coder_rows == ['BM25', 'Dense', 'BM25 >> Dense', 'BM25 >> CODER', 'BM25 >> CODER (+ BM25 score)', 'CODER']
    page_main, page_ablations = coder_md.split('<!-- results:begin coder-ablations -->')
    assert 'BM25 >> CODER (margin loss)' not in page_main
    assert 'BM25 >> CODER (margin loss)' in page_ablations and 'ADORE (static negatives)' not in page_ablations
    readme = (root / 'README.md').read_text()
    assert [r['pipeline'] for r in _markdown_tables(readme)[0]] == main_names
    assert '(docs/results.md)' in readme
    assert (root / 'docs' / 'plain.md').read_text() == '# A page without markers\n'

    # a second run changes nothing, and --check agrees; a stale page makes --check fail
    before = {p: p.read_text() for p in root.rglob('*.md')}
    assert make_results.main(args) == 0
    assert {p: p.read_text() for p in root.rglob('*.md')} == before
    assert make_results.main(args + ['--check']) == 0
    (root / 'docs' / 'coder.md').write_text(coder_md.replace('| BM25 |', '| BM25 (edited) |', 1))
    assert make_results.main(args + ['--check']) == 1

    # without --ablations the pages' ablation blocks (and the ablations block) stay as they are
    (root / 'docs' / 'coder.md').write_text(coder_md)
    assert make_results.main([str(run), '--root', str(root)]) == 0
    assert (root / 'docs' / 'coder.md').read_text() == coder_md
    assert make_results.main(args + ['--check']) == 0


def test_ablations_are_the_rows_neither_the_main_nor_the_bi_encoder_run_has(tmp_path):
    """A row the bi-encoder run adds (``ADORE+STAR``, compared with ``STAR``) is a method, not an ablation, even when
    the ablations run (a superset of both) compares it too."""
    make_results = _make_results()
    main_names = ['BM25', 'Dense', 'BM25 >> CODER', 'CODER', 'ADORE']
    star = [('STAR', 'Dense'), ('ADORE+STAR', 'STAR'), ('STAR (random negatives only)', 'STAR')]
    main = make_results.Run(_synthetic_run(tmp_path / 'main', main_names))
    bi = make_results.Run(_synthetic_run(tmp_path / 'bi', main_names + ['STAR', 'ADORE+STAR'], more_pairs=star[:2]))
    ablations = make_results.Run(_synthetic_run(
        tmp_path / 'ab', main_names + ['STAR', 'ADORE+STAR', 'BM25 >> CODER (margin loss)',
                                       'STAR (random negatives only)'], ablations=True, more_pairs=star))
    assert make_results.ablation_pairs(ablations, main, bi) == [
        ('BM25 >> CODER (margin loss)', 'BM25 >> CODER'), ('STAR (random negatives only)', 'STAR')]
    assert ('ADORE+STAR', 'STAR') in make_results.ablation_pairs(ablations, main)   # without the bi-encoder run
    block = make_results.ablations_block(main, ablations, besides=[bi])
    systems = [(r['system'], r['reference']) for r in _markdown_tables(block)[1]]
    assert systems == [('BM25 >> CODER (margin loss)', 'BM25 >> CODER'), ('STAR (random negatives only)', 'STAR')]
    star_page = make_results.page_ablations_block('star', ablations, [main, bi])
    assert 'STAR (random negatives only)' in star_page and 'ADORE+STAR' not in star_page
    coder_page = make_results.page_ablations_block('coder', ablations, [main, bi])
    assert 'BM25 >> CODER (margin loss)' in coder_page and 'STAR' not in coder_page
    assert make_results.page_ablations_block('retrievers', ablations, [main, bi]) is None   # the page has none
    # without the bi-encoder run, the star page (both its blocks) is left alone: ADORE+STAR is no ablation of STAR
    star_md = tmp_path / 'star.md'
    star_md.write_text('<!-- results:begin star -->\nold\n<!-- results:end star -->\n\n'
                       '<!-- results:begin star-ablations -->\nold\n<!-- results:end star-ablations -->\n')
    assert make_results.generate([main], ablations, [star_md])[star_md] == star_md.read_text()
    with_bi = make_results.generate([main], ablations, [star_md], bi)[star_md].split('star-ablations -->', 1)[1]
    assert 'STAR (random negatives only)' in with_bi and 'ADORE+STAR' not in with_bi


def test_make_results_refuses_incomplete_outputs(tmp_path):
    make_results = _make_results()
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'results.csv').write_text('name,nDCG@10\nBM25,0.3\n')
    with pytest.raises(SystemExit, match='run_info.json'):
        make_results.main([str(tmp_path / 'run'), '--root', str(tmp_path)])


# --- docs/api.md: every export, every constructor argument, the defaults it states -------------------------------
API = ROOT / 'docs' / 'api.md'


def api_sections(text: str) -> dict:
    """``{name: section text}`` of the ``## `name` `` sections of the API page."""
    return {m.group(1): m.group(2) for m in re.finditer(r'^## `([^`]+)`\n(.*?)(?=^## |\Z)', text, re.S | re.M)}


def _declared_parameters(obj):
    """``{owner name: [parameters]}``: the named parameters of a function, or of the ``__init__`` of each class of
    ``obj``'s hierarchy that belongs to the package (each listed under the class that declares it)."""
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    if not inspect.isclass(obj):
        return {obj.__name__: [p for p in inspect.signature(obj).parameters.values() if p.kind not in kinds]}
    out = {}
    for klass in obj.__mro__:
        if klass.__module__.startswith('pyterrier_coder') and '__init__' in vars(klass):
            params = [p for name, p in inspect.signature(vars(klass)['__init__']).parameters.items()
                      if name != 'self' and p.kind not in kinds]
            out.setdefault(klass.__name__, []).extend(p for p in params if p.name not in
                                                      {q.name for ps in out.values() for q in ps})
    return out


def api_problems(text: str, exports: dict) -> list:
    """What the API page misses or states wrongly about ``exports`` (``{name: object}``): a missing section, a
    constructor or function argument its section (or, when a base class of the package declares it, the base
    class's section) does not name, and a default written as a literal (`` | `name` | `value` | ``) that is not the
    code's."""
    from pyterrier_coder.training import setting_defaults
    sections, problems = api_sections(text), []
    for name, obj in exports.items():
        if name not in sections:
            problems.append(f'no section for {name}')
            continue
        for owner, params in _declared_parameters(obj).items():
            section = sections.get(owner, sections[name])
            problems += [f'{owner}: argument {p.name!r} is not in docs/api.md' for p in params
                         if f'`{p.name}`' not in section]
        defaults = setting_defaults(obj) if inspect.isclass(obj) else {
            p.name: p.default for p in inspect.signature(obj).parameters.values()}
        for match in re.finditer(r'^\| `(\w+)` \| `([^`|]*)` \|', sections[name], re.M):
            argument, written = match.groups()
            if argument in defaults:
                try:
                    value = ast.literal_eval(written)
                except (ValueError, SyntaxError):
                    continue
                if value != defaults[argument]:
                    problems.append(f'{name}: docs/api.md says {argument}={written}, the code {defaults[argument]!r}')
    return problems


def test_api_reference_covers_every_export_and_argument():
    exports = {name: getattr(pyterrier_coder, name) for name in pyterrier_coder._EXPORTS}
    problems = api_problems(API.read_text(), exports)
    assert not problems, '\n'.join(problems)


def test_api_reference_training_defaults_are_the_components():
    """The table of each trainer's TrainingConfig defaults equals the code's, and the fields it leaves out are the
    same for every trainer."""
    import dataclasses
    from pyterrier_coder import Adore, Coder, MonoElectra, TrainingConfig
    section = api_sections(API.read_text())['TrainingConfig']
    configs = [TrainingConfig(), Coder.DEFAULTS, Adore.DEFAULTS, MonoElectra.DEFAULTS]
    listed = set()
    for match in re.finditer(r'^\| `(\w+)` \| `([^`]*)` \| `([^`]*)` \| `([^`]*)` \| `([^`]*)` \|$', section, re.M):
        field, *cells = match.groups()
        listed.add(field)
        assert [ast.literal_eval(c) for c in cells] == [getattr(c, field) for c in configs], field
    assert listed, 'no defaults table in the TrainingConfig section'
    for field in dataclasses.fields(TrainingConfig):
        if field.name not in listed and field.name != 'verbose':
            assert len({repr(getattr(c, field.name)) for c in configs}) == 1, \
                f'{field.name} differs between trainers: add it to the table in docs/api.md'


def test_api_check_fails_on_an_unmentioned_argument():
    """The check itself: a constructor that gains an argument, or a changed default, is reported."""
    class Component:
        __module__ = 'pyterrier_coder.fake'

        def __init__(self, index, *, depth: int = 10, new_setting: float = 0.5):
            pass
    text = '## `Component`\n\n| argument | default | meaning |\n|---|---|---|\n| `index` | | x |\n| `depth` | `20` | y |\n'
    problems = api_problems(text, {'Component': Component, 'Missing': Component})
    assert "Component: argument 'new_setting' is not in docs/api.md" in problems
    assert 'Component: docs/api.md says depth=20, the code 10' in problems
    assert 'no section for Missing' in problems


def test_generated_blocks_are_paired():
    """Every ``results:begin KEY`` marker of the docs has its ``results:end KEY`` (docs/make_results.py rewrites only
    complete blocks)."""
    for path in DOC_FILES:
        text = path.read_text()
        begins = re.findall(r'<!-- results:begin (\S+) -->', text)
        ends = re.findall(r'<!-- results:end (\S+) -->', text)
        assert begins == ends, f'{path.relative_to(ROOT)}: {begins} vs {ends}'
