"""A device install: ``pip install adasr`` without the compiler's extra (no torch, no onnx) runs
``adasr inspect`` and ``adasr run`` on a bundle the compiler built, and the compiler's commands
say in one line what to install.

The venv is made from a copy of the four packages (so no build files land in the checkout) and
pulls its dependencies from the package index (or pip's cache): about a minute.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from compiler.cli import main

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("compiler", "runtime", "profiles", "targets")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def _venv_size_mb(venv: Path) -> float:
    return sum(f.stat().st_size for f in venv.rglob("*") if f.is_file()) / 2**20


@pytest.fixture(scope="module")
def device_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding adasr's base install only."""
    root = tmp_path_factory.mktemp("device")
    source = root / "src"
    for package in PACKAGES:
        shutil.copytree(REPO / package, source / package,
                        ignore=shutil.ignore_patterns("__pycache__", "results", "assets"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                    str(source)], check=True, env=env, timeout=600)
    return venv


def _adasr(venv: Path, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(venv / "bin" / "adasr"), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def test_device_install_runs_bundles_without_torch(
        device_venv: Path, tiny: tuple[Path, Path], tmp_path: Path) -> None:
    weights, calib = tiny
    bundle = tmp_path / "tiny-cpu-x86"
    assert main(["build", "--weights", str(weights), "--calib", str(calib), "--target",
                 "cpu-x86", "--patches", "8", "--patch-size", "16", "--steps", "20",
                 "--tile", "16", "--overlap", "4", "-o", str(bundle), "--quiet"]) == 0

    python = str(device_venv / "bin" / "python")
    probe = subprocess.run(
        [python, "-c", "import importlib.util as u; "
         "print([m for m in ('torch', 'onnx', 'onnxscript') if u.find_spec(m)])"],
        capture_output=True, text=True, check=True, cwd=tmp_path)
    assert probe.stdout.strip() == "[]"  # nothing of the compiler's extra is installed
    size = _venv_size_mb(device_venv)
    print(f"device venv: {size:.0f} MB")
    assert size < 600  # torch alone is > 700 MB

    inspected = _adasr(device_venv, "inspect", bundle, cwd=tmp_path)
    assert inspected.returncode == 0, inspected.stderr
    assert "FAILED" not in inspected.stdout and inspected.stdout.count("sha256 ok") >= 2

    image = np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "in.png")
    ran = _adasr(device_venv, "run", "in.png", "-o", "out.png", "--bundle", bundle, "--quiet",
                 cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    with Image.open(tmp_path / "out.png") as out:
        assert out.size == (40, 48)

    built = _adasr(device_venv, "build", "--weights", weights, "-o", tmp_path / "b2",
                   cwd=tmp_path)
    assert built.returncode == 2
    assert built.stderr.strip().count("\n") == 0
    assert "needs the compiler" in built.stderr and "pip install 'adasr[compiler]'" in built.stderr
    assert not (tmp_path / "b2").exists()
