"""Build-time measurement of the rung ladder: windows, the loss-model fit, rank correlation,
and a measured ladder on a real (tiny) ONNX Runtime bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compiler.predictor import (
    MAX_WINDOWS,
    MIN_WINDOWS,
    fit_loss_model,
    measure_ladder,
    spearman,
    windows,
)
from runtime.bundle import open_bundle
from runtime.rungs import FEATURE_NAMES
from tests.runtime.conftest import write_tiny_bundle


def test_spearman() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254)  # tied ranks 0.5, 0.5, 2
    assert np.isnan(spearman([1], [2])) and np.isnan(spearman([1, 1], [1, 2]))


def test_fit_recovers_a_log_linear_model() -> None:
    rng = np.random.default_rng(0)
    features = np.column_stack([np.ones(200), rng.normal(size=(200, len(FEATURE_NAMES) - 1))])
    truth = np.array([0.5, 1.0, -0.5, 0.25, 0.0, 0.75])
    mse = np.exp(features @ truth)
    model = fit_loss_model(features, mse)
    np.testing.assert_allclose(model.coefficients, truth, atol=0.02)
    assert model.predict(features).sum() == pytest.approx(mse.sum())
    noisy = mse * rng.lognormal(0, 0.5, 200)
    low = fit_loss_model(features, noisy, quantile=0.9)
    assert np.mean(low.predict(features) <= noisy) == pytest.approx(0.9, abs=0.01)


def test_windows_shrink_until_enough_and_cap() -> None:
    small = [np.zeros((160, 160, 3), dtype=np.uint8)] * 3  # the shipped calibration images
    low, high = windows(small, 2, 96)
    assert low.shape[1:] == (24, 24, 3) and high.shape[1:] == (48, 48, 3)
    assert len(low) == 3 * 25 >= MIN_WINDOWS
    big = [np.zeros((1024, 768, 3), dtype=np.uint8)] * 8
    low, _ = windows(big, 2, 96)
    assert low.shape == (MAX_WINDOWS, 96, 96, 3)


def test_measure_ladder_on_a_bundle(tmp_path: Path) -> None:
    """The tiny bundle's engines add a bias per engine: the ladder measures their costs, orders
    them, and fits the deviation of each from the top rung (a constant bias: a constant MSE)."""
    bundle = open_bundle(write_tiny_bundle(tmp_path / "tiny-cpu-x86"))
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (96, 128, 3)).astype(np.uint8) for _ in range(2)]
    ladder, summary = measure_ladder(bundle.root, bundle.manifest, images)
    assert ladder.names[-1] == "fp32"  # the others by measured cost
    assert [r.cost_ms for r in ladder.rungs[:-1]] == sorted(r.cost_ms for r in ladder.rungs[:-1])
    assert set(ladder.names) == {"bicubic", "a4", "a6", "fp32"}
    assert all(rung.cost_ms > 0 and rung.excess >= 1 for rung in ladder.rungs)
    assert ladder.rungs[-1].loss.coefficients == ()
    assert "ms/tile" in summary and ladder.tile == bundle.manifest.tile
    features = np.ones((1, len(FEATURE_NAMES)))
    a6 = ladder.rung("a6").loss.predict(features)[0]  # a6 adds 1/255 less than fp32's 2/255
    assert 0.5 < a6 < 2.0
