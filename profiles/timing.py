"""Timing and memory primitives: timed runs after warm-up, percentile summaries, peak RSS.

A :data:`Timer` runs a callable once and returns its duration in ms. :func:`wall_clock`
(``time.perf_counter``) is the CPU timer; TensorRT bundles use CUDA events
(:func:`profiles.tensorrt.cuda_event_timer`). Percentiles are numpy's (linear interpolation).

Peak memory is the process's peak resident set (``VmHWM``). On Linux it is reset before each
measurement by writing ``5`` to ``/proc/self/clear_refs``, so it is the peak *during* that
measurement; elsewhere it falls back to ``ru_maxrss``, the peak since the process started
(:attr:`PeakMemory.scope` says which).
"""

from __future__ import annotations

import math
import re
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from profiles.schema import Latency
from runtime.errors import ConfigError

__all__ = ["PeakMemory", "Timer", "latency_stats", "spread", "time_runs", "wall_clock"]

Timer = Callable[[Callable[[], object]], float]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_HWM = re.compile(r"^VmHWM:\s+(\d+)\s+kB", re.MULTILINE)


def wall_clock(run: Callable[[], object]) -> float:
    """Run once; wall-clock ms (``time.perf_counter``)."""
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1000.0


def time_runs(run: Callable[[], object], *, warmup: int, runs: int,
              timer: Timer = wall_clock) -> list[float]:
    """``warmup`` untimed calls, then ``runs`` timed ones: the ms of each timed call."""
    if warmup < 0 or runs < 1:
        raise ConfigError(f"need warmup >= 0 and runs >= 1, got warmup={warmup}, runs={runs}")
    for _ in range(warmup):
        run()
    return [timer(run) for _ in range(runs)]


def latency_stats(samples_ms: Sequence[float]) -> Latency:
    """Median, p10, p90 and mean of timed samples (ms)."""
    if not samples_ms:
        raise ConfigError("no timed samples to summarise")
    values = np.asarray(samples_ms, dtype=np.float64)
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ConfigError(f"timed samples must be finite and >= 0, got {list(samples_ms)}")
    p10, median, p90 = (float(v) for v in np.percentile(values, [10, 50, 90]))
    return Latency(median=median, p10=p10, p90=p90, mean=float(values.mean()), runs=values.size)


def spread(medians: Sequence[float]) -> float:
    """Relative spread ``max / min - 1`` of repeated medians (0 for one; inf if a median is 0)."""
    if not medians:
        raise ConfigError("no medians to compare")
    low, high = min(medians), max(medians)
    if high == low:
        return 0.0
    return high / low - 1.0 if low > 0 else math.inf


class PeakMemory:
    """Peak resident memory of this process in MiB, reset per measurement where possible."""

    def __init__(self) -> None:
        self.resettable = sys.platform.startswith("linux") and _read_hwm_kb() is not None
        self.scope = ("VmHWM reset before each measurement (peak during it)" if self.resettable
                      else "ru_maxrss (peak since the process started)")

    def reset(self) -> None:
        if not self.resettable:
            return
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            self.resettable = False
            self.scope = "VmHWM (peak since the process started: clear_refs is not writable)"

    def peak_mb(self) -> float:
        kb = _read_hwm_kb()
        if kb is None:
            usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            kb = usage // 1024 if sys.platform == "darwin" else usage  # bytes on macOS
        return kb / 1024.0


def _read_hwm_kb() -> int | None:
    try:
        match = _HWM.search(_STATUS.read_text())
    except OSError:
        return None
    return int(match.group(1)) if match else None
