"""Tile planning, extraction and stitching: properties over all small frames, and examples."""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.errors import ConfigError
from runtime.tiling import Box, Tile, TilePlan, extract_tiles, plan_tiles, stitch

MODES = ("crop", "feather")


@st.composite
def plans(draw: st.DrawFn, max_side: int = 70) -> TilePlan:
    tile = draw(st.integers(1, 48))
    return plan_tiles(
        height=draw(st.integers(1, max_side)),
        width=draw(st.integers(1, max_side)),
        tile=tile,
        overlap=draw(st.integers(0, tile - 1)),
        scale=draw(st.sampled_from([1, 2, 3, 4])),
    )


def coverage(plan: TilePlan, box: Callable[[Tile], Box]) -> npt.NDArray[np.int64]:
    """How many tiles' boxes cover each frame pixel."""
    counts = np.zeros((plan.height, plan.width), dtype=np.int64)
    for tile in plan.tiles:
        counts[box(tile).slices()] += 1
    return counts


def upscale(images: npt.NDArray[np.generic], scale: int, axes: tuple[int, int]) -> npt.NDArray:
    """Nearest-neighbour upscale: the identity-like fake engine."""
    return np.repeat(np.repeat(images, scale, axis=axes[0]), scale, axis=axes[1])


def random_frame(plan: TilePlan, seed: int, channels: int, dtype: str) -> npt.NDArray:
    rng = np.random.default_rng(seed)
    shape = (plan.height, plan.width, channels)
    if dtype == "uint8":
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    return rng.random(shape).astype(dtype)


def check_plan(plan: TilePlan) -> None:
    size, height, width = plan.tile, plan.height, plan.width
    for starts, length in ((plan.y_starts, height), (plan.x_starts, width)):
        assert starts[0] == 0
        assert starts[-1] == max(length - size, 0)  # the last tile touches the far edge
        steps = np.diff(starts)
        assert np.all(steps[:-1] == plan.stride) and np.all((steps >= 1) & (steps <= plan.stride))
    assert [(t.row, t.col) for t in plan.tiles] == [
        (row, col) for row in range(len(plan.y_starts)) for col in range(len(plan.x_starts))
    ]
    for tile in plan.tiles:
        source, core = tile.source, tile.core
        assert (source.y0, source.x0) == (plan.y_starts[tile.row], plan.x_starts[tile.col])
        assert (source.h, source.w) == (min(size, height), min(size, width))
        assert source.y0 + source.h <= height and source.x0 + source.w <= width
        assert source.y0 <= core.y0 and core.y0 + core.h <= source.y0 + source.h
        assert source.x0 <= core.x0 and core.x0 + core.w <= source.x0 + source.w
        assert core.h >= 1 and core.w >= 1
    assert np.all(coverage(plan, lambda t: t.core) == 1)  # the cores partition the frame
    assert np.all(coverage(plan, lambda t: t.source) >= 1)
    y_cuts = sorted({t.core.y0 for t in plan.tiles})
    x_cuts = sorted({t.core.x0 for t in plan.tiles})
    for starts, cuts in ((plan.y_starts, y_cuts), (plan.x_starts, x_cuts)):
        assert cuts == [0, *((a + size + b) // 2 for a, b in pairwise(starts))]  # overlap centres


# ---------------------------------------------------------------- properties


@settings(max_examples=400, deadline=None)
@given(plans())
def test_plan_properties(plan: TilePlan) -> None:
    check_plan(plan)


@settings(max_examples=120, deadline=None)
@given(
    plans(),
    st.integers(0, 2**32 - 1),
    st.sampled_from([1, 3]),
    st.sampled_from(["float32", "float64", "uint8"]),
)
def test_identity_engine_reconstructs_exactly(
    plan: TilePlan, seed: int, channels: int, dtype: str
) -> None:
    frame = random_frame(plan, seed, channels, dtype)
    tiles = extract_tiles(frame, plan)
    assert tiles.shape == (len(plan), plan.tile, plan.tile, channels)
    assert tiles.dtype == frame.dtype
    padding = ((0, max(plan.tile - plan.height, 0)), (0, max(plan.tile - plan.width, 0)), (0, 0))
    padded = np.pad(frame, padding, mode="edge")
    for index, tile in enumerate(plan.tiles):
        box = Box(tile.source.y0, tile.source.x0, plan.tile, plan.tile)
        np.testing.assert_array_equal(tiles[index], padded[box.slices()])
    expected = upscale(frame, plan.scale, (0, 1))
    for mode in MODES:
        result = stitch(upscale(tiles, plan.scale, (1, 2)), plan, mode=mode)
        assert result.dtype == frame.dtype
        np.testing.assert_array_equal(result, expected)


@settings(max_examples=60, deadline=None)
@given(plans(max_side=40), st.integers(0, 2**32 - 1))
def test_feather_is_a_normalised_blend(plan: TilePlan, seed: int) -> None:
    size = plan.tile * plan.scale
    rng = np.random.default_rng(seed)
    constant = np.full((len(plan), size, size, 2), rng.random(), dtype=np.float32)
    assert np.all(stitch(constant, plan, mode="feather") == constant.flat[0])
    noisy = rng.random((len(plan), size, size, 2))
    blended = stitch(noisy, plan, mode="feather")
    assert blended.shape == (*plan.output_shape, 2)
    assert blended.min() >= noisy.min() and blended.max() <= noisy.max()  # convex weights


def test_every_axis_layout_up_to_70() -> None:
    """Exhaustive along one axis (planning is separable): lengths 1..70, tiles 1..48, overlaps."""
    for length in range(1, 71):
        for size in range(1, 49):
            for overlap in range(size):
                plan = plan_tiles(length, 1, size, overlap, 1)
                assert plan.y_starts[-1] == max(length - size, 0)
                end = (
                    0  # the cores are contiguous, non-empty, inside their tiles, and end at length
                )
                for tile in plan.tiles:
                    core, source = tile.core, tile.source
                    assert core.y0 == end and core.h >= 1
                    assert source.y0 <= core.y0 and core.y0 + core.h <= source.y0 + source.h
                    end = core.y0 + core.h
                assert end == length


def naive_feather(outputs: npt.NDArray[np.float64], plan: TilePlan) -> npt.NDArray[np.float64]:
    """sum(w * tile) / sum(w) with the documented ramps, on absolute output coordinates."""
    s, size = plan.scale, plan.tile
    centres = [np.arange(n * s) + 0.5 for n in (plan.height, plan.width)]

    def ramp(starts: tuple[int, ...], index: int, centre: npt.NDArray[np.float64]) -> npt.NDArray:
        begin, end = starts[index] * s, (starts[index] + size) * s
        weight = np.where((centre > begin) & (centre < end), 1.0, 0.0)
        previous_end = (starts[index - 1] + size) * s if index > 0 else begin
        if previous_end > begin:  # rise across the overlap with the previous tile
            weight = np.minimum(weight, (centre - begin) / (previous_end - begin))
        next_begin = starts[index + 1] * s if index + 1 < len(starts) else end
        if next_begin < end:  # fall across the overlap with the next tile
            weight = np.minimum(weight, (end - centre) / (end - next_begin))
        return np.maximum(weight, 0.0)

    numerator = np.zeros((*plan.output_shape, outputs.shape[3]))
    denominator = np.zeros(plan.output_shape)
    for index, tile in enumerate(plan.tiles):
        weight = np.outer(
            ramp(plan.y_starts, tile.row, centres[0]), ramp(plan.x_starts, tile.col, centres[1])
        )
        region = tile.source.slices(s)
        values = outputs[index, : tile.source.h * s, : tile.source.w * s]
        numerator[region] += weight[region][:, :, np.newaxis] * values
        denominator += weight
    return numerator / denominator[:, :, np.newaxis]


@settings(max_examples=60, deadline=None)
@given(plans(max_side=40), st.integers(0, 2**32 - 1))
def test_feather_matches_naive_weighted_mean(plan: TilePlan, seed: int) -> None:
    size = plan.tile * plan.scale
    outputs = np.random.default_rng(seed).random((len(plan), size, size, 2))
    result = stitch(outputs, plan, mode="feather")
    np.testing.assert_allclose(result, naive_feather(outputs, plan), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("height", "width"), [(720, 1280), (1080, 1920), (2160, 3840)])
@pytest.mark.parametrize(("tile", "overlap"), [(48, 8), (64, 0), (96, 6), (128, 17)])
def test_plan_only_for_video_frames(height: int, width: int, tile: int, overlap: int) -> None:
    check_plan(plan_tiles(height, width, tile, overlap, scale=4))


# ---------------------------------------------------------------- examples


def test_100x100_tile_48_overlap_8() -> None:
    plan = plan_tiles(100, 100, 48, 8, 2)
    # stride 40: 0, 40; 80 would run past 100 - 48 = 52, so the last tile snaps to 52.
    assert plan.y_starts == plan.x_starts == (0, 40, 52)
    assert len(plan) == 9
    assert [t.source.y0 for t in plan.tiles] == [0, 0, 0, 40, 40, 40, 52, 52, 52]
    # Cuts at the overlap centres: (0 + 48 + 40) // 2 = 44 and (40 + 48 + 52) // 2 = 70.
    assert [(t.core.y0, t.core.h) for t in plan.tiles if t.col == 0] == [
        (0, 44),
        (44, 26),
        (70, 30),
    ]
    assert plan.tiles[4] == Tile(1, 1, source=Box(40, 40, 48, 48), core=Box(44, 44, 26, 26))
    assert plan.tiles[4].core_in_tile == Box(4, 4, 26, 26)
    assert plan.output_shape == (200, 200)


def test_cadyq_patch_inference_layout() -> None:
    # CADyQ: tiles 96 with step 90 (overlap 6), each boundary cut 3 pixels into the overlap.
    plan = plan_tiles(276, 366, 96, 6, 4)
    assert plan.y_starts == (0, 90, 180)
    assert plan.x_starts == (0, 90, 180, 270)
    assert sorted({t.core.x0 for t in plan.tiles}) == [0, 93, 183, 273]


def test_frame_smaller_than_tile_is_edge_padded() -> None:
    frame = np.arange(5 * 100 * 1, dtype=np.float32).reshape(5, 100, 1)
    plan = plan_tiles(5, 100, 8, 2, 1)
    assert plan.y_starts == (0,)
    assert all(t.source.h == 5 and t.core == Box(0, t.core.x0, 5, t.core.w) for t in plan.tiles)
    tiles = extract_tiles(frame, plan)
    assert tiles.shape == (len(plan), 8, 8, 1)
    np.testing.assert_array_equal(tiles[:, 5:], np.repeat(tiles[:, 4:5], 3, axis=1))
    single = plan_tiles(3, 2, 4, 1, 2)
    assert single.tiles == (Tile(0, 0, source=Box(0, 0, 3, 2), core=Box(0, 0, 3, 2)),)


def test_feather_ramp_across_one_overlap() -> None:
    plan = plan_tiles(1, 88, 48, 8, 1)  # two tiles: 0 and 40, overlapping on columns 40..47
    outputs = np.stack([np.zeros((48, 48, 1)), np.ones((48, 48, 1))])
    row = stitch(outputs, plan, mode="feather")[0, :, 0]
    np.testing.assert_allclose(row[40:48], (np.arange(8) + 0.5) / 8, rtol=1e-15)
    assert np.all(row[:40] == 0.0) and np.all(row[48:] == 1.0)
    assert np.all(stitch(outputs, plan, mode="crop")[0, :, 0] == (np.arange(88) >= 44))


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "arguments",
    [
        (0, 10, 4, 0, 1),
        (10, 0, 4, 0, 1),
        (10, 10, 0, 0, 1),
        (10, 10, 4, 4, 1),
        (10, 10, 4, -1, 1),
        (10, 10, 4, 0, 0),
        (10, 10, 4, 0, 1.5),
        (10, 10, 4.0, 0, 1),
        (10, 10, True, 0, 1),
    ],
)
def test_bad_plan_parameters(arguments: tuple[object, ...]) -> None:
    with pytest.raises(ConfigError, match="must be an integer"):
        plan_tiles(*arguments)  # type: ignore[arg-type]


def test_bad_shapes_and_mode() -> None:
    plan = plan_tiles(10, 12, 4, 1, 2)
    with pytest.raises(ConfigError, match="frame must have shape 10 x 12 x C"):
        extract_tiles(np.zeros((12, 10, 3)), plan)
    with pytest.raises(ConfigError, match="frame must have shape"):
        extract_tiles(np.zeros((10, 12)), plan)
    outputs = np.zeros((len(plan), 8, 8, 3))
    with pytest.raises(ConfigError, match="tile outputs must have shape"):
        stitch(outputs[:, :4], plan)
    with pytest.raises(ConfigError, match="unknown stitch mode 'feathr'.*did you mean 'feather'"):
        stitch(outputs, plan, mode="feathr")  # type: ignore[arg-type]
