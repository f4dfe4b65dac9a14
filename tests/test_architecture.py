"""The house's walls, checked on the source with ``ast`` (nothing is imported):

- the core imports nothing from ``plait.frontend`` or ``plait.server``;
- backends import nothing from ``plait.frontend`` or ``plait.server``;
- no two ``plait`` modules import each other, directly or through others, counting imports
  inside functions too (a lazy import hides a loop; it does not remove it).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PLAIT = Path(__file__).resolve().parents[1] / "plait"

FORBIDDEN = {
    "plait.core": ("plait.frontend", "plait.server"),
    "plait.backends": ("plait.frontend", "plait.server"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PLAIT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PLAIT.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The ``plait`` modules ``name`` imports anywhere in its source (``from a import b``
    counts as ``a.b`` when that is a module, else as ``a``). ``if TYPE_CHECKING:`` blocks
    are skipped: they never run."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(_without_type_checking(tree)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m == "plait" or m.startswith("plait.")}


def _without_type_checking(tree: ast.Module) -> ast.Module:
    class Strip(ast.NodeTransformer):
        def visit_If(self, node: ast.If) -> ast.AST | None:
            test = node.test
            name = test.id if isinstance(test, ast.Name) else \
                test.attr if isinstance(test, ast.Attribute) else None
            return None if name == "TYPE_CHECKING" else self.generic_visit(node)
    return Strip().visit(tree)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: imports_of(name, path, known) & known for name, path in modules.items()}


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_lower_layers_never_import_the_frontend_or_the_server(layer):
    bad = sorted(f"{mod} imports {dep}" for mod, deps in _graph().items() if _inside(mod, layer)
                 for dep in deps if any(_inside(dep, f) for f in FORBIDDEN[layer]))
    assert not bad, "\n".join(bad)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None. Packages' ``__init__`` re-exports are
    edges like any other."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep == node:
                continue
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                cycle = visit(dep)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_there_is_no_import_cycle_among_plait_modules():
    cycle = find_cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_checks_catch_what_they_claim(tmp_path):
    """The walker sees relative, lazy and ``from pkg import module`` imports, and the cycle
    finder reports a loop through a lazy import."""
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\n"
                   "from . import b\n"
                   "def f():\n    from plait.server import engine_client\n"
                   "if TYPE_CHECKING:\n    import plait.frontend\n")
    known = {"plait.core.b", "plait.server.engine_client", "plait.frontend"}
    assert imports_of("plait.core.m", src, known) == {"plait.core.b",
                                                      "plait.server.engine_client"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
