"""TensorRT profiling orchestration with fake CUDA driver and ``tensorrt`` modules.

NOT a GPU test: it checks what the profiler asks of the engine (events on its stream, the layer
profiler on its context) and what it makes of the answers.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

import runtime.engines.cuda
from profiles.tensorrt import cuda_event_timer, tensorrt_layer_times
from runtime.errors import EngineError

CLOCK = [0.0]  # the fake GPU clock, ms


class FakeEvent:
    recorded_on: list[object] = []

    def record(self, stream: object) -> None:
        FakeEvent.recorded_on.append(stream)
        self.at = CLOCK[0]

    def synchronize(self) -> None:
        pass

    def time_since(self, start: FakeEvent) -> float:
        return self.at - start.at


class FakeDevice:
    def __init__(self) -> None:
        self.entered = 0

    @contextmanager
    def current(self) -> Iterator[None]:
        self.entered += 1
        yield


class FakeContext:
    profiler: Any = None


class FakeEngine:
    """An active TensorRT engine as the profiler sees it: device, stream, context, infer."""

    name = "int8"

    def __init__(self, active: bool = True) -> None:
        self.device = FakeDevice() if active else None
        self.stream = types.SimpleNamespace(raw="stream-handle") if active else None
        self.context = FakeContext() if active else None
        self.calls = 0

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        profiler = self.context.profiler if self.context else None
        if profiler is not None:  # TensorRT's layer names: a fusion, a conv, a reformatter
            profiler.report_layer_time("node_conv2d + node_relu", 0.3)
            profiler.report_layer_time("node_conv2d_1", 0.1)
            profiler.report_layer_time("Reformatting CopyNode for Input Tensor 0 to node_conv2d",
                                       0.1)
        return batch


@pytest.fixture
def fake_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeEvent.recorded_on = []
    driver = types.SimpleNamespace(Event=FakeEvent)
    monkeypatch.setattr(runtime.engines.cuda, "load_driver", lambda: driver)


def test_cuda_event_timer_times_on_the_engine_stream(fake_driver: None) -> None:
    engine = FakeEngine()
    timer = cuda_event_timer(cast(Any, engine))

    def run() -> None:
        CLOCK[0] += 2.5

    assert timer(run) == pytest.approx(2.5)
    assert FakeEvent.recorded_on == ["stream-handle", "stream-handle"]
    assert engine.device is not None and engine.device.entered == 2  # context current for both
    with pytest.raises(EngineError, match="not active"):
        cuda_event_timer(cast(Any, FakeEngine(active=False)))


def test_layer_profiler_maps_tensorrt_layers_to_modules(
        monkeypatch: pytest.MonkeyPatch, conv_onnx: Path) -> None:
    fake_trt = types.ModuleType("tensorrt")

    class IProfiler:
        def __init__(self) -> None:
            pass

    fake_trt.IProfiler = IProfiler  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt)
    engine = FakeEngine()
    batch = np.zeros((1, 3, 8, 8), np.float32)
    layers = tensorrt_layer_times(cast(Any, engine), conv_onnx, batch, runs=4, top=5)
    assert engine.calls == 5  # one warm-up without the profiler, then 4 profiled
    assert [(x.name, x.op) for x in layers] == [("body.0", "TensorRT"), ("tail", "TensorRT")]
    assert [x.ms for x in layers] == pytest.approx([0.4, 0.1])
    assert [x.share for x in layers] == pytest.approx([0.8, 0.2])
    with pytest.raises(EngineError, match="not active"):
        tensorrt_layer_times(cast(Any, FakeEngine(active=False)), conv_onnx, batch, runs=1,
                             top=1)
