"""TensorRT-dialect engines (FP32, run by ONNX Runtime) against ``simulate_engine(dialect=
"tensorrt")``.

A tiny random IMDN x2 (16 features, 2 blocks) is calibrated in a few steps; every engine of the
cpu-x86 plans of both ladders is lowered in the TensorRT dialect, passes the checker, and runs in
ONNX Runtime with its graph optimizations off: FP32 convs on the dequantized values, the bias
float (TensorRT adds it in float too). The simulation keeps every bias float in this dialect;
with the ORT dialect's int32 bias lattice (QLinearConv's) it was 56-60 dB off here (3-7% of the
output values differ) and, on IMDN x4 / Set5, 26-40 dB.

What is left is FP32 summation order: ONNX Runtime and torch sum a conv's products in different
orders, so an output next to a rounding tie of the next quantizer lands on the other level now
and then (1e-6 to 3e-5 of the values per conv, measured on IMDN x4 and EDSR x2 with both given
the same input), and a quantized network amplifies each flip layer after layer. Here, 0-15 of
~27,000 output values differ (76 dB to identical); on IMDN x4 / Set5, 33-41 dB, about as far
as the simulation in FP32 is from the same simulation with FP64 conv sums (37-41 dB):
``benchmarks/bundle_parity.py --dialect tensorrt``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from compiler.lower.export import INPUT_NAME, export_onnx
from compiler.lower.qdq import lower_engine, lowering_summary
from compiler.lower.trt import check_tensorrt_graph
from compiler.parity import simulate_engine
from compiler.plan import PlannedEngine, plan_engines
from compiler.quant.qmodel import QConv2d
from compiler.simulate import TorchUpscaler
from compiler.zoo import load_model
from runtime.engines.onnxruntime import session_options
from runtime.imaging import to_uint8
from runtime.manifest import EngineSpec, FileRef
from runtime.metrics import psnr
from targets.loader import load_target
from tests.compiler.test_parity import _images, tiny_imdn

OPSET = 17  # TensorRT 8.5, the lowest parser of the targets
MIN_PSNR = 65.0  # measured 76.6 dB to identical; 56-60 dB with the bias on the int32 lattice
# share of differing output values: measured <= 0.06% with every layer quantized, 0.52%
# (68.1 dB) with the trunk ends in FP32 (the hardware plan: FP32 sum orders of fea_conv and of
# LR_conv's float output, which the TensorRT dialect leaves to TensorRT); 3-7% with the lattice
MAX_DIFFERING = 0.01
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def imdn(tiny: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
         ) -> tuple[Path, dict[str, Any], onnx.ModelProto]:
    """Weights, AdaBM W8A6 FQ record and dynamic-shape FP graph of a tiny IMDN x2."""
    _, calib = tiny
    root = tmp_path_factory.mktemp("imdn_trt")
    weights, record = tiny_imdn(root, calib)
    fp = export_onnx(load_model(weights).model, 16, dynamic=True, dynamic_batch=True)
    return weights, record, fp


def _spec(planned: PlannedEngine) -> EngineSpec:
    return EngineSpec(name=planned.name, backend="tensorrt", onnx=FileRef("unused.onnx", "", 0),
                      plan=None, precision=planned.precision, offsets=planned.offsets,
                      reference=planned.reference, fab=planned.fab, layers=planned.layers,
                      input_shape=(-1, 3, -1, -1))


def _qconvs(qnet: torch.nn.Module) -> dict[str, QConv2d]:
    return {name.removeprefix("model."): module for name, module in qnet.named_modules()
            if isinstance(module, QConv2d)}


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    """The graph's ONNX semantics: no QLinearConv fusion (ONNX Runtime's own arithmetic)."""
    return ort.InferenceSession(model.SerializeToString(), session_options(1, optimize=False),
                                providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("ladder", ["hardware", "emulate"])
def test_tensorrt_engines_match_their_simulation(
        imdn: tuple[Path, dict[str, Any], onnx.ModelProto], ladder: str) -> None:
    weights, record, fp = imdn
    plan = plan_engines(record, load_target("cpu-x86"), ladder, tile=16, overlap=4)
    engines = [planned for planned in plan.engines if not planned.reference]
    assert engines
    for planned in engines:
        model = lower_engine(fp, planned.specs, dialect="tensorrt", float_type="fp32",
                             max_opset=OPSET)
        check_tensorrt_graph(model, OPSET)
        summary = lowering_summary(model)
        qnet = simulate_engine(weights, record, _spec(planned), summary=summary,
                               dialect="tensorrt")
        assert not any(conv.integer_bias for conv in _qconvs(qnet).values())
        sim = TorchUpscaler(qnet, 2)
        session = _session(model)
        for image in _images():
            x = (image.transpose(2, 0, 1)[None] / 255).astype(np.float32)
            out = to_uint8(session.run(None, {INPUT_NAME: x})[0][0].transpose(1, 2, 0))
            ref = to_uint8(sim(image))
            where = f"{ladder} {planned.name} {image.shape}"
            assert psnr(out, ref, 255.0) >= MIN_PSNR, f"{where}: {psnr(out, ref, 255.0):.1f} dB"
            assert np.mean(out != ref) <= MAX_DIFFERING, where


def test_only_the_ort_dialect_puts_the_bias_on_the_int32_lattice(
        imdn: tuple[Path, dict[str, Any], onnx.ModelProto]) -> None:
    """QLinearConv (ORT) quantizes the bias of a conv followed by a Q; TensorRT keeps it float."""
    weights, record, fp = imdn
    planned = next(p for p in plan_engines(record, load_target("cpu-x86"), "hardware",
                                           tile=16, overlap=4).engines if not p.reference)
    requantized = {entry["name"] for entry in lowering_summary(
        lower_engine(fp, planned.specs, dialect="tensorrt")) if entry["output"] != "float"}
    assert requantized
    ort_summary = lowering_summary(lower_engine(fp, planned.specs))
    ort_sim = _qconvs(simulate_engine(weights, record, _spec(planned), summary=ort_summary))
    assert any(ort_sim[name].integer_bias for name in requantized)
    for summary in (lowering_summary(lower_engine(fp, planned.specs, dialect="tensorrt")), None):
        trt_sim = simulate_engine(weights, record, _spec(planned), summary=summary,
                                  dialect="tensorrt")
        assert not any(conv.integer_bias for conv in _qconvs(trt_sim).values())
