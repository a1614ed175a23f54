"""The package's shape: imports only point down (no cycle, counting imports inside functions too), and
imports inside functions are kept for the command line's lazy loading and optional dependencies."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "src" / "ddtree"
# Where a function may import from the package: the command line loads each command's modules only
# when it runs (`ddtree --help` needs no torch), and the tree kernel's module needs Triton.
LAZY = {"cli": "every command", "workspace": "tree_kernel"}


def internal_imports(path: pathlib.Path) -> tuple[set[str], set[str]]:
    """The package modules `path` imports at module level, and inside functions."""
    top, inner = set(), set()
    tree = ast.parse(path.read_text())
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nested = {id(node) for f in functions for node in ast.walk(f) if node is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [alias.name for alias in node.names]
            (inner if id(node) in nested else top).update(name.split(".")[0] for name in names)
    return top, inner


def import_graph() -> dict[str, set[str]]:
    return {path.stem: set().union(*internal_imports(path)) for path in PACKAGE.glob("*.py")}


def test_imports_form_no_cycle():
    graph, done, order = import_graph(), set(), []

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, "import cycle: " + " -> ".join(path + (module,))
        if module in done:
            return
        for imported in sorted(graph.get(module, ())):
            visit(imported, path + (module,))
        done.add(module)
        order.append(module)

    for module in sorted(graph):
        visit(module, ())
    # the core reads bottom to top: the model below the round, the round below the engine, the engine below the API
    ranks = {module: order.index(module) for module in order}
    assert ranks["model"] < ranks["stages"] < ranks["methods"] < ranks["generation"] < ranks["engine"] < ranks["api"]
    assert ranks["stages"] < ranks["calibration"] < ranks["engine"]
    assert ranks["costs"] < ranks["stages"] and "engine" not in graph["costs"]


def test_imports_inside_functions_only_where_lazy_loading_is_the_point():
    for path in PACKAGE.glob("*.py"):
        _, inner = internal_imports(path)
        if path.stem == "workspace":
            assert inner <= {"tree_kernel"}, inner
        elif path.stem != "cli":
            assert not inner, f"{path.stem} imports {sorted(inner)} inside a function"
