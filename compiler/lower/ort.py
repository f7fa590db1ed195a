"""The ONNX Runtime dialect of the lowering: uint8 grids that ORT's CPU QDQ fusion runs as
QLinearConv (real INT8 kernels), exact against the simulation.

What each quantized conv gets (placement: ``compiler.lower.qdq``):

- **weight**: int8 initializer ``q = clamp(round(clamp(w, -c, c) / s_w), -L, L)``, scale
  ``s_w = c / L`` per tensor or per output channel (``axis=0``), then DequantizeLinear. The int8
  initializer keeps the float weight's name (``body.0.body.2.weight``), so lowered and optimized
  graphs are still addressed by module name.
- **input activation** at ``b <= 8`` bits: ``QuantizeLinear`` (uint8, scale ``step``, zero point
  ``round(-l / step)``) -> ``Clip`` -> ``DequantizeLinear``, exactly ``quantize_asymmetric``
  (symmetric records: the ``[-a, a]`` grid of ``quantize_symmetric``, zero point ``2^(b-1) - 1``).
  The Clip is on the *uint8* values (the grid's ``[-zp, 2^b - 1 - zp]`` plus ``zp``), only when
  the grid is narrower than uint8 (``b < 8``): same numbers as a float Clip before the Q, one
  byte per value, and possible after a fused conv (below). ``b > 8``: the input stays float.
- **output**: ORT fuses ``DQ -> Conv -> Q`` into QLinearConv only when a Q follows the conv:
  the shared placement puts one there wherever it can; a residual stream at 8 bits is quantized
  once for all its readers (:func:`_streams`), and an RGB conv whose output is the image gets
  the image's own 8-bit grid (:func:`_image_grid_output`).

Arithmetic (dialect ``"ort"``): a quantized network amplifies rounding differences (a level
flipped next to a rounding tie moves ~9 x C sums of the next conv, some of which flip in turn;
IMDN x4 engines were 37-43 dB from their simulation on Set5 from that alone), so the engine's
own arithmetic is made exact where it was not, and ``compiler.parity`` models the rest:

- QLinearConv accumulates in int32 (exact), adds the bias as int32 on the ``s_x * s_w``
  lattice and requantizes with ``fp32(acc + b) * fp32(s_x * s_w / s_y)``;
- a conv with a quantized input and a float output runs on its integer levels
  (:func:`_integer_conv`: FP32 sums of integers are exact), then ``* s_x * s_w + b``; the conv
  that reads the image, when the plan keeps it float, runs on the integer pixels
  (``compiler.lower.image``);
- per-image statistics (ReduceMean, and the ops on the pooled values: IMDN's attention) run in
  FP64 (:func:`_statistics_in_double`).

The summary records each conv's ``input_grid`` / ``output_grid`` and ``integer_conv``. With
these, IMDN x4 and EDSR x2 engines match their simulation bit for bit on Set5 (EDSR's image-grid
output, whose Q holds a folded constant, only to a level on a few pixels). Other float ops
(LeakyReLU, Mul, Add) are single IEEE operations, the same in torch and ORT.

Exactness limits besides the requantized outputs: an 8-bit grid whose bounds exclude 0
(``l > 0``, possible after training) has no uint8 zero point: its top ``-zp`` levels are cut
(``truncated_grid``; the parity simulation cuts them too). DDTB gates are frozen at their
calibration mean (``frozen_gate``). Every layer's placement is stored in the model's metadata
(``adasr.lowering``, read back by :func:`lowering_summary`).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compiler.layers import EngineLayer
from compiler.lower.exact import exact_epilogue, per_channel_constant
from compiler.lower.graph import GraphEditor
from compiler.lower.image import exact_image_conv
from compiler.lower.qdq import (
    OUTPUT_BITS,
    UINT8_MAX,
    Chain,
    Encoding,
    Grid,
    finish_engine,
    integer_scale,
    lower_graph,
    lower_weight,
    model_opset,
    take_bias,
    weight_levels,
)
from compiler.quant.quantizers import MAX_INT_BITS
from runtime.errors import ConfigError

F32 = np.float32
POOLED_OPS = ("Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Relu", "Sigmoid", "Conv")


def quantize_uint8(g: GraphEditor, tensor: str, grid: Grid, base: str) -> str:
    """Q (uint8, zero point of the grid) and, where the grid is narrower, an integer Clip."""
    scale = g.constant(f"{base}.scale", np.array(grid.step, dtype=F32))
    zero = g.constant(f"{base}.zero_point", np.array(grid.zero_point, dtype=np.uint8))
    stored = g.node("QuantizeLinear", [tensor, scale, zero], f"{base}.q")
    low, high = grid.stored
    if (low, high) == (0, UINT8_MAX):
        return stored
    bounds = [g.constant(f"{base}.{side}", np.array(v, dtype=np.uint8))
              for side, v in (("low", low), ("high", high))]
    return g.node("Clip", [stored, *bounds], f"{base}.clip")


def dequantize_uint8(g: GraphEditor, stored: str, grid: Grid, base: str) -> str:
    scale = g.constant(f"{base}.scale", np.array(grid.step, dtype=F32))
    zero = g.constant(f"{base}.zero_point", np.array(grid.zero_point, dtype=np.uint8))
    return g.node("DequantizeLinear", [stored, scale, zero], f"{base}.dq")


def _streams(g: GraphEditor, convs: Mapping[str, onnx.NodeProto],
             layers: Mapping[str, EngineLayer]) -> dict[str, tuple[float, float]]:
    """Convs at 8 bits whose input is a residual stream: an Add output that other nodes read too.

    Quantizing the stream once, on the conv's 8-bit grid widened to the stream's calibrated FP
    range (``input_range``), lets every Add of the stream run on uint8 (QLinearAdd) and keeps
    the skip path unclipped. Returns conv name -> the widened bounds.
    """
    found = {}
    for name, conv in convs.items():
        layer = layers[name]
        producer = g.producer(conv.input[0])
        if (layer.act_bits == MAX_INT_BITS and layer.input_range is not None
                and not layer.frozen_gate and not layer.symmetric
                and producer is not None and producer.op_type == "Add"
                and not any(g.constant_tensor(t) for t in producer.input)  # a skip, not a bias
                and len(g.consumers(conv.input[0])) > 1):
            found[name] = (min(layer.bounds[0], layer.input_range[0]),
                           max(layer.bounds[1], layer.input_range[1]))
    return found


def _image_grid_output(g: GraphEditor, conv: onnx.NodeProto) -> str | None:
    """Quantize an RGB conv's output on the final image's own 8-bit grid: exact, and INT8.

    When the graph output is ``y / c`` (or ``y * m``), possibly through DepthToSpace and an
    identity-weight 1x1 conv that only adds a constant per channel (EDSR's ``add_mean``, folded
    into this conv's bias), the output image is ``round(255 * y / c)``: a uint8 Q with scale
    ``c / 255`` and zero point 0 after the conv rounds to the same values the runtime rounds
    the output to, so it costs no accuracy (and the simulation needs no change), and the conv
    runs as QLinearConv instead of FP32 on a dequantized input.
    """
    path, tensor, divisor, fold = [], conv.output[0], 1.0, None
    while tensor not in g.outputs:
        readers = g.consumers(tensor)
        if len(readers) != 1:
            return None
        node = readers[0]
        if node.op_type == "DepthToSpace":
            pass
        elif node.op_type in ("Div", "Mul") and node.input[0] == tensor:
            value = g.inits.get(node.input[1])
            if value is None or numpy_helper.to_array(value).size != 1:
                return None
            factor = float(numpy_helper.to_array(value).reshape(()))
            divisor *= factor if node.op_type == "Div" else 1 / factor
        elif node.op_type == "Conv" and fold is None and node is not conv and len(node.input) == 3:
            weight, bias = (g.inits.get(node.input[i]) for i in (1, 2))
            if weight is None or bias is None:
                return None
            w = numpy_helper.to_array(weight)
            channels = w.shape[0]
            if w.shape != (channels, channels, 1, 1) or not np.array_equal(
                    w[:, :, 0, 0], np.eye(channels, dtype=w.dtype)):
                return None
            fold = node
        else:
            return None
        path.append(node)
        tensor = node.output[0]
    if not 0 < divisor < math.inf or len(conv.input) < 3 or conv.input[2] not in g.inits:
        return None
    if fold is not None:  # y + b_fold: add the constant to this conv's bias, drop the 1x1 conv
        bias = numpy_helper.to_array(g.inits[conv.input[2]]).astype(F32)
        extra = numpy_helper.to_array(g.inits[fold.input[2]]).astype(F32)
        conv.input[2] = g.constant(f"{conv.input[2]}.folded", bias + extra)
        g.drop(fold)
        for node in g.consumers(fold.output[0]):
            node.input[:] = [conv.output[0] if t == fold.output[0] else t for t in node.input]
    grid = Grid(step=divisor / UINT8_MAX, low=0, high=UINT8_MAX)
    readers = g.consumers(conv.output[0])
    out = dequantize_uint8(g, quantize_uint8(g, conv.output[0], grid, f"{conv.output[0]}.image"),
                           grid, f"{conv.output[0]}.image")
    for node in readers:
        node.input[:] = [out if t == conv.output[0] else t for t in node.input]
    return "the output image's 8-bit grid (exact)"


def _integer_conv(g: GraphEditor, conv: onnx.NodeProto, layer: EngineLayer, grid: Grid) -> bool:
    """A conv with a quantized input and a float output, on its integer levels: exact.

    ``DQ(x) -> Conv(DQ(w)) + b`` runs in FP32 and rounds every partial sum, while QLinearConv
    and the simulation accumulate exactly; one rounded sum next to a rounding tie of a later
    quantizer flips a level, and the flips multiply layer after layer (IMDN x4 emulate engines,
    whose convs all have float outputs: 38.7-41.7 dB from the simulation on Set5, first flip
    one value in a million). Here the conv reads the integer levels (``DQ`` with scale 1 and
    the grid's zero point) with the weights' integer levels as a float constant (a constant
    weight lets ONNX Runtime use its fast NCHWc FP32 conv: 31 instead of 51 ms for EDSR's
    ``body.8`` on 8 x 96 x 96 tiles, one thread), where FP32 sums are exact while they stay below
    2^24 (guaranteed up to 518 products of 8-bit levels; the sums of a 64-channel 3x3 conv, 576
    products, stay far below it on real inputs), then ``* (s_x * s_w) + b`` per output channel
    (``compiler.lower.exact``: constants ONNX Runtime cannot fold into the weights).
    Returns False (graph unchanged) when the conv's input is not the DQ this module wrote or
    its output is a graph output.
    """
    dq = g.producer(conv.input[0])
    if dq is None or dq.op_type != "DequantizeLinear" or conv.output[0] in g.outputs:
        return False
    stored, zero = dq.input[0], dq.input[2]
    channels = int(g.inits[conv.input[1]].dims[0])
    conv.input[1], w_step = weight_levels(g, conv, layer, as_float=True)  # fast NCHWc conv
    one = g.constant(f"{layer.name}.input.unit_scale", np.ones((), dtype=F32))
    if len(g.consumers(dq.output[0])) == 1:
        g.drop(dq)
    conv.input[0] = g.node("DequantizeLinear", [stored, one, zero], f"{layer.name}.input.levels")
    bias = take_bias(g, conv, layer)
    exact_epilogue(g, conv, integer_scale(grid, w_step, channels), bias, f"{layer.name}.output")
    return True


def _bias_on_lattice(g: GraphEditor) -> int:
    """Write each QLinearConv's bias as the int32 multiple of ``s_x * s_w`` ONNX Runtime adds.

    ONNX Runtime fuses ``DQ(x) -> Conv(DQ(w), b) -> Q`` into QLinearConv and rounds the float
    bias onto the ``s_x * s_w`` lattice (half to even), which the simulation models
    (``QConv2d.integer_bias``). Storing the lattice value itself leaves ONNX Runtime's integers
    unchanged and makes the graph mean what it computes, so a backend that adds the float bias
    after dequantizing (OpenVINO's low-precision convs) adds the same value: EDSR x2 emulate
    INT8-low on OpenVINO went from 48.0 to 53.6 dB against ONNX Runtime (min over Set5).
    Returns how many biases were rewritten.
    """
    count = 0
    for conv in [node for node in g.graph.node if g._live(node) and node.op_type == "Conv"]:
        x, w = (g.producer(conv.input[i]) for i in (0, 1))
        readers = g.consumers(conv.output[0])
        if (len(conv.input) < 3 or conv.input[2] not in g.inits or x is None or w is None
                or x.op_type != "DequantizeLinear" or w.op_type != "DequantizeLinear"
                or x.input[1] not in g.inits or w.input[1] not in g.inits
                or not readers or any(r.op_type != "QuantizeLinear" for r in readers)):
            continue
        x_step = numpy_helper.to_array(g.inits[x.input[1]]).astype(F32)
        w_step = numpy_helper.to_array(g.inits[w.input[1]]).astype(F32).reshape(-1)
        bias = numpy_helper.to_array(g.inits[conv.input[2]]).astype(F32)
        step = (x_step * w_step).astype(F32)
        lattice = (np.round((bias / step).astype(F32)) * step).astype(F32)
        conv.input[2] = g.constant(f"{conv.input[2]}.lattice", lattice)
        count += 1
    return count


def _statistics_in_double(g: GraphEditor) -> int:
    """Per-image statistics in FP64: every ReduceMean, and the ops computed from them alone.

    ONNX Runtime's FP32 ReduceMean over a whole image is far less accurate than torch's, most
    of all on the channels-last tensors its QLinearConvs leave (``ORT_ENABLE_ALL``): IMDN's
    contrast-aware attention gates (mean and std of 128x128 maps) came out 2.5e-5 (relative)
    off, against 5.6e-7 for torch in FP32, and moved 7.6e-4 of the next conv's input levels
    (Set5 'baby'), each flip seeding a cascade. The small FP32 ops after it (1x1 convs on the
    pooled vector, sigmoid) still leave the gates ~20 ulps from torch's. So each ReduceMean
    runs on an FP64 copy, and every op of :data:`POOLED_OPS` whose inputs are such results
    (or constants) runs in FP64 too (a 1x1 conv on the spatially pooled ``[N, C, 1, 1]``
    vector as a MatMul, ORT having no FP64 Conv); a Cast back to FP32 feeds every FP32 reader.
    The result is the FP32 rounding of the exact value, what the simulation computes
    (``fp64_statistics`` of the zoo modules, set by ``compiler.parity``). Returns how many
    ReduceMean nodes were rewritten.
    """
    twins: dict[str, str] = {}  # FP32 tensor -> its FP64 copy
    pooled: set[str] = set()  # tensors of spatial size 1 (a ReduceMean over H and W)
    nodes = [node for node in g.graph.node if g._live(node)]
    for node in nodes:
        if node.op_type == "ReduceMean":
            source, result = node.input[0], node.output[0]
            node.input[0] = g.node("Cast", [source], f"{source}.fp64", to=onnx.TensorProto.DOUBLE)
            node.output[0] = twins[result] = g.fresh(f"{result}.fp64")
            g.graph.node.append(helper.make_node("Cast", [node.output[0]], [result],
                                                 g.fresh(f"{result}.fp32_op"),
                                                 to=onnx.TensorProto.FLOAT))
            if _spatial_pool(g, node):
                pooled.add(result)
            continue
        if node.op_type not in POOLED_OPS:
            continue
        inputs = [name for name in node.input if name]
        if not (any(name in twins for name in inputs)
                and all(name in twins or name in g.inits for name in inputs)):
            continue
        result = node.output[0]
        if node.op_type == "Conv":
            twin = _pooled_conv(g, node, twins, pooled)
            if twin is None:
                continue
        else:
            copies = [twins.get(name) or g.constant(
                f"{name}.fp64", numpy_helper.to_array(g.inits[name]).astype(np.float64))
                for name in node.input]
            twin = g.fresh(f"{result}.fp64")
            g.graph.node.append(helper.make_node(node.op_type, copies, [twin],
                                                 g.fresh(f"{node.name}.fp64"),
                                                 domain=node.domain or None))
            g.graph.node[-1].attribute.extend(node.attribute)
        twins[result] = twin
        if any(name in pooled for name in inputs):
            pooled.add(result)
        node.op_type, node.domain = "Cast", ""  # the FP32 value, for FP32 readers
        del node.input[:], node.attribute[:]
        node.input.append(twin)
        node.attribute.append(helper.make_attribute("to", onnx.TensorProto.FLOAT))
    for node in list(g.graph.node):  # FP32 copies that every reader now takes in FP64
        if (node.op_type == "Cast" and node.output[0] in twins and g._live(node)
                and not g.consumers(node.output[0]) and node.output[0] not in g.outputs):
            g.drop(node)
    return sum(node.op_type == "ReduceMean" for node in nodes)


def _spatial_pool(g: GraphEditor, node: onnx.NodeProto) -> bool:
    """A ReduceMean over the two spatial axes of an NCHW tensor, keeping them (size 1)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    axes = attrs.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1] in g.inits:
        axes = numpy_helper.to_array(g.inits[node.input[1]]).tolist()
    return attrs.get("keepdims", 1) == 1 and axes is not None and sorted(
        int(a) % 4 for a in axes) == [2, 3]


def _pooled_conv(g: GraphEditor, conv: onnx.NodeProto, twins: Mapping[str, str],
                 pooled: set[str]) -> str | None:
    """A 1x1 conv (stride 1, no padding, one group) on a pooled ``[N, C, 1, 1]`` tensor in FP64:
    ``Unsqueeze(Flatten(x) @ W^T + b)``. None when the conv is not of that kind."""
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    weight = g.inits.get(conv.input[1])
    if (conv.input[0] not in pooled or weight is None or len(weight.dims) != 4
            or list(weight.dims[2:]) != [1, 1] or attrs.get("group", 1) != 1
            or any(v != 1 for v in [*attrs.get("strides", []), *attrs.get("dilations", [])])
            or any(attrs.get("pads", [])) or attrs.get("auto_pad", b"NOTSET") not in (
                b"NOTSET", "NOTSET")):
        return None
    base = conv.output[0]
    w = numpy_helper.to_array(weight).astype(np.float64)[:, :, 0, 0]
    flat = g.node("Flatten", [twins[conv.input[0]]], f"{base}.fp64_flat", axis=1)
    out = g.node("MatMul", [flat, g.constant(f"{conv.input[1]}.fp64_t", w.T.copy())],
                 f"{base}.fp64_matmul")
    if len(conv.input) > 2 and conv.input[2]:
        bias = numpy_helper.to_array(g.inits[conv.input[2]]).astype(np.float64)
        out = g.node("Add", [out, g.constant(f"{conv.input[2]}.fp64", bias)], f"{base}.fp64_bias")
    axes = g.constant(f"{base}.fp64_axes", np.array([2, 3], dtype=np.int64))
    return g.node("Unsqueeze", [out, axes], f"{base}.fp64")


class OrtEncoding(Encoding):
    """ONNX Runtime's encoding: uint8 with the grid's zero point, the Clip on the stored values,
    the ops on a chain's path (DepthToSpace) on uint8; residual streams on the 8-bit grid of the
    conv they feed, the image conv on the integer pixels, per-image statistics in FP64."""

    dialect = "ort"

    def image_conv(self, g: GraphEditor, conv: onnx.NodeProto, name: str
                   ) -> dict[str, Any] | None:
        return exact_image_conv(g, conv, name, per_channel_constant)

    def streams(self, g: GraphEditor, convs: Mapping[str, onnx.NodeProto],
                layers: Mapping[str, EngineLayer]) -> dict[str, tuple[float, float]]:
        return _streams(g, convs, layers)

    def image_output(self, g: GraphEditor, conv: onnx.NodeProto) -> str | None:
        return _image_grid_output(g, conv)

    def finish(self, g: GraphEditor) -> None:
        _statistics_in_double(g)
        _bias_on_lattice(g)

    def lower_conv(self, g: GraphEditor, conv: onnx.NodeProto, layer: EngineLayer,
                   grid: Grid | None, placement: str) -> bool:
        """Lower the conv's weights once every Q/DQ is placed; True when the conv then computes
        on its integer levels. ONNX Runtime: a float-output conv with a quantized input
        (:func:`_integer_conv`); the others run as QLinearConv (``DQ -> Conv -> Q``)."""
        if placement == "float" and grid is not None and _integer_conv(g, conv, layer, grid):
            return True
        lower_weight(g, conv, layer)
        return False

    def output_grid(self, output_range: tuple[float, float], relu: bool) -> Grid:
        """The 8-bit grid of a requantized conv output (after its ReLU when ``relu``)."""
        lower = 0.0 if relu else min(output_range[0], 0.0)
        return Grid.of_bounds((lower, max(output_range[1], 0.0)), OUTPUT_BITS)

    def truncated(self, grid: Grid) -> bool:
        """True when the stored type cannot hold every level of ``grid``."""
        return grid.truncated

    def quantize(self, g: GraphEditor, tensor: str, grid: Grid, base: str) -> str:
        """The stored (integer) tensor of float ``tensor`` on ``grid``."""
        return quantize_uint8(g, tensor, grid, base)

    def dequantize(self, g: GraphEditor, stored: str, grid: Grid, base: str) -> str:
        return dequantize_uint8(g, stored, grid, base)

    def feed(self, g: GraphEditor, conv: onnx.NodeProto, tensor: str, grid: Grid,
             layer: EngineLayer, base: str) -> str:
        """Quantize float ``tensor`` on ``grid`` and make its dequantized values the input of
        ``conv``; returns the dequantized tensor."""
        dequantized = self.dequantize(g, self.quantize(g, tensor, grid, base), grid, base)
        conv.input[0] = dequantized
        return dequantized

    def chain(self, g: GraphEditor, conv: onnx.NodeProto, chain: Chain, grid: Grid,
              target: onnx.NodeProto, target_layer: EngineLayer) -> Grid:
        """Q right after ``conv`` on the target's grid; ReLUs become the Q's saturation and the
        path's other ops (DepthToSpace) run on the stored integers. Returns the grid of the Q."""
        if any(node.op_type == "Relu" for node in chain.path):
            grid = grid.after_relu()
        base = f"{chain.target}.input"
        tensor = self.quantize(g, conv.output[0], grid, base)
        for node in chain.path:
            if node.op_type == "Relu":
                g.drop(node)
            else:
                node.input[0] = tensor
                node.output[0] = tensor = g.fresh(f"{node.output[0]}.quantized")
        target.input[0] = self.dequantize(g, tensor, grid, base)
        return grid

    def notes(self, layer: EngineLayer, input_grid: Grid | None, output_grid: Grid | None,
              integer: bool) -> dict[str, Any]:
        """Dialect-specific facts of one layer for the lowering metadata: here the conv
        arithmetic that ``compiler.parity`` models (:func:`_arithmetic`)."""
        return _arithmetic(input_grid, output_grid, integer)


def _arithmetic(input_grid: Grid | None, output_grid: Grid | None, integer: bool
                ) -> dict[str, Any]:
    """Summary keys of the ORT dialect's conv arithmetic (see ``compiler.parity``): the
    ``input_grid`` of a quantized input and the ``output_grid`` of the Q right after the conv's
    values (QLinearConv requantizes onto it), each as step, zero point and stored range (a
    truncated grid stores fewer levels than it has), and ``integer_conv``, a float output
    computed on integer levels (:func:`_integer_conv`)."""
    keys: dict[str, Any] = {"integer_conv": integer}
    for key, grid in (("input_grid", input_grid), ("output_grid", output_grid)):
        if grid is not None:
            keys[key] = {"step": grid.step, "zero_point": grid.zero_point,
                         "stored": list(grid.stored)}
    return keys


def lower_ort(fp_model: onnx.ModelProto, layers: Sequence[EngineLayer], *,
              requantize: bool = True, streams: bool = True, float_type: str = "fp32",
              max_opset: int | None = None) -> onnx.ModelProto:
    """The ONNX Runtime engine of ``layers``: FP32 at the FP graph's opset, which must not
    exceed ``max_opset`` when given. ``streams=False`` keeps residual streams float even at 8
    bits (:func:`_streams`); ``requantize=False`` leaves float every output that does not feed
    a quantized conv (an exact engine, slower than the FP32 graph on ORT)."""
    opset = model_opset(fp_model)
    if float_type != "fp32" or (max_opset is not None and opset > max_opset):
        raise ConfigError(f"the ort dialect keeps the FP graph's FP32 and opset {opset}: got "
                          f"float_type {float_type!r}, max_opset {max_opset}; allowed: fp32, "
                          f"max_opset >= {opset}")
    model, summary = lower_graph(fp_model, layers, OrtEncoding(), requantize=requantize,
                                 streams=streams)
    return finish_engine(model, "ort", summary)


def ort_fused_layers(engine: onnx.ModelProto, threads: int = 1) -> set[str]:
    """The layers ONNX Runtime (CPU, all optimizations) runs as QLinearConv.

    Loads ``engine`` with ``optimized_model_filepath`` and reads the weight name of every
    QLinearConv of the optimized graph (the int8 weight keeps the module's weight name).
    """
    import onnxruntime as ort  # the ORT dialect's own check; the lowering itself needs no ORT

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.optimized_model_filepath = str(path)
        options.log_severity_level = 3  # the NCHWc serialization warning is expected
        ort.InferenceSession(engine.SerializeToString(), options,
                             providers=["CPUExecutionProvider"])
        optimized = onnx.load(str(path))
    return {node.input[3].removesuffix(".weight") for node in optimized.graph.node
            if node.op_type == "QLinearConv"}
