"""Project-wide rules: lint, types, import direction, and what the runtime may import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("compiler", "runtime", "profiles", "targets")
# Which project packages each package may import (architecture.md: compiler -> targets -> runtime,
# profiles -> targets, runtime; runtime imports nothing from the project).
ALLOWED = {
    "runtime": {"runtime"},
    "targets": {"targets", "runtime"},
    "profiles": {"profiles", "targets", "runtime"},
    "compiler": {"compiler", "targets", "runtime", "profiles"},
}


def _project_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_import_direction(package: str) -> None:
    offenders = {
        str(path.relative_to(REPO)): sorted(_project_imports(path) - ALLOWED[package])
        for path in sorted((REPO / package).rglob("*.py"))
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert offenders == {}, f"imports against the layering: {offenders}"


def test_device_packages_do_not_import_torch_or_onnx() -> None:
    """The runtime ships to devices without torch; importing it (and targets, profiles) is cheap."""
    code = (
        "import sys, runtime, targets, profiles, compiler, compiler.cli\n"
        "import runtime.errors\n"
        "heavy = sorted(m for m in ('torch', 'onnx', 'tensorrt', 'pycuda', 'onnxscript')"
        " if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO)
    assert out.stdout.strip() == ""


def test_ruff_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "."], capture_output=True,
                            text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_clean() -> None:
    """mypy --strict on runtime/ and targets/ (and the TensorRT modules, against tensorrt-stubs)."""
    stubs = REPO / "typings" / "tensorrt" / "__init__.pyi"
    if not stubs.exists():
        subprocess.run([sys.executable, str(REPO / "tools" / "setup_typecheck.py")], check=True)
    result = subprocess.run([sys.executable, "-m", "mypy"], capture_output=True, text=True,
                            cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
