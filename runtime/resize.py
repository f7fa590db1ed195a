"""MATLAB-compatible bicubic ``imresize``, the degradation and the baseline of SR benchmarks.

Reproduces ``imresize(img, scale, 'bicubic')``: Keys cubic with a = -0.5, widened by 1/scale when
shrinking (antialiasing), MATLAB's coordinate mapping ``u = x / scale + 0.5 * (1 - 1 / scale)``
and symmetric (mirror) padding. Each axis is resized by one dense weight matrix, so an image is
two matrix products. Axes are processed in MATLAB's order (the most-shrunk axis first) and, for
uint8 input, the result of each pass is rounded and saturated to uint8 as MATLAB's resize kernel
does for uint8 images.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from runtime.imaging import round_to_uint8

__all__ = ["imresize_bicubic", "output_length", "resize_matrix"]

_Image = TypeVar("_Image", np.uint8, np.float32, np.float64)
_KERNEL_WIDTH = 4.0  # support of the cubic kernel, in input pixels, before antialiasing
_SIZE_TOLERANCE = 1e-9  # 255 * (1 / 3) must give 85, not 86, whatever the float rounding


def _cubic(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's ``cubic``)."""
    ax = np.abs(x)
    ax2 = ax * ax
    ax3 = ax2 * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1.0)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1.0) & (ax <= 2.0))
    result: npt.NDArray[np.float64] = near + far
    return result


def output_length(in_length: int, scale: float) -> int:
    """MATLAB's output size ``ceil(scale * in_length)``, robust to 1/3-style float error."""
    exact = in_length * scale
    nearest = round(exact)
    length = nearest if abs(exact - nearest) < _SIZE_TOLERANCE else math.ceil(exact)
    return max(int(length), 1)


@lru_cache(maxsize=64)
def resize_matrix(in_length: int, out_length: int, scale: float) -> npt.NDArray[np.float64]:
    """The (out_length, in_length) matrix that resizes one axis (MATLAB ``contributions``)."""
    kernel_scale = min(scale, 1.0)  # antialiasing: widen the kernel when shrinking
    width = _KERNEL_WIDTH / kernel_scale
    x = np.arange(1, out_length + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)  # 1-based input coordinate of each output pixel
    left = np.floor(u - width / 2.0)
    taps = int(math.ceil(width)) + 2
    indices = left[:, np.newaxis] + np.arange(taps, dtype=np.float64)[np.newaxis, :]
    weights = kernel_scale * _cubic(kernel_scale * (u[:, np.newaxis] - indices))
    weights /= weights.sum(axis=1, keepdims=True)
    # Symmetric padding: index sequence 1..n, n..1 repeated, converted to 0-based.
    period = np.mod(indices.astype(np.int64) - 1, 2 * in_length)
    source = np.where(period < in_length, period, 2 * in_length - 1 - period)
    matrix = np.zeros((out_length, in_length), dtype=np.float64)
    rows = np.broadcast_to(np.arange(out_length)[:, np.newaxis], source.shape)
    np.add.at(matrix, (rows, source), weights)
    matrix.setflags(write=False)
    return matrix


def _resize_axis(
    image: npt.NDArray[np.float64], axis: int, matrix: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    moved = np.moveaxis(image, axis, 0)
    flat = moved.reshape(moved.shape[0], -1)
    resized = (matrix @ flat).reshape((matrix.shape[0], *moved.shape[1:]))
    return np.moveaxis(resized, 0, axis)


def imresize_bicubic(
    image: npt.NDArray[_Image],
    scale: float,
    output_shape: tuple[int, int] | None = None,
) -> npt.NDArray[_Image]:
    """Resize an HxW or HxWxC image by ``scale`` like MATLAB ``imresize(image, scale, 'bicubic')``.

    ``scale`` < 1 shrinks (0.25 for x4 downsampling), > 1 enlarges (the bicubic SR baseline).
    With ``output_shape`` (height, width) each axis gets its own scale, as MATLAB's
    ``imresize(image, [h w])``. uint8 in gives uint8 out (rounded half away from zero, saturated);
    float in gives float out of the same dtype, unclipped.
    """
    if image.ndim not in (2, 3) or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"expected a non-empty HxW or HxWxC image, got shape {image.shape}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    in_shape = (int(image.shape[0]), int(image.shape[1]))
    if output_shape is None:
        out_shape = (output_length(in_shape[0], scale), output_length(in_shape[1], scale))
        scales = (scale, scale)
    else:
        if min(output_shape) < 1:
            raise ValueError(f"output_shape must be positive, got {output_shape}")
        out_shape = output_shape
        scales = (out_shape[0] / in_shape[0], out_shape[1] / in_shape[1])
    is_uint8 = image.dtype == np.uint8
    if not (is_uint8 or np.issubdtype(image.dtype, np.floating)):
        raise ValueError(f"expected a uint8 or float image, got dtype {image.dtype}")
    result = np.asarray(image, dtype=np.float64)
    for axis in sorted((0, 1), key=lambda a: scales[a]):  # stable: height first on ties
        if out_shape[axis] == in_shape[axis] and scales[axis] == 1.0:
            continue
        matrix = resize_matrix(in_shape[axis], out_shape[axis], scales[axis])
        result = _resize_axis(result, axis, matrix)
        if is_uint8:
            result = round_to_uint8(result).astype(np.float64)
    return result.astype(image.dtype)
