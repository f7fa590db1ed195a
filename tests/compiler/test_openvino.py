"""OpenVINO, the second CPU backend: the same ORT-dialect bundles on INT8 kernels, a BF16 rung
where the CPU has BF16, settings as ONNX Runtime's, and parity with the simulation.

The tiny IMDN x2 of tests/compiler/test_parity.py is built for cpu-x86 with ``--backend
openvino``. OpenVINO requantizes in FP32 with its own operation order (``FakeQuantize``: a
reciprocal scale and a float shift; the epilogue ``* scale + bias`` fused), and its
low-precision Add rescales one branch onto the other's grid, so an output next to a rounding tie
can land on the neighbouring level and the flip propagates (not bit exact, unlike ONNX Runtime's
QLinearConv; see the README): its INT8 engines measure 55.5 dB and more against the simulation
here and are held to >= 52 dB; the BF16 engine (image path in FP32) to >= 58 dB (60.2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from compiler.bundle import write_bundle
from compiler.lower.export import conv_nodes
from compiler.lower.qdq import lowering_summary
from compiler.parity import simulate_engine
from compiler.plan import plan_engines
from compiler.quant.patches import list_images, sample_patches
from compiler.quant.qmodel import QuantSettings
from compiler.simulate import TorchUpscaler
from compiler.zoo import load_model
from runtime.backends import runtime_backend
from runtime.bundle import open_bundle
from runtime.dispatch import Dispatcher
from runtime.engines.openvino import OpenVinoEngine, compile_config
from runtime.errors import BundleError, ConfigError
from runtime.imaging import load_rgb, to_uint8
from runtime.metrics import psnr
from runtime.policies import engine_order, parse_policy, policy_engines
from targets.loader import load_target
from tests.compiler.test_parity import _images, tiny_imdn
from tests.conftest import require_module

require_module("openvino")  # in the test extra: CI fails without it
pytestmark = pytest.mark.usefixtures("one_torch_thread")
BF16_HERE = "bf16" in runtime_backend("openvino").probe().precisions


@pytest.fixture(scope="module")
def ov_bundle(tiny: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[Path, dict[str, Any], Path]:
    """Weights, record and the cpu-x86 OpenVINO bundle (hardware ladder) of a tiny IMDN."""
    _, calib = tiny
    root = tmp_path_factory.mktemp("imdn_ov")
    weights, record = tiny_imdn(root, calib)
    target = load_target("cpu-x86").with_backend("openvino")
    plan = plan_engines(record, target, "hardware", tile=16, overlap=4)
    write_bundle(load_model(weights), record, plan, root / "bundle",
                 patches=sample_patches(calib, 4, 16, seed=0).numpy(),
                 ladder_images=[load_rgb(p) for p in list_images(calib)][:2])
    return weights, record, root / "bundle"


def test_the_rung_ladder_runs_openvinos_engines_bf16_included(
        ov_bundle: tuple[Path, dict[str, Any], Path]) -> None:
    """The build measures the ladder with OpenVINO's engines: the BF16 rung (where this CPU has
    it) sits between INT8 and FP32 in predicted loss, and the quality policy can choose it."""
    bundle = open_bundle(ov_bundle[2])
    ladder = bundle.manifest.rungs
    expected = {"bicubic", "int8-all", "int8", "fp32"} | ({"bf16"} if BF16_HERE else set())
    assert set(ladder.names) == expected and ladder.names[-1] == "fp32"
    assert all(rung.cost_ms > 0 for rung in ladder.rungs)
    if BF16_HERE:
        features = np.ones((1, len(ladder.rung("bf16").loss.coefficients)))
        bf16, int8 = (ladder.rung(n).loss.predict(features)[0] for n in ("bf16", "int8"))
        assert 0 <= bf16 < int8
    frame = np.random.default_rng(0).integers(0, 256, (40, 40, 3)).astype(np.uint8)
    engines = bundle.engines(threads=1)
    with Dispatcher(bundle.manifest, engines, policy="quality:0") as dispatcher:
        assert set(dispatcher.upscale(frame).engines) == {"fp32"}  # 0 dB: the top rung only


def test_the_probe_reads_openvinos_capability_list() -> None:
    import openvino

    found = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    probe = runtime_backend("openvino").probe()
    assert probe.version == openvino.__version__.split("-")[0] or probe.version
    assert probe.precisions == tuple(p for p, cap in (("int8", "INT8"), ("bf16", "BF16"),
                                                      ("fp32", "FP32")) if cap in found)


def test_the_manifest_records_the_backend_and_the_probe(
        ov_bundle: tuple[Path, dict[str, Any], Path]) -> None:
    manifest = open_bundle(ov_bundle[2]).manifest
    assert manifest.backend == "openvino"
    assert manifest.build.capabilities == runtime_backend("openvino").probe().precisions
    assert manifest.build.backend_version == runtime_backend("openvino").version()
    names = engine_order(manifest)
    assert names[-1] == "fp32" and ("bf16" in names) == BF16_HERE
    if BF16_HERE:  # the middle rung: after every INT8 engine, before the reference
        bf16 = manifest.engine("bf16")
        assert (bf16.offsets, bf16.reference, bf16.fab) == ((), False, 16.0)
        assert {layer.precision for layer in bf16.layers} == {"bf16"}
        assert names.index("bf16") == len(names) - 2
        assert policy_engines(parse_policy("fixed:bf16"), manifest) == ("bf16",)
        assert "bf16" in policy_engines(parse_policy("budget:5"), manifest)


def test_quantized_convs_run_on_int8_kernels(
        ov_bundle: tuple[Path, dict[str, Any], Path]) -> None:
    """The convs the plan puts on INT8 run 8-bit kernels in the compiled model (OpenVINO's
    runtimePrecision u8), the float layers FP32 -- except IMDN's c4 convs (their output joins
    the distillation Concat unquantized): OpenVINO's low-precision transformations keep those
    FP32, so its IMDN engines run 10 of 12 INT8 convs on INT8 (EDSR: all, see the README)."""
    bundle = open_bundle(ov_bundle[2])
    spec = next(s for s in bundle.manifest.engines if s.precision in ("int8", "mixed"))
    graph = onnx.load(ov_bundle[2] / spec.onnx.path).graph
    nodes = conv_nodes(graph, [layer.name for layer in spec.layers])
    with bundle.engine(spec.name, threads=1) as engine:
        assert isinstance(engine, OpenVinoEngine)
        found = engine.runtime_precisions()
    ran = {layer.name: next(found[key] for key in (nodes[layer.name].name,
                                                    f"{nodes[layer.name].name}/WithoutBiases")
                            if key in found) for layer in spec.layers}
    expected = {layer.name: "Convolution:u8" if layer.precision == "int8"
                and not layer.name.endswith(".c4") else "Convolution:f32"
                for layer in spec.layers}
    assert ran == expected
    assert sum(layer.precision == "int8" for layer in spec.layers) == 12


def test_engines_match_the_simulation(ov_bundle: tuple[Path, dict[str, Any], Path]) -> None:
    """INT8 engines >= 52 dB against their simulation (not exact: see the module docstring),
    the FP32 reference the FP network to the float rounding, BF16 (its image path in FP32)
    >= 58 dB."""
    weights, record, root = ov_bundle
    bundle = open_bundle(root)
    floor = {"int8": 52.0, "mixed": 52.0, "fp32": 80.0, "bf16": 58.0}
    for spec in bundle.manifest.engines:
        summary = None if not any(layer.act_bits for layer in spec.layers) else \
            lowering_summary(onnx.load(root / spec.onnx.path))
        sim = TorchUpscaler(simulate_engine(weights, record, spec, summary=summary), 2)
        with bundle.engine(spec.name, threads=1) as engine:
            for image in _images():
                x = (image.transpose(2, 0, 1)[None] / 255).astype(np.float32)
                out = to_uint8(engine.infer(x)[0].transpose(1, 2, 0))
                db = psnr(out, to_uint8(sim(image)), 255.0)
                assert db >= floor[spec.precision], f"{spec.name} {image.shape}: {db:.2f} dB"


def test_settings_are_the_onnxruntime_engines() -> None:
    assert compile_config(2, "int8") == {
        "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "f32",
        "ENABLE_CPU_PINNING": False, "INFERENCE_NUM_THREADS": 2}
    assert compile_config(0, "bf16")["INFERENCE_PRECISION_HINT"] == "bf16"
    assert "INFERENCE_NUM_THREADS" not in compile_config(0, "fp32")
    with pytest.raises(ConfigError, match="threads"):
        compile_config(-1, "fp32")


def test_compiled_engines_use_the_threads_and_precision_asked(
        ov_bundle: tuple[Path, dict[str, Any], Path]) -> None:
    bundle = open_bundle(ov_bundle[2])
    with bundle.engine("fp32", threads=1) as engine:
        assert isinstance(engine, OpenVinoEngine)
        compiled = engine._compiled
        assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == 1
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")
        assert str(getattr(hint, "get_type_name", lambda: hint)()) == "f32"
        assert compiled.get_property("ENABLE_CPU_PINNING") is False
        assert {v.split(":")[1] for v in engine.runtime_precisions().values()
                if v.startswith("Convolution:")} == {"f32"}


def test_other_backends_open_the_same_engines_when_they_can(
        ov_bundle: tuple[Path, dict[str, Any], Path]) -> None:
    """ONNX Runtime runs the OpenVINO bundle's ORT-dialect graphs (adasr profile --backends),
    never its BF16 rung; TensorRT runs only its own plans."""
    bundle = open_bundle(ov_bundle[2])
    x = (_images()[0].transpose(2, 0, 1)[None] / 255).astype(np.float32)
    with bundle.engine("fp32", backend="onnxruntime") as ort, bundle.engine("fp32") as ov:
        assert psnr(to_uint8(ort.infer(x)[0]), to_uint8(ov.infer(x)[0]), 255.0) > 80
    if BF16_HERE:
        with pytest.raises(BundleError, match="runs bf16 kernels, which ONNX Runtime has not"):
            bundle.engine("bf16", backend="onnxruntime")
    with pytest.raises(BundleError, match="TensorRT runs plans built for it"):
        bundle.engine("fp32", backend="tensorrt")


def test_the_onnxruntime_build_of_the_same_target_has_no_bf16_rung(
        ov_bundle: tuple[Path, dict[str, Any], Path]) -> None:
    _, record, _ = ov_bundle
    target = load_target("cpu-x86")
    assert "bf16" in target.device_ladder and "bf16" not in target.precision_ladder
    plan = plan_engines(record, target, "hardware", tile=16, overlap=4)
    assert "bf16" not in {e.name for e in plan.engines}
    with pytest.raises(ConfigError, match="unknown backend of target 'cpu-x86' 'tensorrt'"):
        target.with_backend("tensorrt")


def _residual_graph(outputs: tuple[str, ...]) -> bytes:
    """``Q/DQ -> Conv(DQ(w_int8)) -> Q/DQ`` plus a Q/DQ skip, added, then Q/DQ: the residual
    add of an EDSR block on 8-bit grids (the steps and zero points of a real bundle)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    consts = {"sx": (0.01, np.float32), "zx": (0, np.uint8), "sa": (0.00341293, np.float32),
              "za": (133, np.uint8), "sb": (0.00469036, np.float32), "zb": (136, np.uint8),
              "so": (0.00391475, np.float32), "zo": (132, np.uint8), "ws": (0.002, np.float32),
              "wz": (0, np.int8),
              "wi": (np.clip(np.round(rng.standard_normal((8, 8, 3, 3)) * 25), -127, 127),
                     np.int8)}
    inits = [numpy_helper.from_array(np.array(v, dtype=t), k) for k, (v, t) in consts.items()]

    def qdq(x: str, s: str, z: str, out: str) -> list[onnx.NodeProto]:
        return [helper.make_node("QuantizeLinear", [x, s, z], [f"{out}_q"]),
                helper.make_node("DequantizeLinear", [f"{out}_q", s, z], [out])]

    nodes = [*qdq("x", "sx", "zx", "xd"),
             helper.make_node("DequantizeLinear", ["wi", "ws", "wz"], ["w"]),
             helper.make_node("Conv", ["xd", "w"], ["y"], pads=[1, 1, 1, 1]),
             *qdq("y", "sa", "za", "a"), *qdq("r", "sb", "zb", "b"),
             helper.make_node("Add", ["a", "b"], ["s"]), *qdq("s", "so", "zo", "o")]
    shape = [1, 8, 32, 32]
    graph = helper.make_graph(
        nodes, "residual", [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
                            for n in ("x", "r")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def test_openvinos_fused_conv_and_residual_add_drops_a_rounding_and_the_engine_unfuses_it(
        ) -> None:
    """Why OpenVINO's INT8 engines were further from the simulation (pinned on OpenVINO
    2026.4): its CPU plugin fuses a requantized conv output and the residual add into the conv
    (an in-place ``sum`` post-op between two FakeQuantize post-ops) and adds the conv's
    unrounded value: 18% of this add's outputs are a level off the graph's ONNX meaning
    ``Q(DQ(Q(y)) + DQ(Q(r)))``, which ONNX Runtime (and the simulation) computes, and all but
    2% equal ``Q(y + DQ(Q(r)))``. ``unfuse_quantized_adds`` (the engine applies it) gives the
    add's inputs a second reader, the plugin no longer fuses, and the outputs match exactly
    with the conv still on an INT8 kernel."""
    import onnxruntime as ort

    from runtime.engines.openvino import _core
    from runtime.engines.openvino_exact import unfuse_quantized_adds

    rng = np.random.default_rng(1)
    feed = {"x": rng.random((1, 8, 32, 32)).astype(np.float32),
            "r": (rng.standard_normal((1, 8, 32, 32)) * 0.3).astype(np.float32)}
    data = _residual_graph(("o", "y", "b"))
    o, y, b = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feed)
    unrounded = (np.clip(np.round((y + b) / np.float32(0.00391475)) + 132, 0, 255) - 132) \
        * np.float32(0.00391475)
    fused_model = _core().read_model(_residual_graph(("o",)), b"")
    fixed_model = _core().read_model(_residual_graph(("o",)), b"")
    assert unfuse_quantized_adds(fixed_model) == 1 and len(fixed_model.outputs) == 3
    results = {}
    for key, model in (("fused", fused_model), ("fixed", fixed_model)):
        compiled = _core().compile_model(model, "CPU", compile_config(1, "int8"))
        results[key] = compiled(feed)[0]
        kernels = {op.get_rt_info()["runtimePrecision"].astype(str)
                   for op in compiled.get_runtime_model().get_ordered_ops()
                   if op.get_rt_info()["layerType"].astype(str) == "Convolution"}
        assert kernels == {"u8"}
    assert 0.10 < float(np.mean(results["fused"] != o)) < 0.30
    assert float(np.mean(results["fused"] != unrounded)) < 0.05
    assert float(np.mean(results["fixed"] != o)) == 0.0


def test_a_residual_int8_engine_matches_onnxruntime_bit_for_bit(
        tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """The tiny EDSR (2 residual blocks) all-INT8 engine on OpenVINO: identical to ONNX
    Runtime's on the same graph, with the residual adds kept out of the convs and the
    QLinearConv biases on the int32 lattice (54.4 dB, 24% of the values off, with the adds
    fused); so as close to the simulation as ONNX Runtime is (a level on a few pixels: the
    image-grid output's folded constant, compiler.lower.ort)."""
    from tests.conftest import calibrate_tiny

    weights, calib = tiny
    record = calibrate_tiny(tiny, {"w8a6": QuantSettings(method="adabm", wbits=8, abits=6,
                                                         fq=True)})["w8a6"]
    target = load_target("cpu-x86").with_backend("openvino")
    plan = plan_engines(record, target, "hardware", tile=16, overlap=4, floats="none")
    write_bundle(load_model(weights), record, plan, tmp_path / "bundle",
                 patches=sample_patches(calib, 4, 16, seed=0).numpy())
    bundle = open_bundle(tmp_path / "bundle")
    spec = bundle.manifest.engine("int8")
    assert {layer.precision for layer in spec.layers} == {"int8"}
    summary = lowering_summary(onnx.load(tmp_path / "bundle" / spec.onnx.path))
    sim = TorchUpscaler(simulate_engine(weights, record, spec, summary=summary), 2)
    with (bundle.engine("int8", threads=1) as engine,
          bundle.engine("int8", threads=1, backend="onnxruntime") as ort):
        for image in _images():
            x = (image.transpose(2, 0, 1)[None] / 255).astype(np.float32)
            out, ref = (to_uint8(e.infer(x)[0].transpose(1, 2, 0)) for e in (engine, ort))
            simulated = to_uint8(sim(image))
            assert int(np.sum(out != ref)) == 0
            assert int(np.sum(out != simulated)) == int(np.sum(ref != simulated)) <= 20
