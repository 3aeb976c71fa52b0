"""The package's structure: layers that only look down, no private name across modules, sizes.

Read from the source with :mod:`ast`, nothing is imported. ``LAYERS`` is the map of
``docs/design.md``: a module may import from its own layer or a lower one, never from a higher
one, and never in a circle. Function-local imports of patchgrid modules exist only at the gates
listed in ``LAZY`` (the public functions to the Dask path, the torch datasets).
"""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Iterator

import pytest

SRC = pathlib.Path(__file__).resolve().parent.parent / "src" / "patchgrid"
TESTS = pathlib.Path(__file__).resolve().parent

LAYERS = {
    # L0: values and primitives that know no other part of patchgrid's engine
    "_checks": 0,
    "settings": 0,
    "grid": 0,
    "windows": 0,
    "backends": 0,
    "_torch": 0,
    "_memory": 0,
    "_progress": 0,
    "_numba": 0,
    "_writes": 0,
    "_formats": 0,
    # L1: reading regions, strided loops, the compiled kernels, files
    "_regions": 1,
    "_strided": 1,
    "_compiled": 1,
    "io": 1,
    "_device": 1,
    # L2: the plan, accumulating, finishing, batches, merge, sample
    "_plan": 2,
    "_finish": 2,
    "_accumulate": 2,
    "_batches": 2,
    "_merge": 2,
    "_sample": 2,
    "_mask": 2,
    "_tta": 2,
    # L3: out of core and distributed
    "_tiled": 3,
    "_chunks": 3,
    "dask": 3,
    "_resume": 3,
    # L4: the public functions that pick a path
    "_apply": 4,
    "_extract": 4,
    "datasets": 4,
    "plot": 4,
    # L5: the public face and the command line
    "_store": 5,
    "_commands": 5,
    "cli": 5,
    "__init__": 5,
    "__main__": 5,
}

# (importer, imported): the only function-local imports of patchgrid modules.
LAZY = {
    ("_apply", "dask"),  # the one gate to the Dask path
    ("_extract", "dask"),
    ("__init__", "datasets"),  # loads torch, so only when asked for
    ("_compiled", "_numba"),  # loads numba, so only when the kernels are asked for
}


def _modules() -> list[str]:
    return sorted(p.stem for p in SRC.glob("*.py"))


def _tree(name: str) -> ast.Module:
    return ast.parse((SRC / f"{name}.py").read_text())


def _imports(name: str) -> Iterator[tuple[str, int, bool, list[str]]]:
    """(imported module, line, at module level, names taken) for each patchgrid import."""
    tree = _tree(name)
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level == 1 and node.module is None:
                for n in names:
                    yield n, node.lineno, id(node) in top, []
            elif node.level == 1:
                yield node.module.split(".")[0], node.lineno, id(node) in top, names
            elif node.module and node.module.split(".")[0] == "patchgrid":
                parts = node.module.split(".")
                if len(parts) == 1:
                    yield "__init__", node.lineno, id(node) in top, names
                else:
                    yield parts[1], node.lineno, id(node) in top, names
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "patchgrid":
                    mod = parts[1] if len(parts) > 1 else "__init__"
                    yield mod, node.lineno, id(node) in top, []


def test_every_module_has_a_layer():
    assert set(_modules()) - set(LAYERS) == set()


@pytest.mark.parametrize("name", _modules())
def test_imports_only_look_down(name):
    upward = [
        f"{name}.py:{line} imports {mod} (L{LAYERS.get(mod)} above L{LAYERS.get(name)})"
        for mod, line, _, _ in _imports(name)
        if LAYERS.get(mod, 0) > LAYERS.get(name, 0)
    ]
    assert upward == []


@pytest.mark.parametrize("name", _modules())
def test_patchgrid_imports_sit_at_module_level(name):
    local = [
        f"{name}.py:{line} imports {mod} inside a function"
        for mod, line, top, _ in _imports(name)
        if not top and (name, mod) not in LAZY
    ]
    assert local == []


def test_no_import_cycle():
    graph = {name: {mod for mod, _, _, _ in _imports(name) if mod in LAYERS} for name in _modules()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert cycles == []


def _private_from_imports(tree: ast.Module) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (
            node.level >= 1 or (node.module or "").split(".")[0] == "patchgrid"
        ):
            for a in node.names:
                private = a.name.startswith("_") and not a.name.startswith("__")
                if private and a.name not in LAYERS:  # a private module itself may be imported
                    found.append((node.lineno, a.name))
    return found


def _module_aliases(tree: ast.Module) -> set[str]:
    """Names bound to patchgrid modules in this file (``from . import grid``, ``import patchgrid
    as pg``, ``from patchgrid import _compiled``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if (node.level == 1 and node.module is None) or node.module == "patchgrid":
                for a in node.names:
                    if a.name in LAYERS:
                        names.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "patchgrid":
                    names.add(a.asname or a.name.split(".")[0])
    return names


def _private_attributes(tree: ast.Module, own: set[str]) -> list[tuple[int, str]]:
    """``module._name`` on a patchgrid module, and ``obj._name`` that this file does not
    define (another module's private state)."""
    aliases = _module_aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        attr = node.attr
        if not attr.startswith("_") or attr.startswith("__"):
            continue
        root = node.value
        while isinstance(root, ast.Attribute):
            root = root.value
        if isinstance(node.value, ast.Name) and node.value.id in aliases:
            found.append((node.lineno, f"{node.value.id}.{attr}"))
        elif attr not in own and isinstance(root, ast.Name) and root.id in ("self", "cls"):
            continue
        elif attr not in own and not (isinstance(root, ast.Name) and root.id in _FOREIGN):
            found.append((node.lineno, attr))
    return found


# Third-party objects whose private attributes are read on purpose (each has a comment there).
_FOREIGN = {"np", "numpy", "torch", "tqdm", "zarr", "h5py", "numba", "ir", "os", "sys", "dask"}


def _defined(tree: ast.Module) -> set[str]:
    """Underscore names this file defines: functions, classes, attributes it assigns, slots."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            names.update(a.arg for a in node.args.args) if not isinstance(
                node, ast.ClassDef
            ) else None
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                names.add(node.attr)  # another object's private state is not this file's
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets
        ):
            names.update(c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant))
        elif (
            isinstance(node, ast.Call)
            and _attribute_call(node) in ("setattr", "__setattr__")
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
        ):
            names.add(node.args[1].value)  # object.__setattr__(self, "_x", ...): its own field
    return {n for n in names if n.startswith("_")}


def _attribute_call(node: ast.Call) -> str | None:
    """The name a call calls: ``f`` for ``f(...)``, ``g`` for ``x.g(...)``."""
    if isinstance(node.func, ast.Name):
        return node.func.id
    if isinstance(node.func, ast.Attribute):
        return node.func.attr
    return None


def _private_strings(tree: ast.Module, own: set[str]) -> list[tuple[int, str]]:
    """``getattr(x, "_name")``, ``setattr(x, "_name", ...)`` and ``monkeypatch.setattr(x,
    "_name", ...)`` for a private name the file does not define, and
    ``monkeypatch.setattr("patchgrid.mod._name", ...)``: the checks above, spelled as strings."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or _attribute_call(node) not in (
            "getattr",
            "setattr",
            "hasattr",
            "delattr",
        ):
            continue
        for arg in node.args[:2]:
            if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
                continue
            last = arg.value.rsplit(".", 1)[-1]
            dotted = arg.value.startswith("patchgrid.")
            private = last.startswith("_") and not last.startswith("__")
            if private and (dotted or last not in own):
                found.append((node.lineno, repr(arg.value)))
    return found


@pytest.mark.parametrize("name", _modules())
def test_no_private_name_crosses_a_module(name):
    tree = _tree(name)
    own = _defined(tree)
    found = (
        _private_from_imports(tree) + _private_attributes(tree, own) + _private_strings(tree, own)
    )
    assert [f"{name}.py:{line} {what}" for line, what in found] == []


@pytest.mark.parametrize("path", sorted(TESTS.glob("*.py")), ids=lambda p: p.name)
def test_tests_take_no_private_names(path):
    tree = ast.parse(path.read_text())
    aliases = _module_aliases(tree)
    found = [f"{path.name}:{line} {what}" for line, what in _private_from_imports(tree)]
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
    found += [f"{path.name}:{line} {what}" for line, what in _private_strings(tree, set())]
    assert found == []


# Sizes, counted in lines of code: docstrings are not counted.
MODULE_LINES = 600
CLASS_LINES = 300
FUNCTION_LINES = 80
OVERSIZE: dict[str, str] = {}


def _code_lines(node: ast.AST) -> int:
    lines = set(range(node.lineno, node.end_lineno + 1))
    for inner in ast.walk(node):
        body = getattr(inner, "body", None)
        if (
            isinstance(inner, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            lines -= set(range(body[0].lineno, body[0].end_lineno + 1))
    return len(lines)


def _sizes() -> Iterator[tuple[str, int, int]]:
    for name in _modules():
        tree = _tree(name)
        tree.lineno, tree.end_lineno = 1, len((SRC / f"{name}.py").read_text().splitlines())
        yield f"{name}.py", _code_lines(tree), MODULE_LINES
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                yield f"{name}.{node.name}", _code_lines(node), CLASS_LINES
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{name}.{node.name}", _code_lines(node), FUNCTION_LINES


def test_modules_classes_and_functions_stay_small():
    large = [
        f"{where}: {n} lines of code (limit {limit})"
        for where, n, limit in _sizes()
        if n > limit and where not in OVERSIZE
    ]
    assert large == []
