#!/usr/bin/env python3
"""Parity of every bundle engine with the simulated network it lowers (issue: compiler).

For EDSR x2 (8 blocks) and IMDN x4: calibrate AdaBM W8A6 FQ on ../shared/data/calibration,
plan cpu-x86 engines with both ladders, then per engine run it in ONNX Runtime and the
simulated PyTorch network with the same per-layer bits (``compiler.parity.simulate_engine``)
on whole Set5 images (provided LR): PSNR(engine, simulation) on the 8-bit outputs (inf:
identical), the share of output values that differ, and PSNR vs HR of both. Prints the table,
writes benchmarks/results/bundle_parity[_tensorrt].{md,json}, ends with
``min_engine_vs_sim_db=`` and ``max_hr_gap_db=``.

``--dialect ort`` (default): the cpu-x86 bundles themselves (``adasr build`` library path), run
as the runtime runs them (all graph optimizations: QLinearConv), against the simulation with
the engine's requantized outputs, QLinearConv's requantization and int32 bias lattice and its
exact integer accumulation.

``--dialect tensorrt``: the planned engines of ``--target`` (default cpu-x86: the ORT table's
engines; a TensorRT target's hardware plan differs only in leaving the image conv float), with
widening decided by the same build check. They are lowered in the TensorRT dialect as
``compiler.bundle`` lowers them for TensorRT targets, but in FP32 (``float_type="fp32"``: ONNX
Runtime's CPU provider cannot stand in for FP16 TensorRT kernels) and on a dynamic-H/W FP
graph (whole images). Each is checked with ``check_tensorrt_graph`` at opset 17 (TensorRT 8.5,
the lowest target parser), run in ONNX Runtime (CPU, graph optimizations off: the graph's ONNX
semantics; ORT's optimizer would substitute its own QLinearConv arithmetic) and compared with
``simulate_engine(..., dialect="tensorrt")``, which models the graph's arithmetic (convs on
integer levels, ``compiler.lower.trt``; per-image statistics as the FP32 graph computes them,
``compiler.lower.pooled``, when its ``statistics`` fact says so). ``--requantize bundle``
(default) requantizes conv outputs on both ladders, as TensorRT bundles do; ``ladder`` does so
only on the hardware ladder, as ORT bundles do (emulate engines then have the ORT table's
placement).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from common import REPO, shared, table

from compiler.backends import builder
from compiler.bundle import write_bundle
from compiler.lower.dialects import lower_engine
from compiler.lower.export import INPUT_NAME, export_onnx
from compiler.lower.qdq import lowering_facts, lowering_summary
from compiler.parity import simulate_engine
from compiler.plan import plan_engines
from compiler.quant.calibrate import CalibrationConfig, calibrate
from compiler.quant.patches import sample_patches
from compiler.quant.qmodel import QuantSettings
from compiler.simulate import TorchUpscaler
from compiler.zoo import load_model
from runtime.backends import runtime_backend
from runtime.benchmark import load_benchmark
from runtime.bundle import open_bundle
from runtime.engines.onnxruntime import session_options
from runtime.fileio import atomic_write_bytes, atomic_write_json
from runtime.imaging import to_uint8
from runtime.manifest import EngineSpec, read_manifest
from runtime.metrics import psnr, psnr_y
from targets.loader import load_target

MODELS = {"edsr_x2": ("edsr_r8f64_x2_krasserm.pt", 2), "imdn_x4": ("imdn_x4.pth", 4)}
TENSORRT_OPSET = 17  # the FP graph's opset (the checker enforces it as the max)
FP_OPSET = 17  # compiler.bundle.BuildOptions.opset

Run = Callable[[np.ndarray], np.ndarray]  # N x 3 x H x W float32 in [0, 1] -> SR, not clipped
Engine = tuple[EngineSpec, list[dict[str, Any]] | None, str, Run]  # str: statistics fact


def calibration_record(key: str, weights: Path, scale: int, args: argparse.Namespace
                       ) -> dict[str, Any]:
    """The AdaBM record; with ``--records DIR`` read from / written to a file there."""
    cache = None
    if args.records is not None:
        cache = (Path(args.records) / f"{key}_w{args.wbits}a{args.abits}_s{args.steps}"
                 f"_t{args.threads}.json")
        if cache.is_file():
            loaded: dict[str, Any] = json.loads(cache.read_text())
            return loaded
    settings = QuantSettings(method="adabm", wbits=args.wbits, abits=args.abits, fq=True)
    config = CalibrationConfig(steps=args.steps, downscale=scale)
    record = calibrate(load_model(weights), settings, config,
                       shared("calibration/sun_hays8")).record
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache, record)
    return record


@contextmanager
def _ort_engines(weights: Path, record: dict[str, Any], ladder: str, patches: np.ndarray,
                 args: argparse.Namespace) -> Iterator[Iterator[Engine]]:
    """The cpu-x86 bundle's engines as the runtime runs them (with ``--backend``)."""
    target = load_target(args.target)
    target = target.with_backend(args.backend or target.backend)
    if builder(target.backend).dialect != "ort" or runtime_backend(target.backend).runs_plans:
        raise SystemExit(f"--dialect ort runs bundles of the ORT dialect here: {args.target} "
                         f"with {target.backend} is not one")
    plan = plan_engines(record, target, ladder)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "bundle"
        write_bundle(load_model(weights), record, plan, root, patches=patches)
        yield bundle_engines(root, args.threads)


def bundle_engines(root: Path, threads: int) -> Iterator[Engine]:
    """Each engine of the bundle at ``root``, as the runtime runs it, with its lowering facts."""
    bundle = open_bundle(root)
    for spec in bundle.manifest.engines:
        graph = onnx.load(str(root / spec.onnx.path))
        floating = not any(layer.act_bits for layer in spec.layers)  # FP32, BF16
        summary = None if floating else lowering_summary(graph)
        statistics = lowering_facts(graph).get("statistics", "float")
        with bundle.engine(spec.name, threads=threads) as engine:
            yield spec, summary, statistics, engine.infer


def engine_parity(key: str, ladder: str, spec: EngineSpec, run: Run, sim: TorchUpscaler,
                  images: list[Any], scale: int) -> dict[str, Any]:
    """One engine against its simulation on whole ``images`` (BenchmarkImage): the min over
    images of PSNR(engine, simulation) on the uint8 outputs, the max share of differing
    values and the mean PSNR vs HR of both."""
    vs_sim, hr_engine, hr_sim, differing = [], [], [], []
    for image in images:
        lr = image.lr.astype(np.float32).transpose(2, 0, 1)[None] / 255
        out = to_uint8(run(lr)[0].transpose(1, 2, 0))
        ref = to_uint8(sim(image.lr))
        vs_sim.append(psnr(out, ref, 255.0))
        differing.append(float(np.mean(out != ref)))
        hr_engine.append(psnr_y(out, image.hr, scale))
        hr_sim.append(psnr_y(ref, image.hr, scale))
    entry = {"model": key, "ladder": ladder, "engine": spec.name,
             "fab": spec.fab, "engine_vs_sim_db": float(np.min(vs_sim)),
             "max_differing": float(np.max(differing)),
             "psnr_engine": float(np.mean(hr_engine)),
             "psnr_sim": float(np.mean(hr_sim))}
    entry["hr_gap_db"] = entry["psnr_engine"] - entry["psnr_sim"]
    return entry


def _session(model: onnx.ModelProto, threads: int) -> Run:
    """ONNX Runtime (CPU) with graph optimizations off: the graph's ONNX semantics."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(),
                                   session_options(threads, optimize=False),
                                   providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        out: np.ndarray = session.run(None, {INPUT_NAME: x})[0]
        return out

    return run


@contextmanager
def _tensorrt_engines(weights: Path, record: dict[str, Any], ladder: str, patches: np.ndarray,
                      args: argparse.Namespace) -> Iterator[Iterator[Engine]]:
    """The same planned engines in the TensorRT dialect, FP32, checked, run unoptimized."""
    target = load_target(args.target)
    plan = plan_engines(record, target, ladder)
    with tempfile.TemporaryDirectory() as tmp:  # the build's widening decision and the specs
        root = Path(tmp) / "bundle"
        write_bundle(load_model(weights), record, plan, root, patches=patches)
        manifest = read_manifest(root)  # a TensorRT target's bundle has no plans here
    if any("rejected" in spec.note for spec in manifest.engines):
        plan = plan_engines(record, target, ladder, widen=False)
    fp = export_onnx(load_model(weights).model, plan.tile, opset=FP_OPSET, dynamic=True,
                     dynamic_batch=True)
    requantize = args.requantize == "bundle" or ladder == "hardware"
    from compiler.lower.trt_check import check_tensorrt_graph

    def engines() -> Iterator[Engine]:
        for planned, spec in zip(plan.engines, manifest.engines, strict=True):
            assert planned.name == spec.name and planned.layers == spec.layers, spec.name
            model = lower_engine(fp, planned.specs, dialect="tensorrt", float_type="fp32",
                                 requantize=requantize, max_opset=TENSORRT_OPSET)
            check_tensorrt_graph(model, TENSORRT_OPSET)
            summary = None if spec.reference else lowering_summary(model)
            statistics = lowering_facts(model).get("statistics", "float")
            yield spec, summary, statistics, _session(model, args.threads)

    yield engines()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--dialect", choices=("ort", "tensorrt"), default="ort")
    parser.add_argument("--backend", help="--dialect ort: build and run the bundles with this "
                        "backend of the target (default: the target's)")
    parser.add_argument("--target", default="cpu-x86",
                        help="whose plans (per-layer bits, widening): ort needs an ONNX Runtime "
                             "target; tensorrt takes any (cpu-x86: the ORT table's engines)")
    parser.add_argument("--requantize", choices=("bundle", "ladder"), default="bundle",
                        help="tensorrt: requantize conv outputs on both ladders (as TensorRT "
                             "bundles do) or on the hardware ladder only (as ORT bundles do)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--images", type=int, default=5, help="Set5 images to use")
    parser.add_argument("--wbits", type=int, default=8)
    parser.add_argument("--abits", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and ONNX Runtime intra-op threads (the record depends on it)")
    parser.add_argument("--records", default=None,
                        help="folder of calibration records: read when present, else written")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tensorrt = args.dialect == "tensorrt"
    engines_of = {"ort": _ort_engines, "tensorrt": _tensorrt_engines}[args.dialect]
    calib = shared("calibration/sun_hays8")
    rows, payload = [], []
    for key in args.models.split(","):
        file, scale = MODELS[key]
        weights = shared(f"weights/{file}")
        record = calibration_record(key, weights, scale, args)
        images = load_benchmark(shared("benchmarks/Set5"), scale)[:args.images]
        patches = sample_patches(calib, 8, 48, seed=0, downscale=scale).numpy()
        for ladder in ("hardware", "emulate"):
            with engines_of(weights, record, ladder, patches, args) as engines:
                for spec, summary, statistics, run in engines:
                    sim = TorchUpscaler(simulate_engine(weights, record, spec, summary=summary,
                                                        dialect=args.dialect,
                                                        statistics=statistics), scale)
                    entry = engine_parity(key, ladder, spec, run, sim, images, scale)
                    row = [key, ladder, spec.name, f"{spec.fab:.2f}",
                           f"{entry['engine_vs_sim_db']:.2f}",
                           f"{100 * entry['max_differing']:.3f}", f"{entry['psnr_sim']:.3f}",
                           f"{entry['psnr_engine']:.3f}", f"{entry['hr_gap_db']:+.3f}"]
                    payload.append(entry)
                    rows.append(row)
                    print(table(rows[-1:], HEADER).splitlines()[-1], flush=True)
    text = table(rows, HEADER)
    print(text)
    results = REPO / "benchmarks" / "results"
    note = (f"AdaBM W{args.wbits}A{args.abits} FQ, {args.steps} steps, {args.threads} "
            f"thread(s); Set5 (first {args.images}, provided LR), whole images; engine vs sim = "
            "min over images of RGB PSNR between the uint8 outputs (inf: identical); differing "
            "= max over images of the share of uint8 output values that differ\n\n")
    if tensorrt:
        note = (f"TensorRT dialect, FP32 graphs (float_type fp32: what ONNX Runtime can run; "
                f"FP16 graphs not measured), {args.target} plans, dynamic H/W, "
                f"check_tensorrt_graph at opset {TENSORRT_OPSET} passed; "
                "run in ONNX Runtime CPU with graph optimizations off; conv outputs requantized "
                + ("on both ladders (as TensorRT bundles)" if args.requantize == "bundle" else
                   "on the hardware ladder only (as ORT bundles)")
                + "; simulation: simulate_engine(dialect='tensorrt'). " + note)
    name = "bundle_parity_tensorrt" if tensorrt else "bundle_parity" + (
        f"_{args.backend}" if args.backend else "")
    if args.backend:
        note = f"{args.backend} engines. " + note
    atomic_write_bytes(results / f"{name}.md", (note + text + "\n").encode())
    atomic_write_json(results / f"{name}.json",  # null: identical outputs (inf dB)
                      [{k: None if isinstance(v, float) and np.isinf(v) else v
                        for k, v in entry.items()} for entry in payload])
    if tensorrt:
        print(f"dialect=tensorrt float_type=fp32 plans={args.target} requantize={args.requantize}"
              " (ONNX Runtime CPU, graph optimizations off)")
    print(f"min_engine_vs_sim_db={min(e['engine_vs_sim_db'] for e in payload):.3f} "
          f"max_hr_gap_db={max(abs(e['hr_gap_db']) for e in payload):.4f}")


HEADER = ["model", "ladder", "engine", "FAB", "engine vs sim dB", "differing %", "sim PSNR",
          "engine PSNR", "gap dB"]

if __name__ == "__main__":
    main()
