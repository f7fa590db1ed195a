"""Profiling primitives: timing statistics, peak memory, options, the Pareto front and verdict."""

from __future__ import annotations

import math
import mmap

import pytest

from profiles.pareto import (
    Evidence,
    Point,
    assess_adaptive,
    dominates,
    front_psnr_at,
    pareto_front,
)
from profiles.profiler import MIN_RUNS, ProfileOptions
from profiles.schema import profile_from_json
from profiles.timing import PeakMemory, latency_stats, spread, time_runs
from runtime.errors import BundleError, ConfigError


def test_latency_stats_are_numpy_percentiles() -> None:
    stats = latency_stats([float(v) for v in range(1, 11)])
    assert (stats.median, stats.p10, stats.p90, stats.mean, stats.runs) == pytest.approx(
        (5.5, 1.9, 9.1, 5.5, 10))
    assert stats.p10 <= stats.median <= stats.p90
    with pytest.raises(ConfigError, match="no timed samples"):
        latency_stats([])
    with pytest.raises(ConfigError, match="finite"):
        latency_stats([1.0, math.nan])


def test_spread_of_repeated_medians() -> None:
    assert spread([10.0]) == 0.0
    assert spread([10.0, 11.0, 10.5]) == pytest.approx(0.1)
    assert spread([0.0, 1.0]) == math.inf


def test_time_runs_warms_up_then_times_each_run() -> None:
    calls: list[int] = []
    ticks = iter(range(100))

    def timer(run: object) -> float:
        assert callable(run)
        run()
        return float(next(ticks))

    samples = time_runs(lambda: calls.append(1), warmup=3, runs=5, timer=timer)
    assert samples == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert len(calls) == 8
    with pytest.raises(ConfigError, match="runs >= 1"):
        time_runs(lambda: None, warmup=0, runs=0)


def test_peak_memory_is_reset_per_measurement() -> None:
    memory = PeakMemory()
    if not memory.resettable:
        pytest.skip(f"peak memory cannot be reset here: {memory.scope}")
    memory.reset()
    base = memory.peak_mb()
    # 64 MiB, touched, in a mapping of its own: a numpy array of this size may come from heap
    # pages that earlier tests left resident, and then the peak does not move (flaky in a run)
    block = mmap.mmap(-1, 64 * 2**20)
    block.write(b"\1" * len(block))
    grown = memory.peak_mb()
    block.close()
    memory.reset()
    assert grown - base >= 60
    assert memory.peak_mb() < grown - 30


def test_options_need_twenty_runs_unless_quick() -> None:
    assert ProfileOptions().runs == MIN_RUNS == 20
    with pytest.raises(ConfigError, match=r"runs must be >= 20.*--quick"):
        ProfileOptions(runs=5)
    assert ProfileOptions(runs=5, quick=True).runs == 5
    with pytest.raises(ConfigError, match="batch sizes must be integers >= 1"):
        ProfileOptions(batches=(0,))
    with pytest.raises(ConfigError, match="must not repeat"):
        ProfileOptions(tiles=(64, 64))
    with pytest.raises(ConfigError, match="repeat must be >= 1"):
        ProfileOptions(repeat=0)


def test_profile_reader_names_the_problem() -> None:
    with pytest.raises(BundleError, match="schema 'adasr.profile/0' is not supported"):
        profile_from_json({"schema": "adasr.profile/0"})
    with pytest.raises(BundleError, match="^profile field settings: missing$"):
        profile_from_json({"schema": "adasr.profile/1"})


POINTS = [Point("fp32", 10.0, 30.0), Point("a8", 6.0, 29.5), Point("a6", 4.0, 28.0),
          Point("slow-bad", 8.0, 28.5), Point("a4", 3.0, 27.0)]


def test_pareto_front_on_hand_made_points() -> None:
    assert dominates(Point("x", 1, 2), Point("y", 2, 1))
    assert not dominates(Point("x", 1, 2), Point("y", 1, 2))  # equal: no one dominates
    front = pareto_front(POINTS)
    assert [p.name for p in front] == ["a4", "a6", "a8", "fp32"]  # slow-bad: a8 dominates it
    assert front_psnr_at(front, 5.0) == 28.0
    assert front_psnr_at(front, 10.0) == 30.0
    assert front_psnr_at(front, 2.0) is None


def test_adaptive_above_the_front() -> None:
    verdict = assess_adaptive(POINTS, Point("adaptive", 5.0, 29.0),
                              Evidence(histogram={"a6": 3, "a8": 1}, overhead_ms=0.5))
    assert verdict.adaptive_on_front and verdict.dominated_by == ()
    assert verdict.margin_db == pytest.approx(1.0)  # a6: 28.0 dB is the best within 5 ms
    assert verdict.front == ("a4", "a6", "a8", "fp32")
    assert "+1.000 dB" in verdict.explanation


def test_adaptive_below_the_front_says_why() -> None:
    evidence = Evidence(histogram={"a6": 1, "a8": 3}, overhead_ms=0.8, infer_ms=5.7,
                        expected_infer_ms=5.0, tile_ms={"a6": 1.0, "a8": 1.05, "fp32": 2.0})
    verdict = assess_adaptive(POINTS, Point("adaptive", 6.5, 29.0), evidence)
    assert not verdict.adaptive_on_front
    assert verdict.dominated_by == ("a8",)
    assert verdict.margin_db == pytest.approx(-0.5)
    text = verdict.explanation
    assert "BELOW the front" in text and "a8: 29.500 dB at 6.000 ms/frame" in text
    assert "a6 25%, a8 75%" in text
    assert "0.800 ms/frame (12% of its time)" in text
    assert "overhead alone exceeds its 0.500 ms gap to a8" in text
    assert "took 5.700 ms/frame where the same tiles on each engine alone take 5.000" in text
    assert "+14%" in text
    assert "about the speed of a8 per tile (a6 1.000, a8 1.050 ms)" in text
    assert "a8 alone is 0.500 dB better" in text


def test_below_the_front_without_switching_cost_or_equal_speeds() -> None:
    evidence = Evidence(histogram={"a4": 2}, overhead_ms=0.1, infer_ms=5.0,
                        expected_infer_ms=5.0, tile_ms={"a4": 1.0, "a6": 2.0})
    verdict = assess_adaptive(POINTS, Point("adaptive", 4.5, 27.5), evidence)
    assert verdict.dominated_by == ("a6",)
    assert "switching" not in verdict.explanation and "about the speed" not in verdict.explanation


def test_adaptive_faster_than_every_engine() -> None:
    verdict = assess_adaptive(POINTS, Point("adaptive", 1.0, 20.0))
    assert verdict.adaptive_on_front and verdict.margin_db is None
    assert "faster than every static engine" in verdict.explanation
