"""The package layout's import rules (docs/DESIGN.md §2), read from the source with `ast`: models/ knows nothing of
drafters/ or the engine, the engine nothing of the server or the benchmarks, tree/ and verify/ only torch (and the
per-position noise), and no two treespec modules import each other, directly or through others."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "treespec"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports(path: Path, known: dict[str, Path], runtime_only: bool) -> set[str]:
    """The treespec modules `path` imports anywhere in its body (lazy imports too); with runtime_only, not those
    under `if TYPE_CHECKING:`."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if runtime_only and isinstance(node, ast.If) and _type_checking(node):
            return
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        found.update(n for n in names if n.startswith("treespec"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def graph(runtime_only: bool = True) -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known, runtime_only) - {name} for name, path in known.items()}


def test_models_import_nothing_of_drafters_or_the_engine():
    bad = {m: sorted(i for i in deps if i.startswith(("treespec.drafters", "treespec.engine")))
           for m, deps in graph(runtime_only=False).items() if m.startswith("treespec.models")}
    assert {m: d for m, d in bad.items() if d} == {}


def test_the_engine_imports_nothing_of_the_server_or_the_benchmarks():
    bad = {m: sorted(i for i in deps if i.startswith(("treespec.server", "treespec.bench")))
           for m, deps in graph(runtime_only=False).items() if m.startswith("treespec.engine")}
    assert {m: d for m, d in bad.items() if d} == {}


def test_tree_and_verify_import_only_themselves_and_the_noise():
    allowed = ("treespec.tree", "treespec.verify", "treespec.noise")
    bad = {m: sorted(i for i in deps if not i.startswith(allowed))
           for m, deps in graph(runtime_only=False).items() if m.startswith(("treespec.tree", "treespec.verify"))}
    assert {m: d for m, d in bad.items() if d} == {}


def cycles(g: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in g.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    for v in sorted(g):
        if v not in index:
            connect(v)
    return out


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_every_kernels_module_imports_first():
    """Importing a module runs its package's __init__ too, which the graph above does not see: the kernel modules
    that reach into models/ (q8_head, bf16_screen) must still import first in a fresh interpreter."""
    import subprocess
    import sys
    for name in sorted(n for n in modules() if n.startswith("treespec.kernels.")):
        done = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True,
                              cwd=PACKAGE.parent)
        assert done.returncode == 0, (name, done.stderr[-2000:])
