"""The numpy bit-mapping statistic: hand-checked values and agreement with a PyTorch twin."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import numpy.typing as npt
import pytest
import torch
import torch.nn.functional as functional

from runtime.errors import ConfigError
from runtime.statistic import (
    SOBEL_X,
    SOBEL_Y,
    complexity,
    complexity_batch,
    image_offset,
    image_offsets,
)

Float = npt.NDArray[np.float64]
N_TILES = 10_240
BATCH = 256
SEED = 20240601


# ---------------------------------------------------------------- the PyTorch twin (test-only)


def _torch_gray_padded(patches: Float) -> torch.Tensor:
    rgb = torch.from_numpy(patches).permute(0, 3, 1, 2)  # N x 3 x H x W, float64
    gray = 0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]
    return functional.pad(gray, (1, 1, 1, 1), mode="replicate")


def torch_complexity_dense(patches: Float) -> Float:
    """g with one 3x3 conv2d per direction (the textbook formula)."""
    kernel_x = torch.tensor([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=torch.float64) / 8
    weight = torch.stack([kernel_x, kernel_x.T]).unsqueeze(1)  # 2 x 1 x 3 x 3
    response = functional.conv2d(_torch_gray_padded(patches), weight)  # N x 2 x H x W
    return (1000.0 * response.abs().mean(dim=(1, 2, 3))).numpy()


def torch_complexity_separable(patches: Float) -> Float:
    """g with the separable Sobel: a central difference, then a [1, 2, 1] / 8 smoothing.

    The formulation recommended for the compiler's twin: like the numpy statistic it gives
    exactly 0 on flat regions, where the dense 3x3 conv2d leaves ~1e-14.
    """
    padded = _torch_gray_padded(patches)[:, 0]  # N x (H+2) x (W+2)
    means = []
    for image in (padded, padded.transpose(1, 2)):  # Sobel_y is Sobel_x on the transpose
        diff = image[:, :, 2:] - image[:, :, :-2]
        response = (diff[:, :-2] + 2 * diff[:, 1:-1] + diff[:, 2:]) / 8
        means.append(response.abs().mean(dim=(1, 2)))
    return (1000.0 * (means[0] + means[1]) / 2).numpy()


# ---------------------------------------------------------------- random tiles


def _random_batch(rng: np.random.Generator, n: int, height: int, width: int) -> Float:
    """n tiles of one size: a mix of flat, noisy, striped and step-edge content in [0, 1]."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    n_flat, n_noisy, n_stripes, n_steps = rng.multinomial(n, [0.25] * 4)

    def base(count: int) -> tuple[Float, Float]:  # per-tile colour and contrast
        contrast = rng.choice([0.01, 0.1, 0.5, 1.0], size=(count, 1, 1, 1))
        return rng.random((count, 1, 1, 3)), contrast

    def along(count: int) -> Float:  # distance along a random direction, per tile
        angle = rng.uniform(0.0, np.pi, size=(count, 1, 1, 1))
        return np.cos(angle) * xx[..., None] + np.sin(angle) * yy[..., None]

    colour, _ = base(n_flat)
    parts = [np.broadcast_to(colour, (n_flat, height, width, 3))]
    colour, contrast = base(n_noisy)
    parts.append(colour + contrast * (rng.random((n_noisy, height, width, 3)) - 0.5))
    colour, contrast = base(n_stripes)
    frequency = rng.uniform(0.05, 3.0, size=(n_stripes, 1, 1, 1))
    parts.append(colour + contrast * np.sin(frequency * along(n_stripes)))
    colour, contrast = base(n_steps)
    position = rng.uniform(0.0, max(height, width), size=(n_steps, 1, 1, 1))
    parts.append(colour + contrast * (along(n_steps) > position))
    return np.clip(np.concatenate(parts), 0.0, 1.0)


def _random_tiles(seed: int) -> Iterator[Float]:
    rng = np.random.default_rng(seed)
    for _ in range(N_TILES // BATCH):
        height, width = (int(v) for v in rng.integers(8, 65, size=2))
        tiles = _random_batch(rng, BATCH, height, width)
        if rng.random() < 0.25:  # some batches as 8-bit content
            tiles = np.round(tiles * 255.0) / 255.0
        yield tiles


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiles_and_values() -> list[tuple[Float, Float]]:
    return [(tiles, complexity_batch(tiles)) for tiles in _random_tiles(SEED)]


# ---------------------------------------------------------------- twin agreement


@pytest.mark.parametrize(
    ("twin", "absolute"),
    [(torch_complexity_separable, 0.0), (torch_complexity_dense, 1e-12)],
    ids=["separable", "dense"],
)
def test_numpy_matches_torch_twin(
    tiles_and_values: list[tuple[Float, Float]],
    twin: Callable[[Float], Float],
    absolute: float,
) -> None:
    ours = np.concatenate([values for _, values in tiles_and_values])
    theirs = np.concatenate([twin(tiles) for tiles, _ in tiles_and_values])
    assert ours.size >= 10_000
    assert (ours == 0.0).sum() > 1000 and ours.max() > 100.0  # flat and busy tiles both present
    # The dense conv2d leaves ~1e-14 on flat tiles where numpy gives exactly 0: hence `absolute`.
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=absolute)

    # Thresholds at random quantiles (as calibration would pick them). A threshold exactly equal
    # to a tile's value could flip on a last-bit difference, so none is taken at a data point
    # except 0 for the separable twin, whose flat tiles are exactly 0 too. Thresholds within
    # `absolute` of 0 cannot separate the dense twin's ~1e-14 from 0, so they are left out.
    rng = np.random.default_rng(SEED + 1)
    levels = np.quantile(ours, np.sort(rng.uniform(0.0, 1.0, size=40)))
    levels = levels[levels > 1e3 * absolute] if absolute > 0.0 else np.append(0.0, levels)
    for i, lower in enumerate(levels):
        for upper in levels[i:]:
            expected = image_offsets(theirs, lower, upper)
            np.testing.assert_array_equal(image_offsets(ours, lower, upper), expected)


# ---------------------------------------------------------------- hand-checked values


def test_flat_patch_is_exactly_zero() -> None:
    rng = np.random.default_rng(1)
    for colour in rng.random((50, 3)):
        assert complexity(np.broadcast_to(colour, (13, 9, 3)).copy()) == 0.0
    assert complexity(np.full((8, 8, 3), 200, dtype=np.uint8)) == 0.0


@pytest.mark.parametrize("edge_column", [1, 4, 7])
def test_vertical_step_edge_by_hand(edge_column: int) -> None:
    # H=8, W=8, columns < edge_column black, the rest white (luma 1). Sobel_x is a central
    # difference along x smoothed by [1, 2, 1]/8 along y; on constant columns the smoothing sums to
    # 4/8, so |Sobel_x| = 0.5 * (1 - 0) in the two columns either side of the edge (edge_column-1
    # and edge_column; replicate padding keeps the outer columns at 0) and 0 elsewhere: 8 rows * 2
    # columns * 0.5 = 8. Sobel_y is 0 everywhere. g = 1000 * 8 / (2 * 8 * 8) = 62.5 (= 500 / W).
    patch = np.zeros((8, 8, 3))
    patch[:, edge_column:] = 1.0
    # 0.299 + 0.587 + 0.114 is 1 up to one float64 ulp, hence the tolerance.
    assert complexity(patch) == pytest.approx(62.5, rel=1e-12)
    assert complexity(patch.transpose(1, 0, 2)) == pytest.approx(62.5, rel=1e-12)  # horizontal
    as_uint8 = (patch * 255).astype(np.uint8)
    assert complexity(as_uint8) == complexity(patch)


def test_sobel_kernels_are_the_documented_ones() -> None:
    expected_x = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]) / 8
    np.testing.assert_array_equal(SOBEL_X, expected_x)
    np.testing.assert_array_equal(SOBEL_Y, expected_x.T)


def test_symmetries_and_contrast_linearity() -> None:
    rng = np.random.default_rng(2)
    patches = rng.random((20, 17, 23, 3)) * 0.5
    g = complexity_batch(patches)
    for view in (patches[:, ::-1], patches[:, :, ::-1], patches.transpose(0, 2, 1, 3)):
        np.testing.assert_allclose(complexity_batch(view), g, rtol=1e-12)
    np.testing.assert_allclose(complexity_batch(2 * patches), 2 * g, rtol=1e-12)
    np.testing.assert_allclose(complexity_batch(patches + 0.25), g, rtol=1e-9)
    assert [complexity(p) for p in patches] == pytest.approx(list(g), rel=1e-15)


def test_uint8_is_divided_by_255() -> None:
    rng = np.random.default_rng(3)
    patches = rng.integers(0, 256, size=(5, 12, 10, 3), dtype=np.uint8)
    np.testing.assert_allclose(complexity_batch(patches), complexity_batch(patches / 255.0))


# ---------------------------------------------------------------- offsets and validation


def test_image_offset() -> None:
    values = [9.9, 10.0, 15.0, 20.0, 20.1]  # thresholds 10 and 20 are inclusive of offset 0
    assert [image_offset(g, 10.0, 20.0) for g in values] == [-1, 0, 0, 0, 1]
    offsets = image_offsets(np.array(values), 10.0, 20.0)
    assert offsets.dtype == np.int8
    assert offsets.tolist() == [-1, 0, 0, 0, 1]
    assert image_offset(5.0, 5.0, 5.0) == 0


@pytest.mark.parametrize(
    "call",
    [
        lambda: image_offset(1.0, 2.0, 1.0),
        lambda: image_offsets([1.0], float("nan"), 1.0),
        lambda: complexity(np.zeros((8, 8))),
        lambda: complexity(np.zeros((8, 8, 4))),
        lambda: complexity(np.zeros((0, 8, 3))),
        lambda: complexity(np.zeros((8, 8, 3), dtype=np.int32)),
        lambda: complexity_batch(np.zeros((8, 8, 3))),
    ],
)
def test_bad_input_raises_config_error(call: Callable[[], object]) -> None:
    with pytest.raises(ConfigError):
        call()
