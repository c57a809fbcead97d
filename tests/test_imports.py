"""The package's import graph has no cycle.

The graph is read from the source by AST, without importing anything: every ``import`` and
``from ... import`` at module level and inside functions and classes (relative imports resolved,
``from pkg import submodule`` counted as an import of the submodule). Left out: imports under
``if TYPE_CHECKING:`` (they never run); the implicit import of a module's parent packages (Python runs
``a/__init__`` before ``a.b``, whoever asks, so that cannot loop); and the names ``taskarith.lazy``
imports on first attribute access (invisible to the AST, and never needed while a module executes).

Covered: every module of the package, with one exception, :data:`KNOWN_BACK_EDGES` (the loaders in
``taskarith.models`` importing ``Pretrained`` back from ``taskarith.models``). ``taskarith.data`` is
covered in full, and a second test checks its layering: no source imports the registry, and
``taskarith.data.tasks`` imports nothing from ``taskarith.data``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import taskarith

PACKAGE_DIR = Path(taskarith.__file__).parent


def package_modules(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the taskarith package."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = ("taskarith", *path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Import nodes anywhere in ``tree`` except under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from _imports_of(child)
            continue
        yield from _imports_of(node)


def _imports_of(node: ast.AST):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    yield from _imports(node)


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """Module -> the package modules it imports (module level and inside functions)."""
    modules = package_modules(package_dir)

    def known(name: str) -> str | None:
        # The module itself, or (for ``import pkg.attr``-like names) its nearest package.
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        edges: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from pkg import submodule` imports the submodule; `from mod import name`, the module.
                targets = [
                    f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source for alias in node.names
                ]
            for target in targets:
                resolved = known(target) if target.split(".")[0] == "taskarith" else None
                if resolved is not None and resolved != module:
                    edges.add(resolved)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None; depth-first, in sorted order."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_find_cycle_on_hand_made_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": set(), "c": {"d"}, "d": {"c"}}) == ["c", "d", "c"]


def test_import_graph_sees_relative_function_level_and_submodule_imports(tmp_path):
    pkg = tmp_path / "taskarith"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import taskarith.c\n")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "c.py").write_text("from taskarith import a\nfrom taskarith.sub.b import thing\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from .. import c\nthing = 1\n")
    graph = import_graph(pkg)
    assert graph == {
        "taskarith": set(),
        "taskarith.a": {"taskarith.sub.b"},
        "taskarith.c": {"taskarith.a", "taskarith.sub.b"},
        "taskarith.sub": set(),
        "taskarith.sub.b": {"taskarith.c"},
    }
    assert find_cycle(graph) == ["taskarith.a", "taskarith.sub.b", "taskarith.c", "taskarith.a"]


# Known cycle, left for a later change: models/__init__ imports the loaders (clip, timm, vision) and each
# loader imports Pretrained back from models/__init__ inside the function that builds one. It is harmless at
# run time (the loaders import it only when called), and breaking it means moving Pretrained into a module
# of its own. These edges are ignored; the test fails once one disappears, so the list stays true.
KNOWN_BACK_EDGES: frozenset[tuple[str, str]] = frozenset(
    {
        ("taskarith.models.clip", "taskarith.models"),
        ("taskarith.models.timm", "taskarith.models"),
        ("taskarith.models.vision", "taskarith.models"),
    }
)


def test_package_has_no_import_cycle():
    graph = import_graph()
    assert {"taskarith.data", "taskarith.data.registry", "taskarith.data.tasks"} <= set(graph)
    gone = sorted(edge for edge in KNOWN_BACK_EDGES if edge[1] not in graph.get(edge[0], set()))
    assert not gone, f"known back-edges no longer exist, remove them from KNOWN_BACK_EDGES: {gone}"
    pruned = {module: {t for t in targets if (module, t) not in KNOWN_BACK_EDGES} for module, targets in graph.items()}
    cycle = find_cycle(pruned)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_data_modules_import_no_registry_and_tasks_imports_no_data_module():
    graph = import_graph()
    data = {m for m in graph if m.startswith("taskarith.data.")}
    assert not {m for m in data if "taskarith.data.registry" in graph[m]}
    assert not {t for t in graph["taskarith.data.tasks"] if t.startswith("taskarith.data")}
