"""SRResNet in the EDSR-PyTorch-framework layout of the quantization papers (AdaBM, DAQ, OAQ-SR:
``src/model/srresnet.py``; EDSR-PyTorch itself has no SRResNet).

Supported keys (n = n_resblocks)::

    head.0.weight                      9x9 conv 3 -> n_feats (bias optional: head.0.bias)
    head.1.weight                      PReLU
    body.{i}.conv1.* / body.{i}.conv2.*  3x3 convs of ResBlock i (bias optional)
    body.{i}.bn1.* / body.{i}.bn2.*    BatchNorm after each conv (optional, as a pair)
    body.{i}.act.weight                PReLU between the convs (absent: ReLU, as in DAQ)
    body.{n}.*                         last body conv (3x3), body.{n+1}.*: its BatchNorm
    tail.0.{0,3,6}.*                   Upsampler: conv to 4*n_feats, PixelShuffle(2), PReLU per
                                       factor 2 (x3: conv to 9*n_feats, PixelShuffle(3), PReLU)
    tail.0.{2,5,8}.weight              the upsampler PReLUs
    tail.1.*                           9x9 conv n_feats -> 3
    sub_mean.* / add_mean.*            optional MeanShift; DAQ saves it but never applies it, and
                                       neither does this network

ResBlock: conv1 -> bn1 -> act -> conv2 -> bn2, times ``res_scale`` (1), plus the input. Forward:
head, body with a global skip from the head output, tail; no mean shift. Like every model of
that framework it runs on ``rgb_range`` 255 (nothing in the weights says otherwise).
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
    shuffle_scale,
    stage_convs,
)


class ResBlock(nn.Module):
    def __init__(self, n_feats: int, bias: bool, bn: bool, prelu: bool) -> None:
        super().__init__()
        self.conv1 = conv(n_feats, n_feats, 3, bias=bias)
        self.bn1: nn.Module = nn.BatchNorm2d(n_feats) if bn else nn.Identity()
        self.act: nn.Module = nn.PReLU() if prelu else nn.ReLU(True)
        self.conv2 = conv(n_feats, n_feats, 3, bias=bias)
        self.bn2: nn.Module = nn.BatchNorm2d(n_feats) if bn else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        res: Tensor = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return res + x


class SRResNet(SRNet):
    arch = "SRResNet"

    def __init__(self, n_resblocks: int = 16, n_feats: int = 64, scale: int = 4, *,
                 bn: bool = True, block_bias: bool = False, block_prelu: bool = True,
                 outer_bias: bool = False, mean_shift: bool = False,
                 rgb_range: float = 255.0) -> None:
        super().__init__()
        self.scale = scale
        self.rgb_range = rgb_range
        self.n_resblocks = n_resblocks
        if mean_shift:  # stored by some checkpoints, never applied (see the module docstring)
            self.sub_mean = MeanShift(rgb_range, sign=-1)
            self.add_mean = MeanShift(rgb_range, sign=1)
        self.head = nn.Sequential(conv(3, n_feats, 9, bias=outer_bias), nn.PReLU())
        self.body = nn.Sequential(
            *[ResBlock(n_feats, block_bias, bn, block_prelu) for _ in range(n_resblocks)],
            conv(n_feats, n_feats, 3, bias=outer_bias), nn.BatchNorm2d(n_feats))
        self.tail = nn.Sequential(
            pixel_shuffle_upsampler(n_feats, n_feats, scale, bias=outer_bias, act=nn.PReLU),
            conv(n_feats, 3, 9, bias=outer_bias))

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(x * self.rgb_range)
        out: Tensor = self.tail(self.body(x) + x)
        return out / self.rgb_range

    def feature_blocks(self) -> list[str]:
        return [f"body.{i}" for i in range(self.n_resblocks)]

    def adaptive_convs(self) -> list[str]:
        return [f"{b}.{c}" for b in self.feature_blocks() for c in ("conv1", "conv2")]

    def fixed_convs(self) -> list[str]:
        return ["head.0", f"body.{self.n_resblocks}", *conv_children(self.tail[0], "tail.0"),
                "tail.1"]

    def trunk_ends(self) -> list[str]:
        return ["head.0", f"body.{self.n_resblocks}"]


class SRResNetSpec(ArchSpec):
    arch = "SRResNet"

    def detect(self, sd: StateDict) -> Detected | None:
        if "body.0.conv1.weight" not in sd:
            return None
        n_feats = int(sd["body.0.conv1.weight"].shape[0])
        n_resblocks = count_indexed(sd, "body.", ".conv1.weight")
        scale = shuffle_scale(stage_convs(sd, "tail.0."), n_feats)
        flags = {
            "bn": "body.0.bn1.weight" in sd,
            "block_bias": "body.0.conv1.bias" in sd,
            "block_prelu": "body.0.act.weight" in sd,
            "outer_bias": "head.0.bias" in sd,
            "mean_shift": "sub_mean.weight" in sd,
        }
        config = (("n_resblocks", n_resblocks), ("n_feats", n_feats),
                  *((k, int(v)) for k, v in flags.items()), ("rgb_range", 255.0))
        return Detected(self.arch, config, (scale,))

    def default(self) -> Detected:
        config = (("n_resblocks", 16), ("n_feats", 64), ("bn", 1), ("block_bias", 0),
                  ("block_prelu", 1), ("outer_bias", 0), ("mean_shift", 0), ("rgb_range", 255.0))
        return Detected(self.arch, config, (4,))

    def build(self, det: Detected, scale: int) -> SRNet:
        flags = {k: bool(det.get(k))
                 for k in ("bn", "block_bias", "block_prelu", "outer_bias", "mean_shift")}
        return SRResNet(det.as_int("n_resblocks"), det.as_int("n_feats"), scale,
                        rgb_range=float(det.get("rgb_range")), **flags)


SPEC = SRResNetSpec()
