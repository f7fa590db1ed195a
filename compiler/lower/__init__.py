"""Lowering: the FP network to ONNX once (``export``), then one Q/DQ engine per bit
configuration (``qdq``: dialect ``"ort"``, ONNX Runtime's INT8 QDQ fusion on CPU, and
``"tensorrt"``, symmetric int8 Q/DQ with Clip and shifts, FP16 casts; ``trt.check_tensorrt_graph``
validates the latter)."""

from compiler.lower.export import export_onnx, find_conv, save_onnx
from compiler.lower.qdq import EngineLayer, engine_layers, lower_engine
from compiler.lower.trt import check_tensorrt_graph

__all__ = ["EngineLayer", "check_tensorrt_graph", "engine_layers", "export_onnx", "find_conv",
           "lower_engine", "save_onnx"]
