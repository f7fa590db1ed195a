"""Shared fixtures: the offline data beside the checkout (../shared/data).

Tests that need a data file ask for it through ``shared_file``. When the file is missing the test
is skipped on a developer machine but fails loudly when ``CI`` is set, so CI never passes by
skipping.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("ADASR_SHARED_DATA", REPO.parent / "shared" / "data"))


def require_shared(relative: str) -> Path:
    """Path of a file or folder under ../shared/data; skip (dev) or fail (CI) when missing."""
    path = SHARED_DATA / relative
    if not path.exists():
        message = f"shared data missing: {path} (set ADASR_SHARED_DATA or check out ../shared)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def require_module(name: str) -> Any:
    """The module ``name`` (an optional dependency the test extra installs); skip (dev) or fail
    (CI) when it is missing, as for shared data."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as err:
        message = f"{name} is not installed ({err}): pip install -e '.[compiler,test]'"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def shared_file() -> Callable[[str], Path]:
    return require_shared


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread for a module: small ops, and OpenMP spinning on a busy 2-core
    CPU is about 10x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A random tiny EDSR x2 checkpoint (2 blocks, 8 features) and 3 synthetic LR images."""
    import numpy as np
    import torch

    from compiler.zoo.edsr import EDSR
    from runtime.imaging import save_rgb

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    weights = root / "edsr_tiny.pt"
    torch.save(EDSR(2, 8, 2, 1.0, 255.0).state_dict(), weights)
    calib = root / "calib"
    rng = np.random.default_rng(0)
    for i in range(3):
        smooth = np.kron(rng.random((4, 4, 3)), np.ones((10, 10, 1)))
        noise = rng.random((40, 40, 3)) * (i / 2)
        save_rgb(calib / f"img{i}.png", np.round(np.clip(smooth + noise, 0, 1) * 255).astype(
            np.uint8))
    return weights, calib


def calibrate_tiny(tiny: tuple[Path, Path], settings: dict[str, Any], config: Any = None
                   ) -> dict[str, dict[str, Any]]:
    """Calibration records of the tiny checkpoint, one per ``QuantSettings`` of ``settings``
    (``config``: a CalibrationConfig, by default a few fast steps)."""
    from compiler.quant.calibrate import CalibrationConfig, calibrate
    from compiler.zoo import load_model

    weights, calib = tiny
    config = config or CalibrationConfig(patches=8, patch_size=16, steps=20, batch=2, epochs=4,
                                         validation=4)
    return {name: calibrate(load_model(weights), s, config, calib).record
            for name, s in settings.items()}
