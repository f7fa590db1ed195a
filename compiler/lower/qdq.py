"""Lower the FP ONNX graph to one integer engine: Q/DQ for a record's bits at one image offset.

PLACEHOLDER DOCSTRING
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper

from compiler.lower.export import conv_nodes, pin_ir_version
from compiler.quant.qmodel import FIXED_BITS
from compiler.quant.quantizers import MAX_INT_BITS
from runtime.errors import ConfigError, EngineError, unknown_name

DIALECTS = ("ort",)
UINT8_MAX = 255
OUTPUT_BITS = 8  # the Q after a conv whose consumer is not a quantized conv
GRID_PRESERVING = ("Relu", "DepthToSpace")  # ops that map a zero-anchored grid onto itself
METADATA_KEY = "adasr.lowering"

F32 = np.float32


@dataclass(frozen=True)
class EngineLayer:
    """How one quantized conv runs in one engine (from a calibration record and an offset).

    ``act_bits`` above 8 means the conv's input stays float; ``bounds`` are the activation
    bounds (l, u) after freezing a DDTB gate (``frozen_gate``); ``w_clip`` is one clip or one
    per output channel; ``output_range`` is the FP range of the conv's output (calibration).
    """

    name: str
    act_bits: float
    bounds: tuple[float, float]
    w_bits: int
    w_clip: float | tuple[float, ...]
    output_range: tuple[float, float] | None = None
    frozen_gate: bool = False

    def __post_init__(self) -> None:
        if not (float(self.act_bits).is_integer() and self.act_bits >= 2):
            raise ConfigError(f"layer {self.name!r}: activation bits {self.act_bits} must be an "
                              "integer >= 2 (> 8: float input)")
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
    vectors = record["bit_vectors"]
    if str(d_img) not in vectors:
        raise ConfigError(unknown_name(f"image offset of this {record['settings']['method']} "
                                       "record", str(d_img), vectors))
    bits = iter(vectors[str(d_img)])
    adaptive = sum(layer["kind"] == "adaptive" for layer in record["layers"])
    if adaptive != len(vectors[str(d_img)]):
        raise ConfigError(f"record has {adaptive} adaptive layers but {len(vectors[str(d_img)])} "
                          f"bits for offset {d_img}")
    out = []
    for layer in record["layers"]:
        bounds, frozen = _frozen_bounds(layer)
        clip = layer["w_clip"]
        out_range = layer.get("output_range")
        out.append(EngineLayer(
            name=layer["name"],
            act_bits=float(next(bits)) if layer["kind"] == "adaptive" else float(FIXED_BITS),
            bounds=bounds, w_bits=int(layer["w_bits"]),
            w_clip=tuple(float(c) for c in clip) if isinstance(clip, list) else float(clip),
            output_range=(float(out_range[0]), float(out_range[1])) if out_range else None,
            frozen_gate=frozen))
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
    def of_bounds(cls, bounds: tuple[float, float], bits: float) -> Grid:
        """``quantize_asymmetric``'s grid, in its float32 arithmetic (round half to even)."""
        lower, upper = F32(bounds[0]), F32(bounds[1])
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
        """True when the grid does not fit in uint8 (an 8-bit grid without 0: bounds l > 0)."""
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
    shaped = (clip.reshape(-1, 1, 1, 1), step.reshape(-1, 1, 1, 1)) if clip.ndim else (clip, step)
    clipped = np.minimum(np.maximum(weight, -shaped[0]), shaped[0])
    q = np.clip(np.round(clipped / shaped[1]), -levels, levels)
    return q.astype(np.int8), step.astype(F32)


# -- graph editing ------------------------------------------------------------------------------


class _Graph:
    """A small editor over a GraphProto: unique names, consumers, new nodes and initializers."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}
        self._used = {name for n in graph.node for name in [*n.input, *n.output, n.name]}
        self._used |= set(self.inits) | {i.name for i in graph.input}
        self.dropped: set[int] = set()  # ids of bypassed nodes

    def consumers(self, tensor: str) -> list[onnx.NodeProto]:
        return [n for n in self.graph.node if tensor in n.input and id(n) not in self.dropped]

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
        kept = [n for n in self.graph.node if id(n) not in self.dropped]
        ordered = _topological(kept, {i.name for i in self.graph.input} | set(self.inits))
        del self.graph.node[:]
        self.graph.node.extend(ordered)
        used = {name for n in ordered for name in n.input}
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
class _Chain:
    """A conv whose output reaches another quantized conv's input through grid-preserving ops."""

    path: tuple[onnx.NodeProto, ...]
    target: str


def _chain_of(g: _Graph, conv: onnx.NodeProto, targets: Mapping[str, onnx.NodeProto]
              ) -> _Chain | None:
    by_node = {id(node): name for name, node in targets.items()}
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
        name = by_node.get(id(nxt))
        if name is not None and nxt.input[0] == tensor:
            return _Chain(tuple(path), name)
        return None
    return None


def _lower_weight(g: _Graph, conv: onnx.NodeProto, layer: EngineLayer) -> None:
    """The conv's weight becomes int8 (under the float weight's name where not shared) + DQ."""
    name = conv.input[1]
    source = g.inits.get(name)
    if source is None:
        raise EngineError(f"layer {layer.name!r}: conv weight {name!r} is not an initializer; "
                          "export with constant weights")
    q, step = quantize_weight(numpy_helper.to_array(source).astype(F32), layer)
    if len(g.consumers(name)) == 1:
        g.release(name)
    weight = g.constant(name, q)
    scale = g.constant(f"{layer.name}.weight_scale", step)
    zero = g.constant(f"{layer.name}.weight_zero_point", np.zeros(step.shape, dtype=np.int8))
    attrs = {"axis": 0} if step.ndim else {}
    conv.input[1] = g.node("DequantizeLinear", [weight, scale, zero],
                           f"{layer.name}.weight_dq", **attrs)


def lower_engine(fp_model: onnx.ModelProto, layers: Sequence[EngineLayer], dialect: str = "ort",
                 *, residual_outputs: bool = True) -> onnx.ModelProto:
    """The FP graph with the Q/DQ of ``layers`` (see the module docstring for the placement)."""
    if dialect not in DIALECTS:
        raise ConfigError(unknown_name("lowering dialect", dialect, DIALECTS))
    model = onnx.ModelProto()
    model.CopyFrom(fp_model)
    g = _Graph(model.graph)
    by_name = {layer.name: layer for layer in layers}
    if len(by_name) != len(layers):
        raise ConfigError("engine layers name the same conv twice")
    convs = conv_nodes(model.graph, list(by_name))
    grids = {name: Grid.of_bounds(layer.bounds, layer.act_bits)
             for name, layer in by_name.items() if layer.quantizes_input}
    targets = {name: convs[name] for name in grids}
    chains = {name: _chain_of(g, conv, targets) for name, conv in convs.items()}
    placement: dict[str, str] = {}
    fed = set()
    for name, chain in chains.items():
        if chain is None:
            continue
        _lower_chain(g, convs[name], chain, grids[chain.target], convs[chain.target])
        placement[name] = f"grid of {chain.target}"
        fed.add(chain.target)
    for name, conv in convs.items():
        layer = by_name[name]
        if name in grids and name not in fed:
            stored = g.quantize(conv.input[0], grids[name], f"{name}.input")
            conv.input[0] = g.dequantize(stored, grids[name], f"{name}.input")
        if (chains[name] is None and layer.quantizes_input and residual_outputs
                and layer.output_range is not None):
            placement[name] = _lower_output(g, conv, layer)
        _lower_weight(g, conv, layer)
    g.finish()
    summary = [{"name": layer.name, "act_bits": layer.act_bits, "frozen_gate": layer.frozen_gate,
                "output": placement.get(layer.name, "float"),
                "truncated_grid": layer.name in grids and grids[layer.name].truncated}
               for layer in layers]
    helper.set_model_props(model, {METADATA_KEY: json.dumps({"dialect": dialect,
                                                             "layers": summary})})
    pin_ir_version(model)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        raise EngineError(f"the lowered engine is not valid ONNX: {err}") from err
    return model


def _lower_chain(g: _Graph, conv: onnx.NodeProto, chain: _Chain, grid: Grid,
                 target: onnx.NodeProto) -> None:
    """Q right after ``conv`` on the target's grid; ReLUs become the Q's saturation."""
    if any(node.op_type == "Relu" for node in chain.path):
        grid = grid.after_relu()
    tensor = g.quantize(conv.output[0], grid, f"{chain.target}.input")
    for node in chain.path:
        if node.op_type == "Relu":
            g.dropped.add(id(node))
        else:
            node.input[0] = tensor
            node.output[0] = tensor = g.fresh(f"{node.output[0]}.quantized")
    target.input[0] = g.dequantize(tensor, grid, f"{chain.target}.input")


def _lower_output(g: _Graph, conv: onnx.NodeProto, layer: EngineLayer) -> str:
    """An 8-bit Q/DQ after the conv (after its ReLU) on the calibrated output range."""
    assert layer.output_range is not None
    tensor = conv.output[0]
    lower, upper = min(layer.output_range[0], 0.0), max(layer.output_range[1], 0.0)
    consumers = g.consumers(tensor)
    relu = consumers[0] if len(consumers) == 1 and consumers[0].op_type == "Relu" else None
    if relu is not None and relu.output[0] not in g.outputs:
        g.dropped.add(id(relu))
        lower, replaced = 0.0, relu.output[0]
    elif tensor in g.outputs:
        return "float"
    else:
        replaced = tensor
    readers = g.consumers(replaced)
    grid = Grid.of_bounds((lower, upper), OUTPUT_BITS)
    out = g.dequantize(g.quantize(tensor, grid, f"{layer.name}.output"), grid,
                       f"{layer.name}.output")
    for node in readers:
        node.input[:] = [out if name == replaced else name for name in node.input]
    return "8-bit output range" + (" (ReLU folded)" if relu is not None else "")
