"""ONNX Runtime's compiler side: the ORT dialect's dynamic-shape Q/DQ graphs, run as written
(INT8 through QLinearConv); nothing is built after the graphs (:class:`compiler.backends.Builder`
defaults)."""

from __future__ import annotations

from compiler.backends import Builder


class OnnxRuntimeBuilder(Builder):
    name = "onnxruntime"
    rung_ladder = True


BUILDER = OnnxRuntimeBuilder()
