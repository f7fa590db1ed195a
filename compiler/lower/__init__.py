"""Lowering: the FP network to ONNX once (``export``), then one Q/DQ engine graph per bit
configuration. ``dialects.lower_engine`` is the entry point; ``qdq`` holds the shared core
(placement, grids, weights; no dialect), ``ort`` and ``trt`` one dialect each (ONNX Runtime's
uint8 QDQ fusion; TensorRT's symmetric int8 Q/DQ, FP16), ``trt_check`` the TensorRT graph rules,
``graph`` the graph editor, ``exact`` / ``image`` the exact FP32 epilogues and image conv.
Imports only flow one way: dialects -> core -> graph (``tests/compiler/test_lower_imports.py``).
"""
