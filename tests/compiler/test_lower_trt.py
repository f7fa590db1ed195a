"""The TensorRT dialect: every engine against the simulation it came from, and the checker.

Engines run in ONNX Runtime (CPU) with its graph optimizations off: the optimizer would rewrite
each ``DQ -> Conv`` float bias into int32 on the ``s_x * s_w`` lattice (ORT's own QLinearConv
arithmetic, which TensorRT does not share); unoptimized, ORT computes the graph's ONNX semantics.
The tiny EDSR fixture covers the bit configurations; the 8-block EDSR x2 checkpoint covers real
weights on Set5 crops.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from test_lower import ENGINES, FAST, MIN_PSNR, RECORDS, TILE, _psnr, _simulation
from torch import Tensor, nn

from compiler.layers import engine_layers
from compiler.lower.dialects import lower_engine
from compiler.lower.exact import power_of_two_above
from compiler.lower.export import INPUT_NAME, export_onnx
from compiler.lower.qdq import Grid, lowering_summary
from compiler.lower.trt import fit_int8, int8_shift, target_opset
from compiler.lower.trt_check import check_tensorrt_graph
from compiler.quant.calibrate import CalibrationConfig, calibrate
from compiler.quant.qmodel import QuantSettings
from compiler.quant.quantizers import quantize_asymmetric, quantize_symmetric
from compiler.quant.record import apply_record
from compiler.zoo import load_model
from runtime.benchmark import load_benchmark
from runtime.engines.onnxruntime import session_options
from runtime.errors import ConfigError, EngineError
from runtime.imaging import to_uint8
from runtime.metrics import psnr_y

XAVIER_OPSET = 17  # TensorRT 8.5
ORIN_OPSET = 20  # TensorRT 10.3

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fp_model(tiny: tuple[Path, Path]) -> onnx.ModelProto:
    return export_onnx(load_model(tiny[0]).model, TILE, batch=2)


@pytest.fixture(scope="module")
def records(tiny: tuple[Path, Path]) -> dict[str, dict[str, Any]]:
    weights, calib = tiny
    return {name: calibrate(load_model(weights), settings, FAST, calib).record
            for name, settings in RECORDS.items()}


@pytest.fixture(scope="module")
def inputs() -> Tensor:
    """A random and a smooth tile, one batch."""
    coarse = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    smooth = nn.functional.interpolate(coarse, size=(TILE, TILE), mode="bicubic").clamp(0, 1)
    noise = torch.rand(1, 3, TILE, TILE, generator=torch.Generator().manual_seed(1))
    return torch.cat([noise, smooth])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(),
                                   session_options(1, optimize=False),
                                   providers=["CPUExecutionProvider"])
    out: np.ndarray = session.run(None, {INPUT_NAME: x})[0]
    return out


def _parity(engine: onnx.ModelProto, qnet: nn.Module, x: Tensor) -> float:
    """The lowest PSNR over the batch's images between the engine and the simulation."""
    with torch.no_grad():
        expected = qnet(x).numpy()
    got = _run(engine, x.numpy())
    return min(_psnr(a, b) for a, b in zip(got, expected, strict=True))


def _opset(model: onnx.ModelProto) -> int:
    return next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))


# -- engines against the simulation ----------------------------------------------------------


@pytest.mark.parametrize(("record_name", "d_img"), ENGINES)
def test_engine_matches_simulation(tiny: tuple[Path, Path], fp_model: onnx.ModelProto,
                                   records: dict[str, dict[str, Any]], inputs: Tensor,
                                   record_name: str, d_img: int) -> None:
    """FP32 (opset 17, TensorRT 8.5) and FP16 (opset 19) engines pass the checker and parity."""
    record = records[record_name]
    layers = engine_layers(record, d_img)
    qnet = _simulation(tiny[0], record, d_img)
    fp32 = lower_engine(fp_model, layers, dialect="tensorrt", max_opset=XAVIER_OPSET)
    check_tensorrt_graph(fp32, XAVIER_OPSET)
    assert _opset(fp32) == XAVIER_OPSET
    assert _parity(fp32, qnet, inputs) >= MIN_PSNR
    exact = lower_engine(fp_model, layers, dialect="tensorrt", requantize=False)
    assert _parity(exact, qnet, inputs) >= 60.0
    fp16 = lower_engine(fp_model, layers, dialect="tensorrt", float_type="fp16",
                        max_opset=ORIN_OPSET)
    check_tensorrt_graph(fp16, ORIN_OPSET)
    assert _opset(fp16) == 19
    assert _parity(fp16, qnet, inputs) >= MIN_PSNR
    # the placement is the ORT dialect's; only the encoding differs (the ORT dialect also puts
    # the RGB output conv on the image's own grid, which the TensorRT dialect leaves float)
    ort_summary = lowering_summary(lower_engine(fp_model, layers))
    ort_outputs = ["float" if s["output"].startswith("the output image") else s["output"]
                   for s in ort_summary]
    assert [s["output"] for s in lowering_summary(fp32)] == ort_outputs


def test_eight_bit_asymmetric_grids_are_shifted(records: dict[str, dict[str, Any]],
                                                fp_model: onnx.ModelProto) -> None:
    """8-bit post-ReLU grids ([0, 255]) move down by 128; fixed 8-bit layers by a few steps."""
    record = records["adabm_w8a8_fq"]
    shifts: dict[str, set[int]] = {}
    for d_img in (-1, 0, 1):
        for entry in lowering_summary(lower_engine(fp_model, engine_layers(record, d_img),
                                                   dialect="tensorrt")):
            shifts.setdefault(entry["name"], set()).add(entry["input_shift"])
            assert not entry["truncated_grid"]
    assert any(-128 in shifts[f"body.{i}.body.2"] for i in (0, 1))
    assert any(shifts[name] != {0} for name in ("head.0", "body.2", "tail.0.0", "tail.1"))
    for d_img in (-1, 0, 1):  # 4-bit body grids contain 0: never shifted
        summary = lowering_summary(lower_engine(fp_model, engine_layers(
            records["adabm_w4a4_fq"], d_img), dialect="tensorrt"))
        assert all(s["input_shift"] == 0 for s in summary if s["name"].startswith("body.0."))


def test_fp16_graph_structure(fp_model: onnx.ModelProto,
                              records: dict[str, dict[str, Any]]) -> None:
    engine = lower_engine(fp_model, engine_layers(records["adabm_w4a4_fq"], 0),
                          dialect="tensorrt", float_type="fp16")
    floats = [t for t in engine.graph.initializer
              if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
    assert floats and all(t.data_type == TensorProto.FLOAT16 for t in floats)
    first, last = engine.graph.node[0], engine.graph.node[-1]
    casts = [n for n in engine.graph.node if n.op_type == "Cast"]
    assert len(casts) == 2
    assert casts[0].input[0] == "lr" and casts[0].attribute[0].i == TensorProto.FLOAT16
    assert last.op_type == "Cast" and last.output[0] == "sr"
    assert last.attribute[0].i == TensorProto.FLOAT
    assert first.op_type in ("Cast", "DequantizeLinear")  # weight DQs have no input dependency
    assert json.loads(engine.metadata_props[0].value)["float_type"] == "fp16"


def test_grids_that_exclude_zero_are_cut_as_in_the_ort_dialect(
        fp_model: onnx.ModelProto, records: dict[str, dict[str, Any]]) -> None:
    """8-bit bounds above 0: int8 cannot hold their levels and 0 (the conv's zero padding)
    together, so the levels farthest from 0 are cut, as uint8 cuts them in the ORT dialect;
    the summary says so (the parity simulation reads the cut levels, test_parity_trt)."""
    record = records["adabm_w8a8_fq"]
    layers = []
    for layer in record["layers"]:
        if layer["name"].endswith(".body.2"):
            upper = layer["a_bounds"][1]
            layer = {**layer, "a_bounds": [0.1 * upper, upper]}
        layers.append(layer)
    specs = engine_layers({**record, "layers": layers}, 0)
    cut_ort = {s["name"] for s in lowering_summary(lower_engine(fp_model, specs))
               if s["truncated_grid"]}
    engine = lower_engine(fp_model, specs, dialect="tensorrt", requantize=False)
    summary = [s for s in lowering_summary(engine) if s["truncated_grid"]]
    assert cut_ort and {s["name"] for s in summary} == cut_ort
    for entry in summary:
        low, high = entry["input_grid"]["levels"]
        assert low > 0 and high == 255 and entry["input_shift"] == -128


def test_opset_is_lowered_to_the_target(tiny: tuple[Path, Path], fp_model: onnx.ModelProto,
                                        records: dict[str, dict[str, Any]],
                                        inputs: Tensor) -> None:
    """An opset-18 FP graph becomes an opset-17 engine for TensorRT 8.5."""
    record = records["adabm_w4a4_fq"]
    fp18 = onnx.version_converter.convert_version(fp_model, 18)
    assert _opset(fp18) == 18
    engine = lower_engine(fp18, engine_layers(record, 0), dialect="tensorrt",
                          max_opset=XAVIER_OPSET)
    assert _opset(engine) == XAVIER_OPSET
    assert _parity(engine, _simulation(tiny[0], record, 0), inputs) >= MIN_PSNR


def test_target_opset_rules() -> None:
    assert target_opset(17, "fp32", None) == 17
    assert target_opset(18, "fp32", 17) == 17
    assert target_opset(17, "fp16", 20) == 19
    assert target_opset(20, "fp16", None) == 20
    with pytest.raises(ConfigError, match=r"'fp16' needs opset >= 19.*parses <= 17"):
        target_opset(17, "fp16", 17)


def test_bad_options_are_refused(fp_model: onnx.ModelProto,
                                 records: dict[str, dict[str, Any]]) -> None:
    layers = engine_layers(records["adabm_w8a4"], 0)
    with pytest.raises(ConfigError, match="unknown float type 'bf16'"):
        lower_engine(fp_model, layers, dialect="tensorrt", float_type="bf16")
    with pytest.raises(ConfigError, match="ort dialect keeps the FP graph's FP32"):
        lower_engine(fp_model, layers, float_type="fp16")
    with pytest.raises(ConfigError, match="needs opset >= 19"):
        lower_engine(fp_model, layers, dialect="tensorrt", float_type="fp16", max_opset=17)


# -- the int8 embedding itself -----------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 7, 8])
@pytest.mark.parametrize("bounds", [(-3.7, 5.2), (0.0, 9.0), (0.4, 7.0), (-2.0, -0.5)])
def test_int8_grid_is_quantize_asymmetric(bits: int, bounds: tuple[float, float]) -> None:
    """Shift, Clip, int8 Q (zero point 0), DQ, unshift: the simulated quantizer.

    Exact except within float rounding of a tie (``x / step`` within 1e-3 of ``j + 1/2``), where
    ``(x + k step) / step`` may round to the other neighbour.
    """
    grid = fit_int8(Grid.of_bounds(bounds, bits))
    k = int8_shift(grid)
    low, high = grid.low + k, grid.high + k
    assert low >= -128 and high <= 127 and -128 <= k <= 127
    assert (k == 0) == (grid.low >= -128 and grid.high <= 127)
    assert k % 2 == 0 or max(grid.high, 0) - min(grid.low, 0) == 255  # ties round alike
    step = np.float32(grid.step)
    unit = power_of_two_above(step)
    ratio = np.float32(unit / step)
    x = torch.linspace(-12, 12, 4001).numpy()
    shifted = x * ratio + np.float32(k) * unit
    stored = np.clip(np.round(np.clip(shifted, low * unit, high * unit) / unit), -128, 127)
    got = (stored - k).astype(np.float32) * step
    expected = np.clip(quantize_asymmetric(  # less the levels fit_int8 cut
        torch.from_numpy(x), torch.tensor(bounds[0]), torch.tensor(bounds[1]),
        torch.tensor(float(bits))).numpy(), grid.low * step, grid.high * step)
    ratio = x / step
    near_tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < 1e-3
    np.testing.assert_allclose(got[~near_tie], expected[~near_tie], rtol=0, atol=1e-5 * step)
    assert np.all(np.abs(got - expected) <= 1.0001 * step)
    assert near_tie.mean() < 0.05  # linspace hits exact ties often; most points are compared


def test_symmetric_grids_need_no_shift() -> None:
    for bits in (2, 4, 8):
        grid = Grid.of_bounds((-1.5, 2.5), bits, symmetric=True)
        assert int8_shift(grid) == 0 and grid.low == -grid.high
    assert int8_shift(Grid(0.1, 0, 255)) == -128
    assert int8_shift(Grid(0.1, -134, 121)) == 6
    assert int8_shift(Grid(0.1, -133, 100)) == 6  # even: 5 would also fit
    assert fit_int8(Grid(0.1, 200, 455)) == Grid(0.1, 200, 255)
    assert int8_shift(Grid(0.1, 200, 255)) == -128
    with pytest.raises(EngineError, match="together with 0"):
        int8_shift(Grid(0.1, 200, 455))


# -- the checker on graphs broken on purpose ------------------------------------------------------


@pytest.fixture
def engine(fp_model: onnx.ModelProto, records: dict[str, dict[str, Any]]) -> onnx.ModelProto:
    """A valid TensorRT-dialect graph with shifted, clipped and full-range quantizers."""
    model = lower_engine(fp_model, engine_layers(records["adabm_w8a8_fq"], 0), dialect="tensorrt")
    check_tensorrt_graph(model, XAVIER_OPSET)
    return model


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _init(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def _set_init(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    _init(model, name).CopyFrom(numpy_helper.from_array(value, name))


def _clipped_q(model: onnx.ModelProto) -> onnx.NodeProto:
    producers = {out: n for n in model.graph.node for out in n.output}
    return next(n for n in model.graph.node if n.op_type == "QuantizeLinear"
                and producers[n.input[0]].op_type == "Clip")


def _zero_point_uint8(m: onnx.ModelProto) -> str:
    q = _clipped_q(m)
    _set_init(m, q.input[2], np.array(0, dtype=np.uint8))
    return q.name


def _zero_point_three(m: onnx.ModelProto) -> str:
    q = _clipped_q(m)
    _set_init(m, q.input[2], np.array(3, dtype=np.int8))
    return q.name


def _computed_scale(m: onnx.ModelProto) -> str:
    q = _clipped_q(m)
    m.graph.node.insert(0, helper.make_node("Mul", [q.input[1], q.input[1]], ["scale_sq"],
                                            "square_scale"))
    q.input[1] = "scale_sq"
    return q.name


def _missing_clip(m: onnx.ModelProto) -> str:
    q = _clipped_q(m)
    clip = next(n for n in m.graph.node if q.input[0] in n.output)
    q.input[0] = clip.input[0]
    return q.name


def _per_channel_activation(m: onnx.ModelProto) -> str:
    q = _clipped_q(m)
    scale = numpy_helper.to_array(_init(m, q.input[1]))
    _set_init(m, q.input[1], np.full(8, scale, dtype=np.float32))
    q.attribute.append(helper.make_attribute("axis", 1))
    return q.name


def _weight_axis(m: onnx.ModelProto) -> str:
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear"
              and n.input[0].endswith(".weight"))
    channels = _init(m, dq.input[0]).dims[0]
    scale = numpy_helper.to_array(_init(m, dq.input[1]))
    _set_init(m, dq.input[1], np.full(channels, scale, dtype=np.float32))
    dq.attribute.append(helper.make_attribute("axis", 1))
    return dq.name


def _uint8_tensor(m: onnx.ModelProto) -> str:
    relu = next(n for n in m.graph.node if n.op_type == "Conv")
    m.graph.node.append(helper.make_node("Cast", [relu.output[0]], ["as_bytes"], "to_bytes",
                                         to=TensorProto.UINT8))
    m.graph.output.append(helper.make_tensor_value_info("as_bytes", TensorProto.UINT8, None))
    return "to_bytes"


def _computed_pad(m: onnx.ModelProto) -> str:
    pad = next(n for n in m.graph.node if n.op_type == "Pad")
    m.graph.node.insert(0, helper.make_node("Identity", [pad.input[1]], ["pads_copy"], "copy"))
    pad.input[1] = "pads_copy"
    return pad.name


def _pad_between_dq_and_conv(m: onnx.ModelProto) -> str:
    producers = {out: n for n in m.graph.node for out in n.output}
    conv = next(n for n in m.graph.node if n.op_type == "Conv"
                and producers.get(n.input[1]) is not None
                and producers[n.input[1]].op_type == "DequantizeLinear")
    m.graph.node.append(helper.make_node("Identity", [conv.input[0]], ["moved"], "between"))
    conv.input[0] = "moved"
    return conv.name


def _unequal_dq_scale(m: onnx.ModelProto) -> str:
    producers = {out: n for n in m.graph.node for out in n.output}
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear"
              and n.input[0] in producers and producers[n.input[0]].op_type == "QuantizeLinear")
    scale = numpy_helper.to_array(_init(m, dq.input[1]))
    _set_init(m, dq.input[1], (scale * 2).astype(scale.dtype))
    return dq.name


BREAKS: dict[str, tuple[Callable[[onnx.ModelProto], str], str]] = {
    "node between DQ and conv": (_pad_between_dq_and_conv,
                                 r"input comes from node 'between' \(Identity\), not a "
                                 "DequantizeLinear"),
    "Q and DQ scales differ": (_unequal_dq_scale, "expects a Q and its DQ to share one scale"),
    "uint8 zero point": (_zero_point_uint8, "zero point is UINT8"),
    "nonzero zero point": (_zero_point_three, "zero point 3 must be 0 for TensorRT"),
    "computed scale": (_computed_scale, "scale 'scale_sq' is computed by node 'square_scale'"),
    "missing Clip": (_missing_clip, r"narrower than int8 but its input comes from node"),
    "per-channel activation": (_per_channel_activation, "per-channel activation scale"),
    "weight axis 1": (_weight_axis, r"weight scale of shape \[\d+\] on axis 1"),
    "uint8 tensor": (_uint8_tensor, "output 'as_bytes' is uint8"),
    "computed pads": (_computed_pad, "pads 'pads_copy' is computed by node 'copy'"),
}


@pytest.mark.parametrize("case", list(BREAKS))
def test_checker_names_the_broken_node(engine: onnx.ModelProto, case: str) -> None:
    breaker, message = BREAKS[case]
    name = breaker(engine)
    with pytest.raises(EngineError, match=rf"^node '{name}' \(\w+\): .*{message}"):
        check_tensorrt_graph(engine, XAVIER_OPSET)


def test_checker_refuses_a_higher_opset(engine: onnx.ModelProto) -> None:
    with pytest.raises(EngineError, match="opset 17 is above the target's max_opset 16"):
        check_tensorrt_graph(engine, 16)


def test_checker_refuses_fp32_in_an_fp16_graph(fp_model: onnx.ModelProto,
                                               records: dict[str, dict[str, Any]]) -> None:
    model = lower_engine(fp_model, engine_layers(records["adabm_w8a4"], 0), dialect="tensorrt",
                         float_type="fp16")
    model.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "stray"))
    with pytest.raises(EngineError, match="initializer 'stray' is FP32 in an FP16 graph"):
        check_tensorrt_graph(model, ORIN_OPSET)


def test_ort_dialect_graph_fails_the_checker(fp_model: onnx.ModelProto,
                                             records: dict[str, dict[str, Any]]) -> None:
    model = lower_engine(fp_model, engine_layers(records["adabm_w8a4"], 0))
    with pytest.raises(EngineError, match=r"node '[\w.]+_op' \(QuantizeLinear\): zero point is "
                                          "UINT8"):
        check_tensorrt_graph(model, XAVIER_OPSET)


# -- the real checkpoint -----------------------------------------------------------------------


REAL_CROP = 32  # LR pixels, centre crops of the five Set5 images
REAL_RECORDS = {"w4a4": QuantSettings(method="adabm", wbits=4, abits=4, fq=True),
                "w8a6": QuantSettings(method="adabm", wbits=8, abits=6, fq=True)}
REAL_CALIBRATION = CalibrationConfig(patches=8, patch_size=16, steps=2, batch=2, epochs=1,
                                     validation=4, downscale=2)


def _with_output_requantization(qnet: nn.Module, record: dict[str, Any],
                                summary: list[dict[str, Any]]) -> nn.Module:
    """The simulation plus the engine's symmetric 8-bit output Q/DQ (``8-bit output range``)."""
    ranges = {layer["name"]: layer["output_range"] for layer in record["layers"]}
    convs = dict(qnet.qconvs())  # type: ignore[operator]
    for entry in summary:
        if entry["output"].startswith("8-bit output range"):
            alpha = torch.tensor(max(abs(v) for v in ranges[entry["name"]]))
            convs[entry["name"]].register_forward_hook(
                lambda _m, _i, out, a=alpha: quantize_symmetric(out, a, torch.tensor(8.0)))
    return qnet


def _hr_psnr(sr: np.ndarray, hrs: list[np.ndarray]) -> float:
    return float(np.mean([psnr_y(to_uint8(s.transpose(1, 2, 0)), hr, 2)
                          for s, hr in zip(sr, hrs, strict=True)]))


def test_real_checkpoint_parity(shared_file: Callable[[str], Path]) -> None:
    """EDSR x2 (8 blocks), AdaBM W4A4 and W8A6 FQ records, on five Set5 LR crops.

    Exact engines (``requantize=False``, FP32, opset 17): >= 50 dB against the simulation and
    within 0.02 dB of it against HR, at every image offset. The default engine (outputs
    requantized) against the simulation with the same symmetric 8-bit output quantizers: FP32
    >= 55 dB; FP16 (FP16 rounding moves grid levels) >= 45 dB at W4A4, >= 50 dB at W8A6 (measured
    48.8 and 54.0), within 0.1 dB against HR (measured 0.02).
    """
    weights = shared_file("weights/edsr_r8f64_x2_krasserm.pt")
    lrs, hrs = [], []
    for image in load_benchmark(shared_file("benchmarks/Set5"), 2):
        y, x = ((s - REAL_CROP) // 2 for s in image.lr.shape[:2])
        lrs.append(image.lr[y:y + REAL_CROP, x:x + REAL_CROP])
        hrs.append(image.hr[2 * y:2 * (y + REAL_CROP), 2 * x:2 * (x + REAL_CROP)])
    batch = np.stack(lrs).astype(np.float32).transpose(0, 3, 1, 2) / 255
    fp = export_onnx(load_model(weights).model, REAL_CROP, batch=len(lrs))
    for name, settings in REAL_RECORDS.items():
        record = calibrate(load_model(weights), settings, REAL_CALIBRATION,
                           shared_file("calibration/sun_hays8")).record
        qnet = apply_record(load_model(weights), record).eval()
        for d_img in (-1, 0, 1):
            qnet.forced_d_img = d_img
            with torch.no_grad():
                expected = qnet(torch.from_numpy(batch)).numpy()
            exact = lower_engine(fp, engine_layers(record, d_img), dialect="tensorrt",
                                 requantize=False, max_opset=XAVIER_OPSET)
            got = _run(exact, batch)
            assert _psnr(got, expected) >= MIN_PSNR, f"{name} d_img={d_img}"
            gap = _hr_psnr(got, hrs) - _hr_psnr(expected, hrs)
            assert abs(gap) <= 0.02, f"{name} d_img={d_img}: {gap:+.4f} dB"
        layers = engine_layers(record, 0)
        fp32 = lower_engine(fp, layers, dialect="tensorrt")
        fp16 = lower_engine(fp, layers, dialect="tensorrt", float_type="fp16")
        # head.0 folds the 2/255 input scale: its int8 weight scale (1e-5) is FP16-subnormal
        assert [s["name"] for s in lowering_summary(fp16) if s["fp16_weights"]] == ["head.0"]
        requantized = _with_output_requantization(_simulation(weights, record, 0), record,
                                                  lowering_summary(fp32))
        with torch.no_grad():
            expected = requantized(torch.from_numpy(batch)).numpy()
        assert _psnr(_run(fp32, batch), expected) >= MIN_PSNR + 5, name
        half = _run(fp16, batch)
        assert _psnr(half, expected) >= (45.0 if name == "w4a4" else MIN_PSNR), name
        assert abs(_hr_psnr(half, hrs) - _hr_psnr(expected, hrs)) <= 0.1, name
