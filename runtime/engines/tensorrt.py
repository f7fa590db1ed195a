"""TensorRT engine: a plan run with the raw TensorRT runtime API on one CUDA stream.

``activate`` finds the GPU first (never a ``trt.Runtime`` without one: TensorRT 8.6 crashed),
refuses a plan built on another device or TensorRT version (:class:`BundleError`), deserializes
it, binds the context's scratch memory to a :class:`SharedScratch` and allocates device and pinned
host buffers for the largest batch, once. ``infer`` then copies a batch in, runs
``execute_async_v3`` and copies the result out, without allocating. Batches larger than the
plan's batch run in chunks; a plan with a static batch gets its last chunk zero-padded.

TensorRT versions: 10.3 or later (every target's range): the name-based tensor API
(``num_io_tensors``, ``get_tensor_name``, ``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``), user-managed scratch memory (``create_execution_context(USER_MANAGED)``,
``device_memory_size_v2``, ``set_device_memory``); an older TensorRT is refused at activation.
CUDA graphs are not used: pycuda has no stream capture (a replay would need cuda-python's
``cudaStreamBeginCapture``; not written). Every CUDA call goes through
:mod:`runtime.engines.cuda`; ``tensorrt`` is imported inside functions only.

NOT RUN ON A GPU in this repository's CI: type-checked against the TensorRT 10 stubs and tested
against fake ``tensorrt`` / ``pycuda.driver`` modules (tests/runtime/test_tensorrt_engine.py)
whose TensorRT names all exist in the real ``tensorrt_lean`` bindings
(tests/test_fakes_match_real_bindings.py); ``tests/runtime/test_verify_tensorrt_gpu.py`` (marker
``gpu``) checks it against the bundle's ONNX graphs on a device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from runtime.backends import OpenRequest, RuntimeBackend, installed_version
from runtime.engines.base import Batch, Engine
from runtime.engines.cuda import CudaDevice, CudaStream, DeviceBuffer
from runtime.errors import BundleError, ConfigError, EngineError

if TYPE_CHECKING:
    import tensorrt as trt

__all__ = ["NOT_INSTALLED", "SharedScratch", "TensorRTEngine", "check_plan_device",
           "current_device", "require_tensorrt"]

NOT_INSTALLED = ("TensorRT is not installed here: TensorRT plans run on the device they were "
                 "built on (JetPack ships TensorRT; desktop GPUs: pip install 'adasr[gpu]')")
MIN_VERSION = (10, 3)  # every target's TensorRT; user-managed scratch (10.1+)
Shape = tuple[int, ...]

_LOGGERS: dict[int, Any] = {}  # one TensorRT logger per process (per tensorrt module object)


def require_tensorrt(needs: str = "Runtime", message: str = NOT_INSTALLED) -> str:
    """The installed TensorRT's version; :class:`EngineError` (``message``) when there is none,
    or only the type stubs (a 'tensorrt' without ``needs``: Runtime here, Builder to build)."""
    try:
        import tensorrt
    except ImportError as err:
        raise EngineError(f"{message} (import tensorrt failed: {err})") from err
    if not hasattr(tensorrt, needs):
        # tensorrt-stubs leaves an empty 'tensorrt' folder that imports as a namespace package.
        where = ", ".join(getattr(tensorrt, "__path__", [])) or "?"
        raise EngineError(f"{message} (the 'tensorrt' found at {where} has no {needs}: "
                          "type stubs only)")
    return str(getattr(tensorrt, "__version__", "unknown"))


def current_device() -> tuple[str, str]:
    """(this device's name as the builder records it, TensorRT version); EngineError if no GPU
    or no TensorRT. Constructs no TensorRT runtime."""
    device = CudaDevice.open()
    try:
        name = device.name
    finally:
        device.close()
    return name, require_tensorrt()


def check_plan_device(expect_device: str | None, expect_tensorrt: str | None, device: str,
                      version: str, bundle: Path | None = None) -> None:
    """Refuse plans built on another device or TensorRT version (None: not recorded, any)."""
    same_device = expect_device is None or _normalized(expect_device) == _normalized(device)
    same_version = expect_tensorrt is None or expect_tensorrt.strip() == version.strip()
    if same_device and same_version:
        return
    target = str(bundle) if bundle is not None else "<bundle folder>"
    raise BundleError(f"plans were built on {expect_device or '(not recorded)'} with TensorRT "
                      f"{expect_tensorrt or '(not recorded)'}; this is {device} with TensorRT "
                      f"{version}: rebuild on this device with `adasr build --finish {target}`")


class SharedScratch:
    """One device buffer for the scratch memory of engines that never run at the same time.

    A TensorRT context needs its scratch ("device memory") only while it executes; the engines of
    a bundle run one batch at a time, so they share one buffer sized to the largest need.
    :meth:`reserve` grows it when a larger engine activates -- its address then changes, and
    :attr:`generation` counts the changes so that engines rebind it; :meth:`release` frees it
    when the last engine deactivates.
    Not thread-safe: engines sharing it must not run concurrently.
    """

    def __init__(self) -> None:
        self._needs: dict[object, int] = {}
        self._buffer: DeviceBuffer | None = None
        self._generation = 0

    @property
    def nbytes(self) -> int:
        return 0 if self._buffer is None else self._buffer.nbytes

    @property
    def buffer(self) -> DeviceBuffer | None:
        return self._buffer

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def users(self) -> int:
        return len(self._needs)

    def reserve(self, owner: object, nbytes: int, device: CudaDevice) -> None:
        """Record that ``owner`` needs ``nbytes``; reallocate larger if the buffer is smaller.
        Call with the device's context current."""
        self._needs[owner] = nbytes
        if nbytes <= self.nbytes:
            return
        self._free()  # before allocating: peak memory stays at the largest need
        self._buffer = device.alloc(nbytes)

    def release(self, owner: object) -> None:
        """``owner`` no longer needs scratch; the last one out frees the buffer."""
        self._needs.pop(owner, None)
        if not self._needs:
            self._free()

    def _free(self) -> None:
        if self._buffer is not None:
            self._buffer.free()
            self._buffer = None
            self._generation += 1


@dataclass(eq=False)
class _Loaded:
    """Everything ``activate`` creates; dropped (inside the CUDA context) by ``deactivate``."""

    device: CudaDevice
    runtime: trt.Runtime
    engine: trt.ICudaEngine
    context: trt.IExecutionContext
    stream: CudaStream
    input: str
    output: str
    dynamic: bool  # the plan's input has dynamic dimensions (set_input_shape per shape)
    lowest: Shape  # smallest input shape of the plan's profile (= the shape when static)
    highest: Shape  # largest input shape of the plan's profile (= the shape when static)
    chunk: int  # most tiles per execution
    device_in: DeviceBuffer
    device_out: DeviceBuffer
    host_in: npt.NDArray[Any]  # flat, pinned, sized for the largest input
    host_out: npt.NDArray[Any]
    scratch_bytes: int
    shape: Shape = ()  # the input shape the context is set to
    out_shape: Shape = ()
    bound: int = -1  # the scratch generation bound to the context

    def free_buffers(self) -> None:
        self.device_in.free()
        self.device_out.free()


class TensorRTEngine(Engine):
    """A TensorRT plan (see the module docstring).

    ``expect_device`` / ``expect_tensorrt``: what the manifest says the plans were built on and
    with (None: not checked). ``scratch``: shared with the bundle's other engines (default: one
    of its own). ``batch``: most tiles per execution when the plan's batch is dynamic (capped by
    its profile; a static batch is the plan's). ``bundle``: the bundle folder, for the rebuild
    hint.
    """

    def __init__(self, name: str, plan: Path, scale: int, tile: int | None, *,
                 expect_device: str | None, expect_tensorrt: str | None,
                 scratch: SharedScratch | None = None, batch: int = 1,
                 bundle: Path | None = None) -> None:
        super().__init__(name, scale, tile)
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ConfigError(f"engine {name!r}: batch must be an integer >= 1, got {batch!r}")
        self.plan, self.batch, self.bundle = plan, batch, bundle
        self.expect_device, self.expect_tensorrt = expect_device, expect_tensorrt
        self.scratch = scratch if scratch is not None else SharedScratch()
        self._loaded: _Loaded | None = None

    @property
    def max_batch(self) -> int:
        """Tiles per execution (chunk size) once active."""
        return self._require_loaded().chunk

    # For profiling (CUDA events on the stream, TensorRT's layer profiler); None when inactive.
    @property
    def device(self) -> CudaDevice | None:
        return None if self._loaded is None else self._loaded.device

    @property
    def stream(self) -> CudaStream | None:
        return None if self._loaded is None else self._loaded.stream

    @property
    def context(self) -> trt.IExecutionContext | None:
        return None if self._loaded is None else self._loaded.context

    def _activate_impl(self) -> None:
        device = CudaDevice.open()  # EngineError without a GPU, before any trt.Runtime
        try:
            version = require_tensorrt()
            if _version_tuple(version) < MIN_VERSION:
                raise EngineError(f"TensorRT {version} is older than "
                                  f"{'.'.join(map(str, MIN_VERSION))}: adasr runs plans with "
                                  "TensorRT 10.3 or later (JetPack 6+)")
            check_plan_device(self.expect_device, self.expect_tensorrt, device.name, version,
                              self.bundle)
            with device.current():
                self._loaded = self._load(device, version)
        except BaseException:
            with device.current():
                self.scratch.release(self)
            device.close()
            raise

    def _infer_impl(self, batch: Batch) -> Batch:
        loaded = self._require_loaded()
        n, _, h, w = batch.shape
        low, high = loaded.lowest, loaded.highest
        if not (low[2] <= h <= high[2] and low[3] <= w <= high[3]):
            raise EngineError(f"engine {self.name!r} takes tiles from {low[2]} x {low[3]} to "
                              f"{high[2]} x {high[3]}, got {h} x {w}")
        out = np.empty((n, 3, h * self.scale, w * self.scale), np.float32)
        with loaded.device.current():
            for start in range(0, n, loaded.chunk):
                part = batch[start:start + loaded.chunk]
                out[start:start + len(part)] = self._run(loaded, part)
        return out

    def _deactivate_impl(self) -> None:
        loaded, self._loaded = self._require_loaded(), None
        device = loaded.device
        with device.current():
            loaded.free_buffers()
            self.scratch.release(self)
            del loaded  # TensorRT objects and pinned buffers go while the context is current
        device.close()

    # ---------------------------------------------------------------- activation steps

    def _load(self, device: CudaDevice, version: str) -> _Loaded:
        import tensorrt as trt

        try:
            data = self.plan.read_bytes()
        except OSError as err:
            raise EngineError(f"cannot read the plan of engine {self.name!r}: {self.plan}: "
                              f"{err.strerror or err}") from err
        runtime = trt.Runtime(_logger())
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise EngineError(f"TensorRT {version} cannot deserialize {self.plan}: it was built "
                              "by another TensorRT or for another GPU, or is corrupted (see "
                              "TensorRT's message above)")
        input_name, output_name = self._io_names(engine)
        in_dtype = self._dtype(engine, input_name)
        out_dtype = self._dtype(engine, output_name)
        dynamic, lowest, highest = self._input_limits(engine, input_name)
        chunk = highest[0] if not dynamic else max(lowest[0], min(self.batch, highest[0]))
        edge = (self.tile, self.tile) if self.tile is not None else (highest[2], highest[3])
        largest = (chunk, 3, *edge)

        scratch_bytes = int(engine.device_memory_size_v2)
        self.scratch.reserve(self, scratch_bytes, device)
        context = engine.create_execution_context(
            trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise EngineError(f"TensorRT could not create an execution context for {self.plan}")

        out_shape = self._apply_shape(context, input_name, output_name, dynamic, largest)
        in_count, out_count = math.prod(largest), math.prod(out_shape)
        loaded = _Loaded(
            device=device, runtime=runtime, engine=engine, context=context,
            stream=device.stream(), input=input_name, output=output_name, dynamic=dynamic,
            lowest=lowest, highest=highest, chunk=chunk,
            device_in=device.alloc(in_count * in_dtype.itemsize),
            device_out=device.alloc(out_count * out_dtype.itemsize),
            host_in=device.pinned(in_count, in_dtype), host_out=device.pinned(out_count, out_dtype),
            scratch_bytes=scratch_bytes, shape=largest, out_shape=out_shape)
        for name, buffer in ((input_name, loaded.device_in), (output_name, loaded.device_out)):
            if not context.set_tensor_address(name, buffer.ptr):
                raise EngineError(f"TensorRT refused the address of tensor {name!r} of "
                                  f"{self.plan}")
        self._bind_scratch(loaded)
        return loaded

    def _io_names(self, engine: trt.ICudaEngine) -> tuple[str, str]:
        import tensorrt as trt

        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise EngineError(f"{self.plan} has inputs {inputs} and outputs {outputs}: an SR "
                              "engine has one image input and one image output")
        return inputs[0], outputs[0]

    def _dtype(self, engine: trt.ICudaEngine, name: str) -> np.dtype[Any]:
        import tensorrt as trt

        dtypes = {trt.DataType.FLOAT: np.float32, trt.DataType.HALF: np.float16}
        kind = engine.get_tensor_dtype(name)
        if kind not in dtypes:
            raise EngineError(f"{self.plan}: tensor {name!r} is {kind}; SR engines take and "
                              "return FLOAT or HALF tensors")
        return np.dtype(dtypes[kind])

    def _input_limits(self, engine: trt.ICudaEngine, name: str) -> tuple[bool, Shape, Shape]:
        """(dynamic, smallest, largest input shape); checks NCHW, 3 channels and the tile."""
        declared = _dims(engine.get_tensor_shape(name))
        if len(declared) != 4 or declared[1] not in (3, -1):
            raise EngineError(f"{self.plan}: input {name!r} has shape {declared}; expected "
                              "N x 3 x H x W")
        dynamic = any(d < 0 for d in declared)
        lowest: Shape = declared
        highest: Shape = declared
        if dynamic:
            low, _, high = engine.get_tensor_profile_shape(name, 0)
            lowest, highest = _dims(low), _dims(high)
        tile = self.tile
        if tile is not None and not (lowest[2] <= tile <= highest[2]
                                     and lowest[3] <= tile <= highest[3]):
            raise EngineError(f"engine {self.name!r}: the plan takes tiles from {lowest[2]} x "
                              f"{lowest[3]} to {highest[2]} x {highest[3]}, the bundle's tile "
                              f"is {tile} x {tile}: rebuild the plan for this tile size")
        return dynamic, lowest, highest

    # ---------------------------------------------------------------- execution

    def _run(self, loaded: _Loaded, part: Batch) -> npt.NDArray[Any]:
        """Run up to ``chunk`` tiles; a view of the pinned output (valid until the next run)."""
        m, _, h, w = part.shape
        shape = (max(m, loaded.lowest[0]), 3, h, w)  # a static batch runs zero-padded
        out_shape = self._set_shape(loaded, shape)
        host_in = loaded.host_in[:math.prod(shape)].reshape(shape)
        host_in[:m] = part
        host_in[m:] = 0
        loaded.device.copy_to_device(loaded.device_in, host_in, loaded.stream)
        self._execute(loaded, shape)
        host_out = loaded.host_out[:math.prod(out_shape)].reshape(out_shape)
        loaded.device.copy_to_host(host_out, loaded.device_out, loaded.stream)
        loaded.stream.synchronize()
        return host_out[:m]

    def _set_shape(self, loaded: _Loaded, shape: Shape) -> Shape:
        """Set the context's input shape when it changes; the output shape."""
        if shape != loaded.shape:
            loaded.out_shape = self._apply_shape(loaded.context, loaded.input, loaded.output,
                                                 loaded.dynamic, shape)
            loaded.shape = shape
        return loaded.out_shape

    def _apply_shape(self, context: trt.IExecutionContext, input_name: str, output_name: str,
                     dynamic: bool, shape: Shape) -> Shape:
        """Set the input shape (dynamic plans only); the output shape TensorRT infers, checked."""
        import tensorrt as trt

        if dynamic and not context.set_input_shape(input_name, trt.Dims(list(shape))):
            raise EngineError(f"TensorRT refused input shape {shape} for engine {self.name!r}")
        out_shape = _dims(context.get_tensor_shape(output_name))
        expected = (shape[0], 3, shape[2] * self.scale, shape[3] * self.scale)
        if out_shape != expected:
            raise EngineError(f"engine {self.name!r}: the plan turns {shape} into {out_shape}, "
                              f"expected {expected} (scale x{self.scale})")
        return out_shape

    def _execute(self, loaded: _Loaded, shape: Shape) -> None:
        self._bind_scratch(loaded)
        self._enqueue(loaded)

    def _enqueue(self, loaded: _Loaded) -> None:
        if not loaded.context.execute_async_v3(loaded.stream.handle):
            raise EngineError(f"TensorRT failed to run engine {self.name!r} (see its message "
                              "above)")

    def _bind_scratch(self, loaded: _Loaded) -> None:
        """Point the context at the shared scratch when its address changed (drops graphs)."""
        generation = self.scratch.generation
        if loaded.bound == generation:
            return
        buffer = self.scratch.buffer
        ptr, size = (buffer.ptr, buffer.nbytes) if buffer is not None else (0, 0)
        if size < loaded.scratch_bytes:
            raise EngineError(f"engine {self.name!r} needs {loaded.scratch_bytes} bytes of "
                              f"scratch, the shared scratch holds {size}")
        loaded.context.set_device_memory(ptr, size)
        loaded.bound = generation

    def _require_loaded(self) -> _Loaded:
        if self._loaded is None:
            raise EngineError(f"engine {self.name!r} is not active: call activate() first")
        return self._loaded


def _logger() -> Any:
    import tensorrt as trt

    key = id(trt)
    if key not in _LOGGERS:
        _LOGGERS[key] = trt.Logger(trt.Logger.WARNING)
    return _LOGGERS[key]


def _version_tuple(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string; (0, 0) when unreadable (refused as too old)."""
    parts = [int(p) for p in version.split(".")[:2] if p.isdigit()]
    return tuple(parts) if len(parts) == 2 else (0, 0)


def _dims(dims: trt.Dims) -> Shape:
    return tuple(int(dims[i]) for i in range(len(dims)))


def _normalized(name: str) -> str:
    return " ".join(name.split()).casefold()


class TensorRTBackend(RuntimeBackend):
    """TensorRT on an NVIDIA GPU: plans built on the device from the bundle's ONNX graphs."""

    name = "tensorrt"
    label = "TensorRT"
    device = "gpu"
    precisions = ("fp4", "fp8", "int8", "fp16", "fp32")
    runs_plans = True
    dialect = "tensorrt"
    pads_batch = True
    package = "tensorrt"

    def version(self) -> str | None:
        try:  # JetPack's TensorRT comes without pip metadata: ask the module
            return require_tensorrt()
        except EngineError:
            return None

    def versions(self) -> dict[str, str | None]:
        return {"tensorrt": self.version(), "pycuda": installed_version("pycuda")}

    def shared_state(self) -> SharedScratch:
        return SharedScratch()

    def open(self, request: OpenRequest) -> Engine:
        return TensorRTEngine(request.spec.name, request.path, request.scale, request.tile,
                              expect_device=request.manifest.build.device,
                              expect_tensorrt=request.manifest.build.tensorrt,
                              scratch=request.shared, bundle=request.root)


BACKEND = TensorRTBackend()
