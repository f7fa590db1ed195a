"""The checker every TensorRT-dialect graph must pass, and the int8 facts it checks against.

:func:`check_tensorrt_graph` validates any graph against TensorRT's Q/DQ rules (deployment.md)
and names the offending node. A lowered graph records every Q's stored range in its metadata
(``quantizers``), so the checker knows which Q needs a Clip.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from compiler.lower.qdq import lowering_facts
from runtime.errors import EngineError

INT8_MIN, INT8_MAX = -128, 127
ZERO_POINT_TYPES = (TensorProto.INT8, TensorProto.FLOAT8E4M3FN)
DEFAULT_DOMAINS = ("", "ai.onnx")


def attribute(node: onnx.NodeProto, name: str, default: Any) -> Any:
    """The value of a node's attribute ``name``, else ``default``."""
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _constants(graph: onnx.GraphProto) -> dict[str, npt.NDArray[Any]]:
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            tensor = attribute(node, "value", None)
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


class _Checker:
    """What the rules need to know of a graph; each ``check_*`` raises on a broken rule."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.consts = _constants(graph)
        self.producers = {out: node for node in graph.node for out in node.output}
        self.types = _tensor_types(model)
        facts = lowering_facts(model)
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
            output_dtype = attribute(node, "output_dtype", 0)
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
            axis = attribute(node, "axis", 1)
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
            raise EngineError(f"{where}: grid [{low}, {high}] is narrower than int8 but its "
                              f"input comes from {_described(clip)}, not a Clip; TensorRT's Q "
                              "saturates only at [-128, 127]")
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
        mode = attribute(node, "mode", b"constant")
        if mode != b"constant":
            raise EngineError(f"{where}: mode {mode.decode()}; a shift's Pad must be 'constant'")
        for index, what in ((1, "pads"), (2, "pad value"), (3, "axes")):
            if len(node.input) > index and node.input[index]:
                self.constant(node, where, index, what)

    def check_conv(self, node: onnx.NodeProto, where: str) -> None:
        """A conv with DQ'd weights reads a DQ directly: TensorRT fuses ``DQ -> Conv <- DQ``
        into an INT8 conv only so (a Pad, a shuffle between leaves it float)."""
        kernel = self.producers.get(node.input[1]) if len(node.input) > 1 else None
        if kernel is None or kernel.op_type != "DequantizeLinear":
            return
        data = self.producers.get(node.input[0])
        if data is None or data.op_type != "DequantizeLinear":
            raise EngineError(f"{where}: its weights are quantized but its input comes from "
                              f"{_described(data)}, not a DequantizeLinear: TensorRT fuses DQ "
                              "-> Conv into an INT8 conv only when the DQ feeds the conv "
                              "directly")

    def check_pair(self, node: onnx.NodeProto, where: str) -> None:
        """A DQ reading a Q has the Q's scale (TensorRT pairs them as one quantized tensor)."""
        q = self.producers.get(node.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            return
        scales = [self.constant(n, f"node {n.name!r} ({n.op_type})", 1, "scale")
                  for n in (q, node)]
        if scales[0].shape != scales[1].shape or np.any(scales[0] != scales[1]):
            raise EngineError(f"{where}: scale {scales[1].ravel()[:4]} differs from the scale "
                              f"{scales[0].ravel()[:4]} of the Q {q.name!r} it reads; TensorRT "
                              "expects a Q and its DQ to share one scale")

    def check_types(self, node: onnx.NodeProto, where: str) -> None:
        for out in node.output:
            if self.types.get(out) == TensorProto.UINT8:
                raise EngineError(f"{where}: output {out!r} is uint8; TensorRT Q/DQ graphs use "
                                  "int8 only")


def _described(node: onnx.NodeProto | None) -> str:
    return f"node {node.name!r} ({node.op_type})" if node is not None else "a graph input"


def check_tensorrt_graph(model: onnx.ModelProto, max_opset: int) -> None:
    """Raise :class:`EngineError` naming the node (and the rule) of the first TensorRT violation.

    Rules: default-domain opset <= ``max_opset``, no other domains; every Q/DQ zero point 0 and
    int8 (float8e4m3fn allowed), a Q's zero point present (else uint8); scales and zero points
    constant; activation scales per tensor, weight scales per tensor or per output channel on
    axis 0; a DQ that reads a Q has its scale; a conv with DQ'd weights reads a DQ directly; no
    uint8 tensor; in a lowered graph, every Q whose recorded grid is narrower than int8 reads a
    Clip (through a shifted grid's border Pad) with constant bounds on that grid; Pads
    constant-mode with constant inputs; an FP16 graph holds no FP32 initializer.
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
            if node.op_type == "DequantizeLinear":
                checker.check_pair(node, where)
        elif node.op_type == "Conv":
            checker.check_conv(node, where)
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
