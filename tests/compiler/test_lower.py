"""Lowering to ONNX: FP export parity, and every Q/DQ engine against the simulation it came from.

A tiny EDSR (2 blocks, 8 features) is calibrated in a few steps; each engine (one per image
offset) runs in ONNX Runtime (CPU) and is compared with ``QuantizedSR`` forced to that offset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import Tensor, nn

from compiler.layers import EngineLayer, engine_layers
from compiler.lower.dialects import lower_engine
from compiler.lower.export import INPUT_NAME, export_onnx, find_conv
from compiler.lower.ort import ort_fused_layers
from compiler.lower.qdq import Grid, lowering_summary, quantize_weight
from compiler.quant.calibrate import CalibrationConfig, calibrate
from compiler.quant.qmodel import QuantizedSR, QuantSettings
from compiler.quant.quantizers import quantize_asymmetric, quantize_symmetric
from compiler.quant.quantizers import quantize_weight as simulated_weight
from compiler.quant.record import apply_record
from compiler.zoo import load_model
from compiler.zoo.edsr import EDSR
from runtime.engines.onnxruntime import session_options
from runtime.errors import ConfigError, EngineError
from runtime.metrics import psnr

FAST = CalibrationConfig(patches=8, patch_size=16, steps=20, batch=2, epochs=4, validation=4)
TILE = 24
MIN_PSNR = 50.0
RECORDS = {
    "adabm_w8a4": QuantSettings(method="adabm", wbits=8, abits=4),
    "adabm_w4a4_fq": QuantSettings(method="adabm", wbits=4, abits=4, fq=True),
    "adabm_w8a8_fq": QuantSettings(method="adabm", wbits=8, abits=8, fq=True),  # +1: 9-10 bits
    "ddtb_w4a4_fq": QuantSettings(method="ddtb", wbits=4, abits=4, fq=True),
    "adabm_w8a4_symmetric": QuantSettings(method="adabm", wbits=8, abits=4, symmetric=True),
}
ENGINES = [(name, d) for name, s in RECORDS.items() for d in ((-1, 0, 1) if s.adaptive else (0,))]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fp_model(tiny: tuple[Path, Path]) -> onnx.ModelProto:
    return export_onnx(load_model(tiny[0]).model, TILE)


@pytest.fixture(scope="module")
def records(tiny: tuple[Path, Path]) -> dict[str, dict[str, Any]]:
    weights, calib = tiny
    return {name: calibrate(load_model(weights), settings, FAST, calib).record
            for name, settings in RECORDS.items()}


@pytest.fixture(scope="module")
def inputs() -> dict[str, Tensor]:
    coarse = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    smooth = nn.functional.interpolate(coarse, size=(TILE, TILE), mode="bicubic").clamp(0, 1)
    return {"random": torch.rand(1, 3, TILE, TILE, generator=torch.Generator().manual_seed(1)),
            "smooth": smooth}


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), session_options(1),
                                providers=["CPUExecutionProvider"])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of outputs in [0, 1] (the tests name their own ``psnr`` values)."""
    return psnr(a, b, 1.0)


class _ConstantGate(nn.Module):
    """A DDTB gate frozen at its calibration mean: what an engine can run."""

    def __init__(self, scale: tuple[float, ...]) -> None:
        super().__init__()
        self.scale = torch.tensor(scale, dtype=torch.float32)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale.expand(x.shape[0], 2)


def _simulation(weights: Path, record: dict[str, Any], d_img: int) -> QuantizedSR:
    qnet = apply_record(load_model(weights), record)
    qnet.forced_d_img = d_img
    for _, conv in qnet.qconvs():
        if conv.gate is not None:
            assert conv.gate_mean is not None
            conv.gate = _ConstantGate(conv.gate_mean)  # type: ignore[assignment]
    return qnet


# -- FP export -----------------------------------------------------------------------------------


def test_fp_export_matches_torch(tiny: tuple[Path, Path], fp_model: onnx.ModelProto,
                                 inputs: dict[str, Tensor]) -> None:
    model = load_model(tiny[0]).model
    assert [op.version for op in fp_model.opset_import if op.domain in ("", "ai.onnx")] == [17]
    assert fp_model.ir_version <= 10  # onnx 1.23 writes 14; ORT 1.31 refuses it
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in fp_model.graph.initializer)
    assert [i.name for i in fp_model.graph.input] == ["lr"]
    assert [o.name for o in fp_model.graph.output] == ["sr"]
    session = _session(fp_model)
    for x in inputs.values():
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {INPUT_NAME: x.numpy()})[0]
        assert got.shape == (1, 3, 2 * TILE, 2 * TILE)
        assert float(np.abs(got - expected).max()) < 1e-4


def test_dynamic_export_runs_other_sizes(tiny: tuple[Path, Path]) -> None:
    model = load_model(tiny[0]).model
    proto = export_onnx(model, 16, dynamic=True)
    x = torch.rand(1, 3, 20, 28)
    with torch.no_grad():
        expected = model(x).numpy()
    got = _session(proto).run(None, {INPUT_NAME: x.numpy()})[0]
    assert float(np.abs(got - expected).max()) < 1e-4


def test_every_quantizable_conv_is_found(tiny: tuple[Path, Path],
                                         fp_model: onnx.ModelProto) -> None:
    model = load_model(tiny[0]).model
    for name in [*model.adaptive_convs(), *model.fixed_convs()]:
        node = find_conv(fp_model.graph, name)
        assert node.op_type == "Conv" and node.input[1] == f"{name}.weight"


def test_unknown_layer_name_is_a_clear_error(fp_model: onnx.ModelProto,
                                             records: dict[str, dict[str, Any]]) -> None:
    with pytest.raises(EngineError, match=r"'body\.0\.body\.3'.*did you mean 'body\.0\.body\.2'"):
        find_conv(fp_model.graph, "body.0.body.3")
    layer = engine_layers(records["adabm_w8a4"], 0)[0]
    renamed = EngineLayer("body.7.body.0", layer.act_bits, layer.bounds, layer.w_bits,
                          layer.w_clip, layer.output_range)
    with pytest.raises(EngineError, match=r"Conv of layer 'body\.7\.body\.0'.*no conv weight"):
        lower_engine(fp_model, [renamed])


def test_merged_weights_are_reported_not_guessed() -> None:
    """The exporter merges bit-identical weights: such a layer has no unique conv."""
    model = EDSR(1, 8, 2, 1.0, 255.0)
    twin = model.body[0].body[2]
    with torch.no_grad():
        twin.weight.copy_(model.body[0].body[0].weight)
        twin.bias.copy_(model.body[0].body[0].bias)
    with pytest.raises(EngineError, match="2 convs share the weight 'body.0.body.0.weight'"):
        export_onnx(model, 8)


# -- engines against the simulation ----------------------------------------------------------


@pytest.mark.parametrize(("record_name", "d_img"), ENGINES)
def test_engine_matches_simulation(tiny: tuple[Path, Path], fp_model: onnx.ModelProto,
                                   records: dict[str, dict[str, Any]], inputs: dict[str, Tensor],
                                   record_name: str, d_img: int) -> None:
    record = records[record_name]
    engine = lower_engine(fp_model, engine_layers(record, d_img))
    qnet = _simulation(tiny[0], record, d_img)
    session = _session(engine)
    for kind, x in inputs.items():
        with torch.no_grad():
            expected = qnet(x).numpy()
        got = session.run(None, {INPUT_NAME: x.numpy()})[0]
        psnr = _psnr(got, expected)
        assert psnr >= MIN_PSNR, f"{record_name} d_img={d_img} {kind}: {psnr:.1f} dB"


@pytest.mark.parametrize(("record_name", "d_img"), ENGINES)
def test_quantized_convs_fuse_into_qlinearconv(fp_model: onnx.ModelProto,
                                               records: dict[str, dict[str, Any]],
                                               record_name: str, d_img: int) -> None:
    """Every conv with a quantized input and an output Q runs as QLinearConv in ORT.

    A conv whose own input is float (> 8 bits) also fuses when its producer's output Q/DQ
    feeds it: the fused set lies between the two.
    """
    engine = lower_engine(fp_model, engine_layers(records[record_name], d_img))
    summary = lowering_summary(engine)
    with_q = {s["name"] for s in summary if s["output"] != "float"}
    expected = {s["name"] for s in summary if s["act_bits"] <= 8} & with_q
    assert expected, "no fusable conv: the test would prove nothing"
    assert expected <= ort_fused_layers(engine) <= with_q
    # a block's ReLU folds into the Q of its second conv's input unless that input stays float
    relus = sum(node.op_type == "Relu" for node in engine.graph.node)
    assert relus == sum(s["name"].endswith(".body.2") and s["act_bits"] > 8 for s in summary)
    if records[record_name]["settings"]["fq"]:  # the upsampler conv feeds the tail conv's grid
        assert "tail.0.0" in expected


def test_qlinearconv_biases_are_stored_on_the_int32_lattice(
        fp_model: onnx.ModelProto, records: dict[str, dict[str, Any]]) -> None:
    """Each ``DQ -> Conv -> Q`` conv's bias is an integer multiple of fp32(s_x * s_w), the value
    QLinearConv adds (so a backend adding the float bias adds the same: OpenVINO); the float
    biases of convs without an output Q are the network's own."""
    engine = lower_engine(fp_model, engine_layers(records["adabm_w8a8_fq"], 0))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in engine.graph.initializer}
    producer = {out: node for node in engine.graph.node for out in node.output}
    readers: dict[str, list[str]] = {}
    for node in engine.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    found = 0
    for conv in (n for n in engine.graph.node if n.op_type == "Conv" and len(n.input) > 2):
        x, w = producer.get(conv.input[0]), producer.get(conv.input[1])
        if (x is None or w is None or {x.op_type, w.op_type} != {"DequantizeLinear"}
                or set(readers[conv.output[0]]) != {"QuantizeLinear"}):
            continue
        step = (inits[x.input[1]].astype(np.float32)
                * inits[w.input[1]].astype(np.float32).reshape(-1)).astype(np.float32)
        levels = inits[conv.input[2]].astype(np.float64) / step
        # fp32 holds q * step to 2^-24 relative: large q (a bias far above the step) are
        # integers only to that precision
        off = np.abs(levels - np.round(levels))
        assert (off <= 1e-3 + 2.0**-23 * np.abs(levels)).all(), conv.name
        assert conv.input[2].endswith(".lattice")
        found += 1
    assert found >= 3


def test_exact_placement_without_requantization(tiny: tuple[Path, Path],
                                                fp_model: onnx.ModelProto,
                                                records: dict[str, dict[str, Any]],
                                                inputs: dict[str, Tensor]) -> None:
    """``requantize=False``: only chains get an output Q; parity is at least as good."""
    record = records["adabm_w8a4"]
    exact = lower_engine(fp_model, engine_layers(record, 0), requantize=False)
    outputs = {s["name"]: s["output"] for s in lowering_summary(exact)}
    assert outputs == {"body.0.body.0": "on the input grid of body.0.body.2",
                       "body.0.body.2": "float",
                       "body.1.body.0": "on the input grid of body.1.body.2",
                       "body.1.body.2": "float"}
    qnet = _simulation(tiny[0], record, 0)
    with torch.no_grad():
        expected = qnet(inputs["random"]).numpy()
    got = _session(exact).run(None, {INPUT_NAME: inputs["random"].numpy()})[0]
    assert _psnr(got, expected) >= 60.0


def test_ddtb_gate_is_frozen(records: dict[str, dict[str, Any]]) -> None:
    record = records["ddtb_w4a4_fq"]
    layers = engine_layers(record, 0)
    gated = {layer["name"]: layer for layer in record["layers"] if layer["gate"] is not None}
    assert gated
    for layer in layers:
        assert layer.frozen_gate == (layer.name in gated)
        if layer.name in gated:
            (lower, upper), scale = gated[layer.name]["a_bounds"], gated[layer.name]["gate"][
                "mean_scale"]
            assert layer.bounds == pytest.approx((lower * scale[0], upper * scale[1]), rel=1e-6)


def test_ddtb_gate_without_mean_is_refused(records: dict[str, dict[str, Any]]) -> None:
    record = records["ddtb_w4a4_fq"]
    broken = {**record, "layers": [{**layer, "gate": {**layer["gate"], "mean_scale": None}}
                                   if layer["gate"] else layer for layer in record["layers"]]}
    with pytest.raises(ConfigError, match="gate without 'mean_scale'"):
        engine_layers(broken, 0)


def test_offset_of_a_static_record_is_refused(records: dict[str, dict[str, Any]]) -> None:
    with pytest.raises(ConfigError, match="unknown image offset.*'1'.*allowed: 0"):
        engine_layers(records["ddtb_w4a4_fq"], 1)


def test_unknown_dialect_is_refused(fp_model: onnx.ModelProto,
                                    records: dict[str, dict[str, Any]]) -> None:
    with pytest.raises(ConfigError, match="unknown lowering dialect 'trt'"):
        lower_engine(fp_model, engine_layers(records["adabm_w8a4"], 0), dialect="trt")


# -- the integer grids themselves ------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("bounds", [(-3.7, 5.2), (0.0, 9.0), (0.4, 7.0), (-2.0, -0.5)])
def test_uint8_grid_is_quantize_asymmetric(bits: int, bounds: tuple[float, float]) -> None:
    """Q (uint8) -> Clip -> DQ with the grid's numbers is the simulated quantizer, exactly."""
    grid = Grid.of_bounds(bounds, bits)
    x = torch.linspace(-12, 12, 4001)
    expected = quantize_asymmetric(x, torch.tensor(bounds[0]), torch.tensor(bounds[1]),
                                   torch.tensor(float(bits))).numpy()
    step = np.float32(grid.step)
    stored = np.clip(np.round(x.numpy() / step) + grid.zero_point, 0, 255)
    stored = np.clip(stored, *grid.stored)
    got = (stored - grid.zero_point).astype(np.float32) * step
    assert grid.truncated == (bits == 8 and not bounds[0] <= 0 <= bounds[1])
    # an 8-bit grid without 0 loses the levels beyond uint8; every other value is exact
    kept = [(np.float32(v) - grid.zero_point) * step for v in grid.stored]
    np.testing.assert_array_equal(got, np.clip(expected, kept[0], kept[1]))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("bounds", [(-3.7, 5.2), (0.0, 9.0), (-2.0, -0.5)])
def test_uint8_grid_is_quantize_symmetric(bits: int, bounds: tuple[float, float]) -> None:
    grid = Grid.of_bounds(bounds, bits, symmetric=True)
    x = torch.linspace(-12, 12, 4001)
    alpha = torch.tensor(max(abs(bounds[0]), abs(bounds[1])))
    expected = quantize_symmetric(x, alpha, torch.tensor(float(bits))).numpy()
    step = np.float32(grid.step)
    stored = np.clip(np.clip(np.round(x.numpy() / step) + grid.zero_point, 0, 255), *grid.stored)
    assert not grid.truncated
    np.testing.assert_array_equal((stored - grid.zero_point).astype(np.float32) * step, expected)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_int8_weights_are_the_simulated_weights(per_channel: bool, bits: int) -> None:
    w = torch.randn(6, 4, 3, 3)
    clip = w.abs().flatten(1).amax(1) * 0.8 if per_channel else w.abs().max() * 0.8
    layer = EngineLayer("conv", 8.0, (0.0, 1.0), bits,
                        tuple(clip.tolist()) if per_channel else float(clip))
    q, step = quantize_weight(w.numpy(), layer)
    shaped = step.reshape(-1, 1, 1, 1) if per_channel else step
    assert q.dtype == np.int8
    np.testing.assert_array_equal(q.astype(np.float32) * shaped,
                                  simulated_weight(w, clip, bits).numpy())


@pytest.mark.parametrize("lower_fraction", [-0.25, 0.1])
def test_relu_folding_with_bounds_around_zero(tiny: tuple[Path, Path], fp_model: onnx.ModelProto,
                                              records: dict[str, dict[str, Any]],
                                              inputs: dict[str, Tensor],
                                              lower_fraction: float) -> None:
    """Post-ReLU inputs whose lower bound is below 0 (unused levels) or above 0 (clipped up)."""
    record = records["adabm_w8a4"]
    layers = []
    for layer in record["layers"]:
        if layer["name"].endswith(".body.2"):
            upper = layer["a_bounds"][1]
            layer = {**layer, "a_bounds": [lower_fraction * upper, upper]}
        layers.append(layer)
    moved = {**record, "layers": layers}
    engine = lower_engine(fp_model, engine_layers(moved, 0))
    qnet = _simulation(tiny[0], moved, 0)
    session = _session(engine)
    for kind, x in inputs.items():
        with torch.no_grad():
            expected = qnet(x).numpy()
        psnr = _psnr(session.run(None, {INPUT_NAME: x.numpy()})[0], expected)
        assert psnr >= MIN_PSNR, f"lower bound {lower_fraction} * u, {kind}: {psnr:.1f} dB"
