"""The package's modules form no import cycle, counting imports inside functions (a cycle hidden in a function is
still a cycle: it only fails later, at the call)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / 'pyterrier_coder'


def _module_imports():
    """{module: {modules of the package it imports, anywhere in its code}}."""
    modules = {}
    for file in PACKAGE.rglob('*.py'):
        parts = file.relative_to(PACKAGE.parent).with_suffix('').parts
        name = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
        modules[name] = file
    graph = {name: set() for name in modules}
    for name, file in modules.items():
        package = name if file.name == '__init__.py' else name.rsplit('.', 1)[0]
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split('.')[:len(package.split('.')) - node.level + 1]
                    target = '.'.join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ''
                found = [t for t in [target] + [f'{target}.{a.name}' for a in node.names] if t in modules]
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names if a.name in modules]
            else:
                continue
            graph[name].update(t for t in found if t != name)
    return graph


def _cycle(graph):
    """A cycle of the graph as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = 'open'
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 'open':
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 'done'
        stack.pop()
        return None
    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle():
    graph = _module_imports()
    assert 'pyterrier_coder.experiment.runner' in graph and len(graph) > 20
    assert _cycle(graph) is None, ' -> '.join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()}) == ['a', 'b', 'c', 'a']
    assert _cycle({'a': {'b'}, 'b': set()}) is None
