"""Per-layer engine specs read from a calibration record: what the plan maps onto a target's
kernels and the lowering (``compiler.lower``) writes into a graph.

``engine_layers(record, d_img)`` reads a record into one :class:`EngineLayer` per quantized conv
for the engine of image offset ``d_img``. Only the record's learned quantities are used (bounds,
clips, bits, output ranges): nothing is re-calibrated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from compiler.quant.qmodel import FIXED_BITS
from compiler.quant.quantizers import MAX_INT_BITS
from runtime.errors import ConfigError, unknown_name

F32 = np.float32


@dataclass(frozen=True)
class EngineLayer:
    """How one quantized conv runs in one engine (from a calibration record and an offset).

    ``act_bits`` above 8 means the conv's input stays float; ``bounds`` are the activation
    bounds (l, u) after freezing a DDTB gate (``frozen_gate``), read as ``[-a, a]`` with
    ``a = max(|l|, |u|)`` when ``symmetric``; ``w_clip`` is one clip or one per output channel;
    ``output_range`` / ``input_range`` are the FP ranges of the conv's output and input
    (calibration; ``input_range`` sets the grid of a shared residual stream, see
    ``compiler.lower.ort``).
    ``float_output`` keeps the conv's output float (no requantization after it: ORT dialect, an
    exact FP32 conv on the integer levels, ``compiler.lower.ort``); ``exact_image`` runs a conv
    that reads the image in FP32 on the integer pixels (ORT dialect, ``compiler.lower.image``).
    """

    name: str
    act_bits: float
    bounds: tuple[float, float]
    w_bits: int
    w_clip: float | tuple[float, ...]
    output_range: tuple[float, float] | None = None
    input_range: tuple[float, float] | None = None
    frozen_gate: bool = False
    symmetric: bool = False
    float_output: bool = False
    exact_image: bool = False

    def __post_init__(self) -> None:
        lowest = 2 if self.symmetric else 1
        if not (float(self.act_bits).is_integer() and self.act_bits >= lowest):
            raise ConfigError(f"layer {self.name!r}: activation bits {self.act_bits} must be an "
                              f"integer >= {lowest} (> 8: float input)")
        if not 2 <= self.w_bits <= MAX_INT_BITS:
            raise ConfigError(f"layer {self.name!r}: weight bits {self.w_bits} out of range 2..8")
        clips = self.w_clip if isinstance(self.w_clip, tuple) else (self.w_clip,)
        values = [*self.bounds, *clips, *(self.output_range or ())]
        if not all(math.isfinite(v) for v in values) or min(clips) <= 0:
            raise ConfigError(f"layer {self.name!r}: bounds {self.bounds}, clips and output "
                              "range must be finite and clips > 0")

    @property
    def quantizes_input(self) -> bool:
        return self.act_bits <= MAX_INT_BITS


def _frozen_bounds(layer: Mapping[str, Any]) -> tuple[tuple[float, float], bool]:
    """(l, u) of a record layer; a DDTB gate frozen at its mean scales (float32, as simulated)."""
    lower, upper = (F32(v) for v in layer["a_bounds"])
    gate = layer.get("gate")
    if gate is None:
        return (float(lower), float(upper)), False
    scale = gate.get("mean_scale")
    if not scale or len(scale) != 2:
        raise ConfigError(f"layer {layer['name']!r} has a DDTB gate without 'mean_scale': an "
                          "engine cannot run a per-image gate; recalibrate to record its mean")
    return (float(lower * F32(scale[0])), float(upper * F32(scale[1]))), True


def engine_layers(record: Mapping[str, Any], d_img: int) -> tuple[EngineLayer, ...]:
    """The per-layer spec of the engine for image offset ``d_img`` of a calibration record."""
    vectors, key = record["bit_vectors"], str(d_img)
    if key not in vectors:
        raise ConfigError(unknown_name(f"image offset of this {record['settings']['method']} "
                                       "record", key, vectors))
    adaptive = sum(layer["kind"] == "adaptive" for layer in record["layers"])
    if adaptive != len(vectors[key]):
        raise ConfigError(f"record has {adaptive} adaptive layers but {len(vectors[key])} bits "
                          f"for image offset {d_img}")
    bits = iter(vectors[key])  # in adaptive-layer order, as the record lists the layers
    out = []
    for layer in record["layers"]:
        bounds, frozen = _frozen_bounds(layer)
        clip = layer["w_clip"]
        out_range, in_range = layer.get("output_range"), layer.get("input_range")
        out.append(EngineLayer(
            name=layer["name"],
            act_bits=float(next(bits)) if layer["kind"] == "adaptive" else float(FIXED_BITS),
            bounds=bounds, w_bits=int(layer["w_bits"]),
            w_clip=tuple(float(c) for c in clip) if isinstance(clip, list) else float(clip),
            output_range=(float(out_range[0]), float(out_range[1])) if out_range else None,
            input_range=(float(in_range[0]), float(in_range[1])) if in_range else None,
            frozen_gate=frozen, symmetric=bool(record["settings"].get("symmetric", False))))
    return tuple(out)
