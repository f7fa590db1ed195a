"""Lowering: the FP network to ONNX once (``export``), then one Q/DQ engine per bit
configuration (``qdq``: dialect ``"ort"``, ONNX Runtime's INT8 QDQ fusion on CPU)."""

from compiler.lower.export import export_onnx, find_conv, save_onnx
from compiler.lower.qdq import EngineLayer, engine_layers, lower_engine

__all__ = ["EngineLayer", "engine_layers", "export_onnx", "find_conv", "lower_engine",
           "save_onnx"]
