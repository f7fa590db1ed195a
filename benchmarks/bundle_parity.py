#!/usr/bin/env python3
"""Parity of every bundle engine with the simulated network it lowers (issue: compiler).

For EDSR x2 (8 blocks) and IMDN x4: calibrate AdaBM W8A6 FQ on ../shared/data/calibration,
build cpu-x86 bundles with both ladders (``adasr build`` library path), then per engine run the
ONNX Runtime engine and the simulated PyTorch network with the same per-layer bits
(``compiler.parity.simulate_engine``: the engine's requantized outputs, QLinearConv's
requantization and int32 bias lattice and its exact integer accumulation included) on whole
Set5 images (provided LR): PSNR(engine, simulation) on the 8-bit outputs (inf: identical), the
share of output values that differ, and PSNR vs HR of both. Prints the table, writes
benchmarks/results/bundle_parity.{md,json}, ends with ``min_engine_vs_sim_db=`` and
``max_hr_gap_db=``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from common import REPO, shared, table

from compiler.bundle import write_bundle
from compiler.lower.qdq import lowering_summary
from compiler.parity import simulate_engine
from compiler.plan import plan_engines
from compiler.quant.calibrate import CalibrationConfig, calibrate
from compiler.quant.patches import sample_patches
from compiler.quant.qmodel import QuantSettings
from compiler.simulate import TorchUpscaler
from compiler.zoo import load_model
from runtime.benchmark import load_benchmark
from runtime.bundle import open_bundle
from runtime.fileio import atomic_write_bytes, atomic_write_json
from runtime.imaging import to_uint8
from runtime.metrics import psnr_y
from targets.loader import load_target

MODELS = {"edsr_x2": ("edsr_r8f64_x2_krasserm.pt", 2), "imdn_x4": ("imdn_x4.pth", 4)}


def _psnr_rgb(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--images", type=int, default=5, help="Set5 images to use")
    parser.add_argument("--wbits", type=int, default=8)
    parser.add_argument("--abits", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and ONNX Runtime intra-op threads (the record depends on it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    calib = shared("calibration/sun_hays8")
    rows, payload = [], []
    for key in args.models.split(","):
        file, scale = MODELS[key]
        weights = shared(f"weights/{file}")
        settings = QuantSettings(method="adabm", wbits=args.wbits, abits=args.abits, fq=True)
        config = CalibrationConfig(steps=args.steps, downscale=scale)
        record = calibrate(load_model(weights), settings, config, calib).record
        images = load_benchmark(shared("benchmarks/Set5"), scale)[:args.images]
        patches = sample_patches(calib, 8, 48, seed=0, downscale=scale).numpy()
        for ladder in ("hardware", "emulate"):
            plan = plan_engines(record, load_target("cpu-x86"), ladder)
            with tempfile.TemporaryDirectory() as tmp:
                root = Path(tmp) / "bundle"
                write_bundle(load_model(weights), record, plan, root, patches=patches)
                bundle = open_bundle(root)
                for spec in bundle.manifest.engines:
                    graph = onnx.load(str(root / spec.onnx.path))
                    summary = None if spec.reference else lowering_summary(graph)
                    sim = TorchUpscaler(simulate_engine(weights, record, spec, summary=summary),
                                        scale)
                    vs_sim, hr_engine, hr_sim, differing = [], [], [], []
                    with bundle.engine(spec.name, threads=args.threads) as engine:
                        for image in images:
                            lr = image.lr.astype(np.float32).transpose(2, 0, 1)[None] / 255
                            out = to_uint8(engine.infer(lr)[0].transpose(1, 2, 0))
                            ref = to_uint8(sim(image.lr))
                            vs_sim.append(_psnr_rgb(out, ref))
                            differing.append(float(np.mean(out != ref)))
                            hr_engine.append(psnr_y(out, image.hr, scale))
                            hr_sim.append(psnr_y(ref, image.hr, scale))
                    entry = {"model": key, "ladder": ladder, "engine": spec.name,
                             "fab": spec.fab, "engine_vs_sim_db": float(np.min(vs_sim)),
                             "max_differing": float(np.max(differing)),
                             "psnr_engine": float(np.mean(hr_engine)),
                             "psnr_sim": float(np.mean(hr_sim))}
                    entry["hr_gap_db"] = entry["psnr_engine"] - entry["psnr_sim"]
                    payload.append(entry)
                    rows.append([key, ladder, spec.name, f"{spec.fab:.2f}",
                                 f"{entry['engine_vs_sim_db']:.2f}",
                                 f"{100 * entry['max_differing']:.3f}", f"{entry['psnr_sim']:.3f}",
                                 f"{entry['psnr_engine']:.3f}", f"{entry['hr_gap_db']:+.3f}"])
                    print(table(rows[-1:], HEADER).splitlines()[-1], flush=True)
    text = table(rows, HEADER)
    print(text)
    out = REPO / "benchmarks" / "results"
    note = (f"AdaBM W{args.wbits}A{args.abits} FQ, {args.steps} steps, {args.threads} "
            f"thread(s); Set5 (first {args.images}, provided LR), whole images; engine vs sim = "
            "min over images of RGB PSNR between the uint8 outputs (inf: identical); differing "
            "= max over images of the share of uint8 output values that differ\n\n")
    atomic_write_bytes(out / "bundle_parity.md", (note + text + "\n").encode())
    atomic_write_json(out / "bundle_parity.json",  # null: identical outputs (inf dB)
                      [{k: None if isinstance(v, float) and np.isinf(v) else v
                        for k, v in entry.items()} for entry in payload])
    print(f"min_engine_vs_sim_db={min(e['engine_vs_sim_db'] for e in payload):.3f} "
          f"max_hr_gap_db={max(abs(e['hr_gap_db']) for e in payload):.4f}")


HEADER = ["model", "ladder", "engine", "FAB", "engine vs sim dB", "differing %", "sim PSNR",
          "engine PSNR", "gap dB"]

if __name__ == "__main__":
    main()
