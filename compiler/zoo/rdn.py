"""RDN in the EDSR-PyTorch layout (``src/model/rdn.py``; also AdaBM's ``rdn.py`` without --fq).

Keys (D blocks of C convs, growth G, G0 features, kernel k)::

    SFENet1.*  SFENet2.*                shallow feature convs (k x k)
    RDBs.{d}.convs.{c}.conv.0.*         dense conv G0 + c*G -> G (k x k), ReLU, concatenated
    RDBs.{d}.LFF.*                      local feature fusion 1x1 G0 + C*G -> G0, plus the input
    GFF.0.*  GFF.1.*                    global fusion 1x1 D*G0 -> G0, then k x k; plus SFENet1's out
    UPNet.{0,2}.* (x2/x3)               conv G0 -> G*r*r, PixelShuffle(r), conv G -> 3
    UPNet.{0,2,4}.* (x4)                two conv + PixelShuffle(2) stages, conv G -> 3

Configs 'A' (D, C, G) = (20, 6, 32) and 'B' (16, 8, 64), G0 = 64, are the official ones; any are
detected. No mean shift; ``rgb_range`` 255 (the EDSR-PyTorch default).

Quantization lists: adaptive = every dense conv and every LFF (AdaBM quantizes LFF too, at the
base bit-width: the closest of the two lists); fixed = SFENet1/2, GFF.0/1 (the global fusion
plays EDSR's last-body-conv role) and the UPNet convs; feature blocks = the RDBs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from compiler.zoo.base import SRNet
from compiler.zoo.common import (
    ArchSpec,
    Detected,
    StateDict,
    conv,
    conv_children,
    count_indexed,
    pixel_shuffle_upsampler,
    shuffle_scale,
    stage_convs,
)


class DenseConv(nn.Module):
    """RDB_Conv: conv + ReLU, concatenated to the input."""

    def __init__(self, in_ch: int, growth: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(conv(in_ch, growth, kernel), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat((x, self.conv(x)), 1)


class RDB(nn.Module):
    def __init__(self, g0: int, growth: int, n_convs: int, kernel: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(*[DenseConv(g0 + c * growth, growth, kernel)
                                     for c in range(n_convs)])
        self.LFF = conv(g0 + n_convs * growth, g0, 1)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.LFF(self.convs(x))
        return out + x


class RDN(SRNet):
    arch = "RDN"

    def __init__(self, scale: int = 2, g0: int = 64, n_blocks: int = 16, n_convs: int = 8,
                 growth: int = 64, kernel: int = 3, rgb_range: float = 255.0) -> None:
        super().__init__()
        self.scale = scale
        self.rgb_range = rgb_range
        self.n_convs = n_convs
        self.SFENet1 = conv(3, g0, kernel)
        self.SFENet2 = conv(g0, g0, kernel)
        self.RDBs = nn.ModuleList([RDB(g0, growth, n_convs, kernel) for _ in range(n_blocks)])
        self.GFF = nn.Sequential(conv(n_blocks * g0, g0, 1), conv(g0, g0, kernel))
        self.UPNet = nn.Sequential(*pixel_shuffle_upsampler(g0, growth, scale, kernel=kernel),
                                   conv(growth, 3, kernel))

    def forward(self, x: Tensor) -> Tensor:
        f1 = self.SFENet1(x * self.rgb_range)
        x = self.SFENet2(f1)
        outs = []
        for block in self.RDBs:
            x = block(x)
            outs.append(x)
        x = self.GFF(torch.cat(outs, 1)) + f1
        out: Tensor = self.UPNet(x)
        return out / self.rgb_range

    def feature_blocks(self) -> list[str]:
        return [f"RDBs.{d}" for d in range(len(self.RDBs))]

    def adaptive_convs(self) -> list[str]:
        return [name for b in self.feature_blocks()
                for name in (*(f"{b}.convs.{c}.conv.0" for c in range(self.n_convs)),
                             f"{b}.LFF")]

    def fixed_convs(self) -> list[str]:
        return ["SFENet1", "SFENet2", "GFF.0", "GFF.1", *conv_children(self.UPNet, "UPNet")]

    def trunk_ends(self) -> list[str]:
        return ["SFENet1", "GFF.1"]


class RDNSpec(ArchSpec):
    arch = "RDN"

    def detect(self, sd: StateDict) -> Detected | None:
        if "RDBs.0.LFF.weight" not in sd:
            return None
        g0 = int(sd["RDBs.0.LFF.weight"].shape[0])
        dense = sd["RDBs.0.convs.0.conv.0.weight"]
        growth, kernel = int(dense.shape[0]), int(dense.shape[-1])
        n_blocks = count_indexed(sd, "RDBs.", ".LFF.weight")
        n_convs = count_indexed(sd, "RDBs.0.convs.", ".conv.0.weight")
        ups = stage_convs(sd, "UPNet.")
        scale = shuffle_scale(ups[:-1], growth)
        config = (("G0", g0), ("D", n_blocks), ("C", n_convs), ("G", growth),
                  ("kernel_size", kernel), ("rgb_range", 255.0))
        return Detected(self.arch, config, (scale,))

    def default(self) -> Detected:
        config = (("G0", 64), ("D", 16), ("C", 8), ("G", 64), ("kernel_size", 3),
                  ("rgb_range", 255.0))
        return Detected(self.arch, config, (2,))

    def build(self, det: Detected, scale: int) -> SRNet:
        return RDN(scale, det.as_int("G0"), det.as_int("D"), det.as_int("C"), det.as_int("G"),
                   det.as_int("kernel_size"), float(det.get("rgb_range")))


SPEC = RDNSpec()
