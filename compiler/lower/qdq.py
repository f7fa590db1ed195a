"""The shared Q/DQ core of the lowering: where the quantizers of one engine go in the FP graph.

``lower_graph(fp_model, layers, encoding)`` writes the per-layer specs of one engine
(``compiler.layers.EngineLayer``: a calibration record's bits at one image offset) into a copy of
the FP graph; *how* each grid is written is the :class:`Encoding` of a dialect, one module each:
``compiler.lower.ort`` (ONNX Runtime's CPU QDQ fusion, uint8 grids) and ``compiler.lower.trt``
(TensorRT: symmetric int8 Q/DQ, FP16); ``compiler.lower.dialects.lower_engine`` picks one. This
module imports no dialect. The engine for offset ``d`` reproduces ``QuantizedSR`` with
``forced_d_img = d``.

Placement (shared by the dialects):

- **weight**: int8 initializer ``q = clamp(round(clamp(w, -c, c) / s_w), -L, L)``, scale
  ``s_w = c / L`` per tensor or per output channel (``axis=0``), then DequantizeLinear
  (:func:`lower_weight`). The int8 initializer keeps the float weight's name
  (``body.0.body.2.weight``), so lowered and optimized graphs are still addressed by module name.
- **input activation** at ``b <= 8`` bits: the simulated quantizer's grid (:class:`Grid`),
  written by the encoding (:meth:`Encoding.feed`). ``b > 8``: the input stays float.
- **output**: a Q after the conv where the next op consumes its grid:
  1. *Chain* (exact): when the conv's only path leads, through ReLU / DepthToSpace only, to the
     input of another quantized conv, the Q after the conv **is** that conv's input quantizer
     (same scale and zero point). A ReLU on the path becomes the Q's saturation and is removed
     (``Q(relu(y)) = relu(Q(y))`` on a zero-anchored grid); DepthToSpace runs on the
     stored integers (ORT) or before the Q (TensorRT). This
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

Every layer's placement is stored in the model's metadata (``adasr.lowering``, read back by
:func:`lowering_summary`), with the encoding's notes (:meth:`Encoding.notes`) that
``compiler.parity`` needs to simulate the engine's arithmetic.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper

from compiler.layers import EngineLayer
from compiler.lower.export import conv_nodes, pin_ir_version
from compiler.lower.graph import GraphEditor
from runtime.errors import ConfigError, EngineError

FLOAT_TYPES = ("fp32", "fp16")
UINT8_MAX = 255
OUTPUT_BITS = 8  # the Q after a conv whose consumer is not a quantized conv
GRID_PRESERVING = ("Relu", "DepthToSpace")  # ops that map a zero-anchored grid onto itself
METADATA_KEY = "adasr.lowering"
THIN_CHANNELS = 4  # convs with <= 4 output channels (the RGB tail) keep float outputs
IMAGE_PLACEMENT = "float, on the integer pixels (exact)"

F32 = np.float32


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


# -- placement ----------------------------------------------------------------------------------


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


def weight_levels(g: GraphEditor, conv: onnx.NodeProto, layer: EngineLayer,
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
    weight = g.constant(name, (levels.astype(F32) * step.reshape(shape)).astype(F32))
    conv.input[1] = weight
    return weight


def lower_weight(g: GraphEditor, conv: onnx.NodeProto, layer: EngineLayer,
                 dq_scale: Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]
                 = lambda step: step
                 ) -> tuple[str, npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """The conv's weight becomes int8 (under the float weight's name where not shared) + DQ
    with scale ``dq_scale(step)`` (the step itself by default). Returns the int8 initializer's
    name, the weight step and the DQ scale (per tensor or per output channel).
    """
    weight, step = weight_levels(g, conv, layer)
    scale = dq_scale(step)
    zero = g.constant(f"{layer.name}.weight_zero_point", np.zeros(step.shape, dtype=np.int8))
    attrs = {"axis": 0} if step.ndim else {}
    conv.input[1] = g.node("DequantizeLinear", [
        weight, g.constant(f"{layer.name}.weight_scale", scale), zero],
        f"{layer.name}.weight_dq", **attrs)
    return weight, step, scale


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


class Encoding:
    """How a dialect writes grids into the graph; :func:`lower_graph` decides where they go.

    Subclassed once per dialect (``compiler.lower.ort.OrtEncoding``,
    ``compiler.lower.trt.TensorRTEncoding``); the defaults here are what a dialect without the
    feature does.
    """

    dialect = ""

    def image_conv(self, g: GraphEditor, conv: onnx.NodeProto, name: str
                   ) -> dict[str, Any] | None:
        """Rewrite a float conv that reads the image (``EngineLayer.exact_image``); its summary
        facts, or None to leave it the FP conv."""
        return None

    def streams(self, g: GraphEditor, convs: Mapping[str, onnx.NodeProto],
                layers: Mapping[str, EngineLayer]) -> dict[str, tuple[float, float]]:
        """Convs whose input is a residual stream quantized once for all its readers, with
        their widened bounds (none by default)."""
        return {}

    def image_output(self, g: GraphEditor, conv: onnx.NodeProto) -> str | None:
        """Quantize a requantized conv's output on the output image's grid: its placement, or
        None (not by default)."""
        return None

    def input_grid(self, layer: EngineLayer) -> Grid:
        """The grid of a quantized conv's input (the simulated quantizer's)."""
        return Grid.of_bounds(layer.bounds, layer.act_bits, layer.symmetric)

    def output_grid(self, output_range: tuple[float, float], relu: bool) -> Grid:
        """The 8-bit grid of a requantized conv output (after its ReLU when ``relu``)."""
        raise NotImplementedError

    def truncated(self, grid: Grid) -> bool:
        """True when the stored type cannot hold every level of ``grid``."""
        raise NotImplementedError

    def quantize(self, g: GraphEditor, tensor: str, grid: Grid, base: str) -> str:
        """The stored (integer) tensor of float ``tensor`` on ``grid``."""
        raise NotImplementedError

    def dequantize(self, g: GraphEditor, stored: str, grid: Grid, base: str) -> str:
        raise NotImplementedError

    def feed(self, g: GraphEditor, conv: onnx.NodeProto, tensor: str, grid: Grid,
             layer: EngineLayer, base: str) -> str:
        """Quantize float ``tensor`` on ``grid`` and make its dequantized values the input of
        ``conv``; returns the dequantized tensor."""
        raise NotImplementedError

    def chain(self, g: GraphEditor, conv: onnx.NodeProto, chain: Chain, grid: Grid,
              target: onnx.NodeProto, target_layer: EngineLayer) -> Grid:
        """Quantize ``conv``'s output onto the input grid of ``chain.target``; returns the grid
        of the Q (ReLUs on the path fold into it)."""
        raise NotImplementedError

    def lower_conv(self, g: GraphEditor, conv: onnx.NodeProto, layer: EngineLayer,
                   grid: Grid | None, placement: str) -> bool:
        """Lower the conv's weights once every Q/DQ is placed; True when the conv then computes
        on its integer levels."""
        raise NotImplementedError

    def notes(self, layer: EngineLayer, input_grid: Grid | None, output_grid: Grid | None,
              integer: bool) -> dict[str, Any]:
        """Dialect-specific facts of one layer for the lowering metadata."""
        raise NotImplementedError

    def finish(self, g: GraphEditor) -> None:
        """Rewrites of the whole graph after every layer is lowered (none by default)."""


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
    images: dict[str, dict[str, Any] | None] = {}  # exact image convs (Encoding.image_conv)
    for name, layer in by_name.items():
        if layer.exact_image:  # other dialects run it as the FP conv
            conv = convs.pop(name)
            images[name] = encoding.image_conv(g, conv, name)
    grids = {name: encoding.input_grid(layer)
             for name, layer in by_name.items() if layer.quantizes_input and name in convs}
    stream_bounds = encoding.streams(g, convs, by_name) if streams and requantize else {}
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
        if requantized and layer.quantizes_input:
            image = encoding.image_output(g, conv)
        if image is not None:
            placement[name] = image
        elif (requantized and layer.quantizes_input and layer.output_range is not None
                and not _is_thin(g, conv)):
            placement[name], grid = _lower_output(g, encoding, conv, layer)
            if grid is not None:
                out_grids[name] = grid
        if encoding.lower_conv(g, conv, layer, grids.get(name), placement[name]):
            integer.add(name)
    encoding.finish(g)
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


# -- reading an engine back ---------------------------------------------------------------------


def lowering_facts(engine: onnx.ModelProto) -> dict[str, Any]:
    """The lowering's metadata (dialect, its facts such as ``statistics``, ``layers``); empty
    for a graph that was not lowered."""
    props = {p.key: p.value for p in engine.metadata_props}
    facts: dict[str, Any] = json.loads(props[METADATA_KEY]) if METADATA_KEY in props else {}
    return facts


def lowering_summary(engine: onnx.ModelProto) -> list[dict[str, Any]]:
    """Per layer: bits, output placement, frozen gate, truncated grid and the dialect's notes
    (TensorRT: ``input_shift``), from the metadata."""
    facts = lowering_facts(engine)
    if not facts:
        raise EngineError(f"not a lowered engine: no {METADATA_KEY!r} metadata")
    layers: list[dict[str, Any]] = facts["layers"]
    return layers
