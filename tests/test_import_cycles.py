"""No import circles among mlxcluster's modules, read statically from the source (nothing is imported).

Two graphs: the imports that run when a module is imported (module level, class bodies, ``try``/``if``
blocks), and those plus the imports inside functions (deferred imports still tie modules together: the old
circle ``roles.py`` ↔ ``controller/controller_role.py`` ↔ ``supervisor.py`` went through one). Imports under
``if TYPE_CHECKING:`` never run and are left out of both.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import mlxcluster

SOURCE = Path(mlxcluster.__file__).parent
Graph = dict[str, set[str]]


def module_files() -> dict[str, tuple[Path, bool]]:
    """Dotted module name → (file, is a package's ``__init__``)."""
    found: dict[str, tuple[Path, bool]] = {}
    for path in sorted(SOURCE.rglob("*.py")):
        parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        found[".".join(parts)] = (path, is_package)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _blocks(node: ast.stmt) -> Iterator[list[ast.stmt]]:
    """The statement lists nested in ``node``."""
    for field in ("body", "orelse", "finalbody"):
        children = getattr(node, field, None)
        if isinstance(children, list):
            yield [c for c in children if isinstance(c, ast.stmt)]
    for holder in (*getattr(node, "handlers", ()), *getattr(node, "cases", ())):
        yield holder.body


def import_statements(tree: ast.Module, deferred: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements of a module; those inside functions too when ``deferred``."""

    def visit(statements: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
        for node in statements:
            if isinstance(node, ast.Import | ast.ImportFrom):
                yield node
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if deferred:
                    yield from visit(node.body)
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                yield from visit(node.orelse)
            else:  # class bodies, try/except, with, for, while, if, match: they run at import
                for block in _blocks(node):
                    yield from visit(block)

    return visit(tree.body)


def import_graph(deferred: bool) -> Graph:
    """Module → the mlxcluster modules importing it runs (a submodule's packages included, except its own)."""
    modules = module_files()
    graph: Graph = {name: set() for name in modules}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        for node in import_statements(ast.parse(path.read_text(encoding="utf-8"), str(path)), deferred):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:  # an attribute of a module: that module
                    target = target.rpartition(".")[0]
                parts = target.split(".") if target else []
                for depth in range(1, len(parts) + 1):
                    dependency = ".".join(parts[:depth])
                    if dependency in modules and not (name == dependency or name.startswith(dependency + ".")):
                        graph[name].add(dependency)
    return graph


def find_cycle(graph: Graph) -> list[str] | None:
    """One import circle (``[a, b, ..., a]``), or ``None``: a depth-first search for an edge back into its path."""
    finished: set[str] = set()
    for start in sorted(graph):
        if start in finished:
            continue
        path = [start]
        steps = [iter(sorted(graph[start]))]
        while steps:
            step = next(steps[-1], None)
            if step is None:
                finished.add(path.pop())
                steps.pop()
            elif step in path:
                return [*path[path.index(step) :], step]
            elif step not in finished:
                path.append(step)
                steps.append(iter(sorted(graph.get(step, ()))))
    return None


def test_the_cycle_finder_finds_a_circle_and_the_graph_sees_imports() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    eager, deferred = import_graph(deferred=False), import_graph(deferred=True)
    assert "mlxcluster.api" in eager["mlxcluster.controller.routing.registry"]
    assert "mlxcluster.errors" in eager["mlxcluster.supervisor"]
    assert "mlxcluster.supervisor" not in eager["mlxcluster.roles"]  # dual mode's supervisor is imported when run
    assert {"mlxcluster.supervisor", "mlxcluster.controller.controller_role"} <= deferred["mlxcluster.roles"]


def test_no_import_circle_at_module_level() -> None:
    assert find_cycle(import_graph(deferred=False)) is None


def test_no_import_circle_counting_deferred_imports() -> None:
    assert find_cycle(import_graph(deferred=True)) is None


def test_the_plugin_api_and_the_errors_module_are_leaves() -> None:
    """``mlxcluster.api`` reaches only the leaf modules; ``mlxcluster.errors`` imports nothing of ours."""
    graph = import_graph(deferred=True)
    reached: set[str] = set()
    todo = [name for name in graph if name.startswith("mlxcluster.api")]
    while todo:
        name = todo.pop()
        for dependency in graph[name] - reached:
            reached.add(dependency)
            todo.append(dependency)
    assert reached - {"mlxcluster"} <= {
        "mlxcluster.api",
        "mlxcluster.api.balancer",
        "mlxcluster.api.exporter",
        "mlxcluster.api.helpers",
        "mlxcluster.api.hooks",
        "mlxcluster.config",
        "mlxcluster.durations",
        "mlxcluster.prefix_digest",
        "mlxcluster.protocol",
    }
    assert graph["mlxcluster.errors"] == set()
    for name in ("mlxcluster.builtin.balancers", "mlxcluster.builtin.cache_aware", "mlxcluster.builtin.exporters"):
        assert not {d for d in graph[name] if d.startswith(("mlxcluster.controller", "mlxcluster.worker"))}
