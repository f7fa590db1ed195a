"""TensorRT engines from ONNX engine graphs: the build spec, the engine cache key, the builder.

One :class:`TrtBuildSpec` describes one engine: the Q/DQ ONNX graph, its static input shape
(one engine per tile size and batch) and the device options. :func:`build_engine` turns it into
plan bytes on the machine that will run them (engines are not portable across TensorRT versions
or GPUs); :func:`engine_cache_key` names the result after everything that invalidates it.

Precision recipe (deployment.md): every target builds a *strongly typed* network (TensorRT
>= 10), whose precision lives in the graph (FP16 casts, INT8 Q/DQ); TensorRT 11 has no
precision builder flags at all. TensorRT 8.5 (Jetson Xavier, JetPack 5, Python 3.8) is not a
target: this package needs Python >= 3.10. After parsing, :func:`build_with` checks that every
quantized conv reads its DQ directly (``compiler.engines.tensorrt_network``), else TensorRT
would run it in float without a word.

The builder calls the raw TensorRT API rather than Polygraphy's loaders (its timing-cache
writes are not atomic); the calls are type-checked against the TensorRT stubs, run against the
real TensorRT-RTX builder in the tests (``tests/compiler/test_tensorrt_rtx.py``) and against a
small fake whose every attribute exists in the real bindings.

``tensorrt`` is imported inside the functions that need it, never at import time.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compiler.engines.tensorrt_network import NetworkReport, check_int8_convs, inspect_network
from runtime.backends import runtime_backend
from runtime.errors import ConfigError, EngineError, unknown_name
from runtime.fileio import atomic_write_bytes
from targets.loader import DeviceFacts, Target, match_target, probe_device

if TYPE_CHECKING:
    import tensorrt as trt

Shape = tuple[int, int, int, int]

DEFAULT_WORKSPACE_BYTES = 1 << 30
MIN_TENSORRT_MAJOR = 10  # strongly typed networks
CACHE_KEY_SCHEMA = 2  # bump when the key's fields or their meaning change
NOT_INSTALLED = "TensorRT is not installed here: run the printed command on the device"

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class TrtBuildSpec:
    """Everything :func:`build_engine` needs for one engine; validated on construction.

    ``shape`` is the static ``(N, C, H, W)`` input shape (a graph with dynamic dimensions gets
    an optimization profile of exactly that shape). ``timing_cache`` is loaded before and saved
    after the build: share one file per (device, TensorRT version) between all engines of a
    bundle, built one after another.
    """

    onnx_path: Path
    input_name: str
    shape: Shape
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES
    timing_cache: Path | None = None

    def __post_init__(self) -> None:
        if not self.input_name:
            raise ConfigError("input_name must be the ONNX graph's input name, got ''")
        _check_shape("the", self.shape)
        if not _is_int(self.workspace_bytes) or self.workspace_bytes <= 0:
            raise ConfigError(f"workspace_bytes must be a positive integer, "
                              f"got {self.workspace_bytes!r}")

    @property
    def recipe(self) -> str:
        """The precision recipe in words (one for every target today)."""
        return "strongly-typed"


def spec_for_target(target: Target, onnx_path: Path, input_name: str, shape: Shape, *,
                    timing_cache: Path | None = None) -> TrtBuildSpec:
    """The build spec of one engine graph for a TensorRT target."""
    if not runtime_backend(target.backend).runs_plans:  # a backend of TensorRT plans
        raise ConfigError(f"target {target.name!r} runs {target.backend}, not TensorRT")
    return TrtBuildSpec(onnx_path=onnx_path, input_name=input_name, shape=shape,
                        timing_cache=timing_cache)


def engine_cache_key(onnx_sha256: str, spec: TrtBuildSpec, trt_version: str,
                     device_name: str) -> str:
    """sha256 (hex) over a canonical JSON of everything that invalidates a built engine.

    The ONNX checksum stands for the graph (its path does not count), then the input name and
    shape, the precision recipe, the workspace (it changes the tactics chosen), the TensorRT
    version and the device name. The timing cache does not count.
    """
    if not _SHA256.match(onnx_sha256.lower()):
        raise ConfigError(f"onnx_sha256 must be 64 hex digits, got {onnx_sha256!r}")
    for label, value in (("trt_version", trt_version), ("device_name", device_name)):
        if not value.strip():
            raise ConfigError(f"{label} must be a non-empty string, got {value!r}")
    fields = {
        "schema": CACHE_KEY_SCHEMA,
        "onnx_sha256": onnx_sha256.lower(),
        "input_name": spec.input_name,
        "shape": list(spec.shape),
        "recipe": spec.recipe,
        "workspace_bytes": spec.workspace_bytes,
        "tensorrt": trt_version.strip(),
        "device": device_name.strip(),
    }
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def target_matches(target: Target, facts: DeviceFacts) -> bool:
    """Whether ``facts`` (this machine) is a device ``target`` names in its ``device_match``."""
    rules = ((facts.jetson_model, target.device_match.jetson_model),
             (facts.gpu_name, target.device_match.gpu_name))
    return any(seen and any(pattern.lower() in seen.lower() for pattern in patterns)
               for seen, patterns in rules)


def check_build_device(target: Target, facts: DeviceFacts, version: str, bundle: Path) -> None:
    """Refuse to build ``target``'s plans on a device it does not name, or with a TensorRT
    outside its range: the plans would run (and be tuned) for another device. The message has
    the command that rebuilds the bundle for this device."""
    here = facts.jetson_model or facts.gpu_name or facts.machine
    own = match_target(facts)
    rebuild = (f"adasr build --weights WEIGHTS --target {own.name} --calibration "
               f"{bundle / 'calibration.json'} -o OUT")
    if not target_matches(target, facts):
        raise EngineError(f"this device ({here}) is not a {target.name} (it matches "
                          f"{target.device_match}): plans built here would serve another GPU; "
                          f"rebuild the bundle for this device with: {rebuild}")
    if target.tensorrt is not None and not target.tensorrt.contains(version):
        raise EngineError(f"TensorRT {version} is outside {target.name}'s range "
                          f"{target.tensorrt}: install TensorRT {target.tensorrt}, or rebuild "
                          f"the bundle for this TensorRT with: {rebuild}")


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

    version = tensorrt_version()
    if _major(version) < MIN_TENSORRT_MAJOR:
        raise EngineError(f"TensorRT {version} has no strongly typed networks: adasr builds "
                          f"with TensorRT >= {MIN_TENSORRT_MAJOR} (JetPack 6 or later)")
    return build_with(trt, spec)[0]


def build_with(module: Any, spec: TrtBuildSpec) -> tuple[bytes, NetworkReport]:
    """Parse, check and build ``spec`` with the TensorRT Python module ``module``
    (``tensorrt``; the tests pass ``tensorrt_rtx``): the plan bytes and what the parsed
    network holds."""
    trt = module
    if not spec.onnx_path.is_file():
        raise EngineError(f"ONNX file not found: {spec.onnx_path}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    _parse_onnx(parser, spec.onnx_path)
    report = inspect_network(network, trt)
    check_int8_convs(report, str(spec.onnx_path))
    config = builder.create_builder_config()
    _configure(trt, builder, network, config, spec)
    if spec.timing_cache is not None:
        _load_timing_cache(config, spec.timing_cache)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT could not build an engine from {spec.onnx_path}: see its "
                          "messages above")
    if spec.timing_cache is not None:
        atomic_write_bytes(spec.timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized), report


# ---------------------------------------------------------------- build steps


def _require_tensorrt() -> None:
    from runtime.engines.tensorrt import require_tensorrt

    require_tensorrt("Builder", NOT_INSTALLED)


def _network_flags(trt: Any) -> int:
    creation = trt.NetworkDefinitionCreationFlag
    if not hasattr(creation, "STRONGLY_TYPED"):  # implied where the flag is gone (11+)
        return 0
    return 1 << int(creation.STRONGLY_TYPED)


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
    return f"node {node} {error.node_name()!r} ({error.node_operator()}): {error.desc()}"


def _configure(trt: Any, builder: trt.Builder, network: trt.INetworkDefinition,
               config: trt.IBuilderConfig, spec: TrtBuildSpec) -> None:
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_bytes)
    if _input_is_dynamic(network, spec):
        profile = builder.create_optimization_profile()
        shape = trt.Dims(list(spec.shape))
        profile.set_shape(spec.input_name, shape, shape, shape)
        if config.add_optimization_profile(profile) < 0:
            raise EngineError(f"TensorRT rejected the optimization profile {spec.shape} for "
                              f"input {spec.input_name!r} of {spec.onnx_path}")


def _input_is_dynamic(network: trt.INetworkDefinition, spec: TrtBuildSpec) -> bool:
    """Whether the named input has dynamic dimensions; check the spec's shapes fit it."""
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    found = [tensor for tensor in inputs if tensor.name == spec.input_name]
    if not found:
        names = [tensor.name for tensor in inputs]
        raise EngineError(f"{spec.onnx_path}: {unknown_name('input', spec.input_name, names)}")
    dims = found[0].shape
    declared = [dims[i] for i in range(len(dims))]
    fits = len(declared) == len(spec.shape) and all(
        d < 0 or d == want for d, want in zip(declared, spec.shape, strict=True))
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
