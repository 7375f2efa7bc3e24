"""The Python examples in README.md and docs/*.md against the real package.

Running them needs models, data and minutes of training, so they are checked statically instead: every block parses,
every name it imports from pyterrier_coder exists, and every call of a pyterrier_coder class, function or method
binds to the real signature (a renamed or removed argument breaks the docs here, not in a reader's notebook). The
blocks of one file are read in order, so a variable assigned in one block (``coder = Coder(...)``) types the method
calls of the next ones (``coder.fit(...)``). Relative links between the documents must point at existing files.
"""
import ast
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


def test_links_between_documents_exist():
    missing = []
    for path in DOC_FILES:
        for target in re.findall(r'\]\(([^)#\s]+)(?:#[^)]*)?\)', path.read_text()):
            if '://' not in target and not (path.parent / target).exists():
                missing.append(f'{path.relative_to(ROOT)} -> {target}')
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
