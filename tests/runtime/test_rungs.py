"""The rung ladder: the interpolation rung, tile features, loss models, the manifest field, and
the quality / budget allocation over rungs (runtime.policies.allocate_rungs) in the dispatcher."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest

from runtime.dispatch import Dispatcher
from runtime.engines.fake import FakeEngine
from runtime.errors import BundleError, ConfigError
from runtime.manifest import manifest_from_json
from runtime.policies import QualityPolicy, allocate_rungs, parse_policy, sticky_choices
from runtime.resize import imresize_bicubic
from runtime.rungs import (
    FEATURE_NAMES,
    FEATURE_SETS,
    LossModel,
    Rung,
    RungLadder,
    interpolate_tiles,
    ladder_from_json,
    self_error,
    tile_features,
)
from runtime.tiling import extract_tiles
from tests.runtime.conftest import make_manifest


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("size", [3, 7, 16])
def test_interpolation_rung_is_matlab_bicubic(scale: int, size: int) -> None:
    tiles = np.random.default_rng(size).integers(0, 256, (2, size, size, 3)).astype(np.uint8)
    expected = np.stack([imresize_bicubic(t.astype(np.float64) / 255, scale) for t in tiles])
    result = interpolate_tiles(tiles, scale)
    assert result.shape == (2, 3, size * scale, size * scale) and result.dtype == np.float32
    np.testing.assert_allclose(result, expected.transpose(0, 3, 1, 2), atol=1e-6)


def test_tile_features() -> None:
    flat = np.full((1, 8, 8, 3), 51, dtype=np.uint8)
    ramp = np.broadcast_to((np.arange(8) * 20)[None, None, :, None], (1, 8, 8, 3))
    g, features = tile_features(np.concatenate([flat, ramp.astype(np.uint8)]))
    assert features.shape == (2, len(FEATURE_NAMES))
    assert g[0] == 0 and features[0].tolist() == pytest.approx([1, 0, 0, 0, 0.2, 0])
    assert g[1] > 0 and features[1, 1] == pytest.approx(np.log1p(g[1]))
    assert features[1, 2] == pytest.approx(np.log1p(g[1]) ** 2)
    std = np.arange(8).std() * 20 / 255
    assert features[1, 3] == pytest.approx(np.log1p(255 * std))
    # a linear ramp: the 2x2 means upscaled by bicubic give the ramp back inside; only the
    # mirrored borders differ
    assert 0 < features[1, 5] < np.log1p(20.0)
    _, old = tile_features(np.concatenate([flat, ramp.astype(np.uint8)]), "tile-features/1")
    np.testing.assert_array_equal(old, features[:, :5])
    with pytest.raises(BundleError, match="rung features 'v9' are not supported"):
        tile_features(flat, "v9")


def test_self_error() -> None:
    """Detail interpolation cannot bring back from one octave down: none on a flat tile, the
    most on a one-pixel checkerboard (its 2x2 means are flat grey: 127.5^2 per pixel)."""
    checker = (np.indices((8, 8)).sum(axis=0) % 2).astype(np.float64)[None]
    smooth = np.broadcast_to(np.linspace(0.2, 0.4, 8)[None, None, :], (1, 8, 8))
    values = self_error(np.concatenate([np.full((1, 8, 8), 0.3), checker, smooth]))
    assert values[0] == pytest.approx(0, abs=1e-6)
    assert values[1] == pytest.approx(127.5 ** 2, rel=1e-5)
    assert 0 < values[2] < 1e-3 * values[1]  # a ramp: only its mirrored borders differ
    assert self_error(np.zeros((2, 1, 5))).tolist() == [0, 0]


def test_loss_model() -> None:
    features = np.array([[1, 0, 0, 0, 0], [1, 1, 1, 2, 0.5]], dtype=np.float64)
    model = LossModel((0.5, 1.0, 0.0, -0.25, 2.0), scale=3.0)
    assert model.predict(features).tolist() == pytest.approx([3 * np.exp(0.5), 3 * np.exp(2.0)])
    assert LossModel().predict(features).tolist() == [0, 0] and not LossModel().fitted
    with pytest.raises(BundleError, match="scale must be finite"):
        LossModel(scale=-1.0)


def _ladder() -> RungLadder:
    """bicubic loses 0.01 (1 + 255 std)^2 (next to nothing on flat tiles), a4 a constant 0.5,
    fp32 is the top."""
    return RungLadder(rungs=(
        Rung("bicubic", None, 0.1, LossModel((np.log(0.01), 0, 0, 2, 0))),
        Rung("a4", "a4", 1.0, LossModel((np.log(0.5), 0, 0, 0, 0))),
        Rung("fp32", "fp32", 4.0)),
        reference_error=LossModel((np.log(10.0), 0, 0, 0, 0)), default_target_db=0.05,
        features="tile-features/1")  # a ladder of the first feature set: still read and used


def test_ladder_checks_coefficients_per_feature_set() -> None:
    assert len(FEATURE_SETS["tile-features/2"]) == len(FEATURE_NAMES) == 6
    with pytest.raises(BundleError, match=r"loss model of 'a4' needs 6 coefficients"):
        RungLadder(rungs=(Rung("a4", "a4", 1.0, LossModel((1.0,) * 5)), Rung("fp32", "fp32", 2.0)))
    with pytest.raises(BundleError, match=r"'reference_error' needs 5 coefficients"):
        replace(_ladder(), reference_error=LossModel((1.0,) * 6))


def test_manifest_round_trip_and_older_manifests() -> None:
    manifest = replace(make_manifest(), rungs=_ladder())
    data = manifest.to_json()
    assert manifest_from_json(data) == manifest
    del data["rungs"]  # a manifest written before the ladder existed
    assert manifest_from_json(data).rungs == RungLadder() and ladder_from_json(None).rungs == ()
    with pytest.raises(BundleError, match=r"rungs \['a4'\] name engines the bundle does not"):
        replace(make_manifest(), rungs=replace(_ladder(), rungs=(
            Rung("a4", "a4", 1.0), Rung("fp32", "fp32", 2.0))), engines=make_manifest().engines[2:])
    with pytest.raises(BundleError, match="rung features 'other' are not supported"):
        RungLadder(rungs=(Rung("fp32", "fp32", 1.0),), features="other")


@pytest.mark.parametrize(("text", "target"), [("quality", None), ("quality:0.1", 0.1),
                                              (" quality:0 ", 0.0)])
def test_parse_quality(text: str, target: float | None) -> None:
    assert parse_policy(text) == QualityPolicy(target)
    assert str(parse_policy(text)) == ("quality" if target is None else f"quality:{target:g}")


@pytest.mark.parametrize(("text", "message"), [
    ("quality:fast", "target 'fast' is not a number of dB"),
    ("quality:-0.1", "quality target must be a finite number of dB >= 0"),
    ("quality:inf", "quality target must be a finite number of dB >= 0")])
def test_parse_quality_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_policy(text)


def _brute_force(excess: np.ndarray, costs: np.ndarray, max_excess: float) -> float:
    """The least total cost of any allocation within ``max_excess`` (inf if none)."""
    best = np.inf
    for choice in itertools.product(range(excess.shape[1]), repeat=excess.shape[0]):
        index = np.arange(excess.shape[0]), np.array(choice)
        if excess[index].sum() <= max_excess:
            best = min(best, costs[np.array(choice)].sum())
    return float(best)


def test_allocation_hand_worked() -> None:
    # rungs cost 0, 1, 3; tile 0 is flat (interpolation is free), tile 1 busy, tile 2 between
    excess = np.array([[0.0, 0.0, 0.0], [9.0, 1.0, 0.0], [3.0, 1.0, 0.0]])
    costs = np.array([0.0, 1.0, 3.0])
    assert allocate_rungs(excess, costs, max_excess=100).tolist() == [0, 0, 0]
    assert allocate_rungs(excess, costs, max_excess=4.0).tolist() == [0, 1, 0]  # 9->1 first
    assert allocate_rungs(excess, costs, max_excess=2.0).tolist() == [0, 1, 1]
    assert allocate_rungs(excess, costs, max_excess=0.0).tolist() == [0, 2, 2]
    assert allocate_rungs(excess, costs, max_cost=1.5).tolist() == [0, 1, 0]
    assert allocate_rungs(excess, costs, max_cost=0.5).tolist() == [0, 0, 0]
    assert allocate_rungs(excess, costs, max_cost=100).tolist() == [0, 2, 2]
    with pytest.raises(ConfigError, match="exactly one of max_excess and max_cost"):
        allocate_rungs(excess, costs)


def test_allocation_meets_the_target_near_the_cheapest_cost() -> None:
    """Random small frames: always within the target, and no dearer than the brute-force
    optimum by more than one upgrade (the greedy-over-the-hull bound)."""
    rng = np.random.default_rng(0)
    costs = np.array([0.05, 1.0, 1.2, 3.0])
    for _ in range(60):
        base = rng.lognormal(0, 1, (5, 1))
        excess = base * np.array([20.0, 1.0, 0.5, 0.0]) * rng.lognormal(0, 0.5, (5, 4))
        excess[:, -1] = 0
        target = float(rng.uniform(0, excess[:, 0].sum()))
        rungs = allocate_rungs(excess, costs, max_excess=target)
        assert excess[np.arange(5), rungs].sum() <= target + 1e-9
        assert costs[rungs].sum() <= _brute_force(excess, costs, target) + costs.max() + 1e-9
        tighter = allocate_rungs(excess, costs, max_excess=target / 2)
        assert costs[tighter].sum() >= costs[rungs].sum() - 1e-9


def test_sticky_choices() -> None:
    excess, costs = np.ones((2, 3)), np.array([1.0, 2.0, 3.0])
    assert sticky_choices(excess, costs, None, 0.5) == (excess, costs)
    loss, cost = sticky_choices(excess, costs, np.array([1, 0]), 0.5)
    assert loss.tolist() == [[1.5, 1, 1], [1, 1, 1]]
    assert cost.tolist() == [[1, 2, 4.5], [1, 3, 4.5]]


def _fakes() -> dict[str, FakeEngine]:
    return {"a4": FakeEngine("a4", 2, None, bias=1 / 255), "fp32": FakeEngine("fp32", 2, None)}


def _quality_manifest() -> object:
    return replace(make_manifest({"a4": ((-1, 0, 1), 4.0), "fp32": ((), 32.0)}),
                   rungs=_ladder())


def test_quality_policy_dispatches_flat_tiles_to_interpolation() -> None:
    manifest = _quality_manifest()
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (28, 40, 3)).astype(np.uint8)
    frame[:, :16] = 90  # the left column of tiles is flat
    with Dispatcher(manifest, _fakes(), policy="quality:0.2") as dispatcher:  # type: ignore[arg-type]
        result = dispatcher.upscale(frame)
    assert dispatcher.names == ("bicubic", "a4", "fp32")
    cols = len(result.plan.x_starts)
    rungs = np.array(result.engines).reshape(-1, cols)
    assert set(rungs[:, 0]) == {"bicubic"} and "bicubic" not in rungs[:, 1:]
    # predicted: a4 on all busy tiles costs 0.5 per pixel against a reference error of 10
    busy = sum(t.core.h * t.core.w for t, name in zip(result.plan.tiles, result.engines,
                                                       strict=True) if name != "bicubic") * 4
    total = frame.shape[0] * frame.shape[1] * 4
    per_pixel = {"bicubic": 0.01, "a4": 0.5, "fp32": 0.0}  # flat tiles: std 0
    chosen = sum(t.core.h * t.core.w * 4 * per_pixel[name] for t, name in zip(
        result.plan.tiles, result.engines, strict=True))
    assert result.predicted_db == pytest.approx(10 * np.log10(1 + chosen / (10 * total)))
    assert result.predicted_db <= 0.2 and busy > 0
    # the interpolation tiles are MATLAB bicubic of the tile, cropped to their cores
    tiles = extract_tiles(frame, result.plan)
    for index, (tile, name) in enumerate(zip(result.plan.tiles, result.engines, strict=True)):
        expected = interpolate_tiles(tiles[index:index + 1], 2)[0].transpose(1, 2, 0)
        own = expected[tile.core_in_tile.slices(2)]
        got = result.sr[tile.core.slices(2)]
        if name == "bicubic":
            assert np.abs(got - np.clip(np.floor(own * 255 + 0.5), 0, 255)).max() <= 1
    # quality:0 buys the top rung for every tile that loses anything
    with Dispatcher(manifest, _fakes(), policy="quality:0") as dispatcher:  # type: ignore[arg-type]
        strict = dispatcher.upscale(frame)
    assert set(np.array(strict.engines).reshape(-1, cols)[:, 1:].ravel()) == {"fp32"}
    assert result.fab(manifest) < strict.fab(manifest)  # type: ignore[arg-type]


def test_quality_policy_needs_a_ladder_and_budget_uses_it() -> None:
    plain = make_manifest({"a4": ((-1, 0, 1), 4.0), "fp32": ((), 32.0)})
    with pytest.raises(BundleError, match="needs the bundle's rung ladder"):
        Dispatcher(plain, _fakes(), policy="quality")
    manifest = _quality_manifest()
    frame = np.random.default_rng(2).integers(0, 256, (28, 40, 3)).astype(np.uint8)
    with Dispatcher(manifest, _fakes(), policy="budget:2.5") as d:  # type: ignore[arg-type]
        result = d.upscale(frame)  # 6 tiles: 0.6 ms all bicubic, 6 all a4
    assert result.predicted_ms is not None and result.predicted_ms <= 2.5
    assert result.histogram.get("bicubic", 0) >= 3 and result.budget_ms == 2.5
    with Dispatcher(manifest, _fakes(), policy="fixed:bicubic") as d:  # type: ignore[arg-type]
        assert set(d.upscale(frame).engines) == {"bicubic"}


@pytest.mark.parametrize("policy", ["budget:3", "quality:0.1"])
def test_a_mix_is_the_composition_of_its_rungs(policy: str) -> None:
    """The budget-mix anomaly (benchmarks/results/dispatch_hardware_budget_a6.md: INT8 + FP32
    tiles at 41.014 dB, below INT8 alone at 41.108 and FP32 at 41.157) came from comparing results
    of different bundles: that file was measured before the trunk's ends ran in FP32, when the
    INT8 engine alone gave 40.987 dB, and 41.014 is exactly time-sharing 40.987 and 41.157 in
    its 162 / 30 tile proportion. A mix cannot score below both of its rungs as long as every
    tile of a mixed frame is bit for bit what its rung makes of it alone (no seam, rounding or
    buffer effect of the other rungs): then its MSE is the area-weighted mix of theirs."""
    manifest = _quality_manifest()
    frame = np.random.default_rng(3).integers(0, 256, (40, 52, 3)).astype(np.uint8)
    frame[:, :14] = 77
    hr = np.random.default_rng(4).integers(0, 256, (80, 104, 3)).astype(np.uint8)
    alone = {}
    for name in ("bicubic", "a4", "fp32"):
        with Dispatcher(manifest, _fakes(), policy=f"fixed:{name}") as d:  # type: ignore[arg-type]
            alone[name] = d.upscale(frame).sr
    with Dispatcher(manifest, _fakes(), policy=policy) as d:  # type: ignore[arg-type]
        mixed = d.upscale(frame)
    assert len(mixed.histogram) >= 2, mixed.histogram
    squared = 0.0
    for tile, name in zip(mixed.plan.tiles, mixed.engines, strict=True):
        box = tile.core.slices(2)
        np.testing.assert_array_equal(mixed.sr[box], alone[name][box])
        squared += float(((alone[name][box].astype(float) - hr[box]) ** 2).sum())
    mse = ((mixed.sr.astype(float) - hr) ** 2).mean()
    assert mse == pytest.approx(squared / hr.size)
    assert mse >= min(((sr.astype(float) - hr) ** 2).mean() for sr in alone.values())


def test_engine_map_names_the_interpolation_rung() -> None:
    from runtime.pipeline import draw_engine_map, engine_colours
    from runtime.policies import rung_order

    manifest = _quality_manifest()
    frame = np.random.default_rng(5).integers(0, 256, (28, 40, 3)).astype(np.uint8)
    frame[:, :16] = 90
    with Dispatcher(manifest, _fakes(), policy="quality:0.2") as d:  # type: ignore[arg-type]
        result = d.upscale(frame)
    assert rung_order(manifest) == ("bicubic", "a4", "fp32")  # type: ignore[arg-type]
    colours = engine_colours(rung_order(manifest))  # type: ignore[arg-type]
    painted = draw_engine_map(result, colours, manifest)  # type: ignore[arg-type]
    assert painted.shape == result.sr.shape and "bicubic" in result.engines
    assert result.fab(manifest) < 32  # type: ignore[arg-type]


def test_quality_in_image_mode_picks_one_rung_for_the_frame() -> None:
    manifest = _quality_manifest()
    frame = np.random.default_rng(6).integers(0, 256, (28, 40, 3)).astype(np.uint8)
    # a4 loses 10 log10(1 + 0.5 / 10) = 0.21 dB of the frame, bicubic about 8 dB
    for target, rung in ((100.0, "bicubic"), (0.25, "a4"), (0.2, "fp32"), (0.0, "fp32")):
        with Dispatcher(manifest, _fakes(), mode="image",  # type: ignore[arg-type]
                        policy=f"quality:{target}") as d:
            result = d.upscale(frame)
        assert set(result.engines) == {rung}, (target, result.histogram)
