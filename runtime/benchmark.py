"""SR benchmark folders (Set5, Set14, B100, Urban100, ...) and model-agnostic evaluation.

A benchmark root holds ``HR/<name>.png|jpg|bmp`` and optionally EDSR-style bicubic inputs
``LR_bicubic/X<scale>/<name>x<scale>.png``. HR images are mod-cropped to a multiple of the scale;
a provided LR image is used as is (after a size check), otherwise it is generated from the cropped
HR with MATLAB-compatible bicubic downsampling. :func:`evaluate` runs any upscaler (a PyTorch
model, an ONNX engine, the bicubic baseline) over the images and scores it with Y-channel PSNR and
SSIM, cropping ``scale`` pixels from every border.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from runtime.errors import ConfigError, DatasetError, EngineError
from runtime.imaging import load_rgb, mod_crop, to_uint8
from runtime.metrics import psnr_y, ssim_y
from runtime.resize import imresize_bicubic

__all__ = [
    "HR_EXTENSIONS",
    "BenchmarkImage",
    "BenchmarkSet",
    "EvalResult",
    "ImageScore",
    "Progress",
    "Upscaler",
    "evaluate",
    "load_benchmark",
]

HR_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp"})

LrSource = Literal["provided", "generated"]
# Takes an LR uint8 HxWx3 image; returns the SR image (sH, sW, 3), float in [0, 1] or uint8.
Upscaler = Callable[[npt.NDArray[np.uint8]], npt.NDArray[np.generic]]
# Called after each image with (images done, total, name of the image just scored).
Progress = Callable[[int, int, str], None]


def _frozen(image: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    view = image.view()
    view.setflags(write=False)
    return view


@dataclass(frozen=True, eq=False)
class BenchmarkImage:
    """One HR/LR pair; ``hr`` is mod-cropped and both arrays are read-only HxWx3 uint8."""

    name: str
    hr: npt.NDArray[np.uint8]
    lr: npt.NDArray[np.uint8]
    lr_source: LrSource


@dataclass(frozen=True, eq=False)
class BenchmarkSet:
    """The images of one benchmark folder at one scale, sorted by name."""

    name: str
    root: Path
    scale: int
    images: tuple[BenchmarkImage, ...]

    @classmethod
    def load(cls, root: Path, scale: int) -> BenchmarkSet:
        """Read ``root`` (see the module doc); DatasetError when it is missing or malformed."""
        if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
            raise ConfigError(f"scale must be a positive integer, got {scale!r}")
        root = Path(root)
        images = tuple(_load_pair(path, root, scale) for path in _hr_files(root))
        return cls(name=root.name, root=root, scale=scale, images=images)


def load_benchmark(root: Path, scale: int) -> list[BenchmarkImage]:
    """The images of the benchmark folder ``root`` at ``scale``, sorted by name."""
    return list(BenchmarkSet.load(root, scale).images)


def _hr_files(root: Path) -> list[Path]:
    hr_dir = root / "HR"
    if not hr_dir.is_dir():
        raise DatasetError(f"benchmark {root} has no HR folder: expected {hr_dir}")
    files = sorted(
        path
        for path in hr_dir.iterdir()
        if path.is_file() and path.suffix.lower() in HR_EXTENSIONS and not path.name.startswith(".")
    )
    if not files:
        allowed = ", ".join(sorted(HR_EXTENSIONS))
        raise DatasetError(f"benchmark HR folder {hr_dir} holds no images ({allowed})")
    stems: dict[str, Path] = {}
    for path in files:
        if path.stem in stems:
            raise DatasetError(
                f"benchmark HR folder {hr_dir} has two images named {path.stem!r}: "
                f"{stems[path.stem].name} and {path.name}"
            )
        stems[path.stem] = path
    return files


def _load_pair(hr_path: Path, root: Path, scale: int) -> BenchmarkImage:
    hr = mod_crop(load_rgb(hr_path), scale)
    if hr.shape[0] == 0 or hr.shape[1] == 0:
        raise DatasetError(f"HR image {hr_path} is smaller than the scale {scale}")
    expected = (hr.shape[0] // scale, hr.shape[1] // scale)
    lr_path = root / "LR_bicubic" / f"X{scale}" / f"{hr_path.stem}x{scale}.png"
    source: LrSource
    if lr_path.is_file():
        lr, source = load_rgb(lr_path), "provided"
        if lr.shape[:2] != expected:
            raise DatasetError(
                f"LR image {lr_path} has the wrong size: expected {expected[0]}x{expected[1]} "
                f"(HxW, HR {hr.shape[0]}x{hr.shape[1]} / {scale}), "
                f"found {lr.shape[0]}x{lr.shape[1]}"
            )
    else:
        lr = imresize_bicubic(hr, 1.0 / scale, output_shape=expected)
        source = "generated"
    return BenchmarkImage(name=hr_path.stem, hr=_frozen(hr), lr=_frozen(lr), lr_source=source)


@dataclass(frozen=True)
class ImageScore:
    """Y-channel PSNR (dB) and SSIM of one image."""

    name: str
    psnr: float
    ssim: float


@dataclass(frozen=True)
class EvalResult:
    """Per-image scores and their means (a mean PSNR is ``inf`` if any image is reproduced)."""

    scale: int
    images: tuple[ImageScore, ...]
    psnr: float
    ssim: float

    def to_json(self) -> dict[str, object]:
        """``{"psnr": mean, "ssim": mean, "images": [{"name", "psnr", "ssim"}, ...]}``."""
        return {
            "psnr": self.psnr,
            "ssim": self.ssim,
            "images": [
                {"name": score.name, "psnr": score.psnr, "ssim": score.ssim}
                for score in self.images
            ],
        }


def _as_uint8(sr: npt.NDArray[np.generic], image: BenchmarkImage) -> npt.NDArray[np.uint8]:
    """Validate the upscaler's output for ``image`` and quantise it to uint8."""
    sr = np.asarray(sr)
    if sr.shape != image.hr.shape:
        raise EngineError(
            f"upscaler returned shape {sr.shape} for {image.name!r} (LR {image.lr.shape}); "
            f"expected {image.hr.shape}"
        )
    if sr.dtype == np.uint8:
        return sr.astype(np.uint8, copy=False)
    if np.issubdtype(sr.dtype, np.floating):
        if not np.all(np.isfinite(sr)):
            raise EngineError(f"upscaler returned NaN or infinite values for {image.name!r}")
        return to_uint8(sr.astype(np.float64, copy=False))
    raise EngineError(
        f"upscaler returned dtype {sr.dtype} for {image.name!r}; expected float in [0, 1] or uint8"
    )


def evaluate(
    upscale: Upscaler,
    images: Sequence[BenchmarkImage],
    scale: int,
    progress: Progress | None = None,
) -> EvalResult:
    """Upscale every LR image, score it against its HR (crop ``scale`` px) and average."""
    if not images:
        raise DatasetError("no benchmark images to evaluate")
    for image in images:
        if image.lr.shape[0] * scale != image.hr.shape[0] or (
            image.lr.shape[1] * scale != image.hr.shape[1]
        ):
            raise ConfigError(
                f"image {image.name!r} (HR {image.hr.shape[:2]}, LR {image.lr.shape[:2]}) "
                f"was not loaded for scale {scale}"
            )
    scores: list[ImageScore] = []
    for done, image in enumerate(images, start=1):
        sr = _as_uint8(upscale(image.lr), image)
        scores.append(
            ImageScore(image.name, psnr_y(sr, image.hr, scale), ssim_y(sr, image.hr, scale))
        )
        if progress is not None:
            progress(done, len(images), image.name)
    return EvalResult(
        scale=scale,
        images=tuple(scores),
        psnr=math.fsum(score.psnr for score in scores) / len(scores),
        ssim=math.fsum(score.ssim for score in scores) / len(scores),
    )
