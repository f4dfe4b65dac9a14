"""The house's walls, checked on the source with ``ast`` (nothing is imported):

- the core imports nothing from ``plait.frontend`` or ``plait.server``;
- backends import nothing from ``plait.frontend`` or ``plait.server``;
- no two ``plait`` modules import each other, directly or through others, counting imports
  inside functions too (a lazy import hides a loop; it does not remove it);
- nor through ``if TYPE_CHECKING:`` imports: they never run, but a type-only circle is still
  a tangle a reader has to hold in mind;
- the core imports neither ``plait.models`` nor the backend registry (:data:`REGISTRIES`),
  not even for annotations or inside a function: ``plait.compose`` looks them up;
- ``plait/__init__.py`` lists the public surface in one sorted literal ``__all__``;
- no module over 400 lines, and ``Engine`` under 200.
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

# What only the composition root (``plait.compose``) may look up: the core is handed a Backend
# object and a model loader, so it names no registry and no architecture.
REGISTRIES = ("plait.models", "plait.backends.registry")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PLAIT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PLAIT.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str], *, type_checking: bool = False) -> set[str]:
    """The ``plait`` modules ``name`` imports anywhere in its source (``from a import b``
    counts as ``a.b`` when that is a module, else as ``a``). ``if TYPE_CHECKING:`` blocks
    count only with ``type_checking``: they never run."""
    tree = ast.parse(path.read_text(), str(path))
    if not type_checking:
        tree = _without_type_checking(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
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
            name = (
                test.id
                if isinstance(test, ast.Name)
                else test.attr
                if isinstance(test, ast.Attribute)
                else None
            )
            return None if name == "TYPE_CHECKING" else self.generic_visit(node)

    return Strip().visit(tree)


def _graph(*, type_checking: bool = False) -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {
        name: imports_of(name, path, known, type_checking=type_checking) & known
        for name, path in modules.items()
    }


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_lower_layers_never_import_the_frontend_or_the_server(layer):
    bad = sorted(
        f"{mod} imports {dep}"
        for mod, deps in _graph().items()
        if _inside(mod, layer)
        for dep in deps
        if any(_inside(dep, f) for f in FORBIDDEN[layer])
    )
    assert not bad, "\n".join(bad)


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def import_circles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """Every elementary circle of ``graph``, each once, as its nodes from the smallest on
    (``("a", "b")`` is a -> b -> a). A module importing itself is no circle. Each walk
    stays inside its start's strongly connected component, so it is short on a big graph.
    Packages' ``__init__`` re-exports are edges like any other."""
    reverse: dict[str, set[str]] = {}
    for mod, deps in graph.items():
        for dep in deps:
            reverse.setdefault(dep, set()).add(mod)
    found: set[tuple[str, ...]] = set()
    for start in sorted(graph):
        tangle = _reachable(graph, start) & _reachable(reverse, start)

        def walk(path: list[str]) -> None:
            for dep in sorted(graph.get(path[-1], ())):
                if dep == start and len(path) > 1:
                    found.add(tuple(path))
                elif dep in tangle and dep > start and dep not in path:
                    walk(path + [dep])

        walk([start])
    return found


def _shown(circles: set[tuple[str, ...]]) -> str:
    return "\n".join(" -> ".join((*c, c[0])) for c in sorted(circles))


def test_there_is_no_import_cycle_among_plait_modules():
    circles = import_circles(_graph())
    assert not circles, _shown(circles)


def test_type_only_imports_close_no_circle_either():
    circles = import_circles(_graph(type_checking=True))
    assert not circles, _shown(circles)


def test_the_core_looks_up_no_registry_and_names_no_model():
    bad = sorted(
        f"{mod} imports {dep}"
        for mod, deps in _graph(type_checking=True).items()
        if _inside(mod, "plait.core")
        for dep in deps
        if any(_inside(dep, r) for r in REGISTRIES)
    )
    assert not bad, "\n".join(bad)


def test_the_checks_catch_what_they_claim(tmp_path):
    """The walker sees relative, lazy and ``from pkg import module`` imports, and
    ``TYPE_CHECKING`` ones when asked; the circle finder reports every loop once, only."""
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import b\n"
        "def f():\n    from plait.server import engine_client\n"
        "if TYPE_CHECKING:\n    import plait.frontend\n"
    )
    known = {"plait.core.b", "plait.server.engine_client", "plait.frontend"}
    runtime = {"plait.core.b", "plait.server.engine_client"}
    assert imports_of("plait.core.m", src, known) == runtime
    assert imports_of("plait.core.m", src, known, type_checking=True) == runtime | {
        "plait.frontend"
    }
    assert import_circles({"b": {"c"}, "c": {"a"}, "a": {"b"}}) == {("a", "b", "c")}
    assert import_circles({"a": {"b", "c"}, "b": {"a"}, "c": {"a", "d"}, "d": {"d"}}) == {
        ("a", "b"),
        ("a", "c"),
    }
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": set()}) == set()


def _bound_names(body: list[ast.stmt]) -> set[str]:
    """The names a module's top level binds (through ``try``/``if`` blocks too)."""
    names: set[str] = set()
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update(a.asname or a.name.split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Try, ast.If)):
            for block in ("body", "orelse", "finalbody"):
                names |= _bound_names(getattr(node, block, []))
            for handler in getattr(node, "handlers", []):
                names |= _bound_names(handler.body)
    return names


def _literal_all(path: Path) -> tuple[list[str], set[str]]:
    """A module's ``__all__`` (which must be one literal list) and the names it binds."""
    tree = ast.parse(path.read_text(), str(path))
    values = [
        n.value
        for n in tree.body
        if isinstance(n, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)
    ]
    assert len(values) == 1, f"{path}: __all__ is assigned {len(values)} times"
    try:
        return list(ast.literal_eval(values[0])), _bound_names(tree.body)
    except ValueError:
        pytest.fail(f"{path}: __all__ is not one literal list: {ast.unparse(values[0])}")


def test_the_public_surface_is_one_sorted_literal_list():
    """``plait/__init__.py`` lists the public surface once, where a reader (and ruff) sees
    it: a sorted literal ``__all__`` naming every name it binds without a leading underscore,
    only names it binds, and the whole DSL of ``plait.frontend``."""
    public, bound = _literal_all(PLAIT / "__init__.py")
    dsl, _ = _literal_all(PLAIT / "frontend" / "__init__.py")
    assert public == sorted(set(public))
    assert sorted(n for n in bound if not n.startswith("_") and n not in public) == []
    assert sorted(set(public) - bound) == []
    assert sorted(set(dsl) - set(public)) == []


MAX_MODULE_LINES = 400
MAX_ENGINE_LINES = 200


def test_no_module_outgrows_what_a_reader_can_hold():
    """Every module of ``plait`` and ``benchmarks`` stays at most :data:`MAX_MODULE_LINES`
    lines, and the ``Engine`` class under :data:`MAX_ENGINE_LINES`: past that a room does
    more than one job (split it by job, as the scheduler and the OpenAI routes were)."""
    roots = (PLAIT, PLAIT.parent / "benchmarks")
    too_long = {
        str(p.relative_to(PLAIT.parent)): n
        for root in roots
        for p in root.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines: {too_long}"
    tree = ast.parse((PLAIT / "core" / "engine.py").read_text())
    engine = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Engine")
    assert engine.end_lineno is not None
    assert engine.end_lineno - engine.lineno + 1 < MAX_ENGINE_LINES
