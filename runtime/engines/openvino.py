"""OpenVINO engine (CPU): the bundle's ONNX Runtime dialect graphs compiled by OpenVINO's CPU
plugin, one compiled model and infer request per engine, made in ``activate``.

OpenVINO reads the same Q/DQ graphs as ONNX Runtime and runs their quantized convs on INT8
kernels (its low-precision transformations fuse ``DQ -> Conv <- DQ(W)``; tests check the compiled
model's per-layer ``runtimePrecision``); a residual add of two 8-bit tensors is kept out of the
conv before it (:mod:`runtime.engines.openvino_exact`: that fusion drops a rounding).

An engine whose precision is ``bf16`` is the FP32 graph compiled with
``INFERENCE_PRECISION_HINT=bf16``: real BF16 kernels on CPUs whose capability list
(``OPTIMIZATION_CAPABILITIES``) names BF16 (AVX512-BF16, AMX), except on the image path -- the
nodes that read or write the image stay FP32 (:mod:`runtime.engines.openvino_precise`: BF16's
8 significant bits would move pixels by up to half a level). Every other engine is compiled with
``f32`` so that OpenVINO never lowers its float layers on its own (its default on AMX CPUs).

Settings as the ONNX Runtime engine's: ``threads`` inference threads (0 = OpenVINO's default,
one per physical core), one stream, the latency hint, no core pinning (several engines of a
bundle live in one process and the machine is shared), and no busy-waiting between requests
(OpenVINO's CPU plugin waits on its task arena; it has no spin setting to turn off).
``openvino`` is imported on activation (and by the capability probe) only.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends import Capabilities, OpenRequest, RuntimeBackend
from runtime.engines.base import Batch, Engine
from runtime.engines.openvino_exact import unfuse_quantized_adds
from runtime.engines.openvino_precise import keep_image_path
from runtime.errors import EngineError, check_range
from runtime.manifest import THREADS

NOT_INSTALLED = "OpenVINO is not installed here: pip install 'adasr[openvino]'"
# OpenVINO's capability names -> the kernel precisions they give
_CAPABILITIES = {"INT8": "int8", "BF16": "bf16", "FP32": "fp32"}
BF16 = "bf16"


@cache
def _core() -> Any:
    """One OpenVINO Core per process."""
    try:
        import openvino
    except ImportError as err:
        raise EngineError(f"{NOT_INSTALLED} (import openvino failed: {err})") from err
    return openvino.Core()


def compile_config(threads: int, precision: str) -> dict[str, Any]:
    """The compile properties of an adasr CPU engine (``precision``: ``bf16`` or float32)."""
    check_range("threads", threads, *THREADS)
    config: dict[str, Any] = {
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        "INFERENCE_PRECISION_HINT": "bf16" if precision == BF16 else "f32",
        "ENABLE_CPU_PINNING": False,
    }
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


class OpenVinoEngine(Engine):
    def __init__(self, name: str, path: Path, scale: int, tile: int | None = None, *,
                 threads: int = 0, precision: str = "fp32") -> None:
        super().__init__(name, scale, tile)
        self.path, self.threads, self.precision = path, threads, precision
        self._compiled: Any = None
        self._request: Any = None
        self.kept_fp32: frozenset[str] = frozenset()  # a BF16 engine's image path (FP32)

    def _activate_impl(self) -> None:
        core = _core()
        try:
            model = core.read_model(str(self.path))
            unfuse_quantized_adds(model)
            if self.precision == BF16:
                model, self.kept_fp32 = keep_image_path(core, model)
            self._compiled = core.compile_model(model, "CPU",
                                                compile_config(self.threads, self.precision))
        except RuntimeError as err:  # OpenVINO raises RuntimeError with a multi-line report
            first = str(err).strip().splitlines()[0] if str(err).strip() else "RuntimeError"
            raise EngineError(f"OpenVINO cannot load engine {self.name!r} from {self.path}: "
                              f"{first}") from err
        self._request = self._compiled.create_infer_request()

    def _infer_impl(self, batch: Batch) -> Batch:
        self._request.infer({0: batch})
        out = self._request.get_output_tensor(0).data
        return np.array(out, dtype=np.float32)  # a copy: the request reuses its buffer

    def _deactivate_impl(self) -> None:
        self._request = self._compiled = None

    def runtime_precisions(self) -> dict[str, str]:
        """Per executed layer of the compiled model, the precision it runs in (OpenVINO's
        ``runtimePrecision``: ``i8`` / ``u8`` for INT8 kernels, ``bf16``, ``f32``)."""
        if self._compiled is None:
            raise EngineError(f"engine {self.name!r} is not active")
        found = {}
        for op in self._compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            if "runtimePrecision" in info and "layerType" in info:
                found[op.get_friendly_name()] = (
                    f"{info['layerType'].astype(str)}:{info['runtimePrecision'].astype(str)}")
        return found


class OpenVinoBackend(RuntimeBackend):
    """OpenVINO on the CPU: the ORT dialect's graphs, INT8 kernels, BF16 where the CPU has it."""

    name = "openvino"
    label = "OpenVINO"
    device = "cpu"
    precisions = ("int8", "bf16", "fp32")
    package = "openvino"

    def probe(self) -> Capabilities:
        """OpenVINO's version and the precisions this CPU runs (``OPTIMIZATION_CAPABILITIES``);
        no precision when OpenVINO is not installed."""
        version = self.version()
        if version is None:
            return Capabilities(None, ())
        found = _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        return Capabilities(version, tuple(p for p in self.precisions
                                           if p in {_CAPABILITIES.get(c) for c in found}))

    def open(self, request: OpenRequest) -> Engine:
        return OpenVinoEngine(request.spec.name, request.path, request.scale, request.tile,
                              threads=request.threads, precision=request.spec.precision)


BACKEND = OpenVinoBackend()
