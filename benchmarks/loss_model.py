#!/usr/bin/env python3
"""How well the rung ladder's loss models rank tiles, per feature set, and what the reference
quantile costs (issue 15, item 2).

The EDSR x2 cpu-x86 hardware bundles of benchmarks/dispatch.py (tile 96 for bigbuckbunny, 32 for
carphone_pristine; ``--bundles`` reuses that script's folder) are run rung by rung on the
calibration windows the build fits on (compiler.predictor.windows) and on the first ``--frames``
frames of each clip (never seen by the build; LR = MATLAB bicubic x1/2 of the frame). For each
feature set of runtime.rungs.FEATURE_SETS the models are refitted on the calibration windows
exactly as the build fits them, and reported on the clip's tiles:

* Spearman rank correlation of each rung's predicted and measured per-tile MSE against the top
  rung (the ranking the allocation relies on);
* the bias of the top rung's predicted error against the original frame (predicted / measured,
  summed over tiles), unscaled (``sum``: fitted to the calibration windows' total) and scaled to
  under-predict on ``REFERENCE_QUANTILE`` of the windows, as the build stores it.

Then, for the current feature set and reference quantiles 0.7 / 0.8 / 0.9, the quality:0.05
allocation is simulated frame by frame on the measured per-tile errors (crop stitching: each tile
core's pixels come from its rung): the loss against the top rung and the cost against the
fastest static rung within 0.05 dB (costs from the bundle's ladder). benchmarks/dispatch.py
measures the real thing; this table shows the trade-off the quantile sets.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from common import REPO, cpu_name, edsr_record, shared, table
from dispatch import SMALL_TILE, _build, _tile_mse

from compiler.predictor import (
    _run,
    _uint8,
    _window_mse,
    fit_loss_model,
    spearman,
    windows,
)
from compiler.quant.patches import list_images
from runtime.bundle import Bundle, open_bundle
from runtime.dispatch import Dispatcher
from runtime.fileio import atomic_write_bytes
from runtime.imaging import load_rgb, mod_crop
from runtime.policies import allocate_rungs, engine_order
from runtime.resize import imresize_bicubic
from runtime.rungs import FEATURE_SETS, FEATURES, INTERPOLATION, tile_features
from runtime.tiling import extract_tiles
from runtime.video import read_frames

TARGET_DB = 0.05
QUANTILES = (0.7, 0.8, 0.9)
Data = dict[str, npt.NDArray[Any]]


def clip_data(path: Path, bundle: Bundle, frames: int, threads: int) -> Data:
    """Per tile of the clip's first frames: LR pixels, core area, frame index, and each rung's
    MSE against the top rung (``dev:NAME``) and against the original (``err:NAME``)."""
    m = bundle.manifest
    names = m.rungs.names
    engines = bundle.engines(threads=threads)
    for engine in engines.values():
        engine.activate()
    dispatchers = {n: Dispatcher(m, engines, policy=f"fixed:{n}", batch=8, hysteresis=0.0)
                   for n in names}
    out: dict[str, list[Any]] = {"tiles": [], "area": [], "frame": []}
    try:
        for d in dispatchers.values():
            d.__enter__()
        for index, frame in enumerate(read_frames(path, limit=frames)):
            hr = mod_crop(frame, 2)
            lr = imresize_bicubic(hr, 0.5)
            results = {n: d.upscale(lr) for n, d in dispatchers.items()}
            plan = results[names[-1]].plan
            first = plan.tiles[0].source
            out["tiles"].append(extract_tiles(lr, plan)[:, :first.h, :first.w])
            out["area"].append([t.core.h * t.core.w for t in plan.tiles])
            out["frame"].append([index] * len(plan.tiles))
            for n in names:
                out.setdefault(f"err:{n}", []).append(_tile_mse(results[n].sr, hr, plan))
                out.setdefault(f"dev:{n}", []).append(
                    _tile_mse(results[n].sr, results[names[-1]].sr, plan))
    finally:
        for d in dispatchers.values():
            d.__exit__(None, None, None)
        for engine in engines.values():
            engine.deactivate()
    return {k: np.concatenate([np.asarray(v) for v in values]) for k, values in out.items()}


def calibration_data(root: Path, bundle: Bundle, images: list[npt.NDArray[np.uint8]],
                     threads: int) -> Data:
    """The build's calibration windows: LR pixels, each rung's MSE against the top rung and the
    top rung's against the image (as compiler.predictor.measure_ladder measures them)."""
    m = bundle.manifest
    order = engine_order(m)
    low, high = windows(images, m.model.scale, m.tile)
    margin = m.overlap // 2 * m.model.scale
    engines = bundle.engines(threads=threads)
    for engine in engines.values():
        engine.activate()
    try:
        outputs = {n: _uint8(_run(n, engines, low, m.model.scale))  # type: ignore[arg-type]
                   for n in (INTERPOLATION, *order)}
    finally:
        for engine in engines.values():
            engine.deactivate()
    data: Data = {"tiles": low, "reference": _window_mse(outputs[order[-1]], high, margin)}
    for n in (INTERPOLATION, *order[:-1]):
        data[f"dev:{n}"] = _window_mse(outputs[n], outputs[order[-1]], margin)
    return data


def _simulate(bundle: Bundle, calib: Data, clip: Data, quantile: float) -> tuple[float, float]:
    """(loss dB against the top rung, speed-up over the fastest static rung within TARGET_DB)
    of the quality allocation with the reference scaled at ``quantile``."""
    ladder = bundle.manifest.rungs
    names = ladder.names
    _, cf = tile_features(calib["tiles"], FEATURES)
    _, features = tile_features(clip["tiles"], FEATURES)
    models = {n: fit_loss_model(cf, calib[f"dev:{n}"]) for n in names[:-1]}
    reference = fit_loss_model(cf, calib["reference"], quantile=quantile)
    costs = np.array([r.cost_ms for r in ladder.rungs])
    errors = np.stack([clip[f"err:{n}"] for n in names], axis=1)
    area = clip["area"].astype(np.float64)
    total_mse, total_cost = 0.0, 0.0
    for index in np.unique(clip["frame"]):
        rows = clip["frame"] == index
        a = area[rows]
        excess = np.stack([a * ladder.rung(n).excess * models[n].predict(features[rows])
                           for n in names[:-1]] + [np.zeros(int(rows.sum()))], axis=1)
        budget = float((a * reference.predict(features[rows])).sum()) * (10 ** (TARGET_DB / 10)
                                                                         - 1)
        codes = allocate_rungs(excess, costs, max_excess=budget)
        total_mse += float((a * errors[rows][np.arange(len(codes)), codes]).sum())
        total_cost += float(costs[codes].sum())
    static = (area[:, None] * errors).sum(axis=0)
    loss = 10 * math.log10(total_mse / static[-1])
    count = len(area)
    fastest = min(costs[i] * count for i in range(len(names))
                  if 10 * math.log10(static[i] / static[-1]) <= TARGET_DB + 1e-9)
    return loss, fastest / total_cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=Path, help="record (default: calibrate now)")
    parser.add_argument("--bundles", type=Path, required=True,
                        help="bundle folder of benchmarks/dispatch.py (built there if missing)")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="dispatch_features.md")
    args = parser.parse_args()
    clips = (("bigbuckbunny", 96), ("carphone_pristine", SMALL_TILE))
    images = [load_rgb(p) for p in list_images(shared("calibration/sun_hays8"))]
    record = None
    rank_rows, bias_rows, quantile_rows = [], [], []
    for name, tile in clips:
        root = args.bundles / f"bundle{tile}"
        if not (root / "manifest.json").is_file():
            record = record or edsr_record(args.calibration, 100)
            _build(record, tile, root, args.threads)
        bundle = open_bundle(root)
        print(f"{name}: measuring every rung on calibration windows and {args.frames} frames",
              flush=True)
        calib = calibration_data(root, bundle, images, args.threads)
        clip = clip_data(shared(f"video/{name}.mp4"), bundle, args.frames, args.threads)
        area = clip["area"].astype(np.float64)
        for version in FEATURE_SETS:
            _, cf = tile_features(calib["tiles"], version)
            _, features = tile_features(clip["tiles"], version)
            ranks = [spearman(fit_loss_model(cf, calib[f"dev:{n}"]).predict(features),
                              clip[f"dev:{n}"]) for n in bundle.manifest.rungs.names[:-1]]
            rank_rows.append([name, version, *(f"{r:.3f}" for r in ranks)])
            measured = float((area * clip[f"err:{bundle.manifest.rungs.names[-1]}"]).sum())
            bias = [float((area * fit_loss_model(cf, calib["reference"], quantile=q)
                           .predict(features)).sum()) / measured for q in (None, 0.8)]
            bias_rows.append([name, version, f"{bias[0]:.2f}", f"{bias[1]:.2f}"])
        for q in QUANTILES:
            loss, speedup = _simulate(bundle, calib, clip, q)
            quantile_rows.append([name, f"{q:g}", f"{loss:.4f}", f"{speedup:.3f}"])
    rungs = open_bundle(args.bundles / "bundle96").manifest.rungs.names[:-1]
    body = (
        f"# Loss models per feature set (`python benchmarks/loss_model.py`)\n\n"
        f"EDSR x2 cpu-x86 hardware bundles of benchmarks/dispatch.py; models fitted on the "
        f"calibration windows (sun_hays8), scored on the first {args.frames} frames of each clip. "
        f"Machine: {cpu_name()}, {args.threads} threads.\n\n"
        "## Spearman of predicted vs measured per-tile MSE against the top rung\n\n"
        + table(rank_rows, ["clip", "features", *rungs]) + "\n\n"
        "## Top-rung error against the original: predicted / measured (summed)\n\n"
        + table(bias_rows, ["clip", "features", "fitted to the calibration total",
                            "under-predicting 80% of windows"]) + "\n\n"
        f"## quantile: quality:{TARGET_DB:g} allocation on measured per-tile errors "
        f"({FEATURES})\n\n"
        + table(quantile_rows, ["clip", "reference quantile", "loss vs top (dB)",
                                "speed-up over the fastest static rung within target"]) + "\n")
    atomic_write_bytes(REPO / "benchmarks" / "results" / args.output, body.encode())
    print(body)


if __name__ == "__main__":
    main()
