"""The simulated PyTorch network of one bundle engine, for parity checks of real engines.

An engine's manifest entry fixes every layer's kernel precision and emulated grids; the
simulation of that engine is the record's quantized network with exactly those bits forced per
layer (``QConv2d.forced_bits``; a float layer is > 8 bits, i.e. not quantized) and its weight grid
widths, or the full-precision network for the reference engine. Where the ONNX Runtime lowering
requantized a conv output to 8 bits for speed (placement ``8-bit output range`` in the engine's
lowering summary), the simulation quantizes that output the same way (``QConv2d.output_bounds``:
the calibrated range widened to contain 0, ``[0, hi]`` when a ReLU was folded; symmetric on
``max(|lo|, |hi|)`` in the TensorRT dialect), its bias on the int32 lattice where a Q follows the
conv (ONNX Runtime quantizes the bias of those only; the TensorRT dialect keeps every bias float,
as TensorRT and the unoptimized graph add it), and residual streams
quantized where they are made (``stream_bounds``: every reader of the stream, the skip path too,
takes the values on the 8-bit grid of the conv it feeds): the engine's
arithmetic, which the papers' simulation does not have. ``benchmarks/bundle_parity.py`` reports
both. ``PSNR(engine, simulation)`` then
measures only what the lowering and the integer kernels change.

Engines of the ORT dialect that record their conv arithmetic (``integer_conv`` in the summary)
are simulated exactly (:class:`IntegerConv2d`: integer accumulation, QLinearConv's
requantization, a truncated input grid's cut levels; the zoo's ``fp64_statistics``): a
quantized network amplifies any rounding difference into a drift of many levels, so a
simulation that rounds like the engine except in FP32 sums is not close, it is 37-43 dB off
(IMDN x4, Set5).

TensorRT-dialect engines that record ``integer_conv`` are simulated as exactly
(:class:`TensorRTConv2d`: the input Q's Mul by ``u / step`` and shift, exact sums, the FP32
epilogue, the symmetric output Q), so run by ONNX Runtime without optimizations they match bit
for bit as well (``benchmarks/bundle_parity.py --dialect tensorrt``: every quantized engine
of EDSR x2 and IMDN x4, both ladders, on Set5). IMDN's attention statistics stay FP32 there
(TensorRT has no FP64); FP32 graphs compute them with ops whose results do not depend on the
implementation (``compiler.lower.pooled``), simulated op for op by :class:`ExactAttention`.
Before that, ONNX Runtime's and torch's FP32 statistics differed by ulps, and on Set5 'baby'
the IMDN x4 hardware engine flipped levels at IMDB5.c5's input next to a rounding tie (108
values), which spread to 17% of the output (48.3 dB). Before the lowering computed on integer
levels, FP32 sums in ONNX Runtime's order against torch's left IMDN x4 engines 33-41 dB from
this simulation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compiler.lower.dialects import dialect_of
from compiler.lower.image import PIXEL_LEVELS, ImageConv, image_conv_constants
from compiler.lower.pooled import CLAMP, LOGISTIC_P, LOGISTIC_Q, NEWTON_STEPS, SCALE, TINY
from compiler.quant.qmodel import QConv2d
from compiler.quant.quantizers import MAX_INT_BITS, quantize_asymmetric
from compiler.quant.record import apply_record
from compiler.zoo import load_model
from compiler.zoo.imdn import CCALayer
from runtime.errors import ConfigError
from runtime.manifest import EngineSpec

FLOAT_BITS = 32.0


def simulate_engine(weights: Path, record: Mapping[str, Any], spec: EngineSpec,
                    scale: int | None = None,
                    summary: Sequence[Mapping[str, Any]] | None = None,
                    dialect: str = "ort", statistics: str = "float") -> nn.Module:
    """The simulated network that ``spec`` (an engine of a bundle built from ``record``) runs.

    ``statistics="exact"``: the engine computes its per-image statistics as
    ``compiler.lower.pooled`` writes them (the ``statistics`` fact of a TensorRT-dialect
    lowering, :func:`compiler.lower.qdq.lowering_facts`); IMDN's attention is simulated so
    (:class:`ExactAttention`)."""
    rules = dialect_of(dialect).arithmetic
    loaded = load_model(weights, scale=scale)
    if all(layer.act_bits is None for layer in spec.layers):  # a float engine (FP32, BF16 ...)
        return loaded.model.eval()
    qnet = apply_record(loaded, dict(record))
    convs = dict(qnet.qconvs())
    missing = [layer.name for layer in spec.layers if layer.name not in convs]
    if missing:
        raise ConfigError(f"engine {spec.name!r} names layers {missing} that the record's "
                          "network does not have: the bundle and record do not match")
    for layer in spec.layers:
        conv = convs[layer.name]
        conv.forced_bits = FLOAT_BITS if layer.act_bits is None else float(layer.act_bits)
        conv.weight_quant.bits = int(FLOAT_BITS) if layer.w_bits is None else layer.w_bits
        # ORT: refined per layer from the summary below; TensorRT keeps every bias float
        conv.integer_bias = summary is None and rules.integer_bias
    ranges = {layer["name"]: layer.get("output_range") for layer in record["layers"]}
    # lowerings that record their conv arithmetic (ORT dialect): model it exactly
    exact = rules.integer_convs and any("integer_conv" in entry for entry in summary or ())
    for entry in summary or ():
        if entry.get("image_input"):
            ExactImageConv.adopt(convs[entry["name"]], entry["image_input"])
        elif exact:
            IntegerConv2d.adopt(convs[entry["name"]], entry)
        elif rules.scaled_convs and entry.get("integer_conv"):
            TensorRTConv2d.adopt(convs[entry["name"]], entry)
        placement = str(entry.get("output", ""))
        # ONNX Runtime turns a conv's bias into int32 on the s_x * s_w lattice only when a Q
        # follows the conv (a full QDQ group, run as QLinearConv); a float output keeps it float
        convs[entry["name"]].integer_bias = placement != "float" and rules.integer_bias
        if placement.startswith("8-bit output range"):
            low, high = ranges[entry["name"]]
            relu = "ReLU folded" in placement
            conv = convs[entry["name"]]
            conv.output_bounds = (0.0 if relu else min(low, 0.0), max(high, 0.0))
            if rules.symmetric_outputs:  # int8 on max(|lo|, |hi|), ReLU cuts at 0
                conv.output_bounds, conv.output_symmetric = (low, high), True
        if entry.get("input_bounds"):  # the grid the engine uses (widened, stream, frozen gate)
            low, high = entry["input_bounds"]
            conv = convs[entry["name"]]
            with torch.no_grad():
                conv.act_quant.lower.fill_(low)
                conv.act_quant.upper.fill_(high)
            if entry.get("frozen_gate"):
                conv.gate = None  # the engine runs the gate frozen at its calibration mean
    if exact:  # per-image statistics in FP64, as the lowering computes them
        for module in qnet.modules():
            if hasattr(module, "fp64_statistics"):
                setattr(module, "fp64_statistics", True)  # noqa: B010
    if statistics == "exact":
        for module in qnet.modules():
            if isinstance(module, CCALayer):
                module.__class__ = ExactAttention
    qnet.forced_d_img = spec.offsets[0] if spec.offsets else 0
    qnet.eval()
    streams = [entry["name"] for entry in summary or () if entry.get("stream_bounds")]
    if streams:
        _quantize_streams(qnet, {name: convs[name] for name in streams})
    return qnet


def _quantize_streams(qnet: nn.Module, convs: Mapping[str, Any]) -> None:
    """Quantize each residual stream where it is made (the output of the module whose output a
    stream conv reads), on that conv's grid: the skip path then carries the same values as in
    the engine, where every reader of the stream takes the one quantized tensor."""
    outputs: dict[int, str] = {}
    inputs: dict[str, int] = {}
    keep: list[Tensor] = []
    def produced(name: str) -> Any:
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            if isinstance(out, Tensor):
                outputs[id(out)] = name
                keep.append(out)  # alive until the trace ends: ids are not reused
        return hook

    def read(name: str) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            inputs[name] = id(args[0])
        return hook

    hooks = [module.register_forward_hook(produced(name))
             for name, module in qnet.named_modules() if name]
    hooks += [conv.register_forward_pre_hook(read(name)) for name, conv in convs.items()]
    with torch.no_grad():
        qnet(torch.rand(1, 3, 16, 16))
    for hook in hooks:
        hook.remove()
    for name, conv in convs.items():
        producer = outputs.get(inputs.get(name, -1))
        if producer is None:
            raise ConfigError(f"cannot find the module whose output is the stream read by "
                              f"{name!r}: this network's residual stream is not a module output")
        act = conv.act_quant

        def quantize(_m: nn.Module, _i: Any, out: Tensor, act: Any = act) -> Tensor:
            return quantize_asymmetric(out, act.lower, act.upper, torch.tensor(8.0))

        qnet.get_submodule(producer).register_forward_hook(quantize)


class IntegerConv2d(QConv2d):
    """A ``QConv2d`` that computes its conv as the ONNX Runtime engine does (ORT dialect).

    The engine accumulates a quantized conv exactly: QLinearConv in int32, a float-output conv
    on its integer levels (``compiler.lower.ort._integer_conv``). A simulation in FP32 rounds
    its partial sums instead, and a sum that lands on the other side of a later quantizer's
    rounding tie flips one level; each flip moves ~9 x 64 sums of the next conv and flips some
    of them, so the flips multiply layer after layer (IMDN x4: 1-2 flipped levels per million
    in the first block, 50-80% of all levels by the fifth; 37-43 dB between engine and
    simulation on Set5, and as much between this simulation in FP32 and in FP64). Here:

    - the accumulation is exact (integer levels, FP64 sums);
    - a conv followed by a Q (``output_grid`` of the lowering summary: a chain to the next
      conv's grid or an 8-bit requantized output) rounds as QLinearConv requantizes:
      ``round(fp32(acc + b_int) * fp32(s_x * s_w / s_y))``, the bias on the int32 lattice;
    - a float output computed on integer levels (``integer_conv``) is
      ``fp32(acc) * fp32(s_x * s_w) + b``, the engine's FP32 ops;
    - any other quantized conv (the image-grid output, whose Q also holds a folded constant)
      is ``(acc + b_int) * s_x * s_w`` rounded once to FP32 (its rounding only ever moves an
      output pixel by one level).

    Float inputs (> 8 bits), float weights, live DDTB gates and per-sample bits keep the
    ``QConv2d`` arithmetic.
    """

    input_levels: tuple[int, int] | None  # the levels the engine stores (a truncated grid cuts)
    output_grid: tuple[float, int, int] | None  # (step, lowest level, highest level) of the Q
    integer_output: bool

    @classmethod
    def adopt(cls, conv: QConv2d, entry: Mapping[str, Any]) -> None:
        """Turn ``conv`` into one computing as the engine layer ``entry`` (lowering summary)."""
        conv.__class__ = cls
        assert isinstance(conv, IntegerConv2d)
        grid = entry.get("input_grid")
        conv.input_levels = None if grid is None else _levels(grid)
        grid = entry.get("output_grid")
        conv.output_grid = None if grid is None else (float(grid["step"]), *_levels(grid))
        conv.integer_output = bool(entry.get("integer_conv"))

    def quantized(self, x: Tensor) -> bool:
        """True when this conv runs as an engine's integer conv: a quantized input at one
        bit-width per batch, quantized weights and no live gate."""
        bits = self.bits(x.shape[0])
        return not (not self.context.enabled or self.gate is not None
                    or self.weight_quant.bits > MAX_INT_BITS
                    or bool((bits > MAX_INT_BITS).any()) or bool((bits != bits[0]).any()))

    def accumulate(self, levels_x: Tensor) -> tuple[Tensor, Tensor]:
        """(exact FP64 sums of the input levels times the weight levels, weight step)."""
        conv = self.conv
        s_w = (self.weight_quant.clip / (2 ** (self.weight_quant.bits - 1) - 1)).reshape(-1)
        s_w = s_w.detach()
        levels_w = torch.round(self.weight_quant(conv.weight) / s_w.reshape(-1, 1, 1, 1))
        acc = F.conv2d(levels_x.double(), levels_w.double(), None, conv.stride, conv.padding,
                       conv.dilation, conv.groups)
        return acc, s_w

    def epilogue(self, acc: Tensor, scale: Tensor) -> Tensor:
        """``fp32(acc) * scale + b``: the FP32 ops after a conv on integer levels."""
        y: Tensor = acc.float() * scale.expand(self.conv.out_channels).reshape(1, -1, 1, 1)
        bias = self.conv.bias
        return y if bias is None else y + bias.detach().reshape(1, -1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        if not self.quantized(x):
            return super().forward(x)
        bits = self.bits(x.shape[0])
        conv = self.conv
        act = self.act_quant
        xq = act(x, bits)
        if act.symmetric:
            s_x = torch.maximum(act.upper.abs(), act.lower.abs()).clamp_min(1e-6) / (
                torch.pow(2.0, bits[0] - 1) - 1)
        else:
            s_x = (act.upper - act.lower).clamp_min(1e-6) / (torch.pow(2.0, bits[0]) - 1)
        with torch.no_grad():
            s_x = s_x.detach()
            levels_x = torch.round(xq / s_x)
            if self.input_levels is not None:  # a truncated grid (an 8-bit [l, u] with l > 0)
                levels_x = levels_x.clamp(*self.input_levels)
            acc, s_w = self.accumulate(levels_x)
            scale = (s_x * s_w).expand(conv.out_channels).reshape(1, -1, 1, 1)  # FP32
            bias = None if conv.bias is None else conv.bias.detach().reshape(1, -1, 1, 1)
            if self.integer_output:
                return self.epilogue(acc, s_x * s_w)
            lattice = 0.0 if bias is None else torch.round(bias / scale).double()
            if self.output_grid is None:
                exact: Tensor = ((acc + lattice) * scale.double()).float()
                return exact
            step, low, high = self.output_grid
            s_y = torch.tensor(step, dtype=torch.float32)
            multiplier = (s_x * s_w).expand(conv.out_channels).reshape(1, -1, 1, 1) / s_y
            levels = torch.round((acc + lattice).float() * multiplier).clamp(low, high)
            return levels * s_y


class TensorRTConv2d(IntegerConv2d):
    """A ``QConv2d`` that computes as a TensorRT-dialect conv on integer levels does
    (``compiler.lower.trt.TensorRTEncoding``), run by ONNX Runtime without optimizations:

    - the input Q, whose scale is the power of two ``u`` in ``[step, 2 step)``: ``x * (u /
      step)`` in FP32 (the ratio as the graph stores it; none when it is 1), ``+ k u`` when the
      grid is shifted by ``k`` into int8, then its levels ``round(. / u)`` clamped to the grid,
      minus ``k``;
    - exact sums of the input levels times the weight levels (the shift and its border Pad
      cancel exactly in the engine);
    - ``fp32(acc) * fp32(step * s_w) + b``, then the symmetric 8-bit output Q when the lowering
      requantized the output.
    """

    step: float
    unit: float
    ratio: float
    grid_levels: tuple[int, int]
    shift: int

    @classmethod
    def adopt(cls, conv: QConv2d, entry: Mapping[str, Any]) -> None:
        conv.__class__ = cls
        assert isinstance(conv, TensorRTConv2d)
        grid = entry["input_grid"]
        conv.step, conv.unit, conv.ratio = (float(grid[key]) for key in ("step", "unit", "ratio"))
        low, high = (int(v) for v in grid["levels"])
        conv.grid_levels = (low, high)
        conv.shift = int(entry.get("input_shift", 0))

    def forward(self, x: Tensor) -> Tensor:
        if not self.quantized(x):
            return QConv2d.forward(self, x)
        with torch.no_grad():
            unit = torch.tensor(self.unit, dtype=torch.float32)
            if self.ratio != 1:
                x = x * torch.tensor(self.ratio, dtype=torch.float32)
            k = self.shift
            if k:
                x = x + float(k) * unit  # exact: an integer times a power of two
            low, high = self.grid_levels
            levels = torch.round(x / unit).clamp(low + k, high + k) - k
            acc, s_w = self.accumulate(levels)
            step = torch.tensor(self.step, dtype=torch.float32)
            return self.requantize(self.epilogue(acc, step * s_w))


class ExactImageConv(QConv2d):
    """A ``QConv2d`` that computes the image conv as the ONNX Runtime engine does: in FP32 on the
    integer pixels with integer weights (``compiler.lower.image``), exact sums in FP64."""

    affine: tuple[float, tuple[float, ...]]  # u = a x + c: the conv's input from the image
    form: ImageConv

    @classmethod
    def adopt(cls, conv: QConv2d, image: Mapping[str, Any]) -> None:
        conv.__class__ = cls
        assert isinstance(conv, ExactImageConv)
        conv.affine = (float(image["a"]), tuple(float(v) for v in image["c"]))
        bias = None if conv.conv.bias is None else conv.conv.bias.detach().numpy()
        conv.form = image_conv_constants(conv.conv.weight.detach().numpy(), bias,
                                         conv.affine[0], np.array(conv.affine[1]))

    def forward(self, x: Tensor) -> Tensor:
        conv, form = self.conv, self.form
        a, c = self.affine
        with torch.no_grad():
            shift = torch.tensor(c, dtype=torch.float64).reshape(1, -1, 1, 1)
            levels = torch.round((x.double() - shift) * PIXEL_LEVELS / a)
            pad = torch.from_numpy(form.pad).double().reshape(1, -1, 1, 1)
            ph, pw = (int(v) for v in conv.padding)
            padded = F.pad(levels - pad, (pw, pw, ph, ph)) + pad
            acc = F.conv2d(padded, torch.from_numpy(form.weights).double(), None, conv.stride, 0,
                           conv.dilation, conv.groups)
            scale = torch.from_numpy(form.scale).reshape(1, -1, 1, 1)
            out: Tensor = acc.float() * scale + torch.from_numpy(form.bias).reshape(1, -1, 1, 1)
            return out


class ExactAttention(CCALayer):
    """IMDN's attention as ``compiler.lower.pooled`` computes it, op for op: exact means on a
    grid of ``2^24`` levels of each channel's largest magnitude, the square as a product, the
    root by Newton steps, the 1x1 convs as products summed in a tree of pairs, the rational
    logistic."""

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            mean = exact_mean(x)
            centred = x - mean
            y = newton_root(exact_mean(centred * centred), centred) + mean
            for layer in self.conv_du:
                if isinstance(layer, nn.Conv2d):
                    y = tree_conv(y, layer)
                elif isinstance(layer, nn.Sigmoid):
                    y = logistic(y)
                else:
                    y = layer(y)
            return x * y


def exact_mean(y: Tensor) -> Tensor:
    """The mean over H and W of ``compiler.lower.pooled._exact_mean``."""
    scale = torch.tensor(SCALE)
    m = torch.maximum(y.abs().amax(dim=(2, 3), keepdim=True), torch.tensor(TINY))
    levels = torch.round(y / m * scale)
    total = levels.to(torch.int64).sum(dim=(2, 3), keepdim=True)
    count = torch.tensor(float(y.shape[2] * y.shape[3]), dtype=torch.float32)
    mean: Tensor = total.float() / count * m / scale
    return mean


def newton_root(v: Tensor, deviations: Tensor) -> Tensor:
    """The root of ``v = mean(deviations^2)`` as ``compiler.lower.pooled._power`` computes it:
    Newton steps from ``max(max |deviations|, tiny)``."""
    largest = deviations.abs().amax(dim=(2, 3), keepdim=True)
    root = torch.maximum(largest, torch.tensor(TINY))
    half = torch.tensor(np.float32(0.5))
    for _ in range(NEWTON_STEPS):
        root = (root + v / root) * half
    return root


def tree_conv(y: Tensor, conv: nn.Conv2d) -> Tensor:
    """A 1x1 conv on a pooled ``[N, C, 1, 1]`` tensor as ``compiler.lower.pooled._pooled_conv``
    computes it: products (zero padded to a power of two) summed in pairs, then the bias."""
    weight = conv.weight.detach()[:, :, 0, 0]
    outs, ins = weight.shape
    width = 1 << max(ins - 1, 0).bit_length()
    products = F.pad(y.reshape(-1, 1, ins), (0, width - ins)) * F.pad(weight, (0, width - ins))
    while width > 1:
        products = products.reshape(y.shape[0], outs, -1, 2).sum(dim=-1)
        width //= 2
    pooled = products.reshape(y.shape[0], outs, 1, 1)
    return pooled if conv.bias is None else pooled + conv.bias.detach().reshape(outs, 1, 1)


def logistic(z: Tensor) -> Tensor:
    """The rational logistic of ``compiler.lower.pooled._logistic``."""
    x = z.clamp(-float(CLAMP), float(CLAMP))
    x2 = x * x

    def horner(coefficients: tuple[np.float32, ...]) -> Tensor:
        acc = x2 * torch.tensor(coefficients[0])
        for i, c in enumerate(coefficients[1:], 1):
            acc = acc + torch.tensor(c)
            if i < len(coefficients) - 1:
                acc = acc * x2
        return acc

    ratio = horner(LOGISTIC_P) * x / horner(LOGISTIC_Q)
    return (ratio + torch.tensor(np.float32(0.5))).clamp(0.0, 1.0)


def _levels(grid: Mapping[str, Any]) -> tuple[int, int]:
    """The lowest and highest level a lowering-summary grid stores (stored range - zero point)."""
    zero = int(grid["zero_point"])
    return int(grid["stored"][0]) - zero, int(grid["stored"][1]) - zero
