"""Float epilogues that keep an integer-exact FP32 conv exact under ONNX Runtime's optimizer.

A conv on integer values with integer weights sums exactly in FP32 (in any order, below 2^24);
its per-channel ``* scale + bias`` then has to stay two single FP32 operations after it. Used by
``compiler.lower.ort._integer_conv``, ``compiler.lower.image`` and the TensorRT dialect's
integer convs (``compiler.lower.trt``, whose levels are scaled by powers of two: still exact).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import onnx

from compiler.lower.graph import GraphEditor

F32 = np.float32
# (editor, values per output channel, name) -> a [1, C, 1, 1] tensor's name
PerChannel = Callable[[GraphEditor, npt.NDArray[np.float32], str], str]


def power_of_two_above(values: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """``2^ceil(log2(v))`` of each positive ``v``: a scale that keeps integer levels exact (a
    product by it is exact) and, being >= ``v``, is never below FP16's normal range when ``v``
    is not."""
    mantissa, exponent = np.frexp(np.asarray(values, dtype=np.float64))
    units: npt.NDArray[np.float32] = np.ldexp(1.0, np.where(mantissa == 0.5, exponent - 1,
                                                            exponent)).astype(F32)
    return units


def per_channel_constant(g: GraphEditor, values: npt.NDArray[np.float32], base: str) -> str:
    """``values`` as a ``[1, C, 1, 1]`` tensor that ONNX Runtime cannot fold into a conv: a
    DequantizeLinear (never constant-folded) of signs with the magnitudes as per-axis scales,
    which reproduces every value exactly (+-1 * |v|)."""
    signs = np.where(values < 0, -1, 1).astype(np.int8).reshape(1, -1, 1, 1)
    magnitudes = np.abs(values).astype(F32)
    return g.node("DequantizeLinear", [
        g.constant(f"{base}.signs", signs), g.constant(f"{base}.magnitudes", magnitudes),
        g.constant(f"{base}.zero_point", np.zeros(values.shape, dtype=np.int8))],
        base, axis=1)


def plain_constant(g: GraphEditor, values: npt.NDArray[np.float32], base: str) -> str:
    """``values`` as a ``[1, C, 1, 1]`` initializer (graphs that no optimizer folds)."""
    return g.constant(base, np.asarray(values, dtype=F32).reshape(1, -1, 1, 1))


def exact_epilogue(g: GraphEditor, conv: onnx.NodeProto, scale: npt.NDArray[np.float32],
                   bias: npt.NDArray[np.float32] | None, base: str,
                   constant: PerChannel = per_channel_constant) -> str:
    """``conv * scale + bias`` per output channel after an integer-exact FP32 conv, rewiring the
    conv's readers. ONNX Runtime folds a constant Mul / Add after a conv with constant weights
    into those weights (ConvMulFusion, ConvAddFusion), which would round the integer sums; the
    constants therefore come from :func:`per_channel_constant` by default (the TensorRT dialect
    passes :func:`plain_constant`: TensorRT fuses them into the conv's epilogue itself)."""
    readers = g.consumers(conv.output[0])
    out = g.node("Mul", [conv.output[0], constant(g, scale, f"{base}.scale")], f"{base}.scaled")
    if bias is not None:
        out = g.node("Add", [out, constant(g, bias, f"{base}.bias")], f"{base}.biased")
    for node in readers:
        node.input[:] = [out if t == conv.output[0] else t for t in node.input]
    return out
