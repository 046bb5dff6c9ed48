"""The import graph of lmclab follows the layer order written in the README's architecture section.

Every `lmclab` import of every module (at any depth: a function-local import counts too, so a
circle cannot be hidden inside a function) must point to the same or a lower layer, and the module
graph must have no cycles.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lmclab

PACKAGE = Path(lmclab.__file__).resolve().parent

#: Bottom to top; a module may import modules of its own layer or below. Keep in step with the README.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__init__", "points"),
    ("data",),
    ("models",),
    ("config",),
    ("store",),
    ("training", "permutation"),
    ("paths",),
    ("align", "curvature", "report"),
    ("geometry",),
    ("experiments",),
    ("cli", "__main__"),
)
LAYER_OF = {top: i for i, tops in enumerate(LAYERS) for top in tops}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(("lmclab", *parts))


def top_level(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rsplit(".", 1)[0]


def imports_of(path: Path, module: str) -> list[tuple[str, int, bool]]:
    """(imported lmclab module, line, inside a function) for every lmclab import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names if a.name.startswith("lmclab"))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package_of(module, path).split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.startswith("lmclab"):
                    for alias in child.names:  # `from pkg import submodule` is an import of the submodule
                        sub = f"{target}.{alias.name}"
                        found.append((sub if sub in MODULES else target, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_top_level_package_has_a_layer() -> None:
    tops = {top_level(m) for m in MODULES}
    assert tops <= set(LAYER_OF), f"modules without a layer in LAYERS: {sorted(tops - set(LAYER_OF))}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_and_are_not_hidden_in_functions(module: str) -> None:
    path = MODULES[module]
    here = LAYER_OF[top_level(module)]
    for target, line, in_function in imports_of(path, module):
        there = LAYER_OF[top_level(target)]
        where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
        assert there <= here, f"upward import: {where} ({top_level(module)} is below {top_level(target)})"
        assert not in_function, f"function-local lmclab import (hides the import graph): {where}"


def test_module_graph_has_no_cycles() -> None:
    def resolve(target: str) -> str | None:
        while target and target not in MODULES:  # `from lmclab.x import name` of a module-level name
            target = target.rsplit(".", 1)[0] if "." in target else ""
        return target or None

    graph = {m: {t for t in (resolve(i) for i, _, _ in imports_of(p, m)) if t and t != m} for m, p in MODULES.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t) :] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_checker_sees_a_planted_upward_and_hidden_import(tmp_path: Path) -> None:
    """The checks above can fail: an upward, function-local import is found in a file written here."""
    fake = PACKAGE / "paths" / "fake.py"
    source = "def f():\n    from lmclab.experiments import graph\n"
    planted = tmp_path / "fake.py"
    planted.write_text(source)
    ((target, line, in_function),) = imports_of(planted, "lmclab.paths.fake")
    assert (target, line, in_function) == ("lmclab.experiments.graph", 2, True)
    assert LAYER_OF[top_level(target)] > LAYER_OF[top_level(module_name(fake))]
