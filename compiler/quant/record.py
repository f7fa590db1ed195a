"""The calibration record: a small versioned JSON file that fully determines a quantized network.

It holds the settings, the checkpoint's identity (sha256), the image thresholds, and per layer
the weight clip, activation bounds, layer offset, (DDTB) gate weights, (CADyQ) bit selector and
whether the layer is one of the trunk's ends (``SRNet.trunk_ends``: what the engine plan keeps
at top precision).
Loading it executes no code (plain JSON). ``apply_record`` rebuilds the exact quantized network
on the loaded model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from compiler.quant.cadyq import CANDIDATES, GRADIENT_FEATURES, BitSelector, candidate_bits
from compiler.quant.ddtb import DynamicGate
from compiler.quant.qmodel import CALIBRATION_METHODS, QuantizedSR, QuantSettings
from compiler.quant.quantizers import MAX_INT_BITS
from compiler.zoo.base import LoadedModel
from runtime.errors import CalibrationError
from runtime.fields import Field, root_field
from runtime.fileio import atomic_write_json
from runtime.manifest import QUANT_BITS, SCALES, sha256_problem

SCHEMA = "adasr.calibration/2"
SCHEMA_V1 = "adasr.calibration/1"  # read and migrated: no settings.image_step, no granular
# Schema 2 also holds CADyQ (method "cadyq", a "selector" per adaptive layer): an optional field
# and a method a schema-2 reader without it refuses by name, so no new version. The same holds
# for CADyQ's deployment ("clusters", ``RecordClusters``): present, it says that the bit vectors
# are the clustered configurations and the image thresholds their router; a reader that ignores
# it still simulates the selector network, which is what the record's selectors describe.
V1_METHODS = ("adabm", "ddtb", "minmax", "percentile")  # the methods of schema 1

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
    offsets = qnet.hard_layer_offsets()
    layers = []
    ends = set(loaded.model.trunk_ends())
    for name, conv in qnet.qconvs():
        gate = None
        if conv.gate is not None:
            state = conv.gate.state_dict()
            gate = {key: _values(state[src]) for key, src in _GATE_TENSORS.items()}
            gate["channels"] = conv.conv.in_channels
            gate["mean_scale"] = list(conv.gate_mean) if conv.gate_mean else None
        selector = None
        if conv.selector is not None:
            sel = conv.selector
            selector = {"candidates": [int(b) for b in sel.candidates.tolist()],
                        "weight": _values(sel.linear.weight), "bias": _values(sel.linear.bias),
                        "mean": _values(sel.mean), "scale": _values(sel.scale)}
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
            "selector": selector,
            "trunk_end": name in ends,
        })
    s = qnet.settings
    info = loaded.info
    deployment = qnet.deployment or {}
    return {
        "schema": SCHEMA,
        "settings": {"method": s.method, "wbits": s.wbits, "abits": s.abits, "fq": s.fq,
                     "per_channel": s.per_channel, "symmetric": s.symmetric,
                     "image_step": s.image_step},
        "checkpoint": {"file": info.path.name, "sha256": info.sha256, "arch": info.arch,
                       "scale": info.scale, "config": dict(info.config)},
        "image_thresholds": [qnet.image_to_bit.lower.item(), qnet.image_to_bit.upper.item()],
        "bit_vectors": deployment.get("bit_vectors",
                                      {str(k): v for k, v in qnet.bit_vectors().items()}),
        "layers": layers,
        "calibration": calibration,
        **({"clusters": deployment["clusters"]} if "clusters" in deployment else {}),
    }


def save_record(path: Path, record: dict[str, Any]) -> None:
    atomic_write_json(path, record)


# ---------------------------------------------------------------- the typed record

LAYER_KINDS = ("fixed", "adaptive")
MAX_VECTOR_BITS = MAX_INT_BITS + 2  # base bits + image offset + layer offset
MAX_TENSOR_VALUES = 1 << 24


@dataclass(frozen=True)
class RecordCheckpoint:
    file: str
    sha256: str
    arch: str
    scale: int
    config: Mapping[str, Any]


@dataclass(frozen=True, eq=False)
class RecordGate:
    """A DDTB gate: its tensors (by record key, see ``_GATE_TENSORS``) and mean scales."""

    channels: int
    tensors: Mapping[str, np.ndarray]
    mean_scale: tuple[float, float] | None


@dataclass(frozen=True, eq=False)
class RecordSelector:
    """A CADyQ bit selector: candidates (low, base, high), ``logits = weight @ z + bias`` on the
    standardized features ``z = (f - mean) / scale``, ``f`` = image gradients (2) + channel stds."""

    candidates: tuple[int, int, int]
    weight: np.ndarray  # [3, 2 + C]
    bias: np.ndarray  # [3]
    mean: np.ndarray  # [2 + C]
    scale: np.ndarray  # [2 + C], > 0


@dataclass(frozen=True, eq=False)
class RecordLayer:
    name: str
    kind: str  # "fixed" | "adaptive"
    in_channels: int | None
    w_bits: int
    w_clip: float | tuple[float, ...]  # per tensor, or per output channel
    a_bounds: tuple[float, float]
    layer_offset: int
    output_range: tuple[float, float] | None
    input_range: tuple[float, float] | None
    gate: RecordGate | None
    trunk_end: bool
    selector: RecordSelector | None = None


@dataclass(frozen=True)
class RecordClusters:
    """CADyQ's deployment (``compiler.quant.clusters``): the selectors' per-patch, per-layer bits
    on ``patches`` calibration patches clustered into ``count`` configurations, which are the
    record's bit vectors (one engine each, classes -1 / 0 / +1 by mean bits), routed at runtime
    by the complexity statistic against the record's image thresholds. ``agreement``: the share
    of those patches whose routed class is the nearest configuration to the selectors' own bits;
    ``shares``: the share of patches nearest to each class's configuration (-1, 0, +1)."""

    count: int
    patches: int
    agreement: float
    shares: tuple[float, float, float]


@dataclass(frozen=True, eq=False)
class CalibrationRecord:
    """A validated calibration record. ``data`` is the same record as JSON data (what the
    lowering and the bundle writer take), checked field by field by :func:`record_from_json`."""

    settings: QuantSettings
    checkpoint: RecordCheckpoint
    image_thresholds: tuple[float, float]
    bit_vectors: Mapping[int, tuple[int, ...]]
    layers: tuple[RecordLayer, ...]
    data: Mapping[str, Any]
    clusters: RecordClusters | None = None

    @property
    def deployable(self) -> bool:
        """Whether the bit vectors are engines (every method but a CADyQ record not yet
        clustered, whose vectors are only its candidates)."""
        return not self.settings.selector or self.clusters is not None


def _range(f: Field) -> tuple[float, float]:
    low, high = (v.number() for v in f.items(2, 2))
    if low > high:
        f.fail("two finite numbers, lower <= upper")
    return low, high


def _optional_range(f: Field | None) -> tuple[float, float] | None:
    return None if f is None else _range(f)


def _tensor(f: Field) -> np.ndarray:
    """A finite number or a rectangular nested list of them."""
    try:
        array = np.asarray(f.value, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        f.fail("a number or a rectangular list of numbers")
    if (isinstance(f.value, bool) or array.dtype != np.float64 or array.ndim > 4
            or array.size > MAX_TENSOR_VALUES or not bool(np.isfinite(array).all())):
        f.fail("finite numbers (a scalar or a rectangular list of up to 4 dimensions)")
    return array


def _gate(f: Field) -> RecordGate:
    scale = f.get("mean_scale")
    mean_scale = None
    if scale is not None:
        first, second = (v.number() for v in scale.items(2, 2))
        mean_scale = (first, second)
    return RecordGate(channels=f["channels"].integer(1, 1 << 16),
                      tensors={key: _tensor(f[key]) for key in _GATE_TENSORS},
                      mean_scale=mean_scale)


def _shaped(f: Field, shape: tuple[int, ...]) -> np.ndarray:
    array = _tensor(f)
    if array.shape != shape:
        f.fail(f"numbers of shape {list(shape)}")
    return array


def _selector(f: Field, channels: int | None) -> RecordSelector:
    if channels is None:
        f.fail("a selector on a layer with in_channels")
    low, base, high = (v.integer(0, MAX_VECTOR_BITS) for v in f["candidates"].items(3, 3))
    if not low < base < high:
        f["candidates"].fail("three increasing bit-widths")
    width = channels + GRADIENT_FEATURES
    scale = _shaped(f["scale"], (width,))
    if not bool((scale > 0).all()):
        f["scale"].fail("positive numbers")
    return RecordSelector(candidates=(low, base, high),
                          weight=_shaped(f["weight"], (CANDIDATES, width)),
                          bias=_shaped(f["bias"], (CANDIDATES,)),
                          mean=_shaped(f["mean"], (width,)), scale=scale)


def _layer(f: Field) -> RecordLayer:
    clip = f["w_clip"]
    w_clip: float | tuple[float, ...] = (
        tuple(v.number(0) for v in clip.items(1, 1 << 16)) if isinstance(clip.value, list)
        else clip.number(0))
    in_channels, gate, trunk_end = f.get("in_channels"), f.get("gate"), f.get("trunk_end")
    channels = None if in_channels is None else in_channels.integer(1, 1 << 16)
    selector = f.get("selector")
    return RecordLayer(
        name=f["name"].text(256), kind=f["kind"].choice(LAYER_KINDS),
        in_channels=channels,
        w_bits=f["w_bits"].integer(*QUANT_BITS), w_clip=w_clip, a_bounds=_range(f["a_bounds"]),
        layer_offset=f["layer_offset"].integer(-1, 1),
        output_range=_optional_range(f.get("output_range")),
        input_range=_optional_range(f.get("input_range")),
        gate=None if gate is None else _gate(gate),
        trunk_end=False if trunk_end is None else trunk_end.boolean(),
        selector=None if selector is None else _selector(selector, channels))


def _check_selectors(f: Field, settings: QuantSettings, layers: tuple[RecordLayer, ...]) -> None:
    """CADyQ: a selector on every adaptive layer, with the settings' candidates; none otherwise."""
    expected = candidate_bits(settings.abits, settings.image_step)
    for index, layer in enumerate(layers):
        wanted = settings.selector and layer.kind == "adaptive"
        where = f["layers"].items()[index]
        if wanted and layer.selector is None:
            where.fail(f"a selector (method {settings.method}, adaptive layer)")
        if not wanted and layer.selector is not None:
            where["selector"].fail(f"null (method {settings.method}, {layer.kind} layer)")
        if layer.selector is not None and layer.selector.candidates != expected:
            where["selector"]["candidates"].fail(f"{list(expected)} for --abits {settings.abits}")


def _settings(f: Field) -> QuantSettings:
    per_channel = f.get("per_channel")
    symmetric = f.get("symmetric")
    fq = f.get("fq")
    settings = QuantSettings(method=f["method"].choice(CALIBRATION_METHODS),
                             wbits=f["wbits"].integer(*QUANT_BITS),
                             abits=f["abits"].integer(*QUANT_BITS),
                             fq=False if fq is None else fq.boolean(),
                             per_channel=None if per_channel is None else per_channel.boolean(),
                             symmetric=False if symmetric is None else symmetric.boolean())
    if f["image_step"].integer(1, 2) != settings.image_step:
        f["image_step"].fail(f"{settings.image_step} for method {settings.method}")
    return settings


def migrate(data: Mapping[str, Any], source: str) -> Mapping[str, Any]:
    """A record of an older schema as the current one (the input is not changed).

    ``adasr.calibration/1`` -> ``/2``: the settings gain ``image_step`` (bits between the image
    classes), 1 for every method version 1 knew; Granular-DQ (step 2) did not exist."""
    if data.get("schema") != SCHEMA_V1:
        return data
    settings = data.get("settings")
    if not isinstance(settings, Mapping):
        return data  # the reader names the missing field
    if settings.get("method") not in V1_METHODS:
        raise CalibrationError(f"{source}: method {settings.get('method')!r} is not a "
                               f"{SCHEMA_V1!r} method (allowed: {', '.join(V1_METHODS)})")
    return {**data, "schema": SCHEMA, "settings": {**settings, "image_step": 1}}


MAX_CLUSTERS = len(("-1", "0", "1"))  # one configuration per runtime image class


def _clusters(f: Field, settings: QuantSettings, vectors_field: Field,
              vectors: Mapping[int, tuple[int, ...]]) -> RecordClusters:
    """CADyQ's clusters: the bit vectors are then configurations of the selectors' candidates."""
    if not settings.selector:
        f.fail(f"null (method {settings.method} has no selectors to cluster)")
    allowed = candidate_bits(settings.abits, settings.image_step)
    for offset, bits in vectors.items():
        if any(b not in allowed for b in bits):
            vectors_field[str(offset)].fail(
                f"bits out of the selectors' candidates {list(allowed)} (clustered record)")
    shares = tuple(v.number(0, 1) for v in f["shares"].items(3, 3))
    return RecordClusters(count=f["count"].integer(1, MAX_CLUSTERS),
                          patches=f["patches"].integer(1, 1 << 24),
                          agreement=f["agreement"].number(0, 1),
                          shares=(shares[0], shares[1], shares[2]))


def clusters_json(clusters: RecordClusters) -> dict[str, Any]:
    """The record's ``clusters`` field (the one writer; :func:`_clusters` reads it)."""
    return {"count": clusters.count, "patches": clusters.patches,
            "agreement": clusters.agreement, "shares": list(clusters.shares)}


def _bit_vectors(f: Field, settings: QuantSettings,
                 adaptive: int) -> dict[int, tuple[int, ...]]:
    expected = ("-1", "0", "1") if settings.dynamic else ("0",)
    members = dict(f.members())
    if sorted(members) != sorted(expected):
        f.fail(f"one bit vector per image offset {', '.join(expected)} ({settings.method})")
    vectors = {}
    for key in expected:
        bits = tuple(b.integer(0, MAX_VECTOR_BITS) for b in members[key].items(adaptive, adaptive))
        vectors[int(key)] = bits
    return vectors


def record_from_json(data: object, source: str = "calibration record") -> CalibrationRecord:
    """Validate calibration record data (any JSON value): a :class:`CalibrationRecord`, or one
    :class:`CalibrationError` line naming the first bad field (``source`` names the file)."""
    if not isinstance(data, Mapping) or data.get("schema") not in (SCHEMA, SCHEMA_V1):
        found = data.get("schema") if isinstance(data, Mapping) else type(data).__name__
        raise CalibrationError(f"{source}: unsupported record schema {found!r}; expected "
                               f"{SCHEMA!r} (or {SCHEMA_V1!r}, migrated)")
    data = migrate(data, source)
    f = root_field(data, source, CalibrationError)
    settings = _settings(f["settings"])
    c = f["checkpoint"]
    checkpoint = RecordCheckpoint(
        file=c["file"].text(1024),
        sha256=c["sha256"].check(sha256_problem),
        arch=c["arch"].text(256), scale=c["scale"].integer(*SCALES), config=c["config"].obj())
    layers = tuple(_layer(layer) for layer in f["layers"].items(1, 4096))
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        f["layers"].fail("layers with distinct names")
    adaptive = sum(layer.kind == "adaptive" for layer in layers)
    _check_selectors(f, settings, layers)
    thresholds = _range(f["image_thresholds"])
    vectors = _bit_vectors(f["bit_vectors"], settings, adaptive)
    calibration = f.get("calibration")
    if calibration is not None:
        calibration.obj()
    clusters = f.get("clusters")
    return CalibrationRecord(settings, checkpoint, thresholds, vectors, layers, data,
                             None if clusters is None else _clusters(clusters, settings,
                                                                    f["bit_vectors"], vectors))


def read_record(path: Path) -> CalibrationRecord:
    """The validated calibration record at ``path`` (CalibrationError naming a bad field)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise CalibrationError(f"calibration record not found: {path}") from err
    except IsADirectoryError as err:
        raise CalibrationError(f"calibration record {path} is a folder, not a file") from err
    except OSError as err:
        raise CalibrationError(f"cannot read calibration record {path}: "
                               f"{err.strerror or err}") from err
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise CalibrationError(f"{path} is not a calibration record (invalid JSON: {err})") from err
    return record_from_json(data, f"calibration record {path.name}")


def settings_of(record: Mapping[str, Any] | CalibrationRecord) -> QuantSettings:
    return as_record(record).settings


def as_record(record: Mapping[str, Any] | CalibrationRecord) -> CalibrationRecord:
    """``record`` validated (JSON data from ``record_of`` or a file goes through the reader)."""
    return record if isinstance(record, CalibrationRecord) else record_from_json(record)


def apply_record(loaded: LoadedModel, record: Mapping[str, Any] | CalibrationRecord,
                 routed: bool = False) -> QuantizedSR:
    """Rebuild the quantized network of ``record`` on ``loaded`` (which it consumes).

    ``routed``: the network as a bundle's engines run it, each patch on the bit vector of its
    image class (``QuantizedSR.route``): for CADyQ the clustered configurations in place of the
    selectors (a record without clusters is refused); the same network for AdaBM and
    Granular-DQ, whose classes already are their engines."""
    rec = as_record(record)
    if routed and not (rec.settings.dynamic and rec.deployable):
        raise CalibrationError(
            f"a routed network needs a dynamic record with engine bit vectors; this "
            f"{rec.settings.method} record has " + (
                "no clustered configurations (cluster it: compiler.quant.clusters)"
                if rec.settings.selector else "one bit vector"))
    if loaded.info.sha256 != rec.checkpoint.sha256:
        raise CalibrationError(
            f"the calibration record was made for {rec.checkpoint.file} "
            f"(sha256 {rec.checkpoint.sha256[:12]}...), not for {loaded.info.path.name} "
            f"(sha256 {loaded.info.sha256[:12]}...): calibrate this checkpoint first")
    qnet = QuantizedSR(loaded.model, rec.settings)
    by_name = dict(qnet.qconvs())
    names = [layer.name for layer in rec.layers]
    if sorted(names) != sorted(by_name):
        raise CalibrationError(f"record layers {names[:4]}... do not match the network's quantized "
                               f"layers {list(by_name)[:4]}...")
    with torch.no_grad():
        qnet.image_to_bit.lower.fill_(rec.image_thresholds[0])
        qnet.image_to_bit.upper.fill_(rec.image_thresholds[1])
        for layer in rec.layers:
            try:
                _apply_layer(qnet, by_name[layer.name], layer)
            except RuntimeError as err:  # a tensor of the wrong shape
                raise CalibrationError(f"record layer {layer.name!r} does not fit the network: "
                                       f"{' '.join(str(err).split())[:300]}") from err
    if rec.clusters is not None:
        qnet.deployment = {"bit_vectors": {str(k): list(v) for k, v in rec.bit_vectors.items()},
                           "clusters": clusters_json(rec.clusters)}
    if routed:
        qnet.route(rec.bit_vectors)
    qnet.eval()
    return qnet


def _apply_layer(qnet: QuantizedSR, conv: Any, layer: RecordLayer) -> None:
    conv.weight_quant.clip.copy_(torch.tensor(layer.w_clip, dtype=conv.weight_quant.clip.dtype))
    conv.act_quant.lower.fill_(layer.a_bounds[0])
    conv.act_quant.upper.fill_(layer.a_bounds[1])
    if conv.layer_index is not None:
        qnet.layer_to_bit.offsets[conv.layer_index] = float(layer.layer_offset)
    if layer.output_range:
        conv.output_range = layer.output_range
    if layer.input_range:
        conv.input_range = layer.input_range
    if layer.selector is not None:
        sel = layer.selector
        selector = BitSelector(conv.conv.in_channels, sel.candidates)
        selector.load_state_dict({
            name: torch.tensor(value, dtype=torch.float32) for name, value in (
                ("linear.weight", sel.weight), ("linear.bias", sel.bias), ("mean", sel.mean),
                ("scale", sel.scale), ("candidates", np.asarray(sel.candidates)))})
        conv.selector = selector
    if layer.gate is not None:
        gate = DynamicGate(layer.gate.channels)
        gate.load_state_dict({src: torch.tensor(layer.gate.tensors[key], dtype=torch.float32)
                              for key, src in _GATE_TENSORS.items()}, strict=False)
        conv.gate = gate
        if layer.gate.mean_scale:
            conv.gate_mean = layer.gate.mean_scale
