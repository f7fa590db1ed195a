"""Fake-quantizers with straight-through rounding.

Grids are the ones integer kernels can run exactly:

- weights: symmetric, ``2^(b-1) - 1`` levels each side of zero (INT8 = [-127, 127]), one clip
  ``u_w`` per tensor (as in AdaBM) or per output channel;
- activations, asymmetric (AdaBM, DDTB): learnable bounds ``[l, u]``, step ``(u - l) / (2^b - 1)``
  and a **zero-anchored** grid (integer zero-point ``round(-l / step)``, as in DDTB's formula and
  in integer kernels). AdaBM's paper anchors the grid at ``l`` instead; anchoring at zero moves it
  by under half a step and makes it exactly a uint8 QuantizeLinear, so lowering is exact;
- activations, symmetric: ``[-a, a]`` with ``2^(b-1) - 1`` levels each side.

Bits may differ per sample: ``bits`` is a float tensor of shape ``[N]`` (or a scalar). Any sample
whose bit-width is above 8 passes through unquantized (float): lowering relies on that.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

FLOAT_BITS = 32.0  # bit-width used to mean "not quantized"
MAX_INT_BITS = 8


def round_ste(x: Tensor) -> Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def _per_sample(bits: Tensor, like: Tensor) -> Tensor:
    """Broadcast per-sample bits ``[N]`` (or a scalar) against an NCHW tensor."""
    if bits.dim() == 0:
        return bits
    return bits.reshape(-1, *([1] * (like.dim() - 1)))


def quantize_weight(w: Tensor, clip: Tensor, bits: int) -> Tensor:
    """Symmetric fake-quant of a weight tensor with clip ``[-clip, clip]`` (per tensor/channel).

    ``q = clamp(round(w / step), -L, L) * step`` with ``L = 2^(b-1) - 1``, ``step = clip / L``:
    exactly an int8 QuantizeLinear/DequantizeLinear pair with scale ``step``.
    """
    levels = 2 ** (bits - 1) - 1
    clip = clip.reshape(-1, *([1] * (w.dim() - 1))) if clip.dim() == 1 else clip
    step = clip / levels
    clipped = torch.minimum(torch.maximum(w, -clip), clip)
    return torch.clamp(round_ste(clipped / step), -levels, levels) * step


def search_weight_clip(w: Tensor, bits: int, per_channel: bool, candidates: int = 50) -> Tensor:
    """MSE-searched clip: start at max|w|, try ``max * (1 - 0.01 i)``, keep the lowest error."""
    with torch.no_grad():
        if per_channel:
            top = w.abs().flatten(1).amax(dim=1).clamp_min(1e-8)
        else:
            top = w.abs().max().clamp_min(1e-8)
        best, best_err = top.clone(), torch.full_like(top, float("inf"))
        for i in range(candidates):
            clip = top * (1 - 0.01 * i)
            err = (quantize_weight(w, clip, bits) - w).pow(2)
            err = err.flatten(1).mean(dim=1) if per_channel else err.mean()
            better = err < best_err
            best = torch.where(better, clip, best)
            best_err = torch.where(better, err, best_err)
    return best


def quantize_asymmetric(x: Tensor, lower: Tensor, upper: Tensor, bits: Tensor) -> Tensor:
    """Zero-anchored asymmetric fake-quant on ``[lower, upper]`` with per-sample ``bits``.

    ``step = (u - l) / (2^b - 1)``, zero-point ``zp = round(-l / step)``,
    ``q = clamp(round(x / step), -zp, 2^b - 1 - zp)``, result ``q * step``: exactly a uint8
    QuantizeLinear (scale ``step``, zero-point ``zp``) preceded by a Clip, then DequantizeLinear.
    Gradients reach ``l`` and ``u`` through the step and (straight-through) the zero-point.
    ``lower`` / ``upper`` are scalars or per-sample ``[N]`` tensors (DDTB's gate scales them).
    """
    bits_b = _per_sample(bits, x)
    lower_b = _per_sample(lower, x)
    upper_b = _per_sample(upper, x)
    top = torch.pow(2.0, bits_b) - 1
    step = (upper_b - lower_b).clamp_min(1e-6) / top
    zero_point = round_ste(-lower_b / step)
    q = torch.minimum(torch.maximum(round_ste(x / step), -zero_point), top - zero_point)
    quantized = q * step
    if bool((bits > MAX_INT_BITS).any()):
        quantized = torch.where(bits_b > MAX_INT_BITS, x, quantized)
    return quantized


def quantize_symmetric(x: Tensor, alpha: Tensor, bits: Tensor) -> Tensor:
    """Symmetric fake-quant on ``[-alpha, alpha]`` (``2^(b-1) - 1`` levels each side)."""
    bits_b = _per_sample(bits, x)
    levels = torch.pow(2.0, bits_b - 1) - 1
    step = alpha.clamp_min(1e-6) / levels
    q = torch.minimum(torch.maximum(round_ste(x / step), -levels), levels)
    quantized = q * step
    if bool((bits > MAX_INT_BITS).any()):
        quantized = torch.where(bits_b > MAX_INT_BITS, x, quantized)
    return quantized


class WeightQuantizer(nn.Module):
    """Fixed bit-width symmetric weight quantizer with a learnable clip."""

    def __init__(self, weight: Tensor, bits: int, per_channel: bool = False) -> None:
        super().__init__()
        self.bits = bits
        self.per_channel = per_channel
        init = search_weight_clip(weight.detach(), bits, per_channel)
        self.clip = nn.Parameter(init.clone())
        # Bounds that guard against the known clip divergence: never above max|w|, never below
        # a tenth of the searched clip.
        top = weight.detach().abs().flatten(1).amax(dim=1) if per_channel else weight.abs().max()
        self.register_buffer("clip_max", top.clone().detach())
        self.register_buffer("clip_min", init.clone().detach() * 0.1)

    def forward(self, w: Tensor) -> Tensor:
        if self.bits > MAX_INT_BITS:
            return w
        return quantize_weight(w, self.clip, self.bits)

    def bound_(self) -> None:
        """Project the clip back into its allowed range (called after each optimizer step)."""
        with torch.no_grad():
            self.clip.copy_(torch.minimum(torch.maximum(self.clip, self.clip_min), self.clip_max))


class ActQuantizer(nn.Module):
    """Activation quantizer with trainable bounds: asymmetric ``[l, u]`` or symmetric."""

    def __init__(self, symmetric: bool = False) -> None:
        super().__init__()
        self.symmetric = symmetric
        self.lower = nn.Parameter(torch.tensor(0.0))
        self.upper = nn.Parameter(torch.tensor(1.0))

    def set_bounds(self, lower: float, upper: float) -> None:
        with torch.no_grad():
            if self.symmetric:
                alpha = max(abs(lower), abs(upper), 1e-6)
                lower, upper = -alpha, alpha
            self.lower.fill_(lower)
            self.upper.fill_(max(upper, lower + 1e-6))

    def forward(self, x: Tensor, bits: Tensor, gate: Tensor | None = None) -> Tensor:
        """Quantize ``x`` at per-sample ``bits``; ``gate`` ([N, 2]) scales (l, u) per sample."""
        lower, upper = self.lower, self.upper
        if gate is not None:
            lower, upper = lower * gate[:, 0], upper * gate[:, 1]
        if self.symmetric:
            return quantize_symmetric(x, torch.maximum(upper.abs(), lower.abs()), bits)
        return quantize_asymmetric(x, lower, upper, bits)

    def quantization_error(self, x: Tensor, bits: float, factor: float) -> float:
        """MSE of quantizing ``x`` with both bounds scaled by ``factor`` (bit-aware clipping)."""
        with torch.no_grad():
            b = torch.tensor(float(bits))
            lower, upper = self.lower * factor, self.upper * factor
            if self.symmetric:
                q = quantize_symmetric(x, torch.maximum(upper.abs(), lower.abs()), b)
            else:
                q = quantize_asymmetric(x, lower, upper, b)
            return float((q - x).pow(2).mean())
