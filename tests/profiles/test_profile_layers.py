"""Per-layer times (ONNX Runtime trace -> module names) and BitOPs from the ONNX graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from profiles.bitops import conv_macs, tile_gbitops
from profiles.layers import OTHER, LayerNamer, kernel_times, onnxruntime_layer_times, top_layers
from runtime.errors import EngineError
from runtime.manifest import EngineSpec, FileRef, LayerPlan
from tests.profiles.conftest import TILE


def test_namer_maps_kernels_to_modules(conv_onnx: Path) -> None:
    namer = LayerNamer.from_onnx(conv_onnx)
    assert namer.module("node_conv2d") == "body.0"
    assert namer.module("conv2d_nchwc") == "body.0"  # ORT's NCHWc conv, named by its output
    assert namer.module("relu_nchwc") == "body.0"  # a Conv+ReLU fusion named by the ReLU
    assert namer.module("node_conv2d_1_token_12") == "tail"
    assert namer.module("body.0.input.dq_op") == "body.0"  # the lowering's naming
    assert namer.module("node_conv2d + node_relu") == "body.0"  # a TensorRT fused layer
    assert namer.module("fused", inputs=["x", "tail.weight"]) == "tail"  # QLinearConv weight
    assert namer.module("ReorderOutput_token_3") is None


def test_kernel_times_skip_the_warm_up_run() -> None:
    run = {"cat": "Session", "name": "model_run"}
    events = [
        {**run, "ts": 0}, {"cat": "Node", "name": "conv_kernel_time", "ts": 1, "dur": 9000,
                           "args": {"op_name": "Conv"}},
        {**run, "ts": 100}, {"cat": "Node", "name": "conv_kernel_time", "ts": 101, "dur": 2000,
                             "args": {"op_name": "Conv"}},
        {"cat": "Node", "name": "relu_kernel_time", "ts": 103, "dur": 500,
         "args": {"op_name": "Relu"}},
        {"cat": "Node", "name": "reorder_kernel_time", "ts": 104, "dur": 500,
         "args": {"op_name": "ReorderOutput"}},
        {**run, "ts": 200}, {"cat": "Node", "name": "conv_kernel_time", "ts": 201, "dur": 3000,
                             "args": {"op_name": "Conv"}},
    ]
    kernels = kernel_times(events, skip_runs=1)
    assert kernels == {"conv": ("Conv", 5.0), "relu": ("Relu", 0.5),
                       "reorder": ("ReorderOutput", 0.5)}
    layers = top_layers(kernels, {"conv": "body.0", "relu": "body.0"}, calls=2, top=1)
    assert [(x.name, x.op) for x in layers] == [("body.0", "Conv"), (OTHER, "-")]
    assert [x.ms for x in layers] == pytest.approx([2.75, 0.25])
    assert sum(x.share for x in layers) == pytest.approx(1.0)
    with pytest.raises(EngineError, match="holds 3 runs"):
        kernel_times(events, skip_runs=3)


def test_onnxruntime_layer_times_name_modules(conv_onnx: Path) -> None:
    batch = np.random.default_rng(1).random((2, 3, TILE, TILE), dtype=np.float32)
    layers = onnxruntime_layer_times("convs", conv_onnx, batch, scale=1, tile=None, threads=1,
                                     runs=3, top=10)
    names = {x.name for x in layers}
    assert {"body.0", "tail"} <= names
    assert all(x.ms > 0 for x in layers)
    assert sum(x.share for x in layers) == pytest.approx(1.0)
    assert [x.ms for x in layers] == sorted((x.ms for x in layers), reverse=True)


def test_bitops_from_the_graph_and_the_layer_bits(conv_onnx: Path) -> None:
    macs = conv_macs(conv_onnx, TILE)
    per_conv = TILE * TILE * 4 * 3 * 9  # 8x8 outputs x 4 channels x (3 in x 3 x 3) = 6912
    assert macs == {"body.0.weight": per_conv, "tail.weight": per_conv}
    spec = EngineSpec(
        name="a4", backend="onnxruntime", onnx=FileRef(conv_onnx.name, "0" * 64, 0), plan=None,
        precision="int8", offsets=(-1, 0, 1), reference=True, fab=4.0,
        layers=(LayerPlan("body.0", "int8", 4, 8),), input_shape=(-1, 3, -1, -1))
    # body.0: 4-bit activations, 8-bit weights; tail is not listed: counted as float (32 x 32)
    expected = (per_conv * (8 / 32) * (4 / 32) + per_conv) / 1e9
    assert tile_gbitops(spec, conv_onnx.parent, TILE) == pytest.approx(expected)
