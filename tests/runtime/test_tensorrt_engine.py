"""The TensorRT engine's orchestration against a fake ``tensorrt`` and a fake ``pycuda.driver``.

The fake GPU keeps device memory as byte arrays, so copies in and out are real; the fake plan's
``execute_async_v3`` reads the input tensor at the address it was given, upscales it by nearest
neighbour plus a bias and writes the output tensor, so outputs are checked numerically. It
refuses to run without the CUDA context current or with a scratch address that was freed.
Nothing here needs a GPU or TensorRT; every TensorRT name the fake offers exists in the real
bindings (tests/test_fakes_match_real_bindings.py).
"""

from __future__ import annotations

import enum
import importlib.util
import json
import re
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime.engines import cuda as cuda_module
from runtime.engines.tensorrt import (
    NOT_INSTALLED,
    SharedScratch,
    TensorRTEngine,
    check_plan_device,
    current_device,
)
from runtime.errors import BundleError, ConfigError, EngineError
from runtime.fileio import atomic_write_bytes, sha256_file
from runtime.manifest import FileRef, write_manifest
from tests.runtime.conftest import make_manifest, nearest_onnx

REPO = Path(__file__).resolve().parents[2]
GPU_NAME = "NVIDIA Fake GPU"
VERSION = "10.3.0.30"
PLAN_MAGIC = b"FAKEPLAN"

# ---------------------------------------------------------------- the fake CUDA driver


class FakeCudaError(Exception):
    pass


@dataclass
class Gpu:
    """The fake GPU: knobs, device memory, and counts of what was asked of it."""

    devices: int = 1
    init_error: str | None = None
    memory: dict[int, bytearray] = field(default_factory=dict)
    next_ptr: int = 0x10000
    allocs: list[int] = field(default_factory=list)  # sizes, in order
    frees: int = 0
    pinned: int = 0
    depth: int = 0  # context push/pop balance
    retained: int = 0  # primary context retains minus releases
    streams: dict[int, FakeStream] = field(default_factory=dict)

    def require_current(self) -> None:
        assert self.depth > 0, "CUDA call without a current context"


class FakeAllocation:
    def __init__(self, gpu: Gpu, nbytes: int) -> None:
        gpu.require_current()
        self.gpu, self.ptr = gpu, gpu.next_ptr
        gpu.next_ptr += (nbytes // 256 + 2) * 256
        gpu.memory[self.ptr] = bytearray(nbytes)
        gpu.allocs.append(nbytes)

    def __int__(self) -> int:
        return self.ptr

    def free(self) -> None:
        del self.gpu.memory[self.ptr]  # a double free fails here
        self.gpu.frees += 1


class FakeStream:
    def __init__(self, gpu: Gpu) -> None:
        self.gpu = gpu
        self.handle = 0x5000 + len(gpu.streams)
        gpu.streams[self.handle] = self

    def synchronize(self) -> None:
        pass


def make_fake_driver(gpu: Gpu) -> types.ModuleType:
    class Context:
        def push(self) -> None:
            gpu.depth += 1

        @staticmethod
        def pop() -> None:
            assert gpu.depth > 0
            gpu.depth -= 1

        def detach(self) -> None:
            gpu.retained -= 1

    class Device:
        def __init__(self, index: int) -> None:
            assert index < gpu.devices

        @staticmethod
        def count() -> int:
            return gpu.devices

        def name(self) -> str:
            return GPU_NAME

        def retain_primary_context(self) -> Context:
            gpu.retained += 1
            return Context()

    def init() -> None:
        if gpu.init_error:
            raise FakeCudaError(gpu.init_error)

    def pagelocked_empty(count: int, dtype: Any) -> np.ndarray:
        gpu.require_current()
        gpu.pinned += 1
        return np.full(count, np.nan, dtype)

    def memcpy_htod_async(ptr: int, src: np.ndarray, stream: FakeStream) -> None:
        gpu.require_current()
        data = np.ascontiguousarray(src).tobytes()
        gpu.memory[ptr][:len(data)] = data

    def memcpy_dtoh_async(dst: np.ndarray, ptr: int, stream: FakeStream) -> None:
        gpu.require_current()
        raw = bytes(gpu.memory[ptr][:dst.nbytes])
        dst[...] = np.frombuffer(raw, dst.dtype).reshape(dst.shape)

    driver = types.ModuleType("pycuda.driver")
    members: dict[str, object] = {
        "Error": FakeCudaError, "init": init, "Device": Device, "Context": Context,
        "mem_alloc": lambda nbytes: FakeAllocation(gpu, nbytes),
        "pagelocked_empty": pagelocked_empty, "memcpy_htod_async": memcpy_htod_async,
        "memcpy_dtoh_async": memcpy_dtoh_async, "Stream": lambda: FakeStream(gpu),
    }
    for name, value in members.items():
        setattr(driver, name, value)
    return driver


# ---------------------------------------------------------------- the fake TensorRT


class TensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2


class ExecutionContextAllocationStrategy(enum.Enum):
    STATIC = 0
    USER_MANAGED = 2


class Dims(tuple[int, ...]):
    def __new__(cls, shape: list[int]) -> Dims:
        return super().__new__(cls, shape)


@dataclass
class Trt:
    """What the fake TensorRT was asked: runtimes made, shapes set and executed."""

    version: str = VERSION
    runtimes: int = 0
    shapes_set: list[tuple[int, ...]] = field(default_factory=list)
    executed: list[np.ndarray] = field(default_factory=list)  # the input of every execution
    addresses_set: int = 0


@dataclass(frozen=True)
class PlanSpec:
    input_shape: tuple[int, ...] = (-1, 3, 8, 8)
    low: tuple[int, ...] = (1, 3, 8, 8)  # profile (dynamic dims only)
    high: tuple[int, ...] = (4, 3, 8, 8)
    scale: int = 2
    bias: float = 0.0
    memory: int = 4096  # scratch bytes
    dtype: str = "FLOAT"


def write_plan(path: Path, spec: PlanSpec = PlanSpec()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(PLAN_MAGIC + json.dumps(asdict(spec)).encode())
    return path


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine, self.spec, self.gpu, self.trt = engine, engine.spec, engine.gpu, engine.trt
        self.input_shape = tuple(self.spec.input_shape)
        self.addresses: dict[str, int] = {}
        self.memory_ptr = 0

    def set_input_shape(self, name: str, shape: Dims) -> bool:
        assert isinstance(shape, Dims), "shapes must be trt.Dims"
        assert name == "lr"
        fits = all(lo <= d <= hi for d, lo, hi in zip(shape, self.spec.low, self.spec.high,
                                                      strict=True))
        if fits:
            self.input_shape = tuple(shape)
            self.trt.shapes_set.append(tuple(shape))
        return fits

    def get_tensor_shape(self, name: str) -> Dims:
        n, c, h, w = self.input_shape
        if name == "lr":
            return Dims([n, c, h, w])
        s = self.spec.scale
        return Dims([n, c, h * s if h > 0 else -1, w * s if w > 0 else -1])

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.trt.addresses_set += 1
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        assert stream_handle in self.gpu.streams
        self._compute(self.input_shape, self.addresses["lr"], self.addresses["sr"],
                     self.memory_ptr)
        return True

    def set_device_memory(self, ptr: int, size: int) -> None:
        assert size >= self.spec.memory
        self.memory_ptr = ptr

    def _compute(self, shape: tuple[int, ...], src: int, dst: int, scratch: int) -> None:
        self.gpu.require_current()
        if self.spec.memory:
            assert scratch in self.gpu.memory, "scratch address is not allocated (stale)"
            assert len(self.gpu.memory[scratch]) >= self.spec.memory, "scratch too small"
        dtype = np.float16 if self.spec.dtype == "HALF" else np.float32
        count = int(np.prod(shape))
        raw = bytes(self.gpu.memory[src][:count * np.dtype(dtype).itemsize])
        lr = np.frombuffer(raw, dtype).reshape(shape)
        self.trt.executed.append(lr.copy())
        s = self.spec.scale
        sr = (lr.repeat(s, axis=2).repeat(s, axis=3) + dtype(self.spec.bias)).astype(dtype)
        data = sr.tobytes()
        self.gpu.memory[dst][:len(data)] = data


class FakeEngine:
    """TensorRT 10.3+: the v2 scratch size, contexts with set_device_memory."""

    def __init__(self, spec: PlanSpec, gpu: Gpu, trt: Trt) -> None:
        self.spec, self.gpu, self.trt = spec, gpu, trt
        self.num_io_tensors = 2

    @property
    def device_memory_size_v2(self) -> int:
        return self.spec.memory

    def get_tensor_name(self, index: int) -> str:
        return ("lr", "sr")[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if name == "lr" else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType[self.spec.dtype]

    def get_tensor_shape(self, name: str) -> Dims:
        return FakeContext(self).get_tensor_shape(name)

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[Dims]:
        assert (name, profile) == ("lr", 0)
        return [Dims(list(self.spec.low)), Dims(list(self.spec.low)),
                Dims(list(self.spec.high))]

    def create_execution_context(self, strategy: object) -> FakeContext:
        assert strategy is ExecutionContextAllocationStrategy.USER_MANAGED
        return FakeContext(self)


def make_fake_tensorrt(gpu: Gpu, trt: Trt) -> types.ModuleType:
    class Logger:
        WARNING = "warning"

        def __init__(self, severity: str) -> None:
            self.severity = severity

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            assert gpu.devices > 0, "trt.Runtime() without a GPU crashes TensorRT 8.6"
            trt.runtimes += 1

        def deserialize_cuda_engine(self, data: bytes) -> FakeEngine | None:
            gpu.require_current()
            if not data.startswith(PLAN_MAGIC):
                return None
            fields = json.loads(data[len(PLAN_MAGIC):])
            spec = PlanSpec(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in fields.items()})
            return FakeEngine(spec, gpu, trt)

    fake = types.ModuleType("tensorrt")
    members: dict[str, object] = {
        "__version__": trt.version, "Logger": Logger, "Runtime": Runtime, "Dims": Dims,
        "TensorIOMode": TensorIOMode, "DataType": DataType,
        "ExecutionContextAllocationStrategy": ExecutionContextAllocationStrategy,
    }
    for name, value in members.items():
        setattr(fake, name, value)
    return fake


@dataclass
class Fakes:
    gpu: Gpu
    trt: Trt


Install = Callable[..., Fakes]


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Install]:
    """Install a fake pycuda.driver and tensorrt; returns their records."""
    monkeypatch.setattr(cuda_module, "DEVICE_TREE_MODEL", tmp_path / "no-device-tree")
    installed: list[Fakes] = []

    def install(version: str = VERSION, gpu: Gpu | None = None) -> Fakes:
        fakes = Fakes(gpu or Gpu(), Trt(version))
        driver = make_fake_driver(fakes.gpu)
        package = types.ModuleType("pycuda")
        package.driver = driver  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "pycuda", package)
        monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
        monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt(fakes.gpu, fakes.trt))
        installed.append(fakes)
        return fakes

    yield install
    for fakes in installed:  # every test leaves the GPU as it found it
        assert fakes.gpu.depth == 0


def make_engine(plan: Path, *, name: str = "a4", scale: int = 2, tile: int | None = 8,
                **kwargs: Any) -> TensorRTEngine:
    options: dict[str, Any] = {"expect_device": GPU_NAME, "expect_tensorrt": VERSION}
    options.update(kwargs)
    return TensorRTEngine(name, plan, scale, tile, **options)


def nearest(batch: np.ndarray, scale: int = 2, bias: float = 0.0) -> np.ndarray:
    return batch.repeat(scale, axis=2).repeat(scale, axis=3) + np.float32(bias)


def tiles(n: int, edge: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, edge, edge), dtype=np.float32)


# ---------------------------------------------------------------- running a plan


def test_infer_copies_through_device_buffers_and_computes_the_plan(
        fake_gpu: Install, tmp_path: Path) -> None:
    fakes = fake_gpu()
    plan = write_plan(tmp_path / "a4.plan", PlanSpec(bias=0.25))
    with make_engine(plan, batch=4) as engine:
        batch = tiles(3)
        out = engine.infer(batch)
        assert out.dtype == np.float32 and out.shape == (3, 3, 16, 16)
        np.testing.assert_array_equal(out, nearest(batch, bias=0.25))
        assert engine.max_batch == 4
    assert fakes.trt.runtimes == 1
    assert fakes.gpu.allocs == [4096, 4 * 3 * 8 * 8 * 4, 4 * 3 * 16 * 16 * 4]  # scratch, in, out
    assert fakes.gpu.pinned == 2


def test_buffers_are_allocated_once_and_reused_across_calls(
        fake_gpu: Install, tmp_path: Path) -> None:
    fakes = fake_gpu()
    engine = make_engine(write_plan(tmp_path / "a4.plan"), batch=4)
    engine.activate()
    allocs, pinned = len(fakes.gpu.allocs), fakes.gpu.pinned
    for seed, n in enumerate((1, 4, 2, 4)):
        batch = tiles(n, seed=seed)
        np.testing.assert_array_equal(engine.infer(batch), nearest(batch))
    assert (len(fakes.gpu.allocs), fakes.gpu.pinned) == (allocs, pinned) == (3, 2)
    assert fakes.trt.addresses_set == 2  # input and output bound once, at activation
    engine.deactivate()
    assert fakes.gpu.frees == 3 and fakes.gpu.memory == {}
    assert fakes.gpu.retained == 0


def test_a_static_batch_runs_in_zero_padded_chunks(fake_gpu: Install, tmp_path: Path) -> None:
    fakes = fake_gpu()
    plan = write_plan(tmp_path / "a4.plan", PlanSpec(input_shape=(2, 3, 8, 8)))
    with make_engine(plan, batch=8) as engine:  # a static plan's batch wins over batch=8
        assert engine.max_batch == 2
        batch = tiles(5)
        np.testing.assert_array_equal(engine.infer(batch), nearest(batch))
    assert [x.shape for x in fakes.trt.executed] == [(2, 3, 8, 8)] * 3
    np.testing.assert_array_equal(fakes.trt.executed[2][0], batch[4])
    assert not fakes.trt.executed[2][1].any()  # the pad is zeros, not the previous chunk
    assert fakes.trt.shapes_set == []  # static: the input shape is never set


def test_a_dynamic_batch_runs_in_chunks_of_batch_and_sets_shapes_only_on_change(
        fake_gpu: Install, tmp_path: Path) -> None:
    fakes = fake_gpu()
    plan = write_plan(tmp_path / "a4.plan", PlanSpec(high=(8, 3, 8, 8)))
    with make_engine(plan, batch=3) as engine:
        batch = tiles(7)
        np.testing.assert_array_equal(engine.infer(batch), nearest(batch))
        np.testing.assert_array_equal(engine.infer(batch[:3]), nearest(batch[:3]))
    assert [x.shape[0] for x in fakes.trt.executed] == [3, 3, 1, 3]
    assert fakes.trt.shapes_set == [(3, 3, 8, 8), (1, 3, 8, 8), (3, 3, 8, 8)]


def test_batch_is_capped_by_the_plan_profile(fake_gpu: Install, tmp_path: Path) -> None:
    fake_gpu()
    with make_engine(write_plan(tmp_path / "a4.plan"), batch=64) as engine:
        assert engine.max_batch == 4
    with pytest.raises(ConfigError, match="batch must be an integer >= 1, got 0"):
        make_engine(tmp_path / "a4.plan", batch=0)


def test_dynamic_tile_sizes_within_the_profile(fake_gpu: Install, tmp_path: Path) -> None:
    fakes = fake_gpu()
    plan = write_plan(tmp_path / "a4.plan", PlanSpec(input_shape=(-1, 3, -1, -1),
                                                     low=(1, 3, 8, 8), high=(2, 3, 16, 16)))
    with make_engine(plan, tile=None, batch=2) as engine:
        assert fakes.gpu.allocs[1:] == [2 * 3 * 16 * 16 * 4, 2 * 3 * 32 * 32 * 4]
        for edge in (8, 12, 16):
            batch = tiles(2, edge)
            np.testing.assert_array_equal(engine.infer(batch), nearest(batch))
        with pytest.raises(EngineError, match="takes tiles from 8 x 8 to 16 x 16, got 20 x 20"):
            engine.infer(tiles(1, 20))
    with pytest.raises(EngineError, match=r"from 8 x 8 to 16 x 16, the bundle's tile is 32 x 32"):
        make_engine(plan, tile=32).activate()


def test_half_precision_tensors_are_converted(fake_gpu: Install, tmp_path: Path) -> None:
    fake_gpu()
    plan = write_plan(tmp_path / "a4.plan", PlanSpec(dtype="HALF", bias=0.5))
    with make_engine(plan) as engine:
        batch = tiles(2)
        out = engine.infer(batch)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, nearest(batch, bias=0.5), atol=1e-3)


def test_a_plan_of_another_scale_is_refused(fake_gpu: Install, tmp_path: Path) -> None:
    fakes = fake_gpu()
    engine = make_engine(write_plan(tmp_path / "a4.plan", PlanSpec(scale=3)))
    with pytest.raises(EngineError, match=r"turns \(1, 3, 8, 8\) into \(1, 3, 24, 24\), "
                                          r"expected \(1, 3, 16, 16\) \(scale x2\)"):
        engine.activate()
    assert not engine.is_active and fakes.gpu.retained == 0
    assert fakes.gpu.allocs == [4096] and fakes.gpu.memory == {}  # the scratch went back


# ---------------------------------------------------------------- the shared scratch


def test_shared_scratch_is_sized_to_the_largest_engine_and_rebound_when_it_grows(
        fake_gpu: Install, tmp_path: Path) -> None:
    fakes = fake_gpu()
    scratch = SharedScratch()
    engines = [make_engine(write_plan(tmp_path / f"{name}.plan", PlanSpec(memory=memory)),
                           name=name, scratch=scratch)
               for name, memory in (("a4", 1000), ("a6", 5000), ("fp32", 3000))]
    engines[0].activate()
    assert (scratch.nbytes, scratch.users) == (1000, 1)
    before = scratch.generation
    engines[1].activate()  # larger: the buffer is reallocated at another address
    assert scratch.nbytes == 5000 and scratch.generation == before + 1
    engines[2].activate()  # smaller: fits
    assert scratch.nbytes == 5000 and scratch.users == 3
    assert sorted(fakes.gpu.allocs)[-1] == 5000
    assert [size for size in fakes.gpu.allocs if size in (1000, 3000, 5000)] == [1000, 5000]
    for seed, engine in enumerate(engines):  # a4 must now use the new address (fake checks)
        batch = tiles(2, seed=seed)
        np.testing.assert_array_equal(engine.infer(batch), nearest(batch))
    engines[1].deactivate()
    assert scratch.nbytes == 5000  # still in use by the others
    engines[0].deactivate()
    engines[2].deactivate()
    assert scratch.nbytes == 0 and scratch.users == 0 and fakes.gpu.memory == {}


@pytest.mark.parametrize("version", ["10.3.0.30", "11.4.0.106"])
def test_the_context_runs_on_the_shared_scratch(
        fake_gpu: Install, tmp_path: Path, version: str) -> None:
    fakes = fake_gpu(version)
    scratch = SharedScratch()
    engine = make_engine(write_plan(tmp_path / "a4.plan", PlanSpec(memory=3000)),
                         expect_tensorrt=version, scratch=scratch)
    with engine:
        batch = tiles(3)
        np.testing.assert_array_equal(engine.infer(batch), nearest(batch))
        assert scratch.buffer is not None and scratch.nbytes == 3000
        context = engine._loaded.context  # type: ignore[union-attr]
        assert type(context) is FakeContext
        assert context.memory_ptr == scratch.buffer.ptr
    assert fakes.gpu.memory == {}


# ---------------------------------------------------------------- device checks


def test_plans_of_another_device_or_tensorrt_are_refused_before_loading(
        fake_gpu: Install, tmp_path: Path) -> None:
    fakes = fake_gpu("10.7.0.23")
    plan = write_plan(tmp_path / "a4.plan")
    engine = make_engine(plan, expect_device="NVIDIA Jetson AGX Orin",
                         expect_tensorrt="10.3.0.30", bundle=tmp_path / "bundle")
    with pytest.raises(BundleError) as caught:
        engine.activate()
    assert str(caught.value) == (
        "plans were built on NVIDIA Jetson AGX Orin with TensorRT 10.3.0.30; this is "
        f"{GPU_NAME} with TensorRT 10.7.0.23: rebuild on this device with "
        f"`adasr build --finish {tmp_path / 'bundle'}`")
    assert fakes.trt.runtimes == 0 and fakes.gpu.retained == 0 and not engine.is_active
    with pytest.raises(BundleError, match="with TensorRT 10.3.0.30; this is"):
        make_engine(plan, expect_tensorrt="10.3.0.30").activate()
    for device, version in ((" nvidia  fake gpu", "10.7.0.23"), (None, None)):
        with make_engine(plan, expect_device=device, expect_tensorrt=version) as ok:
            assert ok.is_active


def test_check_plan_device_without_a_bundle_names_a_placeholder() -> None:
    with pytest.raises(BundleError, match=r"built on \(not recorded\) with TensorRT 8\.5\.2\.2; "
                                          r"this is Orin with TensorRT 10\.3\.0\.30: .*"
                                          r"--finish <bundle folder>`$"):
        check_plan_device(None, "8.5.2.2", "Orin", "10.3.0.30")


def test_a_jetson_is_named_by_its_device_tree_model(
        fake_gpu: Install, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_gpu()
    model = tmp_path / "model"
    model.write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\x00")
    monkeypatch.setattr(cuda_module, "DEVICE_TREE_MODEL", model)
    assert current_device() == ("NVIDIA Jetson AGX Orin Developer Kit", VERSION)
    plan = write_plan(tmp_path / "a4.plan")
    with make_engine(plan, expect_device="NVIDIA Jetson AGX Orin Developer Kit") as engine:
        assert engine.is_active


def test_current_device_names_the_gpu_and_the_tensorrt(fake_gpu: Install) -> None:
    fakes = fake_gpu("10.7.0.23")
    assert current_device() == (GPU_NAME, "10.7.0.23")
    assert fakes.trt.runtimes == 0 and fakes.gpu.retained == 0


@pytest.mark.parametrize(("gpu", "message"), [
    (Gpu(devices=0), r"no CUDA device 0 here \(0 found\): TensorRT engines need an NVIDIA GPU"),
    (Gpu(init_error="cuInit failed: no CUDA-capable device is detected"),
     r"the CUDA driver failed: cuInit failed: no CUDA-capable device is detected"),
], ids=["no-device", "driver-fails"])
def test_without_a_gpu_activation_fails_before_any_tensorrt_runtime(
        fake_gpu: Install, tmp_path: Path, gpu: Gpu, message: str) -> None:
    fakes = fake_gpu(gpu=gpu)
    engine = make_engine(write_plan(tmp_path / "a4.plan"))
    with pytest.raises(EngineError, match=message):
        engine.activate()
    with pytest.raises(EngineError, match=message):
        current_device()
    assert fakes.trt.runtimes == 0 and not engine.is_active


def test_without_pycuda_activation_says_what_to_install(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    with pytest.raises(EngineError, match=r"cannot load pycuda's CUDA driver bindings .*"
                                          r"pip install 'adasr\[gpu\]'"):
        make_engine(tmp_path / "a4.plan").activate()


@pytest.mark.parametrize("installed", [None, types.ModuleType("tensorrt")],
                         ids=["absent", "stubs-only-namespace"])
def test_without_tensorrt_activation_says_so(
        fake_gpu: Install, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        installed: object) -> None:
    fakes = fake_gpu()
    monkeypatch.setitem(sys.modules, "tensorrt", installed)
    with pytest.raises(EngineError, match=re.escape(NOT_INSTALLED)):
        make_engine(write_plan(tmp_path / "a4.plan")).activate()
    with pytest.raises(EngineError, match=re.escape(NOT_INSTALLED)):
        current_device()
    assert fakes.gpu.retained == 0


def test_tensorrt_before_10_3_is_refused(fake_gpu: Install, tmp_path: Path) -> None:
    fakes = fake_gpu("8.5.2.2")
    engine = make_engine(write_plan(tmp_path / "a4.plan"), expect_tensorrt=None)
    with pytest.raises(EngineError, match=r"TensorRT 8\.5\.2\.2 is older than 10\.3: adasr runs "
                                          r"plans with TensorRT 10\.3 or later"):
        engine.activate()
    assert fakes.gpu.memory == {} and fakes.gpu.retained == 0


def test_unreadable_and_undeserializable_plans(fake_gpu: Install, tmp_path: Path) -> None:
    fake_gpu()
    with pytest.raises(EngineError, match="cannot read the plan of engine 'a4'"):
        make_engine(tmp_path / "missing.plan").activate()
    garbage = tmp_path / "garbage.plan"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(EngineError, match=f"TensorRT {VERSION} cannot deserialize {garbage}"):
        make_engine(garbage).activate()


def test_state_is_checked(fake_gpu: Install, tmp_path: Path) -> None:
    fake_gpu()
    engine = make_engine(write_plan(tmp_path / "a4.plan"))
    with pytest.raises(EngineError, match="is not active: call activate"):
        engine.infer(tiles(1))
    with pytest.raises(EngineError, match="is not active"):
        _ = engine.max_batch
    with pytest.raises(EngineError, match="is not active"):
        engine.deactivate()
    engine.activate()
    with pytest.raises(EngineError, match="is already active"):
        engine.activate()
    with pytest.raises(EngineError, match="built for 8 x 8 tiles, got 16 x 16"):
        engine.infer(tiles(1, 16))
    assert engine.device is not None and engine.stream is not None  # for the profiler
    assert isinstance(engine.context, FakeContext)
    engine.deactivate()
    assert (engine.device, engine.stream, engine.context) == (None, None, None)
    engine.activate()  # activation after deactivation works again
    np.testing.assert_array_equal(engine.infer(tiles(1)), nearest(tiles(1)))
    engine.deactivate()


def test_modules_import_no_gpu_library() -> None:
    code = ("import sys\n"
            "import runtime.engines.tensorrt, runtime.engines.cuda\n"
            "print(sorted(m for m in ('tensorrt', 'pycuda', 'pycuda.driver', 'torch', 'onnx')"
            " if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- tools/verify_tensorrt_bundle.py


def load_verify_script(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    path = REPO / "tools" / "verify_tensorrt_bundle.py"
    spec = importlib.util.spec_from_file_location("verify_tensorrt_bundle", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def tensorrt_bundle(root: Path, plan_bias: dict[str, float]) -> Path:
    """A TensorRT bundle: nearest-neighbour ONNX graphs with bias i/255 for engine i; plans
    (fake) for the engines in ``plan_bias`` with the given bias."""
    names = ("a4", "a6", "fp32")
    for i, name in enumerate(names):
        atomic_write_bytes(root / "engines" / f"{name}.onnx", nearest_onnx(2, i / 255))
    atomic_write_bytes(root / "calibration.json", b"{}\n")
    for name, bias in plan_bias.items():
        write_plan(root / "engines" / f"{name}.plan", PlanSpec(bias=bias, memory=2048))
    manifest = make_manifest(root=root, backend="tensorrt", tile=8, overlap=2)
    engines = tuple(
        replace(spec, plan=(FileRef(f"engines/{spec.name}.plan",
                                    sha256_file(root / f"engines/{spec.name}.plan"),
                                    (root / f"engines/{spec.name}.plan").stat().st_size)
                            if spec.name in plan_bias else None))
        for spec in manifest.engines)
    build = replace(manifest.build, device=GPU_NAME, tensorrt=VERSION)
    write_manifest(root, replace(manifest, engines=engines, build=build))
    return root


def test_verify_script_compares_every_plan_with_onnx_runtime(
        fake_gpu: Install, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    fakes = fake_gpu()
    bundle = tensorrt_bundle(tmp_path / "tiny-orin", {"a4": 0.0, "fp32": 2 / 255})
    script = load_verify_script(monkeypatch)
    assert script.main([str(bundle), "--batch", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "a6: no plan yet" in out
    lines = [line.split() for line in out.splitlines() if line.startswith("  ")]
    assert [(line[0], line[1]) for line in lines] == [
        ("a4", "random"), ("a4", "smooth"), ("fp32", "random"), ("fp32", "smooth")]
    assert all(line[-1] == "ok" for line in lines)
    assert "PASS: 2 engine(s) with at most 0.0000% of the 8-bit output values differing" in out
    assert all("0.0000% of 8-bit values differ" in " ".join(line) for line in lines)
    assert len(fakes.trt.executed) == 4 and fakes.gpu.memory == {}


def test_verify_script_exits_1_on_a_mismatch_and_2_on_errors(
        fake_gpu: Install, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    fake_gpu()
    bundle = tensorrt_bundle(tmp_path / "tiny-orin", {"a4": 0.0, "a6": 0.1})  # a6: 1/255 in ONNX
    script = load_verify_script(monkeypatch)
    assert script.main([str(bundle), "--threads", "1"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: a6" in out and "100.0000% of 8-bit values differ, max |diff| 0.0961" in out
    assert script.main([str(bundle), "--engine", "a4", "--threads", "1"]) == 0
    capsys.readouterr()
    assert script.main([str(bundle), "--engine", "a44"]) == 2
    assert "unknown engine 'a44' (did you mean 'a4'?)" in capsys.readouterr().err
    (bundle / "engines" / "a4.plan").write_bytes(b"modified")
    assert script.main([str(bundle), "--engine", "a4"]) == 2
    assert "fails its checksum" in capsys.readouterr().err


def test_verify_script_without_tensorrt_stops_with_exit_2(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    script = load_verify_script(monkeypatch)
    assert script.main([str(tmp_path / "bundle")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {NOT_INSTALLED}")
    out = subprocess.run([sys.executable, str(REPO / "tools" / "verify_tensorrt_bundle.py"),
                          "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "--max-differing" in out.stdout and "bundle" in out.stdout
