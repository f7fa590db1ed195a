"""The PSNR-vs-latency Pareto front of the static engines, and the adaptive point against it.

A point dominates another when it is at least as fast *and* at least as good, and strictly better
in one of the two. The front is the set of non-dominated static engines, fastest first; as a
function of latency it is a staircase: the best PSNR reachable within a latency ``L`` is that of
the best front engine no slower than ``L`` (a mix of engines is not assumed to interpolate).
The adaptive dispatcher is *at or above the front* when no static engine dominates it; the
verdict then gives its margin over the staircase, and otherwise says which engines beat it, by
how much, and what the measurements (:class:`Evidence`) show about why: the tile mix, the
dispatch overhead, engine time above what the same tiles cost on each engine alone (switching
cost), engines of about the same speed (nothing to gain), a quality loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from profiles.schema import PARETO_UNIT, ParetoVerdict

__all__ = ["SAME_SPEED", "Evidence", "Point", "assess_adaptive", "dominates", "front_psnr_at",
           "pareto_front"]

SAME_SPEED = 0.10  # engines within 10% of each other per tile: "about the same speed"


@dataclass(frozen=True)
class Point:
    name: str
    latency: float  # ms per frame (PARETO_UNIT)
    psnr: float


def dominates(a: Point, b: Point) -> bool:
    """``a`` is at least as fast and as good as ``b``, and strictly better in one."""
    return (a.latency <= b.latency and a.psnr >= b.psnr
            and (a.latency < b.latency or a.psnr > b.psnr))


def pareto_front(points: Sequence[Point]) -> tuple[Point, ...]:
    """The non-dominated points, fastest first (ties in both: all kept)."""
    front = [p for p in points if not any(dominates(q, p) for q in points)]
    return tuple(sorted(front, key=lambda p: (p.latency, -p.psnr, p.name)))


def front_psnr_at(front: Sequence[Point], latency: float) -> float | None:
    """The best PSNR of ``front`` within ``latency`` (None when every point is slower)."""
    within = [p.psnr for p in front if p.latency <= latency]
    return max(within) if within else None


@dataclass(frozen=True)
class Evidence:
    """Measurements of the adaptive run that explain a verdict (ms per frame unless noted)."""

    histogram: Mapping[str, int] = field(default_factory=dict)  # tiles per engine
    overhead_ms: float | None = None  # dispatcher stages other than inference
    infer_ms: float | None = None  # inside the engines
    expected_infer_ms: float | None = None  # the same tiles at each engine's own time per tile
    tile_ms: Mapping[str, float] = field(default_factory=dict)  # engine -> ms per tile, alone


def _reasons(adaptive: Point, rival: Point, evidence: Evidence) -> list[str]:
    """Measured facts that explain why ``rival`` dominates ``adaptive``."""
    histogram = evidence.histogram
    total = sum(histogram.values())
    mix = ", ".join(f"{name} {count / total:.0%}" for name, count in histogram.items()
                    if count) if total else "no tiles"
    reasons = [f"its tiles ran on {mix}"]
    overhead = evidence.overhead_ms
    if overhead is not None:
        share = overhead / adaptive.latency if adaptive.latency > 0 else 0.0
        reasons.append(f"dispatch overhead (tiling, statistic, grouping, stitching) is "
                       f"{overhead:.3f} ms/frame ({share:.0%} of its time)")
        gap = adaptive.latency - rival.latency
        if 0 < gap <= overhead:
            reasons.append(f"that overhead alone exceeds its {gap:.3f} ms gap to {rival.name}")
    infer, expected = evidence.infer_ms, evidence.expected_infer_ms
    if infer is not None and expected and infer > expected * (1 + SAME_SPEED):
        reasons.append(f"its engines took {infer:.3f} ms/frame where the same tiles on each "
                       f"engine alone take {expected:.3f} ms/frame ({infer / expected - 1:+.0%}): "
                       "switching engines within a frame costs time (smaller batches per "
                       "engine; on ONNX Runtime one spinning thread pool per engine session "
                       "competing for the cores)")
    speeds = {name: evidence.tile_ms[name] for name in [*histogram, rival.name]
              if name in evidence.tile_ms and (histogram.get(name) or name == rival.name)}
    if len(speeds) > 1 and min(speeds.values()) > 0 and (
            max(speeds.values()) / min(speeds.values()) <= 1 + SAME_SPEED):
        listed = ", ".join(f"{name} {ms:.3f}" for name, ms in speeds.items())
        reasons.append(f"the engines it picks run at about the speed of {rival.name} per tile "
                       f"({listed} ms): on this device a cheaper grid saves little time, so "
                       "mixing them can at best match the front")
    if adaptive.psnr <= rival.psnr:
        reasons.append(f"{rival.name} alone is {rival.psnr - adaptive.psnr:.3f} dB better: the "
                       "calibrated thresholds send tiles to engines of lower quality here, with "
                       "no latency gain to show for it")
    return reasons


def assess_adaptive(engines: Sequence[Point], adaptive: Point,
                    evidence: Evidence | None = None) -> ParetoVerdict:
    """Where ``adaptive`` lies against the front of ``engines`` (see the module doc)."""
    front = pareto_front(engines)
    beaten_by = sorted((p for p in engines if dominates(p, adaptive)),
                       key=lambda p: (p.latency, -p.psnr))
    best = front_psnr_at(front, adaptive.latency)
    margin = None if best is None else adaptive.psnr - best
    where = f"adaptive: {adaptive.psnr:.3f} dB at {adaptive.latency:.3f} ms/frame"
    if not beaten_by:
        if margin is None:
            text = f"{where}, faster than every static engine: on the front"
        else:
            text = (f"{where}: on or above the front, {margin:+.3f} dB against the best static "
                    "engine no slower than it")
        return ParetoVerdict(PARETO_UNIT, tuple(p.name for p in front), True, (), margin, text)
    rival = beaten_by[0]
    reasons = _reasons(adaptive, rival, evidence or Evidence())
    text = (f"{where} is BELOW the front of its static engines: "
            f"{', '.join(p.name for p in beaten_by)} dominate it ({rival.name}: "
            f"{rival.psnr:.3f} dB at {rival.latency:.3f} ms/frame). Why: " + "; ".join(reasons))
    return ParetoVerdict(PARETO_UNIT, tuple(p.name for p in front), False,
                         tuple(p.name for p in beaten_by), margin, text)
