"""Tile planning, extraction and stitching for engines with a static T x T input.

Conventions:

* Tiles lie on a grid with stride ``tile - overlap`` along each axis, starting at 0; the last
  row/column is snapped to the frame edge (start ``H - T``) instead of running past it, so it may
  overlap its neighbour by more than ``overlap``. Tiles are ordered row-major (``row``, then
  ``col``); ``plan.tiles[i]`` goes with ``outputs[i]``.
* A tile's ``source`` box is what it reads from the frame, T x T in LR pixels. In a dimension where
  the frame is smaller than T there is one tile, at 0, whose source is the whole frame extent;
  :func:`extract_tiles` pads it at the bottom/right up to T by replicating the edge pixels
  (``numpy.pad`` mode ``"edge"``), and :func:`stitch` ignores what the engine made of the padding.
* A tile's ``core`` box is the part of the frame it owns: the cores partition the frame exactly.
  Two neighbours are cut at the centre of their overlap, ``(start_next + start + T) // 2`` (for
  an odd overlap the later tile owns the extra pixel), as CADyQ's patch inference does (tiles 96,
  step 90, cut 3 pixels into the overlap).
* Engine outputs are N x (T*s) x (T*s) x C, the tile upscaled by the integer scale s; box
  coordinates scale by s into the (H*s) x (W*s) x C output.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Literal, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt

from runtime.errors import ConfigError, unknown_name

__all__ = ["Box", "StitchMode", "Tile", "TilePlan", "extract_tiles", "plan_tiles",
           "stitch"]

StitchMode = Literal["crop", "feather"]
_MODES: tuple[StitchMode, ...] = ("crop", "feather")
_Pixel = TypeVar("_Pixel", bound=np.generic)
_Weights = npt.NDArray[np.float64]


class Box(NamedTuple):
    """An axis-aligned box of pixels: top-left corner (y0, x0) and size h x w."""

    y0: int
    x0: int
    h: int
    w: int

    def slices(self, scale: int = 1) -> tuple[slice, slice]:
        """Row and column slices of the box with every coordinate multiplied by ``scale``."""
        return (
            slice(self.y0 * scale, (self.y0 + self.h) * scale),
            slice(self.x0 * scale, (self.x0 + self.w) * scale),
        )


@dataclass(frozen=True)
class Tile:
    """One tile: grid position, the frame region it reads and the frame region it owns (LR)."""

    row: int
    col: int
    source: Box  # h = min(T, H), w = min(T, W); padded up to T x T by extract_tiles
    core: Box  # inside source; the cores of a plan partition the frame

    @property
    def core_in_tile(self) -> Box:
        """The core relative to the tile's own top-left corner (where it sits in the output)."""
        core, source = self.core, self.source
        return Box(core.y0 - source.y0, core.x0 - source.x0, core.h, core.w)


@dataclass(frozen=True)
class TilePlan:
    """How a height x width frame is cut into tile x tile pieces; build it with plan_tiles."""

    height: int
    width: int
    tile: int
    overlap: int
    scale: int
    y_starts: tuple[int, ...]  # source.y0 of each tile row
    x_starts: tuple[int, ...]  # source.x0 of each tile column
    tiles: tuple[Tile, ...]  # row-major

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    @property
    def output_shape(self) -> tuple[int, int]:
        """(H * s, W * s): the size of the stitched frame."""
        return self.height * self.scale, self.width * self.scale

    def __len__(self) -> int:
        return len(self.tiles)


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    allowed = (
        f"an integer >= {minimum}" if maximum is None else f"an integer in {minimum}..{maximum}"
    )
    if (
        isinstance(value, bool)
        or not isinstance(value, int | np.integer)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        raise ConfigError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


def _axis_starts(length: int, tile: int, stride: int) -> tuple[int, ...]:
    """Tile starts along one axis: 0, stride, 2*stride, ..., then one snapped to length - tile."""
    if length <= tile:
        return (0,)
    count = -(-(length - tile) // stride) + 1  # ceil division, then the snapped last tile
    return (*range(0, (count - 1) * stride, stride), length - tile)


def _axis_cuts(starts: tuple[int, ...], length: int, tile: int) -> tuple[int, ...]:
    """Core boundaries along one axis: 0, the centre of each overlap, length."""
    centres = ((start + tile + following) // 2 for start, following in pairwise(starts))
    return (0, *centres, length)


def plan_tiles(height: int, width: int, tile: int, overlap: int, scale: int) -> TilePlan:
    """Plan the tiles of a height x width frame (see the module docstring for the conventions)."""
    height = _check_int("height", height, 1)
    width = _check_int("width", width, 1)
    tile = _check_int("tile", tile, 1)
    overlap = _check_int("overlap", overlap, 0, tile - 1)
    scale = _check_int("scale", scale, 1)
    y_starts = _axis_starts(height, tile, tile - overlap)
    x_starts = _axis_starts(width, tile, tile - overlap)
    y_cuts = _axis_cuts(y_starts, height, tile)
    x_cuts = _axis_cuts(x_starts, width, tile)
    tile_h, tile_w = min(tile, height), min(tile, width)
    tiles = tuple(
        Tile(
            row=row,
            col=col,
            source=Box(y0, x0, tile_h, tile_w),
            core=Box(
                y_cuts[row],
                x_cuts[col],
                y_cuts[row + 1] - y_cuts[row],
                x_cuts[col + 1] - x_cuts[col],
            ),
        )
        for row, y0 in enumerate(y_starts)
        for col, x0 in enumerate(x_starts)
    )
    return TilePlan(height, width, tile, overlap, scale, y_starts, x_starts, tiles)


def extract_tiles(frame: npt.NDArray[_Pixel], plan: TilePlan) -> npt.NDArray[_Pixel]:
    """Cut an H x W x C frame into the plan's tiles: N x T x T x C, edge-padded where needed."""
    if frame.ndim != 3 or frame.shape[:2] != (plan.height, plan.width):
        raise ConfigError(
            f"frame must have shape {plan.height} x {plan.width} x C for this plan, "
            f"got {frame.shape}"
        )
    size = plan.tile
    pad = ((0, max(size - plan.height, 0)), (0, max(size - plan.width, 0)), (0, 0))
    padded = np.pad(frame, pad, mode="edge") if pad[0][1] or pad[1][1] else frame
    tiles = np.empty((len(plan), size, size, frame.shape[2]), dtype=frame.dtype)
    for index, tile in enumerate(plan.tiles):
        tiles[index] = padded[Box(tile.source.y0, tile.source.x0, size, size).slices()]
    return tiles


def _axis_weights(
    starts: tuple[int, ...], tile: int, extent: int, length: int, scale: int
) -> list[_Weights]:
    """Normalised feather weights of each tile along one axis, on the output grid.

    A tile's ramp rises linearly across its overlap with the previous tile and falls across its
    overlap with the next one, evaluated at output pixel centres so it is never 0 (in the overlap
    of two tiles the two ramps sum to 1; the first and last tiles keep weight 1 at the frame
    edge). The ramps are then divided by their sum over the tiles covering each pixel, so that
    the 2-D weights ``y_weight * x_weight`` of the tiles covering a pixel sum to 1 even where more
    than two tiles overlap. Each array has ``extent * scale`` samples (extent = min(tile, length)).
    """
    from_start = np.arange(extent * scale, dtype=np.float64) + 0.5
    from_end = from_start[::-1]  # extent == tile whenever there is more than one tile
    overlaps = [0, *((before + tile - after) * scale for before, after in pairwise(starts)), 0]
    ramps = []
    for rising, falling in pairwise(overlaps):
        ramp = np.ones_like(from_start)
        if rising:
            ramp = np.minimum(ramp, from_start / rising)
        if falling:
            ramp = np.minimum(ramp, from_end / falling)
        ramps.append(ramp)
    spans = [slice(start * scale, (start + extent) * scale) for start in starts]
    total = np.zeros(length * scale, dtype=np.float64)
    for span, ramp in zip(spans, ramps, strict=True):
        total[span] += ramp
    return [ramp / total[span] for span, ramp in zip(spans, ramps, strict=True)]


def _feather(
    outputs: npt.NDArray[_Pixel], plan: TilePlan, cropped: npt.NDArray[_Pixel]
) -> npt.NDArray[_Pixel]:
    """Weighted mean of all tiles covering each output pixel, weights summing to 1.

    Computed as ``cropped + sum(w * (tile - cropped))``, which equals ``sum(w * tile)`` but is
    exact wherever the tiles agree (a constant image stays constant, an identity engine
    reconstructs its input bit for bit). Arithmetic is float32 (float64 for float64 outputs).
    """
    if not np.issubdtype(outputs.dtype, np.number):
        raise ConfigError(f"feather stitching needs numeric outputs, got dtype {outputs.dtype}")
    work = np.result_type(outputs.dtype, np.float32)
    scale = plan.scale
    tile_h, tile_w = plan.tiles[0].source.h, plan.tiles[0].source.w  # the same for every tile
    y_weights = _axis_weights(plan.y_starts, plan.tile, tile_h, plan.height, scale)
    x_weights = _axis_weights(plan.x_starts, plan.tile, tile_w, plan.width, scale)
    reference = cropped.astype(work, copy=False)
    total = np.zeros_like(reference)
    for index, tile in enumerate(plan.tiles):
        region = tile.source.slices(scale)
        weight = np.outer(y_weights[tile.row], x_weights[tile.col]).astype(work)
        difference = outputs[index, : tile_h * scale, : tile_w * scale] - reference[region]
        difference *= weight[:, :, np.newaxis]
        total[region] += difference
    blended = reference + total
    if np.issubdtype(outputs.dtype, np.integer):  # round half up and saturate
        limits = np.iinfo(outputs.dtype.str)
        blended = np.clip(np.floor(blended + 0.5), limits.min, limits.max)
    result: npt.NDArray[_Pixel] = blended.astype(outputs.dtype, copy=False)
    return result


def stitch(
    outputs: npt.NDArray[_Pixel], plan: TilePlan, mode: StitchMode = "crop"
) -> npt.NDArray[_Pixel]:
    """Assemble N x (T*s) x (T*s) x C tile outputs into the (H*s) x (W*s) x C frame.

    ``"crop"`` copies each tile's core. ``"feather"`` blends every tile covering a pixel with
    linear ramps across the overlaps, weights normalised to sum to 1 (computed in float32, float64
    for float64 outputs, and cast back; integer outputs round half up and saturate). Both return
    the outputs' dtype.
    """
    if mode not in _MODES:
        raise ConfigError(unknown_name("stitch mode", str(mode), _MODES))
    size = plan.tile * plan.scale
    if outputs.ndim != 4 or outputs.shape[:3] != (len(plan), size, size):
        raise ConfigError(
            f"tile outputs must have shape {len(plan)} x {size} x {size} x C for this plan, "
            f"got {outputs.shape}"
        )
    cropped = np.empty((*plan.output_shape, outputs.shape[3]), dtype=outputs.dtype)
    for index, tile in enumerate(plan.tiles):
        cropped[tile.core.slices(plan.scale)] = outputs[index][tile.core_in_tile.slices(plan.scale)]
    return cropped if mode == "crop" else _feather(outputs, plan, cropped)
