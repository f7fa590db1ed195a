"""The lowering's entry point: one engine graph in a dialect (``compiler.lower.ort`` or
``compiler.lower.trt``), both built on the shared core ``compiler.lower.qdq``."""

from __future__ import annotations

from collections.abc import Sequence

import onnx

from compiler.layers import EngineLayer
from compiler.lower.ort import lower_ort
from compiler.lower.qdq import FLOAT_TYPES
from compiler.lower.trt import lower_tensorrt
from runtime.errors import ConfigError, unknown_name

DIALECTS = ("ort", "tensorrt")


def lower_engine(fp_model: onnx.ModelProto, layers: Sequence[EngineLayer], dialect: str = "ort",
                 *, requantize: bool = True, float_type: str = "fp32",
                 max_opset: int | None = None, streams: bool = True) -> onnx.ModelProto:
    """The FP graph with the Q/DQ of ``layers`` in ``dialect`` (placement:
    ``compiler.lower.qdq``). ``requantize=False`` leaves float every output that does not feed
    a quantized conv (an exact engine); ``float_type`` (``"fp32"``, or ``"fp16"`` for TensorRT)
    and ``max_opset`` (the target's parser) shape the graph; ``streams`` (ORT) quantizes
    residual streams once at 8 bits."""
    if dialect not in DIALECTS:
        raise ConfigError(unknown_name("lowering dialect", dialect, DIALECTS))
    if float_type not in FLOAT_TYPES:
        raise ConfigError(unknown_name("float type", float_type, FLOAT_TYPES))
    if dialect == "tensorrt":
        return lower_tensorrt(fp_model, layers, requantize=requantize, float_type=float_type,
                              max_opset=max_opset)
    return lower_ort(fp_model, layers, requantize=requantize, streams=streams,
                     float_type=float_type, max_opset=max_opset)
