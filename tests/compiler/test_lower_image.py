"""The image conv on the integer pixels (compiler.lower.image): exact in ONNX Runtime, and the
same numbers as the FP conv up to its 12-bit weights and the rounded padding value."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from compiler.lower.exact import power_of_two_above
from compiler.lower.graph import GraphEditor
from compiler.lower.image import EXACT_SUM, PIXEL_LEVELS, exact_image_conv, image_conv_constants
from runtime.engines.onnxruntime import session_options

MEAN = np.array([114.444, 111.4605, 103.02], dtype=np.float32)  # EDSR's MeanShift, 0..255


def _edsr_head(out_channels: int = 8) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """input -> x 255 -> MeanShift (identity 1x1 conv, bias -mean) -> 3x3 conv, as exported."""
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((out_channels, 3, 3, 3)) * 0.002).astype(np.float32)
    bias = (rng.standard_normal(out_channels) * 0.1).astype(np.float32)
    nodes = [helper.make_node("Mul", ["lr", "rgb_range"], ["mul"]),
             helper.make_node("Conv", ["mul", "sub_mean.weight", "sub_mean.bias"], ["shifted"],
                              kernel_shape=[1, 1]),
             helper.make_node("Conv", ["shifted", "head.0.weight", "head.0.bias"], ["head"],
                              kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Identity", ["head"], ["out"])]
    inits = [numpy_helper.from_array(np.array(255, dtype=np.float32), "rgb_range"),
             numpy_helper.from_array(np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1),
                                     "sub_mean.weight"),
             numpy_helper.from_array(-MEAN, "sub_mean.bias"),
             numpy_helper.from_array(weight, "head.0.weight"),
             numpy_helper.from_array(bias, "head.0.bias")]
    graph = helper.make_graph(
        nodes, "head", [helper.make_tensor_value_info("lr", TensorProto.FLOAT, [1, 3, None, None])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                             ir_version=8), weight, bias


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), session_options(1),
                                   providers=["CPUExecutionProvider"])
    out: np.ndarray = session.run(None, {"lr": x})[0]
    return out


def test_integer_form_is_exact_and_close_to_the_fp_conv() -> None:
    fp, weight, bias = _edsr_head()
    model = onnx.ModelProto()
    model.CopyFrom(fp)
    g = GraphEditor(model.graph)
    conv = next(n for n in model.graph.node if n.output[0] == "head")
    image = exact_image_conv(g, conv, "head.0")
    g.finish()
    assert image is not None and image["a"] == 255 and np.allclose(image["c"], -MEAN)
    assert {n.op_type for n in model.graph.node} >= {"Round", "Pad", "Conv", "Mul", "Add"}
    assert "head.0.weight" in {t.name for t in model.graph.initializer}  # addressed by name

    form = image_conv_constants(weight, bias, 255.0, -MEAN.astype(np.float64))
    assert form.levels == 2047 and 27 * PIXEL_LEVELS * form.levels <= EXACT_SUM
    assert np.array_equal(form.weights, np.round(form.weights))
    assert np.abs(form.weights).max() == form.levels
    assert form.pad.tolist() == [114, 111, 103]
    # the weight constant: the levels times a power of two in [scale, 2 scale) per channel
    constant = numpy_helper.to_array(next(t for t in model.graph.initializer
                                          if t.name == "head.0.weight"))
    units = (constant.reshape(8, -1).sum(axis=1) / form.weights.reshape(8, -1).sum(axis=1))
    assert np.array_equal(constant, form.weights * units.reshape(-1, 1, 1, 1))
    assert np.all((form.scale <= units) & (units < 2 * form.scale))
    assert np.array_equal(units, power_of_two_above(units))

    pixels = np.random.default_rng(1).integers(0, 256, (1, 3, 20, 24)).astype(np.float32)
    x = pixels / 255
    got = _run(model, x)
    # the same numbers as integer sums in FP64 and the FP32 epilogue (ORT folded nothing)
    pad = torch.from_numpy(form.pad.astype(np.float64)).reshape(1, 3, 1, 1)
    padded = torch.nn.functional.pad(torch.from_numpy(pixels).double() - pad, (1, 1, 1, 1)) + pad
    acc = torch.nn.functional.conv2d(padded, torch.from_numpy(form.weights).double()).numpy()
    expected = (acc.astype(np.float32) * form.scale.reshape(1, -1, 1, 1)
                + form.bias.reshape(1, -1, 1, 1))
    assert np.array_equal(got, expected)
    # and the FP conv's: interior up to the 12-bit weights, the border up to the padding value
    # (the rounded mean pixel instead of the mean: under half a grey level)
    reference = _run(fp, x)
    interior = np.abs(got - reference)[..., 1:-1, 1:-1].max()
    border = np.abs(got - reference).max()
    largest_input = 255 - MEAN.min()  # |u| <= 152 grey levels
    weight_bound = 0.5 * np.abs(weight).max() / form.levels * 27 * largest_input
    assert 0 < interior < weight_bound / 4
    assert border <= 0.5 * np.abs(weight).sum(axis=(1, 2, 3)).max() + interior


def test_no_mean_shift_pads_exactly_with_zero() -> None:
    form = image_conv_constants(np.ones((4, 3, 9, 9), dtype=np.float32), None, 1.0,
                                np.zeros(3))
    assert form.pad.tolist() == [0, 0, 0]
    assert form.levels == EXACT_SUM // (243 * PIXEL_LEVELS)  # a 9x9 conv: fewer levels
    assert np.all(form.bias == 0)


def test_power_of_two_above() -> None:
    values = np.array([1.0, 0.75, 3e-5, 2.0 ** -20, 1.5e3, 6e-8], dtype=np.float32)
    units = power_of_two_above(values)
    assert units.dtype == np.float32
    assert np.all((values <= units) & (units < 2 * values))
    assert np.array_equal(np.log2(units), np.round(np.log2(units)))
    assert units[0] == 1.0 and units[3] == 2.0 ** -20 and units[1] == 1.0
