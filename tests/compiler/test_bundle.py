"""Engine plan, bundle writer, ``adasr build`` / ``inspect`` / ``eval --bundle``: numbers checked.

Every engine of a built bundle is run through ONNX Runtime and compared with the simulated
network of the same per-layer bits (``compiler.parity.simulate_engine``): >= 50 dB. The real
EDSR x2 / IMDN x4 figures are ``benchmarks/bundle_parity.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from compiler.bundle import write_bundle
from compiler.cli import main
from compiler.lower.qdq import lowering_summary, model_opset
from compiler.parity import simulate_engine
from compiler.plan import describe_plan, kernel_precision, plan_engines
from compiler.quant.calibrate import CalibrationConfig, calibrate
from compiler.quant.patches import sample_patches
from compiler.quant.qmodel import QuantSettings
from compiler.quant.record import save_record
from compiler.simulate import TorchUpscaler
from compiler.zoo import load_model
from runtime.bundle import open_bundle
from runtime.errors import BundleError, ConfigError, EngineError
from runtime.imaging import save_rgb
from runtime.manifest import read_manifest
from targets.loader import DeviceFacts, load_target
from tests.conftest import calibrate_tiny

FAST = CalibrationConfig(patches=8, patch_size=16, steps=20, batch=2, epochs=4, validation=4)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def records(tiny: tuple[Path, Path]) -> dict[str, dict[str, Any]]:
    return calibrate_tiny(tiny, {
        "w8a6_fq": QuantSettings(method="adabm", wbits=8, abits=6, fq=True),
        "w8a8": QuantSettings(method="adabm", wbits=8, abits=8)}, FAST)


@pytest.fixture(scope="module")
def bundles(tiny: tuple[Path, Path], records: dict[str, dict[str, Any]],
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    weights, calib = tiny
    patches = sample_patches(calib, 4, 16, seed=0).numpy()
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for record_name, record in records.items():
        for ladder in ("hardware", "emulate"):
            plan = plan_engines(record, load_target("cpu-x86"), ladder, tile=16, overlap=4)
            path = root / f"{record_name}-{ladder}"
            write_bundle(load_model(weights), record, plan, path, patches=patches)
            out[f"{record_name}-{ladder}"] = path
    return out


def test_kernel_precision_ladder() -> None:
    assert kernel_precision(4, ("int8", "fp32"), "fp32") == "int8"
    assert kernel_precision(9, ("int8", "fp32"), "fp32") == "fp32"
    assert kernel_precision(4, ("fp8", "int8", "fp16"), "fp16") == "fp8"
    assert kernel_precision(6, ("fp8", "int8", "fp16"), "fp16") == "int8"
    assert kernel_precision(2, ("fp4", "fp8", "int8", "fp16"), "fp16") == "fp4"


def test_emulate_plan_has_one_engine_per_offset_plus_reference(
        records: dict[str, dict[str, Any]]) -> None:
    record = records["w8a6_fq"]
    plan = plan_engines(record, load_target("cpu-x86"), "emulate")
    assert [e.name for e in plan.engines] == ["int8-low", "int8-mid", "int8-high", "fp32"]
    for engine in plan.engines[:3]:
        (offset,) = engine.offsets
        adaptive = [lp.act_bits for lp, layer in zip(engine.layers, record["layers"],
                                                      strict=True) if layer["kind"] == "adaptive"]
        assert adaptive == [int(b) for b in record["bit_vectors"][str(offset)]]
        assert engine.fab == pytest.approx(np.mean(record["bit_vectors"][str(offset)]))
    assert plan.engines[-1].reference and plan.engines[-1].fab == 32


def _trunk_ends(record: dict[str, Any]) -> set[str]:
    return {layer["name"] for layer in record["layers"] if layer["trunk_end"]}


def test_hardware_plan_merges_identical_engines(records: dict[str, dict[str, Any]]) -> None:
    record = records["w8a6_fq"]
    plan = plan_engines(record, load_target("cpu-x86"), "hardware")
    assert [(e.name, e.offsets) for e in plan.engines] == [("int8", (-1, 0, 1)),
                                                          ("int8-all", ()), ("fp32", ())]
    # the ladder's all-INT8 rung: the same grids with the trunk's ends on INT8 too
    every = plan.engines[1]
    assert {lp.precision for lp in every.layers} == {"int8"}
    assert every.fab == plan.engines[0].fab and not every.reference
    assert all((lp.act_bits, lp.w_bits) == ((None, None) if lp.name == "head.0" else (8, 8))
               for lp in plan.engines[0].layers)


@pytest.mark.parametrize(("target", "names"), [("cpu-x86", ["int8", "int8-all", "fp32"]),
                                               ("jetson-orin-nano", ["int8", "fp16"])])
def test_hardware_plans_run_the_trunk_ends_at_top_precision(
        records: dict[str, dict[str, Any]], target: str, names: list[str]) -> None:
    top = names[-1]
    record = records["w8a6_fq"]
    ends = _trunk_ends(record)
    assert ends == {"head.0", "body.2"}  # the image conv and the conv closing the residual
    assert {layer["name"] for layer in record["layers"] if layer["in_channels"] == 3} < ends
    plan = plan_engines(record, load_target(target), "hardware")
    assert [e.name for e in plan.engines] == names  # the tag ignores the float layers
    assert plan.float_layers == ("head.0", "body.2")
    # ONNX Runtime keeps the closing conv's 8-bit input and weights (an exact FP32 conv on the
    # integer levels, float output) and runs the image conv on the integer pixels; TensorRT
    # leaves both to its FP16 convs
    cpu = target == "cpu-x86"
    closing = (top, 8, 8) if cpu else (top, None, None)
    for lp in plan.engines[0].layers:
        expected = ((top, None, None) if lp.name == "head.0" else closing if lp.name == "body.2"
                    else ("int8", 8, 8))
        assert (lp.precision, lp.act_bits, lp.w_bits) == expected
    specs = {s.name: s for s in plan.engines[0].specs}
    if cpu:
        assert specs["head.0"].exact_image and specs["body.2"].float_output
    else:
        assert not ends & set(specs)  # left as the FP convs
    text = describe_plan(plan)
    assert f"kept at {top}: head.0, body.2" in text
    row = next(line for line in text.splitlines() if line.startswith("head.0 "))
    cells = row.split()  # the engines in plan order (int8-all runs head.0 on INT8)
    assert [cells[0], cells[1], cells[-1]] == ["head.0", top, top]
    emulate = plan_engines(record, load_target(target), "emulate")
    assert {lp.precision for lp in emulate.engines[0].layers} == {"int8"}  # exact grids
    assert emulate.float_layers == ()


def test_float_layers_choice(records: dict[str, dict[str, Any]]) -> None:
    record, cpu = records["w8a6_fq"], load_target("cpu-x86")
    every = plan_engines(record, cpu, "hardware", floats="none").engines[0]
    assert {lp.precision for lp in every.layers} == {"int8"} and every.name == "int8"
    named = plan_engines(record, cpu, "hardware", floats=["tail.1"])
    assert [lp.name for lp in named.engines[0].layers if lp.precision == "fp32"] == ["tail.1"]
    listed = plan_engines(record, cpu, "hardware", floats="tail.1, head.0")  # as the CLI gives
    assert listed.float_layers == ("head.0", "tail.1")
    with pytest.raises(ConfigError, match="unknown quantized layer 'tail.9'"):
        plan_engines(record, cpu, "hardware", floats=["tail.9"])
    with pytest.raises(ConfigError, match="hardware ladder"):
        plan_engines(record, cpu, "emulate", floats=["tail.1"])
    # records from before ``trunk_end``: the image conv only
    old = {**record, "layers": [{k: v for k, v in layer.items() if k != "trunk_end"}
                                for layer in record["layers"]]}
    assert plan_engines(old, cpu, "hardware").float_layers == ("head.0",)


def test_unlowered_rungs_are_skipped_and_said(tiny: tuple[Path, Path]) -> None:
    weights, calib = tiny
    record = calibrate(load_model(weights), QuantSettings(method="adabm", wbits=4, abits=4),
                       FAST, calib).record
    plan = plan_engines(record, load_target("h100"), "hardware")
    precisions = {lp.precision for e in plan.engines for lp in e.layers}
    assert "fp8" not in precisions and "int8" in precisions
    assert "fp8 listed by the target but not lowered yet" in describe_plan(plan)
    assert "not lowered" not in describe_plan(plan_engines(record, load_target("cpu-x86")))


def test_hardware_plan_runs_bits_above_8_in_float(records: dict[str, dict[str, Any]]) -> None:
    record = records["w8a8"]  # base 8: offset +1 gives 9 bits on some layers
    plan = plan_engines(record, load_target("cpu-x86"), "hardware")
    high = next(e for e in plan.engines if 1 in e.offsets)
    nine = [lp for lp, b in zip(high.layers, record["bit_vectors"]["1"], strict=False) if b > 8]
    assert nine and all(lp.precision == "fp32" and lp.act_bits is None for lp in nine)
    assert high.precision == "mixed"
    gpu = plan_engines(record, load_target("jetson-orin-nano"), "hardware")
    assert {lp.precision for e in gpu.engines for lp in e.layers} <= {"int8", "fp16"}


def test_plan_text_lists_engines_and_layers(records: dict[str, dict[str, Any]]) -> None:
    plan = plan_engines(records["w8a6_fq"], load_target("jetson-orin-nano"), "hardware")
    text = describe_plan(plan)
    assert "jetson-orin-nano" in text and "fp16" in text and "int8 a8w8" in text
    with pytest.raises(ConfigError, match="ladder"):
        plan_engines(records["w8a6_fq"], load_target("cpu-x86"), "fastest")


def test_bundle_manifest_and_checksums(bundles: dict[str, Path]) -> None:
    root = bundles["w8a6_fq-emulate"]
    manifest = read_manifest(root)
    assert manifest.build.opset == 17
    assert manifest.names == ("int8-low", "int8-mid", "int8-high", "fp32")
    assert manifest.tile == 16 and manifest.overlap == 4 and manifest.ladder == "emulate"
    assert {d for e in manifest.engines for d in e.offsets} == {-1, 0, 1}
    bundle = open_bundle(root)
    assert bundle.manifest == manifest
    assert not list(root.parent.glob(f".{root.name}.*")), "staging folders left behind"


def test_tampered_engine_is_refused(bundles: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(bundles["w8a6_fq-hardware"], root)
    engine = root / "engines" / "int8.onnx"
    data = bytearray(engine.read_bytes())
    data[-1] ^= 1
    engine.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="fails its checksum"):
        open_bundle(root)
    with pytest.raises(BundleError, match="machine"):
        open_bundle(bundles["w8a6_fq-hardware"], machine="aarch64")


@pytest.mark.parametrize("name", ["w8a6_fq-emulate", "w8a6_fq-hardware", "w8a8-hardware"])
def test_every_engine_matches_its_simulation(tiny: tuple[Path, Path], bundles: dict[str, Path],
                                             records: dict[str, dict[str, Any]],
                                             name: str) -> None:
    weights, calib = tiny
    root = bundles[name]
    bundle = open_bundle(root)
    record = records[name.split("-")[0]]
    patches = sample_patches(calib, 2, 24, seed=3).numpy().transpose(0, 2, 3, 1)
    lr = (patches * 255).round().astype(np.uint8)  # N x H x W x 3
    for spec in bundle.manifest.engines:
        summary = None if spec.reference else lowering_summary(onnx.load(root / spec.onnx.path))
        sim = TorchUpscaler(simulate_engine(weights, record, spec, summary=summary), 2)
        with bundle.engine(spec.name, threads=1) as engine:
            for image in lr:
                x = image.transpose(2, 0, 1)[None].astype(np.float32) / 255
                out = engine.infer(x)[0].transpose(1, 2, 0)
                ref = sim(image)
                mse = np.mean((np.clip(out, 0, 1) - np.clip(ref, 0, 1)) ** 2)
                psnr = 10 * np.log10(1 / max(mse, 1e-12))
                assert psnr >= 50, f"{name} {spec.name}: {psnr:.1f} dB vs simulation"


def test_build_dry_run_writes_nothing(tiny: tuple[Path, Path], records: dict[str, dict[str, Any]],
                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights, calib = tiny
    record = tmp_path / "record.json"
    save_record(record, records["w8a6_fq"])
    out = tmp_path / "bundle"
    code = main(["build", "--weights", str(weights), "--calibration", str(record), "--target",
                 "jetson-orin-nano", "--dry-run", "-o", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and not out.exists()
    assert "engines/int8.onnx" in text and "fp16" in text and "dry run" in text


def test_build_inspect_eval_cli(tiny: tuple[Path, Path], records: dict[str, dict[str, Any]],
                                tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights, calib = tiny
    record = tmp_path / "record.json"
    save_record(record, records["w8a6_fq"])
    out = tmp_path / "bundle"
    args = ["build", "--weights", str(weights), "--calibration", str(record), "--calib",
            str(calib), "--patch-size", "16", "--target", "cpu-x86", "--tile", "16", "--overlap",
            "4", "-o", str(out)]
    assert main(args) == 0
    assert main(["inspect", str(out), "--layers"]) == 0
    text = capsys.readouterr().out
    assert "sha256 ok" in text and "int8" in text
    dataset = tmp_path / "set"
    rng = np.random.default_rng(1)
    save_rgb(dataset / "HR" / "a.png", (rng.random((40, 36, 3)) * 255).astype(np.uint8))
    result = tmp_path / "eval.json"
    assert main(["eval", "--bundle", str(out), "--dataset", str(dataset), "--scale", "2",
                 "--json", str(result), "--quiet"]) == 0
    adaptive = json.loads(result.read_text())
    assert main(["eval", "--bundle", str(out), "--engine", "fp32", "--dataset", str(dataset),
                 "--scale", "2", "--json", str(result), "--quiet", "--force"]) == 0
    reference = json.loads(result.read_text())
    assert adaptive["engines"]["int8"] > 0
    assert reference["engines"] == {"int8": 0, "int8-all": 0, "fp32": 4}
    assert reference["fab"] == 32 and adaptive["fab"] == 8
    assert abs(adaptive["psnr"] - reference["psnr"]) < 1.0
    # a record made for another checkpoint is refused before anything is written
    other = json.loads(record.read_text())
    other["checkpoint"]["sha256"] = "0" * 64
    record.write_text(json.dumps(other))
    assert main([*args[:-1], str(tmp_path / "other")]) == 2
    assert "calibrated for checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_failed_build_keeps_the_old_bundle(tiny: tuple[Path, Path],
                                           records: dict[str, dict[str, Any]], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    weights, _ = tiny
    record = records["w8a6_fq"]
    plan = plan_engines(record, load_target("cpu-x86"), "emulate", tile=16, overlap=4)
    out = tmp_path / "bundle"
    write_bundle(load_model(weights), record, plan, out)
    before = (out / "manifest.json").read_bytes()
    import compiler.bundle as bundle_module

    def broken(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle_module, "write_manifest", broken)
    with pytest.raises(KeyboardInterrupt):
        write_bundle(load_model(weights), record, plan, out)
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["bundle"]


def test_tensorrt_target_writes_the_portable_half(tiny: tuple[Path, Path],
                                                  records: dict[str, dict[str, Any]],
                                                  tmp_path: Path) -> None:
    from compiler.lower.trt_check import check_tensorrt_graph

    weights, _ = tiny
    target = load_target("jetson-orin-nano")
    plan = plan_engines(records["w8a6_fq"], target, "hardware", tile=16, overlap=4)
    out = tmp_path / "orin"
    manifest = write_bundle(load_model(weights), records["w8a6_fq"], plan, out,
                            patches=sample_patches(tiny[1], 4, 16, seed=0).numpy())
    assert manifest.backend == "tensorrt" and manifest.names == ("int8", "fp16")
    assert [e.plan for e in manifest.engines] == [None, None]
    assert manifest.build.finish_command == "adasr build --finish orin"  # no build-machine path
    assert manifest.build.opset == 19  # FP16 Q/DQ scales: the graphs' opset, not the FP graph's
    assert "(tensorrt dialect)" in manifest.engines[0].note  # widening measured on its graphs
    for spec in manifest.engines:
        graph = onnx.load(out / spec.onnx.path)
        check_tensorrt_graph(graph, target.max_opset)
        assert model_opset(graph) == manifest.build.opset
        assert spec.input_shape == (8, 3, 16, 16)
    with pytest.raises(BundleError, match="adasr build --finish"):
        open_bundle(out)


@pytest.mark.parametrize(("facts", "version", "message"), [
    (DeviceFacts("x86_64", None, "NVIDIA GeForce RTX 4090"), "10.3.0.30",
     r"this device \(NVIDIA GeForce RTX 4090\) is not a jetson-orin-nano.*--target rtx-4090"),
    (DeviceFacts("aarch64", "NVIDIA Jetson AGX Orin Developer Kit", "Orin"), "10.3.0.30",
     r"is not a jetson-orin-nano.*--target jetson-agx-orin --calibration B/calibration.json"),
    (DeviceFacts("aarch64", "NVIDIA Jetson Orin Nano Developer Kit", "Orin"), "10.7.0.23",
     r"TensorRT 10\.7\.0\.23 is outside jetson-orin-nano's range 10\.3\.x.*--target "
     "jetson-orin-nano"),
])
def test_plans_are_built_only_on_the_targets_device_and_tensorrt(
        facts: DeviceFacts, version: str, message: str) -> None:
    from compiler.engines.tensorrt_build import check_build_device

    target = load_target("jetson-orin-nano")
    with pytest.raises(EngineError, match=message):
        check_build_device(target, facts, version, Path("B"))
    check_build_device(target, DeviceFacts("aarch64", "NVIDIA Jetson Orin Nano Developer Kit"),
                       "10.3.0.30", Path("B"))


def test_finish_refuses_another_device(tiny: tuple[Path, Path],
                                       records: dict[str, dict[str, Any]], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """An Orin Nano bundle finished on an RTX 4090 gets no plans, and the manifest stays."""
    import compiler.backends.tensorrt as trt_builder
    from compiler.engines.finish import finish_bundle

    weights, _ = tiny
    target = load_target("jetson-orin-nano")
    plan = plan_engines(records["w8a6_fq"], target, "hardware", tile=16, overlap=4)
    out = tmp_path / "orin"
    write_bundle(load_model(weights), records["w8a6_fq"], plan, out)
    before = (out / "manifest.json").read_bytes()
    monkeypatch.setattr(trt_builder, "device_facts", lambda: ("10.3.0.30", "RTX 4090"))
    monkeypatch.setattr(trt_builder, "probe_device",
                        lambda: DeviceFacts("x86_64", None, "NVIDIA GeForce RTX 4090"))
    with pytest.raises(EngineError, match="is not a jetson-orin-nano.*adasr build --weights"):
        finish_bundle(out, target)
    assert (out / "manifest.json").read_bytes() == before
    assert not list((out / "engines").glob("*.plan"))


def test_hardware_engine_is_int8_end_to_end(bundles: dict[str, Path]) -> None:
    """Widened 8-bit grids: residual streams shared (QLinearAdd), every conv but the trunk's ends
    a QLinearConv (the RGB tail too, on the output image's own grid), and the engine's 0..1
    output lies on the k/255 image grid exactly."""
    from compiler.lower.ort import ort_fused_layers
    from compiler.lower.qdq import IMAGE_PLACEMENT

    root = bundles["w8a6_fq-hardware"]
    spec = read_manifest(root).engine("int8")
    graph = onnx.load(root / spec.onnx.path)
    summary = {s["name"]: s for s in lowering_summary(graph)}
    assert summary["body.1.body.0"]["stream_bounds"] is not None
    # the exact image conv's bias Add is not a residual Add: its skip path stays float
    assert summary["body.0.body.0"]["stream_bounds"] is None
    assert summary["tail.1"]["output"].startswith("the output image")
    # the trunk's ends run in FP32, exactly: the image conv on the integer pixels, the conv
    # closing the global residual on its input's integer levels with a float output
    assert summary["head.0"]["output"] == IMAGE_PLACEMENT and summary["head.0"]["image_input"]
    assert summary["body.2"]["output"] == "float" and summary["body.2"]["integer_conv"]
    assert ort_fused_layers(graph) == set(summary) - {"head.0", "body.2"}
    with open_bundle(root).engine("int8", threads=1) as engine:
        x = np.random.default_rng(0).random((1, 3, 12, 12), dtype=np.float32)
        out = engine.infer(x) * 255
    assert np.abs(out - np.round(out)).max() < 1e-3
