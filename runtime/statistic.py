"""The AdaBM bit-mapping statistic: the gradient complexity of a low-resolution patch.

Conventions (the compiler's PyTorch twin computes the same formula; both must agree):

* RGB is scaled to [0, 1]: float input is taken as is, ``uint8`` input is divided by 255.
* gray is ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` (full range, no offset).
* Sobel kernels are normalised by 1/8: ``SOBEL_X = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]] / 8`` and
  ``SOBEL_Y = SOBEL_X.T``, applied as a cross-correlation (no kernel flip) on the gray image with
  replicate (edge) padding of one pixel, so each response has the size of the patch.
* ``g = 1000 * mean(|Sobel_x(gray)| + |Sobel_y(gray)|) / 2``: the mean absolute response over
  both directions and all pixels (2*H*W values), times 1000. A flat patch gives exactly 0; the
  largest possible value is 500 (a response is at most 4/8 in magnitude).

Everything is computed in float64. The image-level offset to the layer bit widths is -1 below the
lower threshold, +1 above the upper one and 0 in between (both comparisons strict).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from runtime.errors import ConfigError

__all__ = [
    "LUMA_WEIGHTS",
    "SOBEL_X",
    "SOBEL_Y",
    "complexity",
    "complexity_and_luma",
    "complexity_batch",
    "image_offset",
    "image_offsets",
]

Patches = npt.NDArray[np.uint8] | npt.NDArray[np.floating[Any]]


def _read_only(values: npt.ArrayLike) -> npt.NDArray[np.float64]:
    array = np.array(values, dtype=np.float64)
    array.setflags(write=False)
    return array


LUMA_WEIGHTS = _read_only([0.299, 0.587, 0.114])
SOBEL_X = _read_only(np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]) / 8.0)
SOBEL_Y = _read_only(SOBEL_X.T)

_SCALE = 1000.0
_UINT8_MAX = 255.0


def _gray(patches: Patches) -> npt.NDArray[np.float64]:
    """N x H x W BT.601 luma in [0, 1] of N x H x W x 3 RGB patches (uint8 or float)."""
    if patches.ndim != 4 or patches.shape[3] != 3 or patches.shape[1] < 1 or patches.shape[2] < 1:
        raise ConfigError(
            f"patches must have shape N x H x W x 3 with H, W >= 1, got {patches.shape}"
        )
    if patches.dtype == np.uint8:
        rgb = patches.astype(np.float64) / _UINT8_MAX
    elif np.issubdtype(patches.dtype, np.floating):
        rgb = patches.astype(np.float64, copy=False)
    else:
        raise ConfigError(f"patch dtype {patches.dtype} is not allowed; allowed: uint8, float")
    # Elementwise, not a matmul: BLAS may round pixels differently, and a flat patch must stay flat.
    red, green, blue = LUMA_WEIGHTS
    gray: npt.NDArray[np.float64] = red * rgb[..., 0] + green * rgb[..., 1] + blue * rgb[..., 2]
    return gray


def _sobel_x(padded: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """``SOBEL_X`` cross-correlation over the last two axes of an edge-padded image (valid part).

    Computed separably, a central difference along x then a [1, 2, 1] / 8 smoothing along y, so
    the response of a flat region is exactly 0 whatever the float rounding.
    """
    diff = padded[..., :, 2:] - padded[..., :, :-2]
    result: npt.NDArray[np.float64] = (
        diff[..., :-2, :] + 2.0 * diff[..., 1:-1, :] + diff[..., 2:, :]
    ) / 8.0
    return result


def complexity_and_luma(patches: Patches) -> tuple[npt.NDArray[np.float64],
                                                   npt.NDArray[np.float64]]:
    """``g`` of each of N equal-size RGB patches and their N x H x W luma in [0, 1] (float64)."""
    gray = _gray(patches)
    padded = np.pad(gray, ((0, 0), (1, 1), (1, 1)), mode="edge")
    # SOBEL_Y on the image is SOBEL_X on its transpose (the response comes out transposed).
    mean_x = np.abs(_sobel_x(padded)).mean(axis=(1, 2))
    mean_y = np.abs(_sobel_x(padded.swapaxes(1, 2))).mean(axis=(1, 2))
    result: npt.NDArray[np.float64] = _SCALE * (mean_x + mean_y) / 2.0
    return result, gray


def complexity_batch(patches: Patches) -> npt.NDArray[np.float64]:
    """Complexity ``g`` of each of N equal-size RGB patches (N x H x W x 3): float64, shape N."""
    return complexity_and_luma(patches)[0]


def complexity(patch: Patches) -> float:
    """Complexity ``g`` of one H x W x 3 RGB patch (float in [0, 1] or uint8)."""
    if patch.ndim != 3:
        raise ConfigError(f"patch must have shape H x W x 3, got {patch.shape}")
    return float(complexity_batch(patch[np.newaxis])[0])


def _check_thresholds(lower: float, upper: float) -> None:
    if not lower <= upper:
        raise ConfigError(
            f"thresholds must satisfy lower <= upper, got lower={lower}, upper={upper}"
        )


def image_offset(g: float, lower: float, upper: float) -> int:
    """Bit-width offset of one image: -1 if ``g < lower``, +1 if ``g > upper``, else 0."""
    _check_thresholds(lower, upper)
    return -1 if g < lower else 1 if g > upper else 0


def image_offsets(g: npt.ArrayLike, lower: float, upper: float) -> npt.NDArray[np.int8]:
    """Vectorised :func:`image_offset`: an int8 array of -1, 0, +1 with the shape of ``g``."""
    _check_thresholds(lower, upper)
    values = np.asarray(g, dtype=np.float64)
    above = (values > upper).astype(np.int8)
    below = (values < lower).astype(np.int8)
    offsets: npt.NDArray[np.int8] = above - below
    return offsets
