"""TensorRT engines from ONNX engine graphs: the build spec, the engine cache key, the builder.

One :class:`TrtBuildSpec` describes one engine: the Q/DQ ONNX graph, its input shape (static per
tile size, as DLA requires, or a min/opt/max profile), the precision recipe and the device
options. :func:`build_engine` turns it into plan bytes on the machine that will run them
(engines are not portable across TensorRT versions or GPUs); :func:`engine_cache_key` names the
result after everything that invalidates it.

Precision recipes (deployment.md): TensorRT 10.x/11.x build *strongly typed* networks, whose
precision lives in the graph (FP16 casts, INT8 Q/DQ) -- TensorRT 11 has no precision builder
flags at all. TensorRT 8.5 (Jetson Xavier) has no strongly typed networks and builds the same
graph with the legacy ``BuilderFlag.FP16`` / ``BuilderFlag.INT8``.

The builder calls the raw TensorRT API rather than Polygraphy's loaders: ``CreateConfig`` pins
DLA to core 0, its timing-cache writes are not atomic, and testing it with a fake ``tensorrt``
would mean faking Polygraphy's version probing and logger plumbing too; the raw calls are
type-checked against the TensorRT stubs and tested against a small fake module.

``tensorrt`` is imported inside the functions that need it, never at import time.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

from compiler.engines.tensorrt_network import check_int8_convs, inspect_network
from runtime.errors import ConfigError, EngineError, unknown_name
from runtime.fileio import atomic_write_bytes
from targets.loader import Target, probe_device

if TYPE_CHECKING:
    import tensorrt as trt

Shape = tuple[int, int, int, int]
LegacyFlag = Literal["fp16", "int8"]
LEGACY_FLAGS: tuple[str, ...] = get_args(LegacyFlag)

DEFAULT_WORKSPACE_BYTES = 1 << 30
MAX_OPTIMIZATION_LEVEL = 5  # IBuilderConfig.builder_optimization_level: 0..5, TensorRT's default 3
CACHE_KEY_SCHEMA = 1  # bump when the key's fields or their meaning change
NOT_INSTALLED = "TensorRT is not installed here: run the printed command on the device"

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ShapeProfile:
    """One TensorRT optimization profile for the input: NCHW shapes, min <= opt <= max."""

    min: Shape
    opt: Shape
    max: Shape


@dataclass(frozen=True)
class TrtBuildSpec:
    """Everything :func:`build_engine` needs for one engine; validated on construction.

    ``shape`` is a static ``(N, C, T, T)`` input shape (one engine per tile size; DLA needs it)
    or a :class:`ShapeProfile` for dynamic tile sizes. ``strongly_typed`` builds with the
    STRONGLY_TYPED network flag (TensorRT >= 10); otherwise ``legacy_flags`` names the legacy
    precision builder flags to set (TensorRT < 11). ``dla_core`` runs the engine on that DLA
    core with per-layer GPU fallback. ``optimization_level`` None keeps TensorRT's default.
    ``timing_cache`` is loaded before and saved after the build: share one file per
    (device, TensorRT version) between all engines of a bundle, built one after another.
    """

    onnx_path: Path
    input_name: str
    shape: Shape | ShapeProfile
    strongly_typed: bool = True
    legacy_flags: frozenset[LegacyFlag] = frozenset()
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES
    dla_core: int | None = None
    optimization_level: int | None = None
    timing_cache: Path | None = None

    def __post_init__(self) -> None:
        if not self.input_name:
            raise ConfigError("input_name must be the ONNX graph's input name, got ''")
        profile = self.profile
        for label, shape in (("min", profile.min), ("opt", profile.opt), ("max", profile.max)):
            _check_shape(label, shape)
        ordered = zip(profile.min, profile.opt, profile.max, strict=True)
        if not all(lo <= mid <= hi for lo, mid, hi in ordered):
            raise ConfigError(f"shape profile must have min <= opt <= max in every dimension, "
                              f"got min {profile.min}, opt {profile.opt}, max {profile.max}")
        for flag in self.legacy_flags:
            if flag not in LEGACY_FLAGS:
                raise ConfigError(unknown_name("legacy precision flag", flag, LEGACY_FLAGS))
        if self.strongly_typed and self.legacy_flags:
            raise ConfigError(f"a strongly typed build takes its precision from the graph: "
                              f"legacy_flags must be empty, got {sorted(self.legacy_flags)}")
        if not _is_int(self.workspace_bytes) or self.workspace_bytes <= 0:
            raise ConfigError(f"workspace_bytes must be a positive integer, "
                              f"got {self.workspace_bytes!r}")
        if self.dla_core is not None:
            if not _is_int(self.dla_core) or self.dla_core < 0:
                raise ConfigError(f"dla_core must be None or a core index >= 0, "
                                  f"got {self.dla_core!r}")
            if not self.is_static:
                raise ConfigError(f"DLA needs a static input shape, got the profile {profile}")
        level = self.optimization_level
        if level is not None and (not _is_int(level) or not 0 <= level <= MAX_OPTIMIZATION_LEVEL):
            raise ConfigError(f"optimization_level must be None or 0..{MAX_OPTIMIZATION_LEVEL}, "
                              f"got {level!r}")

    @property
    def is_static(self) -> bool:
        """Whether the input has one shape (a profile with min == opt == max counts)."""
        profile = self.profile
        return profile.min == profile.opt == profile.max

    @property
    def profile(self) -> ShapeProfile:
        """The input shapes as a profile (a static shape is min = opt = max)."""
        if isinstance(self.shape, ShapeProfile):
            return self.shape
        return ShapeProfile(self.shape, self.shape, self.shape)

    @property
    def recipe(self) -> str:
        """The precision recipe in words: 'strongly-typed', 'legacy:fp16+int8', 'legacy:fp32'."""
        if self.strongly_typed:
            return "strongly-typed"
        return "legacy:" + ("+".join(sorted(self.legacy_flags)) or "fp32")


def spec_for_target(target: Target, onnx_path: Path, input_name: str,
                    shape: Shape | ShapeProfile, *, dla_core: int | None = None,
                    timing_cache: Path | None = None) -> TrtBuildSpec:
    """The build spec a target calls for: its recipe, and legacy flags from its precision ladder."""
    if target.backend != "tensorrt":
        raise ConfigError(f"target {target.name!r} runs {target.backend}, not TensorRT")
    if dla_core is not None and not 0 <= dla_core < target.dla_cores:
        raise ConfigError(f"target {target.name!r} has {target.dla_cores} DLA cores, "
                          f"got dla_core={dla_core}")
    legacy: frozenset[LegacyFlag] = frozenset()
    if target.legacy_precision_flags:
        legacy = frozenset(p for p in target.precision_ladder if p == "fp16" or p == "int8")
    return TrtBuildSpec(onnx_path=onnx_path, input_name=input_name, shape=shape,
                        strongly_typed=target.strongly_typed, legacy_flags=legacy,
                        dla_core=dla_core, timing_cache=timing_cache)


def engine_cache_key(onnx_sha256: str, spec: TrtBuildSpec, trt_version: str,
                     device_name: str) -> str:
    """sha256 (hex) over a canonical JSON of everything that invalidates a built engine.

    The ONNX checksum stands for the graph (its path does not count), then the input name and
    shapes, the precision recipe, the DLA core, the workspace and optimization level (they change
    the tactics chosen), the TensorRT version and the device name. The timing cache does not count.
    """
    if not _SHA256.match(onnx_sha256.lower()):
        raise ConfigError(f"onnx_sha256 must be 64 hex digits, got {onnx_sha256!r}")
    for label, value in (("trt_version", trt_version), ("device_name", device_name)):
        if not value.strip():
            raise ConfigError(f"{label} must be a non-empty string, got {value!r}")
    profile = spec.profile
    fields = {
        "schema": CACHE_KEY_SCHEMA,
        "onnx_sha256": onnx_sha256.lower(),
        "input_name": spec.input_name,
        "shapes": {"min": list(profile.min), "opt": list(profile.opt), "max": list(profile.max)},
        "recipe": spec.recipe,
        "dla_core": spec.dla_core,
        "workspace_bytes": spec.workspace_bytes,
        "optimization_level": spec.optimization_level,
        "tensorrt": trt_version.strip(),
        "device": device_name.strip(),
    }
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def tensorrt_version() -> str:
    """The installed TensorRT's version string, e.g. '10.3.0.30'."""
    _require_tensorrt()
    import tensorrt as trt

    return str(trt.__version__)  # type: ignore[attr-defined]  # the stubs omit __version__


def device_name() -> str:
    """This machine's accelerator for the cache key: the Jetson model, else the GPU's name.

    The Jetson model (device tree) comes first because it tells Orin Nano from AGX Orin, which
    report the same GPU; desktop GPUs are named by ``nvidia-smi`` (no CUDA library is loaded).
    """
    facts = probe_device()
    name = facts.jetson_model or facts.gpu_name
    if not name:
        raise EngineError(f"no NVIDIA GPU found here ({facts.describe()}): TensorRT engines are "
                          "built on the device that runs them")
    return name


def build_engine(spec: TrtBuildSpec) -> bytes:
    """Build the serialized engine (plan bytes) that ``spec`` describes, on this machine's GPU."""
    _require_tensorrt()
    import tensorrt as trt

    if not spec.onnx_path.is_file():
        raise EngineError(f"ONNX file not found: {spec.onnx_path}")
    version = tensorrt_version()
    major = _major(version)
    if spec.strongly_typed and major < 10:
        raise EngineError(f"TensorRT {version} has no strongly typed networks (10+ only): build "
                          f"{spec.onnx_path.name} with legacy precision flags")
    if spec.legacy_flags and major >= 11:
        raise EngineError(f"TensorRT {version} removed the precision builder flags "
                          f"{sorted(spec.legacy_flags)}: build {spec.onnx_path.name} "
                          "strongly typed")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(spec, major))
    parser = trt.OnnxParser(network, logger)
    _parse_onnx(parser, spec.onnx_path)
    check_int8_convs(inspect_network(network, trt), str(spec.onnx_path))
    config = builder.create_builder_config()
    _configure(builder, network, config, spec)
    if spec.timing_cache is not None:
        _load_timing_cache(config, spec.timing_cache)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT {version} could not build an engine from {spec.onnx_path} "
                          f"(recipe {spec.recipe}): see its messages above")
    if spec.timing_cache is not None:
        atomic_write_bytes(spec.timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


# ---------------------------------------------------------------- build steps


def _require_tensorrt() -> None:
    from runtime.engines.tensorrt import require_tensorrt

    require_tensorrt("Builder", NOT_INSTALLED)


def _network_flags(spec: TrtBuildSpec, major: int) -> int:
    import tensorrt as trt

    creation = trt.NetworkDefinitionCreationFlag
    flags = 0
    if major < 10:  # explicit batch is implied (and the flag deprecated) from TensorRT 10 on
        flags |= 1 << int(creation.EXPLICIT_BATCH)
    if spec.strongly_typed and hasattr(creation, "STRONGLY_TYPED"):  # implied if gone (11+)
        flags |= 1 << int(creation.STRONGLY_TYPED)
    return flags


def _parse_onnx(parser: trt.OnnxParser, path: Path) -> None:
    """Parse the file (external weights beside it resolve); every error in one EngineError."""
    parsed = parser.parse_from_file(str(path))
    errors = [_describe_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
    if parsed and not errors:
        return
    listing = "".join(f"\n  - {line}" for line in errors) or " (the parser gave no reason)"
    raise EngineError(f"TensorRT's ONNX parser rejected {path} with {len(errors)} "
                      f"error(s):{listing}")


def _describe_parser_error(error: trt.ParserError) -> str:
    node = error.node()
    if node < 0:
        return f"graph: {error.desc()}"
    # TensorRT 8.5's ParserError has only the node index; 10.x adds its name and operator.
    name = f" {error.node_name()!r}" if hasattr(error, "node_name") else ""
    operator = f" ({error.node_operator()})" if hasattr(error, "node_operator") else ""
    return f"node {node}{name}{operator}: {error.desc()}"


def _configure(builder: trt.Builder, network: trt.INetworkDefinition,
               config: trt.IBuilderConfig, spec: TrtBuildSpec) -> None:
    import tensorrt as trt

    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_bytes)
    if spec.legacy_flags:
        legacy = {"fp16": trt.BuilderFlag.FP16, "int8": trt.BuilderFlag.INT8}
        for flag in sorted(spec.legacy_flags):
            config.set_flag(legacy[flag])
    if spec.dla_core is not None:
        available = builder.num_DLA_cores
        if spec.dla_core >= available:
            raise EngineError(f"dla_core {spec.dla_core} requested but this device has "
                              f"{available} DLA core(s)")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = spec.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    if spec.optimization_level is not None:
        if not hasattr(config, "builder_optimization_level"):
            raise EngineError("this TensorRT has no builder optimization level (8.6+): "
                              "leave optimization_level unset")
        config.builder_optimization_level = spec.optimization_level
    if _input_is_dynamic(network, spec):
        profile = builder.create_optimization_profile()
        shapes = spec.profile
        profile.set_shape(spec.input_name, trt.Dims(list(shapes.min)),
                          trt.Dims(list(shapes.opt)), trt.Dims(list(shapes.max)))
        if config.add_optimization_profile(profile) < 0:
            raise EngineError(f"TensorRT rejected the optimization profile {shapes} for input "
                              f"{spec.input_name!r} of {spec.onnx_path}")


def _input_is_dynamic(network: trt.INetworkDefinition, spec: TrtBuildSpec) -> bool:
    """Whether the named input has dynamic dimensions; check the spec's shapes fit it."""
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    found = [tensor for tensor in inputs if tensor.name == spec.input_name]
    if not found:
        names = [tensor.name for tensor in inputs]
        raise EngineError(f"{spec.onnx_path}: {unknown_name('input', spec.input_name, names)}")
    dims = found[0].shape
    declared = [dims[i] for i in range(len(dims))]
    shapes = spec.profile
    fits = len(declared) == len(shapes.min) and all(
        d < 0 or lo == d == hi for d, lo, hi in zip(declared, shapes.min, shapes.max, strict=True))
    if not fits:
        raise EngineError(f"{spec.onnx_path}: input {spec.input_name!r} has shape {declared} "
                          f"(-1 = dynamic) but the spec asks for {spec.shape}")
    return any(d < 0 for d in declared)


def _load_timing_cache(config: trt.IBuilderConfig, path: Path) -> None:
    """Start from the cache file when there is one; a stale or foreign cache starts afresh."""
    try:
        data = path.read_bytes() if path.is_file() else b""
    except OSError as err:
        raise EngineError(f"cannot read timing cache {path}: {err.strerror or err}") from err
    if data:
        cache = config.create_timing_cache(data)
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return
        # Written by another TensorRT version or device: start afresh (the save overwrites it).
    config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def _check_shape(label: str, shape: object) -> None:
    if not (isinstance(shape, tuple) and len(shape) == 4
            and all(_is_int(d) and d > 0 for d in shape)):
        raise ConfigError(f"{label} input shape must be 4 positive integers (N, C, H, W), "
                          f"got {shape!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _major(version: str) -> int:
    digits = re.match(r"\d+", version.strip())
    if digits is None:
        raise EngineError(f"cannot read the TensorRT version {version!r}")
    return int(digits.group())
