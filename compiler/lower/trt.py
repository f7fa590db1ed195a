"""The TensorRT dialect of the lowering: symmetric int8 Q/DQ that TensorRT fuses into INT8 convs.

TensorRT takes only symmetric Q/DQ: int8 with zero point 0, constant scales, activations per
tensor, weights per output channel (``axis=0``) or per tensor, Q saturating at [-128, 127]; it
fuses ``DQ(x) -> Conv <- DQ(W)`` into an INT8 conv only when the DQ feeds the conv directly
(its explicit-quantization rules; ``compiler.engines.tensorrt_network`` checks it on the network
TensorRT's parser builds, ``tests/compiler/test_tensorrt_rtx.py`` with a real parser).
:class:`TensorRTEncoding` writes the placement of ``compiler.lower.qdq`` under those rules, on
the simulated grids. A quantized conv's input ``x`` on the grid ``j * step``, ``j`` in
``[low, high]``, becomes:

    x -> Mul(u / step) -> Add(k u) -> Clip((low + k) u, (high + k) u) [-> Pad(k u)]
      -> Q(scale u) -> DQ(scale u) -> Conv <- DQ(2^b) <- int8 weights

- ``u = 2^a`` is the power of two in ``[step, 2 step)`` (:func:`power_of_two_above`): the conv
  reads the levels times a power of two and the weights' levels times ``2^b`` in ``[s_w, 2 s_w)``,
  so every FP32 sum of their products is exact in any order (below 2^24, as for the ORT
  dialect's integer convs) and the values stay within 4x of the FP conv's (FP16 graphs do not
  overflow). The Q and its DQ share the one scale ``u``; the Mul by ``u / step`` (none where
  ``step`` is a power of two) is an FP32 op before the Q, which ``compiler.parity`` simulates.
- **shift** ``k`` (:func:`int8_shift`): 0 when ``[low, high]`` and 0 fit in [-128, 127] (grids
  of <= 7 bits whose bounds contain 0, symmetric grids); otherwise (8-bit grids with ``zp`` far
  from 128) the integer closest to 0, even where there is a choice, that moves the levels and
  0 into int8. A grid whose bounds exclude 0 (``l > 0``) cannot hold its 256 levels and 0 in
  int8: its levels farthest from 0 are cut (:func:`fit_int8`), as uint8 cuts them in the ORT
  dialect. The fed conv's zero padding becomes a ``Pad`` between the Clip and the Q with value
  ``k u`` (the stored level of a 0 input; the conv pads nothing), and a bias takes
  ``k * sum(w_int) * 2^(a+b)`` out of the sums again: exact at the borders too. Nothing stands
  between the DQ and the conv. Widening to ``max(|l|, |u|)`` instead of shifting was measured
  (EDSR x2, 8 blocks, AdaBM W8A6 / W4A4 / W8A8 FQ, five 48x48 Set5 crops, ``requantize=False``):
  42-53 dB against the simulation where the shift gives 61-84 dB.
- then ``* (s_x * s_w / 2^(a+b))`` (exact: a power of two) and ``+ b`` per output channel:
  ``fp32(acc) * fp32(s_x * s_w) + b``, two FP32 operations TensorRT fuses into the conv's
  epilogue. A ReLU on a chain becomes the Clip's lower bound; a DepthToSpace on a chain runs on
  the float values before the Q (TensorRT runs no op but Q/DQ on int8). A conv with a float
  input gets float weights on its grid (TensorRT has no weight-only conv). With
  ``float_type="fp32"`` the conv that reads the image runs on the integer pixels
  (``compiler.lower.image``) when the plan says so (cpu-x86 plans).
- **outputs** of convs that feed no quantized conv (``requantize=True``): int8 on the symmetric
  range ``max(|lo|, |hi|)`` of the record's ``output_range`` (ReLU folded into the Clip), Q and
  DQ of scale ``step``: not in the papers' simulation (42-55 dB against it on the crops above;
  HR -0.04..+0.02 dB). ``requantize=False`` is exact.

``float_type="fp16"`` makes every float initializer, Q/DQ scale and float op FP16, with a Cast
after the FP32 input and before the FP32 output: the strongly typed recipe of TensorRT 10 / 11.
FP16 Q/DQ scales need opset 19, so such graphs are converted to opset >= 19 (the target's
``max_opset`` must allow it; the lowering records the graph's opset in its metadata). ``"fp32"``
keeps FP32 at the FP graph's opset (or lower, down to ``max_opset``). A weight scale below
FP16's normal range makes that conv's weights an FP16 initializer instead (``fp16_weights`` in
the summary). ONNX Runtime's CPU provider runs the FP16 graphs, but FP16 is no bit-exact proxy
of the simulation (43-56 dB against it on the crops above).

ONNX Runtime checks these graphs' numbers with its graph optimizations off (its optimizer would
substitute its own QLinearConv arithmetic). Unoptimized, it computes the graph's ONNX semantics,
which ``compiler.parity.simulate_engine(dialect="tensorrt")`` simulates op for op
(``TensorRTConv2d``): ``benchmarks/bundle_parity.py --dialect tensorrt`` compares them on whole
Set5 images. Per-image statistics (IMDN's attention) stay FP32 (TensorRT has no FP64), and
FP32 reductions, 1x1 convs and Sigmoids differ by ulps between implementations, which flipped
levels next to a rounding tie (IMDN x4 hardware, Set5 'baby': 48.3 dB); in FP32 graphs they are
rewritten with ops that every IEEE implementation computes to the same bits
(``compiler.lower.pooled``; the lowering's ``statistics`` fact is ``"exact"``), which the
simulation mirrors: identical on Set5 since. FP16 graphs keep their FP16 statistics (the fact is
``"float"``). What still rounds in FP32 in different orders: the FP32 reference engine's convs.

``compiler.lower.trt_check.check_tensorrt_graph`` validates any graph against these rules.
"""


from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compiler.layers import EngineLayer
from compiler.lower.exact import exact_epilogue, plain_constant, power_of_two_above
from compiler.lower.export import pin_ir_version
from compiler.lower.graph import GraphEditor
from compiler.lower.image import EXACT_SUM, exact_image_conv
from compiler.lower.pooled import exact_statistics
from compiler.lower.qdq import (
    FLOAT_TYPES,
    OUTPUT_BITS,
    Chain,
    Encoding,
    Grid,
    finish_engine,
    float_weight,
    integer_scale,
    lower_graph,
    lower_weight,
    model_opset,
    take_bias,
)
from compiler.lower.trt_check import INT8_MAX, INT8_MIN, attribute, check_tensorrt_graph
from runtime.errors import ConfigError, EngineError, unknown_name
from runtime.manifest import MIN_OPSET

FP16_MIN_OPSET = 19  # FP16 Q/DQ scales (QuantizeLinear-19 / DequantizeLinear-19)

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


class TensorRTEncoding(Encoding):
    """Symmetric int8 Q/DQ with a float Clip before each narrower Q (module docstring); every
    conv with a quantized input computes on its integer levels (:meth:`feed`, :meth:`lower_conv`).

    ``quantizers`` collects each Q's stored range by node name; ``fed`` each quantized conv's
    input grid, shift and DQ scale.
    """

    dialect = "tensorrt"  # residual streams stay float between Q/DQ; statistics FP32 (no FP64)
    # but exact in FP32 graphs (compiler.lower.pooled)

    def __init__(self, float_type: str = "fp32", opset: int = MIN_OPSET) -> None:
        self.quantizers: dict[str, tuple[int, int]] = {}
        self.fed: dict[str, tuple[Grid, int, float, float]] = {}
        self.cut: set[Grid] = set()  # input grids cut to fit int8 with 0 (fit_int8)
        # the integer image conv's sums reach 2^24, the exact means' grid has 2^24 levels:
        # exact in FP32 graphs only
        self.exact_image = float_type == "fp32"
        self.statistics = "exact" if float_type == "fp32" else "float"
        self.opset = opset

    def finish(self, g: GraphEditor) -> None:
        """FP32 graphs: per-image statistics that every implementation computes to the same
        bits (``compiler.lower.pooled``)."""
        if self.statistics == "exact":
            exact_statistics(g, self.opset)

    def image_conv(self, g: GraphEditor, conv: onnx.NodeProto, name: str
                   ) -> dict[str, Any] | None:
        """The image conv on the integer pixels in FP32 graphs (its sums reach 2^24)."""
        return exact_image_conv(g, conv, name, plain_constant) if self.exact_image else None

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
        unit = F32(power_of_two_above(grid.step))
        ratio = F32(unit / F32(grid.step))
        if ratio != 1:
            tensor = g.node("Mul", [tensor, g.constant(f"{base}.ratio", np.array(ratio, F32))],
                            f"{base}.ratio")
        if k:
            shift = g.constant(f"{base}.shift", np.array(F32(k) * unit, dtype=F32))
            tensor = g.node("Add", [tensor, shift], f"{base}.shift")
        stored = self._clip_quantize(g, tensor, grid, unit, base, pad=conv)
        dequantized = g.node("DequantizeLinear", [stored, self._scale(g, unit, base),
                                                  self._zero(g, base)], f"{base}.dq")
        conv.input[0] = dequantized
        self.fed[layer.name] = (grid, k, float(unit), float(ratio))
        return dequantized

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
    auto_pad = attribute(conv, "auto_pad", b"NOTSET")
    if auto_pad not in (b"NOTSET", b"VALID"):
        raise EngineError(f"conv {conv.name!r}: auto_pad {auto_pad.decode()} cannot move into a "
                          "Pad; export with explicit pads")
    pads = [int(p) for p in attribute(conv, "pads", [])]
    if not any(pads):
        return tensor
    half = len(pads) // 2
    onnx_pads = np.array([0, 0, *pads[:half], 0, 0, *pads[half:]], dtype=np.int64)
    conv_pads = next(attr for attr in conv.attribute if attr.name == "pads")  # non-zero: present
    del conv_pads.ints[:]
    conv_pads.ints.extend([0] * len(pads))
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
            axis = int(attribute(node, "axis", 1)) if scale.ndim else 0
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
        elif node.op_type == "Cast" and attribute(node, "to", 0) == TensorProto.FLOAT:
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
    encoding = TensorRTEncoding(float_type, opset)
    model, summary = lower_graph(fp, layers, encoding, requantize=requantize)
    if float_type == "fp16":
        fp16_weights = _to_fp16(model)
        for entry in summary:
            entry["fp16_weights"] = f"{entry['name']}.weight" in fp16_weights
    finish_engine(model, encoding.dialect, summary, float_type=float_type, opset=opset,
                  statistics=encoding.statistics,
                  quantizers={name: list(r) for name, r in encoding.quantizers.items()})
    check_tensorrt_graph(model, opset)
    return model
