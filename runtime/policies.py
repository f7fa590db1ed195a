"""Dispatch policies: which engine runs each tile (or frame).

Four policies, each a small frozen dataclass; :func:`parse_policy` reads the CLI spelling:

* ``quality:DB`` (``quality``: the bundle's default target) -- lose at most ``DB`` dB of PSNR
  against the top rung per frame, predicted by the ladder's loss models (:mod:`runtime.rungs`),
  with the cheapest rungs: :func:`allocate_rungs` over all tiles of the frame.
* ``budget:MS`` -- the same allocation under a predicted latency of ``MS`` per frame (rung costs
  from the ladder, or the profile); bundles without a ladder rank tiles by ``g`` instead
  (:func:`budget_assignment`).

* ``threshold`` -- the calibrated bit mapping: the tile's image offset
  ``image_offsets(g, *manifest.thresholds)`` selects ``manifest.engine_for_offset(offset)``.
* ``fixed:NAME`` -- every tile on engine ``NAME``.

Temporal hysteresis (video) lives here too, so that it is testable without engines:
:func:`hysteresis_offsets` keeps a tile's previous offset unless its ``g`` crosses the threshold
it must cross by a relative margin, and :func:`budget_keys` biases the budget ranking the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from runtime.bundlepaths import bundle_path
from runtime.errors import BundleError, ConfigError, unknown_name
from runtime.fields import Field, root_field
from runtime.fileio import read_bundle_json
from runtime.manifest import OFFSETS, Manifest
from runtime.statistic import image_offsets

__all__ = [
    "PROFILE_SCHEMA",
    "BudgetPolicy",
    "QualityPolicy",
    "allocate_rungs",
    "sticky_choices",
    "FixedPolicy",
    "LatencyTable",
    "bundle_policy",
    "Policy",
    "ThresholdPolicy",
    "budget_assignment",
    "budget_keys",
    "budget_rungs",
    "engine_order",
    "hysteresis_offsets",
    "load_latencies",
    "parse_policy",
    "policy_engines",
    "rung_order",
]

PROFILE_SCHEMA = "adasr.profile/1"
POLICY_FORMS = ("quality[:DB] (dB of PSNR lost against the top rung, >= 0), threshold, "
                "fixed:NAME (an engine or rung of the bundle), budget:MS (ms per frame, > 0)")


@dataclass(frozen=True)
class ThresholdPolicy:
    """The calibrated thresholds: offset = image_offsets(g, *thresholds) -> engine_for_offset."""

    def __str__(self) -> str:
        return "threshold"


@dataclass(frozen=True)
class FixedPolicy:
    """Every tile / frame on one engine (checked against the manifest by the dispatcher)."""

    engine: str

    def __post_init__(self) -> None:
        if not self.engine:
            raise ConfigError(f"policy fixed needs an engine name, got {self.engine!r}; "
                              f"allowed forms: {POLICY_FORMS}")

    def __str__(self) -> str:
        return f"fixed:{self.engine}"


@dataclass(frozen=True)
class BudgetPolicy:
    """Meet a predicted latency of ``budget_ms`` per frame (see :func:`budget_assignment`)."""

    budget_ms: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.budget_ms) and self.budget_ms > 0):
            raise ConfigError(f"budget must be a finite number of ms > 0, got {self.budget_ms!r}")

    def __str__(self) -> str:
        return f"budget:{self.budget_ms:g}"


@dataclass(frozen=True)
class QualityPolicy:
    """Lose at most ``target_db`` (None: the bundle's default) dB against the top rung per frame."""

    target_db: float | None = None

    def __post_init__(self) -> None:
        if self.target_db is not None and not (math.isfinite(self.target_db)
                                               and self.target_db >= 0):
            raise ConfigError(f"quality target must be a finite number of dB >= 0, got "
                              f"{self.target_db!r}; allowed forms: {POLICY_FORMS}")

    def __str__(self) -> str:
        return "quality" if self.target_db is None else f"quality:{self.target_db:g}"


Policy = ThresholdPolicy | FixedPolicy | BudgetPolicy | QualityPolicy


def parse_policy(text: str) -> Policy:
    """Read ``"quality[:DB]"``, ``"threshold"``, ``"fixed:NAME"`` or ``"budget:MS"``."""
    kind, sep, value = text.strip().partition(":")
    if kind == "threshold" and not sep:
        return ThresholdPolicy()
    if kind == "quality":
        return QualityPolicy(_policy_number(text, value, "target", "dB")) if sep \
            else QualityPolicy()
    if kind == "fixed" and sep:
        return FixedPolicy(value.strip())
    if kind == "budget" and sep:
        return BudgetPolicy(_policy_number(text, value, "budget", "ms"))
    raise ConfigError(f"unknown policy {text!r}; allowed forms: {POLICY_FORMS}")


def _policy_number(text: str, value: str, what: str, unit: str) -> float:
    try:
        return float(value)
    except ValueError as err:
        raise ConfigError(f"policy {text!r}: {what} {value!r} is not a number of {unit}; "
                          f"allowed forms: {POLICY_FORMS}") from err


def engine_order(manifest: Manifest) -> tuple[str, ...]:
    """Engine names from cheapest to best quality: by FAB ascending (stable), reference last."""
    others = sorted((e for e in manifest.engines if not e.reference), key=lambda e: e.fab)
    return (*(e.name for e in others), manifest.reference.name)


def rung_order(manifest: Manifest) -> tuple[str, ...]:
    """Every name a tile can be dispatched to: the ladder's rungs (cheapest first), then the
    engines outside it (:func:`engine_order`)."""
    ladder = manifest.rungs.names
    return (*ladder, *(name for name in engine_order(manifest) if name not in ladder))


def policy_engines(policy: Policy, manifest: Manifest) -> tuple[str, ...]:
    """The engines or rungs ``policy`` can choose, cheapest first (ConfigError for an unknown
    fixed one; BundleError for a quality policy on a bundle without a rung ladder)."""
    order = engine_order(manifest)
    ladder = manifest.rungs.names
    if isinstance(policy, FixedPolicy):
        known = rung_order(manifest)
        if policy.engine not in known:
            what = "engine or rung" if ladder else "engine"
            raise ConfigError(f"policy {policy}: " + unknown_name(what, policy.engine, known))
        return (policy.engine,)
    if isinstance(policy, QualityPolicy):
        if not ladder:
            raise BundleError(f"policy {policy} needs the bundle's rung ladder (cost and loss "
                              "model per rung), which this bundle predates: rebuild it with "
                              "`adasr build`, or use --policy threshold")
        return ladder
    if isinstance(policy, BudgetPolicy):
        return ladder or order
    chosen = {manifest.engine_for_offset(offset).name for offset in OFFSETS}
    return tuple(name for name in order if name in chosen)


def hysteresis_offsets(g: npt.NDArray[np.float64], thresholds: tuple[float, float],
                       previous: npt.NDArray[np.int8] | None,
                       margin: float) -> npt.NDArray[np.int8]:
    """Image offsets of ``g`` (-1 / 0 / +1) that stick to ``previous`` within a relative margin.

    A tile moves out of its previous offset only when ``g`` is beyond the threshold it must cross
    by ``margin * |threshold|``: from -1 up it needs ``g >= lower + m`` (0) or ``g > upper + m``
    (+1); from +1 down ``g <= upper - m`` (0) or ``g < lower - m`` (-1); from 0 it needs
    ``g < lower - m`` or ``g > upper + m``. Without ``previous`` (first frame) or with
    ``margin == 0`` this is exactly :func:`runtime.statistic.image_offsets`.
    """
    lower, upper = thresholds
    if previous is None or margin == 0:
        return image_offsets(g, lower, upper)
    low_margin, high_margin = abs(lower) * margin, abs(upper) * margin
    low = np.where(previous < 0, lower + low_margin, lower - low_margin)
    high = np.where(previous > 0, upper - high_margin, upper + high_margin)
    offsets: npt.NDArray[np.int8] = (g > high).astype(np.int8) - (g < low).astype(np.int8)
    return offsets


def budget_keys(g: npt.NDArray[np.float64], previous_rungs: npt.NDArray[np.intp] | None,
                margin: float) -> npt.NDArray[np.float64]:
    """Ranking keys for :func:`budget_assignment` with hysteresis: ``g * (1 + margin) ** rung``.

    ``rung`` is the tile's rung in the previous frame (0 = cheapest), so a tile that was upgraded
    keeps its place unless another tile is more complex by more than the margin per rung.
    """
    if previous_rungs is None or margin == 0:
        return g
    keys: npt.NDArray[np.float64] = g * np.power(1.0 + margin, previous_rungs)
    return keys


@dataclass(frozen=True)
class LatencyTable:
    """Predicted ms per tile of each engine at the bundle's tile size."""

    per_tile_ms: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = {k: v for k, v in self.per_tile_ms.items() if not (math.isfinite(v) and v >= 0)}
        if bad:
            raise ConfigError(f"latencies must be finite ms >= 0, got {bad}")
        object.__setattr__(self, "per_tile_ms", MappingProxyType(dict(self.per_tile_ms)))

    def require(self, names: Sequence[str]) -> None:
        """BundleError naming the engines of ``names`` that have no latency."""
        missing = [name for name in names if name not in self.per_tile_ms]
        if missing:
            raise BundleError(f"the profile has no latency for engines {', '.join(missing)} "
                              f"(it has {', '.join(self.per_tile_ms) or 'none'}): run "
                              "`adasr profile BUNDLE` again")

    def frame_ms(self, engines: Sequence[str]) -> float:
        """Predicted time of a frame whose tiles run on ``engines`` (one name per tile)."""
        return float(sum(self.per_tile_ms[name] for name in engines))

    @classmethod
    def from_profile(cls, data: Mapping[str, Any], tile: int, *,
                     threads: int | None = None) -> LatencyTable:
        """Per-tile ms = ``latency_ms.median / batch`` of each engine's entry for ``tile``.

        Among an engine's entries with that tile, those measured with ``threads`` are preferred
        when there are any, then the largest batch, then the fastest median.
        """
        if not isinstance(data, Mapping) or data.get("schema") != PROFILE_SCHEMA:
            schema = data.get("schema") if isinstance(data, Mapping) else type(data).__name__
            raise BundleError(f"profile schema {schema!r} is not supported; this adasr reads "
                              f"{PROFILE_SCHEMA!r}: run `adasr profile BUNDLE` again")
        entries = [_entry(e) for e in root_field(data, "profile", BundleError)["engines"].items()]
        matching = [e for e in entries if e[1] == tile]
        if not matching:
            tiles = sorted({e[1] for e in entries})
            raise BundleError(f"the profile has no latency for tile {tile} (it measured tiles "
                              f"{tiles or 'none'}): run `adasr profile BUNDLE --tiles {tile}`")
        best: dict[str, tuple[bool, int, float]] = {}
        for name, _, batch, entry_threads, median in matching:
            rank = (threads is None or entry_threads == threads, batch, -median / batch)
            if name not in best or rank > best[name]:
                best[name] = rank
        return cls({name: -rank[2] for name, rank in best.items()})


def _entry(f: Field) -> tuple[str, int, int, int | None, float]:
    """(name, tile, batch, threads, median ms) of one profile entry (BundleError when invalid)."""
    threads = f.get("threads")
    return (f["name"].text(256), f["tile"].integer(1, 1 << 16), f["batch"].integer(1, 1 << 16),
            None if threads is None else threads.integer(0, 1 << 16),
            f["latency_ms"]["median"].number(0))


def load_latencies(bundle_root: Path, manifest: Manifest) -> LatencyTable:
    """The latency table of the bundle's profile (``manifest.profile``) at the bundle's tile."""
    if manifest.profile is None:
        raise BundleError("budget policy needs a profile: run `adasr profile BUNDLE` first")
    path = bundle_path(bundle_root, manifest.profile, "the profile named by the manifest")
    data = read_bundle_json(path, "the profile ",
                            "named by the manifest is missing: run `adasr profile BUNDLE` again")
    table = LatencyTable.from_profile(data, manifest.tile, threads=manifest.threads or None)
    table.require(manifest.names)
    return table


def budget_assignment(g: npt.ArrayLike, latencies: LatencyTable, order: Sequence[str],
                      budget_ms: float) -> list[str]:
    """Engine per tile meeting ``budget_ms`` (predicted sum of per-tile ms), quality first.

    Every tile starts on ``order[0]`` (the cheapest). Then rung by rung (``order[k-1]`` ->
    ``order[k]``), tiles are upgraded in decreasing ``g`` (ties: row-major order) while the
    predicted frame time stays within the budget; a rung that does not fit stops the upgrades.
    If even all-cheapest exceeds the budget the tiles all stay cheapest: compare
    ``latencies.frame_ms(result)`` with the budget to tell.
    """
    if not order:
        raise ConfigError("budget policy needs at least one engine in the order")
    latencies.require(order)
    costs = [latencies.per_tile_ms[name] for name in order]
    return [order[rung] for rung in budget_rungs(g, costs, budget_ms).tolist()]


def budget_rungs(keys: npt.ArrayLike, costs: Sequence[float],
                 budget_ms: float) -> npt.NDArray[np.intp]:
    """:func:`budget_assignment` on rung indices: ``costs[k]`` is the ms per tile of rung k."""
    rank = np.argsort(-np.asarray(keys, dtype=np.float64).ravel(), kind="stable")
    count = rank.size
    total = count * costs[0]
    upgraded = count  # tiles on the previous rung: always a prefix of ``rank``
    rungs = np.zeros(count, dtype=np.intp)
    for level in range(1, len(costs)):
        delta = costs[level] - costs[level - 1]
        fits = upgraded if delta <= 0 else min(upgraded, max(0, int((budget_ms - total) // delta)))
        while fits and total + fits * delta > budget_ms:  # float rounding may overshoot by one
            fits -= 1
        if fits == 0:
            break
        rungs[rank[:fits]] = level
        total += fits * delta
        upgraded = fits
    return rungs


def sticky_choices(excess: npt.NDArray[np.float64], costs: npt.NDArray[np.float64],
                   previous: npt.NDArray[np.intp] | None, margin: float,
                   ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Hysteresis for :func:`allocate_rungs`: per tile (rows), the rungs below its previous
    rung look ``1 + margin`` times lossier and those above it ``1 + margin`` times costlier, so
    a tile changes rung between frames only for a clear gain."""
    if previous is None or margin == 0:
        return excess, costs
    columns = np.arange(excess.shape[1])[np.newaxis, :]
    below = columns < previous[:, np.newaxis]
    above = columns > previous[:, np.newaxis]
    costs = np.broadcast_to(costs, excess.shape)
    return (np.where(below, excess * (1.0 + margin), excess),
            np.where(above, costs * (1.0 + margin), costs))


def allocate_rungs(excess: npt.ArrayLike, costs: npt.ArrayLike, *,
                   max_excess: float | None = None,
                   max_cost: float | None = None) -> npt.NDArray[np.intp]:
    """The rung of each tile: the cheapest allocation whose summed ``excess`` stays within
    ``max_excess`` (quality), or the least-loss one whose summed cost stays within ``max_cost``
    (budget). Exactly one limit is given.

    ``excess`` is N tiles x R rungs (the predicted loss of each rung on each tile, the top rung 0),
    ``costs`` R or N x R. Every tile starts on rung 0; its possible upgrades are the segments of
    the lower convex hull of its (cost, excess) points, and all tiles' segments are taken in
    decreasing loss saved per cost (the Lagrangian order: the best marginal buy over the whole
    frame first) until the limit is met (quality) or the next one would break it (budget).
    """
    loss = np.asarray(excess, dtype=np.float64)
    if loss.ndim != 2 or loss.shape[1] < 1:
        raise ConfigError(f"excess must be tiles x rungs, got shape {loss.shape}")
    count, levels = loss.shape
    cost = np.broadcast_to(np.asarray(costs, dtype=np.float64), loss.shape)
    if (max_excess is None) == (max_cost is None):
        raise ConfigError("give exactly one of max_excess and max_cost")
    tiles, targets, gains, extras, slopes = _hull_segments(loss, cost)
    order = np.argsort(-slopes, kind="stable")
    if max_excess is not None:
        left = loss[:, 0].sum() - np.cumsum(gains[order])
        met = np.flatnonzero(left <= max_excess)
        taken = order if met.size == 0 else order[: met[0] + 1]
        if loss[:, 0].sum() <= max_excess:
            taken = order[:0]
    else:
        assert max_cost is not None
        spent = cost[:, 0].sum() + np.cumsum(extras[order])
        over = np.flatnonzero(spent > max_cost)
        taken = order if over.size == 0 else order[: over[0]]
    rungs = np.zeros(count, dtype=np.intp)
    np.maximum.at(rungs, tiles[taken], targets[taken])
    return rungs


def _hull_segments(loss: npt.NDArray[np.float64], cost: npt.NDArray[np.float64],
                   ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp],
                              npt.NDArray[np.float64], npt.NDArray[np.float64],
                              npt.NDArray[np.float64]]:
    """(tile, target rung, loss saved, extra cost, saved per cost) of every upgrade segment of
    each tile's lower convex hull, tile by tile in increasing rung (decreasing slope)."""
    count, levels = loss.shape
    index = np.arange(count)
    columns = np.arange(levels)[np.newaxis, :]
    current = np.zeros(count, dtype=np.intp)
    active = np.ones(count, dtype=bool)
    parts: list[tuple[npt.NDArray[np.intp], ...]] = []
    values: list[tuple[npt.NDArray[np.float64], ...]] = []
    for _ in range(levels - 1):
        gain = loss[index, current][:, np.newaxis] - loss
        extra = cost - cost[index, current][:, np.newaxis]
        valid = (columns > current[:, np.newaxis]) & (gain > 0) & active[:, np.newaxis]
        with np.errstate(divide="ignore", invalid="ignore"):
            slope = np.where(extra > 0, gain / np.where(extra > 0, extra, 1.0), np.inf)
        slope = np.where(valid, slope, -np.inf)
        best = slope.argmax(axis=1)
        ok = valid[index, best]
        if not ok.any():
            break
        chosen = index[ok]
        parts.append((chosen, best[ok]))
        values.append((gain[chosen, best[ok]], extra[chosen, best[ok]], slope[chosen, best[ok]]))
        current = np.where(ok, best, current)
        active &= ok
    if not parts:
        empty_i, empty_f = np.zeros(0, dtype=np.intp), np.zeros(0)
        return empty_i, empty_i, empty_f, empty_f, empty_f
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            np.concatenate([v[0] for v in values]), np.concatenate([v[1] for v in values]),
            np.concatenate([v[2] for v in values]))


def bundle_policy(text: str | None, bundle_root: Path, manifest: Manifest
                  ) -> tuple[Policy, LatencyTable | None]:
    """The policy ``text`` names (None: ``quality`` for a bundle with a rung ladder, else the
    papers' ``threshold``) and, for ``budget:`` on a bundle without a ladder, the profile's
    latency table it needs."""
    policy = parse_policy(text or ("quality" if manifest.rungs.rungs else "threshold"))
    needs_profile = isinstance(policy, BudgetPolicy) and not manifest.rungs.rungs
    return policy, load_latencies(bundle_root, manifest) if needs_profile else None
