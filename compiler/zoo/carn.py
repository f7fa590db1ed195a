"""CARN and CARN-M with the official nmhkahn/CARN-pytorch key names (``carn/model/carn.py``,
``carn_m.py``, ``ops.py``).

Keys::

    sub_mean.shifter.* / add_mean.shifter.*   MeanShift (DIV2K mean, range 1), from the checkpoint
    entry.*                                   3x3 conv 3 -> 64
    b{n}.b{1,2,3}.body.{0,2}.*                CARN: ResidualBlocks (conv-ReLU-conv, +x, ReLU)
    b{n}.b1.body.{0,2,4}.*                    CARN-M: one EResidualBlock (group conv-ReLU-group
                                              conv-ReLU-1x1 conv, +x, ReLU) applied 3 times
    b{n}.c{1,2,3}.body.0.* / c{1,2,3}.body.0.*  1x1 cascading fusions (+ReLU)
    upsample.up{2,3,4}.body.{0,3}.*           multi-scale upsampler (conv-ReLU-PixelShuffle
                                              stages, grouped like the residual convs)
    upsample.up.body.*                        official single-scale upsampler; one
                                              ``upsample.up{N}`` or a bare ``upsample.body.*``
                                              are read as single-scale x{N} too
    exit.*                                    3x3 conv 64 -> 3

A multi-scale checkpoint needs the scale from the caller; the loaded network keeps only that
scale's upsampler branch (the others are checked against the checkpoint, then dropped). Input
range 1.

Quantization lists: adaptive = the residual-block convs and the 1x1 fusions inside and between
the cascading blocks (CARN-M's shared block has one set of convs serving its three calls); fixed
= entry, the active upsampler's convs, exit; feature blocks = b1, b2, b3.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compiler.zoo.base import SRNet
from compiler.zoo.common import (
    ArchSpec,
    Detected,
    MeanShift,
    StateDict,
    conv,
    conv_children,
    indexed_keys,
    pixel_shuffle_upsampler,
    shuffle_scale,
    stage_convs,
)


class ShiftMean(nn.Module):
    """CARN's MeanShift: a wrapper whose ``shifter`` is the 1x1 conv."""

    def __init__(self, sign: int) -> None:
        super().__init__()
        self.shifter = MeanShift(1.0, sign)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.shifter(x)
        return out


class ResidualBlock(nn.Module):
    """``relu(body(x) + x)``; the efficient (CARN-M) body uses group convs and a 1x1 conv."""

    def __init__(self, n_feats: int, efficient: bool, group: int) -> None:
        super().__init__()
        if efficient:
            self.body = nn.Sequential(conv(n_feats, n_feats, 3, groups=group), nn.ReLU(True),
                                      conv(n_feats, n_feats, 3, groups=group), nn.ReLU(True),
                                      conv(n_feats, n_feats, 1))
        else:
            self.body = nn.Sequential(conv(n_feats, n_feats, 3), nn.ReLU(True),
                                      conv(n_feats, n_feats, 3))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + x)


class Fusion(nn.Module):
    """ops.BasicBlock as CARN uses it: a 1x1 conv + ReLU under ``body``."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv(in_ch, out_ch, 1), nn.ReLU(True))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.body(x)
        return out


def cascade(x: Tensor, blocks: Sequence[nn.Module], fusions: Sequence[nn.Module]) -> Tensor:
    """CARN's cascading connection: each block's output is concatenated to everything before it
    and fused by a 1x1 conv, which feeds the next block."""
    cat = out = x
    for block, fuse in zip(blocks, fusions, strict=True):
        cat = torch.cat([cat, block(out)], dim=1)
        out = fuse(cat)
    return out


class CascadingBlock(nn.Module):
    def __init__(self, n_feats: int, efficient: bool, group: int) -> None:
        super().__init__()
        self.efficient = efficient
        for k in (1,) if efficient else (1, 2, 3):
            self.add_module(f"b{k}", ResidualBlock(n_feats, efficient, group))
        for k in (1, 2, 3):
            self.add_module(f"c{k}", Fusion(n_feats * (k + 1), n_feats))

    def residual_names(self) -> list[str]:
        return ["b1"] * 3 if self.efficient else ["b1", "b2", "b3"]

    def forward(self, x: Tensor) -> Tensor:
        blocks = [self.get_submodule(name) for name in self.residual_names()]
        return cascade(x, blocks, [self.get_submodule(f"c{k}") for k in (1, 2, 3)])


class UpsampleBranch(nn.Module):
    """ops._UpsampleBlock: conv-ReLU-PixelShuffle stages under ``body``."""

    def __init__(self, n_feats: int, scale: int, group: int) -> None:
        super().__init__()
        self.body = pixel_shuffle_upsampler(n_feats, n_feats, scale, groups=group,
                                            act=lambda: nn.ReLU(True), act_before_shuffle=True)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.body(x)
        return out


class CARN(SRNet):
    """CARN (``efficient=False``) or CARN-M (``efficient=True``).

    ``layout`` names the upsampler keys: ``"branches"`` (``upsample.up{s}`` for each of
    ``branch_scales``), ``"up"`` (``upsample.up``) or ``"body"`` (``upsample.body``)."""

    def __init__(self, scale: int = 2, n_feats: int = 64, group: int = 1, efficient: bool = False,
                 layout: str = "up", branch_scales: Sequence[int] = ()) -> None:
        super().__init__()
        self.arch = "CARN-M" if efficient else "CARN"
        self.scale = scale
        self.rgb_range = 1.0
        self.efficient = efficient
        self.sub_mean = ShiftMean(-1)
        self.add_mean = ShiftMean(1)
        self.entry = conv(3, n_feats, 3)
        for k in (1, 2, 3):
            self.add_module(f"b{k}", CascadingBlock(n_feats, efficient, group))
        for k in (1, 2, 3):
            self.add_module(f"c{k}", Fusion(n_feats * (k + 1), n_feats))
        self.upsample: nn.Module
        if layout == "body":
            self.upsample = UpsampleBranch(n_feats, scale, group)
            self.up_path = "upsample"
        else:
            names = {"up": scale} if layout == "up" else {f"up{s}": s for s in branch_scales}
            self.upsample = nn.Module()
            for name, s in names.items():
                self.upsample.add_module(name, UpsampleBranch(n_feats, s, group))
            self.up_path = "upsample.up" if layout == "up" else f"upsample.up{scale}"
        self.exit = conv(n_feats, 3, 3)

    def keep_active_branch(self) -> None:
        """Drop the upsampler branches of the other scales of a multi-scale checkpoint."""
        if self.up_path != "upsample":
            for name in [n for n, _ in self.upsample.named_children()]:
                if f"upsample.{name}" != self.up_path:
                    delattr(self.upsample, name)

    def forward(self, x: Tensor) -> Tensor:
        x = self.entry(self.sub_mean(x))
        out = cascade(x, [self.get_submodule(f"b{k}") for k in (1, 2, 3)],
                      [self.get_submodule(f"c{k}") for k in (1, 2, 3)])
        out = self.exit(self.get_submodule(self.up_path)(out))
        result: Tensor = self.add_mean(out)
        return result

    def feature_blocks(self) -> list[str]:
        return ["b1", "b2", "b3"]

    def adaptive_convs(self) -> list[str]:
        convs = (0, 2, 4) if self.efficient else (0, 2)
        names = []
        for b in self.feature_blocks():
            block = self.get_submodule(b)
            assert isinstance(block, CascadingBlock)
            names += [f"{b}.{r}.body.{i}" for r in dict.fromkeys(block.residual_names())
                      for i in convs]
            names += [f"{b}.c{k}.body.0" for k in (1, 2, 3)]
        return names + [f"c{k}.body.0" for k in (1, 2, 3)]

    def fixed_convs(self) -> list[str]:
        up_body = f"{self.up_path}.body"
        return ["entry", *conv_children(self.get_submodule(up_body), up_body), "exit"]

    def trunk_ends(self) -> list[str]:
        return ["entry"]  # no global residual: the cascade's output goes straight up


class CARNSpec(ArchSpec):
    def __init__(self, efficient: bool) -> None:
        self.efficient = efficient
        self.arch = "CARN-M" if efficient else "CARN"

    def detect(self, sd: StateDict) -> Detected | None:
        if "b1.b1.body.0.weight" not in sd or ("b1.b2.body.0.weight" in sd) == self.efficient:
            return None
        n_feats = int(sd["b1.b1.body.0.weight"].shape[0])
        layout, scales = self._upsampler(sd, n_feats)
        probe = "b1.b1.body.0.weight" if self.efficient else self._first_up_conv(sd, layout)
        group = n_feats // int(sd[probe].shape[1])
        config = (("n_feats", n_feats), ("group", group), ("multi_scale", int(len(scales) > 1)))
        return Detected(self.arch, config, scales, layout)

    @staticmethod
    def _upsampler(sd: StateDict, n_feats: int) -> tuple[str, tuple[int, ...]]:
        branches = indexed_keys(sd, "upsample.up", ".body.0.weight")
        if branches:
            for s in branches:
                if shuffle_scale(stage_convs(sd, f"upsample.up{s}.body."), n_feats) != s:
                    raise ValueError(f"upsample.up{s} does not upscale x{s}")
            return "branches", tuple(branches)
        for layout, prefix in (("up", "upsample.up.body."), ("body", "upsample.body.")):
            if f"{prefix}0.weight" in sd:
                return layout, (shuffle_scale(stage_convs(sd, prefix), n_feats),)
        raise KeyError("no upsampler keys (upsample.up{2,3,4}, upsample.up or upsample.body)")

    @staticmethod
    def _first_up_conv(sd: StateDict, layout: str) -> str:
        if layout == "branches":
            first = indexed_keys(sd, "upsample.up", ".body.0.weight")[0]
            return f"upsample.up{first}.body.0.weight"
        return "upsample.up.body.0.weight" if layout == "up" else "upsample.body.0.weight"

    def default(self) -> Detected:
        config = (("n_feats", 64), ("group", 4 if self.efficient else 1), ("multi_scale", 1))
        return Detected(self.arch, config, (2, 3, 4), "branches")

    def build(self, det: Detected, scale: int) -> SRNet:
        return self._build(det, scale)

    def _build(self, det: Detected, scale: int) -> CARN:
        return CARN(scale, det.as_int("n_feats"), det.as_int("group"), self.efficient,
                    det.layout, det.scales)

    def load(self, sd: StateDict, det: Detected, scale: int) -> SRNet:
        model = self._build(det, scale)
        model.load_state_dict(sd, strict=True)
        model.keep_active_branch()
        return model


CARN_SPEC = CARNSpec(efficient=False)
CARN_M_SPEC = CARNSpec(efficient=True)
