"""Layers point down: the import graph of `batch_engine`, read from the source (every import statement, lazy ones
inside functions included, since they run too).

- no cycle between the package's parts (a top-level module or a subpackage of `batch_engine` is one part);
- nothing in `batch_engine` imports `flows` (the deployment entrypoints sit above the library);
- nothing outside `batch_engine/bench/` imports `batch_engine.bench` (benchmarks stay out of the library's graph);
- only `Run` (batch_engine/runner.py) changes a run's status.

(No module named after a standard-library one: tests/unit/test_module_names.py.)
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "batch_engine"
BENCH = f"{PACKAGE}.bench"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> Iterator[str]:
    """Every module `name` imports: `from a import b` names `a.b` when that is a module, else `a`."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield full if full in known else base


def _part(module: str) -> str:
    """The part of the package a module belongs to: `batch_engine.lanes.batch` → `batch_engine.lanes`."""
    return ".".join(module.split(".")[:2])


def _in_bench(module: str) -> bool:
    return module == BENCH or module.startswith(BENCH + ".")


def _graph() -> dict[str, set[tuple[str, str]]]:
    """module → {(imported module, importing module)} for every import of a `batch_engine` or `flows` module."""
    modules = _modules()
    known = set(modules)
    return {
        name: {(target, name) for target in _imports(name, path, known) if target.split(".")[0] in (PACKAGE, "flows")}
        for name, path in modules.items()
    }


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
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

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_package_parts_import_each_other_without_a_cycle() -> None:
    parts: dict[str, set[str]] = {}
    for name, imports in _graph().items():
        for target, _ in imports:
            # The package root is the public API: it re-exports the parts, and `import batch_engine` is no layer.
            if target.startswith(PACKAGE + ".") and _part(target) != _part(name) and _part(name) != PACKAGE:
                parts.setdefault(_part(name), set()).add(_part(target))
    assert _cycles(parts) == []


def test_nothing_in_the_package_imports_the_deployment_entrypoints() -> None:
    upward = sorted(f"{source} imports {target}" for imports in _graph().values() for target, source in imports)
    assert [line for line in upward if line.split(" imports ")[1].split(".")[0] == "flows"] == []


def test_only_the_benchmarks_import_the_benchmarks() -> None:
    into_bench = sorted(
        f"{source} imports {target}"
        for imports in _graph().values()
        for target, source in imports
        if (target == BENCH or target.startswith(BENCH + "."))
        and not (source == BENCH or source.startswith(BENCH + "."))
    )
    assert into_bench == []


def test_only_run_changes_a_run_status() -> None:
    # One run loop: every status change (running, submitted, complete, superseded) is a phase of `Run`; the flows,
    # the CLI and `batches collect` only call the phases.
    writers = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        owners = {
            id(call): node.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ClassDef)
            for call in ast.walk(node)
            if isinstance(call, ast.Call)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "set_run_status"
            ):
                writers.append(f"{name}:{node.lineno} in {owners.get(id(node), 'module level')}")
    assert writers, "no status write found: the test no longer sees them"
    assert [w for w in writers if not w.startswith(f"{PACKAGE}.runner:") or not w.endswith(" in Run")] == []
