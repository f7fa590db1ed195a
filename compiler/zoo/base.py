"""The contract every architecture of the model zoo fulfils.

Every zoo network takes NCHW float32 RGB in [0, 1] and returns the upscaled image on the same
[0, 1] scale (not clamped); a checkpoint's own ``rgb_range`` (1 or 255) is applied inside
``forward``. Quantization and lowering find their layers through three name lists, so they never
special-case an architecture:

- ``adaptive_convs``: the body convs whose *input* activation gets the adaptive bit-width
  (AdaBM's "adaptive" layers; the two convs of every residual block in EDSR);
- ``fixed_convs``: head, last body conv, upsampler and tail convs: full precision by default,
  fixed 8-bit in the fully quantized (``--fq``) setting;
- ``trunk_ends``: the fixed convs at the two ends of the LR feature trunk: the one that reads the
  image and the one whose output closes the global residual (EDSR's ``head.0`` and
  ``body.N``); the hardware ladder keeps them at the target's top precision
  (``compiler.plan``);
- ``feature_blocks``: the modules whose outputs feed the block-feature distillation loss.

Names are qualified module names as given by ``named_modules()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn


class SRNet(nn.Module):
    """Base class of the zoo's super-resolution networks."""

    arch: str = ""
    scale: int = 1
    rgb_range: float = 1.0

    def adaptive_convs(self) -> list[str]:
        raise NotImplementedError

    def fixed_convs(self) -> list[str]:
        raise NotImplementedError

    def trunk_ends(self) -> list[str]:
        raise NotImplementedError

    def feature_blocks(self) -> list[str]:
        raise NotImplementedError


@dataclass(frozen=True)
class ModelInfo:
    """What ``load_model`` detected: architecture, its hyper-parameters and the file's checksum."""

    arch: str
    scale: int
    config: tuple[tuple[str, int | float], ...]
    sha256: str
    path: Path

    def describe(self) -> str:
        cfg = ", ".join(f"{k}={v}" for k, v in self.config)
        return f"{self.arch} x{self.scale} ({cfg})"


@dataclass(frozen=True)
class LoadedModel:
    """A network in eval mode, float32, on the CPU, with what was detected about it."""

    model: SRNet
    info: ModelInfo
