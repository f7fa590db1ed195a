"""Calibration data: random LR patches from a folder of images (HR is never read)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from runtime.errors import DatasetError
from runtime.imaging import load_rgb
from runtime.resize import imresize_bicubic

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def list_images(folder: Path) -> list[Path]:
    if folder.is_file():
        raise DatasetError(f"--calib {folder} is a file, not a folder: give the folder that "
                           "holds the LR calibration images")
    if not folder.is_dir():
        raise DatasetError(f"calibration folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"no images in {folder}; allowed suffixes: {', '.join(IMAGE_SUFFIXES)}")
    return files


def sample_patches(folder: Path, count: int, size: int, seed: int, downscale: int = 1) -> Tensor:
    """``count`` random ``size`` x ``size`` crops, spread evenly over the folder's images.

    ``downscale`` > 1 first shrinks every image with the MATLAB-compatible bicubic, i.e. gives the
    network the same degradation as its bicubic LR inputs: use it when the calibration images are
    ordinary photos rather than LR frames of the deployment content.
    Returns NCHW float32 RGB in [0, 1]. Deterministic for a given seed and folder content.
    """
    files = list_images(folder)
    rng = np.random.default_rng(seed)
    images = [load_rgb(path) for path in files]
    if downscale > 1:
        images = [imresize_bicubic(image, 1 / downscale) for image in images]
    small = [p.name for p, im in zip(files, images, strict=True) if min(im.shape[:2]) < size]
    if small:
        raise DatasetError(f"calibration images smaller than the {size}px patch: {small[:3]}; "
                           "use a smaller --patch-size")
    crops = []
    for i in range(count):
        image = images[i % len(images)]
        y = int(rng.integers(0, image.shape[0] - size + 1))
        x = int(rng.integers(0, image.shape[1] - size + 1))
        crops.append(image[y:y + size, x:x + size])
    batch = np.stack(crops).astype(np.float32) / 255.0
    return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()
