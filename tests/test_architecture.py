"""The import graph: ``converters`` (the ONNX <-> PyTorch bridge) sits below ``otbr_onnx`` and never
imports it, and ``otbr_onnx``'s modules import each other without a cycle.

Read from the source with ``ast``, so a violation is found without importing anything.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from graphlib import TopologicalSorter
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


def _is_type_checking(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every import statement of ``tree``, wherever it is (module level, inside functions,
    methods, ``try``, nested functions): ``ast.walk`` over the whole module, except the bodies of
    ``if TYPE_CHECKING:``, which never run (annotations only). An import inside a function runs
    when the function is called; a circle through one is still a circle."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "_type_only", False):
            yield node
        elif _is_type_checking(node):
            for inner in node.body:
                for sub in ast.walk(inner):
                    sub._type_only = True


def imports(module: str) -> set[str]:
    """The modules ``module`` names in its imports, anywhere in the file (``from pkg import sub``
    names ``pkg.sub`` when ``sub`` is a module of the project)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _import_nodes(tree):
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
    # a registry that names modules by string and imports them on demand (``removers.MODULES`` and
    # ``importlib.import_module``) depends on them as much as an import statement does. Dotted
    # names only: a logger named after the package ("otbr_onnx") imports nothing.
    found.update(node.value for node in ast.walk(tree)
                 if isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value
                 and node.value in MODULES)
    return found


def _ours(names: set[str]) -> set[str]:
    return {n for n in names if n.split(".")[0] in PACKAGES}


def graph() -> dict[str, set[str]]:
    """Which of the project's modules each module imports (anywhere in the file)."""
    return {module: _ours(imports(module)) - {module} for module in MODULES}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: every strongly connected set of two or more modules (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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
    return sorted(found)


def picture() -> str:
    """The import picture: one line per module, the project modules it imports, then the circles."""
    edges = graph()
    lines = [f"{module} -> {', '.join(sorted(edges[module])) or '-'}" for module in sorted(edges)]
    found = circles(edges)
    lines.append(f"circles: {len(found)}")
    lines.extend("  " + " <-> ".join(circle) for circle in found)
    return "\n".join(lines)


def test_every_module_is_seen():
    assert {"converters.to_torch", "converters.runtime", "otbr_onnx.pipeline", "otbr_onnx.ties.analysis"} <= set(MODULES)


def test_imports_inside_functions_are_read():
    """The reader sees an import in a function body, a method and a nested function, and skips
    ``if TYPE_CHECKING:`` (it never runs)."""
    code = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import skipped_a\n"
        "def f():\n    import inside_f\n    def g():\n        from inside_g import x\n"
        "class C:\n    def m(self):\n        try:\n            import inside_m\n        except ImportError:\n"
        "            pass\n"
    )
    names = {alias.name if isinstance(node, ast.Import) else node.module
             for node in _import_nodes(ast.parse(code)) for alias in node.names}
    assert names == {"typing", "inside_f", "inside_g", "inside_m"}


def test_a_registry_of_module_names_is_read_as_imports():
    """``otbr_onnx.removers`` imports its removers by name, on demand: the graph still sees them."""
    assert {"otbr_onnx.removers.pruning", "otbr_onnx.removers.unlearning"} <= graph()["otbr_onnx.removers"]


def test_circles_are_found():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("module", [m for m in MODULES if m.split(".")[0] == "converters"])
def test_converters_never_imports_otbr_onnx(module):
    """Not at module level, not inside a function: the bridge knows nothing of its caller."""
    upward = sorted(n for n in imports(module) if n.split(".")[0] == "otbr_onnx")
    assert not upward, f"{module} imports {upward}"


def test_no_import_circle():
    """No circle among the project's imports, counting imports inside functions: a lazy import
    hides a circle from the interpreter's start-up, not from the design. The picture is printed
    (``pytest -s`` or ``python tests/test_architecture.py``)."""
    print(picture())
    found = circles(graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(circle) for circle in found)
    order = list(TopologicalSorter(graph()).static_order())
    assert set(MODULES) <= set(order)


def test_the_package_imports_without_torch():
    """``otbr_onnx/__init__`` imports the pipeline lazily, for speed only: ``import otbr_onnx``
    (the CLI's first import) must not pull in torch."""
    code = "import sys, otbr_onnx, otbr_onnx.errors; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


if __name__ == "__main__":
    print(picture())
