"""MATLAB-compatible bicubic imresize: reproduces the published Set5 LR images, and is fast."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from runtime.imaging import load_rgb, mod_crop
from runtime.resize import imresize_bicubic, output_length, resize_matrix

SET5 = ("baby", "bird", "butterfly", "head", "woman")


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_reproduces_set5_lr_bicubic(shared_file: Callable[[str], Path], scale: int) -> None:
    """The EDSR-distributed LR_bicubic/X{s} images were made by MATLAB imresize on uint8 HR."""
    root = shared_file("benchmarks/Set5")
    worst, identical, total = 0, 0, 0
    for name in SET5:
        hr = mod_crop(load_rgb(root / "HR" / f"{name}.png"), scale)
        expected = load_rgb(root / "LR_bicubic" / f"X{scale}" / f"{name}x{scale}.png")
        ours = imresize_bicubic(hr, 1.0 / scale)
        assert ours.dtype == np.uint8
        assert ours.shape == expected.shape
        diff = np.abs(ours.astype(np.int16) - expected.astype(np.int16))
        worst = max(worst, int(diff.max()))
        identical += int(np.count_nonzero(diff == 0))
        total += diff.size
    share = identical / total
    print(f"x{scale}: max |diff| {worst}, identical {100 * share:.4f}% of {total} samples")
    assert worst <= 1
    assert share >= 0.99


@pytest.mark.parametrize(("length", "scale", "expected"), [
    (255, 1 / 3, 85), (256, 1 / 3, 86), (228, 0.25, 57), (343, 0.5, 172), (57, 4.0, 228),
])
def test_output_length_is_matlab_ceil(length: int, scale: float, expected: int) -> None:
    assert output_length(length, scale) == expected


@pytest.mark.parametrize("scale", [0.25, 1 / 3, 0.5, 2.0, 3.0])
def test_weights_are_a_partition_of_unity(scale: float) -> None:
    matrix = resize_matrix(40, output_length(40, scale), scale)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, rtol=0, atol=1e-12)


def test_constant_image_stays_constant() -> None:
    image = np.full((30, 22, 3), 77, dtype=np.uint8)
    for scale in (0.25, 1 / 3, 2.0):
        assert np.all(imresize_bicubic(image, scale) == 77)


def test_float_upscale_reproduces_a_linear_ramp_away_from_the_border() -> None:
    """Keys' cubic reproduces linear functions exactly; the mirror reaches 3 border pixels."""
    ramp = np.tile(np.arange(16, dtype=np.float64), (16, 1))  # value = column index
    up = imresize_bicubic(ramp, 2.0)
    assert up.dtype == np.float64 and up.shape == (32, 32)
    # MATLAB mapping: output column x (1-based) samples input u = x / 2 + 0.25 (1-based).
    expected = np.arange(1, 33) / 2.0 + 0.25 - 1.0
    np.testing.assert_allclose(up[:, 3:-3], np.tile(expected[3:-3], (32, 1)), atol=1e-12)
    assert abs(up[0, 2] - expected[2]) > 0.01  # column 3 mixes in the mirrored column 0


def test_dtypes_channels_and_explicit_output_shape() -> None:
    rng = np.random.default_rng(1)
    gray = rng.random((21, 17)).astype(np.float32)
    assert imresize_bicubic(gray, 0.5).dtype == np.float32
    assert imresize_bicubic(gray, 0.5).shape == (11, 9)
    image = rng.integers(0, 256, (21, 17, 3), dtype=np.uint8)
    assert imresize_bicubic(image, 1.0, output_shape=(7, 5)).shape == (7, 5, 3)


def test_other_dtypes_are_rejected() -> None:
    with pytest.raises(ValueError, match="uint8 or float"):
        imresize_bicubic(np.zeros((4, 4), dtype=np.int16), 0.5)  # type: ignore[type-var]


@pytest.mark.parametrize("scale", [0.0, -2.0, float("nan"), float("inf")])
def test_bad_scale_is_rejected(scale: float) -> None:
    with pytest.raises(ValueError, match="scale"):
        imresize_bicubic(np.zeros((4, 4, 3), dtype=np.uint8), scale)


def test_resize_matrices_are_built_once_per_shape() -> None:
    """The weight matrices are cached per (length, scale): a second resize of the same shape
    builds none (this is what keeps downscaling a matrix product, not a per-pixel loop)."""
    image = np.random.default_rng(2).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    resize_matrix.cache_clear()
    first = imresize_bicubic(image, 0.25)
    built = resize_matrix.cache_info().misses
    second = imresize_bicubic(image, 0.25)
    assert built == 1  # a square image: one matrix serves both axes
    assert resize_matrix.cache_info().misses == built
    assert first.shape == (128, 128, 3) and np.array_equal(first, second)
