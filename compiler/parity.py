"""The simulated PyTorch network of one bundle engine, for parity checks of real engines.

An engine's manifest entry fixes every layer's kernel precision and emulated grids; the
simulation of that engine is the record's quantized network with exactly those bits forced per
layer (``QConv2d.forced_bits``; a float layer is > 8 bits, i.e. not quantized) and its weight grid
widths, or the full-precision network for the reference engine. Where the ONNX Runtime lowering
requantized a conv output to 8 bits for speed (placement ``8-bit output range`` in the engine's
lowering summary), the simulation quantizes that output the same way (``QConv2d.output_bounds``:
the calibrated range widened to contain 0, ``[0, hi]`` when a ReLU was folded; symmetric on
``max(|lo|, |hi|)`` in the TensorRT dialect), its bias on the int32 lattice where a Q follows the
conv (ONNX Runtime quantizes the bias of those only), and residual streams
quantized where they are made (``stream_bounds``: every reader of the stream, the skip path too,
takes the values on the 8-bit grid of the conv it feeds): the engine's
arithmetic, which the papers' simulation does not have. ``benchmarks/bundle_parity.py`` reports
both. ``PSNR(engine, simulation)`` then
measures only what the lowering and the integer kernels change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from compiler.quant.quantizers import quantize_asymmetric
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
        conv.integer_bias = summary is None  # refined per layer from the summary below
    ranges = {layer["name"]: layer.get("output_range") for layer in record["layers"]}
    for entry in summary or ():
        placement = str(entry.get("output", ""))
        # ONNX Runtime turns a conv's bias into int32 on the s_x * s_w lattice only when a Q
        # follows the conv (a full QDQ group, run as QLinearConv); a float output keeps it float
        convs[entry["name"]].integer_bias = placement != "float"
        if placement.startswith("8-bit output range"):
            low, high = ranges[entry["name"]]
            relu = "ReLU folded" in placement
            conv = convs[entry["name"]]
            conv.output_bounds = (0.0 if relu else min(low, 0.0), max(high, 0.0))
            if dialect == "tensorrt":  # symmetric int8 on max(|lo|, |hi|), ReLU cuts at 0
                conv.output_bounds, conv.output_symmetric = (low, high), True
        if entry.get("input_bounds"):  # the grid the engine uses (widened, stream, frozen gate)
            low, high = entry["input_bounds"]
            conv = convs[entry["name"]]
            with torch.no_grad():
                conv.act_quant.lower.fill_(low)
                conv.act_quant.upper.fill_(high)
            if entry.get("frozen_gate"):
                conv.gate = None  # the engine runs the gate frozen at its calibration mean
    qnet.forced_d_img = spec.offsets[0] if spec.offsets else 0
    qnet.eval()
    streams = [entry["name"] for entry in summary or () if entry.get("stream_bounds")]
    if streams:
        _quantize_streams(qnet, {name: convs[name] for name in streams})
    return qnet


def _quantize_streams(qnet: nn.Module, convs: Mapping[str, Any]) -> None:
    """Quantize each residual stream where it is made (the output of the module whose output a
    stream conv reads), on that conv's grid: the skip path then carries the same values as in
    the engine, where every reader of the stream takes the one quantized tensor."""
    outputs: dict[int, str] = {}
    inputs: dict[str, int] = {}
    keep: list[Tensor] = []
    def produced(name: str) -> Any:
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            if isinstance(out, Tensor):
                outputs[id(out)] = name
                keep.append(out)  # alive until the trace ends: ids are not reused
        return hook

    def read(name: str) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            inputs[name] = id(args[0])
        return hook

    hooks = [module.register_forward_hook(produced(name))
             for name, module in qnet.named_modules() if name]
    hooks += [conv.register_forward_pre_hook(read(name)) for name, conv in convs.items()]
    with torch.no_grad():
        qnet(torch.rand(1, 3, 16, 16))
    for hook in hooks:
        hook.remove()
    for name, conv in convs.items():
        producer = outputs.get(inputs.get(name, -1))
        if producer is None:
            raise ConfigError(f"cannot find the module whose output is the stream read by "
                              f"{name!r}: this network's residual stream is not a module output")
        act = conv.act_quant

        def quantize(_m: nn.Module, _i: Any, out: Tensor, act: Any = act) -> Tensor:
            return quantize_asymmetric(out, act.lower, act.upper, torch.tensor(8.0))

        qnet.get_submodule(producer).register_forward_hook(quantize)
