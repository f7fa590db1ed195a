"""Lowering: the FP network to ONNX once, then one Q/DQ engine graph per bit configuration."""
