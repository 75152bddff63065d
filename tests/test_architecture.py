"""The architecture as tests: imports only go down the layers of docs/architecture.md, no import cycle (function-local
imports count), no family name compared outside stas/backbones, no library module above 400 lines. Each checker is
also run on a small package written here that breaks its rule, so that each test can fail."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# docs/architecture.md: a module may import its own layer and the layers below, never one above.
LAYERS = (
    ("stas.errors", "stas.paths", "stas.hub", "stas.registry"),
    ("stas.core",),
    ("stas.backbones", "stas.rundir", "stas.prompts", "stas.video"),
    ("stas.methods",),
    ("stas.generation", "stas.loop"),
    ("stas.ma", "stas.evaluation"),
    ("stas.config", "stas.loggers"),
    ("stas.merge", "stas.results", "stas.table_files", "stas.cli", "stas.apply", "stas.local_jobs"),
    ("stas.run", "stas.analyze", "stas.evaluate", "stas.slurm"),
    ("stas",),  # the package's public names (stas/__init__.py)
)
MAX_LINES = 400


def module_files(root: Path, package: str = "stas") -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package under `root`."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def import_graph(root: Path, package: str = "stas") -> dict[str, set[str]]:
    """Module -> the package's modules it imports, anywhere in its body (function-local imports included).

    `from a.b import c` counts as importing the module a.b.c when that is a module, else a.b."""
    modules = module_files(root, package)
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    targets.add(submodule if submodule in modules else node.module)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def layer_of(module: str, layers=LAYERS) -> int:
    matches = [(len(prefix), index) for index, group in enumerate(layers) for prefix in group
               if module == prefix or module.startswith(prefix + ".")]
    if not matches:
        raise AssertionError(f"{module} is in no layer of LAYERS: add it (and to docs/architecture.md)")
    return max(matches)[1]


def upward_imports(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
    return sorted(f"{source} (layer {layer_of(source, layers)}) imports {target} (layer {layer_of(target, layers)})"
                  for source, targets in graph.items() for target in targets
                  if layer_of(target, layers) > layer_of(source, layers))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def family_comparisons(path: Path, families) -> list[str]:
    """`x == "wan21"`, `x in ("wan21", "wan22")` and the like: a family name in a comparison."""

    def names_in(node) -> set[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value}
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return set().union(*(names_in(element) for element in node.elts)) if node.elts else set()
        return set()

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            named = set().union(*(names_in(part) for part in [node.left, *node.comparators])) & set(families)
            if named:
                found.append(f"{path}:{node.lineno} compares with {sorted(named)}")
    return found


# ------------------------------------------------------------------------------------------------ the real code


def test_every_module_is_in_a_layer():
    for module in module_files(REPO):
        layer_of(module)


def test_no_import_runs_up_the_layers():
    assert upward_imports(import_graph(REPO)) == []


def test_no_import_cycle_counting_function_local_imports():
    assert cycles(import_graph(REPO)) == []


def test_no_family_name_is_compared_outside_backbones():
    from stas.backbones import FAMILIES

    files = [path for folder in ("stas", "benchmarks", "analysis") for path in sorted((REPO / folder).rglob("*.py"))
             if (REPO / "stas" / "backbones") not in path.parents]
    assert [hit for path in files for hit in family_comparisons(path, FAMILIES)] == []


def test_no_library_module_is_longer_than_the_limit():
    lengths = {name: len(path.read_text().splitlines()) for name, path in module_files(REPO).items()}
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}


# ---------------------------------------------------------------------------------------- the checkers can fail


@pytest.fixture
def broken_package(tmp_path) -> Path:
    """A package `pkg` with an upward import (low -> high), a cycle made of function-local imports (a <-> b),
    and a family name compared."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("from pkg.high import thing\n")
    (package / "high.py").write_text("thing = 1\n")
    (package / "a.py").write_text("def f():\n    from pkg import b\n    return b\n")
    (package / "b.py").write_text("def g():\n    import pkg.a\n    if model.family in ('wan21', 'other'):\n        pass\n")
    return tmp_path


def test_the_checkers_see_an_upward_import_a_cycle_and_a_family_comparison(broken_package):
    graph = import_graph(broken_package, "pkg")
    layers = (("pkg.low", "pkg.a", "pkg.b"), ("pkg.high", "pkg"))
    assert upward_imports(graph, layers) == ["pkg.low (layer 0) imports pkg.high (layer 1)"]
    assert cycles(graph) == [["pkg.a", "pkg.b"]]
    assert family_comparisons(broken_package / "pkg" / "b.py", {"wan21": None}) == [
        f"{broken_package / 'pkg' / 'b.py'}:3 compares with ['wan21']"
    ]
    with pytest.raises(AssertionError, match="pkg.high is in no layer"):
        layer_of("pkg.high", (("pkg.low",),))
