"""Dispatch policies: parsing, engine order, hysteresis, budget assignment, profile latencies."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import BundleError, ConfigError
from runtime.policies import (
    BudgetPolicy,
    FixedPolicy,
    LatencyTable,
    ThresholdPolicy,
    budget_assignment,
    budget_keys,
    engine_order,
    hysteresis_offsets,
    load_latencies,
    parse_policy,
    policy_engines,
)
from runtime.statistic import image_offsets
from tests.runtime.conftest import make_manifest

LADDER = {"lo": ((-1,), 4.0), "mid": ((0,), 6.0), "hi": ((1,), 8.0), "ref": ((), 32.0)}


@pytest.mark.parametrize(("text", "policy"), [
    ("threshold", ThresholdPolicy()),
    (" threshold ", ThresholdPolicy()),
    ("fixed:a6", FixedPolicy("a6")),
    ("budget:33.5", BudgetPolicy(33.5)),
    ("budget:40", BudgetPolicy(40.0)),
])
def test_parse_policy(text: str, policy: object) -> None:
    assert parse_policy(text) == policy
    assert parse_policy(str(policy)) == policy  # str() gives the CLI spelling back


@pytest.mark.parametrize(("text", "message"), [
    ("", "unknown policy ''; allowed forms: quality[:DB]"),
    ("thresh", "unknown policy 'thresh'; allowed forms"),
    ("threshold:3", "unknown policy 'threshold:3'"),
    ("fixed", "unknown policy 'fixed'"),
    ("fixed:", "policy fixed needs an engine name"),
    ("budget:fast", "policy 'budget:fast': budget 'fast' is not a number of ms; allowed forms"),
    ("budget:-1", "budget must be a finite number of ms > 0, got -1.0"),
    ("budget:0", "budget must be a finite number of ms > 0, got 0.0"),
    ("budget:nan", "budget must be a finite number of ms > 0, got nan"),
])
def test_parse_policy_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        parse_policy(text)


def test_engine_order_is_fab_ascending_with_the_reference_last() -> None:
    manifest = make_manifest({"b": ((0,), 6.0), "a": ((-1,), 4.0), "wide": ((), 32.0),
                              "c": ((1,), 5.0), "ref": ((), 16.0)})
    assert engine_order(manifest) == ("a", "c", "b", "wide", "ref")


def test_policy_engines() -> None:
    manifest = make_manifest(LADDER)
    assert policy_engines(ThresholdPolicy(), manifest) == ("lo", "mid", "hi")
    assert policy_engines(FixedPolicy("ref"), manifest) == ("ref",)
    assert policy_engines(BudgetPolicy(5.0), manifest) == ("lo", "mid", "hi", "ref")
    assert policy_engines(ThresholdPolicy(), make_manifest()) == ("a4", "a6")  # a6 serves 0, +1
    with pytest.raises(ConfigError, match=r"^policy fixed:hii: unknown engine 'hii' \(did you "
                                          r"mean 'hi'\?\); allowed: hi, lo, mid, ref$"):
        policy_engines(FixedPolicy("hii"), manifest)


def test_hysteresis_without_state_or_margin_is_plain_thresholds() -> None:
    g = np.array([0.0, 9.99, 10.0, 25.0, 40.0, 40.01, 300.0])
    plain = image_offsets(g, 10.0, 40.0)
    assert plain.tolist() == [-1, -1, 0, 0, 0, 1, 1]
    assert hysteresis_offsets(g, (10.0, 40.0), None, 0.1).tolist() == plain.tolist()
    previous = np.array([1, 1, -1, 1, -1, -1, -1], dtype=np.int8)
    assert hysteresis_offsets(g, (10.0, 40.0), previous, 0.0).tolist() == plain.tolist()


@pytest.mark.parametrize(("previous", "g", "expected"), [
    # thresholds 10 / 40, margin 0.1: leaving -1 needs g >= 11 (0) or g > 44 (+1) ...
    (-1, 10.5, -1), (-1, 11.0, 0), (-1, 43.9, 0), (-1, 44.5, 1),
    # ... leaving 0 needs g < 9 or g > 44 ...
    (0, 9.5, 0), (0, 8.9, -1), (0, 43.9, 0), (0, 44.1, 1),
    # ... leaving +1 needs g <= 36 (0) or g < 9 (-1)
    (1, 37.0, 1), (1, 36.0, 0), (1, 9.5, 0), (1, 8.5, -1),
])
def test_hysteresis_margins(previous: int, g: float, expected: int) -> None:
    state = np.array([previous], dtype=np.int8)
    assert hysteresis_offsets(np.array([g]), (10.0, 40.0), state, 0.1).tolist() == [expected]


def test_budget_keys_favour_previous_upgrades_by_the_margin() -> None:
    g = np.array([10.0, 10.0, 10.0])
    rungs = np.array([0, 1, 2], dtype=np.intp)
    np.testing.assert_allclose(budget_keys(g, rungs, 0.1), [10.0, 11.0, 12.1])
    assert budget_keys(g, None, 0.1) is g


LATENCIES = LatencyTable({"lo": 1.0, "mid": 2.0, "hi": 3.0, "ref": 4.0})
ORDER = ("lo", "mid", "hi", "ref")


@pytest.mark.parametrize(("budget", "expected"), [
    (3.0, ["lo", "lo", "lo", "lo"]),  # even all-cheapest (4 ms) misses: all cheapest
    (4.0, ["lo", "lo", "lo", "lo"]),
    (5.9, ["lo", "mid", "lo", "lo"]),  # one upgrade: the most complex tile (g = 80 at index 1)
    (6.0, ["lo", "mid", "lo", "mid"]),  # ties (g = 80) in row-major order
    (8.0, ["mid", "mid", "mid", "mid"]),
    (10.0, ["mid", "hi", "mid", "hi"]),
    (13.0, ["hi", "ref", "hi", "hi"]),
    (100.0, ["ref", "ref", "ref", "ref"]),
])
def test_budget_assignment(budget: float, expected: list[str]) -> None:
    g = np.array([5.0, 80.0, 20.0, 80.0])
    assignment = budget_assignment(g, LATENCIES, ORDER, budget)
    assert assignment == expected
    assert LATENCIES.frame_ms(assignment) <= max(budget, 4.0)  # 4 ms: all on the cheapest


def test_budget_assignment_properties_on_random_frames() -> None:
    rng = np.random.default_rng(0)
    rank = {name: i for i, name in enumerate(ORDER)}
    for _ in range(50):
        g = rng.random(int(rng.integers(1, 40))) * 100
        budget = float(rng.random() * 5 * g.size)
        assignment = budget_assignment(g, LATENCIES, ORDER, budget)
        frame = LATENCIES.frame_ms(assignment)
        assert frame <= max(budget, g.size * 1.0) + 1e-9
        # no upgrade of one more tile would still fit (a rung costs 1 ms here)
        assert budget - frame < 1.0 or all(name == "ref" for name in assignment)
        rungs = np.array([rank[name] for name in assignment])
        by_g = rungs[np.argsort(-g, kind="stable")]
        assert (np.diff(by_g) <= 0).all()  # more complex never on a lower rung


def test_budget_assignment_needs_latencies_for_every_engine() -> None:
    with pytest.raises(BundleError, match="no latency for engines hi, ref"):
        budget_assignment([1.0], LatencyTable({"lo": 1.0, "mid": 2.0}), ORDER, 10.0)


def _profile(*entries: tuple[str, int, int, int, float]) -> dict[str, object]:
    return {"schema": "adasr.profile/1", "adaptive": {}, "engines": [
        {"name": name, "tile": tile, "batch": batch, "threads": threads,
         "latency_ms": {"median": median, "p10": median * 0.9, "p90": median * 1.1}}
        for name, tile, batch, threads, median in entries]}


def test_latency_table_from_profile_prefers_the_largest_batch_at_the_tile() -> None:
    data = _profile(("lo", 16, 1, 1, 2.0), ("lo", 16, 4, 1, 4.0), ("lo", 32, 8, 1, 1.0),
                    ("mid", 16, 4, 2, 6.0), ("mid", 16, 4, 1, 8.0), ("mid", 16, 2, 1, 1.0))
    table = LatencyTable.from_profile(data, 16)
    assert dict(table.per_tile_ms) == {"lo": 1.0, "mid": 1.5}  # mid: fastest of the batch-4 runs
    table = LatencyTable.from_profile(data, 16, threads=1)
    assert dict(table.per_tile_ms) == {"lo": 1.0, "mid": 2.0}
    assert dict(LatencyTable.from_profile(data, 32).per_tile_ms) == {"lo": 0.125}


@pytest.mark.parametrize(("data", "message"), [
    (_profile(("lo", 16, 1, 1, 2.0), ("lo", 32, 1, 1, 2.0)),
     r"no latency for tile 24 \(it measured tiles \[16, 32\]\): run `adasr profile BUNDLE "
     r"--tiles 24`"),
    ({"schema": "adasr.profile/0", "engines": []}, "profile schema 'adasr.profile/0' is not"),
    ({"schema": "adasr.profile/1", "engines": [{"name": "lo", "tile": 24}]},
     r"^profile field engines\[0\]\.batch: missing$"),
    (_profile(("lo", 24, 0, 1, 2.0)),
     r"^profile field engines\[0\]\.batch: expected an integer in 1\.\.65536, got 0$"),
])
def test_latency_table_errors(data: dict[str, object], message: str) -> None:
    with pytest.raises(BundleError, match=message):
        LatencyTable.from_profile(data, 24)


def test_load_latencies(tmp_path: Path) -> None:
    manifest = make_manifest(LADDER, tile=16, profile="profile.json")
    with pytest.raises(BundleError, match="^the profile .*profile.json named by the manifest is "
                                          "missing"):
        load_latencies(tmp_path, manifest)
    entries = [(name, 16, 8, 1, 8.0 * (i + 1)) for i, name in enumerate(ORDER)]
    (tmp_path / "profile.json").write_text(json.dumps(_profile(*entries)))
    assert dict(load_latencies(tmp_path, manifest).per_tile_ms) == {
        "lo": 1.0, "mid": 2.0, "hi": 3.0, "ref": 4.0}
    (tmp_path / "profile.json").write_text(json.dumps(_profile(*entries[:2])))
    with pytest.raises(BundleError, match="no latency for engines hi, ref"):
        load_latencies(tmp_path, manifest)
    (tmp_path / "profile.json").write_text("{not json")
    with pytest.raises(BundleError, match="^cannot read the profile"):
        load_latencies(tmp_path, manifest)


def test_load_latencies_without_a_profile() -> None:
    with pytest.raises(BundleError, match=r"^budget policy needs a profile: run `adasr profile "
                                          r"BUNDLE` first$"):
        load_latencies(Path("."), make_manifest(LADDER))


def test_latency_table_rejects_negative_values() -> None:
    with pytest.raises(ConfigError, match="latencies must be finite ms >= 0"):
        LatencyTable({"lo": -1.0})
