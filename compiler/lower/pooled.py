"""Per-image statistics that every implementation computes to the same bits (TensorRT dialect).

IMDN's attention scales a feature map by ``sigmoid(convs(std + mean))`` of its own per-channel
statistics, and the next conv quantizes the product: a gate one ulp apart moves every value of
a channel next to a rounding tie of that conv's grid by a level. FP32 statistics are not the
same bits in two implementations: a ReduceMean sums in the order its kernel chooses (ONNX
Runtime's CPU kernel was 1.6e-5 (relative) from the exact mean of a 128x128 map, torch 1.6e-7),
a 1x1 conv sums its products in its own order, and Sigmoid (and Exp) are approximations of
their own (ONNX Runtime's differed from torch's in 28 of 64 gates fed the same inputs). The
ONNX Runtime dialect computes them in FP64 (``compiler.lower.ort``); TensorRT has no FP64. So
:func:`exact_statistics` writes them with ops whose results do not depend on the order or the
implementation (every FP32 op below is one IEEE operation, or a sum of two values, or exact):

- a spatial ``ReduceMean(y)`` (axes H, W, kept) becomes an exact sum of ``y`` on a fine grid:
  ``m = max(max |y|, tiny)`` per channel, ``q = Round(y / m * 2^24)`` (integers, ``|q| <=
  2^24``), ``S = ReduceSum(int64(q))`` (exact), ``mean = float(S) / (H W) * m / 2^24``: within
  ``m 2^-25`` of the FP32 mean, the same bits wherever the ops are IEEE;
- ``Pow(y, 2)`` becomes ``Mul(y, y)`` (torch computes it so); a standard deviation
  ``Pow(mean(c * c), 0.5)`` becomes 18 Newton steps ``s = (s + v / s) * 0.5`` from ``s =
  max(max |c|, tiny)``, which is at least the root and at most ``sqrt(H W)`` times it: within
  an ulp for maps of up to 2^24 pixels (ONNX Runtime's Pow by 0.5 and its Sqrt, which Eigen
  computes from an approximate reciprocal root, are not IEEE square roots: 14 and 11 of 64
  differed from torch's; TensorRT-RTX took over 14 minutes to build a tiny IMDN with 32 steps
  from 1, 1.6 s with 16);
- a 1x1 conv on a pooled ``[N, C, 1, 1]`` tensor becomes the products ``x_c W[o, c]`` (zero
  padded to a power of two) summed in a fixed tree of pairs (a ReduceSum over an axis of 2,
  repeated), plus the bias;
- a Sigmoid of a pooled tensor becomes a rational function of Mul / Add / Div on the input
  clamped to [-18, 18] (ONNX Runtime's MLAS logistic coefficients; within 2.2e-7 of the exact
  logistic, torch's FP32 sigmoid within 8.9e-8), clamped to [0, 1].

``compiler.parity`` computes the same ops in the same order (:data:`LOGISTIC`, :data:`SCALE`
and :data:`TINY` are shared), so an FP32 graph run by ONNX Runtime matches its simulation bit
for bit through the attention too. On a GPU the rewrite holds where TensorRT keeps each of
these ops one IEEE operation (no fused multiply-add contracting a Mul and an Add, no
approximate division): not verified without a GPU.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compiler.lower.graph import GraphEditor
from compiler.lower.trt_check import attribute

F32 = np.float32
SCALE = F32(2.0**24)  # levels of the grid a mean sums exactly: |q| <= 2^24, sums in int64
TINY = F32(np.finfo(np.float32).tiny)  # the grid of an all-zero channel: q = 0
CLAMP = F32(18.0)  # the logistic's input range (beyond it the rational is 0 or 1 in FP32)
# p(x) = x (a1 + x^2 (a3 + x^2 (a5 + x^2 (a7 + x^2 a9)))), q(x) = b0 + x^2 (b2 + ... x^2 b10):
# logistic(x) ~ p(x) / q(x) + 1/2 (MLAS, onnxruntime/core/mlas/lib/logistic.cpp)
LOGISTIC_P = tuple(F32(v) for v in (4.37031012579801e-11, 1.15627324459942e-07,
                                     6.08574864600143e-05, 8.51377133304701e-03,
                                     2.48287947061529e-01))  # a9, a7, a5, a3, a1
LOGISTIC_Q = tuple(F32(v) for v in (6.10247389755681e-13, 5.76102136993427e-09,
                                     6.29106785017040e-06, 1.70198817374094e-03,
                                     1.16817656904453e-01, 9.93151921023180e-01))  # b10 .. b0
AXES_INPUT_OPSET = 18  # ReduceMax takes its axes as an input from opset 18
NEWTON_STEPS = 18  # square roots from max |c| >= sqrt(v) >= max |c| / 2^12: within an ulp
ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Relu")  # one IEEE operation per value


def exact_statistics(g: GraphEditor, opset: int) -> int:
    """Rewrite every spatial ReduceMean, and the Pow / 1x1 Conv / Sigmoid on its pooled results,
    as the module docstring says. Returns how many ReduceMean nodes were rewritten."""
    pooled: set[str] = set()  # tensors of spatial size 1 computed from spatial means
    deviations: dict[str, str] = {}  # mean(c * c) -> c
    means = 0
    for node in [n for n in g.graph.node if g._live(n)]:
        inputs = [name for name in node.input if name]
        from_pooled = any(name in pooled for name in inputs) and all(
            name in pooled or name in g.inits for name in inputs)
        new: str | None = None
        if node.op_type == "ReduceMean" and _spatial(g, node):
            new = _exact_mean(g, node.input[0], node.output[0], opset)
            square = g.producer(node.input[0])
            if square is not None and square.op_type == "Mul" and len(set(square.input)) == 1:
                deviations[new] = square.input[0]
            means += 1
        elif node.op_type == "Pow":
            new = _power(g, node, deviations, opset)
            if new is None:
                continue
        elif node.op_type == "Conv" and from_pooled:
            new = _pooled_conv(g, node)
        elif node.op_type == "Sigmoid" and from_pooled:
            new = _logistic(g, node.input[0], node.output[0])
        if new is not None:
            _replace(g, node, new)
        if new is not None and (from_pooled or node.op_type == "ReduceMean"):
            pooled.add(new)
        elif from_pooled and node.op_type in ELEMENTWISE:
            pooled.add(node.output[0])
    return means


def _replace(g: GraphEditor, node: onnx.NodeProto, tensor: str) -> None:
    """Readers of ``node``'s output read ``tensor``; the node goes."""
    old = node.output[0]
    for reader in g.consumers(old):
        reader.input[:] = [tensor if name == old else name for name in reader.input]
    if old in g.outputs:  # keep the graph's output name
        g.graph.node.append(helper.make_node("Identity", [tensor], [old], g.fresh(f"{old}_op")))
        node.output[0] = g.fresh(f"{old}.replaced")
    g.drop(node)


def _spatial(g: GraphEditor, node: onnx.NodeProto) -> bool:
    """A ReduceMean over axes 2 and 3 of an NCHW tensor, keeping them."""
    axes = attribute(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1] in g.inits:
        axes = numpy_helper.to_array(g.inits[node.input[1]]).tolist()
    return attribute(node, "keepdims", 1) == 1 and axes is not None and sorted(
        int(a) % 4 for a in axes) == [2, 3]


def _exact_mean(g: GraphEditor, y: str, base: str, opset: int) -> str:
    """``float(sum(int64(Round(y / m * 2^24)))) / (H W) * m / 2^24``, ``m`` the channel's
    largest ``|y|`` (at least :data:`TINY`)."""
    axes = g.constant(f"{base}.axes", np.array([2, 3], dtype=np.int64))
    m = g.node("Max", [_spatial_max(g, y, base, opset),
                       g.constant(f"{base}.tiny", np.array(TINY))], f"{base}.m")
    scale = g.constant(f"{base}.scale", np.array(SCALE))
    levels = g.node("Round", [g.node("Mul", [g.node("Div", [y, m], f"{base}.unit"), scale],
                                     f"{base}.scaled")], f"{base}.levels")
    total = g.node("ReduceSum", [g.node("Cast", [levels], f"{base}.int", to=TensorProto.INT64),
                                 axes], f"{base}.sum", keepdims=1)
    shape = g.node("Shape", [y], f"{base}.shape")
    hw = g.node("Slice", [shape, g.constant(f"{base}.from", np.array([2], dtype=np.int64)),
                          g.constant(f"{base}.to", np.array([4], dtype=np.int64))], f"{base}.hw")
    count = g.node("Cast", [g.node("ReduceProd", [hw], f"{base}.count", keepdims=1)],
                   f"{base}.n", to=TensorProto.FLOAT)
    mean = g.node("Div", [g.node("Cast", [total], f"{base}.total", to=TensorProto.FLOAT), count],
                  f"{base}.mean_levels")
    return g.node("Div", [g.node("Mul", [mean, m], f"{base}.mean_scaled"), scale],
                  f"{base}.exact_mean")


def _spatial_max(g: GraphEditor, y: str, base: str, opset: int) -> str:
    """``max |y|`` over H and W, kept."""
    magnitude = g.node("Abs", [y], f"{base}.abs")
    if opset >= AXES_INPUT_OPSET:
        axes = g.constant(f"{base}.max_axes", np.array([2, 3], dtype=np.int64))
        return g.node("ReduceMax", [magnitude, axes], f"{base}.max", keepdims=1)
    return g.node("ReduceMax", [magnitude], f"{base}.max", axes=[2, 3], keepdims=1)


def _power(g: GraphEditor, node: onnx.NodeProto, deviations: dict[str, str],
           opset: int) -> str | None:
    """``Pow(y, 2)`` as ``Mul(y, y)``; ``Pow(y, 0.5)`` of ``y = mean(c * c)`` as
    :data:`NEWTON_STEPS` Newton steps ``s = (s + y / s) * 0.5`` from ``s = max(max |c|,
    tiny)``. None for other powers."""
    exponent = g.inits.get(node.input[1])
    if exponent is None or numpy_helper.to_array(exponent).size != 1:
        return None
    value = float(numpy_helper.to_array(exponent).reshape(()))
    y, base = node.input[0], node.output[0]
    if value == 2.0:
        return g.node("Mul", [y, y], f"{base}.square")
    if value != 0.5 or y not in deviations:
        return None
    root = g.node("Max", [_spatial_max(g, deviations[y], base, opset),
                          g.constant(f"{base}.tiny", np.array(TINY))], f"{base}.start")
    half = g.constant(f"{base}.half", np.array(F32(0.5)))
    for _ in range(NEWTON_STEPS):
        total = g.node("Add", [root, g.node("Div", [y, root], f"{base}.quotient")], f"{base}.sum")
        root = g.node("Mul", [total, half], f"{base}.root")
    return root


def _pooled_conv(g: GraphEditor, conv: onnx.NodeProto) -> str | None:
    """A 1x1 conv (stride 1, no padding, one group, constant weights) on a pooled tensor as
    products summed in a fixed tree of pairs; None for any other conv."""
    weight = g.inits.get(conv.input[1])
    if (weight is None or len(weight.dims) != 4 or list(weight.dims[2:]) != [1, 1]
            or attribute(conv, "group", 1) != 1
            or any(v != 1 for v in [*attribute(conv, "strides", []),
                                    *attribute(conv, "dilations", [])])
            or any(attribute(conv, "pads", [])) or attribute(conv, "auto_pad", b"NOTSET") not in (
                b"NOTSET", "NOTSET", b"VALID", "VALID")):
        return None
    base = conv.output[0]
    w = numpy_helper.to_array(weight).astype(F32)[:, :, 0, 0]
    outs, ins = w.shape
    width = 1 << max(ins - 1, 0).bit_length()
    padded = np.zeros((outs, width), dtype=F32)
    padded[:, :ins] = w
    row = g.node("Reshape", [conv.input[0], g.constant(f"{base}.row", np.array(
        [0, 1, ins], dtype=np.int64))], f"{base}.row")
    if width != ins:  # zeros: x + 0 = x exactly
        row = g.node("Pad", [row, g.constant(f"{base}.pads", np.array(
            [0, 0, 0, 0, 0, width - ins], dtype=np.int64))], f"{base}.padded", mode="constant")
    products = g.node("Mul", [row, g.constant(f"{base}.weights", padded)], f"{base}.products")
    pairs = g.constant(f"{base}.pairs", np.array([0, outs, -1, 2], dtype=np.int64))
    last = g.constant(f"{base}.last", np.array([-1], dtype=np.int64))
    while width > 1:
        products = g.node("ReduceSum", [g.node("Reshape", [products, pairs], f"{base}.pair"),
                                        last], f"{base}.tree", keepdims=0)
        width //= 2
    pooled = g.node("Reshape", [products, g.constant(f"{base}.shape", np.array(
        [0, outs, 1, 1], dtype=np.int64))], f"{base}.pooled")
    bias = g.inits.get(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
    if bias is None:
        return pooled
    return g.node("Add", [pooled, g.constant(f"{base}.bias", numpy_helper.to_array(
        bias).astype(F32).reshape(outs, 1, 1))], f"{base}.biased")


def _logistic(g: GraphEditor, z: str, base: str) -> str:
    """The rational logistic of :data:`LOGISTIC_P` / :data:`LOGISTIC_Q`, Horner's rule in
    separate Mul and Add ops, then clamped to [0, 1]."""
    def const(name: str, value: np.float32) -> str:
        return g.constant(f"{base}.{name}", np.array(value))

    x = g.node("Clip", [z, const("low", -CLAMP), const("high", CLAMP)], f"{base}.clamped")
    x2 = g.node("Mul", [x, x], f"{base}.x2")

    def horner(name: str, coefficients: tuple[np.float32, ...]) -> str:
        acc = g.node("Mul", [x2, const(f"{name}0", coefficients[0])], f"{base}.{name}")
        for i, c in enumerate(coefficients[1:], 1):
            acc = g.node("Add", [acc, const(f"{name}{i}", c)], f"{base}.{name}")
            if i < len(coefficients) - 1:
                acc = g.node("Mul", [acc, x2], f"{base}.{name}")
        return acc

    p = g.node("Mul", [horner("p", LOGISTIC_P), x], f"{base}.p")
    ratio = g.node("Div", [p, horner("q", LOGISTIC_Q)], f"{base}.ratio")
    half = g.node("Add", [ratio, const("half", F32(0.5))], f"{base}.logistic")
    return g.node("Clip", [half, const("zero", F32(0)), const("one", F32(1))], f"{base}.gate")
