"""The dispatcher with fake engines: exact reconstruction, engine choice, batching, hysteresis.

Fake engines upscale by nearest neighbour and add a per-engine bias of k/255, so an SR pixel
minus its LR pixel says which engine made it.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from runtime.dispatch import STAGES, Dispatcher, _to_uint8
from runtime.engines.fake import FakeEngine
from runtime.errors import BundleError, ConfigError, EngineError, MediaError
from runtime.imaging import round_to_uint8
from runtime.manifest import Manifest
from runtime.policies import LatencyTable, budget_assignment
from runtime.statistic import complexity, complexity_batch, image_offset, image_offsets
from runtime.tiling import extract_tiles
from tests.runtime.conftest import make_manifest

LADDER = {"lo": ((-1,), 4.0), "mid": ((0,), 6.0), "hi": ((1,), 8.0), "ref": ((), 32.0)}
BIAS = {"lo": 1, "mid": 2, "hi": 3, "ref": 4}  # in uint8 steps
Frame = npt.NDArray[np.uint8]


def fakes(manifest: Manifest, bias: bool = True, static: bool = True) -> dict[str, FakeEngine]:
    """A FakeEngine per engine of ``manifest`` (static T x T input unless ``static=False``)."""
    return {name: FakeEngine(name, manifest.model.scale, manifest.tile if static else None,
                             bias=BIAS.get(name, 0) / 255 if bias else 0.0)
            for name in manifest.names}


def nearest(frame: Frame, scale: int) -> Frame:
    return frame.repeat(scale, 0).repeat(scale, 1)


def ramp(k: int, size: int = 16, base: int = 20) -> Frame:
    """A gray size x size tile rising by k levels per column (g about 1.84 k for size 16)."""
    row = base + k * np.arange(size)
    return np.broadcast_to(row[np.newaxis, :, np.newaxis], (size, size, 3)).astype(np.uint8)


def flat(value: int = 100, size: int = 16) -> Frame:
    return np.full((size, size, 3), value, dtype=np.uint8)


def noisy(seed: int = 0, size: int = 16) -> Frame:
    return np.random.default_rng(seed).integers(20, 230, (size, size, 3)).astype(np.uint8)


def grid(*rows: list[Frame]) -> Frame:
    return np.concatenate([np.concatenate(row, axis=1) for row in rows], axis=0)


@pytest.mark.parametrize("mode", ["patch", "image"])
@pytest.mark.parametrize("stitch", ["crop", "feather"])
@pytest.mark.parametrize(("scale", "overlap"), [(2, 4), (3, 5)])
def test_identity_engines_reconstruct_nearest_exactly(mode: str, stitch: str, scale: int,
                                                      overlap: int) -> None:
    manifest = make_manifest(LADDER, tile=16, overlap=overlap, scale=scale)
    rng = np.random.default_rng(1)
    engines = fakes(manifest, bias=False)
    with Dispatcher(manifest, engines, mode=mode, stitch=stitch) as dispatcher:
        for height, width in [(1, 1), (7, 13), (16, 16), (17, 33), (45, 61), (16, 70)]:
            frame = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
            result = dispatcher.upscale(frame)
            assert result.sr.dtype == np.uint8
            np.testing.assert_array_equal(result.sr, nearest(frame, scale))
            count = len(result.plan)
            assert len(result.engines) == len(result.offsets) == len(result.statistic) == count
            assert sum(result.histogram.values()) == count
            assert set(result.seconds) == set(STAGES)
            assert all(value >= 0 for value in result.seconds.values())
    assert all(call[2:] == (16, 16) for engine in engines.values() for call in engine.calls)


def test_threshold_policy_picks_the_engine_of_each_tile_offset() -> None:
    manifest = make_manifest(LADDER, tile=16, overlap=0, scale=2, thresholds=(10.0, 40.0))
    frame = grid([flat(), ramp(12), noisy(0)], [noisy(1), flat(200), ramp(8)])
    engines = fakes(manifest)
    with Dispatcher(manifest, engines) as dispatcher:
        result = dispatcher.upscale(frame)
    g = complexity_batch(extract_tiles(frame, result.plan))
    assert g[[0, 4]].tolist() == [0.0, 0.0] and 10 < g[1] < 40 and 10 < g[5] < 40
    assert g[2] > 40 and g[3] > 40
    assert result.statistic == tuple(g.tolist())
    assert result.offsets == (-1, 0, 1, 1, -1, 0) == tuple(image_offsets(g, 10, 40).tolist())
    assert result.engines == ("lo", "mid", "hi", "hi", "lo", "mid")
    assert result.histogram == {"lo": 2, "mid": 2, "hi": 2}
    bias = result.sr.astype(int) - nearest(frame, 2)
    for tile, name in zip(result.plan.tiles, result.engines, strict=True):
        assert (bias[tile.core.slices(2)] == BIAS[name]).all()
    assert result.fab(manifest) == pytest.approx((2 * 4 + 2 * 6 + 2 * 8) / 6)
    assert not engines["ref"].is_active and engines["ref"].calls == []  # never choosable


def test_image_mode_runs_one_engine_chosen_by_the_frame_statistic() -> None:
    manifest = make_manifest(LADDER, tile=16, overlap=4, scale=2, thresholds=(10.0, 40.0))
    for frame, name in [(grid([flat(), flat(90)]), "lo"), (grid([ramp(12), flat()]), "mid"),
                        (grid([noisy(2), noisy(3)]), "hi")]:
        with Dispatcher(manifest, fakes(manifest), mode="image") as dispatcher:
            result = dispatcher.upscale(frame)
        g = complexity(frame)
        assert manifest.engine_for_offset(image_offset(g, 10, 40)).name == name
        assert result.statistic == (g,) * len(result.plan)
        assert result.engines == (name,) * len(result.plan)
        assert set(result.offsets) == {image_offset(g, 10, 40)}
        np.testing.assert_array_equal(result.sr.astype(int) - nearest(frame, 2), BIAS[name])


def test_tiles_are_grouped_per_engine_and_batched() -> None:
    manifest = make_manifest(LADDER, tile=16, overlap=0, scale=2, thresholds=(10.0, 40.0))
    tiles = [flat(), noisy(0), noisy(1), flat(50), noisy(2), flat(60), noisy(3), noisy(4),
             flat(70), noisy(5), noisy(6), noisy(7)]  # 4 flat ("lo"), 8 noisy ("hi")
    frame = grid(tiles[:6], tiles[6:])
    engines = fakes(manifest)
    with Dispatcher(manifest, engines, batch=3) as dispatcher:
        result = dispatcher.upscale(frame)
    assert result.histogram == {"lo": 4, "hi": 8}
    assert engines["lo"].calls == [(3, 3, 16, 16), (1, 3, 16, 16)]
    assert engines["hi"].calls == [(3, 3, 16, 16), (3, 3, 16, 16), (2, 3, 16, 16)]
    assert engines["mid"].calls == []
    bias = result.sr.astype(int) - nearest(frame, 2)
    for tile, name in zip(result.plan.tiles, result.engines, strict=True):
        assert (bias[tile.core.slices(2)] == BIAS[name]).all()


def test_fixed_policy_runs_one_engine_and_activates_only_it() -> None:
    manifest = make_manifest(LADDER, tile=16, overlap=4, scale=2)
    engines = fakes(manifest)
    frame = grid([flat(), noisy(0), ramp(12)])
    with Dispatcher(manifest, engines, policy="fixed:ref", batch=2) as dispatcher:
        assert [n for n, e in engines.items() if e.is_active] == ["ref"]
        result = dispatcher.upscale(frame)
    assert not engines["ref"].is_active
    assert result.engines == ("ref",) * len(result.plan)
    assert result.offsets == tuple(image_offsets(result.statistic, 10, 40).tolist())
    assert result.fab(manifest) == 32.0
    count = len(result.plan)
    assert [call[0] for call in engines["ref"].calls] == [min(2, count - i)
                                                          for i in range(0, count, 2)]
    np.testing.assert_array_equal(result.sr.astype(int) - nearest(frame, 2), BIAS["ref"])


LATENCIES = LatencyTable({"lo": 1.0, "mid": 2.0, "hi": 3.0, "ref": 4.0})


def test_budget_policy_upgrades_the_most_complex_tiles_within_budget() -> None:
    manifest = make_manifest(LADDER, tile=16, overlap=0, scale=2)
    frame = grid([flat(), noisy(0), ramp(6)], [ramp(12), flat(9), noisy(1)])
    engines = fakes(manifest)
    with Dispatcher(manifest, engines, policy="budget:9", latencies=LATENCIES) as dispatcher:
        result = dispatcher.upscale(frame)
    # six tiles: 6 ms all "lo"; 3 more ms buy "mid" for the three most complex tiles
    assert result.engines == ("lo", "mid", "lo", "mid", "lo", "mid")
    assert list(result.engines) == budget_assignment(result.statistic, LATENCIES,
                                                     ("lo", "mid", "hi", "ref"), 9.0)
    assert result.predicted_ms == 9.0 and result.budget_ms == 9.0 and not result.over_budget
    bias = result.sr.astype(int) - nearest(frame, 2)
    for tile, name in zip(result.plan.tiles, result.engines, strict=True):
        assert (bias[tile.core.slices(2)] == BIAS[name]).all()
    with Dispatcher(manifest, engines, policy="budget:5", latencies=LATENCIES) as dispatcher:
        result = dispatcher.upscale(frame)
    assert result.engines == ("lo",) * 6 and result.predicted_ms == 6.0 and result.over_budget


def test_budget_policy_in_image_mode_picks_the_best_engine_that_fits() -> None:
    manifest = make_manifest(LADDER, tile=16, overlap=0, scale=2)
    frame = grid([flat(), noisy(0)], [ramp(6), noisy(1)])  # four tiles
    for budget, name in [(4.0, "lo"), (11.9, "mid"), (12.0, "hi"), (99.0, "ref")]:
        with Dispatcher(manifest, fakes(manifest), mode="image", policy=f"budget:{budget}",
                        latencies=LATENCIES) as dispatcher:
            result = dispatcher.upscale(frame)
        assert result.engines == (name,) * 4
        assert result.predicted_ms == 4 * LATENCIES.per_tile_ms[name]


def test_hysteresis_keeps_a_jittering_tile_on_its_engine() -> None:
    manifest = make_manifest(LADDER, tile=16, overlap=0, scale=2, thresholds=(5.0, 20.0))
    g = {k: complexity(ramp(k)) for k in (8, 10, 11, 12, 14)}
    # around the upper threshold 20 (margin 10%: leave +1 at <= 18, reach +1 at > 22)
    assert g[8] < 18 < g[10] < 20 < g[11] < 22 < g[12]
    ks = [12, 10, 11, 10, 8, 11, 10, 12, 14]
    expected = {0.0: [1, 0, 1, 0, 0, 1, 0, 1, 1], 0.1: [1, 1, 1, 1, 0, 0, 0, 1, 1]}
    for margin, offsets in expected.items():
        with Dispatcher(manifest, fakes(manifest), hysteresis=margin) as dispatcher:
            seen = [dispatcher.upscale(grid([ramp(k), flat()])).offsets for k in ks]
        assert [o[0] for o in seen] == offsets and {o[1] for o in seen} == {-1}
    with Dispatcher(manifest, fakes(manifest), hysteresis=0.1) as dispatcher:
        assert dispatcher.upscale(ramp(12)).engines == ("hi",)
        assert dispatcher.upscale(ramp(10)).engines == ("hi",)  # held
        dispatcher.reset()
        assert dispatcher.upscale(ramp(10)).engines == ("mid",)  # plain thresholds again
        assert dispatcher.upscale(ramp(11)).engines == ("mid",)  # held
        assert dispatcher.upscale(grid([ramp(11), ramp(11)])).engines == ("hi", "hi")  # new size


def test_hysteresis_in_image_mode_holds_the_frame_engine() -> None:
    manifest = make_manifest(LADDER, tile=16, overlap=0, scale=2, thresholds=(5.0, 20.0))
    with Dispatcher(manifest, fakes(manifest), mode="image", hysteresis=0.1) as dispatcher:
        names = [dispatcher.upscale(grid([ramp(k)], [ramp(k)])).engines for k in (12, 10, 8)]
    assert names == [("hi", "hi"), ("hi", "hi"), ("mid", "mid")]


def test_budget_hysteresis_keeps_the_upgraded_tile_when_ranks_swap_within_the_margin() -> None:
    manifest = make_manifest(LADDER, tile=16, overlap=0, scale=2)
    frames = [grid([ramp(11), ramp(10)]), grid([ramp(10), ramp(11)]), grid([ramp(8), ramp(14)])]
    runs = {}
    for margin in (0.0, 0.15):  # g: ramp(10) 18.4, ramp(11) 20.2 (< 18.4 * 1.15), ramp(14) 25.7
        with Dispatcher(manifest, fakes(manifest), policy="budget:3", hysteresis=margin,
                        latencies=LATENCIES) as dispatcher:
            runs[margin] = [dispatcher.upscale(frame).engines for frame in frames]
    assert runs[0.0] == [("mid", "lo"), ("lo", "mid"), ("lo", "mid")]
    assert runs[0.15] == [("mid", "lo"), ("mid", "lo"), ("lo", "mid")]


def test_activation_is_scoped_and_leaves_active_engines_alone() -> None:
    manifest = make_manifest(LADDER, tile=16, overlap=0, scale=2)
    engines = fakes(manifest)
    engines["mid"].activate()
    dispatcher = Dispatcher(manifest, engines)
    with pytest.raises(EngineError, match="^engines lo, hi are not active: use the dispatcher"):
        dispatcher.upscale(flat())
    with dispatcher:
        assert {n for n, e in engines.items() if e.is_active} == {"lo", "mid", "hi"}
    assert {n for n, e in engines.items() if e.is_active} == {"mid"}


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"mode": "tiles"}, ConfigError, r"^unknown dispatch mode 'tiles'"),
    ({"stitch": "blend"}, ConfigError, r"^unknown stitch mode 'blend'"),
    ({"batch": 0}, ConfigError, r"^batch must be an integer >= 1, got 0$"),
    ({"hysteresis": 1.5}, ConfigError, r"^hysteresis must be a relative margin in \[0, 1\)"),
    ({"policy": "fixed:rf"}, ConfigError, r"unknown engine 'rf' \(did you mean 'ref'\?\)"),
    ({"policy": "budget:10"}, ConfigError, r"^policy budget:10 needs latencies"),
    ({"policy": "budget:10", "latencies": LatencyTable({"lo": 1.0})}, BundleError,
     r"no latency for engines mid, hi, ref"),
    ({"policy": "cheap"}, ConfigError, r"^unknown policy 'cheap'"),
])
def test_option_errors(kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    manifest = make_manifest(LADDER)
    with pytest.raises(error, match=message):
        Dispatcher(manifest, fakes(manifest), **kwargs)


def test_engine_errors() -> None:
    manifest = make_manifest(LADDER, tile=16, scale=2)
    engines = fakes(manifest)
    del engines["hi"], engines["ref"]
    with pytest.raises(BundleError, match=r"^policy threshold needs engines lo, mid, hi; "
                                          r"missing: hi \(given: lo, mid\)$"):
        Dispatcher(manifest, engines)
    Dispatcher(manifest, engines, policy="fixed:mid")  # only mid is needed
    with pytest.raises(BundleError, match=r"^policy budget:5 needs engines lo, mid, hi, ref; "
                                          r"missing: hi, ref \(given: lo, mid\)$"):
        Dispatcher(manifest, engines, policy="budget:5", latencies=LATENCIES)
    with pytest.raises(ConfigError, match=r"^engine 'lo' upscales x3 but the bundle is x2$"):
        Dispatcher(manifest, {**engines, "lo": FakeEngine("lo", 3)}, policy="fixed:lo")
    with pytest.raises(ConfigError, match=r"^engine 'lo' takes 32 x 32 tiles but the bundle"):
        Dispatcher(manifest, {**engines, "lo": FakeEngine("lo", 2, 32)}, policy="fixed:lo")


@pytest.mark.parametrize("frame", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.float32),
                                   np.zeros((0, 4, 3), np.uint8), np.zeros((4, 4, 4), np.uint8)])
def test_bad_frames(frame: npt.NDArray[np.generic]) -> None:
    manifest = make_manifest(LADDER)
    with Dispatcher(manifest, fakes(manifest)) as dispatcher, pytest.raises(
            MediaError, match="^frames must be H x W x 3 uint8 RGB"):
        dispatcher.upscale(frame)


def test_rounding_matches_round_to_uint8() -> None:
    values = np.concatenate([np.linspace(-0.1, 1.1, 2001), (np.arange(256) + 0.5) / 255,
                             [-np.inf, np.inf]]).astype(np.float32)
    expected = round_to_uint8(values * np.float32(255))
    np.testing.assert_array_equal(_to_uint8(values.copy()), expected)
