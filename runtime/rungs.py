"""The rung ladder: the ways a bundle can upscale a tile, cheapest first, each with a cost and a
predicted loss.

A rung is either one of the bundle's engines or the *interpolation* rung (MATLAB bicubic,
computed here in numpy: no engine, next to no compute). The ladder is stored in the manifest
(``manifest.rungs``, a :class:`RungLadder`); the compiler measures it when it builds a bundle
(``compiler.predictor``):

* ``cost_ms``: ms per tile at the bundle's tile size, batch 8 and threads, measured on the build
  machine (the quality policy uses only the ratios).
* ``loss``: a :class:`LossModel` predicting the rung's per-tile MSE *against the top rung's
  output* (Y, 0..255 scale, on the HR pixels of the tile) from cheap tile features
  (:func:`tile_features`), fitted on calibration images only.
* ``excess``: how much of that deviation shows up as extra error against the original image (the
  ratio measured on the calibration images; about 1 for quantization noise, which is uncorrelated
  with the network's own error, above 1 for interpolation, whose deviation points the same way).

``reference_error`` predicts the top rung's own per-tile MSE against the original: it turns a
quality target in dB into an MSE budget per frame (``runtime.policies``).

Features, per tile, on the LR pixels (``FEATURE_SETS``; a ladder names its set, new builds use
``FEATURES`` = ``tile-features/2``):

* ``tile-features/1``: ``[1, log1p(g), log1p(g)^2, log(1 + 255 * std(luma)), mean(luma)]`` with
  ``g`` the AdaBM statistic (:mod:`runtime.statistic`) and luma BT.601 in [0, 1];
* ``tile-features/2``: those and ``log1p(s)``, ``s`` the tile's *self error*: the mean squared
  difference (luma, 0..255) between the tile and its 2x2-mean downscale upscaled x2 again by the
  interpolation rung's bicubic. It measures the detail that interpolation cannot bring back, one
  octave down, which is what SR errs on. Measured on frames the build never saw, it raised the
  rank correlation of predicted and measured per-tile loss on carphone from 0.32-0.63 to
  0.33-0.70 (bigbuckbunny unchanged, 0.84-0.93), and the top rung's predicted error, over-
  predicted on clean video, became nearly equally biased on both clips (x3.14 and x2.82 rather
  than x4.35 and x2.99), so one conservative scaling serves both
  (benchmarks/results/dispatch_features.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from runtime.bundlepaths import engine_name_problem
from runtime.errors import BundleError, ConfigError
from runtime.fields import Field
from runtime.resize import resize_matrix
from runtime.statistic import complexity_and_luma

__all__ = [
    "FEATURES",
    "FEATURE_SETS",
    "INTERPOLATION",
    "LossModel",
    "Rung",
    "RungLadder",
    "interpolate_tiles",
    "ladder_from_json",
    "self_error",
    "tile_features",
]

FEATURE_SETS = {
    "tile-features/1": ("1", "log1p(g)", "log1p(g)^2", "log(1+255*std)", "mean"),
    "tile-features/2": ("1", "log1p(g)", "log1p(g)^2", "log(1+255*std)", "mean", "log1p(self)"),
}
FEATURES = "tile-features/2"  # what builds fit now
FEATURE_NAMES = FEATURE_SETS[FEATURES]
INTERPOLATION = "bicubic"  # the name of the interpolation rung
_MIN_MSE = 1e-4  # floor of a predicted / fitted MSE (log domain)


@dataclass(frozen=True)
class LossModel:
    """Per-tile MSE = ``scale * exp(features @ coefficients)`` (``coefficients`` per feature of
    the ladder's set, checked by :class:`RungLadder`)."""

    coefficients: tuple[float, ...] = ()
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale >= 0):
            raise BundleError(f"a loss model's scale must be finite and >= 0, got {self.scale}")

    @property
    def fitted(self) -> bool:
        return bool(self.coefficients)

    def predict(self, features: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Predicted MSE per row of ``features`` (N x len(FEATURE_NAMES)); zeros when unfitted."""
        if not self.coefficients:
            return np.zeros(features.shape[0])
        logs = features @ np.asarray(self.coefficients, dtype=np.float64)
        result: npt.NDArray[np.float64] = self.scale * np.exp(np.clip(logs, -30.0, 30.0))
        return result


@dataclass(frozen=True)
class Rung:
    """One rung: an engine of the bundle (``engine``) or the interpolation rung (``None``)."""

    name: str
    engine: str | None
    cost_ms: float
    loss: LossModel = LossModel()  # MSE against the top rung's output (the top rung: unfitted)
    excess: float = 1.0  # extra MSE against the original per unit of ``loss``
    note: str = ""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.cost_ms) and self.cost_ms >= 0):
            raise BundleError(f"rung {self.name!r}: cost must be finite ms >= 0, got "
                              f"{self.cost_ms}")
        if not (math.isfinite(self.excess) and self.excess >= 0):
            raise BundleError(f"rung {self.name!r}: excess must be finite and >= 0, got "
                              f"{self.excess}")


@dataclass(frozen=True)
class RungLadder:
    """The ladder of a bundle, cheapest first; the last rung is the top (quality reference)."""

    rungs: tuple[Rung, ...] = ()
    reference_error: LossModel = LossModel()  # the top rung's MSE against the original
    default_target_db: float = 0.05  # quality policy without a number: see compiler.predictor
    features: str = FEATURES
    tile: int = 0  # LR tile edge the costs and models were measured at (0: the bundle's)

    def __post_init__(self) -> None:
        names = [rung.name for rung in self.rungs]
        if len(set(names)) != len(names):
            raise BundleError(f"rung names must be unique, got {names}")
        if self.rungs and self.features not in FEATURE_SETS:
            raise BundleError(f"rung features {self.features!r} are not supported; this adasr "
                              f"computes {', '.join(FEATURE_SETS)}: rebuild the bundle")
        columns = FEATURE_SETS.get(self.features, ())
        models = [(rung.name, rung.loss) for rung in self.rungs]
        for name, model in [*models, ("reference_error", self.reference_error)]:
            if model.coefficients and len(model.coefficients) != len(columns):
                raise BundleError(f"loss model of {name!r} needs {len(columns)} coefficients "
                                  f"({', '.join(columns)}), got {len(model.coefficients)}")
        if not (math.isfinite(self.default_target_db) and self.default_target_db >= 0):
            raise BundleError(f"default quality target must be >= 0 dB, got "
                              f"{self.default_target_db}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(rung.name for rung in self.rungs)

    def rung(self, name: str) -> Rung:
        for rung in self.rungs:
            if rung.name == name:
                return rung
        raise ConfigError(f"unknown rung {name!r}; the ladder has {', '.join(self.names)}")


def ladder_from_json(f: Field | None) -> RungLadder:
    """The ladder of a manifest's ``rungs`` field, read as untrusted JSON (one-line errors naming
    the field); absent (older manifests) or null: an empty ladder."""
    if f is None:
        return RungLadder()

    def model(m: Field) -> LossModel:
        return LossModel(tuple(c.number() for c in m["coefficients"].items(0, 64)),
                         m["scale"].number(0.0))

    rungs = tuple(
        Rung(name=r["name"].check(engine_name_problem),
             engine=None if r.get("engine") is None else r["engine"].check(engine_name_problem),
             cost_ms=r["cost_ms"].number(0.0), loss=model(r["loss"]),
             excess=r["excess"].number(0.0), note=_optional_text(r.get("note")))
        for r in f["rungs"].items(0, 64))
    return RungLadder(rungs=rungs, reference_error=model(f["reference_error"]),
                      default_target_db=f["default_target_db"].number(0.0, 100.0),
                      features=f["features"].text(256),
                      tile=0 if f.get("tile") is None else f["tile"].integer(0, 1 << 16))


def _optional_text(f: Field | None) -> str:
    return "" if f is None else f.text()


def tile_features(tiles: npt.NDArray[np.uint8], version: str = FEATURES,
                  ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(g per tile, features N x len(FEATURE_SETS[version])) of N x h x w x 3 uint8 tiles
    (module docstring)."""
    if version not in FEATURE_SETS:
        raise BundleError(f"rung features {version!r} are not supported; this adasr computes "
                          f"{', '.join(FEATURE_SETS)}")
    g, luma = complexity_and_luma(tiles)
    log_g = np.log1p(g)
    columns = [np.ones_like(g), log_g, log_g * log_g, np.log1p(255.0 * luma.std(axis=(1, 2))),
               luma.mean(axis=(1, 2))]
    if version != "tile-features/1":
        columns.append(np.log1p(self_error(luma)))
    return g, np.stack(columns, axis=1)


def self_error(luma: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Per N x H x W luma stack in [0, 1]: the mean squared difference (0..255 scale) between
    each tile (cut to even size) and its 2x2-mean downscale upscaled x2 by bicubic; 0 for tiles
    under 2 px."""
    height, width = luma.shape[1] // 2 * 2, luma.shape[2] // 2 * 2
    if height < 2 or width < 2:
        return np.zeros(luma.shape[0])
    even = (luma[:, :height, :width] * 255.0).astype(np.float32)
    low = (even[:, 0::2, 0::2] + even[:, 1::2, 0::2] + even[:, 0::2, 1::2]
           + even[:, 1::2, 1::2]) * np.float32(0.25)
    back = _upsample_axis(_upsample_axis(low, -2, 2), -1, 2)
    result: npt.NDArray[np.float64] = ((even - back) ** 2).mean(axis=(1, 2), dtype=np.float64)
    return result


@lru_cache(maxsize=8)
def _phases(scale: int) -> tuple[int, tuple[tuple[tuple[int, float], ...], ...]]:
    """(padding, per output phase p: (input offset, weight) taps) of MATLAB bicubic x``scale``.

    Output pixel ``scale * j + p`` is ``sum(w * x[j + offset])`` over the taps of phase p, on the
    input mirrored by ``padding`` pixels at each end (MATLAB's symmetric padding), read off an
    interior row of :func:`runtime.resize.resize_matrix`.
    """
    size = 16
    matrix = resize_matrix(size, size * scale, float(scale))
    centre = size // 2
    phases = []
    for phase in range(scale):
        row = matrix[scale * centre + phase]
        columns = np.flatnonzero(row)
        phases.append(tuple((int(c) - centre, float(row[c])) for c in columns))
    padding = max(abs(offset) for taps in phases for offset, _ in taps)
    return padding, tuple(phases)


def _mirror(planes: npt.NDArray[np.float32], axis: int, padding: int) -> npt.NDArray[np.float32]:
    """``np.pad(planes, padding along axis, mode="symmetric")``; by slices when the axis is at
    least ``padding`` long (np.pad's own bookkeeping cost as much as a small tile's arithmetic)."""
    length = planes.shape[axis]
    if length < padding:
        pad = [(0, 0)] * planes.ndim
        pad[axis] = (padding, padding)
        result: npt.NDArray[np.float32] = np.pad(planes, pad, mode="symmetric")
        return result
    head, tail = [slice(None)] * planes.ndim, [slice(None)] * planes.ndim
    head[axis] = slice(padding - 1, None, -1)
    stop = length - padding - 1
    tail[axis] = slice(length - 1, stop if stop >= 0 else None, -1)
    return np.concatenate([planes[tuple(head)], planes, planes[tuple(tail)]], axis=axis)


def _upsample_axis(planes: npt.NDArray[np.float32], axis: int, scale: int,
                   ) -> npt.NDArray[np.float32]:
    """Bicubic x``scale`` of ``planes`` along ``axis`` (-1 or -2) by its polyphase taps."""
    padding, phases = _phases(scale)
    padded = _mirror(planes, axis, padding)
    length = planes.shape[axis]
    shape = list(planes.shape)
    shape[axis] = length * scale
    result = np.empty(shape, dtype=np.float32)
    window = [slice(None)] * planes.ndim
    total = np.empty(planes.shape, dtype=np.float32)  # contiguous: each phase summed here
    term = np.empty(planes.shape, dtype=np.float32)
    for phase, taps in enumerate(phases):
        total.fill(0)
        for offset, weight in taps:  # the same float32 operations, in the same order, as
            window[axis] = slice(padding + offset, padding + offset + length)  # 0 + w x + ...
            np.multiply(np.float32(weight), padded[tuple(window)], out=term)
            total += term
        window[axis] = slice(phase, None, scale)
        result[tuple(window)] = total
    return result


def interpolate_tiles(tiles: npt.NDArray[np.uint8], scale: int) -> npt.NDArray[np.float32]:
    """MATLAB bicubic x``scale`` of N x T x T x 3 uint8 tiles: N x 3 x sT x sT float32 on the
    [0, 1] scale (unclipped), the layout engines return; for float input MATLAB rounds nothing
    between its two passes, and neither does this. Polyphase multiply-adds in float32 (no BLAS:
    its threads would fight the engines' for the cores)."""
    planes = tiles.transpose(0, 3, 1, 2).astype(np.float32)
    planes *= np.float32(1 / 255)
    return _upsample_axis(_upsample_axis(planes, -2, scale), -1, scale)
