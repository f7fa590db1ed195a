"""The TensorRT engine builder's orchestration, against a fake ``tensorrt`` module (no GPU).

The fake records what the builder asks of TensorRT: network creation flags, memory pools,
optimization profiles and timing caches. It is injected per test with
``monkeypatch.setitem(sys.modules, "tensorrt", ...)``; nothing here needs TensorRT. Every
attribute it offers exists in the real bindings (``test_fakes_match_real_bindings.py``); the
real TensorRT-RTX builder runs in ``test_tensorrt_rtx.py``.
"""

from __future__ import annotations

import enum
import subprocess
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from compiler.engines.tensorrt_build import (
    NOT_INSTALLED,
    TrtBuildSpec,
    build_engine,
    device_name,
    engine_cache_key,
    spec_for_target,
    tensorrt_version,
)
from runtime.errors import ConfigError, EngineError
from targets.loader import DeviceFacts, load_target

REPO = Path(__file__).resolve().parents[2]
SHA = "ab" * 32

# ---------------------------------------------------------------- the fake tensorrt


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 1


class MemoryPoolType(enum.Enum):
    WORKSPACE = "workspace"


class Dims(tuple[int, ...]):
    def __new__(cls, shape: list[int]) -> Dims:
        return super().__new__(cls, shape)


@dataclass
class FakeParserError:
    index: int
    name: str
    operator: str
    message: str

    def node(self) -> int:
        return self.index

    def node_name(self) -> str:
        return self.name

    def node_operator(self) -> str:
        return self.operator

    def desc(self) -> str:
        return self.message


@dataclass
class FakeTensor:
    name: str
    shape: Dims


@dataclass
class Knobs:
    """What the fake TensorRT does: input shape, parser errors, build result."""

    input_shape: tuple[int, ...] = (1, 3, 32, 32)
    parser_errors: list[FakeParserError] = field(default_factory=list)
    build_fails: bool = False
    foreign_timing_cache: bool = False  # set_timing_cache refuses a loaded cache


@dataclass
class Record:
    """What the builder asked of the fake, for the last build."""

    network_flags: int = -1
    parsed: str = ""
    config: FakeConfig | None = None
    timing_cache_inputs: list[bytes] = field(default_factory=list)


class FakeTimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def serialize(self) -> bytes:
        return self.data + b"[entries]"


class FakeProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[Dims, Dims, Dims]] = {}

    def set_shape(self, name: str, min: Dims, opt: Dims, max: Dims) -> None:
        assert all(isinstance(d, Dims) for d in (min, opt, max)), "shapes must be trt.Dims"
        self.shapes[name] = (min, opt, max)


class FakeConfig:
    def __init__(self, record: Record, knobs: Knobs) -> None:
        self.record = record
        self.knobs = knobs
        self.pools: dict[object, int] = {}
        self.profiles: list[FakeProfile] = []
        self.cache: FakeTimingCache | None = None

    def set_memory_pool_limit(self, pool: object, size: int) -> None:
        self.pools[pool] = size

    def add_optimization_profile(self, profile: FakeProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> FakeTimingCache:
        self.record.timing_cache_inputs.append(bytes(data))
        return FakeTimingCache(bytes(data))

    def set_timing_cache(self, cache: FakeTimingCache, ignore_mismatch: bool) -> bool:
        if self.knobs.foreign_timing_cache and cache.data:
            return False
        self.cache = cache
        return True

    def get_timing_cache(self) -> FakeTimingCache:
        assert self.cache is not None
        return self.cache


def make_fake_tensorrt(version: str, knobs: Knobs, record: Record) -> types.ModuleType:
    class Logger:
        WARNING = "warning"

        def __init__(self, severity: str) -> None:
            self.severity = severity

    class Network:
        def __init__(self, flags: int) -> None:
            self.inputs = [FakeTensor("lr", Dims(list(knobs.input_shape)))]
            record.network_flags = flags

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        @property
        def num_layers(self) -> int:
            return 0  # the layer checks run on real parsers (test_tensorrt_rtx.py)

        def get_input(self, index: int) -> FakeTensor:
            return self.inputs[index]

    class OnnxParser:
        def __init__(self, network: Network, logger: Logger) -> None:
            self.errors = knobs.parser_errors

        def parse_from_file(self, path: str) -> bool:
            record.parsed = path
            return not self.errors

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, index: int) -> FakeParserError:
            return self.errors[index]

    class Builder:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def create_network(self, flags: int = 0) -> Network:
            return Network(flags)

        def create_builder_config(self) -> FakeConfig:
            record.config = FakeConfig(record, knobs)
            return record.config

        def create_optimization_profile(self) -> FakeProfile:
            return FakeProfile()

        def build_serialized_network(self, network: Network, config: FakeConfig) -> bytes | None:
            return None if knobs.build_fails else b"PLAN:" + record.parsed.encode()

    fake = types.ModuleType("tensorrt")
    members: dict[str, object] = {
        "__version__": version, "Logger": Logger, "Builder": Builder, "OnnxParser": OnnxParser,
        "NetworkDefinitionCreationFlag": NetworkDefinitionCreationFlag,
        "MemoryPoolType": MemoryPoolType, "Dims": Dims,
    }
    for name, value in members.items():
        setattr(fake, name, value)
    return fake


Install = Callable[..., Record]


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> Install:
    """Install a fake tensorrt of a given version; returns the record of what it was asked."""

    def install(version: str = "10.3.0.30", knobs: Knobs | None = None) -> Record:
        record = Record()
        fake = make_fake_tensorrt(version, knobs or Knobs(), record)
        monkeypatch.setitem(sys.modules, "tensorrt", fake)
        return record

    return install


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    path = tmp_path / "x2_w4a4.onnx"
    path.write_bytes(b"not parsed by the fake")
    return path


def config_of(record: Record) -> FakeConfig:
    assert record.config is not None
    return record.config


# ---------------------------------------------------------------- build orchestration


def test_strongly_typed_build_sets_the_network_flag_and_no_precision_flags(
        fake_trt: Install, onnx_file: Path) -> None:
    record = fake_trt("10.3.0.30")
    spec = TrtBuildSpec(onnx_file, "lr", (1, 3, 32, 32), workspace_bytes=1 << 28)
    assert build_engine(spec) == b"PLAN:" + str(onnx_file).encode()
    assert record.parsed == str(onnx_file)
    assert record.network_flags == 1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED
    config = config_of(record)
    assert config.pools == {MemoryPoolType.WORKSPACE: 1 << 28}
    assert config.profiles == []  # the graph's input is static: nothing to profile
    assert record.timing_cache_inputs == []  # no cache file asked for


def test_one_timing_cache_file_is_loaded_and_written_back_by_each_build(
        fake_trt: Install, tmp_path: Path, onnx_file: Path) -> None:
    cache = tmp_path / "caches" / "orin-10.3.cache"
    record = fake_trt()
    spec = TrtBuildSpec(onnx_file, "lr", (1, 3, 32, 32), timing_cache=cache)
    build_engine(spec)
    assert record.timing_cache_inputs == [b""]  # no file yet: a fresh cache
    assert cache.read_bytes() == b"[entries]"
    other = tmp_path / "x2_w8a8.onnx"
    other.write_bytes(b"")
    build_engine(replace(spec, onnx_path=other))  # the second engine of the bundle
    assert record.timing_cache_inputs == [b"", b"[entries]"]
    assert cache.read_bytes() == b"[entries][entries]"
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]  # no temp file left


def test_a_foreign_timing_cache_is_replaced_by_a_fresh_one(
        fake_trt: Install, tmp_path: Path, onnx_file: Path) -> None:
    cache = tmp_path / "old.cache"
    cache.write_bytes(b"from TensorRT 10.2")
    record = fake_trt(knobs=Knobs(foreign_timing_cache=True))
    build_engine(TrtBuildSpec(onnx_file, "lr", (1, 3, 32, 32), timing_cache=cache))
    assert record.timing_cache_inputs == [b"from TensorRT 10.2", b""]
    assert cache.read_bytes() == b"[entries]"


def test_dynamic_input_gets_an_optimization_profile_of_dims(
        fake_trt: Install, onnx_file: Path) -> None:
    record = fake_trt(knobs=Knobs(input_shape=(-1, 3, -1, -1)))
    build_engine(TrtBuildSpec(onnx_file, "lr", (2, 3, 48, 48)))  # one tile size: min=opt=max
    (only,) = config_of(record).profiles
    assert only.shapes["lr"] == (Dims([2, 3, 48, 48]),) * 3


def test_input_name_and_shape_must_fit_the_graph(fake_trt: Install, onnx_file: Path) -> None:
    fake_trt()
    with pytest.raises(EngineError, match="unknown input 'lrr'.*did you mean 'lr'"):
        build_engine(TrtBuildSpec(onnx_file, "lrr", (1, 3, 32, 32)))
    with pytest.raises(EngineError, match=r"has shape \[1, 3, 32, 32\].*asks for \(1, 3, 64, 64\)"):
        build_engine(TrtBuildSpec(onnx_file, "lr", (1, 3, 64, 64)))


def test_parser_errors_become_one_engine_error_listing_them(
        fake_trt: Install, onnx_file: Path) -> None:
    errors = [FakeParserError(3, "body.0.conv1", "QuantizeLinear", "zero point must be 0"),
              FakeParserError(7, "tail.up", "DepthToSpace", "unsupported mode")]
    fake_trt(knobs=Knobs(parser_errors=errors))
    with pytest.raises(EngineError) as caught:
        build_engine(TrtBuildSpec(onnx_file, "lr", (1, 3, 32, 32)))
    message = str(caught.value)
    assert str(onnx_file) in message and "2 error(s)" in message
    assert "node 3 'body.0.conv1' (QuantizeLinear): zero point must be 0" in message
    assert "node 7 'tail.up' (DepthToSpace): unsupported mode" in message


def test_failed_build_names_the_onnx_file(fake_trt: Install, onnx_file: Path) -> None:
    cache = onnx_file.with_suffix(".cache")
    fake_trt(knobs=Knobs(build_fails=True))
    with pytest.raises(EngineError, match=f"could not build an engine from {onnx_file}"):
        build_engine(TrtBuildSpec(onnx_file, "lr", (1, 3, 32, 32), timing_cache=cache))
    assert not cache.exists()


def test_tensorrt_before_10_is_refused(fake_trt: Install, onnx_file: Path) -> None:
    fake_trt("8.5.2.2")
    with pytest.raises(EngineError, match="8.5.2.2 has no strongly typed networks"):
        build_engine(TrtBuildSpec(onnx_file, "lr", (1, 3, 32, 32)))


def test_tensorrt_11_builds_strongly_typed(fake_trt: Install, onnx_file: Path) -> None:
    record = fake_trt("11.4.0.1")
    build_engine(TrtBuildSpec(onnx_file, "lr", (1, 3, 32, 32)))
    assert record.network_flags == 1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED


def test_missing_onnx_file(fake_trt: Install, tmp_path: Path) -> None:
    fake_trt()
    with pytest.raises(EngineError, match="ONNX file not found"):
        build_engine(TrtBuildSpec(tmp_path / "nope.onnx", "lr", (1, 3, 32, 32)))


# ---------------------------------------------------------------- without TensorRT


@pytest.mark.parametrize("installed", [None, types.ModuleType("tensorrt")],
                         ids=["absent", "stubs-only-namespace"])
def test_without_tensorrt_the_builder_says_so(
        monkeypatch: pytest.MonkeyPatch, onnx_file: Path, installed: object) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", installed)
    for call in (lambda: build_engine(TrtBuildSpec(onnx_file, "lr", (1, 3, 32, 32))),
                 tensorrt_version):
        with pytest.raises(EngineError, match=NOT_INSTALLED):
            call()


def test_module_imports_without_tensorrt() -> None:
    code = (
        "import sys\n"
        "sys.modules['tensorrt'] = None\n"
        "from pathlib import Path\n"
        "from runtime.errors import EngineError\n"
        "from compiler.engines import TrtBuildSpec, build_engine\n"
        "try:\n"
        "    build_engine(TrtBuildSpec(Path('x.onnx'), 'lr', (1, 3, 8, 8)))\n"
        "except EngineError as err:\n"
        "    print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO)
    assert out.stdout.startswith(NOT_INSTALLED)


def test_verify_script_help_runs_without_tensorrt() -> None:
    out = subprocess.run([sys.executable, str(REPO / "tools" / "verify_tensorrt_bundle.py"),
                          "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "--engine" in out.stdout and "--max-differing" in out.stdout


# ---------------------------------------------------------------- cache key and spec


def test_cache_key_is_stable_and_changes_with_what_invalidates_an_engine(
        tmp_path: Path) -> None:
    spec = TrtBuildSpec(tmp_path / "a.onnx", "lr", (1, 3, 64, 64))
    key = engine_cache_key(SHA, spec, "10.3.0.30", "NVIDIA Jetson Orin Nano")
    moved = replace(spec, onnx_path=tmp_path / "b.onnx", timing_cache=tmp_path / "t.cache")
    assert engine_cache_key(SHA.upper(), moved, "10.3.0.30", "NVIDIA Jetson Orin Nano") == key
    assert len(key) == 64
    variants = [
        engine_cache_key("cd" * 32, spec, "10.3.0.30", "NVIDIA Jetson Orin Nano"),
        engine_cache_key(SHA, replace(spec, shape=(1, 3, 96, 96)), "10.3.0.30",
                         "NVIDIA Jetson Orin Nano"),
        engine_cache_key(SHA, replace(spec, shape=(2, 3, 64, 64)), "10.3.0.30",
                         "NVIDIA Jetson Orin Nano"),
        engine_cache_key(SHA, replace(spec, workspace_bytes=1 << 20), "10.3.0.30",
                         "NVIDIA Jetson Orin Nano"),
        engine_cache_key(SHA, spec, "10.7.0.23", "NVIDIA Jetson Orin Nano"),
        engine_cache_key(SHA, spec, "10.3.0.30", "NVIDIA Jetson AGX Orin"),
    ]
    assert len({key, *variants}) == len(variants) + 1
    with pytest.raises(ConfigError, match="64 hex digits"):
        engine_cache_key("abc", spec, "10.3.0.30", "x")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"shape": (1, 3, 32)}, "4 positive integers"),
    ({"shape": (1, 3, 0, 32)}, "4 positive integers"),
    ({"workspace_bytes": 0}, "workspace_bytes"),
    ({"input_name": ""}, "input_name"),
])
def test_spec_rejects_invalid_values(kwargs: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {"onnx_path": Path("a.onnx"), "input_name": "lr",
                                 "shape": (1, 3, 32, 32), **kwargs}
    with pytest.raises(ConfigError, match=message):
        TrtBuildSpec(**fields)


def test_spec_for_target_is_for_tensorrt_targets(tmp_path: Path) -> None:
    onnx_path = tmp_path / "a.onnx"
    orin = spec_for_target(load_target("jetson-orin-nano"), onnx_path, "lr", (1, 3, 64, 64))
    assert (orin.shape, orin.recipe) == ((1, 3, 64, 64), "strongly-typed")
    with pytest.raises(ConfigError, match="not TensorRT"):
        spec_for_target(load_target("cpu-x86"), onnx_path, "lr", (1, 3, 64, 64))


def test_device_name_prefers_the_jetson_model(monkeypatch: pytest.MonkeyPatch) -> None:
    module = "compiler.engines.tensorrt_build.probe_device"
    monkeypatch.setattr(module, lambda: DeviceFacts("aarch64", "NVIDIA Jetson AGX Orin",
                                                    "Orin (nvgpu)"))
    assert device_name() == "NVIDIA Jetson AGX Orin"
    monkeypatch.setattr(module, lambda: DeviceFacts("x86_64", None, "NVIDIA H100 80GB HBM3"))
    assert device_name() == "NVIDIA H100 80GB HBM3"
    monkeypatch.setattr(module, lambda: DeviceFacts("x86_64"))
    with pytest.raises(EngineError, match="no NVIDIA GPU found"):
        device_name()
