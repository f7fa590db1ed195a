"""The dispatcher: upscale a frame with a bundle's engines, one engine per tile or per frame.

One :meth:`Dispatcher.upscale` call runs the data flow of the runtime on one frame:

1. **tile** -- :func:`~runtime.tiling.plan_tiles` (cached while the frame size stays the same)
   and one :func:`~runtime.tiling.extract_tiles`: N x T x T x 3 uint8.
2. **statistic** -- ``mode="patch"``: :func:`~runtime.statistic.complexity_batch` of all tiles at
   once (on the frame pixels only, where a frame smaller than a tile was edge-padded);
   ``mode="image"``: :func:`~runtime.statistic.complexity` of the whole frame, one engine for all
   tiles. The policy (:mod:`runtime.policies`) turns ``g`` into an engine per tile, with temporal
   hysteresis for video (see :class:`Dispatcher`). The ``quality`` and ``budget`` policies of a
   bundle with a rung ladder (:mod:`runtime.rungs`) compute tile features instead, predict each
   rung's loss per tile and allocate rungs over the whole frame
   (:func:`~runtime.policies.allocate_rungs`).
3. **group** -- tiles grouped per engine, each group run in batches of at most ``batch`` tiles;
   uint8 NHWC -> float32 NCHW / 255 once per batch, outputs written back NHWC.
4. **infer** -- the engines' ``infer`` calls only; tiles on the interpolation rung are upscaled
   here with numpy (:func:`~runtime.rungs.interpolate_tiles`, counted in ``infer``).
5. **stitch** -- :func:`~runtime.tiling.stitch` in float32, then x 255, clip and round once
   (half up, as :func:`runtime.imaging.round_to_uint8`).

Every stage is timed with ``time.perf_counter`` into :attr:`FrameResult.seconds`.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import get_args

import numpy as np
import numpy.typing as npt

from runtime.engines.base import Engine
from runtime.errors import BundleError, ConfigError, EngineError, MediaError, unknown_name
from runtime.manifest import OFFSETS, Manifest
from runtime.policies import (
    BudgetPolicy,
    FixedPolicy,
    LatencyTable,
    Policy,
    QualityPolicy,
    ThresholdPolicy,
    allocate_rungs,
    budget_keys,
    budget_rungs,
    hysteresis_offsets,
    parse_policy,
    policy_engines,
    sticky_choices,
)
from runtime.rungs import interpolate_tiles, tile_features
from runtime.statistic import complexity, complexity_batch
from runtime.tiling import StitchMode, TilePlan, extract_tiles, plan_tiles, stitch

__all__ = ["MODES", "STAGES", "Dispatcher", "FrameResult", "HysteresisState", "rung_fab"]

MODES = ("patch", "image")
STAGES = ("tile", "statistic", "group", "infer", "stitch")
_STITCH_MODES: tuple[str, ...] = get_args(StitchMode)


@dataclass(frozen=True)
class FrameResult:
    """One upscaled frame and how it was made (per tile: row-major, as ``plan.tiles``)."""

    sr: npt.NDArray[np.uint8]  # (H*s, W*s, 3), rounded and clipped
    plan: TilePlan
    engines: tuple[str, ...]  # engine (or rung, e.g. ``bicubic``) name per tile
    offsets: tuple[int, ...]  # image offset per tile (-1/0/1) from the statistic, after hysteresis
    statistic: tuple[float, ...]  # complexity g per tile (image mode: the frame's g repeated)
    seconds: Mapping[str, float]  # stage (STAGES) -> seconds
    predicted_ms: float | None = None  # budget policy: predicted frame time of the choice
    budget_ms: float | None = None  # budget policy: the budget it had to meet
    predicted_db: float | None = None  # quality / budget with a ladder: predicted loss vs top

    @property
    def histogram(self) -> dict[str, int]:
        """Engine name -> number of tiles it ran (engines that ran no tile are left out)."""
        return dict(Counter(self.engines))

    @property
    def over_budget(self) -> bool:
        """True when even the cheapest engine on every tile is predicted to miss the budget."""
        return (self.predicted_ms is not None and self.budget_ms is not None
                and self.predicted_ms > self.budget_ms)

    def fab(self, manifest: Manifest) -> float:
        """Mean FAB of the chosen engines weighted by the frame area each tile owns (its core);
        the interpolation rung computes no features and counts 0."""
        fabs = {name: rung_fab(manifest, name) for name in set(self.engines)}
        total = sum(tile.core.h * tile.core.w * fabs[name]
                    for tile, name in zip(self.plan.tiles, self.engines, strict=True))
        return total / (self.plan.height * self.plan.width)


@dataclass(frozen=True)
class HysteresisState:
    """What a dispatcher carries from one frame to the next: :attr:`Dispatcher.state`."""

    height: int  # the frame size it belongs to
    width: int
    offsets: npt.NDArray[np.int8] | None  # image offset per tile of the last frame
    rungs: npt.NDArray[np.intp] | None  # budget policy: rung per tile of the last frame


class Dispatcher:
    """Upscale frames with the engines a policy chooses, per tile (``"patch"``) or per frame.

    ``engines`` must hold every engine the policy can choose (threshold: the engines of the three
    image offsets; ``fixed:NAME``: that one; quality and budget: the engines of the rung ladder,
    or all with ``latencies`` for a bundle without one); only those are activated, by
    ``with Dispatcher(...)`` (engines already active are left to their owner). ``latencies``
    replace the ladder's build-time engine costs when given.

    Hysteresis (video): the dispatcher remembers the previous offset of each tile position (the
    frame in image mode); a tile leaves it only when ``g`` is beyond the threshold it crosses by
    ``hysteresis`` times the threshold value (:func:`runtime.policies.hysteresis_offsets`). The
    budget policy ranks tiles by ``g * (1 + hysteresis) ** previous_rung`` so an upgraded tile
    keeps its upgrade unless another is clearly more complex; the quality policy (and budget with
    a ladder) makes the rungs below a tile's previous rung look ``1 + hysteresis`` times lossier
    and those above it that much costlier (:func:`runtime.policies.sticky_choices`). The state
    is forgotten when the frame size changes and on :meth:`reset` (new clip, scene cut).
    """

    def __init__(self, manifest: Manifest, engines: Mapping[str, Engine], *, mode: str = "patch",
                 policy: Policy | str = "threshold", batch: int = 8, stitch: StitchMode = "crop",
                 hysteresis: float = 0.0, latencies: LatencyTable | None = None) -> None:
        if mode not in MODES:
            raise ConfigError(unknown_name("dispatch mode", mode, MODES))
        if stitch not in _STITCH_MODES:
            raise ConfigError(unknown_name("stitch mode", str(stitch), _STITCH_MODES))
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ConfigError(f"batch must be an integer >= 1, got {batch!r}")
        if (isinstance(hysteresis, bool) or not isinstance(hysteresis, int | float)
                or not (math.isfinite(hysteresis) and 0 <= hysteresis < 1)):
            raise ConfigError(f"hysteresis must be a relative margin in [0, 1), got {hysteresis!r}")
        self.manifest = manifest
        self.mode = mode
        self.policy = parse_policy(policy) if isinstance(policy, str) else policy
        self.batch = batch
        self.stitch: StitchMode = stitch
        self.hysteresis = float(hysteresis)
        self.names = policy_engines(self.policy, manifest)  # cheapest first; codes index it
        self._engines = _select(engines, self.names, self.policy, manifest)
        self._costs: tuple[float, ...] = ()
        ladder = manifest.rungs
        self._allocate = isinstance(self.policy, QualityPolicy) or (
            isinstance(self.policy, BudgetPolicy) and bool(ladder.rungs))
        if self._allocate:
            self._costs = tuple(ladder.rung(name).cost_ms for name in self.names)
            if latencies is not None:
                self._costs = tuple(latencies.per_tile_ms.get(_engine_of(manifest, name) or "",
                                                              cost)
                                    for name, cost in zip(self.names, self._costs, strict=True))
        elif isinstance(self.policy, BudgetPolicy):
            if latencies is None:
                raise ConfigError(f"policy {self.policy} needs latencies: pass latencies="
                                  "load_latencies(bundle_root, manifest)")
            latencies.require(self.names)
            self._costs = tuple(latencies.per_tile_ms[name] for name in self.names)
        # engine code of each image offset (threshold policy), indexed by offset + 1
        self._offset_codes = np.zeros(len(OFFSETS), dtype=np.intp)
        if isinstance(self.policy, ThresholdPolicy):
            self._offset_codes[:] = [self.names.index(manifest.engine_for_offset(offset).name)
                                     for offset in OFFSETS]
        self._activated: list[Engine] = []
        self._plan: TilePlan | None = None
        self._outputs: npt.NDArray[np.float32] | None = None
        self._previous_offsets: npt.NDArray[np.int8] | None = None
        self._previous_rungs: npt.NDArray[np.intp] | None = None

    def __enter__(self) -> Dispatcher:
        try:
            for engine in self._engines:
                if engine is not None and not engine.is_active:
                    engine.activate()
                    self._activated.append(engine)
        except BaseException:
            self._deactivate()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._deactivate()

    def _deactivate(self) -> None:
        while self._activated:
            engine = self._activated.pop()
            if engine.is_active:
                engine.deactivate()

    def reset(self) -> None:
        """Forget the hysteresis state (new clip or scene cut)."""
        self._previous_offsets = None
        self._previous_rungs = None

    @property
    def state(self) -> HysteresisState | None:
        """The hysteresis state after the last frame (None before any); see :meth:`restore`."""
        plan = self._plan
        return None if plan is None else HysteresisState(
            plan.height, plan.width, self._previous_offsets, self._previous_rungs)

    def restore(self, state: HysteresisState | None) -> None:
        """Continue as if the frames that gave ``state`` had just been upscaled (None: reset)."""
        if state is None:
            self.reset()
            return
        self._plan_for(state.height, state.width)
        self._previous_offsets, self._previous_rungs = state.offsets, state.rungs

    def observe(self, frame: npt.NDArray[np.uint8]) -> None:
        """Advance the hysteresis state over ``frame`` exactly as :meth:`upscale` does, without
        running an engine (the engines need not be active)."""
        plan = self._plan_for(frame.shape[0], frame.shape[1])
        self._choose(frame, extract_tiles(frame, plan), plan)

    def upscale(self, frame: npt.NDArray[np.uint8]) -> FrameResult:
        """Upscale one H x W x 3 uint8 RGB frame (any H, W >= 1)."""
        if (not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3
                or frame.shape[2] != 3 or frame.shape[0] < 1 or frame.shape[1] < 1):
            shape = getattr(frame, "shape", None)
            raise MediaError(f"frames must be H x W x 3 uint8 RGB with H, W >= 1, got {shape} "
                             f"{getattr(frame, 'dtype', type(frame).__name__)}")
        idle = [engine.name for engine in self._engines
                if engine is not None and not engine.is_active]
        if idle:
            raise EngineError(f"engines {', '.join(idle)} are not active: use the dispatcher "
                              "as a context manager (`with Dispatcher(...) as d:`)")
        clock = time.perf_counter
        start = clock()
        plan = self._plan_for(frame.shape[0], frame.shape[1])
        tiles = extract_tiles(frame, plan)
        tiled = clock()
        g, offsets, codes, predicted, loss_db = self._choose(frame, tiles, plan)
        chosen = clock()
        outputs, infer = self._run(tiles, codes)
        ran = clock()
        sr = _to_uint8(stitch(outputs, plan, self.stitch))
        done = clock()
        seconds = {"tile": tiled - start, "statistic": chosen - tiled,
                   "group": ran - chosen - infer, "infer": infer, "stitch": done - ran}
        names = self.names
        return FrameResult(
            sr=sr, plan=plan, engines=tuple(names[code] for code in codes.tolist()),
            offsets=tuple(offsets.tolist()), statistic=tuple(g.tolist()), seconds=seconds,
            predicted_ms=predicted, predicted_db=loss_db,
            budget_ms=self.policy.budget_ms if isinstance(self.policy, BudgetPolicy) else None)

    def _plan_for(self, height: int, width: int) -> TilePlan:
        plan = self._plan
        if plan is None or (plan.height, plan.width) != (height, width):
            manifest = self.manifest
            plan = plan_tiles(height, width, manifest.tile, manifest.overlap, manifest.model.scale)
            self._plan, self._outputs = plan, None
            self.reset()
        return plan

    def _choose(self, frame: npt.NDArray[np.uint8], tiles: npt.NDArray[np.uint8], plan: TilePlan,
                ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int8], npt.NDArray[np.intp],
                           float | None, float | None]:
        """Statistic, offsets and engine codes per tile, plus the predicted ms (budget, quality)
        and the predicted loss in dB against the top rung (quality, budget with a ladder)."""
        first = plan.tiles[0].source  # every source has this size; the rest is padding
        if self._allocate:
            g, features = tile_features(tiles[:, : first.h, : first.w],
                                        self.manifest.rungs.features)
            codes, predicted_ms, loss_db = self._allocated(features, plan)
            if self.mode == "image":
                g = np.array([complexity(frame)])
            offsets = hysteresis_offsets(g, self.manifest.thresholds, None, 0.0)
            if self.mode == "image":
                g, offsets = np.repeat(g, len(plan)), np.repeat(offsets, len(plan))
            return g, offsets, codes, predicted_ms, loss_db
        if self.mode == "patch":
            g = complexity_batch(tiles[:, : first.h, : first.w])
        else:
            g = np.array([complexity(frame)])
        offsets = hysteresis_offsets(g, self.manifest.thresholds, self._previous_offsets,
                                     self.hysteresis)
        self._previous_offsets = offsets
        predicted = None
        policy = self.policy
        if isinstance(policy, BudgetPolicy):
            copies = len(plan) if self.mode == "image" else 1  # image mode: one choice, N tiles
            costs = [cost * copies for cost in self._costs]
            keys = budget_keys(g, self._previous_rungs, self.hysteresis)
            codes = budget_rungs(keys, costs, policy.budget_ms)
            self._previous_rungs = codes
            predicted = float(np.take(costs, codes).sum())
        elif isinstance(policy, FixedPolicy):
            codes = np.zeros(g.shape, dtype=np.intp)
        else:
            codes = self._offset_codes[offsets + 1]
        if self.mode == "image":
            count = len(plan)
            g, offsets = np.repeat(g, count), np.repeat(offsets, count)
            codes = np.repeat(codes, count)
        return g, offsets, codes, predicted, None

    def _allocated(self, features: npt.NDArray[np.float64], plan: TilePlan,
                   ) -> tuple[npt.NDArray[np.intp], float, float]:
        """Rung codes per tile by :func:`allocate_rungs`, predicted ms and loss (dB)."""
        ladder = self.manifest.rungs
        area = np.array([tile.core.h * tile.core.w for tile in plan.tiles], dtype=np.float64)
        area *= plan.scale * plan.scale
        excess = np.stack([area * rung.excess * rung.loss.predict(features)
                           for rung in (ladder.rung(name) for name in self.names)], axis=1)
        reference = float((area * ladder.reference_error.predict(features)).sum())
        costs = np.asarray(self._costs, dtype=np.float64)
        if self.mode == "image":  # one rung for the whole frame
            excess = excess.sum(axis=0, keepdims=True)
            costs = costs * len(plan)
        loss, cost = sticky_choices(excess, costs, self._previous_rungs, self.hysteresis)
        policy = self.policy
        if isinstance(policy, BudgetPolicy):
            codes = allocate_rungs(loss, cost, max_cost=policy.budget_ms)
        else:
            assert isinstance(policy, QualityPolicy)
            target = ladder.default_target_db if policy.target_db is None else policy.target_db
            codes = allocate_rungs(loss, cost, max_excess=reference * (10 ** (target / 10) - 1))
        self._previous_rungs = codes
        predicted_ms = float(np.take_along_axis(
            np.broadcast_to(costs, excess.shape), codes[:, np.newaxis], axis=1).sum())
        chosen = float(np.take_along_axis(excess, codes[:, np.newaxis], axis=1).sum())
        loss_db = 10 * math.log10(1 + chosen / reference) if reference > 0 else 0.0
        if self.mode == "image":
            codes = np.repeat(codes, len(plan))
        return codes, predicted_ms, loss_db

    def _run(self, tiles: npt.NDArray[np.uint8], codes: npt.NDArray[np.intp],
             ) -> tuple[npt.NDArray[np.float32], float]:
        """Run each engine's tiles in batches: N x Ts x Ts x 3 outputs and the seconds in infer.

        The outputs live in an N x 3 x Ts x Ts buffer (reused while the frame size stays) that
        each batch fills with one block copy; the NHWC view of it goes to ``stitch``, so the only
        channel interleaving is ``stitch``'s copy of the tile cores.
        """
        count, size = tiles.shape[0], tiles.shape[1]
        out_size = size * self.manifest.model.scale
        buffer = self._outputs
        if buffer is None or buffer.shape[0] != count:
            buffer = np.empty((count, 3, out_size, out_size), dtype=np.float32)
            self._outputs = buffer
        order = np.argsort(codes, kind="stable")
        bounds = np.cumsum(np.bincount(codes, minlength=len(self.names))).tolist()
        infer = 0.0
        first = 0
        for engine, last in zip(self._engines, bounds, strict=True):
            if engine is None:  # the interpolation rung, all its tiles at once
                if first == last:
                    continue
                chunk = order[first:last]
                tick = time.perf_counter()
                buffer[chunk] = interpolate_tiles(tiles[chunk], self.manifest.model.scale)
                infer += time.perf_counter() - tick
                first = last
                continue
            for begin in range(first, last, self.batch):
                chunk = order[begin : min(begin + self.batch, last)]
                batch = np.empty((chunk.size, 3, size, size), dtype=np.float32)
                np.divide(tiles[chunk].transpose(0, 3, 1, 2), np.float32(255), out=batch)
                tick = time.perf_counter()
                result = engine.infer(batch)
                infer += time.perf_counter() - tick
                buffer[chunk] = result
            first = last
        return buffer.transpose(0, 2, 3, 1), infer


def _to_uint8(high: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """``round_to_uint8(high * 255)`` (clip to 0..255, round half up), in place on ``high``.

    ``trunc(clip(x + 0.5, 0, 255))`` equals ``floor(clip(x, 0, 255) + 0.5)`` for every x, in half
    the memory passes of :func:`runtime.imaging.round_to_uint8`.
    """
    np.multiply(high, np.float32(255), out=high)
    np.add(high, np.float32(0.5), out=high)
    np.clip(high, 0, 255, out=high)
    return high.astype(np.uint8)


def _engine_of(manifest: Manifest, name: str) -> str | None:
    """The engine behind rung or engine ``name`` (None: the interpolation rung)."""
    if name in manifest.rungs.names:
        return manifest.rungs.rung(name).engine
    return name


def rung_fab(manifest: Manifest, name: str) -> float:
    """FAB of the engine behind rung or engine ``name`` (0 for the interpolation rung)."""
    engine = _engine_of(manifest, name)
    return 0.0 if engine is None else manifest.engine(engine).fab


def _select(engines: Mapping[str, Engine], names: tuple[str, ...], policy: Policy,
            manifest: Manifest) -> list[Engine | None]:
    """The engines behind ``names`` from ``engines`` (None for the interpolation rung), checked
    against the bundle's scale and tile."""
    wanted = [_engine_of(manifest, name) for name in names]
    missing = [name for name in wanted if name is not None and name not in engines]
    if missing:
        needed = ", ".join(name for name in wanted if name is not None)
        raise BundleError(f"policy {policy} needs engines {needed}; missing: "
                          f"{', '.join(missing)} (given: {', '.join(engines) or 'none'})")
    chosen = [None if name is None else engines[name] for name in wanted]
    for engine in chosen:
        if engine is None:
            continue
        if engine.scale != manifest.model.scale:
            raise ConfigError(f"engine {engine.name!r} upscales x{engine.scale} but the bundle "
                              f"is x{manifest.model.scale}")
        if engine.tile not in (None, manifest.tile):
            raise ConfigError(f"engine {engine.name!r} takes {engine.tile} x {engine.tile} "
                              f"tiles but the bundle tiles are {manifest.tile} x {manifest.tile}")
    return chosen
