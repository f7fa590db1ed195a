"""Every TensorRT-dialect graph ``adasr build`` writes, parsed and built by a real NVIDIA builder.

TensorRT for RTX (``tensorrt-rtx-cu13``, a test dependency) has TensorRT's ONNX parser and
Builder and builds engines without a GPU. For every TensorRT target (the hardware ladder, what
``adasr build`` writes by default; the emulate ladder too on the Orin Nano), tiny
EDSR x2 / IMDN x2 networks (AdaBM W8A6 FQ records), the bundle's graphs go through
the product's own build path (``compiler.engines.tensorrt_build.build_with``): parsed, each
quantized conv checked to read ``DQ -> Conv <- DQ`` with nothing between (TensorRT's Q/DQ
fusion rule: ``compiler.engines.tensorrt_network``), and built into an engine. The count of
graphs and each engine's layers are printed (``pytest -s``). The same run on the real
checkpoints: ``benchmarks/tensorrt_rtx_build.py``. (CARN-M is not here: its three uses of one
shared residual block are one module, which the lowering cannot address yet, in any dialect.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import pytest
import tensorrt_rtx

from compiler.bundle import BuildOptions, write_bundle
from compiler.engines.tensorrt_build import TrtBuildSpec, build_with
from compiler.engines.tensorrt_network import check_int8_convs, inspect_network
from compiler.lower.export import INPUT_NAME
from compiler.plan import plan_engines
from compiler.quant.calibrate import calibrate
from compiler.quant.qmodel import QuantSettings
from compiler.zoo import load_model
from runtime.errors import EngineError
from runtime.manifest import read_manifest
from targets.loader import list_targets
from tests.compiler.test_parity import FAST, tiny_imdn

TILE, BATCH = 16, 1
EMULATED = "jetson-orin-nano"  # the targets' graphs differ only in their opset
TENSORRT_TARGETS = [t.name for t in list_targets() if t.backend == "tensorrt"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _record(weights: Path, calib: Path) -> dict[str, Any]:
    settings = QuantSettings(method="adabm", wbits=8, abits=6, fq=True)
    return calibrate(load_model(weights), settings, FAST, calib).record


@pytest.fixture(scope="module")
def models(tiny: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
           ) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Weights and AdaBM W8A6 FQ records of a tiny EDSR and IMDN (x2)."""
    edsr, calib = tiny
    root = tmp_path_factory.mktemp("rtx_models")
    return {"edsr": (edsr, _record(edsr, calib)), "imdn": tiny_imdn(root, calib)}


def _graphs(bundle: Path) -> Iterator[tuple[str, Path, list[dict[str, Any]]]]:
    """(engine name, ONNX path, lowering summary) of every engine of a bundle."""
    from compiler.lower.qdq import lowering_summary

    for spec in read_manifest(bundle).engines:
        path = bundle / spec.onnx.path
        yield spec.name, path, lowering_summary(onnx.load(str(path)))


@pytest.mark.parametrize("target", TENSORRT_TARGETS)
def test_every_bundle_graph_parses_and_builds_with_int8_convs(
        models: dict[str, tuple[Path, dict[str, Any]]], tmp_path: Path, target: str) -> None:
    from targets.loader import load_target

    built, lines = 0, []
    for model, (weights, record) in models.items():
        for ladder in ("hardware", "emulate") if target == EMULATED else ("hardware",):
            plan = plan_engines(record, load_target(target), ladder, tile=TILE, overlap=4)
            bundle = tmp_path / f"{model}-{ladder}"
            write_bundle(load_model(weights), record, plan, bundle,
                         options=BuildOptions(batch=BATCH))
            for name, path, summary in _graphs(bundle):
                start = time.perf_counter()
                plan_bytes, report = build_with(
                    tensorrt_rtx, TrtBuildSpec(path, INPUT_NAME, (BATCH, 3, TILE, TILE)))
                seconds = time.perf_counter() - start
                fed = {entry["name"] for entry in summary if entry.get("integer_conv")}
                kernels = {conv.kernel for conv in report.quantized}
                assert kernels == {f"{layer}.weight_dq" for layer in fed}, (model, name)
                assert len(report.int8) == len(report.quantized) == len(fed)
                assert plan_bytes
                built += 1
                lines.append(f"{target} {model} {ladder} {name}: {len(report.layers)} layers, "
                             f"{len(report.int8)}/{len(report.quantized)} quantized convs "
                             f"DQ -> Conv, {report.fill_slices} fill slices (none between a DQ "
                             f"and its conv), {len(plan_bytes)} bytes, {seconds:.2f} s; layers: "
                             + ", ".join(report.layers))
    print(f"\n{target}: {built} graphs parsed and built with TensorRT-RTX "
          f"{tensorrt_rtx.__version__}\n" + "\n".join(lines))
    assert built >= len(models) * 2  # a quantized engine and the reference


def test_fp32_graphs_with_exact_statistics_build_with_int8_convs(
        models: dict[str, tuple[Path, dict[str, Any]]], tmp_path: Path) -> None:
    """An FP32 TensorRT-dialect IMDN engine (``float_type="fp32"``: what the parity checks
    run), whose attention statistics ``compiler.lower.pooled`` rewrote (int64 sums, Round,
    Newton roots, a tree of pair sums, the rational logistic), parses and builds with every
    quantized conv still DQ -> Conv."""
    from compiler.lower.dialects import lower_engine
    from compiler.lower.export import export_onnx
    from compiler.lower.qdq import lowering_facts, lowering_summary
    from targets.loader import load_target

    weights, record = models["imdn"]
    target = load_target(EMULATED)
    fp = export_onnx(load_model(weights).model, TILE, dynamic=True, dynamic_batch=True)
    planned = next(p for p in plan_engines(record, target, "hardware", tile=TILE,
                                           overlap=4).engines if not p.reference)
    model = lower_engine(fp, planned.specs, dialect="tensorrt", float_type="fp32",
                         max_opset=target.max_opset)
    assert lowering_facts(model)["statistics"] == "exact"
    ops = {node.op_type for node in model.graph.node}
    assert {"Round", "ReduceSum"} <= ops and not {"ReduceMean", "Sigmoid", "Pow"} & ops
    path = tmp_path / "imdn_fp32.onnx"
    onnx.save(model, str(path))
    plan_bytes, report = build_with(tensorrt_rtx, TrtBuildSpec(path, INPUT_NAME,
                                                               (BATCH, 3, TILE, TILE)))
    fed = {entry["name"] for entry in lowering_summary(model) if entry.get("integer_conv")}
    assert {conv.kernel for conv in report.quantized} == {f"{n}.weight_dq" for n in fed}
    assert len(report.int8) == len(report.quantized) == len(fed) > 0
    assert plan_bytes
    print(f"\nFP32 IMDN engine with exact statistics: {len(report.layers)} layers, "
          f"{len(report.int8)}/{len(report.quantized)} quantized convs DQ -> Conv, "
          f"{len(plan_bytes)} bytes")


def test_a_pad_between_dq_and_conv_is_refused(tmp_path: Path) -> None:
    """The check fails on the graph the lowering wrote before: ``DQ -> Pad -> Conv``."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]),
        helper.make_node("Pad", ["dq", "pads", "fill"], ["padded"], mode="constant"),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wdq"], axis=0),
        helper.make_node("Conv", ["padded", "wdq"], ["y"], name="conv"),
    ]
    inits = [numpy_helper.from_array(v, n) for n, v in {
        "s": np.array(0.5, np.float32), "z": np.array(0, np.int8),
        "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "fill": np.array(3, np.float32),
        "w": np.ones((4, 3, 3, 3), np.int8), "ws": np.full(4, 0.25, np.float32),
        "wz": np.zeros(4, np.int8)}.items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 3, 8, 8])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    path = tmp_path / "padded.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    trt = tensorrt_rtx
    logger = trt.Logger(trt.Logger.ERROR)
    network = trt.Builder(logger).create_network(
        1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    assert trt.OnnxParser(network, logger).parse_from_file(str(path))
    report = inspect_network(network, trt)
    assert report.fill_slices == 1 and len(report.quantized) == 1 and not report.int8
    with pytest.raises(EngineError, match="1 quantized conv.*input from SLICE"):
        check_int8_convs(report, "padded.onnx")
    with pytest.raises(EngineError, match="cannot fuse them into INT8"):
        build_with(trt, TrtBuildSpec(path, "x", (1, 3, 8, 8)))
