#!/usr/bin/env python3
"""Latency of every cpu-x86 engine of the EDSR x2 bundles (both ladders), ONNX Runtime, CPU.

Calibrates AdaBM W8A6 FQ on ../shared/data/calibration (or takes ``--calibration RECORD``), builds
the cpu-x86 bundles with the hardware ladder (default: trunk ends in FP32), the hardware ladder
with every quantized layer on INT8 (``--float-layers none``) and the emulate ladder (the library
path of ``adasr build``), then times each engine on one 256x256 LR input with 2 intra-op threads:
warm-up, then ``--runs`` rounds (>= 10) in which every engine runs once, in turn, so load from
other processes hits all alike; the median per engine. Prints the table (engine, FAB, median,
speed-up vs FP32), writes benchmarks/results/engine_speed.md and ends with
``int8_vs_fp32_speedup=<float>``: the all-INT8 engine vs the FP32 engine.
"""

from __future__ import annotations

import argparse
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
from runtime.bundle import open_bundle
from runtime.fileio import atomic_write_bytes
from targets.loader import load_target

WEIGHTS = "weights/edsr_r8f64_x2_krasserm.pt"
CALIBRATION = "calibration/sun_hays8"
# (label, ladder, float layers): adasr build's default, every quantized layer on INT8, emulate
VARIANTS = (("hardware", "hardware", "auto"), ("all-int8", "hardware", "none"),
            ("emulate", "emulate", "auto"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calibration", type=Path, help="record (default: calibrate now)")
    parser.add_argument("--steps", type=int, default=100, help="calibration steps (default 100)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    if args.runs < 10:
        raise SystemExit("--runs must be >= 10")
    torch.set_num_threads(args.threads)
    weights, calib = shared(WEIGHTS), shared(CALIBRATION)
    record = edsr_record(args.calibration, args.steps)
    patches = sample_patches(calib, 8, 48, seed=0, downscale=2).numpy()
    x = np.random.default_rng(0).random((1, 3, args.size, args.size), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        engines = {}
        fabs = {}
        for label, ladder, floats in VARIANTS:
            root = Path(tmp) / label
            plan = plan_engines(record, load_target("cpu-x86"), ladder, floats=floats)
            write_bundle(load_model(weights), record, plan, root, patches=patches)
            bundle = open_bundle(root)
            for spec in bundle.manifest.engines:
                if spec.reference and label != "hardware":
                    continue  # the same FP32 graph as the hardware bundle's
                key = f"{label}/{spec.name}"
                engines[key] = bundle.engine(spec.name, threads=args.threads)
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
        for engine in engines.values():
            engine.deactivate()
    median = {key: statistics.median(values) * 1000 for key, values in times.items()}
    fp32 = median["hardware/fp32"]
    rows = [[key, f"{fabs[key]:.2f}", f"{median[key]:.1f}",
             f"{min(times[key]) * 1000:.1f}", f"{fp32 / median[key]:.2f}x"] for key in median]
    text = table(rows, ["engine", "FAB", "median ms", "min ms", "vs FP32"])
    header = (f"EDSR x2 (8 blocks), AdaBM W8A6 FQ record, cpu-x86 ONNX Runtime, "
              f"{args.size}x{args.size} LR, {args.threads} threads, median of {args.runs} "
              "interleaved runs\n\n")
    print(header + text)
    atomic_write_bytes(REPO / "benchmarks" / "results" / "engine_speed.md",
                       (header + text + "\n").encode())
    print(f"int8_vs_fp32_speedup={fp32 / median['all-int8/int8']:.3f}")


if __name__ == "__main__":
    main()
