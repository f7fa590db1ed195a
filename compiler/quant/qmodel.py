"""The quantized network: a zoo model whose selected convs quantize their input and weights.

``QuantizedSR`` replaces the model's adaptive convs (and, in the fully quantized setting, its
fixed convs at 8 bits) by ``QConv2d``. Per forward pass it computes each sample's image offset
from the input's complexity; each adaptive conv then runs at ``base + d_img + d_layer``.
Non-adaptive methods (DDTB, static PTQ) run every adaptive conv at ``base``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compiler.quant.bitmap import ImageToBit, LayerToBit, complexity
from compiler.quant.ddtb import DynamicGate
from compiler.quant.quantizers import (
    MAX_INT_BITS,
    ActQuantizer,
    WeightQuantizer,
    quantize_asymmetric,
    quantize_symmetric,
)
from compiler.zoo.base import SRNet
from runtime.errors import ConfigError, unknown_name
from runtime.manifest import METHODS, QUANT_BITS

# Granular-DQ calibrates and simulates; bundles (runtime.manifest.METHODS) do not take it yet
CALIBRATION_METHODS = (*METHODS, "granular")
FIXED_BITS = 8  # head / upsampler / tail in the fully quantized setting
PER_CHANNEL_BITS = 4  # default weight granularity: per channel at this many bits or fewer
OUTPUT_BITS = 8  # an engine's requantized conv outputs (simulated only for engine parity)


@dataclass(frozen=True)
class QuantSettings:
    """What to quantize and how; recorded verbatim in the calibration record."""

    method: str = "adabm"
    wbits: int = 8
    abits: int = 6
    fq: bool = False
    per_channel: bool | None = None  # None: per output channel at <= 4 weight bits, else per tensor
    symmetric: bool = False  # symmetric activation grids [-a, a] instead of learned [l, u]

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ConfigError(unknown_name("quantization method", self.method,
                                           CALIBRATION_METHODS))
        for name, bits in (("wbits", self.wbits), ("abits", self.abits)):
            if not QUANT_BITS[0] <= bits <= QUANT_BITS[1]:
                raise ConfigError(f"--{name} {bits} is out of range: allowed "
                                  f"{QUANT_BITS[0]}..{QUANT_BITS[1]}")

    def weights_per_channel(self, bits: int) -> bool:
        """Weight clips per output channel for a layer with ``bits``-bit weights: as set, or by
        default at <= 4 bits (EDSR x2 W4A4, Set5: per-tensor -0.462 dB, per-channel -0.317 dB,
        AdaBM); at 8 bits per-channel changes nothing measurable (W8A6 Set14: -0.069 vs -0.066)
        and the fixed 8-bit layers of ``fq`` stay per tensor."""
        return self.per_channel if self.per_channel is not None else bits <= PER_CHANNEL_BITS

    @property
    def adaptive(self) -> bool:
        """Bits chosen per patch from its complexity (AdaBM, Granular-DQ)."""
        return self.method in ("adabm", "granular")

    @property
    def layer_mapping(self) -> bool:
        """Per-layer offsets (AdaBM); Granular-DQ gives every layer the patch's bits."""
        return self.method == "adabm"

    @property
    def image_step(self) -> int:
        """Bits between neighbouring image classes: Granular-DQ's coarse classes are
        base - 2 / base / base + 2 (4 / 6 / 8 at base 6), AdaBM's base -1 / 0 / +1."""
        return 2 if self.method == "granular" else 1



@dataclass
class BitContext:
    """Per-forward state shared by the QConvs of one network (not a module, holds no weights)."""

    base: float = 6.0
    step: float = 1.0  # bits per image class (QuantSettings.image_step)
    enabled: bool = True
    d_img: Tensor = field(default_factory=lambda: torch.zeros(1))
    d_layer: Tensor = field(default_factory=lambda: torch.zeros(0))


class QConv2d(nn.Module):
    """A conv whose input activation and weights are fake-quantized."""

    def __init__(self, conv: nn.Conv2d, context: BitContext, wbits: int, per_channel: bool,
                 symmetric: bool, layer_index: int | None) -> None:
        super().__init__()
        self.conv = conv
        self.weight_quant = WeightQuantizer(conv.weight.detach(), wbits, per_channel)
        self.act_quant = ActQuantizer(symmetric)
        self.gate: DynamicGate | None = None
        self.layer_index = layer_index  # None: a fixed (8-bit) layer
        self.output_range: tuple[float, float] | None = None  # FP output min/max (calibration)
        self.input_range: tuple[float, float] | None = None  # FP input min/max (calibration)
        self.gate_mean: tuple[float, ...] | None = None  # DDTB: mean (scale_l, scale_u)
        self.forced_bits: float | None = None  # simulate one engine's per-layer bits (> 8: float)
        self.output_bounds: tuple[float, float] | None = None  # an engine's 8-bit output requant
        self.output_symmetric = False  # ... on [-a, a], a = max(|lo|, |hi|) (TensorRT dialect)
        self.integer_bias = False  # an engine's int32 bias on the s_x * s_w lattice (parity)
        self._context = [context]  # in a list so nn.Module does not register it

    @property
    def context(self) -> BitContext:
        return self._context[0]

    def bits(self, batch: int) -> Tensor:
        ctx = self.context
        if self.forced_bits is not None:
            return torch.full((batch,), float(self.forced_bits))
        if self.layer_index is None:
            return torch.full((batch,), float(FIXED_BITS))
        return ctx.base + ctx.step * ctx.d_img + ctx.d_layer[self.layer_index]

    def forward(self, x: Tensor) -> Tensor:
        conv = self.conv
        if not self.context.enabled:
            return conv(x)
        gate = self.gate(x) if self.gate is not None else None
        xq = self.act_quant(x, self.bits(x.shape[0]), gate)
        wq = self.weight_quant(conv.weight)
        bias = conv.bias
        if self.integer_bias and bias is not None and gate is None:
            bias = self._lattice_bias(bias, x.shape[0])
        y = F.conv2d(xq, wq, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return self.requantize(y)

    def requantize(self, y: Tensor) -> Tensor:
        """An engine's 8-bit requantization of the conv's output (``output_bounds``), if any."""
        if self.output_bounds is None:
            return y
        lower, upper = self.output_bounds
        bits = torch.tensor(float(OUTPUT_BITS))
        if self.output_symmetric:
            return quantize_symmetric(y, torch.tensor(max(abs(lower), abs(upper))), bits)
        return quantize_asymmetric(y, torch.tensor(lower), torch.tensor(upper), bits)


    def _lattice_bias(self, bias: Tensor, batch: int) -> Tensor:
        """The bias as QLinearConv adds it: int32 multiples of ``s_x * s_w`` (half to even).

        Only for a quantized input at one bit-width per batch (engine parity simulations)."""
        bits = self.bits(batch)
        if bool((bits > MAX_INT_BITS).any()) or bool((bits != bits[0]).any()):
            return bias
        b = float(bits[0])
        lower, upper = self.act_quant.lower, self.act_quant.upper
        if self.act_quant.symmetric:
            step = torch.maximum(lower.abs(), upper.abs()).clamp_min(1e-6) / (2 ** (b - 1) - 1)
        else:
            step = (upper - lower).clamp_min(1e-6) / (2 ** b - 1)
        wq = self.weight_quant
        scale = step * wq.clip.reshape(-1) / (2 ** (wq.bits - 1) - 1)
        return torch.round(bias / scale) * scale


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class QuantizedSR(nn.Module):
    """A zoo network with AdaBM / DDTB / static quantization of its convs."""

    def __init__(self, model: SRNet, settings: QuantSettings) -> None:
        super().__init__()
        self.settings = settings
        self.context = BitContext(base=float(settings.abits), step=float(settings.image_step))
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.adaptive_names = list(model.adaptive_convs())
        self.fixed_names = list(model.fixed_convs()) if settings.fq else []
        self.image_to_bit = ImageToBit()
        self.layer_to_bit = LayerToBit(len(self.adaptive_names))
        self.forced_d_img: int | None = None
        for index, name in enumerate(self.adaptive_names):
            conv = model.get_submodule(name)
            if not isinstance(conv, nn.Conv2d):
                kind = type(conv).__name__
                raise ConfigError(f"adaptive layer {name!r} is a {kind}, not a Conv2d")
            _replace(model, name, QConv2d(conv, self.context, settings.wbits,
                                          settings.weights_per_channel(settings.wbits),
                                          settings.symmetric, index))
        for name in self.fixed_names:
            conv = model.get_submodule(name)
            _replace(model, name, QConv2d(conv, self.context, FIXED_BITS,
                                          settings.weights_per_channel(FIXED_BITS),
                                          settings.symmetric, None))

    @property
    def scale(self) -> int:
        return int(self.model.scale)

    def qconvs(self) -> list[tuple[str, QConv2d]]:
        """Every quantized conv, adaptive ones first, in layer-index order."""
        out = []
        for name in self.adaptive_names + self.fixed_names:
            module = self.model.get_submodule(name)
            assert isinstance(module, QConv2d)
            out.append((name, module))
        return out

    def image_offsets(self, x: Tensor) -> Tensor:
        """``d_img`` per sample (differentiable surrogate) for an NCHW batch in [0, 1]."""
        if not self.settings.adaptive:
            return torch.zeros(x.shape[0], dtype=x.dtype)
        if self.forced_d_img is not None:
            return torch.full((x.shape[0],), float(self.forced_d_img), dtype=x.dtype)
        return self.image_to_bit(complexity(x))

    def layer_offsets(self) -> Tensor:
        if not self.settings.layer_mapping:
            return torch.zeros(len(self.adaptive_names))
        return self.layer_to_bit()

    def sample_bits(self) -> Tensor:
        """Average activation bits over the adaptive layers, per sample of the last forward."""
        ctx = self.context
        return ctx.base + ctx.step * ctx.d_img + ctx.d_layer.mean()

    def forward(self, x: Tensor) -> Tensor:
        ctx = self.context
        ctx.d_img = self.image_offsets(x)
        ctx.d_layer = self.layer_offsets()
        return self.model(x)

    def bit_vectors(self) -> dict[int, list[float]]:
        """Per-layer activation bits of the adaptive layers for each image offset (-1, 0, +1)."""
        base, step = float(self.settings.abits), self.settings.image_step
        offsets = self.layer_to_bit.hard() if self.settings.layer_mapping else [0] * len(
            self.adaptive_names)
        d_imgs = (-1, 0, 1) if self.settings.adaptive else (0,)
        return {d: [base + step * d + o for o in offsets] for d in d_imgs}
