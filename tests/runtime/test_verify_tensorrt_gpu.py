"""On a machine with an NVIDIA GPU and TensorRT: built plans compute what their graphs say.

Marked ``gpu``: the default run deselects it (``addopts = -m 'not gpu'``); run it with
``pytest -m gpu tests/runtime/test_verify_tensorrt_gpu.py`` on the device. Not run in this
repository's CI (no GPU there).

- A tiny EDSR x2 bundle for the detected target is built and finished here, and
  ``tools/verify_tensorrt_bundle.py`` compares every plan with its ONNX graph run by ONNX Runtime
  with optimizations off; the shares of differing 8-bit output values are printed. Those graphs
  are FP16 (the targets' strongly typed recipe), whose rounding TensorRT's kernels and ONNX
  Runtime need not share: the test asserts the tool passes at ``--max-differing 0.05``.
- The claim itself, on an FP32 TensorRT-dialect graph of the same engine: its quantized convs sum
  integer levels exactly, so TensorRT's INT8 plan and the unoptimized ONNX Runtime give the same
  8-bit output (no differing value).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compiler.bundle import BuildOptions, write_bundle
from compiler.engines.tensorrt_build import TrtBuildSpec, build_engine
from compiler.lower.dialects import lower_engine
from compiler.lower.export import INPUT_NAME, export_onnx, save_onnx
from compiler.plan import plan_engines
from compiler.quant.calibrate import calibrate
from compiler.quant.qmodel import QuantSettings
from compiler.zoo import load_model
from runtime.engines.onnxruntime import OnnxRuntimeEngine, session_options
from runtime.engines.tensorrt import TensorRTEngine, current_device, require_tensorrt
from runtime.imaging import to_uint8
from targets.loader import detect_target
from tests.compiler.test_parity import FAST

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("one_torch_thread")]
REPO = Path(__file__).resolve().parents[2]
TILE, BATCH = 32, 2


def _verify_script() -> Any:
    spec = importlib.util.spec_from_file_location(
        "verify_tensorrt_bundle", REPO / "tools" / "verify_tensorrt_bundle.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def record(tiny: tuple[Path, Path]) -> dict[str, Any]:
    weights, calib = tiny
    settings = QuantSettings(method="adabm", wbits=8, abits=6, fq=True)
    return calibrate(load_model(weights), settings, FAST, calib).record


def test_finished_bundle_passes_the_verify_tool(tiny: tuple[Path, Path],
                                                record: dict[str, Any], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    require_tensorrt("Builder")
    target = detect_target()
    assert target.backend == "tensorrt", f"this GPU matches no TensorRT target ({target.name})"
    plan = plan_engines(record, target, "hardware", tile=TILE, overlap=4)
    manifest = write_bundle(load_model(tiny[0]), record, plan, tmp_path / "bundle",
                            options=BuildOptions(batch=BATCH))
    assert all(spec.plan is not None for spec in manifest.engines)
    status = _verify_script().main([str(tmp_path / "bundle"), "--max-differing", "0.05"])
    print(capsys.readouterr().out)
    assert status == 0


def test_an_fp32_int8_plan_matches_its_graph_exactly(tiny: tuple[Path, Path],
                                                     record: dict[str, Any],
                                                     tmp_path: Path) -> None:
    require_tensorrt("Builder")
    device, version = current_device()
    target = detect_target()
    planned = next(p for p in plan_engines(record, target, "hardware", tile=TILE,
                                           overlap=4).engines if not p.reference)
    fp = export_onnx(load_model(tiny[0]).model, TILE, batch=BATCH)
    graph = lower_engine(fp, planned.specs, dialect="tensorrt", float_type="fp32",
                         max_opset=target.max_opset)
    onnx_path = tmp_path / "int8_fp32.onnx"
    save_onnx(graph, onnx_path)
    plan_path = tmp_path / "int8_fp32.plan"
    plan_path.write_bytes(build_engine(TrtBuildSpec(onnx_path, INPUT_NAME,
                                                    (BATCH, 3, TILE, TILE))))
    rng = np.random.default_rng(0)
    tiles = rng.random((BATCH, 3, TILE, TILE)).astype(np.float32)
    with TensorRTEngine("int8", plan_path, 2, TILE, expect_device=device,
                        expect_tensorrt=version, batch=BATCH) as trt_engine, \
            OnnxRuntimeEngine("int8", onnx_path, 2, TILE,
                              options=session_options(1, optimize=False)) as ort_engine:
        got, ref = to_uint8(trt_engine.infer(tiles)), to_uint8(ort_engine.infer(tiles))
    differing = float(np.mean(got != ref))
    print(f"{device}, TensorRT {version}: {differing:.4%} of 8-bit output values differ")
    assert differing == 0.0
