"""Pieces shared by the zoo's architectures: layers, upsamplers, state-dict probes, the spec API.

Every architecture module defines its network (a :class:`~compiler.zoo.base.SRNet`) and one
:class:`ArchSpec` per architecture name; ``detect.py`` walks the specs to recognise a checkpoint.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from compiler.zoo.base import SRNet

StateDict = Mapping[str, Tensor]
ConfigItems = tuple[tuple[str, int | float], ...]

DIV2K_MEAN = (0.4488, 0.4371, 0.4040)
"""RGB mean of DIV2K, used by the MeanShift layers of EDSR-PyTorch and CARN."""


# ----------------------------------------------------------------------------------------- layers


def conv(
    in_ch: int, out_ch: int, kernel: int, *, bias: bool = True, groups: int = 1, stride: int = 1,
    padding: int | None = None,
) -> nn.Conv2d:
    """A Conv2d with 'same' padding (``kernel // 2``) unless ``padding`` is given."""
    pad = kernel // 2 if padding is None else padding
    return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=pad, bias=bias, groups=groups)


def lrelu() -> nn.LeakyReLU:
    """The LeakyReLU(0.05) of IMDN and RFDN."""
    return nn.LeakyReLU(0.05, inplace=True)


class MeanShift(nn.Conv2d):
    """EDSR-PyTorch's MeanShift: a frozen 1x1 conv adding ``sign * rgb_range * mean`` per channel.

    The initial values are the standard ones; a checkpoint's own values replace them on loading.
    MeanShift layers are in neither ``adaptive_convs`` nor ``fixed_convs``.
    """

    def __init__(self, rgb_range: float = 1.0, sign: int = -1,
                 mean: Sequence[float] = DIV2K_MEAN) -> None:
        super().__init__(3, 3, 1)
        with torch.no_grad():
            self.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            assert self.bias is not None
            self.bias.copy_(sign * rgb_range * torch.tensor(list(mean)))
        self.requires_grad_(False)


def rgb_range_of(shift_weight: Tensor, shift_bias: Tensor) -> float:
    """1 or 255: the pixel range a subtracting MeanShift (weight 1/std, bias -range*mean/std) was
    built for. A zero bias (no mean subtraction) says nothing and gives the EDSR default, 255."""
    diag = torch.diagonal(shift_weight.reshape(3, 3).float())
    scaled_mean = (-shift_bias.float() / diag).mean().item()  # = range * mean(DIV2K_MEAN)
    ratio = scaled_mean / (sum(DIV2K_MEAN) / 3)
    return 1.0 if 0.2 < ratio < 5.0 else 255.0


def shuffle_factors(scale: int) -> list[int]:
    """The PixelShuffle factors of an upsampler: [3] for x3, [2] * log2(scale) for x2, x4, x8."""
    if scale == 3:
        return [3]
    if scale in (2, 4, 8):
        return [2] * (scale.bit_length() - 1)
    raise ValueError(f"unsupported scale x{scale} (supported: 2, 3, 4, 8)")


def pixel_shuffle_upsampler(
    in_ch: int, mid_ch: int, scale: int, *, kernel: int = 3, bias: bool = True, groups: int = 1,
    act: Callable[[], nn.Module] | None = None, act_before_shuffle: bool = False,
) -> nn.Sequential:
    """One ``conv -> PixelShuffle(r)`` stage per factor of ``scale``, with an optional activation
    after the shuffle (SRResNet) or between conv and shuffle (CARN, ``act_before_shuffle``).

    The first conv maps ``in_ch`` to ``mid_ch * r * r``; later ones map ``mid_ch`` likewise."""
    layers: list[nn.Module] = []
    for i, r in enumerate(shuffle_factors(scale)):
        layers.append(conv(in_ch if i == 0 else mid_ch, mid_ch * r * r, kernel, bias=bias,
                           groups=groups))
        stage = [nn.PixelShuffle(r)] if act is None else [nn.PixelShuffle(r), act()]
        layers.extend(reversed(stage) if act_before_shuffle else stage)
    return nn.Sequential(*layers)


def conv_children(seq: nn.Module, prefix: str) -> list[str]:
    """Qualified names (``prefix.i``) of the Conv2d children of ``seq``."""
    return [f"{prefix}.{name}" for name, m in seq.named_children() if isinstance(m, nn.Conv2d)]


# --------------------------------------------------------------------------- state-dict probes


def count_indexed(sd: StateDict, prefix: str, suffix: str, start: int = 0) -> int:
    """How many consecutive ``prefix{i}suffix`` keys exist, for i = start, start+1, ..."""
    n = 0
    while f"{prefix}{start + n}{suffix}" in sd:
        n += 1
    return n


def indexed_keys(sd: StateDict, prefix: str, suffix: str) -> list[int]:
    """The sorted indices i of every ``prefix{i}suffix`` key."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(suffix))
    return sorted(int(m.group(1)) for k in sd if (m := pattern.fullmatch(k)))


def shuffle_scale(out_channels: Sequence[int], mid_ch: int) -> int:
    """The scale of a chain of ``conv -> PixelShuffle(r)`` stages from the convs' output channels
    (``mid_ch * r * r`` each)."""
    factors = [round((out / mid_ch) ** 0.5) for out in out_channels]
    scale = 1
    for r in factors:
        scale *= r
    if scale not in (2, 3, 4, 8) or shuffle_factors(scale) != factors or [
            mid_ch * r * r for r in factors] != list(out_channels):
        raise ValueError(f"upsampler convs with {list(out_channels)} outputs form no "
                         f"PixelShuffle chain of {mid_ch} channels")
    return scale


def stage_convs(sd: StateDict, prefix: str) -> list[int]:
    """Output channels of the 4-D ``prefix{i}.weight`` tensors (the convs of a Sequential whose
    other children may hold 1-D PReLU weights), in index order."""
    out = []
    for i in indexed_keys(sd, prefix, ".weight"):
        weight = sd[f"{prefix}{i}.weight"]
        if weight.ndim == 4:
            out.append(int(weight.shape[0]))
    return out


# ------------------------------------------------------------------------------------ spec API


@dataclass(frozen=True)
class Detected:
    """What a spec read from a state dict: its configuration and the scales it can run."""

    arch: str
    config: ConfigItems
    scales: tuple[int, ...]
    layout: str = ""
    """An internal layout variant (e.g. the key layout of CARN's upsampler); not reported."""

    def get(self, key: str) -> int | float:
        return dict(self.config)[key]

    def as_int(self, key: str) -> int:
        return int(self.get(key))


class ArchSpec(ABC):
    """How to recognise, build and load one architecture."""

    arch: str

    @abstractmethod
    def detect(self, sd: StateDict) -> Detected | None:
        """The configuration the state dict implies, or None when its signature keys are absent.
        May raise KeyError / ValueError / IndexError when the layout is incomplete or odd."""

    @abstractmethod
    def default(self) -> Detected:
        """The official configuration, to measure how close a foreign state dict is."""

    @abstractmethod
    def build(self, det: Detected, scale: int) -> SRNet:
        """A freshly initialised network for ``det`` at ``scale`` (one of ``det.scales``)."""

    def expected_keys(self, det: Detected) -> set[str]:
        """The state-dict keys a checkpoint of ``det`` has (built on the meta device: no memory)."""
        with torch.device("meta"):
            model = self.build(det, det.scales[0])
        return set(model.state_dict())

    def load(self, sd: StateDict, det: Detected, scale: int) -> SRNet:
        """Build the network and load ``sd`` strictly (RuntimeError on any shape mismatch)."""
        model = self.build(det, scale)
        model.load_state_dict(sd, strict=True)
        return model


# ------------------------------------------------------------------------- distillation nets


class DistillationNet(SRNet):
    """The IMDN / RFDN skeleton: ``fea_conv``, blocks ``{prefix}1..N``, 1x1 fusion ``c`` (with
    LeakyReLU 0.05), ``LR_conv`` plus a global residual, and a one-conv PixelShuffle upsampler.

    Input is taken on ``rgb_range`` (1 for IMDN, 255 for RFDN) with no mean shift."""

    block_prefix: str = ""
    block_convs: tuple[str, ...] = ()
    """The conv children of a block that are adaptive (the rest are documented exceptions)."""

    def __init__(self, nf: int, num_modules: int, scale: int, rgb_range: float,
                 make_block: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.scale = scale
        self.rgb_range = rgb_range
        self.num_modules = num_modules
        self.fea_conv = conv(3, nf, 3)
        for k in range(1, num_modules + 1):
            self.add_module(f"{self.block_prefix}{k}", make_block(nf))
        self.c = nn.Sequential(conv(nf * num_modules, nf, 1), lrelu())
        self.LR_conv = conv(nf, nf, 3)
        self.upsampler = nn.Sequential(conv(nf, 3 * scale * scale, 3), nn.PixelShuffle(scale))

    def forward(self, x: Tensor) -> Tensor:
        out_fea = self.fea_conv(x * self.rgb_range)
        outs, out = [], out_fea
        for name in self.feature_blocks():
            out = self.get_submodule(name)(out)
            outs.append(out)
        out_lr = self.LR_conv(self.c(torch.cat(outs, dim=1))) + out_fea
        result: Tensor = self.upsampler(out_lr)
        return result / self.rgb_range

    def feature_blocks(self) -> list[str]:
        return [f"{self.block_prefix}{k}" for k in range(1, self.num_modules + 1)]

    def adaptive_convs(self) -> list[str]:
        return [f"{b}.{c}" for b in self.feature_blocks() for c in self.block_convs]

    def fixed_convs(self) -> list[str]:
        return ["fea_conv", "c.0", "LR_conv", "upsampler.0"]

    def trunk_ends(self) -> list[str]:
        return ["fea_conv", "LR_conv"]


def detect_distillation(sd: StateDict, arch: str, prefix: str, probe: str) -> Detected | None:
    """Config of an IMDN/RFDN-style state dict: blocks ``{prefix}{k}.{probe}``, k = 1, 2, ...,
    where ``probe`` is the weight of a conv taking the block's nf input channels."""
    if f"{prefix}1.{probe}" not in sd:
        return None
    nf = int(sd[f"{prefix}1.{probe}"].shape[1])
    num_modules = count_indexed(sd, prefix, f".{probe}", start=1)
    up_out = int(sd["upsampler.0.weight"].shape[0])
    scale = round((up_out / 3) ** 0.5)
    if 3 * scale * scale != up_out:
        raise ValueError(f"upsampler.0 has {up_out} outputs, not 3 * scale^2")
    return Detected(arch, (("nf", nf), ("num_modules", num_modules)), (scale,))
