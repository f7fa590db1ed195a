"""Measure a bundle's rung ladder at build time: each rung's cost and a calibrated loss model.

The ladder (:mod:`runtime.rungs`) is the interpolation rung, then the bundle's engines from the
cheapest to the top precision (the reference engine last). :func:`measure_ladder` runs every rung
on windows cut from the calibration images only and fits, per rung, the log-linear model
``log MSE = features @ coefficients`` of its per-window MSE *against the top rung's output* (Y,
0..255, the window minus an ``overlap / 2`` margin, outputs rounded as the dispatcher rounds them)
by ridge least squares, then rescales it so that its sum over the windows equals the measured sum
(the quality policy adds MSEs up over a frame).

The quality target is in dB against the top rung's error, which needs that error: the
calibration images are downscaled by the model's scale (MATLAB bicubic) to make the windows and
the images themselves are the reference. On those pairs the build also fits the top rung's own
MSE against the image (``reference_error``) and, per rung, ``excess``: extra MSE against the
image per unit of MSE against the top rung (near 1 for quantization noise; above 1 for
interpolation, which errs in the same direction as the network; never taken below 1, the
uncorrelated case, as what measures below 1 on photos need not on other content).

Costs are ms per tile at the bundle's tile size: the fastest of 7 timed batches of 8 tiles after
a warm-up (on a busy build machine a median still carried bursts: tile-32 INT8 measured 2.2x
all-INT8 where the runs gave 1.16x), the rungs taking turns (engines with the bundle's threads;
the interpolation rung its numpy code).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from runtime.bundle import Bundle
from runtime.engines.base import Engine
from runtime.imaging import rgb_to_y
from runtime.manifest import Manifest
from runtime.policies import engine_order
from runtime.resize import imresize_bicubic
from runtime.rungs import (
    INTERPOLATION,
    LossModel,
    Rung,
    RungLadder,
    interpolate_tiles,
    tile_features,
)

Progress = Callable[[str], None]
# Default quality target of ``quality`` without a number (dB lost against the top rung per
# frame): about the loss of the INT8 engine with top-precision trunk ends, the previous default;
# measured against the original frames of both clips of benchmarks/dispatch.py it gave 0.037 /
# 0.038 dB, 0.1 gave 0.075 / 0.065; with tile-features/2 and the 0.8 reference quantile 0.045 /
# 0.046 and 0.099 / 0.081 (benchmarks/results/dispatch_quality.md).
DEFAULT_TARGET_DB = 0.05
# The top rung's error against the original cannot be seen at run time and varies by domain
# far more than the features tell: clean video errs about 3x less than photos with the same features
# (benchmarks/results/dispatch_features.md). Its model is therefore scaled to under-predict on
# this share of the calibration windows, a conservative dB -> MSE conversion. The share trades
# speed for the risk of missing the target: measured on both benchmark clips, 0.9 met 0.05 dB
# with 0.047 / 0.031 dB (fast static rungs left unused), 0.8 with 0.053 / 0.043 and 0.7 went
# to 0.068 / 0.052 (dispatch_features.md, "quantile" table).
REFERENCE_QUANTILE = 0.8
MIN_WINDOWS = 64  # halve the window size (down to MIN_WINDOW) until there are this many
MIN_WINDOW = 24
MAX_WINDOWS = 256
_RIDGE = 1e-3
_FLOOR = 1e-4  # MSE floor in the log domain (identical outputs)
_BATCH = 8


def windows(images: Sequence[npt.NDArray[np.uint8]], scale: int, tile: int, *,
            seed: int = 0) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """(LR windows N x w x w x 3, reference windows N x sw x sw x 3) from calibration images:
    each image is downscaled x``scale`` and cut with stride w/2; w is the tile, halved while
    fewer than MIN_WINDOWS fit (not below MIN_WINDOW); at most MAX_WINDOWS (a seeded sample)."""
    pairs = []
    for image in images:
        height, width = (image.shape[0] // scale) * scale, (image.shape[1] // scale) * scale
        reference = image[:height, :width]
        pairs.append((imresize_bicubic(reference, 1 / scale), reference))
    size = tile
    while True:
        boxes = [(index, y, x) for index, (low, _) in enumerate(pairs)
                 for y in range(0, low.shape[0] - size + 1, size // 2)
                 for x in range(0, low.shape[1] - size + 1, size // 2)]
        if len(boxes) >= MIN_WINDOWS or size // 2 < MIN_WINDOW:
            break
        size //= 2
    if not boxes:
        raise ValueError(f"calibration images are too small for {size} px windows")
    if len(boxes) > MAX_WINDOWS:
        keep = np.random.default_rng(seed).choice(len(boxes), MAX_WINDOWS, replace=False)
        boxes = [boxes[i] for i in sorted(keep.tolist())]
    low = np.stack([pairs[i][0][y:y + size, x:x + size] for i, y, x in boxes])
    high = np.stack([pairs[i][1][y * scale:(y + size) * scale, x * scale:(x + size) * scale]
                     for i, y, x in boxes])
    return low, high


def _uint8(outputs: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """N x 3 x H x W float outputs -> N x H x W x 3 uint8, rounded as the dispatcher rounds."""
    scaled = np.clip(outputs.transpose(0, 2, 3, 1) * np.float32(255) + np.float32(0.5), 0, 255)
    result: npt.NDArray[np.uint8] = scaled.astype(np.uint8)
    return result


def _window_mse(a: npt.NDArray[np.uint8], b: npt.NDArray[np.uint8],
                margin: int) -> npt.NDArray[np.float64]:
    """Y MSE (0..255) per window of two N x H x W x 3 uint8 stacks, ``margin`` px cut off."""
    crop = (slice(None), slice(margin, a.shape[1] - margin), slice(margin, a.shape[2] - margin))
    result: npt.NDArray[np.float64] = np.stack(
        [((rgb_to_y(x) - rgb_to_y(y)) ** 2).mean() for x, y in zip(a[crop], b[crop],
                                                                      strict=True)])
    return result


def fit_loss_model(features: npt.NDArray[np.float64], mse: npt.NDArray[np.float64], *,
                   quantile: float | None = None) -> LossModel:
    """Ridge fit of ``log(max(mse, floor))`` on ``features``, rescaled so that its sum over the
    windows is the measured sum, or (``quantile``) so that it is at most the measured MSE on
    that share of the windows."""
    target = np.log(np.maximum(mse, _FLOOR))
    gram = features.T @ features + _RIDGE * len(mse) * np.eye(features.shape[1])
    coefficients = np.linalg.solve(gram, features.T @ target)
    predicted = np.exp(features @ coefficients)
    if quantile is not None:
        scale = float(np.quantile(np.maximum(mse, _FLOOR) / predicted, 1 - quantile))
    else:
        scale = float(mse.sum() / predicted.sum()) if predicted.sum() > 0 else 1.0
    return LossModel(tuple(float(c) for c in coefficients), scale)


def _run(rung: str, engines: dict[str, Engine], tiles: npt.NDArray[np.uint8],
         scale: int) -> npt.NDArray[np.float32]:
    """One rung on N x w x w x 3 uint8 tiles: N x 3 x sw x sw float32."""
    if rung == INTERPOLATION:
        return interpolate_tiles(tiles, scale)
    planes = tiles.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
    return np.concatenate([engines[rung].infer(np.ascontiguousarray(planes[i:i + _BATCH]))
                           for i in range(0, len(planes), _BATCH)])


def _costs_ms(rungs: Sequence[str], engines: dict[str, Engine],
              tiles: npt.NDArray[np.uint8], scale: int, rounds: int = 7) -> dict[str, float]:
    """ms per tile of each rung: the fastest of ``rounds`` batches after a warm-up, the rungs
    taking turns within each round so that a busy machine slows them alike."""
    runs: dict[str, list[float]] = {rung: [] for rung in rungs}
    for round_ in range(rounds + 1):
        for rung in rungs:
            start = time.perf_counter()
            _run(rung, engines, tiles, scale)
            if round_:  # round 0 is the warm-up
                runs[rung].append(time.perf_counter() - start)
    return {rung: min(times) * 1000 / len(tiles) for rung, times in runs.items()}


def measure_ladder(root: Path, manifest: Manifest, images: Sequence[npt.NDArray[np.uint8]], *,
                   progress: Progress = lambda _: None) -> tuple[RungLadder, str]:
    """The rung ladder of the bundle being built in ``root`` (module docstring) and a summary."""
    scale, tile = manifest.model.scale, manifest.tile
    order = engine_order(manifest)
    top = order[-1]
    low, high = windows(images, scale, tile)
    margin = manifest.overlap // 2 * scale
    progress(f"measuring the rung ladder on {len(low)} calibration windows of {low.shape[1]} px")
    bundle = Bundle(root, manifest)  # being built: the manifest is not written yet
    # the calibration windows may be smaller than the tile: any input size
    engines = {name: bundle.engine(name, static=False) for name in order}
    for engine in engines.values():
        engine.activate()
    try:
        outputs = {name: _uint8(_run(name, engines, low, scale))
                   for name in (INTERPOLATION, *order)}
        timing = np.stack([w if w.shape[0] == tile else
                           imresize_bicubic(w, tile / w.shape[0], output_shape=(tile, tile))
                           for w in low[np.arange(_BATCH) % len(low)]])
        costs = _costs_ms((INTERPOLATION, *order), engines, timing, scale)
    finally:
        for engine in engines.values():
            engine.deactivate()
    _, features = tile_features(low)
    top_error = _window_mse(outputs[top], high, margin)
    rungs, lines = [], []
    for name in sorted((INTERPOLATION, *order[:-1]), key=lambda n: costs[n]) + [top]:
        if name == top:
            rungs.append(Rung(name, name, costs[name]))
            lines.append(f"{name}: {costs[name]:.2f} ms/tile (top rung)")
            continue
        deviation = _window_mse(outputs[name], outputs[top], margin)
        error = _window_mse(outputs[name], high, margin)
        excess = float(max((error - top_error).sum() / max(deviation.sum(), 1e-12), 1.0))
        model = fit_loss_model(features, deviation)
        rungs.append(Rung(name, None if name == INTERPOLATION else name, costs[name], model,
                          excess))
        lines.append(f"{name}: {costs[name]:.2f} ms/tile, MSE vs {top} {deviation.mean():.3f} "
                     f"(excess x{excess:.2f} vs the images), Spearman of the fit "
                     f"{spearman(model.predict(features), deviation):.2f}")
    reference = fit_loss_model(features, top_error, quantile=REFERENCE_QUANTILE)
    ladder = RungLadder(rungs=tuple(rungs), reference_error=reference,
                        default_target_db=DEFAULT_TARGET_DB, tile=tile)
    return ladder, "; ".join(lines)


def spearman(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Spearman rank correlation (average ranks for ties); nan for fewer than 2 values."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.size < 2:
        return float("nan")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = float(np.sqrt((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


def _ranks(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """0-based ranks, tied values sharing their mean rank."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    mean_ranks: npt.NDArray[np.float64] = ((ends - counts) + (ends - 1)) / 2.0
    return mean_ranks[inverse]
