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

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from runtime.backends import BACKENDS, runtime_backend
from runtime.bundlepaths import (
    check_single_file_onnx,
    engine_name_problem,
    relpath_problem,
    target_name_problem,
)
from runtime.errors import BundleError, unknown_name
from runtime.fields import Field, root_field
from runtime.fileio import atomic_write_json, read_bundle_json, sha256_file
from runtime.rungs import RungLadder, ladder_from_json

__all__ = [
    "BACKENDS", "INPUT_NAME", "LADDERS", "MANIFEST_NAME", "METHODS", "MIN_OPSET", "OFFSETS",
    "PRECISIONS", "QUANT_BITS", "SCALES", "SCHEMA", "THREADS", "TILES", "BuildInfo",
    "CalibrationInfo", "DeviceMatch", "EngineSpec", "FileRef", "LayerPlan", "Manifest",
    "ModelInfo", "Precision", "file_ref", "max_overlap", "read_manifest", "sha256_problem",
    "write_manifest",
]

SCHEMA = "adasr.bundle/1"
MANIFEST_NAME = "manifest.json"
INPUT_NAME = "lr"  # every engine's input tensor (N, 3, H, W LR tiles)
LADDERS = ("hardware", "emulate")
# Kernel precisions, cheapest first (a target's precision ladder follows this order).
Precision = Literal["fp4", "fp8", "int8", "fp16", "bf16", "fp32"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
OFFSETS = (-1, 0, 1)  # the image offsets of the bit mapping
STATISTIC = "sobel-complexity/1"  # runtime.statistic's formula
# Sane ranges of the manifest's numbers (a bundle outside them is refused when read).
TILES = (8, 4096)  # LR tile edge
SCALES = (1, 8)
THREADS = (0, 256)  # 0: the backend's default
LAYER_BITS = (1, 32)  # emulated grid / weight bits of a layer
QUANT_BITS = (2, 8)  # a calibration's base weight / activation bits
# calibration methods (Granular-DQ and CADyQ since the deployment of per-patch bit classes: a
# superset, so older bundles stay readable)
METHODS = ("adabm", "ddtb", "minmax", "percentile", "granular", "cadyq")
MIN_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear (per-channel weights) needs opset 13
MAX_EDGE = 1 << 16  # an engine input dimension
MAX_BYTES = 1 << 40
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class FileRef:
    """A file of the bundle: path relative to the bundle folder, its sha256 and size."""

    path: str
    sha256: str
    bytes: int

    def __post_init__(self) -> None:
        problem = relpath_problem(self.path)
        if problem is not None:
            raise BundleError(f"bundle file path {self.path!r}: expected {problem}")


def file_ref(root: Path, path: Path) -> FileRef:
    """The manifest entry of a file written under the bundle folder ``root`` (ONNX graphs are
    checked to be single files: external data would escape the checksums)."""
    if path.suffix == ".onnx":
        check_single_file_onnx(path, f"engine graph {path.name}")
    return FileRef(path.relative_to(root).as_posix(), sha256_file(path), path.stat().st_size)


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

    def __post_init__(self) -> None:
        problem = engine_name_problem(self.name)
        if problem is not None:
            raise BundleError(f"engine name {self.name!r}: expected {problem}")

    @property
    def runnable_file(self) -> FileRef | None:
        """What the backend loads: the plan built on the device (TensorRT), else the ONNX graph."""
        return self.plan if runtime_backend(self.backend).runs_plans else self.onnx


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
    """How a target recognises a machine (the target file's rules, copied into the manifest):
    any one non-empty rule that matches is enough; all empty = any device.

    ``machine``: exact ``platform.machine()`` values (CPU backends). ``jetson_model``:
    substrings of /proc/device-tree/model. ``gpu_name``: substrings of ``nvidia-smi
    --query-gpu=name``. Substrings compare case-insensitively.
    """

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
    backend_version: str | None = None  # the bundle backend's library version at build time
    capabilities: tuple[str, ...] = ()  # precisions the backend ran on the build machine (probe)


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
    if target_name_problem(m.target) is not None:
        raise BundleError(f"target {m.target!r}: expected {target_name_problem(m.target)}")
    if m.statistic != STATISTIC:
        raise BundleError(f"manifest statistic {m.statistic!r} is not computed by this adasr "
                          f"(it computes {STATISTIC!r}): rebuild the bundle with this version")
    if not (TILES[0] <= m.tile <= TILES[1] and 0 <= m.overlap <= max_overlap(m.tile)
            and SCALES[0] <= m.model.scale <= SCALES[1] and THREADS[0] <= m.threads <= THREADS[1]):
        raise BundleError(f"tile {m.tile}, overlap {m.overlap}, scale {m.model.scale}, threads "
                          f"{m.threads}: need tile in {TILES[0]}..{TILES[1]}, overlap in "
                          f"0..tile//2 - 1, scale in {SCALES[0]}..{SCALES[1]}, threads in "
                          f"{THREADS[0]}..{THREADS[1]}")
    low, high = m.thresholds
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise BundleError(f"thresholds {m.thresholds} must be finite and ordered (lower <= upper)")
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
    if m.profile is not None and relpath_problem(m.profile) is not None:
        raise BundleError(f"profile path {m.profile!r}: expected {relpath_problem(m.profile)}")


def max_overlap(tile: int) -> int:
    """The largest overlap a tile of ``tile`` LR pixels takes (below ``tile // 2``)."""
    return max(0, tile // 2 - 1)


# ---------------------------------------------------------------- reading


def sha256_problem(text: str) -> str | None:
    """None when ``text`` is a sha256 hex digest, else what is expected."""
    return None if _HEX64.fullmatch(text) else "a sha256 (64 lowercase hex digits)"


def _sha256(f: Field) -> str:
    return f.check(sha256_problem)


def _file(f: Field) -> FileRef:
    return FileRef(f["path"].check(relpath_problem), _sha256(f["sha256"]),
                   f["bytes"].integer(0, MAX_BYTES))


def _optional_str(f: Field | None) -> str | None:
    return None if f is None else f.text()


def _layer(f: Field) -> LayerPlan:
    act, w = f.get("act_bits"), f.get("w_bits")
    return LayerPlan(f["name"].text(256), f["precision"].choice(PRECISIONS),
                     None if act is None else act.integer(*LAYER_BITS),
                     None if w is None else w.integer(*LAYER_BITS))


def _engine(f: Field) -> EngineSpec:
    plan = f.get("plan")
    offsets = tuple(d.integer(min(OFFSETS), max(OFFSETS)) for d in f["offsets"].items(0, 3))
    if len(set(offsets)) != len(offsets):
        f["offsets"].fail("distinct image offsets among -1, 0, 1")
    n, c, h, w = (d.integer(-1, MAX_EDGE) for d in f["input_shape"].items(4, 4))
    if 0 in (n, c, h, w):
        f["input_shape"].fail("N, C, H, W each -1 (dynamic) or >= 1")
    return EngineSpec(
        name=f["name"].check(engine_name_problem), backend=f["backend"].choice(BACKENDS),
        onnx=_file(f["onnx"]), plan=None if plan is None else _file(plan),
        precision=f["precision"].choice((*PRECISIONS, "mixed")), offsets=offsets,
        reference=f["reference"].boolean(), fab=f["fab"].number(0, 32),
        layers=tuple(_layer(layer) for layer in f["layers"].items()),
        input_shape=(n, c, h, w), cache_key=_optional_str(f.get("cache_key")),
        note=_optional_str(f.get("note")) or "")


def _names(f: Field | None) -> tuple[str, ...]:
    """A device rule's values (absent or null: empty, i.e. any device)."""
    return () if f is None else tuple(v.text(256) for v in f.items())


def _device_match(f: Field | None) -> DeviceMatch:
    if f is None:  # absent or null: no device rule (the bundle runs anywhere)
        return DeviceMatch()
    return DeviceMatch(machine=_names(f.get("machine")),
                       jetson_model=_names(f.get("jetson_model")),
                       gpu_name=_names(f.get("gpu_name")))


def _build(f: Field) -> BuildInfo:
    return BuildInfo(adasr=f["adasr"].text(256), created=f["created"].text(256),
                     opset=f["opset"].integer(1, 1000),
                     onnxruntime=_optional_str(f.get("onnxruntime")),
                     tensorrt=_optional_str(f.get("tensorrt")),
                     device=_optional_str(f.get("device")),
                     finish_command=_optional_str(f.get("finish_command")),
                     backend_version=_optional_str(f.get("backend_version")),
                     capabilities=_precisions(f.get("capabilities")))


def _precisions(f: Field | None) -> tuple[str, ...]:
    return () if f is None else tuple(p.choice(PRECISIONS) for p in f.items(0, len(PRECISIONS)))


def manifest_from_json(data: object) -> Manifest:
    """Parse manifest data; raises one-line :class:`BundleError`s naming the first bad field
    (``manifest field engines[1].onnx.path: expected ..., got ...``), for any JSON value."""
    _require_schema(data.get("schema") if isinstance(data, Mapping) else None)
    f = root_field(data, "manifest", BundleError)
    tile = f["tile"].integer(*TILES)
    statistic = f["statistic"].text(256)
    if statistic != STATISTIC:
        f["statistic"].fail(f"{STATISTIC!r} (the statistic this adasr computes; rebuild the "
                            "bundle with this version)")
    low, high = (t.number() for t in f["thresholds"].items(2, 2))
    if low > high:
        f["thresholds"].fail("two ordered numbers (lower <= upper)")
    model, cal = f["model"], f["calibration"]
    profile = f.get("profile")
    return Manifest(
        model=ModelInfo(model["name"].text(256), model["arch"].text(256),
                        model["scale"].integer(*SCALES), _sha256(model["sha256"])),
        target=f["target"].check(target_name_problem), backend=f["backend"].choice(BACKENDS),
        ladder=f["ladder"].choice(LADDERS), tile=tile,
        overlap=f["overlap"].integer(0, max_overlap(tile)), threads=f["threads"].integer(*THREADS),
        thresholds=(low, high), engines=tuple(_engine(e) for e in f["engines"].items(1, 64)),
        calibration=CalibrationInfo(
            file=_file(cal["file"]), method=cal["method"].choice(METHODS),
            wbits=cal["wbits"].integer(*QUANT_BITS), abits=cal["abits"].integer(*QUANT_BITS),
            fq=cal["fq"].boolean()),
        build=_build(f["build"]), device_match=_device_match(f.get("device_match")),
        statistic=statistic, profile=None if profile is None else profile.check(relpath_problem),
        schema=SCHEMA, rungs=ladder_from_json(f.get("rungs")))


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
