"""EDSR in the EDSR-PyTorch layout (sanghyun-son/EDSR-PyTorch ``src/model/edsr.py``).

Keys: ``sub_mean.{weight,bias}`` / ``add_mean.*`` (MeanShift, a 1x1 conv; its values come from the
checkpoint), ``head.0.*``, ``body.{i}.body.{0,2}.*`` (ResBlock conv-ReLU-conv whose output is
multiplied by ``res_scale`` before the skip), ``body.{n}.*`` (last body conv, global skip from the
head), ``tail.0.{0,2,4}.*`` (Upsampler: one conv to 4*n_feats + PixelShuffle(2) per factor 2, or
one conv to 9*n_feats + PixelShuffle(3) for x3) and ``tail.1.*``.

Detected from the state dict: ``n_resblocks``, ``n_feats``, the scale, and ``rgb_range`` (1 or 255,
from the MeanShift bias). ``res_scale`` leaves no trace in the weights; it follows the official
recipes: 0.1 for the wide EDSR (n_feats >= 256), 1 otherwise (EDSR-baseline and kin).
"""

from __future__ import annotations

from torch import Tensor, nn

from compiler.zoo.base import SRNet
from compiler.zoo.common import (
    ArchSpec,
    Detected,
    MeanShift,
    StateDict,
    conv,
    conv_children,
    count_indexed,
    pixel_shuffle_upsampler,
    rgb_range_of,
    shuffle_scale,
    stage_convs,
)


class ResBlock(nn.Module):
    """conv-ReLU-conv scaled by ``res_scale``, plus the input (EDSR-PyTorch ``ResBlock``)."""

    def __init__(self, n_feats: int, res_scale: float) -> None:
        super().__init__()
        self.body = nn.Sequential(conv(n_feats, n_feats, 3), nn.ReLU(True),
                                  conv(n_feats, n_feats, 3))
        self.res_scale = res_scale

    def forward(self, x: Tensor) -> Tensor:
        res: Tensor = self.body(x).mul(self.res_scale)
        return res + x


class EDSR(SRNet):
    arch = "EDSR"

    def __init__(self, n_resblocks: int = 16, n_feats: int = 64, scale: int = 2,
                 res_scale: float = 1.0, rgb_range: float = 255.0) -> None:
        super().__init__()
        self.scale = scale
        self.rgb_range = rgb_range
        self.n_resblocks = n_resblocks
        self.sub_mean = MeanShift(rgb_range, sign=-1)
        self.add_mean = MeanShift(rgb_range, sign=1)
        self.head = nn.Sequential(conv(3, n_feats, 3))
        self.body = nn.Sequential(*[ResBlock(n_feats, res_scale) for _ in range(n_resblocks)],
                                  conv(n_feats, n_feats, 3))
        self.tail = nn.Sequential(pixel_shuffle_upsampler(n_feats, n_feats, scale),
                                  conv(n_feats, 3, 3))

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.sub_mean(x * self.rgb_range))
        res = self.body(x) + x
        out: Tensor = self.add_mean(self.tail(res))
        return out / self.rgb_range

    def feature_blocks(self) -> list[str]:
        return [f"body.{i}" for i in range(self.n_resblocks)]

    def adaptive_convs(self) -> list[str]:
        return [f"{b}.body.{j}" for b in self.feature_blocks() for j in (0, 2)]

    def fixed_convs(self) -> list[str]:
        return ["head.0", f"body.{self.n_resblocks}", *conv_children(self.tail[0], "tail.0"),
                "tail.1"]

    def trunk_ends(self) -> list[str]:
        return ["head.0", f"body.{self.n_resblocks}"]


class EDSRSpec(ArchSpec):
    arch = "EDSR"

    def detect(self, sd: StateDict) -> Detected | None:
        if "body.0.body.0.weight" not in sd:
            return None
        n_feats = int(sd["body.0.body.0.weight"].shape[0])
        n_resblocks = count_indexed(sd, "body.", ".body.0.weight")
        scale = shuffle_scale(stage_convs(sd, "tail.0."), n_feats)
        shift = ("sub_mean.weight", "sub_mean.bias")
        rgb_range = rgb_range_of(*(sd[k] for k in shift)) if all(k in sd for k in shift) else 255.0
        res_scale = 0.1 if n_feats >= 256 else 1.0
        config = (("n_resblocks", n_resblocks), ("n_feats", n_feats), ("res_scale", res_scale),
                  ("rgb_range", rgb_range))
        return Detected(self.arch, config, (scale,))

    def default(self) -> Detected:
        config = (("n_resblocks", 16), ("n_feats", 64), ("res_scale", 1.0), ("rgb_range", 255.0))
        return Detected(self.arch, config, (2,))

    def build(self, det: Detected, scale: int) -> SRNet:
        return EDSR(det.as_int("n_resblocks"), det.as_int("n_feats"), scale,
                    float(det.get("res_scale")), float(det.get("rgb_range")))


SPEC = EDSRSpec()
