"""RFDN, the AIM 2020 efficient-SR winner, with the official njulj/RFDN keys (``RFDN.py``,
``block.py``).

Keys::

    fea_conv.*                           3x3 conv 3 -> nf
    B{k}.c{1,2,3}_d.*                    1x1 distillation convs (LeakyReLU 0.05)
    B{k}.c{1,2,3}_r.*                    3x3 refinement convs (shallow residual, LeakyReLU 0.05)
    B{k}.c4.*                            3x3 conv nf -> nf/2
    B{k}.c5.*                            1x1 fusion 2*nf -> nf
    B{k}.esa.{conv1,conv_f,conv_max,conv2,conv3,conv3_,conv4}.*   enhanced spatial attention
    c.0.*                                1x1 conv nf*N -> nf (+ LeakyReLU 0.05)
    LR_conv.*                            3x3 conv, plus fea_conv's output
    upsampler.0.*                        3x3 conv nf -> 3*s*s, PixelShuffle(s)

Official: nf = 50, N = 4, x4; nf, N and the scale are detected. The official test script feeds
[0, 255] pixels: ``rgb_range`` 255. ESA needs inputs of at least 15x15 pixels (strided conv and
a 7x7 max-pool).

Quantization lists: adaptive = c1_d .. c3_r, c4, c5 of every RFDB; fixed = fea_conv, c.0,
LR_conv, upsampler.0; feature blocks = B1..BN. Exception: the ESA convs are in neither list
(they compute a spatial attention mask from a strided, max-pooled, low-resolution branch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


class ESA(nn.Module):
    """Enhanced spatial attention: ``x * sigmoid(mask)`` with a mask from a pooled branch."""

    def __init__(self, n_feats: int) -> None:
        super().__init__()
        f = n_feats // 4
        self.conv1 = conv(n_feats, f, 1)
        self.conv_f = conv(f, f, 1)
        self.conv_max = conv(f, f, 3)
        self.conv2 = conv(f, f, 3, stride=2, padding=0)
        self.conv3 = conv(f, f, 3)
        self.conv3_ = conv(f, f, 3)
        self.conv4 = conv(f, n_feats, 1)

    def forward(self, x: Tensor) -> Tensor:
        c1_ = self.conv1(x)
        c1 = self.conv2(c1_)
        v_max = F.max_pool2d(c1, kernel_size=7, stride=3)
        v_range = F.relu(self.conv_max(v_max))
        c3 = self.conv3_(F.relu(self.conv3(v_range)))
        c3 = F.interpolate(c3, (x.size(2), x.size(3)), mode="bilinear", align_corners=False)
        mask = torch.sigmoid(self.conv4(c3 + self.conv_f(c1_)))
        return x * mask


class RFDB(nn.Module):
    """Residual feature distillation block."""

    def __init__(self, nf: int) -> None:
        super().__init__()
        dc = nf // 2
        for k in (1, 2, 3):
            self.add_module(f"c{k}_d", conv(nf, dc, 1))
            self.add_module(f"c{k}_r", conv(nf, nf, 3))
        self.c4 = conv(nf, dc, 3)
        self.act = lrelu()
        self.c5 = conv(dc * 4, nf, 1)
        self.esa = ESA(nf)

    def forward(self, x: Tensor) -> Tensor:
        kept = []
        r = x
        for k in (1, 2, 3):
            kept.append(self.act(self.get_submodule(f"c{k}_d")(r)))
            r = self.act(self.get_submodule(f"c{k}_r")(r) + r)
        out = torch.cat([*kept, self.act(self.c4(r))], dim=1)
        fused: Tensor = self.esa(self.c5(out))
        return fused


class RFDN(DistillationNet):
    arch = "RFDN"
    block_prefix = "B"
    block_convs = ("c1_d", "c1_r", "c2_d", "c2_r", "c3_d", "c3_r", "c4", "c5")

    def __init__(self, scale: int = 4, nf: int = 50, num_modules: int = 4) -> None:
        super().__init__(nf, num_modules, scale, 255.0, RFDB)


class RFDNSpec(ArchSpec):
    arch = "RFDN"

    def detect(self, sd: StateDict) -> Detected | None:
        return detect_distillation(sd, self.arch, "B", "c1_d.weight")

    def default(self) -> Detected:
        return Detected(self.arch, (("nf", 50), ("num_modules", 4)), (4,))

    def build(self, det: Detected, scale: int) -> SRNet:
        return RFDN(scale, det.as_int("nf"), det.as_int("num_modules"))


SPEC = RFDNSpec()
