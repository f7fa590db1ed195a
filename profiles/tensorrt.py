"""TensorRT measurements: CUDA-event timing and TensorRT's per-layer profiler.

Imported only when the bundle's backend is ``tensorrt``; ``tensorrt`` and the CUDA binding are
imported inside the functions (the binding through :func:`runtime.engines.cuda.load_driver`).
Both work on an *active* :class:`~runtime.engines.tensorrt.TensorRTEngine` through the three
properties it exposes for profiling: ``device`` (:class:`~runtime.engines.cuda.CudaDevice`),
``stream`` (:class:`~runtime.engines.cuda.CudaStream`) and ``context`` (``IExecutionContext``).

Timing: a CUDA event is recorded on the engine's stream before and after one ``infer`` call and
the GPU time between them is read (``Event.time_since``); the copies in and out are part of a
call and count. Per-layer times come from an ``IProfiler`` attached to the context after one
warm-up call: TensorRT calls ``report_layer_time`` once per layer per execution; layer names
are TensorRT's (``node_conv2d_3 + node_relu_1`` for a fusion), mapped to modules with the ONNX
graph's :class:`~profiles.layers.LayerNamer`. Plans built without detailed profiling verbosity
report coarser names.

NOT RUN ON A GPU in this repository's CI: written against TensorRT 10's Python API and pycuda,
tested with fake ``tensorrt`` and CUDA driver modules (tests/profiles/test_profile_tensorrt.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from profiles.layers import LayerNamer, top_layers
from profiles.schema import LayerTime
from profiles.timing import Timer
from runtime.errors import EngineError

if TYPE_CHECKING:
    from runtime.engines.tensorrt import TensorRTEngine

__all__ = ["cuda_event_timer", "tensorrt_layer_times"]


def cuda_event_timer(engine: TensorRTEngine) -> Timer:
    """A :data:`~profiles.timing.Timer` measuring GPU ms with CUDA events on the engine's stream."""
    from runtime.engines.cuda import load_driver

    device, stream = engine.device, engine.stream
    if device is None or stream is None:
        raise EngineError(f"engine {engine.name!r} is not active: activate it before timing")
    driver = load_driver()

    def timed(run: Callable[[], object]) -> float:
        with device.current():
            start, end = driver.Event(), driver.Event()
            start.record(stream.raw)
        run()
        with device.current():
            end.record(stream.raw)
            end.synchronize()
            return float(end.time_since(start))

    return timed


def tensorrt_layer_times(engine: TensorRTEngine, onnx_path: Path,
                         batch: npt.NDArray[np.float32], *, runs: int,
                         top: int) -> tuple[LayerTime, ...]:
    """Top per-layer ms per call from TensorRT's layer profiler over ``runs`` calls."""
    import tensorrt as trt

    context = engine.context
    if context is None:
        raise EngineError(f"engine {engine.name!r} is not active: activate it before profiling")

    class Profiler(trt.IProfiler):
        def __init__(self) -> None:
            trt.IProfiler.__init__(self)
            self.totals: dict[str, float] = {}

        def report_layer_time(self, layer_name: str, ms: float) -> None:
            self.totals[layer_name] = self.totals.get(layer_name, 0.0) + float(ms)

    profiler = Profiler()
    engine.infer(batch)  # warm-up without the profiler
    context.profiler = profiler  # stays attached: the engine is deactivated after this
    for _ in range(runs):
        engine.infer(batch)
    namer = LayerNamer.from_onnx(onnx_path)
    kernels = {name: ("TensorRT", ms) for name, ms in profiler.totals.items()}
    modules = {name: module for name in kernels if (module := namer.module(name)) is not None}
    return top_layers(kernels, modules, runs, top)
