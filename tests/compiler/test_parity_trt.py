"""TensorRT-dialect engines (FP32, run by ONNX Runtime) against ``simulate_engine(dialect=
"tensorrt")``.

A tiny random IMDN x2 (16 features, 2 blocks) is calibrated in a few steps; every engine of the
cpu-x86 plans of both ladders is lowered in the TensorRT dialect, passes the checker, and runs in
ONNX Runtime with its graph optimizations off (the graph's ONNX semantics; the optimizer would
substitute QLinearConv arithmetic). Every quantized conv sums integer levels times powers of two
(exact in FP32 in any order), the image conv sums integer pixels, and the simulation rounds the
rest as the graph does (``compiler.parity.TensorRTConv2d``), so the outputs are identical, as
for the ORT dialect. Before that (FP32 convs on the dequantized values), FP32 summation order
alone left 0-15 of ~27,000 values different here and IMDN x4 engines 33-41 dB from their
simulation on Set5 (``benchmarks/bundle_parity.py --dialect tensorrt``: now identical there too).
The simulation keeps every bias float in this dialect; with the ORT dialect's int32 bias lattice
(QLinearConv's) it was 56-60 dB off here and 26-40 dB on IMDN x4 / Set5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from compiler.lower.dialects import lower_engine
from compiler.lower.export import INPUT_NAME, export_onnx
from compiler.lower.qdq import lowering_facts, lowering_summary
from compiler.lower.trt_check import check_tensorrt_graph
from compiler.parity import simulate_engine
from compiler.plan import PlannedEngine, plan_engines
from compiler.quant.calibrate import calibrate
from compiler.quant.qmodel import QConv2d, QuantSettings
from compiler.simulate import TorchUpscaler
from compiler.zoo import load_model
from runtime.engines.onnxruntime import session_options
from runtime.imaging import to_uint8
from runtime.manifest import EngineSpec, FileRef
from targets.loader import load_target
from tests.compiler.test_parity import FAST, _images, tiny_imdn

OPSET = 17  # TensorRT 8.5, the lowest parser of the targets
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


@pytest.fixture(scope="module")
def edsr(tiny: tuple[Path, Path]) -> tuple[Path, dict[str, Any], onnx.ModelProto]:
    """The tiny EDSR x2 with an AdaBM W8A6 FQ record: its 8-bit grids (the hardware ladder's,
    the fixed layers') are shifted into int8, so its engines exercise the shift's Pad and
    bias. (A W8A8 record has 9-10-bit layers: FP32 convs on float inputs,
    whose sums round in another order in ONNX Runtime than in torch, as the reference engine.)"""
    weights, calib = tiny
    settings = QuantSettings(method="adabm", wbits=8, abits=6, fq=True)
    record = calibrate(load_model(weights), settings, FAST, calib).record
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
@pytest.mark.parametrize("model", ["imdn", "edsr"])
def test_tensorrt_engines_are_bit_exact_with_their_simulation(
        request: pytest.FixtureRequest, model: str, ladder: str) -> None:
    weights, record, fp = request.getfixturevalue(model)
    plan = plan_engines(record, load_target("cpu-x86"), ladder, tile=16, overlap=4)
    engines = [planned for planned in plan.engines if not planned.reference]
    assert engines
    shifts = set()
    for planned in engines:
        model_proto = lower_engine(fp, planned.specs, dialect="tensorrt", float_type="fp32",
                                   max_opset=OPSET)
        check_tensorrt_graph(model_proto, OPSET)
        summary = lowering_summary(model_proto)
        assert any(entry["integer_conv"] for entry in summary)
        shifts |= {entry["input_shift"] for entry in summary}
        assert lowering_facts(model_proto)["statistics"] == "exact"
        qnet = simulate_engine(weights, record, _spec(planned), summary=summary,
                               dialect="tensorrt", statistics="exact")
        assert not any(conv.integer_bias for conv in _qconvs(qnet).values())
        sim = TorchUpscaler(qnet, 2)
        session = _session(model_proto)
        for image in _images():
            x = (image.transpose(2, 0, 1)[None] / 255).astype(np.float32)
            out = to_uint8(session.run(None, {INPUT_NAME: x})[0][0].transpose(1, 2, 0))
            ref = to_uint8(sim(image))
            differing = int(np.sum(out != ref))
            assert differing == 0, (f"{model} {ladder} {planned.name} {image.shape}: "
                                    f"{differing} of {out.size} output values differ")
    if model == "edsr":
        assert shifts - {0}


def test_integer_convs_read_levels_times_powers_of_two(
        edsr: tuple[Path, dict[str, Any], onnx.ModelProto]) -> None:
    """Each conv on integer levels reads a DQ directly (nothing between that TensorRT would not
    fuse); that DQ and the Q before it share one scale, the power of two within 2x of the
    grid's step, and the weight DQ's scales are powers of two. A shifted input is padded
    between its Clip and its Q with its level of 0, so the conv itself pads nothing."""
    _, record, fp = edsr
    planned = next(p for p in plan_engines(record, load_target("cpu-x86"), "emulate", tile=16,
                                           overlap=4).engines if not p.reference)
    engine = lower_engine(fp, planned.specs, dialect="tensorrt", max_opset=OPSET)
    consts = {t.name: numpy_helper.to_array(t) for t in engine.graph.initializer}
    producers = {out: node for node in engine.graph.node for out in node.output}
    summary = {entry["name"]: entry for entry in lowering_summary(engine)}
    checked, shifted = 0, 0
    for name, entry in summary.items():
        if not entry["integer_conv"]:
            continue
        conv = next(c for c in engine.graph.node if c.op_type == "Conv" and c.input[1] in
                    producers and producers[c.input[1]].input[0] == f"{name}.weight")
        dq = producers[conv.input[0]]
        assert dq.op_type == "DequantizeLinear"
        q = producers[dq.input[0]]
        assert q.op_type == "QuantizeLinear"
        unit = float(consts[dq.input[1]])
        assert float(consts[q.input[1]]) == unit
        step = entry["input_grid"]["step"]
        assert unit == 2.0 ** np.ceil(np.log2(step)) and step <= unit < 2 * step
        assert entry["input_grid"]["unit"] == unit
        source = producers[q.input[0]]
        if entry["input_shift"]:
            assert source.op_type == "Pad"
            assert float(consts[source.input[2]]) == entry["input_shift"] * unit
            assert not any(next((a.ints for a in conv.attribute if a.name == "pads"), []))
            shifted += 1
        w_units = consts[producers[conv.input[1]].input[1]]
        assert np.all(np.log2(w_units) == np.round(np.log2(w_units)))
        checked += 1
    assert checked > shifted > 0


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
