"""The package's import graph: acyclic (function-local imports included), the bottom layer
(`_misc`, `_shapes`) depends on nothing above it, and the kernels never import `psgd_eqx`.

Read from the source with `ast` (nothing is imported), so a cycle hidden in a function body
that only bites at call time, or under `if TYPE_CHECKING:`, is caught too.
"""

import ast
import pathlib

import pytest


ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "psgd_eqx"
KERNELS = "psgd_eqx_kernels"
KERNELS_DIR = ROOT / "kernels" / KERNELS
BOTTOM = {"psgd_eqx._misc", "psgd_eqx._shapes"}


def _modules(pkg_dir: pathlib.Path, pkg: str) -> dict[str, tuple[pathlib.Path, bool]]:
    """Module name → (file, is_package) for every `.py` under `pkg_dir`."""
    out = {}
    for path in sorted(pkg_dir.rglob("*.py")):
        rel = path.relative_to(pkg_dir).with_suffix("")
        parts = [pkg, *rel.parts]
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_pkg)
    return out


def _imported_names(tree: ast.AST, module: str, is_pkg: bool, known: set[str]) -> set[str]:
    """Every module `module` imports, anywhere in its body (functions, classes, branches).

    `from a import b` counts as an import of `a.b` when that is a module of `known`, else
    of `a`; relative imports are resolved against `module`'s package. Literal
    `importlib.import_module("...")` calls count too.
    """
    package = module if is_pkg else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                up = node.level - 1
                if up >= len(base):
                    raise ValueError(f"{module}: relative import beyond the top level")
                base = base[: len(base) - up] if up else base
                base = ".".join(base)
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    return found


def _graph(pkg_dir: pathlib.Path, pkg: str) -> dict[str, set[str]]:
    """Module → the modules of the same package it imports (itself excluded)."""
    modules = _modules(pkg_dir, pkg)
    graph = {}
    for name, (path, is_pkg) in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        deps = _imported_names(tree, name, is_pkg, set(modules))
        graph[name] = {
            d for d in deps if (d == pkg or d.startswith(pkg + ".")) and d != name
        }
    return graph


def _all_imports(pkg_dir: pathlib.Path, pkg: str) -> dict[str, set[str]]:
    modules = _modules(pkg_dir, pkg)
    return {
        name: _imported_names(ast.parse(path.read_text()), name, is_pkg, set(modules))
        for name, (path, is_pkg) in modules.items()
    }


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle (as a closed path) if the graph has any, else None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = GREY
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if colour.get(dep, BLACK) == GREY:
                return stack[stack.index(dep):] + [dep]
            if colour.get(dep) == WHITE:
                cycle = visit(dep)
                if cycle:
                    return cycle
        stack.pop()
        colour[node] = BLACK
        return None

    for node in sorted(graph):
        if colour[node] == WHITE:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return _graph(ROOT / PACKAGE, PACKAGE)


# -- the collector itself (so that the checks below cannot pass vacuously) -------------


def test_collector_resolves_relative_absolute_and_local_imports():
    src = '''
import os
import psgd_eqx._misc
from . import _shapes, helper_name
from .. import top_name
from .._plan import kron_plan
from .kron import KronQ as K2
from .._precond import KronQ
from psgd_eqx._precond.kron import KronQ as K
from psgd_eqx import _ops

def f():
    from .._probe import hessian_helper
    import importlib
    return importlib.import_module("psgd_eqx._numerics")

class C:
    def g(self):
        from .._geometry import dense_step

if False:
    from .._bucket import x
'''
    known = {"psgd_eqx", "psgd_eqx._misc", "psgd_eqx._shapes", "psgd_eqx._plan",
             "psgd_eqx._precond", "psgd_eqx._precond.kron", "psgd_eqx._precond.sub",
             "psgd_eqx._ops", "psgd_eqx._probe", "psgd_eqx._numerics",
             "psgd_eqx._geometry", "psgd_eqx._bucket"}
    got = _imported_names(ast.parse(src), "psgd_eqx._precond.sub", False, known)
    assert got == {
        "os", "importlib",
        "psgd_eqx._misc",
        "psgd_eqx._precond",  # `from . import _shapes, helper_name` (not modules here)
        "psgd_eqx",  # `from .. import top_name`
        "psgd_eqx._plan",
        "psgd_eqx._precond.kron",
        "psgd_eqx._ops",
        "psgd_eqx._probe",
        "psgd_eqx._numerics",
        "psgd_eqx._geometry",
        "psgd_eqx._bucket",
    }
    # relative to a package's __init__: `.` is the package itself
    got = _imported_names(ast.parse("from .kron import KronQ\nfrom . import kron"),
                          "psgd_eqx._precond", True, known)
    assert got == {"psgd_eqx._precond.kron"}


def test_cycle_finder():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]


def test_graph_sees_the_package(graph):
    assert {"psgd_eqx", "psgd_eqx._alias", "psgd_eqx._transform", "psgd_eqx._precond",
            "psgd_eqx._misc", "psgd_eqx._shapes"} <= set(graph)
    assert "psgd_eqx._precond.kron" in graph
    # known edges (module level), so a collector that found nothing would fail here
    assert "psgd_eqx._transform" in graph["psgd_eqx._alias"]
    assert "psgd_eqx._alias" in graph["psgd_eqx"]
    assert sum(len(d) for d in graph.values()) > 30


# -- the rules ---------------------------------------------------------------------------


def test_package_import_graph_is_acyclic(graph):
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_bottom_layer_imports_nothing_above_it(graph):
    # _misc and _shapes are the bottom layer: they may use each other (one way: the
    # acyclicity test forbids both), nothing else of the package, not even its __init__.
    for module in sorted(BOTTOM):
        assert graph[module] <= BOTTOM - {module}, (
            f"{module} imports {sorted(graph[module] - BOTTOM)} from above the bottom layer")


def test_kernels_never_import_psgd_eqx():
    imports = _all_imports(KERNELS_DIR, KERNELS)
    assert "psgd_eqx_kernels._eq_factor_update" in imports
    assert "psgd_eqx_kernels._blocks" in imports["psgd_eqx_kernels._eq_factor_update"]
    bad = {
        module: sorted(d for d in deps if d.split(".")[0] == PACKAGE)
        for module, deps in imports.items()
    }
    bad = {m: d for m, d in bad.items() if d}
    assert not bad, f"psgd_eqx_kernels must not depend on psgd_eqx: {bad}"
    kernel_graph = {m: {d for d in deps if d.split(".")[0] == KERNELS and d != m}
                    for m, deps in imports.items()}
    cycle = _find_cycle(kernel_graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
