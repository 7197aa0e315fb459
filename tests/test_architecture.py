"""The import graph: ``converters`` (the ONNX <-> PyTorch bridge) sits below ``otbr_onnx`` and never
imports it, and ``otbr_onnx``'s modules import each other without a cycle.

Read from the source with ``ast``, so a violation is found without importing anything.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("converters", "otbr_onnx")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _statements(body: list[ast.stmt], top_level: bool):
    """Import statements of ``body``: at module level only (including under ``try``/``if``, but
    not ``if TYPE_CHECKING``), or everywhere when ``top_level`` is false."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node):
            continue
        elif top_level and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(node, field, None)
                if isinstance(inner, list):
                    yield from _statements([n for n in inner if isinstance(n, ast.AST)], top_level)


def imports(module: str, top_level: bool = True) -> set[str]:
    """The modules ``module`` names in its imports (``from pkg import sub`` names ``pkg.sub``
    when ``sub`` is a module of the project)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _statements(tree.body, top_level):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:  # relative import
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(anchor + ([base] if base else []))
        for alias in node.names:
            candidate = f"{base}.{alias.name}"
            found.add(candidate if candidate in MODULES else base)
    return found


def _ours(names: set[str]) -> set[str]:
    return {n for n in names if n.split(".")[0] in PACKAGES}


def test_every_module_is_seen():
    assert {"converters.to_torch", "converters.runtime", "otbr_onnx.pipeline", "otbr_onnx.ties.analysis"} <= set(MODULES)


@pytest.mark.parametrize("module", [m for m in MODULES if m.split(".")[0] == "converters"])
def test_converters_never_imports_otbr_onnx(module):
    """Not at module level, not inside a function: the bridge knows nothing of its caller."""
    upward = sorted(n for n in imports(module, top_level=False) if n.split(".")[0] == "otbr_onnx")
    assert not upward, f"{module} imports {upward}"


def test_no_import_cycle_among_top_level_imports():
    graph = {module: _ours(imports(module)) - {module} for module in MODULES}
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as error:
        pytest.fail(f"import cycle: {' -> '.join(error.args[1])}")
    assert set(MODULES) <= set(order)


def test_the_package_imports_without_torch():
    """``otbr_onnx/__init__`` imports the pipeline lazily, for speed only: ``import otbr_onnx``
    (the CLI's first import) must not pull in torch."""
    code = "import sys, otbr_onnx, otbr_onnx.errors; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
