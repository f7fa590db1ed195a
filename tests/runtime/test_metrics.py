"""Y-channel PSNR and SSIM: known values, scikit-image agreement, clear errors."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest

from runtime.imaging import rgb_to_y
from runtime.metrics import gaussian_window, psnr_y, ssim_y
from tests.conftest import require_module

# A uniform +10 on R, G and B moves Y by 10 * (65.738 + 129.057 + 25.064) / 256 = 8.5882421875.
Y_STEP = 8.5882421875


def _random_pair(
    shape: tuple[int, int], seed: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    rng = np.random.default_rng(seed)
    hr = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    noise = rng.integers(-40, 41, hr.shape)
    return np.clip(hr.astype(np.int64) + noise, 0, 255).astype(np.uint8), hr


def test_y_of_black_and_white_is_studio_range() -> None:
    pixels = np.array([[[0, 0, 0], [255, 255, 255]]], dtype=np.uint8)
    np.testing.assert_allclose(rgb_to_y(pixels), [[16.0, 16.0 + 255 * 219.859 / 256]])


def test_identical_images() -> None:
    _, hr = _random_pair((32, 40), seed=0)
    assert psnr_y(hr, hr.copy(), shave=2) == math.inf
    assert ssim_y(hr, hr.copy(), shave=2) == pytest.approx(1.0, abs=1e-12)


def test_psnr_by_hand() -> None:
    hr = np.full((2, 2, 3), 100, dtype=np.uint8)
    sr = hr.copy()
    sr[0, 0] = 110  # one pixel of four: MSE = Y_STEP ** 2 / 4
    assert abs(Y_STEP - 10 * (65.738 + 129.057 + 25.064) / 256) < 1e-12
    assert psnr_y(sr, hr, shave=0) == pytest.approx(35.473317862, abs=1e-8)
    assert psnr_y(np.full_like(hr, 110), hr, shave=0) == pytest.approx(29.452717949, abs=1e-8)


def test_shave_crops_every_border() -> None:
    hr = np.full((8, 8, 3), 100, dtype=np.uint8)
    sr = hr.copy()
    sr[0, :] = sr[-1, :] = sr[:, 0] = sr[:, -1] = 0  # damage only the 1-pixel frame
    assert psnr_y(sr, hr, shave=1) == math.inf
    assert psnr_y(sr, hr, shave=0) < 20.0


def test_gaussian_window_is_fspecial() -> None:
    window = gaussian_window()
    assert window.shape == (11,) and window.sum() == pytest.approx(1.0, abs=1e-15)
    # fspecial('gaussian', 11, 1.5) centre value, = window[5] ** 2.
    assert window[5] ** 2 == pytest.approx(0.0707622, abs=1e-7)


@pytest.mark.parametrize(("shape", "shave", "seed"), [
    ((48, 64), 0, 1), ((48, 64), 4, 2), ((33, 27), 2, 3), ((64, 64), 3, 4),
])
def test_ssim_matches_scikit_image(shape: tuple[int, int], shave: int, seed: int) -> None:
    """skimage filters the whole image then drops a 5-pixel frame: the same as 'valid' filtering."""
    metrics = require_module("skimage.metrics")
    sr, hr = _random_pair(shape, seed)
    crop = (slice(shave, shape[0] - shave), slice(shave, shape[1] - shave))
    reference = metrics.structural_similarity(
        rgb_to_y(sr[crop]), rgb_to_y(hr[crop]),
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255,
    )
    assert ssim_y(sr, hr, shave) == pytest.approx(reference, abs=1e-6)


def test_size_mismatch_is_a_clear_error() -> None:
    sr, hr = _random_pair((20, 20), seed=5)
    with pytest.raises(ValueError, match=r"size mismatch: sr is \(20, 19\) but hr is \(20, 20\)"):
        psnr_y(sr[:, :19], hr, shave=2)
    with pytest.raises(ValueError, match="size mismatch"):
        ssim_y(sr, hr[:19], shave=2)


def test_wrong_dtype_and_too_small_are_rejected() -> None:
    sr, hr = _random_pair((20, 20), seed=6)
    with pytest.raises(ValueError, match="uint8"):
        psnr_y(sr.astype(np.float32) / 255, hr, shave=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="too small for shave 5"):
        ssim_y(sr, hr, shave=5)  # 10x10 left, the 11x11 window needs more
    with pytest.raises(ValueError, match="too small"):
        psnr_y(sr, hr, shave=10)
