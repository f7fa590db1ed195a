"""Profiling fixtures: the runtime's tiny bundle, a module-scoped copy, a synthetic benchmark.

The tiny bundle (``tests/runtime/conftest.py``) has three ONNX Runtime engines upscaling x2 by
nearest neighbour plus a bias of 0 (``a4``, offset -1), 1/255 (``a6``, offsets 0 and +1) and
2/255 (``fp32``, the reference), tile 16, thresholds (10, 40). The benchmark has a gentle ramp
(every tile's complexity g < 10: offset -1, engine a4) and uniform noise (g >> 40: engine a6).
``conv_onnx`` is a small two-conv graph named as the exporter and the lowering name theirs (for
per-layer names and BitOPs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtime.imaging import save_rgb
from tests.runtime.conftest import ENGINES, SCALE, tiny_bundle, write_tiny_bundle

__all__ = ["ENGINES", "SCALE", "TILE", "tiny_bundle", "write_benchmark", "write_tiny_bundle"]

TILE = 8  # of the small conv graph (conv_onnx)


def write_benchmark(root: Path) -> Path:
    """``root/HR/{noise,ramp}.png``; LR images are generated (bicubic) when loaded."""
    y, x = np.mgrid[0:48, 0:64]
    ramp = np.stack([x, y, (x + y) // 2], axis=-1).astype(np.uint8)
    save_rgb(root / "HR" / "ramp.png", ramp)
    noise = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    save_rgb(root / "HR" / "noise.png", noise)
    return root


@pytest.fixture(scope="module")
def module_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bundle(tmp_path_factory.mktemp("profile") / "tiny-cpu-x86")


@pytest.fixture(scope="module")
def benchmark_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_benchmark(tmp_path_factory.mktemp("bench") / "Synth")


def _conv_model() -> onnx.ModelProto:
    """lr -> Q/DQ -> conv 3->4 (int8 weight ``body.0.weight`` via DQ) -> ReLU -> conv 4->3
    (float ``tail.weight``) -> sr; node names as the exporter and the lowering write them."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("QuantizeLinear", ["lr", "s", "zp"], ["q"], "body.0.input.q_op"),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"], "body.0.input.dq_op"),
        helper.make_node("DequantizeLinear", ["body.0.weight", "ws"], ["w0"],
                         "body.0.weight_dq_op"),
        helper.make_node("Conv", ["dq", "w0"], ["conv2d"], "node_conv2d", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv2d"], ["relu"], "node_relu"),
        helper.make_node("Conv", ["relu", "tail.weight"], ["sr"], "node_conv2d_1",
                         pads=[1, 1, 1, 1]),
    ]
    inits = [
        numpy_helper.from_array(np.array(1 / 255, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.uint8), "zp"),
        numpy_helper.from_array(rng.integers(-8, 8, (4, 3, 3, 3)).astype(np.int8),
                                "body.0.weight"),
        numpy_helper.from_array(np.array(0.02, np.float32), "ws"),
        numpy_helper.from_array(rng.standard_normal((3, 4, 3, 3)).astype(np.float32) * 0.1,
                                "tail.weight"),
    ]
    graph = helper.make_graph(
        nodes, "convs", [helper.make_tensor_value_info("lr", TensorProto.FLOAT,
                                                       ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("sr", TensorProto.FLOAT, ["n", 3, "h", "w"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def conv_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("convs") / "convs.onnx"
    onnx.save(_conv_model(), str(path))
    return path
