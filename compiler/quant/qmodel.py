"""The quantized network: a zoo model whose selected convs quantize their input and weights.

``QuantizedSR`` replaces the model's adaptive convs (and, in the fully quantized setting, its
fixed convs at 8 bits) by ``QConv2d``. Per forward pass it computes each sample's image offset
from the input's complexity; each adaptive conv then runs at ``base + d_img + d_layer``.
CADyQ (``cadyq``) instead gives each adaptive conv a bit selector that picks its bits per sample
from the image gradients and the conv's input (``compiler.quant.cadyq``).
Non-adaptive methods (DDTB, static PTQ) run every adaptive conv at ``base``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compiler.quant.bitmap import ImageToBit, LayerToBit, complexity, gradient_features
from compiler.quant.cadyq import BitSelector, candidate_bits, selector_features
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

# every method a bundle takes (runtime.manifest.METHODS) calibrates and simulates; CADyQ deploys
# through its clustered configurations (compiler.quant.clusters)
CALIBRATION_METHODS = METHODS
FIXED_BITS = 8  # head / upsampler / tail in the fully quantized setting
PER_CHANNEL_BITS = 4  # default weight granularity: per channel at this many bits or fewer
FORWARD_CHUNK = 16  # patches per no-grad forward pass over a calibration set
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
        if self.selector and self.abits - self.image_step < QUANT_BITS[0]:
            raise ConfigError(f"--abits {self.abits} is too low for cadyq: its lowest candidate "
                              f"is abits - {self.image_step}; allowed "
                              f"{QUANT_BITS[0] + self.image_step}..{QUANT_BITS[1]}")

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
    def selector(self) -> bool:
        """Bits chosen per patch and per layer by a trained selector (CADyQ)."""
        return self.method == "cadyq"

    @property
    def dynamic(self) -> bool:
        """Bits that vary per patch: the bit loss and the bit mapping's training apply."""
        return self.adaptive or self.selector

    @property
    def image_step(self) -> int:
        """Bits between neighbouring image classes: Granular-DQ's coarse classes are
        base - 2 / base / base + 2 (4 / 6 / 8 at base 6), AdaBM's base -1 / 0 / +1; CADyQ's
        candidates are base - 2 / base / base + 2 (the paper's 4 / 6 / 8)."""
        return 2 if self.method in ("granular", "cadyq") else 1



@dataclass
class BitContext:
    """Per-forward state shared by the QConvs of one network (not a module, holds no weights)."""

    base: float = 6.0
    step: float = 1.0  # bits per image class (QuantSettings.image_step)
    enabled: bool = True
    d_img: Tensor = field(default_factory=lambda: torch.zeros(1))
    d_layer: Tensor = field(default_factory=lambda: torch.zeros(0))
    gradients: Tensor = field(default_factory=lambda: torch.zeros(1, 2))  # CADyQ: [N, 2]
    class_bits: Tensor | None = None  # routed: bits [image class -1/0/+1, adaptive layer]


class QConv2d(nn.Module):
    """A conv whose input activation and weights are fake-quantized."""

    def __init__(self, conv: nn.Conv2d, context: BitContext, wbits: int, per_channel: bool,
                 symmetric: bool, layer_index: int | None) -> None:
        super().__init__()
        self.conv = conv
        self.weight_quant = WeightQuantizer(conv.weight.detach(), wbits, per_channel)
        self.act_quant = ActQuantizer(symmetric)
        self.gate: DynamicGate | None = None
        self.selector: BitSelector | None = None  # CADyQ: bits per sample from this input
        self.chosen_bits: Tensor | None = None  # the selector's bits of the last forward ([N])
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
        if self.selector is not None and self.chosen_bits is not None:
            return self.chosen_bits
        if ctx.class_bits is not None:
            return ctx.class_bits[ctx.d_img.round().long() + 1, self.layer_index]
        return ctx.base + ctx.step * ctx.d_img + ctx.d_layer[self.layer_index]

    def forward(self, x: Tensor) -> Tensor:
        conv = self.conv
        if not self.context.enabled:
            return conv(x)
        gate = self.gate(x) if self.gate is not None else None
        if self.selector is not None and self.forced_bits is None:
            xq = self._select_and_quantize(x)
        else:
            xq = self.act_quant(x, self.bits(x.shape[0]), gate)
        wq = self.weight_quant(conv.weight)
        bias = conv.bias
        if self.integer_bias and bias is not None and gate is None:
            bias = self._lattice_bias(bias, x.shape[0])
        y = F.conv2d(xq, wq, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return self.requantize(y)

    def _select_and_quantize(self, x: Tensor) -> Tensor:
        """CADyQ: the input quantized at the selector's bits per sample (the hard choice).

        In training the selector learns through the softmax-weighted mixture of the candidates'
        quantizations (its probabilities' gradient, the quantizations held fixed), while the
        activation bounds and the input learn through the chosen candidate only, as AdaBM's do
        at a sample's bits. Through the mixture, the bounds of a 4-bit base were pulled toward
        what the 2-bit candidate needs (EDSR x2 W4A4 seed 0, every selector then forced to the
        base, ad hoc: Set5 -0.340 dB trained through the mixture, -0.288 through the choice)."""
        assert self.selector is not None
        bits, probs, _ = self.selector(selector_features(self.context.gradients, x))
        self.chosen_bits = bits
        hard = self.act_quant(x, bits.detach())
        if not (self.training and torch.is_grad_enabled() and probs.requires_grad):
            return hard
        with torch.no_grad():
            quantized = torch.stack([self.act_quant(x, b) for b in self.selector.candidates],
                                    dim=1)
        shape = (*probs.shape, *([1] * (x.dim() - 1)))
        soft = (probs.reshape(shape) * quantized).sum(dim=1)
        return hard + (soft - soft.detach())

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
        # CADyQ's clustered deployment as record JSON ("bit_vectors", "clusters"), carried from
        # and back to its record (compiler.quant.clusters); None before clustering
        self.deployment: dict[str, Any] | None = None
        for index, name in enumerate(self.adaptive_names):
            conv = model.get_submodule(name)
            if not isinstance(conv, nn.Conv2d):
                kind = type(conv).__name__
                raise ConfigError(f"adaptive layer {name!r} is a {kind}, not a Conv2d")
            qconv = QConv2d(conv, self.context, settings.wbits,
                            settings.weights_per_channel(settings.wbits), settings.symmetric,
                            index)
            if settings.selector:
                qconv.selector = BitSelector(conv.in_channels,
                                             candidate_bits(settings.abits, settings.image_step))
            _replace(model, name, qconv)
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

    @property
    def routed(self) -> bool:
        """Whether the image class picks each layer's bits from ``route``'s table."""
        return self.context.class_bits is not None

    def route(self, vectors: Mapping[int, Sequence[float]]) -> None:
        """Run as a deployed bundle does: the image class (``image_to_bit`` on the complexity)
        picks one per-layer bit vector out of ``vectors`` (image offset -> bits per adaptive
        layer), in place of the selectors, which are dropped (CADyQ's clustered configurations,
        ``compiler.quant.clusters``)."""
        table = torch.tensor([[float(b) for b in vectors[d]] for d in (-1, 0, 1)])
        if table.shape[1] != len(self.adaptive_names):
            raise ConfigError(f"routed bit vectors of {table.shape[1]} layers for a network of "
                              f"{len(self.adaptive_names)} adaptive layers")
        self.context.class_bits = table
        for _, conv in self.qconvs():
            conv.selector, conv.chosen_bits = None, None

    @contextmanager
    def selectors_at(self, bits: float | None) -> Iterator[None]:
        """Every CADyQ selector's layer at ``bits`` inside the ``with`` block (None: each as its
        selector picks); as it was afterwards."""
        convs = [conv for _, conv in self.qconvs() if conv.selector is not None]
        kept = [conv.forced_bits for conv in convs]
        for conv in convs if bits is not None else []:
            conv.forced_bits = bits
        try:
            yield
        finally:
            for conv, forced in zip(convs, kept, strict=True):
                conv.forced_bits = forced

    def image_offsets(self, x: Tensor) -> Tensor:
        """``d_img`` per sample (differentiable surrogate) for an NCHW batch in [0, 1]."""
        if not (self.settings.adaptive or self.routed):
            return torch.zeros(x.shape[0], dtype=x.dtype)
        if self.forced_d_img is not None:
            return torch.full((x.shape[0],), float(self.forced_d_img), dtype=x.dtype)
        return self.image_to_bit(complexity(x))

    def hard_layer_offsets(self) -> list[int]:
        """``d_layer`` of each adaptive layer (all 0 without a layer mapping)."""
        if not self.settings.layer_mapping:
            return [0] * len(self.adaptive_names)
        return self.layer_to_bit.hard()

    def layer_offsets(self) -> Tensor:
        if not self.settings.layer_mapping:
            return torch.zeros(len(self.adaptive_names))
        return self.layer_to_bit()

    def sample_bits(self) -> Tensor:
        """Average activation bits over the adaptive layers, per sample of the last forward."""
        ctx = self.context
        if self.routed or self.settings.selector:  # bits per layer and per sample
            batch = ctx.d_img.shape[0] if self.routed else ctx.gradients.shape[0]
            return torch.stack([conv.bits(batch) for _, conv in self.qconvs()
                                if conv.layer_index is not None]).mean(dim=0)
        return ctx.base + ctx.step * ctx.d_img + ctx.d_layer.mean()

    def forward(self, x: Tensor) -> Tensor:
        ctx = self.context
        ctx.d_img = self.image_offsets(x)
        ctx.d_layer = self.layer_offsets()
        if self.settings.selector:
            ctx.gradients = gradient_features(x)
        return self.model(x)

    def forward_chunked(self, patches: Tensor) -> Tensor:
        """The outputs of ``patches``, ``FORWARD_CHUNK`` at a time, without gradients."""
        with torch.no_grad():
            return torch.cat([self(chunk) for chunk in patches.split(FORWARD_CHUNK)])

    def bit_vectors(self) -> dict[int, list[float]]:
        """Per-layer activation bits of the adaptive layers for each image offset (-1, 0, +1);
        for CADyQ each layer's low / base / high candidate (its selector picks per sample)."""
        base, step = float(self.settings.abits), self.settings.image_step
        offsets = self.hard_layer_offsets()
        d_imgs = (-1, 0, 1) if self.settings.dynamic else (0,)
        return {d: [base + step * d + o for o in offsets] for d in d_imgs}
