"""IMDN (Zheng222/IMDN ``model/architecture.py`` class ``IMDN``, ``model/block.py``).

Keys (an optional ``module.`` prefix is stripped on loading)::

    fea_conv.*                       3x3 conv 3 -> nf
    IMDB{k}.c1..c4.*                 3x3 distillation convs (LeakyReLU 0.05 after c1..c3)
    IMDB{k}.cca.conv_du.{0,2}.*      contrast-aware channel attention (std + mean -> 1x1 convs)
    IMDB{k}.c5.*                     1x1 fusion, plus the block input
    c.0.*                            1x1 conv nf*N -> nf after the concat (+ LeakyReLU 0.05)
    LR_conv.*                        3x3 conv, plus fea_conv's output
    upsampler.0.*                    3x3 conv nf -> 3*s*s, PixelShuffle(s)

Official: nf = 64, N = 6 blocks; nf and N are detected. Input range 1.

Quantization lists: adaptive = c1..c5 of every IMDB; fixed = fea_conv, c.0, LR_conv, upsampler.0;
feature blocks = IMDB1..N. Exception: the CCA 1x1 convs are in neither list, since they act on
pooled per-channel statistics, not on feature maps.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from compiler.zoo.base import SRNet
from compiler.zoo.common import (
    ArchSpec,
    Detected,
    DistillationNet,
    StateDict,
    conv,
    detect_distillation,
    lrelu,
)


class CCALayer(nn.Module):
    """Contrast-aware channel attention: ``x * sigmoid(convs(std(x) + mean(x)))``.

    ``fp64_statistics`` (off by default; the exported graph never has it): the means and the
    gate are computed in FP64 and rounded once to FP32, as the ONNX Runtime lowering computes
    them (``compiler.lower.ort._statistics_in_double``); ``compiler.parity`` sets it.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.conv_du = nn.Sequential(conv(channels, channels // reduction, 1), nn.ReLU(True),
                                     conv(channels // reduction, channels, 1), nn.Sigmoid())
        self.fp64_statistics = False

    def forward(self, x: Tensor) -> Tensor:
        if self.fp64_statistics:
            return x * self._gate_fp64(x)
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = (x - mean).pow(2).mean(dim=(2, 3), keepdim=True).pow(0.5)
        weights: Tensor = self.conv_du(std + mean)
        return x * weights

    def _gate_fp64(self, x: Tensor) -> Tensor:
        """The gate with FP64 statistics: only ``x - mean`` and its square stay FP32."""
        mean = x.double().mean(dim=(2, 3), keepdim=True)
        variance = (x - mean.float()).pow(2).double().mean(dim=(2, 3), keepdim=True)
        y = variance.pow(0.5) + mean
        for layer in self.conv_du:
            if isinstance(layer, nn.Conv2d):
                bias = None if layer.bias is None else layer.bias.double()
                y = nn.functional.conv2d(y, layer.weight.double(), bias)
            else:
                y = layer(y)
        return y.float()


class IMDModule(nn.Module):
    """Information multi-distillation block: keeps a quarter of c1..c3's outputs, refines the
    rest."""

    def __init__(self, nf: int) -> None:
        super().__init__()
        self.distilled = nf // 4
        self.remaining = nf - self.distilled
        self.c1 = conv(nf, nf, 3)
        self.c2 = conv(self.remaining, nf, 3)
        self.c3 = conv(self.remaining, nf, 3)
        self.c4 = conv(self.remaining, self.distilled, 3)
        self.act = lrelu()
        self.c5 = conv(self.distilled * 4, nf, 1)
        self.cca = CCALayer(self.distilled * 4)

    def forward(self, x: Tensor) -> Tensor:
        kept = []
        rest = x
        for stage in (self.c1, self.c2, self.c3):
            # slicing, not torch.split: the same values, and it exports as Slice, which ONNX
            # opset 17 has (Split with num_outputs is opset 18; TensorRT 8.5 parses <= 17)
            y = self.act(stage(rest))
            d, rest = y[:, :self.distilled], y[:, self.distilled:]
            kept.append(d)
        out = torch.cat([*kept, self.c4(rest)], dim=1)
        fused: Tensor = self.c5(self.cca(out))
        return fused + x


class IMDN(DistillationNet):
    arch = "IMDN"
    block_prefix = "IMDB"
    block_convs = ("c1", "c2", "c3", "c4", "c5")

    def __init__(self, scale: int = 4, nf: int = 64, num_modules: int = 6) -> None:
        super().__init__(nf, num_modules, scale, 1.0, IMDModule)


class IMDNSpec(ArchSpec):
    arch = "IMDN"

    def detect(self, sd: StateDict) -> Detected | None:
        return detect_distillation(sd, self.arch, "IMDB", "c1.weight")

    def default(self) -> Detected:
        return Detected(self.arch, (("nf", 64), ("num_modules", 6)), (4,))

    def build(self, det: Detected, scale: int) -> SRNet:
        return IMDN(scale, det.as_int("nf"), det.as_int("num_modules"))


SPEC = IMDNSpec()
