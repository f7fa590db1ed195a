"""The BF16 engine's image path in FP32 (runtime.engines.openvino_precise): which nodes it keeps,
that OpenVINO's CPU plugin really executes them in FP32, and what it buys on a tiny EDSR."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from compiler.lower.export import export_onnx
from compiler.zoo.edsr import EDSR
from runtime.backends import runtime_backend
from runtime.engines.openvino import OpenVinoEngine, _core, compile_config
from runtime.engines.openvino_precise import image_path
from runtime.errors import EngineError
from runtime.imaging import to_uint8
from runtime.metrics import psnr
from tests.compiler.test_parity import _images
from tests.conftest import require_module

require_module("openvino")  # in the test extra: CI fails without it
pytestmark = pytest.mark.usefixtures("one_torch_thread")
BF16_HERE = "bf16" in runtime_backend("openvino").probe().precisions


def _conv(ops: Any, x: Any, cin: int, cout: int, name: str, seed: int) -> Any:
    w = np.random.default_rng(seed).standard_normal((cout, cin, 3, 3)).astype(np.float32)
    conv = ops.convolution(x, ops.constant(w), [1, 1], [1, 1], [1, 1], [1, 1])
    conv.set_friendly_name(name)
    return conv


def test_the_image_path_runs_from_the_input_and_back_from_the_output() -> None:
    """An IMDN-like tail (conv to 3*s^2 channels, DepthToSpace) and an EDSR-like mean shift: the
    path goes through ops and image-shaped convs, and stops after a conv that leaves the image's
    channel count (forward) or reads features (backward)."""
    import openvino
    import openvino.opset13 as ops

    lr = ops.parameter([1, 3, 8, 8], np.float32, name="lr")
    scaled = ops.multiply(lr, ops.constant(np.float32(255)))
    scaled.set_friendly_name("scale")
    shift = _conv(ops, scaled, 3, 3, "sub_mean", 0)
    head = _conv(ops, shift, 3, 8, "head", 1)
    relu = ops.relu(_conv(ops, head, 8, 8, "body", 2))
    relu.set_friendly_name("relu")
    residual = ops.add(relu, head)
    residual.set_friendly_name("residual")
    up = _conv(ops, residual, 8, 12, "upsample", 3)
    shuffle = ops.depth_to_space(up, "blocks_first", 2)
    shuffle.set_friendly_name("shuffle")
    out = ops.divide(_conv(ops, shuffle, 3, 3, "add_mean", 4), ops.constant(np.float32(255)))
    out.set_friendly_name("sr")
    model = openvino.Model([ops.result(out)], [lr], "toy")
    assert image_path(model) == {"scale", "sub_mean", "head", "upsample", "shuffle", "add_mean",
                                 "sr"}


def test_a_model_without_a_channel_dimension_is_refused() -> None:
    import openvino
    import openvino.opset13 as ops

    x = ops.parameter([-1], np.float32, name="x")
    model = openvino.Model([ops.result(ops.relu(x))], [x], "flat")
    with pytest.raises(EngineError, match="cannot find the image path"):
        image_path(model)


@pytest.fixture(scope="module")
def tiny_edsr_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The FP32 graph of a random EDSR x2 (2 blocks, 8 features, 0..255 inside, mean shift)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bf16") / "edsr.onnx"
    onnx.save(export_onnx(EDSR(2, 8, 2, 1.0, 255.0).eval(), 16, dynamic=True), path)
    return path


def _outputs(run: Any) -> list[np.ndarray]:
    return [to_uint8(run((image.transpose(2, 0, 1)[None] / 255).astype(np.float32))[0]
                     .transpose(1, 2, 0)) for image in _images()]


@pytest.mark.skipif(not BF16_HERE, reason="this CPU has no BF16 kernels (OpenVINO's probe)")
def test_the_bf16_engine_runs_its_image_path_in_fp32_and_the_rest_in_bf16(
        tiny_edsr_onnx: Path) -> None:
    """Executed precisions (``get_runtime_model()``): the 4 convs that read or write the image
    (``sub_mean`` with the folded x255, the head, the last conv, ``add_mean`` with the folded
    /255) run FP32, the other 6 BF16; the result is 61 dB from the FP32 engine where a
    whole-graph BF16 compile is 54 dB (half a level moved on a quarter of the values)."""
    engines = {p: OpenVinoEngine(p, tiny_edsr_onnx, 2, threads=1, precision=p)
               for p in ("fp32", "bf16")}
    with engines["fp32"] as fp32, engines["bf16"] as bf16:
        convs = {name: value.split(":")[1] for name, value in bf16.runtime_precisions().items()
                 if value.startswith("Convolution:")}
        assert sorted(convs.values()) == ["bf16"] * 6 + ["f32"] * 4
        assert {name for name, precision in convs.items() if precision == "f32"} <= bf16.kept_fp32
        reference, kept = _outputs(fp32.infer), _outputs(bf16.infer)
    plain = _core().compile_model(_core().read_model(str(tiny_edsr_onnx)), "CPU",
                                  compile_config(1, "bf16"))
    whole = _outputs(lambda x: plain({0: x})[0])
    for ours, theirs, ref in zip(kept, whole, reference, strict=True):
        assert psnr(ours, ref, 255.0) >= 58.0
        assert psnr(theirs, ref, 255.0) < 56.0
