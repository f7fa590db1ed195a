"""The backend registries: one module per backend on each side, and no backend string branches
anywhere else (architecture.md: backends behind a registry)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from compiler.backends import all_builders, builder
from runtime.backends import BACKENDS, runtime_backend
from runtime.errors import ConfigError
from runtime.manifest import PRECISIONS
from targets.loader import list_targets

REPO = Path(__file__).resolve().parent.parent
# the registries and the backends' own modules may name backends and dialects
REGISTRY = {"runtime/backends.py", "compiler/backends", "runtime/engines",
            "compiler/lower/dialects.py"}
NAMES = {*BACKENDS, "ort", "tensorrt"}


def test_every_backend_has_both_sides_with_the_same_name() -> None:
    assert [b.name for b in all_builders()] == list(BACKENDS)
    for name in BACKENDS:
        runtime = runtime_backend(name)
        assert runtime.name == builder(name).name == name
        assert runtime.device in ("cpu", "gpu") and runtime.label
        assert set(runtime.precisions) <= set(PRECISIONS) and runtime.precisions
        assert list(runtime.precisions) == sorted(runtime.precisions, key=PRECISIONS.index)


def test_an_unknown_backend_is_one_line_naming_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown backend 'onnxruntme'.*onnxruntime"):
        runtime_backend("onnxruntme")
    with pytest.raises(ConfigError, match=r"unknown backend 'x'"):
        builder("x")


def test_every_target_backend_runs_its_ladder_top() -> None:
    for target in list_targets():
        for name in target.backends:
            built = target.with_backend(name)
            assert built.backend == name and built.top_precision in built.precision_ladder
            assert set(built.precision_ladder) <= set(runtime_backend(name).precisions)


def _string_branches(path: Path) -> list[str]:
    """``x == "onnxruntime"`` style comparisons (==, !=, in) against a backend or dialect."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Compare):
            values = [node.left, *node.comparators]
            strings = {v.value for v in values if isinstance(v, ast.Constant)}
            strings |= {e.value for v in values if isinstance(v, (ast.Tuple, ast.Set, ast.List))
                        for e in v.elts if isinstance(e, ast.Constant)}
            if strings & NAMES:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_no_backend_string_branch_outside_the_registries() -> None:
    files = [path for package in ("compiler", "runtime", "profiles", "targets")
             for path in sorted((REPO / package).rglob("*.py"))
             if not any(str(path.relative_to(REPO)).startswith(r) for r in REGISTRY)]
    assert [hit for path in files for hit in _string_branches(path)] == []
