#!/usr/bin/env python3
"""Per-patch adaptive dispatch on video frames vs the FP32 engine (issue: runtime dispatcher).

EDSR x2 (8 blocks): AdaBM W8A6 FQ calibration on ../shared/data/calibration (or
``--calibration RECORD``), cpu-x86 bundle (``--ladder``, default hardware), then on the first
``--frames`` frames of ../shared/data/video/bigbuckbunny.mp4 downscaled x2 with the
MATLAB-compatible bicubic (the original 1280x720 frames are the HR reference):

- throughput: frames/s of the dispatcher with the ``threshold`` policy in patch mode vs the same
  dispatcher with ``fixed:fp32`` (same tiles, batches and threads), interleaved frame by frame;
- PSNR (Y, shave 2) of both against the original frames: the gap fp32 - adaptive;
- overhead: everything the dispatcher does besides the engines' ``infer`` calls (tiling,
  statistic, grouping, batching, stitching), as a share of running the same engines on the same
  tile batches directly (measured separately on pre-cut tiles, not only from its stage timers).

Ends with ``throughput_vs_fp32=<float> psnr_gap_db=<float> overhead_pct=<float>``.
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
from runtime.dispatch import Dispatcher
from runtime.fileio import atomic_write_bytes
from runtime.imaging import mod_crop
from runtime.metrics import psnr_y
from runtime.policies import BudgetPolicy, LatencyTable
from runtime.resize import imresize_bicubic
from runtime.statistic import complexity_batch
from runtime.tiling import extract_tiles, plan_tiles
from runtime.video import read_frames
from targets.loader import load_target


def _direct_seconds(result, frame, engines, manifest, batch: int) -> float:  # type: ignore[no-untyped-def]
    """The same engines on the same tiles, batched the same way, with nothing else."""
    plan = plan_tiles(frame.shape[0], frame.shape[1], manifest.tile, manifest.overlap,
                      manifest.model.scale)
    tiles = extract_tiles(frame, plan).astype(np.float32).transpose(0, 3, 1, 2) / 255
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(result.engines):
        groups.setdefault(name, []).append(index)
    batches = [(name, np.ascontiguousarray(tiles[idx[i:i + batch]]))
               for name, idx in groups.items() for i in range(0, len(idx), batch)]
    start = time.perf_counter()
    for name, x in batches:
        engines[name].infer(x)
    return time.perf_counter() - start


def _tile_latencies(engines, tile: int, batch: int) -> LatencyTable:  # type: ignore[no-untyped-def]
    """ms per tile of each engine: median of 5 batches of ``batch`` tiles after a warm-up."""
    x = np.random.default_rng(0).random((batch, 3, tile, tile), dtype=np.float32)
    per_tile = {}
    for name, engine in engines.items():
        with engine:
            engine.infer(x)
            runs = []
            for _ in range(5):
                start = time.perf_counter()
                engine.infer(x)
                runs.append(time.perf_counter() - start)
        per_tile[name] = statistics.median(runs) * 1000 / batch
    return LatencyTable(per_tile)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calibration", type=Path, help="record (default: calibrate now)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--abits", type=int, default=6, help="base activation bits (default 6)")
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--ladder", default="hardware", choices=("hardware", "emulate"))
    parser.add_argument("--float-layers", default="auto",
                        help="hardware ladder: layers kept at FP32 (auto: the trunk's ends, none, "
                        "or NAME,...; as adasr build)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--policy", default="threshold", choices=("threshold", "budget"),
                        help="threshold (the calibrated thresholds) or budget: a per-frame "
                        "budget of the FP32 frame time / --speedup, spent on upgrading the most "
                        "complex tiles to better engines (per-tile latencies measured first)")
    parser.add_argument("--speedup", type=float, default=2.15,
                        help="budget policy: target speed-up over FP32 (default 2.15)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    weights, calib = shared("weights/edsr_r8f64_x2_krasserm.pt"), shared("calibration/sun_hays8")
    record = edsr_record(args.calibration, args.steps, args.abits)
    hr_frames = [mod_crop(f, 2) for f in read_frames(shared("video/bigbuckbunny.mp4"),
                                                     limit=args.frames)]
    lr_frames = [imresize_bicubic(f, 0.5) for f in hr_frames]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "bundle"
        patches = sample_patches(calib, 8, 48, seed=0, downscale=2).numpy()
        plan = plan_engines(record, load_target("cpu-x86"), args.ladder, floats=args.float_layers)
        write_bundle(load_model(weights), record, plan, root, patches=patches)
        bundle = open_bundle(root)
        m = bundle.manifest
        engines = bundle.engines(threads=args.threads)
        policy: object = "threshold"
        latencies = None
        if args.policy == "budget":
            latencies = _tile_latencies(engines, m.tile, args.batch)
            tiles = len(plan_tiles(*lr_frames[0].shape[:2], m.tile, m.overlap, 2))
            policy = BudgetPolicy(tiles * latencies.per_tile_ms[m.reference.name] / args.speedup)
        adaptive = Dispatcher(m, engines, policy=policy, batch=args.batch,  # type: ignore[arg-type]
                              latencies=latencies)
        reference = Dispatcher(m, engines, policy=f"fixed:{m.reference.name}", batch=args.batch)
        times: dict[str, list[float]] = {"adaptive": [], "fp32": []}
        psnr: dict[str, list[float]] = {"adaptive": [], "fp32": []}
        overhead, direct, histogram, fab = [], [], {}, []
        with adaptive, reference:
            adaptive.upscale(lr_frames[0])  # warm-up (sessions, first-run allocations)
            reference.upscale(lr_frames[0])
            for lr, hr in zip(lr_frames, hr_frames, strict=True):
                for key, dispatcher in (("adaptive", adaptive), ("fp32", reference)):
                    start = time.perf_counter()
                    result = dispatcher.upscale(lr)
                    times[key].append(time.perf_counter() - start)
                    psnr[key].append(psnr_y(result.sr, hr, 2))
                    if key == "adaptive":
                        total = sum(result.seconds.values())
                        overhead.append(total - result.seconds["infer"])
                        direct.append(_direct_seconds(result, lr, engines, m, args.batch))
                        fab.append(result.fab(m))
                        for name, count in result.histogram.items():
                            histogram[name] = histogram.get(name, 0) + count
        g = complexity_batch(extract_tiles(lr_frames[0], plan_tiles(
            *lr_frames[0].shape[:2], m.tile, m.overlap, 2)))
    fps = {key: len(v) / sum(v) for key, v in times.items()}
    ratio = fps["adaptive"] / fps["fp32"]
    gap = statistics.mean(psnr["fp32"]) - statistics.mean(psnr["adaptive"])
    overhead_pct = 100 * sum(overhead) / sum(direct)
    rows = [[key, f"{fps[key]:.3f}", f"{statistics.mean(psnr[key]):.3f}"] for key in fps]
    text = table(rows, ["dispatch", "frames/s", "PSNR (Y) vs original"])
    s = record["settings"]
    info = (f"policy {args.policy}; {s['method']} W{s['wbits']}A{s['abits']}"
            f"{' FQ' if s['fq'] else ''} record; EDSR x2 {args.ladder} bundle "
            f"(engines {', '.join(m.names)}; at FP32: {', '.join(plan.float_layers) or 'none'}), "
            f"{len(lr_frames)} bigbuckbunny frames {lr_frames[0].shape[1]}x"
            f"{lr_frames[0].shape[0]} -> x2, tile {m.tile}/{m.overlap}, batch {args.batch}, "
            f"{args.threads} threads; tiles per engine {histogram}; mean FAB "
            f"{statistics.mean(fab):.2f}; tile complexity g of frame 0: median "
            f"{np.median(g):.1f} (thresholds {m.thresholds[0]:.2f}/{m.thresholds[1]:.2f})\n"
            f"dispatch overhead {sum(overhead):.3f} s vs direct engine time "
            f"{sum(direct):.3f} s\n\n")
    print(info + text)
    suffix = "" if args.float_layers == "auto" else "_float-" + args.float_layers.replace(",", "+")
    name = f"dispatch_{args.ladder}_{args.policy}_a{args.abits}{suffix}.md"
    atomic_write_bytes(REPO / "benchmarks" / "results" / name, (info + text + "\n").encode())
    print(f"throughput_vs_fp32={ratio:.3f} psnr_gap_db={gap:.4f} overhead_pct={overhead_pct:.2f}")


if __name__ == "__main__":
    main()
