"""The calibration record: a small versioned JSON file that fully determines a quantized network.

It holds the settings, the checkpoint's identity (sha256), the image thresholds, and per layer
the weight clip, activation bounds, layer offset, (DDTB) gate weights and whether the layer is
one of the trunk's ends (``SRNet.trunk_ends``: what the engine plan keeps at top precision).
Loading it executes no code (plain JSON). ``apply_record`` rebuilds the exact quantized network
on the loaded model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from compiler.quant.ddtb import DynamicGate
from compiler.quant.qmodel import QuantizedSR, QuantSettings
from compiler.zoo.base import LoadedModel
from runtime.errors import CalibrationError
from runtime.fileio import atomic_write_json

SCHEMA = "adasr.calibration/1"

_GATE_TENSORS = {
    "reduce_weight": "reduce.weight", "reduce_bias": "reduce.bias", "reduce_clip": "reduce_clip",
    "norm_mean": "norm.running_mean", "norm_var": "norm.running_var",
    "norm_weight": "norm.weight", "norm_bias": "norm.bias",
    "expand_weight": "expand.weight", "expand_bias": "expand.bias",
}


def _values(t: Tensor) -> float | list[Any]:
    value = t.detach().cpu().float().tolist()
    return value if isinstance(value, list) else float(value)


def record_of(qnet: QuantizedSR, loaded: LoadedModel,
              calibration: dict[str, Any]) -> dict[str, Any]:
    """Everything needed to rebuild ``qnet`` on the same checkpoint, as JSON-ready data."""
    offsets = qnet.layer_to_bit.hard() if qnet.settings.adaptive else [0] * len(qnet.adaptive_names)
    layers = []
    ends = set(loaded.model.trunk_ends())
    for name, conv in qnet.qconvs():
        gate = None
        if conv.gate is not None:
            state = conv.gate.state_dict()
            gate = {key: _values(state[src]) for key, src in _GATE_TENSORS.items()}
            gate["channels"] = conv.conv.in_channels
            gate["mean_scale"] = list(conv.gate_mean) if conv.gate_mean else None
        layers.append({
            "name": name,
            "kind": "fixed" if conv.layer_index is None else "adaptive",
            "in_channels": conv.conv.in_channels,
            "w_bits": conv.weight_quant.bits,
            "w_clip": _values(conv.weight_quant.clip),
            "a_bounds": [conv.act_quant.lower.item(), conv.act_quant.upper.item()],
            "layer_offset": 0 if conv.layer_index is None else offsets[conv.layer_index],
            "output_range": list(conv.output_range) if conv.output_range else None,
            "input_range": list(conv.input_range) if conv.input_range else None,
            "gate": gate,
            "trunk_end": name in ends,
        })
    s = qnet.settings
    info = loaded.info
    return {
        "schema": SCHEMA,
        "settings": {"method": s.method, "wbits": s.wbits, "abits": s.abits, "fq": s.fq,
                     "per_channel": s.per_channel, "symmetric": s.symmetric},
        "checkpoint": {"file": info.path.name, "sha256": info.sha256, "arch": info.arch,
                       "scale": info.scale, "config": dict(info.config)},
        "image_thresholds": [qnet.image_to_bit.lower.item(), qnet.image_to_bit.upper.item()],
        "bit_vectors": {str(k): v for k, v in qnet.bit_vectors().items()},
        "layers": layers,
        "calibration": calibration,
    }


def save_record(path: Path, record: dict[str, Any]) -> None:
    atomic_write_json(path, record)


def read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise CalibrationError(f"calibration record not found: {path}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CalibrationError(f"{path} is not a calibration record (invalid JSON: {err})") from err
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        found = record.get("schema") if isinstance(record, dict) else type(record).__name__
        raise CalibrationError(f"{path}: unsupported record schema {found!r}; expected {SCHEMA!r}")
    return record


def settings_of(record: dict[str, Any]) -> QuantSettings:
    return QuantSettings(**record["settings"])


def apply_record(loaded: LoadedModel, record: dict[str, Any]) -> QuantizedSR:
    """Rebuild the quantized network of ``record`` on ``loaded`` (which it consumes)."""
    expected = record["checkpoint"]["sha256"]
    if loaded.info.sha256 != expected:
        raise CalibrationError(
            f"the calibration record was made for {record['checkpoint']['file']} "
            f"(sha256 {expected[:12]}...), not for {loaded.info.path.name} "
            f"(sha256 {loaded.info.sha256[:12]}...): calibrate this checkpoint first")
    qnet = QuantizedSR(loaded.model, settings_of(record))
    by_name = dict(qnet.qconvs())
    names = [layer["name"] for layer in record["layers"]]
    if sorted(names) != sorted(by_name):
        raise CalibrationError(f"record layers {names[:4]}... do not match the network's quantized "
                               f"layers {list(by_name)[:4]}...")
    with torch.no_grad():
        qnet.image_to_bit.lower.fill_(record["image_thresholds"][0])
        qnet.image_to_bit.upper.fill_(record["image_thresholds"][1])
        for layer in record["layers"]:
            conv = by_name[layer["name"]]
            conv.weight_quant.clip.copy_(torch.tensor(layer["w_clip"]))
            conv.act_quant.lower.fill_(layer["a_bounds"][0])
            conv.act_quant.upper.fill_(layer["a_bounds"][1])
            if conv.layer_index is not None:
                qnet.layer_to_bit.offsets[conv.layer_index] = float(layer["layer_offset"])
            if layer.get("output_range"):
                conv.output_range = tuple(layer["output_range"])
            if layer.get("input_range"):
                conv.input_range = tuple(layer["input_range"])
            if layer["gate"] is not None:
                gate = DynamicGate(int(layer["gate"]["channels"]))
                gate.load_state_dict({src: torch.tensor(layer["gate"][key])
                                      for key, src in _GATE_TENSORS.items()}, strict=False)
                conv.gate = gate
                if layer["gate"].get("mean_scale"):
                    conv.gate_mean = tuple(layer["gate"]["mean_scale"])
    qnet.eval()
    return qnet
