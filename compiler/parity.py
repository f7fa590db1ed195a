"""The simulated PyTorch network of one bundle engine, for parity checks of real engines.

An engine's manifest entry fixes every layer's kernel precision and emulated grids; the
simulation of that engine is the record's quantized network with exactly those bits forced per
layer (``QConv2d.forced_bits``; a float layer is > 8 bits, i.e. not quantized) and its weight grid
widths, or the full-precision network for the reference engine. Where the ONNX Runtime lowering
requantized a conv output to 8 bits for speed (placement ``8-bit output range`` in the engine's
lowering summary), the simulation quantizes that output the same way (``QConv2d.output_bounds``:
the calibrated range widened to contain 0, ``[0, hi]`` when a ReLU was folded; symmetric on
``max(|lo|, |hi|)`` in the TensorRT dialect), and its bias on the int32 lattice: the engine's
arithmetic, which the papers' simulation does not have. ``benchmarks/bundle_parity.py`` reports
both. ``PSNR(engine, simulation)`` then
measures only what the lowering and the integer kernels change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from compiler.quant.record import apply_record
from compiler.zoo import load_model
from runtime.errors import ConfigError
from runtime.manifest import EngineSpec

FLOAT_BITS = 32.0


def simulate_engine(weights: Path, record: Mapping[str, Any], spec: EngineSpec,
                    scale: int | None = None,
                    summary: Sequence[Mapping[str, Any]] | None = None,
                    dialect: str = "ort") -> nn.Module:
    """The simulated network that ``spec`` (an engine of a bundle built from ``record``) runs."""
    loaded = load_model(weights, scale=scale)
    if spec.reference and all(layer.act_bits is None for layer in spec.layers):
        return loaded.model.eval()
    qnet = apply_record(loaded, dict(record))
    convs = dict(qnet.qconvs())
    missing = [layer.name for layer in spec.layers if layer.name not in convs]
    if missing:
        raise ConfigError(f"engine {spec.name!r} names layers {missing} that the record's "
                          "network does not have: the bundle and record do not match")
    for layer in spec.layers:
        conv = convs[layer.name]
        conv.forced_bits = FLOAT_BITS if layer.act_bits is None else float(layer.act_bits)
        conv.weight_quant.bits = int(FLOAT_BITS) if layer.w_bits is None else layer.w_bits
        conv.integer_bias = True
    ranges = {layer["name"]: layer.get("output_range") for layer in record["layers"]}
    for entry in summary or ():
        placement = str(entry.get("output", ""))
        if placement.startswith("8-bit output range"):
            low, high = ranges[entry["name"]]
            relu = "ReLU folded" in placement
            conv = convs[entry["name"]]
            conv.output_bounds = (0.0 if relu else min(low, 0.0), max(high, 0.0))
            if dialect == "tensorrt":  # symmetric int8 on max(|lo|, |hi|), ReLU cuts at 0
                conv.output_bounds, conv.output_symmetric = (low, high), True
    qnet.forced_d_img = spec.offsets[0] if spec.offsets else 0
    return qnet.eval()
