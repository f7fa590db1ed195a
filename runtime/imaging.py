"""Image files and pixel conventions shared by evaluation and the runtime.

Images are HxWx3 ``uint8`` RGB arrays. Loading normalises every mode the benchmarks use: grayscale
is replicated to three channels, alpha is dropped, 16-bit samples are scaled to 8 bit, float
samples in [0, 1] are scaled by 255 (other float images are refused) and the EXIF orientation
is applied (a phone photo comes out upright). The Y
channel follows ITU-R BT.601 as MATLAB's ``rgb2ycbcr`` computes it, the convention of SR papers.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TypeVar

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps

from runtime.errors import MediaError
from runtime.fileio import atomic_write_bytes

__all__ = ["icc_profile", "load_rgb", "mod_crop", "rgb_to_y", "round_to_uint8", "save_rgb",
           "to_uint8"]

_Pixel = TypeVar("_Pixel", bound=np.generic)

_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
# BT.601 luma from full-range RGB in [0, 255] to studio-range Y in [16, 235].
_Y_WEIGHTS = np.array([65.738, 129.057, 25.064], dtype=np.float64) / 256.0
_Y_OFFSET = 16.0
_NEW_FILE_MODE = 0o644  # mkstemp creates 0600; saved images should be readable like any other


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def round_to_uint8(values: npt.NDArray[np.floating]) -> npt.NDArray[np.uint8]:
    """Clip values on the 0..255 scale and round half away from zero, as MATLAB's uint8()."""
    rounded: npt.NDArray[np.uint8] = np.floor(np.clip(values, 0.0, 255.0) + 0.5).astype(np.uint8)
    return rounded


def to_uint8(image: npt.NDArray[np.floating]) -> npt.NDArray[np.uint8]:
    """Convert a float image in [0, 1] to uint8: scale by 255, clip, round half away from zero."""
    return round_to_uint8(np.asarray(image, dtype=np.float64) * 255.0)


def _pixels(image: Image.Image, path: str | os.PathLike[str]) -> npt.NDArray[np.uint8]:
    """HxWx3 uint8 pixels of a decoded PIL image of any mode (EXIF orientation applied)."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "F":  # 32-bit float samples: 0..1 is the only scale that is unambiguous
        wide = np.asarray(image, dtype=np.float64)
        if not (np.isfinite(wide).all() and wide.min() >= 0.0 and wide.max() <= 1.0):
            raise MediaError(f"cannot read image {path}: float samples in [{wide.min():g}, "
                             f"{wide.max():g}]; only float images in [0, 1] (or 8/16-bit "
                             "images) are read")
        gray = round_to_uint8(wide * 255.0)
    elif image.mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(image, dtype=np.float64)
        gray = round_to_uint8(wide / 257.0)  # 65535 -> 255, 257 * k -> k
    elif image.mode in ("L", "LA", "1"):
        gray = np.asarray(image.convert("L"), dtype=np.uint8)
    else:
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    return np.repeat(gray[:, :, np.newaxis], 3, axis=2)


def load_rgb(path: str | os.PathLike[str]) -> npt.NDArray[np.uint8]:
    """Read an image file as an HxWx3 uint8 RGB array.

    Raises MediaError (one line) when the file is missing, not an image, truncated or corrupt.
    """
    try:
        with Image.open(path) as image:
            image.load()
            return _pixels(image, path)
    except FileNotFoundError:
        raise MediaError(f"image file not found: {path}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        # PIL reports unknown formats, truncation and bad chunks as OSError/ValueError/SyntaxError.
        raise MediaError(f"cannot read image {path}: {_one_line(error)}") from None


def _check_rgb(array: npt.NDArray[np.generic]) -> None:
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 image, got shape {array.shape} {array.dtype}")


def icc_profile(path: str | os.PathLike[str]) -> bytes | None:
    """The ICC colour profile embedded in an image file, if any (None when unreadable)."""
    try:
        with Image.open(path) as image:
            icc = image.info.get("icc_profile")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return icc if isinstance(icc, bytes) and icc else None


def save_rgb(path: str | os.PathLike[str], array: npt.NDArray[np.uint8], *,
             icc: bytes | None = None) -> None:
    """Write an HxWx3 uint8 image atomically (parent folders created); format from the suffix.
    ``icc``: an ICC profile to embed (the input's, so colours stay as they were)."""
    _check_rgb(array)
    target = Path(path)
    image_format = Image.registered_extensions().get(target.suffix.lower())
    if image_format is None:
        raise MediaError(f"cannot write image {target}: unknown extension {target.suffix!r}")
    encoded = io.BytesIO()
    try:
        extra = {} if icc is None else {"icc_profile": icc}
        Image.fromarray(array).save(encoded, format=image_format, **extra)
        atomic_write_bytes(target, encoded.getvalue(), mode=_NEW_FILE_MODE)
    except (OSError, ValueError) as error:
        raise MediaError(f"cannot write image {target}: {_one_line(error)}") from None


def mod_crop(image: npt.NDArray[_Pixel], scale: int) -> npt.NDArray[_Pixel]:
    """Crop the bottom and right edges so height and width are multiples of ``scale``."""
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    height, width = image.shape[:2]
    return image[: height - height % scale, : width - width % scale]


def rgb_to_y(image: npt.NDArray[np.generic]) -> npt.NDArray[np.float64]:
    """Unrounded Y of YCbCr (BT.601, MATLAB rgb2ycbcr) of an HxWx3 RGB image on the 0..255 scale."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {image.shape}")
    return np.asarray(image, dtype=np.float64) @ _Y_WEIGHTS + _Y_OFFSET
