"""The lowering's imports flow one way: no import loop in ``compiler/lower``, the shared core
imports no dialect, and the plan does not import the lowering.

Imports are read from the source with ``ast`` (every ``import`` / ``from ... import`` at any
depth, ``TYPE_CHECKING`` blocks included: a loop there is still a loop between the modules), so
the test fails on a loop even where Python's lazy imports would let it run.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOWER = REPO / "compiler" / "lower"
PACKAGE = "compiler.lower"


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``path`` imports (``from pkg import mod`` counts as mod)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found & known


def import_graph(folder: Path) -> dict[str, set[str]]:
    files = sorted(folder.glob("*.py"))
    known = {_module(path) for path in files}
    return {_module(path): imported_modules(path, known) - {_module(path)} for path in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import loop of ``graph`` (module names, first repeated last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for nxt in sorted(graph.get(module, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)) is not None:
            return cycle
    return None


def test_no_import_loop_in_the_lowering() -> None:
    graph = import_graph(LOWER)
    assert {f"{PACKAGE}.{name}" for name in ("qdq", "ort", "trt", "trt_check", "graph")} <= set(
        graph)
    assert find_cycle(graph) is None, f"import loop: {' -> '.join(find_cycle(graph) or [])}"
    assert graph[PACKAGE] == set()  # the package itself imports nothing


def test_the_core_imports_no_dialect_and_the_dialects_not_each_other() -> None:
    graph = import_graph(LOWER)
    dialects = {f"{PACKAGE}.ort", f"{PACKAGE}.trt", f"{PACKAGE}.trt_check",
                f"{PACKAGE}.dialects"}
    for core in ("qdq", "graph", "exact", "image", "export"):
        assert not graph[f"{PACKAGE}.{core}"] & dialects, core
    assert f"{PACKAGE}.trt" not in graph[f"{PACKAGE}.ort"]
    assert f"{PACKAGE}.ort" not in graph[f"{PACKAGE}.trt"]


def test_the_plan_does_not_import_the_lowering() -> None:
    plan = REPO / "compiler" / "plan.py"
    tree = ast.parse(plan.read_text())
    modules = {node.module for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom) and node.module}
    modules |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    assert not {m for m in modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")}


def test_the_loop_finder_finds_a_loop(tmp_path: Path) -> None:
    """The check above can fail: two modules importing each other (one only for typing)."""
    folder = tmp_path / "compiler" / "lower"
    folder.mkdir(parents=True)
    (folder / "a.py").write_text("from compiler.lower.b import x\n")
    (folder / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                 "    from compiler.lower import a\n")
    known = {"compiler.lower.a", "compiler.lower.b"}
    graph = {"compiler.lower.a": imported_modules(folder / "a.py", known),
             "compiler.lower.b": imported_modules(folder / "b.py", known)}
    assert find_cycle(graph) == ["compiler.lower.a", "compiler.lower.b", "compiler.lower.a"]
