#!/usr/bin/env python3
"""Latency and Set5 quality of every cpu-x86 engine of the EDSR x2 bundles, per CPU backend.

Calibrates AdaBM W8A6 FQ on ../shared/data/calibration (or takes ``--calibration RECORD``), builds
the cpu-x86 bundles with the hardware ladder (default: trunk ends in FP32), the hardware ladder
with every quantized layer on INT8 (``--float-layers none``) and the emulate ladder (the library
path of ``adasr build``), each with the ``--backends`` backend whose ladder is widest (OpenVINO's
adds a BF16 rung on CPUs with BF16 kernels). Every engine is then opened with every backend of
``--backends`` that runs it (the same ONNX files: ONNX Runtime and OpenVINO read the same
dialect) and timed on one 256x256 LR input with 2 threads: warm-up, then ``--runs`` rounds
(>= 10) in which every (backend, engine) runs once, in turn, so load from other processes hits
all alike; the median per engine. Then each engine upscales Set5 (provided LR, whole images) and
its mean Y-PSNR is reported. The load average is printed beside the timings (the machine is
shared). Writes benchmarks/results/engine_speed[_<backends>].md and ends with
``int8_vs_fp32_speedup=`` (the first backend's all-INT8 engine vs its FP32 engine) and, when
both ONNX Runtime and OpenVINO are measured, ``ov_int8_vs_ort_int8= ov_bf16_vs_fp32=
best_int8_vs_fp32=`` (all-INT8 engines; OpenVINO's BF16 vs its FP32; the fastest all-INT8 vs the
fastest FP32 engine of any backend).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import REPO, edsr_record, shared, table

from compiler.bundle import write_bundle
from compiler.plan import plan_engines
from compiler.quant.patches import sample_patches
from compiler.zoo import load_model
from runtime.backends import runtime_backend
from runtime.benchmark import load_benchmark
from runtime.bundle import open_bundle
from runtime.engines.base import Engine
from runtime.fileio import atomic_write_bytes
from runtime.imaging import to_uint8
from runtime.metrics import psnr, psnr_y
from targets.loader import load_target

WEIGHTS = "weights/edsr_r8f64_x2_krasserm.pt"
CALIBRATION = "calibration/sun_hays8"
# (label, ladder, float layers): adasr build's default, every quantized layer on INT8, emulate
VARIANTS = (("hardware", "hardware", "auto"), ("all-int8", "hardware", "none"),
            ("emulate", "emulate", "auto"))


def set5(engine: Engine, scale: int) -> tuple[float, list[np.ndarray]]:
    """Mean Y-PSNR on Set5 (provided LR, whole images) and the uint8 outputs."""
    images = load_benchmark(shared("benchmarks/Set5"), scale)
    values, outputs = [], []
    for image in images:
        lr = image.lr.astype(np.float32).transpose(2, 0, 1)[None] / 255
        outputs.append(to_uint8(engine.infer(lr)[0].transpose(1, 2, 0)))
        values.append(psnr_y(outputs[-1], image.hr, scale))
    return float(np.mean(values)), outputs


def vs_onnxruntime(key: str, outputs: dict[str, list[np.ndarray]]) -> str:
    """Min over Set5 of the RGB PSNR between an engine's outputs and ONNX Runtime's on the same
    graph (ONNX Runtime's match the simulation: benchmarks/bundle_parity.py); a BF16 engine
    against ONNX Runtime's FP32."""
    backend, label, engine = key.split("/")
    reference = f"onnxruntime/{label}/{'fp32' if engine == 'bf16' else engine}"
    if backend == "onnxruntime" or reference not in outputs:
        return "-"
    pairs = zip(outputs[key], outputs[reference], strict=True)
    return f"{min(psnr(a, b, 255.0) for a, b in pairs):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calibration", type=Path, help="record (default: calibrate now)")
    parser.add_argument("--steps", type=int, default=100, help="calibration steps (default 100)")
    parser.add_argument("--backends", default="onnxruntime",
                        help="comma-separated CPU backends of cpu-x86 (default onnxruntime)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--no-quality", action="store_true", help="skip the Set5 PSNR")
    args = parser.parse_args()
    if args.runs < 10:
        raise SystemExit("--runs must be >= 10")
    backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    target = load_target("cpu-x86")
    builds = max(backends, key=lambda name: len(target.with_backend(name).precision_ladder))
    torch.set_num_threads(args.threads)
    weights, calib = shared(WEIGHTS), shared(CALIBRATION)
    record = edsr_record(args.calibration, args.steps)
    patches = sample_patches(calib, 8, 48, seed=0, downscale=2).numpy()
    x = np.random.default_rng(0).random((1, 3, args.size, args.size), dtype=np.float32)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        engines: dict[str, Engine] = {}
        fabs = {}
        for label, ladder, floats in VARIANTS:
            root = Path(tmp) / label
            plan = plan_engines(record, target.with_backend(builds), ladder, floats=floats)
            write_bundle(load_model(weights), record, plan, root, patches=patches)
            bundle = open_bundle(root)
            for spec in bundle.manifest.engines:
                if not spec.layers or (spec.offsets == () and label != "hardware"):
                    continue  # the FP32 / BF16 graphs are the hardware bundle's
                for name in backends:
                    if name != spec.backend and runtime_backend(name).runs(spec) is not None:
                        continue
                    key = f"{name}/{label}/{spec.name}"
                    engines[key] = bundle.engine(spec.name, threads=args.threads, backend=name)
                    fabs[key] = spec.fab
        times: dict[str, list[float]] = {key: [] for key in engines}
        for engine in engines.values():
            engine.activate()
            engine.infer(x)
            engine.infer(x)
        for _ in range(args.runs):
            for key, engine in engines.items():
                start = time.perf_counter()
                engine.infer(x)
                times[key].append(time.perf_counter() - start)
        load_after = os.getloadavg()
        scored = {} if args.no_quality else {key: set5(engine, 2)
                                             for key, engine in engines.items()}
        quality = {key: value[0] for key, value in scored.items()}
        outputs = {key: value[1] for key, value in scored.items()}
        for engine in engines.values():
            engine.deactivate()
    median = {key: statistics.median(values) * 1000 for key, values in times.items()}
    fp32 = {name: median[f"{name}/hardware/fp32"] for name in backends}
    rows = [[key, f"{fabs[key]:.2f}", f"{median[key]:.1f}", f"{min(times[key]) * 1000:.1f}",
             f"{fp32[key.split('/')[0]] / median[key]:.2f}x",
             f"{quality[key]:.3f}" if key in quality else "-",
             vs_onnxruntime(key, outputs)] for key in median]
    text = table(rows, ["backend/bundle/engine", "FAB", "median ms", "min ms",
                        "vs own FP32", "Set5 Y-PSNR", "vs ORT dB"])
    header = (f"EDSR x2 (8 blocks), AdaBM W8A6 FQ record, cpu-x86 ({', '.join(backends)}; "
              f"bundles built for {builds}), {args.size}x{args.size} LR, {args.threads} threads, "
              f"median of {args.runs} interleaved runs; load average (1/5/15 min) "
              f"{'/'.join(f'{v:.1f}' for v in load_before)} before, "
              f"{'/'.join(f'{v:.1f}' for v in load_after)} after the timed runs; Set5 = "
              "provided LR, whole images, mean Y-PSNR; vs ORT = min over Set5 of the RGB PSNR "
              "against ONNX Runtime's output of the same graph (its FP32 for BF16; ONNX Runtime "
              "matches the simulation, benchmarks/bundle_parity.py)\n\n")
    first = backends[0]
    lines = [f"int8_vs_fp32_speedup={fp32[first] / median[f'{first}/all-int8/int8']:.3f}"]
    if {"onnxruntime", "openvino"} <= set(backends):
        int8 = {name: median[f"{name}/all-int8/int8"] for name in backends}
        bf16 = median.get("openvino/hardware/bf16")
        if bf16 and quality:
            loss = quality["openvino/hardware/bf16"] - quality["openvino/hardware/fp32"]
            lines.append(f"bf16_vs_fp32_set5_db={loss:.4f}")
        lines.append(f"ov_int8_vs_ort_int8={int8['onnxruntime'] / int8['openvino']:.3f} "
                     f"ov_bf16_vs_fp32={fp32['openvino'] / bf16 if bf16 else float('nan'):.3f} "
                     f"best_int8_vs_fp32={min(fp32.values()) / min(int8.values()):.3f}")
    print(header + text)
    print("\n".join(lines))
    stem = "engine_speed" + ("" if backends == ["onnxruntime"] else "_" + "_".join(backends))
    atomic_write_bytes(REPO / "benchmarks" / "results" / f"{stem}.md",
                       (header + text + "\n\n" + "\n".join(lines) + "\n").encode())


if __name__ == "__main__":
    main()
