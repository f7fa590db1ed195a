"""The bundle manifest: the one contract between the compiler, the runtime and the profiler.

A bundle is a folder ``<model>-<target>/`` holding ``manifest.json``, the engines (ONNX graphs;
TensorRT plans once built on the device), the calibration record and, after ``adasr profile``,
a profile. The manifest says, per engine, which file to load and its sha256, the backend, the
kernel precision and the emulated bit-width of every layer, the FAB, and the image offsets the
engine serves under the calibrated ``threshold`` policy. It is plain JSON (schema
``adasr.bundle/1``), read and validated here with no project imports, because the runtime that
ships to a device reads nothing else.

Engine names are stable handles (``int8``, ``a6``, ``fp32`` ...); exactly one engine is the
``reference`` (the target's top precision), and every image offset maps to exactly one engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import BundleError, unknown_name
from runtime.fileio import atomic_write_json, read_bundle_json
from runtime.rungs import RungLadder, ladder_from_json

__all__ = [
    "BACKENDS", "LADDERS", "MANIFEST_NAME", "OFFSETS", "PRECISIONS", "SCHEMA", "BuildInfo",
    "CalibrationInfo", "DeviceMatch", "EngineSpec", "FileRef", "LayerPlan", "Manifest",
    "ModelInfo", "read_manifest", "write_manifest",
]

SCHEMA = "adasr.bundle/1"
MANIFEST_NAME = "manifest.json"
BACKENDS = ("onnxruntime", "tensorrt")
LADDERS = ("hardware", "emulate")
PRECISIONS = ("fp4", "int8", "fp8", "fp16", "fp32")  # kernel precisions, cheapest first
OFFSETS = (-1, 0, 1)  # the image offsets of the bit mapping
STATISTIC = "sobel-complexity/1"  # runtime.statistic's formula


@dataclass(frozen=True)
class FileRef:
    """A file of the bundle: path relative to the bundle folder, its sha256 and size."""

    path: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class LayerPlan:
    """How one conv runs in one engine: kernel precision and the grids emulated inside it.

    ``act_bits`` / ``w_bits`` are the integer grids of the input activations and weights
    (``None``: float). An INT8 kernel with ``act_bits = 4`` computes a 4-bit grid exactly.
    """

    name: str
    precision: str
    act_bits: int | None
    w_bits: int | None


@dataclass(frozen=True)
class EngineSpec:
    """One engine of a bundle."""

    name: str
    backend: str
    onnx: FileRef  # the portable graph (ONNX Runtime runs it; TensorRT builds a plan from it)
    plan: FileRef | None  # TensorRT plan; None for ONNX Runtime and for plans not yet built
    precision: str  # one of PRECISIONS, or "mixed"
    offsets: tuple[int, ...]  # image offsets this engine serves under the threshold policy
    reference: bool  # the target's top-precision engine (quality reference, upgrade rung)
    fab: float  # feature average bit-width of the grids it computes (float layers count 32)
    layers: tuple[LayerPlan, ...]
    input_shape: tuple[int, int, int, int]  # N, C, H, W; -1 = dynamic
    cache_key: str | None = None  # TensorRT engine cache key
    note: str = ""  # how the build decided something about this engine (e.g. grid widening)

    @property
    def runnable_file(self) -> FileRef | None:
        """What the backend loads: the plan for TensorRT, the ONNX graph for ONNX Runtime."""
        return self.plan if self.backend == "tensorrt" else self.onnx


@dataclass(frozen=True)
class ModelInfo:
    name: str
    arch: str
    scale: int
    sha256: str  # of the checkpoint


@dataclass(frozen=True)
class CalibrationInfo:
    file: FileRef
    method: str
    wbits: int
    abits: int
    fq: bool


@dataclass(frozen=True)
class DeviceMatch:
    """The target's device rules (any listed value matches); empty = anything."""

    machine: tuple[str, ...] = ()
    jetson_model: tuple[str, ...] = ()
    gpu_name: tuple[str, ...] = ()


@dataclass(frozen=True)
class BuildInfo:
    adasr: str
    created: str  # ISO 8601, UTC
    opset: int
    onnxruntime: str | None = None
    tensorrt: str | None = None  # version the plans were built with (None: not built yet)
    device: str | None = None  # GPU name the plans were built on, or the CPU machine
    finish_command: str | None = None  # run on the device to build the pending plans


@dataclass(frozen=True)
class Manifest:
    model: ModelInfo
    target: str
    backend: str
    ladder: str
    tile: int  # LR tile edge, overlap included
    overlap: int
    threads: int  # intra-op threads for CPU engines; 0 = the backend's default
    thresholds: tuple[float, float]  # of the statistic; offset -1 below, +1 above
    engines: tuple[EngineSpec, ...]
    calibration: CalibrationInfo
    build: BuildInfo
    device_match: DeviceMatch = field(default_factory=DeviceMatch)
    statistic: str = STATISTIC
    profile: str | None = None  # relative path of the latest profile, if any
    schema: str = SCHEMA
    rungs: RungLadder = field(default_factory=RungLadder)  # runtime.rungs; older bundles: empty

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.engines)

    @property
    def reference(self) -> EngineSpec:
        return next(e for e in self.engines if e.reference)

    @property
    def pending(self) -> tuple[EngineSpec, ...]:
        """Engines whose runnable file is not built yet (TensorRT plans off the device)."""
        return tuple(e for e in self.engines if e.runnable_file is None)

    def engine(self, name: str) -> EngineSpec:
        for spec in self.engines:
            if spec.name == name:
                return spec
        raise BundleError(unknown_name("engine", name, self.names))

    def engine_for_offset(self, offset: int) -> EngineSpec:
        return next(e for e in self.engines if offset in e.offsets)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _require_schema(schema: object) -> None:
    if schema != SCHEMA:
        raise BundleError(f"manifest schema {schema!r} is not supported; this adasr reads "
                          f"{SCHEMA!r} (rebuild the bundle with this version)")


def _validate(m: Manifest) -> None:
    _require_schema(m.schema)
    if m.backend not in BACKENDS:
        raise BundleError(unknown_name("backend", m.backend, BACKENDS))
    if m.ladder not in LADDERS:
        raise BundleError(unknown_name("ladder", m.ladder, LADDERS))
    if not (m.tile >= 1 and 0 <= m.overlap < m.tile) or m.model.scale < 1:
        raise BundleError(f"tile {m.tile}, overlap {m.overlap}, scale {m.model.scale}: need "
                          "tile >= 1, 0 <= overlap < tile, scale >= 1")
    low, high = m.thresholds
    if not low <= high:
        raise BundleError(f"thresholds {m.thresholds} must be ordered (lower <= upper)")
    names = [e.name for e in m.engines]
    if not names or len(set(names)) != len(names):
        raise BundleError(f"engine names must be unique and non-empty, got {names}")
    for spec in m.engines:
        if spec.backend != m.backend:
            raise BundleError(f"engine {spec.name!r} has backend {spec.backend!r} in a "
                              f"{m.backend} bundle")
        if spec.precision not in (*PRECISIONS, "mixed"):
            raise BundleError(f"engine {spec.name!r}: "
                              + unknown_name("precision", spec.precision, (*PRECISIONS, "mixed")))
        bad = [layer.name for layer in spec.layers if layer.precision not in PRECISIONS]
        if bad:
            raise BundleError(f"engine {spec.name!r}: layers {bad} have a precision outside "
                              f"{', '.join(PRECISIONS)}")
    strays = [r.name for r in m.rungs.rungs if r.engine is not None and r.engine not in names]
    if strays:
        raise BundleError(f"rungs {strays} name engines the bundle does not have ({names})")
    if sum(e.reference for e in m.engines) != 1:
        raise BundleError("a bundle needs exactly one reference engine, found "
                          f"{sum(e.reference for e in m.engines)}")
    served = sorted(d for e in m.engines for d in e.offsets)
    if served != sorted(OFFSETS):
        raise BundleError(f"every image offset {OFFSETS} must map to exactly one engine; the "
                          f"engines serve {served}")


def _file(data: Mapping[str, Any] | None) -> FileRef | None:
    return None if data is None else FileRef(str(data["path"]), str(data["sha256"]),
                                             int(data["bytes"]))


def _engine(data: Mapping[str, Any]) -> EngineSpec:
    onnx = _file(data["onnx"])
    if onnx is None:
        raise BundleError(f"engine {data.get('name')!r} has no ONNX graph")
    shape = tuple(int(v) for v in data["input_shape"])
    if len(shape) != 4:
        raise BundleError(f"engine {data.get('name')!r}: input_shape {shape} is not N, C, H, W")
    return EngineSpec(
        name=str(data["name"]), backend=str(data["backend"]), onnx=onnx, plan=_file(data["plan"]),
        precision=str(data["precision"]), offsets=tuple(int(d) for d in data["offsets"]),
        reference=bool(data["reference"]), fab=float(data["fab"]),
        layers=tuple(LayerPlan(**layer) for layer in data["layers"]),
        input_shape=(shape[0], shape[1], shape[2], shape[3]), cache_key=data.get("cache_key"),
        note=str(data.get("note", "")))


def manifest_from_json(data: Mapping[str, Any]) -> Manifest:
    """Parse manifest data; raises :class:`BundleError` naming the first bad or missing field."""
    _require_schema(data.get("schema") if isinstance(data, Mapping) else None)
    try:
        cal = data["calibration"]
        cal_file = _file(cal["file"])
        if cal_file is None:
            raise BundleError("manifest names no calibration record file")
        return Manifest(
            model=ModelInfo(**data["model"]), target=str(data["target"]),
            backend=str(data["backend"]), ladder=str(data["ladder"]), tile=int(data["tile"]),
            overlap=int(data["overlap"]), threads=int(data["threads"]),
            thresholds=(float(data["thresholds"][0]), float(data["thresholds"][1])),
            engines=tuple(_engine(e) for e in data["engines"]),
            calibration=CalibrationInfo(file=cal_file, method=str(cal["method"]),
                                        wbits=int(cal["wbits"]), abits=int(cal["abits"]),
                                        fq=bool(cal["fq"])),
            build=BuildInfo(**data["build"]),
            device_match=DeviceMatch(**{k: tuple(v) for k, v in data["device_match"].items()}),
            statistic=str(data["statistic"]), profile=data.get("profile"), schema=SCHEMA,
            rungs=ladder_from_json(data.get("rungs")))
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise BundleError(f"manifest is malformed: {type(err).__name__}: {err}") from err


def read_manifest(bundle: Path) -> Manifest:
    """The manifest of the bundle folder ``bundle``."""
    path = bundle / MANIFEST_NAME
    if not path.is_file():
        what = "does not exist" if not bundle.exists() else f"has no {MANIFEST_NAME}"
        raise BundleError(f"bundle {bundle} {what}: build one with `adasr build`")
    data = read_bundle_json(path, "", "does not exist: build the bundle with `adasr build`")
    return manifest_from_json(data)


def write_manifest(bundle: Path, manifest: Manifest) -> None:
    """Write ``manifest.json`` atomically (the last file a build writes)."""
    atomic_write_json(bundle / MANIFEST_NAME, manifest.to_json())
