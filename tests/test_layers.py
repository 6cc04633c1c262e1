"""The shared package's layers (docs/testing.md, "Layout"): every import of agegender, those inside functions
included, read from the source with ast (nothing is imported, so no TensorFlow):

- no module is in an import cycle;
- imports go one way, down the layers: data, then models, then inference, then reporting, then training (the
  package's own __init__ and cli sit below them all);
- what tasks/predict.py and the Spaces reach never trains: no module of training/, and none that defines or calls
  fit."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE_DIR = REPO / "common"
PACKAGE = "agegender"
LAYERS = ("data", "models", "inference", "reporting", "training")  # each may import those before it
BASE = ("agegender", "agegender.cli")  # below every layer


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join((PACKAGE, *parts))


def module_path(name: str) -> Path | None:
    base = PACKAGE_DIR.joinpath(*name.split(".")[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def resolve(module: str, names: list[str]) -> set[str]:
    """The modules `from module import names` (or `import module`) loads: a name that is itself a module counts
    as that module."""
    found = set()
    for name in names or [None]:
        if name is not None and module_path(f"{module}.{name}") is not None:
            found.add(f"{module}.{name}")
        elif module_path(module) is not None:
            found.add(module)
    return found


@cache
def imports_of_file(path: Path) -> frozenset[str]:
    """Every agegender module a file imports, at the top or inside functions (package __init__ files of
    subpackages hold only a docstring, so they are left out)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    found |= resolve(alias.name, [])
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            found |= resolve(node.module, [alias.name for alias in node.names])
    return frozenset(found - {PACKAGE} if path.name != "__init__.py" or path.parent != PACKAGE_DIR else found)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def graph() -> dict[str, frozenset[str]]:
    return {name: imports_of_file(path) for name, path in package_modules().items()}


def cycles(edges: dict[str, frozenset[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
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
            if len(component) > 1 or node in edges.get(node, ()):
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def layer_of(module: str) -> int:
    if module in BASE:
        return -1
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 2 and parts[1] in LAYERS else len(LAYERS)


def reached(modules: set[str]) -> set[str]:
    edges, seen, todo = graph(), set(), list(modules)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(edges.get(module, ()))
    return seen


def trains(path: Path) -> bool:
    """Whether a module defines a function named fit or calls a .fit( method."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == "fit":
            return True
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "fit":
            return True
    return False


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_every_module_sits_in_a_layer():
    outside = [name for name in package_modules() if layer_of(name) == len(LAYERS) and name.count(".") > 1]
    loose = [name for name in package_modules() if name.count(".") == 1 and name not in BASE
             and name.split(".")[1] not in LAYERS]
    assert outside == [] and loose == []


def test_imports_go_down_the_layers():
    upward = [f"{module} imports {target}" for module, targets in graph().items() for target in sorted(targets)
              if layer_of(target) > layer_of(module)]
    assert upward == []


def test_subpackage_inits_import_nothing():
    assert [name for name in LAYERS if imports_of_file(PACKAGE_DIR / name / "__init__.py")] == []


@pytest.mark.parametrize("entry", ["tasks/predict.py", "spaces/app_common.py"])
def test_prediction_reaches_no_training_code(entry):
    """What predict and every Space import, directly or not, never trains."""
    modules = reached(set(imports_of_file(REPO / entry)))
    training = sorted(name for name in modules if layer_of(name) == LAYERS.index("training")
                      or trains(module_path(name)))
    assert training == []


def test_the_checker_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text("def late():\n    from agegender.cli import UserError\n")
    assert imports_of_file(source) == {"agegender.cli"}
    assert cycles({"a": frozenset({"b"}), "b": frozenset({"a"}), "c": frozenset({"a"})}) == [["a", "b"]]
