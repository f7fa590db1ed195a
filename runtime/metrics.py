"""PSNR and SSIM on the Y channel, with the conventions of SR papers.

Both metrics take uint8 RGB images, convert them to Y (BT.601, unrounded float), crop ``shave``
pixels from every border and compare. SSIM is MATLAB's ``ssim_index``: 11x11 Gaussian window with
sigma 1.5, K1 = 0.01, K2 = 0.03, L = 255, 'valid' filtering, mean of the SSIM map.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from runtime.imaging import rgb_to_y

__all__ = ["gaussian_window", "psnr", "psnr_y", "ssim_y"]

_PEAK = 255.0
_SSIM_C1 = (0.01 * _PEAK) ** 2
_SSIM_C2 = (0.03 * _PEAK) ** 2
_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5


def gaussian_window(
    size: int = _SSIM_WINDOW, sigma: float = _SSIM_SIGMA
) -> npt.NDArray[np.float64]:
    """Normalised 1-D Gaussian; its outer product is ``fspecial('gaussian', size, sigma)``."""
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    weights = np.exp(-(offsets**2) / (2.0 * sigma**2))
    normalised: npt.NDArray[np.float64] = weights / weights.sum()
    return normalised


def _cropped_y(
    sr: npt.NDArray[np.uint8], hr: npt.NDArray[np.uint8], shave: int, min_size: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Y channels of both images with ``shave`` pixels cropped from each border, validated."""
    for label, image in (("sr", sr), ("hr", hr)):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"{label} must be an HxWx3 uint8 image, got shape {image.shape} {image.dtype}"
            )
    if sr.shape != hr.shape:
        raise ValueError(f"size mismatch: sr is {sr.shape[:2]} but hr is {hr.shape[:2]} (HxW)")
    if shave < 0:
        raise ValueError(f"shave must be >= 0, got {shave}")
    height, width = hr.shape[0] - 2 * shave, hr.shape[1] - 2 * shave
    if min(height, width) < min_size:
        raise ValueError(
            f"image {hr.shape[:2]} is too small for shave {shave}: "
            f"{max(height, 0)}x{max(width, 0)} left, at least {min_size}x{min_size} needed"
        )
    window = (slice(shave, shave + height), slice(shave, shave + width))
    return rgb_to_y(sr[window]), rgb_to_y(hr[window])


def psnr(a: npt.ArrayLike, b: npt.ArrayLike, peak: float) -> float:
    """PSNR in dB over every value of two same-shape arrays (MSE in float64); ``inf`` when
    identical."""
    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(peak**2 / mse)


def psnr_y(sr: npt.NDArray[np.uint8], hr: npt.NDArray[np.uint8], shave: int) -> float:
    """PSNR in dB between the Y channels (peak 255); ``inf`` for identical images."""
    return psnr(*_cropped_y(sr, hr, shave, min_size=1), _PEAK)


def _correlate_rows(
    image: npt.NDArray[np.float64], window: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """'Valid' correlation of a 1-D window along axis 0."""
    rows = image.shape[0] - window.shape[0] + 1
    result = np.zeros((rows, *image.shape[1:]), dtype=np.float64)
    for offset, weight in enumerate(window):
        result += weight * image[offset : offset + rows]
    return result


def _filter_valid(
    image: npt.NDArray[np.float64], window: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """Separable 'valid' filtering with a symmetric 1-D window along both axes."""
    return _correlate_rows(_correlate_rows(image, window).T, window).T


def ssim_y(sr: npt.NDArray[np.uint8], hr: npt.NDArray[np.uint8], shave: int) -> float:
    """Mean SSIM between the Y channels (MATLAB ``ssim_index`` conventions)."""
    x, y = _cropped_y(sr, hr, shave, min_size=_SSIM_WINDOW)
    window = gaussian_window()
    mu_x = _filter_valid(x, window)
    mu_y = _filter_valid(y, window)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    sigma_xx = _filter_valid(x * x, window) - mu_xx
    sigma_yy = _filter_valid(y * y, window) - mu_yy
    sigma_xy = _filter_valid(x * y, window) - mu_xy
    numerator = (2.0 * mu_xy + _SSIM_C1) * (2.0 * sigma_xy + _SSIM_C2)
    denominator = (mu_xx + mu_yy + _SSIM_C1) * (sigma_xx + sigma_yy + _SSIM_C2)
    return float(np.mean(numerator / denominator))
