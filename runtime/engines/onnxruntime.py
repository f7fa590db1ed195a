"""ONNX Runtime engine (CPU): one InferenceSession per engine, created in ``activate``.

Session settings: full graph optimisation (QDQ -> QLinearConv fusion, NCHWc layouts), sequential
execution, ``threads`` intra-op threads (0 = ONNX Runtime's default: one per physical core), one
inter-op thread, no spin-waiting. ``onnxruntime`` is imported on activation only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends import OpenRequest, RuntimeBackend
from runtime.engines.base import Batch, Engine
from runtime.errors import EngineError, check_range
from runtime.manifest import THREADS

MAX_THREADS = THREADS[1]  # intra-op threads: beyond any CPU here (1000000 made ONNX Runtime hang)


def session_options(threads: int, *, optimize: bool = True) -> Any:
    """The SessionOptions every adasr CPU engine runs with (profiling may add to them).

    ``optimize=False`` (parity checks only): no graph optimization, i.e. the graph's own ONNX
    semantics (FP32 convs on dequantized values) instead of ONNX Runtime's fused QLinearConv."""
    import onnxruntime as ort

    check_range("threads", threads, 0, MAX_THREADS)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 3
    # No spin-waiting: a bundle holds several sessions in one process (one per engine) and
    # spinning pools of idle sessions steal the cores of the running one. Measured here on
    # EDSR x2 256x256, 2 threads: INT8 177 -> 158 ms, adaptive dispatch +25% -> +2% over one
    # engine (benchmarks/engine_speed.py, profiles).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxRuntimeEngine(Engine):
    def __init__(self, name: str, path: Path, scale: int, tile: int | None = None, *,
                 threads: int = 0, options: Any = None) -> None:
        super().__init__(name, scale, tile)
        self.path, self.threads, self.options = path, threads, options
        self._session: Any = None
        self._input = self._output = ""

    def _activate_impl(self) -> None:
        import onnxruntime as ort

        options = self.options if self.options is not None else session_options(self.threads)
        try:
            self._session = ort.InferenceSession(str(self.path), options,
                                                 providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own untyped exceptions
            raise EngineError(f"ONNX Runtime cannot load engine {self.name!r} from {self.path}: "
                              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
                              ) from err
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name

    def _infer_impl(self, batch: Batch) -> Batch:
        out = self._session.run([self._output], {self._input: batch})[0]
        return np.asarray(out, dtype=np.float32)

    def _deactivate_impl(self) -> None:
        self._session = None

    def end_profiling(self) -> str:
        """Stop ONNX Runtime's profiler (sessions created with profiling on); the trace path."""
        if self._session is None:
            raise EngineError(f"engine {self.name!r} is not active")
        return str(self._session.end_profiling())


class OnnxRuntimeBackend(RuntimeBackend):
    """ONNX Runtime on the CPU: the bundle's ONNX graphs, INT8 through QLinearConv."""

    name = "onnxruntime"
    label = "ONNX Runtime"
    device = "cpu"
    precisions = ("int8", "fp32")
    package = "onnxruntime"

    def open(self, request: OpenRequest) -> Engine:
        return OnnxRuntimeEngine(request.spec.name, request.path, request.scale, request.tile,
                                 threads=request.threads)


BACKEND = OnnxRuntimeBackend()
