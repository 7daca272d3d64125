"""No import cycles in rkan_dist: every import counts, at module level, inside functions and under
TYPE_CHECKING, plus importlib.import_module("...") and _ImportedOnFirstUse("...") of a constant name.

A function-level import hides a cycle from Python but not from the reader: whichever module is
imported first decides what the other sees half-initialised, and no module can be understood or
moved without the other. The graph is read from the source with ast, so nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[2] / "rkan_dist"
DYNAMIC_IMPORTERS = ("import_module", "_ImportedOnFirstUse")
KNOWN_CYCLES: list[set[str]] = []  # none: a new cycle fails the test
# The modules that read, write and export checkpoints and build the model they hold.
CHECKPOINT_MODULES = ("rkan_dist.checkpoint", "rkan_dist.weights", "rkan_dist.export", "rkan_dist.config",
                      "rkan_dist.models", "rkan_dist.models.registry", "rkan_dist.evaluate", "rkan_dist.trainer")


def module_files() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_by(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from rkan_dist import distributed` imports the submodule; `from rkan_dist import __version__` the package
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names)
        elif (isinstance(node, ast.Call) and ast.unparse(node.func).endswith(DYNAMIC_IMPORTERS) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return {module for module in found if module in modules and module != name}


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_by(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in sorted(graph[module]):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = set()
            while not component or module not in component:
                component.add(stack.pop())
            if len(component) > 1:
                found.append(component)

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_the_graph_sees_function_level_and_lazy_imports():
    graph = import_graph()
    assert "rkan_dist.models.registry" in graph["rkan_dist.config"]  # inside a function
    assert "rkan_dist.models" in graph["rkan_dist.export"]  # inside load_model
    assert "rkan_dist.distributed" in graph["rkan_dist.evaluate"]  # inside main
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_import_cycle_but_the_known_ones():
    unexpected = [sorted(component) for component in cycles(import_graph()) if component not in KNOWN_CYCLES]
    assert unexpected == []


@pytest.mark.parametrize("module", CHECKPOINT_MODULES)
def test_checkpoint_export_config_and_models_import_no_cycle(module):
    graph = import_graph()
    assert module in graph
    assert not [component for component in cycles(graph) if module in component]
