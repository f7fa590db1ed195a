"""The TensorRT dialect of the Q/DQ lowering, and the checker every TensorRT graph must pass.

TensorRT takes only symmetric Q/DQ: int8 with zero point 0, constant scales, activations per
tensor, weights per output channel (``axis=0``) or per tensor, Q saturating at [-128, 127]
(deployment.md). :class:`TensorRTEncoding` writes the placement of ``compiler.lower.qdq`` (chains,
requantized outputs, inputs) under those rules, on the simulated grids:

- **k-bit grid** ``j * step``, ``j`` in ``[low, high] = [-zp, 2^b - 1 - zp]``: scale ``step``,
  zero point 0, and a float ``Clip((low + k) * step, (high + k) * step)`` before the Q whenever
  the levels are narrower than int8 (TensorRT's Q clips only at the int8 range). A ReLU on a
  chain becomes the Clip's lower bound.
- **shift** ``k`` (:func:`int8_shift`): 0 when ``[low, high]`` fits in [-128, 127] (grids of
  <= 7 bits whose bounds contain 0, symmetric grids); otherwise (8-bit grids with ``zp`` far
  from 128, bounds that exclude 0) the integer closest to 0, even where there is a choice, that
  moves the levels into int8. The quantized tensor is ``x + c``, ``c = k * step`` (an explicit
  Add before the Clip, which TensorRT fuses into the producer). The fed conv's zero padding
  becomes a ``Pad`` with the stored level of a 0 input (conv pads 0), and a bias takes
  ``k * sum(w)`` out of its sums again (below): exact at the borders too. Widening to
  ``max(|l|, |u|)`` instead was measured (EDSR x2, 8 blocks, AdaBM W8A6 / W4A4 / W8A8 FQ, five
  48x48 Set5 crops, ``requantize=False``): 42-53 dB against the simulation where the shift
  gives 61-84 dB, and HR PSNR moves by +0.006..+0.07 dB: a different network, not the
  simulated one, so the lowering shifts.
- **integer levels**: every conv with a quantized input reads its stored levels through a DQ
  whose scale is the power of two ``2^a`` in ``[step, 2 step)``, not ``step``, and its int8
  weights through a DQ of ``2^b`` in ``[s_w, 2 s_w)`` per output channel: the products are
  integers times ``2^(a+b)`` and every FP32 sum of them is exact in any order (below 2^24, as
  for the ORT dialect's integer convs), also the bias ``-k * sum(w_int) * 2^(a+b)`` that
  undoes a shift. Then ``* (s_x * s_w / 2^(a+b))`` (exact: a power of two) and ``+ b`` per
  output channel: ``fp32(acc) * fp32(s_x * s_w) + b``, two FP32 operations. The values stay
  within 4x of the FP conv's, so FP16 graphs do not overflow (a DQ of scale 1 would give the
  raw sums, up to 3.6e5 on a Set5 image). TensorRT fuses the DQs into an INT8 conv and the Mul /
  Add into its epilogue; a Q and its DQ are separate layers with their own scales there. Not
  verified on a GPU here (``tools/verify_tensorrt_bundle.py`` compares built engines with
  ONNX Runtime). With ``float_type="fp32"`` the conv that reads the image runs on the integer
  pixels (``compiler.lower.image``) when the plan says so (cpu-x86 plans).
- **outputs** of convs that feed no quantized conv (``requantize=True``): int8 on the symmetric
  range ``max(|lo|, |hi|)`` of the record's ``output_range`` (ReLU folded into the Clip): not in
  the papers' simulation. Same network, same crops: 42-55 dB against it (W4A4 at offset -1, with
  2-bit layers, the lowest; HR -0.04..+0.02 dB), 60-68 dB against the simulation with the same
  output quantizers. ``requantize=False`` is exact (above).
- DepthToSpace on a chain runs on the dequantized values (TensorRT 10 runs no op but Q/DQ on
  int8 and moves a DQ across a shuffle itself); the weights are int8 initializers on the k-bit
  grid (``qdq.quantize_weight``) behind a DQ (above). Not verified on a GPU here: whether
  TensorRT keeps a shifted conv in INT8 across the ``DQ -> Pad -> Conv`` (the engine's layer
  report says).

``float_type="fp16"`` makes every float initializer, Q/DQ scale and float op FP16, with a Cast
after the FP32 input and before the FP32 output: the strongly typed recipe of TensorRT 10 / 11.
FP16 Q/DQ scales need opset 19, so such graphs are converted to opset >= 19 (the target's
``max_opset`` must allow it). ``"fp32"`` keeps FP32 at the FP graph's opset (or lower, down to
``max_opset``): TensorRT 8.5 (opset <= 17) builds it with the legacy INT8 / FP16 flags. A weight
scale below FP16's normal range makes that conv's weights an FP16 initializer instead
(``fp16_weights`` in the summary). ONNX Runtime's CPU provider runs the FP16 graphs: 43-56 dB
against the FP32 simulation on the crops above, HR within 0.06 dB (FP16 rounding of the 0-255
input alone moves the head's 8-bit grid levels), so FP16 is no bit-exact proxy of the simulation.

ONNX Runtime checks these graphs' numbers with its graph optimizations off: its optimizer
rewrites a ``DQ -> Conv`` float bias to int32 on the ``s_x * s_w`` lattice (its QLinearConv
arithmetic), which moves 2-4-bit grids by whole steps. Unoptimized, it computes the graph's ONNX
semantics, which ``compiler.parity.simulate_engine(dialect="tensorrt")`` simulates op for op
(``TensorRTConv2d``): the engines of ``benchmarks/bundle_parity.py --dialect tensorrt`` (EDSR x2
and IMDN x4, both ladders, whole Set5 images) are bit-identical to their simulation. Before the
integer levels, FP32 sums in ONNX Runtime's order against torch's flipped 0 to 3e-5 of a conv's
output levels, which the quantized network amplified to 51-59 dB (EDSR) and 33-41 dB (IMDN).
What still rounds in FP32 on both sides in different orders: the FP32 reference engine's convs
(91-94 dB) and IMDN's attention statistics (TensorRT has no FP64, so they stay FP32; ORT's and
torch's means differ by ulps, which flipped no level on Set5 but can on other images).

:func:`check_tensorrt_graph` validates any graph against these rules and names the offending node.
Every Q's stored range is in the metadata (``quantizers``), so the checker knows which Q needs a
Clip.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from compiler.lower.exact import exact_epilogue, plain_constant, power_of_two_above
from compiler.lower.export import MIN_OPSET, pin_ir_version
from compiler.lower.image import EXACT_SUM
from compiler.lower.qdq import (
    FLOAT_TYPES,
    METADATA_KEY,
    OUTPUT_BITS,
    Chain,
    Encoding,
    EngineLayer,
    GraphEditor,
    Grid,
    finish_engine,
    float_weight,
    integer_scale,
    lower_graph,
    lower_weight,
    model_opset,
    take_bias,
)
from runtime.errors import ConfigError, EngineError, unknown_name

INT8_MIN, INT8_MAX = -128, 127
FP16_MIN_OPSET = 19  # FP16 Q/DQ scales (QuantizeLinear-19 / DequantizeLinear-19)
ZERO_POINT_TYPES = (TensorProto.INT8, TensorProto.FLOAT8E4M3FN)
DEFAULT_DOMAINS = ("", "ai.onnx")

F32 = np.float32


def int8_shift(grid: Grid) -> int:
    """The integer ``k`` closest to 0 with ``[low + k, high + k]`` and ``k`` (the level of a 0
    input: a conv's zero padding) inside [-128, 127], even where the grid leaves a choice:
    rounding half to even then commutes with the shift, so even exact ties land where the
    simulation puts them. A grid must first fit int8 with 0 (:func:`fit_int8`)."""
    low, high = min(grid.low, 0), max(grid.high, 0)
    if high - low > INT8_MAX - INT8_MIN:
        raise EngineError(f"a grid of levels [{grid.low}, {grid.high}] does not fit in int8 "
                          "together with 0")
    lowest, highest = INT8_MIN - low, INT8_MAX - high
    k = min(max(0, lowest), highest)
    if k % 2 and lowest < highest:
        k += 1 if k == lowest else -1
    return k


def fit_int8(grid: Grid) -> Grid:
    """``grid`` cut to the levels int8 holds together with 0: an 8-bit grid whose bounds
    exclude 0 (``l > 0`` after training) loses its levels farthest from 0, as the ORT dialect's
    uint8 grid does (``truncated_grid``; the parity simulation cuts them too)."""
    span = INT8_MAX - INT8_MIN
    low, high = grid.low, grid.high
    if low > 0:
        high = min(high, span)
    elif high < 0:
        low = max(low, -span)
    return Grid(grid.step, low, high) if (low, high) != (grid.low, grid.high) else grid


def _stored(grid: Grid) -> tuple[int, int]:
    k = int8_shift(grid)
    return grid.low + k, grid.high + k


def _set_ints(node: onnx.NodeProto, name: str, values: Sequence[int]) -> None:
    for attr in node.attribute:
        if attr.name == name:
            del attr.ints[:]
            attr.ints.extend(values)
            return
    node.attribute.append(helper.make_attribute(name, list(values)))


def _attribute(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


class TensorRTEncoding(Encoding):
    """Symmetric int8 Q/DQ with a float Clip before each narrower Q (module docstring); every
    conv with a quantized input computes on its integer levels (:meth:`feed`, :meth:`lower_conv`).

    ``quantizers`` collects each Q's stored range by node name; ``fed`` each quantized conv's
    input grid, shift and DQ scale.
    """

    shares_streams = False  # not measured on TensorRT: streams stay float between Q/DQ
    statistics_in_double = False  # TensorRT has no FP64

    dialect = "tensorrt"

    def __init__(self, float_type: str = "fp32") -> None:
        self.quantizers: dict[str, tuple[int, int]] = {}
        self.fed: dict[str, tuple[Grid, int, float, float]] = {}
        self.cut: set[Grid] = set()  # input grids cut to fit int8 with 0 (fit_int8)
        # the integer image conv's sums reach 2^24: exact in FP32 graphs only
        self.exact_image = float_type == "fp32"

    def per_channel(self, g: GraphEditor, values: npt.NDArray[np.float32], base: str) -> str:
        return plain_constant(g, values, base)

    def output_grid(self, output_range: tuple[float, float], relu: bool) -> Grid:
        alpha = max(abs(output_range[0]), abs(output_range[1]))
        grid = Grid.of_bounds((-alpha, alpha), OUTPUT_BITS, symmetric=True)
        return grid.after_relu() if relu else grid

    def input_grid(self, layer: EngineLayer) -> Grid:
        """The simulated grid, cut to what int8 holds together with 0 (:func:`fit_int8`)."""
        grid = super().input_grid(layer)
        fitted = fit_int8(grid)
        if fitted != grid:
            self.cut.add(fitted)
        return fitted

    def truncated(self, grid: Grid) -> bool:
        return grid in self.cut

    def quantize(self, g: GraphEditor, tensor: str, grid: Grid, base: str) -> str:
        """A requantized output's symmetric grid: Clip where narrower than int8, Q of scale
        ``step`` (its DQ has the same scale)."""
        return self._clip_quantize(g, tensor, grid, F32(grid.step), base)

    def _clip_quantize(self, g: GraphEditor, tensor: str, grid: Grid, scale: np.float32,
                       base: str, pad: onnx.NodeProto | None = None) -> str:
        """``tensor`` (already ``* scale / step`` and shifted by ``k scale``) clipped to the
        grid's shifted levels times ``scale``, zero-padded for ``pad`` (a conv whose padding
        becomes the level of a 0 input), then Q of ``scale``: the stored int8 tensor."""
        k = int8_shift(grid)
        low, high = _stored(grid)
        if (low, high) != (INT8_MIN, INT8_MAX):
            bounds = [g.constant(f"{base}.{side}", np.array(v * scale, dtype=F32))
                      for side, v in (("low", low), ("high", high))]
            tensor = g.node("Clip", [tensor, *bounds], f"{base}.clip")
        if k and pad is not None:
            tensor = _pad_outside(g, pad, tensor, F32(k * scale), base)
        stored = g.node("QuantizeLinear", [tensor, self._scale(g, scale, base),
                                           self._zero(g, base)], f"{base}.q")
        self.quantizers[g.graph.node[-1].name] = (low, high)
        return stored

    @staticmethod
    def _scale(g: GraphEditor, scale: np.float32, base: str) -> str:
        return g.constant(f"{base}.scale", np.array(scale, dtype=F32))

    @staticmethod
    def _zero(g: GraphEditor, base: str) -> str:
        return g.constant(f"{base}.zero_point", np.array(0, dtype=np.int8))

    def dequantize(self, g: GraphEditor, stored: str, grid: Grid, base: str) -> str:
        return g.node("DequantizeLinear", [stored, self._scale(g, F32(grid.step), base),
                                           self._zero(g, base)], f"{base}.dq")

    def feed(self, g: GraphEditor, conv: onnx.NodeProto, tensor: str, grid: Grid,
             layer: EngineLayer, base: str) -> str:
        """The conv reads its input's levels times the power of two ``u = 2^a`` in ``[step,
        2 step)``: ``x * (u / step)`` (a Mul, none where ``step`` is a power of two), plus a
        shift ``k u``, the Clip on the shifted levels, then ``Q`` and ``DQ`` both of scale
        ``u``, the DQ feeding the conv directly. A shifted grid's zero padding becomes a Pad
        between the Clip and the Q with value ``k u`` (the stored level of a 0 input):
        :meth:`lower_conv` takes the shift out of the sums again."""
        k = int8_shift(grid)
        unit = power_of_two_above(grid.step)
        ratio = F32(unit / F32(grid.step))
        if ratio != 1:
            tensor = g.node("Mul", [tensor, g.constant(f"{base}.ratio", np.array(ratio, F32))],
                            f"{base}.ratio")
        if k:
            shift = g.constant(f"{base}.shift", np.array(F32(k) * unit, dtype=F32))
            tensor = g.node("Add", [tensor, shift], f"{base}.shift")
        stored = self._clip_quantize(g, tensor, grid, unit, base, pad=conv)
        conv.input[0] = g.node("DequantizeLinear", [stored, self._scale(g, unit, base),
                                                    self._zero(g, base)], f"{base}.dq")
        self.fed[layer.name] = (grid, k, float(unit), float(ratio))
        return conv.input[0]

    def chain(self, g: GraphEditor, conv: onnx.NodeProto, chain: Chain, grid: Grid,
              target: onnx.NodeProto, target_layer: EngineLayer) -> Grid:
        """The path's ReLUs fold into the Clip; its other ops (DepthToSpace) run on the float
        values before the Q (TensorRT runs no op but Q/DQ on int8): the target's input is then
        a DQ fed as any quantized input (:meth:`feed`). Returns the grid of the Q."""
        if any(node.op_type == "Relu" for node in chain.path):
            grid = grid.after_relu()
        tensor = conv.output[0]
        for node in chain.path:
            if node.op_type == "Relu":
                g.drop(node)
            else:
                node.input[0] = tensor
                tensor = node.output[0]
        self.feed(g, target, tensor, grid, target_layer, f"{chain.target}.input")
        return grid

    def lower_conv(self, g: GraphEditor, conv: onnx.NodeProto, layer: EngineLayer,
                   grid: Grid | None, placement: str) -> bool:
        """A fed conv: int8 weights behind a DQ of scale ``2^b`` in ``[s_w, 2 s_w)`` (per
        output channel where the weights are), so the conv sums ``x_int * w_int * 2^(a+b)``
        exactly; a bias of ``-k * sum(w_int) * 2^(a+b)`` removes a shift ``k`` of the input
        exactly; then ``* (s_x * s_w / 2^(a+b)) + b``: ``acc * fp32(s_x * s_w) + b``, rounded as
        the ORT dialect's integer convs are. Other convs: int8 weights on their step (FP
        input)."""
        fed = self.fed.get(layer.name)
        if fed is None:  # a float input: TensorRT has no weight-only conv, so float weights
            float_weight(g, conv, layer)
            return False
        grid, k, unit, _ = fed
        name, w_step, w_unit = lower_weight(g, conv, layer, power_of_two_above)
        levels = numpy_helper.to_array(g.inits[name]).astype(np.int64)
        channels = levels.shape[0]
        units = F32(unit) * np.broadcast_to(w_unit, (channels,)).astype(F32)  # 2^(a+b): exact
        bias = take_bias(g, conv, layer)
        if k:
            shift = -k * levels.reshape(channels, -1).sum(axis=1)
            if np.abs(shift).max() >= EXACT_SUM:
                raise EngineError(f"layer {layer.name!r}: the shift {k} of its input moves the "
                                  "sums beyond FP32's exact integers")
            conv.input.append(g.constant(f"{layer.name}.shift_bias", (shift * units).astype(F32)))
        exact_epilogue(g, conv, integer_scale(grid, w_step, channels) / units, bias,
                       f"{layer.name}.output", plain_constant)
        return True

    def notes(self, layer: EngineLayer, input_grid: Grid | None, output_grid: Grid | None,
              integer: bool) -> dict[str, Any]:
        """The input shift and, for a conv on integer levels, its input grid (the Q's levels
        before the shift) for ``compiler.parity``."""
        fed = self.fed.get(layer.name)
        if fed is None:
            return {"input_shift": 0, "integer_conv": False}
        grid, k, unit, ratio = fed
        return {"input_shift": k, "integer_conv": integer,
                "input_grid": {"step": grid.step, "levels": [grid.low, grid.high],
                               "unit": unit, "ratio": ratio}}


def _pad_outside(g: GraphEditor, conv: onnx.NodeProto, tensor: str, value: np.float32,
                 base: str) -> str:
    """Move the conv's zero padding into a Pad of ``tensor`` with ``value`` (conv pads -> 0)."""
    auto_pad = _attribute(conv, "auto_pad", b"NOTSET")
    if auto_pad not in (b"NOTSET", b"VALID"):
        raise EngineError(f"conv {conv.name!r}: auto_pad {auto_pad.decode()} cannot move into a "
                          "Pad; export with explicit pads")
    pads = [int(p) for p in _attribute(conv, "pads", [])]
    if not any(pads):
        return tensor
    half = len(pads) // 2
    onnx_pads = np.array([0, 0, *pads[:half], 0, 0, *pads[half:]], dtype=np.int64)
    _set_ints(conv, "pads", [0] * len(pads))
    return g.node("Pad", [tensor, g.constant(f"{base}.pads", onnx_pads),
                          g.constant(f"{base}.pad_value", np.array(value, dtype=F32))],
                  f"{base}.pad", mode="constant")


# -- opset and float type -----------------------------------------------------------------------


def target_opset(current: int, float_type: str, max_opset: int | None) -> int:
    """The opset of a TensorRT graph: >= 19 for FP16, never above ``max_opset``."""
    need = FP16_MIN_OPSET if float_type == "fp16" else MIN_OPSET
    opset = max(current, need)
    if max_opset is not None:
        if max_opset < need:
            raise ConfigError(f"float_type {float_type!r} needs opset >= {need} (FP16 Q/DQ "
                              f"scales) but the target parses <= {max_opset}: use 'fp32' "
                              "(legacy FP16 / INT8 builder flags)")
        opset = min(opset, max_opset)
    return opset


def _convert_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    if model_opset(model) == opset:
        return model
    try:
        converted = onnx.version_converter.convert_version(model, opset)
    except (onnx.version_converter.ConvertError, RuntimeError) as err:  # C++ asserts: Runtime
        raise EngineError(f"cannot convert the FP graph from opset {model_opset(model)} to "
                          f"{opset}: {err}") from err
    return pin_ir_version(converted)


def _to_fp16(model: onnx.ModelProto) -> set[str]:
    """Every float tensor of the graph in FP16; Casts keep the FP32 input and output (in place).

    A weight whose int8 scale is below FP16's normal range (a checkpoint that folded an input
    scale into its first conv: EDSR x2's ``head.0``, 1.2e-5) would lose up to 0.3% of every
    weight in a subnormal FP16 scale: it becomes an FP16 initializer of its dequantized values
    instead (that conv runs FP16, not INT8). Returns the names of those weights.
    """
    g = GraphEditor(model.graph)
    tiny = float(np.finfo(np.float16).tiny)
    dequantized = set()
    for node in model.graph.node:
        if (node.op_type == "DequantizeLinear" and node.input[0] in g.inits
                and node.input[1] in g.inits):
            scale = numpy_helper.to_array(g.inits[node.input[1]])
            if np.abs(scale).min() >= tiny:
                continue
            q = numpy_helper.to_array(g.inits[node.input[0]]).astype(F32)
            axis = int(_attribute(node, "axis", 1)) if scale.ndim else 0
            shape = [-1 if i == axis else 1 for i in range(q.ndim)] if scale.ndim else []
            name = node.input[0]
            if len(g.consumers(name)) == 1:
                g.release(name)  # the FP16 weight keeps the module's weight name
            weight = g.constant(name, (q * scale.reshape(shape)).astype(F32))
            for reader in g.consumers(node.output[0]):
                reader.input[:] = [weight if i == node.output[0] else i for i in reader.input]
            g.drop(node)
            dequantized.add(name)
    for tensor in model.graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            _tensor_to_fp16(tensor)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                    _tensor_to_fp16(attr.t)
        elif node.op_type == "Cast" and _attribute(node, "to", 0) == TensorProto.FLOAT:
            next(a for a in node.attribute if a.name == "to").i = TensorProto.FLOAT16
    floats = [i.name for i in model.graph.input
              if i.type.tensor_type.elem_type == TensorProto.FLOAT]
    for name in floats:
        half = g.fresh(f"{name}.fp16")
        for node in model.graph.node:
            node.input[:] = [half if i == name else i for i in node.input]
        model.graph.node.append(helper.make_node("Cast", [name], [half], g.fresh(f"{name}.cast"),
                                                 to=TensorProto.FLOAT16))
    for output in model.graph.output:
        if output.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        half = g.fresh(f"{output.name}.fp16")
        for node in model.graph.node:
            node.input[:] = [half if i == output.name else i for i in node.input]
            node.output[:] = [half if o == output.name else o for o in node.output]
        model.graph.node.append(helper.make_node("Cast", [half], [output.name],
                                                 g.fresh(f"{output.name}.cast"),
                                                 to=TensorProto.FLOAT))
    g.finish()
    return dequantized


def _tensor_to_fp16(tensor: onnx.TensorProto) -> None:
    values = numpy_helper.to_array(tensor)
    half = values.astype(np.float16)
    if not np.all(np.isfinite(half)) and np.all(np.isfinite(values)):
        raise EngineError(f"tensor {tensor.name!r} overflows FP16 (max |value| "
                          f"{float(np.abs(values).max()):.4g} > 65504)")
    tensor.CopyFrom(numpy_helper.from_array(half, tensor.name))


# -- lowering -----------------------------------------------------------------------------------


def lower_tensorrt(fp_model: onnx.ModelProto, layers: Sequence[EngineLayer], *,
                   requantize: bool = True, float_type: str = "fp32",
                   max_opset: int | None = None) -> onnx.ModelProto:
    """The TensorRT-dialect engine of ``layers`` (see the module docstring); it passes
    :func:`check_tensorrt_graph` at its own opset, which is at most ``max_opset``."""
    if float_type not in FLOAT_TYPES:
        raise ConfigError(unknown_name("float type", float_type, FLOAT_TYPES))
    opset = target_opset(model_opset(fp_model), float_type, max_opset)
    fp = _convert_opset(fp_model, opset)
    encoding = TensorRTEncoding(float_type)
    model, summary = lower_graph(fp, layers, encoding, requantize=requantize)
    if float_type == "fp16":
        fp16_weights = _to_fp16(model)
        for entry in summary:
            entry["fp16_weights"] = f"{entry['name']}.weight" in fp16_weights
    finish_engine(model, encoding.dialect, summary, float_type=float_type, opset=opset,
                  quantizers={name: list(r) for name, r in encoding.quantizers.items()})
    check_tensorrt_graph(model, opset)
    return model


# -- the checker --------------------------------------------------------------------------------


def _constants(graph: onnx.GraphProto) -> dict[str, npt.NDArray[Any]]:
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            tensor = _attribute(node, "value", None)
            if isinstance(tensor, onnx.TensorProto):
                values[node.output[0]] = numpy_helper.to_array(tensor)
    return values


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor ONNX shape inference can type (inputs, outputs, values)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, RuntimeError):  # broken: what is declared
        inferred = model
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*graph.input, *graph.output, *graph.value_info]}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def _lowering_facts(model: onnx.ModelProto) -> dict[str, Any]:
    props = {p.key: p.value for p in model.metadata_props}
    facts: dict[str, Any] = json.loads(props[METADATA_KEY]) if METADATA_KEY in props else {}
    return facts


class _Checker:
    """What the rules need to know of a graph; each ``check_*`` raises on a broken rule."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.consts = _constants(graph)
        self.producers = {out: node for node in graph.node for out in node.output}
        self.types = _tensor_types(model)
        facts = _lowering_facts(model)
        self.quantizers: dict[str, list[int]] | None = facts.get("quantizers")
        self.float_type = facts.get("float_type")

    def constant(self, node: onnx.NodeProto, where: str, index: int, what: str
                 ) -> npt.NDArray[Any]:
        name = node.input[index]
        if name not in self.consts:
            source = self.producers.get(name)
            made = f"computed by node {source.name!r} ({source.op_type})" if source else "an input"
            raise EngineError(f"{where}: {what} {name!r} is {made}; TensorRT needs a constant "
                              f"{what} (an initializer or a Constant node)")
        return self.consts[name]

    def check_qdq(self, node: onnx.NodeProto, where: str) -> None:
        quantize = node.op_type == "QuantizeLinear"
        scale = self.constant(node, where, 1, "scale")
        if len(node.input) < 3 or not node.input[2]:
            output_dtype = _attribute(node, "output_dtype", 0)
            if quantize and output_dtype not in ZERO_POINT_TYPES:
                raise EngineError(f"{where}: no zero point, so ONNX quantizes to uint8; TensorRT "
                                  "needs an int8 zero point 0")
        else:
            zero = self.constant(node, where, 2, "zero point")
            dtype = helper.np_dtype_to_tensor_dtype(zero.dtype)
            if dtype not in ZERO_POINT_TYPES:
                raise EngineError(f"{where}: zero point is {TensorProto.DataType.Name(dtype)}; "
                                  "TensorRT needs int8 (or float8e4m3fn)")
            if np.any(zero.astype(np.float32) != 0):
                value = zero.ravel()[np.flatnonzero(zero.astype(np.float32))[0]]
                raise EngineError(f"{where}: zero point {value} must be 0 for TensorRT")
        weight = not quantize and node.input[0] in self.consts
        if scale.size != 1:
            axis = _attribute(node, "axis", 1)
            channels = self.consts[node.input[0]].shape[0] if weight else None
            if not weight:
                raise EngineError(f"{where}: per-channel activation scale (shape "
                                  f"{list(scale.shape)}); TensorRT quantizes activations per "
                                  "tensor (a scalar scale)")
            if axis != 0 or scale.ndim != 1 or scale.shape[0] != channels:
                raise EngineError(f"{where}: weight scale of shape {list(scale.shape)} on axis "
                                  f"{axis}; TensorRT needs per tensor or per output channel "
                                  f"(axis 0, {channels} scales)")
        if quantize:
            self.check_clip(node, where, float(scale.ravel()[0]))

    def check_clip(self, node: onnx.NodeProto, where: str, scale: float) -> None:
        if self.quantizers is None:
            return  # not a lowered graph: no grid to check against
        if node.name not in self.quantizers:
            raise EngineError(f"{where}: no grid recorded for this Q in the lowering metadata")
        low, high = self.quantizers[node.name]
        if (low, high) == (INT8_MIN, INT8_MAX):
            return
        clip = self.producers.get(node.input[0])
        if clip is not None and clip.op_type == "Pad":  # a shifted grid's border, on the levels
            clip = self.producers.get(clip.input[0])
        if clip is None or clip.op_type != "Clip":
            source = f"node {clip.name!r} ({clip.op_type})" if clip else "a graph input"
            raise EngineError(f"{where}: grid [{low}, {high}] is narrower than int8 but its "
                              f"input comes from {source}, not a Clip; TensorRT's Q saturates "
                              "only at [-128, 127]")
        if len(clip.input) < 3 or not (clip.input[1] and clip.input[2]):
            raise EngineError(f"{where}: Clip {clip.name!r} before this Q lacks a bound; the "
                              f"grid [{low}, {high}] needs both")
        bounds = [float(self.constant(clip, f"node {clip.name!r} (Clip)", i, "bound").ravel()[0])
                  for i in (1, 2)]
        found = [round(b / scale) for b in bounds]
        if found != [low, high]:
            raise EngineError(f"{where}: Clip {clip.name!r} keeps levels {found}, not the grid "
                              f"[{low}, {high}]")

    def check_pad(self, node: onnx.NodeProto, where: str) -> None:
        mode = _attribute(node, "mode", b"constant")
        if mode != b"constant":
            raise EngineError(f"{where}: mode {mode.decode()}; a shift's Pad must be 'constant'")
        for index, what in ((1, "pads"), (2, "pad value"), (3, "axes")):
            if len(node.input) > index and node.input[index]:
                self.constant(node, where, index, what)

    def check_types(self, node: onnx.NodeProto, where: str) -> None:
        for out in node.output:
            if self.types.get(out) == TensorProto.UINT8:
                raise EngineError(f"{where}: output {out!r} is uint8; TensorRT Q/DQ graphs use "
                                  "int8 only")


def check_tensorrt_graph(model: onnx.ModelProto, max_opset: int) -> None:
    """Raise :class:`EngineError` naming the node (and the rule) of the first TensorRT violation.

    Rules: default-domain opset <= ``max_opset``, no other domains; every Q/DQ zero point 0 and
    int8 (float8e4m3fn allowed), a Q's zero point present (else uint8); scales and zero points
    constant; activation scales per tensor, weight scales per tensor or per output channel on
    axis 0; no uint8 tensor; in a lowered graph, every Q whose recorded grid is narrower than int8
    reads a Clip with constant bounds on that grid; Pads constant-mode with constant inputs; an
    FP16 graph holds no FP32 initializer.
    """
    for op in model.opset_import:
        if op.domain not in DEFAULT_DOMAINS:
            raise EngineError(f"model: operator domain {op.domain!r} is not parsed by TensorRT "
                              "(no plugins here)")
        if op.version > max_opset:
            raise EngineError(f"model: opset {op.version} is above the target's max_opset "
                              f"{max_opset}; lower with max_opset={max_opset}")
    checker = _Checker(model)
    for node in model.graph.node:
        where = f"node {node.name!r} ({node.op_type})"
        if node.domain not in DEFAULT_DOMAINS:
            raise EngineError(f"{where}: domain {node.domain!r} is not parsed by TensorRT")
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            checker.check_qdq(node, where)
        elif node.op_type == "Pad":
            checker.check_pad(node, where)
        checker.check_types(node, where)
    for tensor in model.graph.initializer:
        if tensor.data_type == TensorProto.UINT8:
            raise EngineError(f"initializer {tensor.name!r} is uint8; TensorRT Q/DQ graphs use "
                              "int8 only")
        if checker.float_type == "fp16" and tensor.data_type == TensorProto.FLOAT:
            raise EngineError(f"initializer {tensor.name!r} is FP32 in an FP16 graph; a strongly "
                              "typed build would run its consumer in FP32")
