"""Lower the FP ONNX graph to one integer engine: Q/DQ for a record's bits at one image offset.

``engine_layers(record, d_img)`` reads a calibration record into per-layer specs
(:class:`EngineLayer`); ``lower_engine(fp_model, layers)`` writes them into a copy of the FP
graph. Only the record's learned quantities are used (bounds, clips, bits, output ranges):
nothing is re-calibrated. The engine for offset ``d`` reproduces ``QuantizedSR`` with
``forced_d_img = d``.

What each quantized conv gets (dialect ``"ort"``, ONNX Runtime's CPU QDQ fusion):

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
- **output**: ORT fuses ``DQ -> Conv -> Q`` into QLinearConv (INT8 kernels) only when a Q
  follows the conv. Placement (measured against the simulation, ``tests/compiler/test_lower.py``
  and the numbers below):

  1. *Chain* (exact): when the conv's only path leads, through ReLU / DepthToSpace only, to the
     input of another quantized conv, the Q after the conv **is** that conv's input quantizer
     (same scale and zero point). A ReLU on the path becomes the Q's saturation and is removed
     (``Q(relu(y)) = relu(Q(y))`` on a zero-anchored grid); DepthToSpace runs on uint8. This
     costs no accuracy: EDSR's first conv of every block, the upsampler conv (``fq``).
  2. *Requantized*: every other conv with a quantized input gets an 8-bit uint8 Q/DQ on the
     record's ``output_range`` (widened to contain 0; after its ReLU, folded, when one follows).
     That rounding is **not** in the simulation, and outputs beyond the calibrated range
     saturate. EDSR x2, 8 blocks, fq, 64x64 tiles, against the simulation: 50-53 dB on natural
     image crops instead of 54-55 dB with exact placement, and 34-39 dB instead of 54 dB on
     uniform noise (far outside the calibrated ranges). Without it (``requantize=False``: exact
     engine) those convs run in FP32 between NHWC INT8 regions and the engine is *slower* than
     the FP32 graph (0.9x); with it every body conv fuses (1.7-1.8x at 256x256, 2 threads).
  3. Convs with <= 4 output channels (the RGB tail) keep float outputs: their rounding would land
     on the image itself, and fusing them gains nothing measurable.

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

Dialects: the placement above is shared; *how* a grid is written is an :class:`Encoding` (this
module's is ONNX Runtime's). ``dialect="tensorrt"`` writes symmetric int8 Q/DQ with a float Clip
before each Q, optional FP16 (``compiler.lower.trt``).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper

from compiler.lower.exact import exact_epilogue, per_channel_constant
from compiler.lower.export import conv_nodes, pin_ir_version
from compiler.lower.image import exact_image_conv
from compiler.quant.qmodel import FIXED_BITS
from compiler.quant.quantizers import MAX_INT_BITS
from runtime.errors import ConfigError, EngineError, unknown_name

DIALECTS = ("ort", "tensorrt")
FLOAT_TYPES = ("fp32", "fp16")
UINT8_MAX = 255
OUTPUT_BITS = 8  # the Q after a conv whose consumer is not a quantized conv
GRID_PRESERVING = ("Relu", "DepthToSpace")  # ops that map a zero-anchored grid onto itself
METADATA_KEY = "adasr.lowering"
THIN_CHANNELS = 4  # convs with <= 4 output channels (the RGB tail) keep float outputs
IMAGE_PLACEMENT = "float, on the integer pixels (exact)"

F32 = np.float32


@dataclass(frozen=True)
class EngineLayer:
    """How one quantized conv runs in one engine (from a calibration record and an offset).

    ``act_bits`` above 8 means the conv's input stays float; ``bounds`` are the activation
    bounds (l, u) after freezing a DDTB gate (``frozen_gate``), read as ``[-a, a]`` with
    ``a = max(|l|, |u|)`` when ``symmetric``; ``w_clip`` is one clip or one per output channel;
    ``output_range`` / ``input_range`` are the FP ranges of the conv's output and input
    (calibration; ``input_range`` sets the grid of a shared residual stream, see ``lower_graph``).
    ``float_output`` keeps the conv's output float (no requantization after it: ORT dialect, an
    exact FP32 conv on the integer levels, see :func:`_integer_conv`); ``exact_image`` runs a conv
    that reads the image in FP32 on the integer pixels (ORT dialect, ``compiler.lower.image``).
    """

    name: str
    act_bits: float
    bounds: tuple[float, float]
    w_bits: int
    w_clip: float | tuple[float, ...]
    output_range: tuple[float, float] | None = None
    input_range: tuple[float, float] | None = None
    frozen_gate: bool = False
    symmetric: bool = False
    float_output: bool = False
    exact_image: bool = False

    def __post_init__(self) -> None:
        lowest = 2 if self.symmetric else 1
        if not (float(self.act_bits).is_integer() and self.act_bits >= lowest):
            raise ConfigError(f"layer {self.name!r}: activation bits {self.act_bits} must be an "
                              f"integer >= {lowest} (> 8: float input)")
        if not 2 <= self.w_bits <= MAX_INT_BITS:
            raise ConfigError(f"layer {self.name!r}: weight bits {self.w_bits} out of range 2..8")
        clips = self.w_clip if isinstance(self.w_clip, tuple) else (self.w_clip,)
        values = [*self.bounds, *clips, *(self.output_range or ())]
        if not all(math.isfinite(v) for v in values) or min(clips) <= 0:
            raise ConfigError(f"layer {self.name!r}: bounds {self.bounds}, clips and output "
                              "range must be finite and clips > 0")

    @property
    def quantizes_input(self) -> bool:
        return self.act_bits <= MAX_INT_BITS


def _frozen_bounds(layer: Mapping[str, Any]) -> tuple[tuple[float, float], bool]:
    """(l, u) of a record layer; a DDTB gate frozen at its mean scales (float32, as simulated)."""
    lower, upper = (F32(v) for v in layer["a_bounds"])
    gate = layer.get("gate")
    if gate is None:
        return (float(lower), float(upper)), False
    scale = gate.get("mean_scale")
    if not scale or len(scale) != 2:
        raise ConfigError(f"layer {layer['name']!r} has a DDTB gate without 'mean_scale': an "
                          "engine cannot run a per-image gate; recalibrate to record its mean")
    return (float(lower * F32(scale[0])), float(upper * F32(scale[1]))), True


def engine_layers(record: Mapping[str, Any], d_img: int) -> tuple[EngineLayer, ...]:
    """The per-layer spec of the engine for image offset ``d_img`` of a calibration record."""
    vectors, key = record["bit_vectors"], str(d_img)
    if key not in vectors:
        raise ConfigError(unknown_name(f"image offset of this {record['settings']['method']} "
                                       "record", key, vectors))
    adaptive = sum(layer["kind"] == "adaptive" for layer in record["layers"])
    if adaptive != len(vectors[key]):
        raise ConfigError(f"record has {adaptive} adaptive layers but {len(vectors[key])} bits "
                          f"for image offset {d_img}")
    bits = iter(vectors[key])  # in adaptive-layer order, as the record lists the layers
    out = []
    for layer in record["layers"]:
        bounds, frozen = _frozen_bounds(layer)
        clip = layer["w_clip"]
        out_range, in_range = layer.get("output_range"), layer.get("input_range")
        out.append(EngineLayer(
            name=layer["name"],
            act_bits=float(next(bits)) if layer["kind"] == "adaptive" else float(FIXED_BITS),
            bounds=bounds, w_bits=int(layer["w_bits"]),
            w_clip=tuple(float(c) for c in clip) if isinstance(clip, list) else float(clip),
            output_range=(float(out_range[0]), float(out_range[1])) if out_range else None,
            input_range=(float(in_range[0]), float(in_range[1])) if in_range else None,
            frozen_gate=frozen, symmetric=bool(record["settings"].get("symmetric", False))))
    return tuple(out)


# -- integer grids ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """Values ``k * step`` for integers ``k`` in ``[low, high]``: one quantizer's output grid.

    Stored in a uint8 tensor as ``k + zero_point``. The zero point is ``-low`` clamped to
    [0, 255]: the Q's own saturation then clips at ``low`` and a ReLU before it is implicit.
    """

    step: float
    low: int
    high: int

    @classmethod
    def of_bounds(cls, bounds: tuple[float, float], bits: float, symmetric: bool = False) -> Grid:
        """The simulated quantizer's grid, in its float32 arithmetic (round half to even).

        ``quantize_asymmetric`` on ``[l, u]``, or ``quantize_symmetric`` on ``[-a, a]``.
        """
        lower, upper = F32(bounds[0]), F32(bounds[1])
        if symmetric:
            levels = F32(2.0 ** (bits - 1) - 1)
            step = np.maximum(np.maximum(np.abs(lower), np.abs(upper)), F32(1e-6)) / levels
            return cls(float(step), -int(levels), int(levels))
        top = F32(2.0 ** bits - 1)
        step = np.maximum(upper - lower, F32(1e-6)) / top
        zero_point = int(np.round(-lower / step))
        return cls(float(step), -zero_point, int(top) - zero_point)

    def after_relu(self) -> Grid:
        return replace(self, low=max(self.low, 0), high=max(self.high, 0))

    @property
    def zero_point(self) -> int:
        return min(max(-self.low, 0), UINT8_MAX)

    @property
    def stored(self) -> tuple[int, int]:
        """The range of stored uint8 values (``[0, 255]`` except where the grid is narrower)."""
        z = self.zero_point
        return max(self.low + z, 0), min(self.high + z, UINT8_MAX)

    @property
    def truncated(self) -> bool:
        """True when the grid does not fit in uint8: an 8-bit grid whose bounds exclude 0."""
        return self.stored != (self.low + self.zero_point, self.high + self.zero_point)


def quantize_weight(weight: npt.NDArray[np.float32], layer: EngineLayer
                    ) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    """``quantizers.quantize_weight`` as integers: (int8 weight, scale per tensor or channel)."""
    levels = F32(2 ** (layer.w_bits - 1) - 1)
    clip = np.asarray(layer.w_clip, dtype=F32)
    if clip.ndim == 1 and clip.shape[0] != weight.shape[0]:
        raise EngineError(f"layer {layer.name!r}: {clip.shape[0]} weight clips for "
                          f"{weight.shape[0]} output channels")
    step = clip / levels
    per_channel = (-1, *([1] * (weight.ndim - 1))) if clip.ndim else ()
    clip_b, step_b = clip.reshape(per_channel), step.reshape(per_channel)
    q = np.clip(np.round(np.minimum(np.maximum(weight, -clip_b), clip_b) / step_b), -levels, levels)
    return q.astype(np.int8), step.astype(F32)


# -- graph editing ------------------------------------------------------------------------------


class GraphEditor:
    """A small editor over a GraphProto: unique names, consumers, new nodes and initializers."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}
        self._used = {name for n in graph.node for name in [*n.input, *n.output, n.name]}
        self._used |= set(self.inits) | {i.name for i in graph.input}
        self._dropped: set[str] = set()  # first outputs of removed nodes (ReLUs folded into a Q)

    def _live(self, node: onnx.NodeProto) -> bool:
        return node.output[0] not in self._dropped

    def consumers(self, tensor: str) -> list[onnx.NodeProto]:
        return [n for n in self.graph.node if tensor in n.input and self._live(n)]

    def producer(self, tensor: str) -> onnx.NodeProto | None:
        return next((n for n in self.graph.node if tensor in n.output and self._live(n)), None)

    def constant_tensor(self, tensor: str) -> bool:
        """An initializer, or a DequantizeLinear of initializers (``compiler.lower.exact``)."""
        if tensor in self.inits:
            return True
        node = self.producer(tensor)
        return (node is not None and node.op_type == "DequantizeLinear"
                and all(t in self.inits for t in node.input if t))

    def drop(self, node: onnx.NodeProto) -> None:
        """Remove ``node`` when the graph is finished (its readers must be rewired)."""
        self._dropped.add(node.output[0])

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self._used:
            name, i = f"{base}_{i}", i + 1
        self._used.add(name)
        return name

    def release(self, name: str) -> None:
        """Remove an initializer and free its name."""
        self.graph.initializer.remove(self.inits.pop(name))
        self._used.discard(name)

    def constant(self, base: str, value: npt.NDArray[Any]) -> str:
        name = self.fresh(base)
        tensor = numpy_helper.from_array(value, name)
        self.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def node(self, op: str, inputs: Sequence[str], base: str, **attrs: Any) -> str:
        out = self.fresh(base)
        self.graph.node.append(helper.make_node(op, list(inputs), [out], self.fresh(f"{base}_op"),
                                                **attrs))
        return out

    def quantize(self, tensor: str, grid: Grid, base: str) -> str:
        """Q (uint8, zero point of the grid) and, where the grid is narrower, an integer Clip."""
        scale = self.constant(f"{base}.scale", np.array(grid.step, dtype=F32))
        zero = self.constant(f"{base}.zero_point", np.array(grid.zero_point, dtype=np.uint8))
        stored = self.node("QuantizeLinear", [tensor, scale, zero], f"{base}.q")
        low, high = grid.stored
        if (low, high) == (0, UINT8_MAX):
            return stored
        bounds = [self.constant(f"{base}.{side}", np.array(v, dtype=np.uint8))
                  for side, v in (("low", low), ("high", high))]
        return self.node("Clip", [stored, *bounds], f"{base}.clip")

    def dequantize(self, stored: str, grid: Grid, base: str) -> str:
        scale = self.constant(f"{base}.scale", np.array(grid.step, dtype=F32))
        zero = self.constant(f"{base}.zero_point", np.array(grid.zero_point, dtype=np.uint8))
        return self.node("DequantizeLinear", [stored, scale, zero], f"{base}.dq")

    def finish(self) -> None:
        """Drop bypassed nodes and unused initializers, sort topologically, clear value_info."""
        kept = [n for n in self.graph.node if self._live(n)]
        ordered = _topological(kept, {i.name for i in self.graph.input} | set(self.inits))
        copies = [onnx.NodeProto() for _ in ordered]
        for copy, node in zip(copies, ordered, strict=True):
            copy.CopyFrom(node)  # detached before the repeated field is cleared
        del self.graph.node[:]
        self.graph.node.extend(copies)
        used = {name for n in copies for name in n.input}
        unused = [t for t in self.graph.initializer if t.name not in used]
        for tensor in unused:
            self.graph.initializer.remove(tensor)
        del self.graph.value_info[:]


def _topological(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    ready = set(available) | {""}
    pending, ordered = list(nodes), []
    while pending:
        progress = [n for n in pending if all(i in ready for i in n.input)]
        if not progress:
            raise EngineError(f"lowered graph has a cycle or a missing input near "
                              f"{pending[0].op_type} {pending[0].name!r}")
        for node in progress:
            ready.update(node.output)
        ordered += progress
        chosen = {id(n) for n in progress}
        pending = [n for n in pending if id(n) not in chosen]
    return ordered


# -- lowering -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chain:
    """A conv whose output reaches another quantized conv's input through grid-preserving ops."""

    path: tuple[onnx.NodeProto, ...]
    target: str


def _chain_of(g: GraphEditor, conv: onnx.NodeProto, targets: Mapping[str, onnx.NodeProto]
              ) -> Chain | None:
    by_output = {node.output[0]: name for name, node in targets.items()}
    tensor, path = conv.output[0], []
    while tensor not in g.outputs:
        consumers = g.consumers(tensor)
        if len(consumers) != 1:
            return None
        nxt = consumers[0]
        if nxt.op_type in GRID_PRESERVING:
            path.append(nxt)
            tensor = nxt.output[0]
            continue
        name = by_output.get(nxt.output[0])
        if name is not None and nxt.input[0] == tensor:
            return Chain(tuple(path), name)
        return None
    return None


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
    out = g.dequantize(g.quantize(conv.output[0], grid, f"{conv.output[0]}.image"), grid,
                       f"{conv.output[0]}.image")
    for node in readers:
        node.input[:] = [out if t == conv.output[0] else t for t in node.input]
    return "the output image's 8-bit grid (exact)"


def _is_thin(g: GraphEditor, conv: onnx.NodeProto) -> bool:
    """An RGB-output conv: its 8-bit requantization error would land on the image itself."""
    weight = g.inits.get(conv.input[1])
    return weight is not None and weight.dims[0] <= THIN_CHANNELS


def _take_weight(g: GraphEditor, conv: onnx.NodeProto, layer: EngineLayer
                 ) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    """The conv's weight on the layer's grid (int8 levels, step per tensor or output channel),
    its float initializer released where no other node reads it (the name is free again)."""
    name = conv.input[1]
    source = g.inits.get(name)
    if source is None:
        raise EngineError(f"layer {layer.name!r}: conv weight {name!r} is not an initializer; "
                          "export with constant weights")
    levels, step = quantize_weight(numpy_helper.to_array(source).astype(F32), layer)
    if len(g.consumers(name)) == 1:
        g.release(name)
    return levels, step


def _weight_levels(g: GraphEditor, conv: onnx.NodeProto, layer: EngineLayer,
                   as_float: bool = False) -> tuple[str, npt.NDArray[np.float32]]:
    """The conv's weight on the layer's grid, as int8 levels (or float ones) under the float
    weight's name where not shared: (initializer name, step per tensor or output channel)."""
    name = conv.input[1]
    levels, step = _take_weight(g, conv, layer)
    return g.constant(name, levels.astype(F32) if as_float else levels), step


def float_weight(g: GraphEditor, conv: onnx.NodeProto, layer: EngineLayer) -> str:
    """The conv's weight on the layer's grid as float values ``level * step`` (FP32, as the
    simulation rounds them), under the float weight's name where not shared."""
    name = conv.input[1]
    levels, step = _take_weight(g, conv, layer)
    shape = (-1, *([1] * (levels.ndim - 1))) if step.ndim else ()
    conv.input[1] = g.constant(name, (levels.astype(F32) * step.reshape(shape)).astype(F32))
    return conv.input[1]


def lower_weight(g: GraphEditor, conv: onnx.NodeProto, layer: EngineLayer,
                 dq_scale: Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]
                 = lambda step: step
                 ) -> tuple[str, npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """The conv's weight becomes int8 (under the float weight's name where not shared) + DQ
    with scale ``dq_scale(step)`` (the step itself by default). Returns the int8 initializer's
    name, the weight step and the DQ scale (per tensor or per output channel).
    """
    weight, step = _weight_levels(g, conv, layer)
    scale = dq_scale(step)
    zero = g.constant(f"{layer.name}.weight_zero_point", np.zeros(step.shape, dtype=np.int8))
    attrs = {"axis": 0} if step.ndim else {}
    conv.input[1] = g.node("DequantizeLinear", [
        weight, g.constant(f"{layer.name}.weight_scale", scale), zero],
        f"{layer.name}.weight_dq", **attrs)
    return weight, step, scale


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
    conv.input[1], w_step = _weight_levels(g, conv, layer, as_float=True)  # fast NCHWc conv
    one = g.constant(f"{layer.name}.input.unit_scale", np.ones((), dtype=F32))
    if len(g.consumers(dq.output[0])) == 1:
        g.drop(dq)
    conv.input[0] = g.node("DequantizeLinear", [stored, one, zero], f"{layer.name}.input.levels")
    bias = take_bias(g, conv, layer)
    exact_epilogue(g, conv, integer_scale(grid, w_step, channels), bias, f"{layer.name}.output")
    return True


def take_bias(g: GraphEditor, conv: onnx.NodeProto, layer: EngineLayer
              ) -> npt.NDArray[np.float32] | None:
    """Remove the conv's bias input and return its values (None without one): a conv on
    integer levels adds it after its scale."""
    bias = None
    if len(conv.input) > 2 and conv.input[2]:
        if conv.input[2] not in g.inits:
            raise EngineError(f"layer {layer.name!r}: its bias is not an initializer; export "
                              "with constant weights")
        bias = numpy_helper.to_array(g.inits[conv.input[2]]).astype(F32)
    del conv.input[2:]
    return bias


def integer_scale(grid: Grid, w_step: npt.NDArray[np.float32], channels: int
                  ) -> npt.NDArray[np.float32]:
    """``fp32(s_x * s_w)`` per output channel: what multiplies a conv's integer sums."""
    scale: npt.NDArray[np.float32] = (F32(grid.step) * np.broadcast_to(w_step, (channels,))
                                      ).astype(F32)
    return scale


POOLED_OPS = ("Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Relu", "Sigmoid", "Conv")


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


class Encoding:
    """How a dialect writes grids into the graph; :func:`lower_graph` decides where they go.

    This one is ONNX Runtime's: uint8 with the grid's zero point, the Clip on the stored values,
    and the ops on a chain's path (DepthToSpace) running on uint8 (``integer_path``).
    ``compiler.lower.trt`` subclasses it for TensorRT.
    """

    dialect = "ort"
    shares_streams = True  # residual streams on the 8-bit grid of the conv they feed
    exact_image = True  # the image conv on the integer pixels (compiler.lower.image)
    statistics_in_double = True  # per-image statistics in FP64 (_statistics_in_double)

    def per_channel(self, g: GraphEditor, values: npt.NDArray[np.float32], base: str) -> str:
        """A ``[1, C, 1, 1]`` constant of an exact epilogue (``compiler.lower.exact``)."""
        return per_channel_constant(g, values, base)

    def lower_conv(self, g: GraphEditor, conv: onnx.NodeProto, layer: EngineLayer,
                   grid: Grid | None, placement: str) -> bool:
        """Lower the conv's weights once every Q/DQ is placed; True when the conv then computes
        on its integer levels. ONNX Runtime: a float-output conv with a quantized input
        (:func:`_integer_conv`); the others run as QLinearConv (``DQ -> Conv -> Q``)."""
        if placement == "float" and grid is not None and _integer_conv(g, conv, layer, grid):
            return True
        lower_weight(g, conv, layer)
        return False

    def input_grid(self, layer: EngineLayer) -> Grid:
        """The grid of a quantized conv's input (the simulated quantizer's)."""
        return Grid.of_bounds(layer.bounds, layer.act_bits, layer.symmetric)

    def output_grid(self, output_range: tuple[float, float], relu: bool) -> Grid:
        """The 8-bit grid of a requantized conv output (after its ReLU when ``relu``)."""
        lower = 0.0 if relu else min(output_range[0], 0.0)
        return Grid.of_bounds((lower, max(output_range[1], 0.0)), OUTPUT_BITS)

    def truncated(self, grid: Grid) -> bool:
        """True when the stored type cannot hold every level of ``grid``."""
        return grid.truncated

    def quantize(self, g: GraphEditor, tensor: str, grid: Grid, base: str) -> str:
        """The stored (integer) tensor of float ``tensor`` on ``grid``."""
        return g.quantize(tensor, grid, base)

    def dequantize(self, g: GraphEditor, stored: str, grid: Grid, base: str) -> str:
        return g.dequantize(stored, grid, base)

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


def lower_engine(fp_model: onnx.ModelProto, layers: Sequence[EngineLayer], dialect: str = "ort",
                 *, requantize: bool = True, float_type: str = "fp32",
                 max_opset: int | None = None, streams: bool = True) -> onnx.ModelProto:
    """The FP graph with the Q/DQ of ``layers`` (placement: see the module docstring).

    ``streams=False`` keeps residual streams float even at 8 bits (see ``_streams``).

    ``requantize=False`` leaves float every output that does not feed a quantized conv: an
    exact engine in which those convs run in FP32 (slower than the FP32 graph on ORT).
    ``dialect="tensorrt"`` dispatches to :func:`compiler.lower.trt.lower_tensorrt` (with
    ``float_type`` ``"fp32"`` or ``"fp16"`` and the target's ``max_opset``); the ORT dialect is
    FP32 at the FP graph's opset, which must not exceed ``max_opset`` when given.
    """
    if dialect not in DIALECTS:
        raise ConfigError(unknown_name("lowering dialect", dialect, DIALECTS))
    if float_type not in FLOAT_TYPES:
        raise ConfigError(unknown_name("float type", float_type, FLOAT_TYPES))
    if dialect == "tensorrt":
        from compiler.lower.trt import lower_tensorrt  # the dialect module builds on this one

        return lower_tensorrt(fp_model, layers, requantize=requantize, float_type=float_type,
                              max_opset=max_opset)
    opset = model_opset(fp_model)
    if float_type != "fp32" or (max_opset is not None and opset > max_opset):
        raise ConfigError(f"the ort dialect keeps the FP graph's FP32 and opset {opset}: got "
                          f"float_type {float_type!r}, max_opset {max_opset}; allowed: fp32, "
                          f"max_opset >= {opset}")
    model, summary = lower_graph(fp_model, layers, Encoding(), requantize=requantize,
                                 streams=streams)
    return finish_engine(model, dialect, summary)


def model_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain (``ai.onnx``) opset."""
    versions = [op.version for op in model.opset_import if op.domain in ("", "ai.onnx")]
    if len(versions) != 1:
        raise EngineError(f"the model imports the default ONNX domain {len(versions)} times; "
                          "expected once")
    return int(versions[0])


def lower_graph(fp_model: onnx.ModelProto, layers: Sequence[EngineLayer], encoding: Encoding,
                *, requantize: bool = True, streams: bool = True
                ) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """A copy of ``fp_model`` with the Q/DQ of ``layers`` written by ``encoding``, and the
    per-layer placement summary (not yet in the metadata: see :func:`finish_engine`)."""
    by_name = {layer.name: layer for layer in layers}
    if len(by_name) != len(layers):
        raise ConfigError("engine layers name the same conv twice")
    model = onnx.ModelProto()
    model.CopyFrom(fp_model)
    g = GraphEditor(model.graph)
    convs = conv_nodes(model.graph, list(by_name))
    images: dict[str, dict[str, Any] | None] = {}  # exact image convs (compiler.lower.image)
    for name, layer in by_name.items():
        if layer.exact_image:  # other dialects run it as the FP conv
            conv = convs.pop(name)
            images[name] = (exact_image_conv(g, conv, name, encoding.per_channel)
                            if encoding.exact_image else None)
    grids = {name: encoding.input_grid(layer)
             for name, layer in by_name.items() if layer.quantizes_input and name in convs}
    shared = streams and requantize and encoding.shares_streams
    stream_bounds = _streams(g, convs, by_name) if shared else {}
    for name, bounds in stream_bounds.items():
        grids[name] = encoding.input_grid(replace(by_name[name], bounds=bounds))
    targets = {name: convs[name] for name in grids}
    chains = {name: _chain_of(g, conv, targets) for name, conv in convs.items()}
    placement = {name: "float" for name in by_name}
    for name, rewritten in images.items():
        placement[name] = "float" if rewritten is None else IMAGE_PLACEMENT
    out_grids: dict[str, Grid] = {}  # the Q right after a conv's values (chains, requantized)
    for name, chain in chains.items():
        if chain is not None:
            out_grids[name] = encoding.chain(g, convs[name], chain, grids[chain.target],
                                             convs[chain.target], by_name[chain.target])
            placement[name] = f"on the input grid of {chain.target}"
    fed = {chain.target for chain in chains.values() if chain is not None}
    integer: set[str] = set()  # convs on their integer levels (Encoding.lower_conv)
    for name, conv in convs.items():
        layer = by_name[name]
        if name in grids and name not in fed:
            base = f"{name}.input"
            source = conv.input[0]
            readers = [node for node in g.consumers(source) if node is not conv]
            dequantized = encoding.feed(g, conv, source, grids[name], layer, base)
            if name in stream_bounds:  # the stream's other readers take the quantized values too
                for node in readers:
                    node.input[:] = [dequantized if t == source else t for t in node.input]
        image = None
        requantized = requantize and chains[name] is None and not layer.float_output
        if requantized and encoding.shares_streams and layer.quantizes_input:
            image = _image_grid_output(g, conv)
        if image is not None:
            placement[name] = image
        elif (requantized and layer.quantizes_input and layer.output_range is not None
                and not _is_thin(g, conv)):
            placement[name], grid = _lower_output(g, encoding, conv, layer)
            if grid is not None:
                out_grids[name] = grid
        if encoding.lower_conv(g, conv, layer, grids.get(name), placement[name]):
            integer.add(name)
    if encoding.statistics_in_double:
        _statistics_in_double(g)
    g.finish()
    summary = [{"name": layer.name, "act_bits": layer.act_bits, "frozen_gate": layer.frozen_gate,
                "output": placement[layer.name],
                "stream_bounds": (list(stream_bounds[layer.name])
                                  if layer.name in stream_bounds else None),
                "input_bounds": (list(stream_bounds.get(layer.name, layer.bounds))
                                 if layer.quantizes_input else None),
                "truncated_grid": layer.name in grids and encoding.truncated(grids[layer.name]),
                **({"image_input": images[layer.name]} if images.get(layer.name) else {}),
                **encoding.notes(layer, grids.get(layer.name), out_grids.get(layer.name),
                                 layer.name in integer)}
               for layer in layers]
    return model, summary


def finish_engine(model: onnx.ModelProto, dialect: str, summary: list[dict[str, Any]],
                  **facts: Any) -> onnx.ModelProto:
    """Store the summary (and dialect ``facts``) in the metadata, pin the IR, check the model."""
    props = {p.key: p.value for p in model.metadata_props}
    props[METADATA_KEY] = json.dumps({"dialect": dialect, **facts, "layers": summary})
    helper.set_model_props(model, props)
    pin_ir_version(model)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        raise EngineError(f"the lowered engine is not valid ONNX: {err}") from err
    return model


def _lower_output(g: GraphEditor, encoding: Encoding, conv: onnx.NodeProto, layer: EngineLayer
                  ) -> tuple[str, Grid | None]:
    """An 8-bit Q/DQ after the conv (after its ReLU, folded) on the calibrated output range:
    (placement, grid of the Q, None when the output stays float)."""
    assert layer.output_range is not None
    tensor = conv.output[0]
    consumers = g.consumers(tensor)
    relu = consumers[0] if len(consumers) == 1 and consumers[0].op_type == "Relu" else None
    replaced = tensor if relu is None else relu.output[0]
    if replaced in g.outputs:
        return "float", None
    grid = encoding.output_grid(layer.output_range, relu is not None)
    readers = g.consumers(replaced)
    if relu is not None:
        g.drop(relu)
    base = f"{layer.name}.output"
    out = encoding.dequantize(g, encoding.quantize(g, tensor, grid, base), grid, base)
    for node in readers:
        node.input[:] = [out if name == replaced else name for name in node.input]
    return "8-bit output range" + (" (ReLU folded)" if relu is not None else ""), grid


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


# -- reading an engine back ---------------------------------------------------------------------


def lowering_summary(engine: onnx.ModelProto) -> list[dict[str, Any]]:
    """Per layer: bits, output placement, frozen gate, truncated grid and the dialect's notes
    (TensorRT: ``input_shift``), from the metadata."""
    props = {p.key: p.value for p in engine.metadata_props}
    if METADATA_KEY not in props:
        raise EngineError(f"not a lowered engine: no {METADATA_KEY!r} metadata")
    layers: list[dict[str, Any]] = json.loads(props[METADATA_KEY])["layers"]
    return layers


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
