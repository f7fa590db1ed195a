"""CUDA for the TensorRT engine: the device, device and pinned memory, a stream.

The only module that calls a CUDA binding, so that another binding can replace it: it uses
pycuda's driver API (``pycuda.driver``), imported on first use and never through
``pycuda.autoinit``. :meth:`CudaDevice.open` initialises the driver and checks that a GPU exists
(callers do this before constructing a TensorRT runtime, which crashes TensorRT 8.6 without
one), then retains the device's *primary* context -- the one the CUDA runtime, hence TensorRT,
uses. Work runs inside :meth:`CudaDevice.current`, which makes that context current on the
calling thread and pops it after, so an engine may be used from any thread. To serve cuda-python
instead, reimplement these few methods with ``cuda.bindings.driver``. No CUDA graphs: pycuda's
``Stream`` has no capture API (``begin_capture`` / ``end_capture`` do not exist there).

A device is named as the TensorRT builder names it (``compiler.engines.tensorrt_build``): the
Jetson model from the device tree, else the GPU's name, so a plan's recorded device compares.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from runtime.errors import EngineError

__all__ = [
    "DEVICE_TREE_MODEL", "CudaDevice", "CudaStream", "DeviceBuffer", "jetson_model", "load_driver",
]

DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
INSTALL_HINT = ("install the GPU extra (pip install 'adasr[gpu]') on a machine with an NVIDIA GPU "
                "and its driver")


def load_driver() -> Any:
    """``pycuda.driver``; :class:`EngineError` when pycuda or the CUDA driver library is missing."""
    try:
        import pycuda.driver as driver
    except ImportError as err:  # no pycuda, or no libcuda (no NVIDIA driver on this machine)
        raise EngineError(f"cannot load pycuda's CUDA driver bindings ({err}): "
                          f"{INSTALL_HINT}") from err
    return driver


def jetson_model(path: Path | None = None) -> str | None:
    """The Jetson model string of the device tree (``DEVICE_TREE_MODEL``); None elsewhere."""
    try:
        raw = (path or DEVICE_TREE_MODEL).read_bytes()
    except OSError:
        return None
    model = raw.replace(b"\x00", b"").decode("utf-8", "replace").strip()
    return model or None


@dataclass(frozen=True, eq=False)
class DeviceBuffer:
    """One device allocation: its address and size; ``allocation`` is the binding's object."""

    ptr: int
    nbytes: int
    allocation: Any

    def free(self) -> None:
        self.allocation.free()


class CudaStream:
    """One CUDA stream; ``handle`` is the address TensorRT's ``execute_async_v3`` takes."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    @property
    def handle(self) -> int:
        return int(self.raw.handle)

    def synchronize(self) -> None:
        self.raw.synchronize()


class CudaDevice:
    """One GPU with its primary context retained (see the module docstring)."""

    def __init__(self, driver: Any, device: Any, context: Any, index: int) -> None:
        self._driver, self._device, self._context = driver, device, context
        self.index = index
        self.gpu_name = str(device.name())

    @classmethod
    def open(cls, index: int = 0) -> CudaDevice:
        """Device ``index``; :class:`EngineError` when there is no driver or no such GPU."""
        driver = load_driver()
        try:
            driver.init()
            count = int(driver.Device.count())
        except driver.Error as err:
            raise EngineError(f"no usable CUDA device here (the CUDA driver failed: "
                              f"{_one_line(err)}): TensorRT engines need an NVIDIA GPU") from err
        if count <= index:
            raise EngineError(f"no CUDA device {index} here ({count} found): TensorRT engines "
                              "need an NVIDIA GPU")
        device = driver.Device(index)
        return cls(driver, device, device.retain_primary_context(), index)

    @property
    def name(self) -> str:
        """The device as the builder records it: the Jetson model, else the GPU's name."""
        return jetson_model() or self.gpu_name

    @contextmanager
    def current(self) -> Iterator[None]:
        """Make the primary context current on this thread for the duration of the block."""
        self._context.push()
        try:
            yield
        finally:
            self._driver.Context.pop()

    def close(self) -> None:
        """Release the primary context (the device is unusable afterwards)."""
        self._context.detach()

    def alloc(self, nbytes: int) -> DeviceBuffer:
        """``nbytes`` (> 0) of device memory, 256-byte aligned as TensorRT requires."""
        try:
            allocation = self._driver.mem_alloc(nbytes)
        except self._driver.Error as err:
            raise EngineError(f"cannot allocate {nbytes} bytes on {self.gpu_name}: "
                              f"{_one_line(err)}") from err
        return DeviceBuffer(int(allocation), nbytes, allocation)

    def pinned(self, count: int, dtype: npt.DTypeLike) -> npt.NDArray[Any]:
        """A flat page-locked host array of ``count`` elements (freed with the array)."""
        return np.asarray(self._driver.pagelocked_empty(count, dtype))

    def stream(self) -> CudaStream:
        return CudaStream(self._driver.Stream())

    def copy_to_device(self, dst: DeviceBuffer, src: npt.NDArray[Any],
                       stream: CudaStream) -> None:
        """Enqueue a copy of the contiguous (pinned) ``src`` to the start of ``dst``."""
        _check_fits(src, dst)
        self._driver.memcpy_htod_async(dst.ptr, src, stream.raw)

    def copy_to_host(self, dst: npt.NDArray[Any], src: DeviceBuffer, stream: CudaStream) -> None:
        """Enqueue a copy of the start of ``src`` into the contiguous (pinned) ``dst``."""
        _check_fits(dst, src)
        self._driver.memcpy_dtoh_async(dst, src.ptr, stream.raw)


def _check_fits(host: npt.NDArray[Any], device: DeviceBuffer) -> None:
    if not host.flags.c_contiguous or host.nbytes > device.nbytes:
        raise EngineError(f"host array of {host.nbytes} bytes (contiguous: "
                          f"{host.flags.c_contiguous}) does not fit a {device.nbytes}-byte "
                          "device buffer")


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
