"""Quality and frame time of one dispatcher on the benchmark frames.

The same function measures a static engine (a dispatcher with policy ``fixed:NAME``) and the
adaptive dispatcher (policy ``threshold``), on the same frames, so their points share one unit
(:data:`profiles.schema.PARETO_UNIT`). One warm-up frame, then each image is upscaled
``repeats`` times; the first result is scored (the dispatcher is deterministic) with
:func:`runtime.benchmark.evaluate` (Y-channel PSNR / SSIM, ``scale`` border pixels cropped).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from profiles.schema import FrameQuality, ImageResult
from profiles.timing import PeakMemory, latency_stats
from runtime.benchmark import BenchmarkImage, evaluate
from runtime.dispatch import Dispatcher, FrameResult
from runtime.errors import ConfigError
from runtime.manifest import Manifest

__all__ = ["measure_frames"]


def _frame_bitops(result: FrameResult, tile_bitops: Mapping[str, float | None]) -> float | None:
    per_tile = [tile_bitops.get(name) for name in result.engines]
    return None if any(v is None for v in per_tile) else float(sum(v or 0.0 for v in per_tile))


def measure_frames(name: str, policy: str, dispatcher: Dispatcher, manifest: Manifest,
                   images: Sequence[BenchmarkImage], *, repeats: int, threads: int,
                   tile_bitops: Mapping[str, float | None],
                   memory: PeakMemory) -> FrameQuality:
    """PSNR / SSIM / FAB / BitOPs and per-frame latency of ``dispatcher`` on ``images``."""
    if repeats < 1 or not images:
        raise ConfigError(f"need repeats >= 1 and at least one image, got repeats={repeats}, "
                          f"{len(images)} images")
    times: list[list[float]] = []
    firsts: list[FrameResult] = []
    overheads: list[float] = []
    infers: list[float] = []

    def upscale(lr: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        runs: list[float] = []
        for _ in range(repeats):
            start = time.perf_counter()
            result = dispatcher.upscale(lr)
            runs.append((time.perf_counter() - start) * 1000.0)
            if "infer" in result.seconds:
                infers.append(result.seconds["infer"] * 1e3)
                overheads.append(sum(result.seconds.values()) * 1e3 - infers[-1])
            if len(runs) == 1:
                firsts.append(result)
        times.append(runs)
        return firsts[-1].sr

    memory.reset()
    with dispatcher:
        dispatcher.upscale(images[0].lr)  # warm-up: first-call allocations, plan caches
        scores = evaluate(upscale, images, manifest.model.scale)
    peak = memory.peak_mb()
    samples = [ms for runs in times for ms in runs]
    per_image = [float(np.median(runs)) for runs in times]
    stats = replace(latency_stats(samples), mean=float(np.mean(per_image)))  # the Pareto unit
    out_mpix = sum(image.hr.shape[0] * image.hr.shape[1] for image in images) * repeats / 1e6
    histogram: Counter[str] = Counter()
    for result in firsts:
        histogram.update(result.engines)
    bitops = [_frame_bitops(result, tile_bitops) for result in firsts]
    return FrameQuality(
        name=name, policy=policy, mode=dispatcher.mode, tile=manifest.tile,
        batch=dispatcher.batch, threads=threads, latency_ms=stats,
        throughput_mpix_s=out_mpix / (sum(samples) / 1000.0),
        ms_per_mpix=sum(samples) / out_mpix,
        overhead_ms=float(np.mean(overheads)) if overheads else None,
        infer_ms=float(np.mean(infers)) if infers else None, peak_rss_mb=peak,
        psnr=scores.psnr, ssim=scores.ssim,
        fab=float(np.mean([result.fab(manifest) for result in firsts])),
        bitops=None if any(b is None for b in bitops) else float(np.mean(
            [b or 0.0 for b in bitops])),
        histogram=dict(histogram),
        images=tuple(ImageResult(score.name, score.psnr, score.ssim, ms)
                     for score, ms in zip(scores.images, per_image, strict=True)))
