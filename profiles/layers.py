"""Per-layer time of an engine: ONNX Runtime's profiler, named after the network's modules.

ONNX Runtime (CPU) profiles a separate session (profiling slows every kernel a little, so the
latency numbers come from unprofiled sessions): one warm-up call, then ``runs`` calls; the trace's
``Node`` events after the warm-up give each kernel's time, divided by ``runs`` (ms per call).

Kernel names are those of the *optimized* graph (fusions rename nodes: ``conv2d_3_nchwc``,
``node_conv2d_2_token_27``), so the session also writes its optimized graph and
:class:`LayerNamer` maps each kernel back to a module name (``body.0.body.2``): by the conv
weight it reads (the lowering keeps ``<module>.weight`` as the int8 initializer's name), else
by the original node or output tensor its name derives from (a fused Relu / Add / Q belongs to
the conv it follows), else by the layer prefix the lowering gives its Q / DQ / Clip nodes
(``tail.1.input.dq_op``). Kernels that map to no conv keep their own name
(``ReorderOutput_token_4``) and the ``op`` column says what they are. Without the ``onnx``
package (a device may lack it) every kernel keeps its own name. TensorRT layer names are mapped
with the same namer (:mod:`profiles.tensorrt`).
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from profiles.schema import LayerTime
from runtime.errors import EngineError

__all__ = ["OTHER", "LayerNamer", "kernel_times", "onnxruntime_layer_times", "top_layers"]

OTHER = "(other)"
CONV_OPS = frozenset({"Conv", "QLinearConv", "ConvInteger", "ConvTranspose", "FusedConv"})
# Ops that ORT / TensorRT fuse into the conv they follow, or that only feed or requantize it.
FOLLOWERS = frozenset({"Relu", "LeakyRelu", "PRelu", "Clip", "Add", "Sum", "QuantizeLinear",
                       "DequantizeLinear"})
WEIGHT_PATH = frozenset({"Identity", "DequantizeLinear"})
_SUFFIXES = re.compile(r"((_token_\d+)|(_nchwc)|(_kernel_time))+$")


class LayerNamer:
    """Maps kernel / node names of an engine (optimized or not) to module names."""

    def __init__(self, by_name: Mapping[str, str], by_weight: Mapping[str, str]) -> None:
        self.by_name = dict(by_name)  # original node name or output tensor -> module
        self.by_weight = dict(by_weight)  # conv weight initializer -> module

    @classmethod
    def from_onnx(cls, path: Path) -> LayerNamer:
        """The namer of the ONNX graph at ``path``; an empty one without the ``onnx`` package."""
        try:
            import onnx
        except ImportError:
            return cls({}, {})
        graph = onnx.load(str(path), load_external_data=False).graph
        producers = {out: node for node in graph.node for out in node.output}
        by_name: dict[str, str] = {}
        by_weight: dict[str, str] = {}
        for node in graph.node:
            if node.op_type not in CONV_OPS or len(node.input) < 2:
                continue
            weight = node.input[3] if node.op_type == "QLinearConv" else node.input[1]
            while weight in producers and producers[weight].op_type in WEIGHT_PATH:
                weight = producers[weight].input[0]
            module = re.sub(r"[._]weight$", "", weight)
            by_weight[weight] = module
            by_name[node.name] = module
            by_name.update(dict.fromkeys(node.output, module))
        # A follower (ReLU, residual Add, Q/DQ) of a conv belongs to that conv's module.
        for node in graph.node:
            if node.op_type in FOLLOWERS and node.name not in by_name:
                source = next((by_name[t] for t in node.input if t in by_name
                               and producers.get(t) is not None
                               and producers[t].op_type in CONV_OPS), None)
                if source is not None:
                    by_name[node.name] = source
                    by_name.update(dict.fromkeys(node.output, source))
        return cls(by_name, by_weight)

    def module(self, name: str, inputs: Iterable[str] = ()) -> str | None:
        """The module of a kernel: by a weight among ``inputs``, else by (parts of) its name.

        TensorRT names fused layers ``a + b`` and reformatters ``... to node``: every part and
        word is tried.
        """
        for tensor in inputs:
            if tensor in self.by_weight:
                return self.by_weight[tensor]
        parts = [name, *name.split(" + "), *name.split()]
        for part in parts:
            for candidate in (part, _SUFFIXES.sub("", part)):
                if candidate in self.by_name:
                    return self.by_name[candidate]
        # The lowering names its Q / DQ / Clip nodes after their layer: ``tail.1.input.dq_op``.
        modules = sorted(set(self.by_weight.values()), key=len, reverse=True)
        return next((m for part in parts for m in modules if part.startswith(f"{m}.")), None)

    def with_optimized(self, path: Path) -> dict[str, str]:
        """Kernel name -> module for the nodes of an optimized graph written by ONNX Runtime."""
        try:
            import onnx
        except ImportError:
            return {}
        if not path.is_file():
            return {}
        graph = onnx.load(str(path), load_external_data=False).graph
        found = {}
        for node in graph.node:
            module = self.module(node.name, node.input)
            if module is None:
                module = next((self.by_name[t] for t in node.output if t in self.by_name), None)
            if module is not None:
                found[node.name] = module
        return found


def kernel_times(events: Sequence[Mapping[str, Any]],
                 skip_runs: int) -> dict[str, tuple[str, float]]:
    """Kernel name -> (op type, total ms) from an ONNX Runtime trace, after ``skip_runs`` runs."""
    runs = sorted(float(e["ts"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    if len(runs) <= skip_runs:
        raise EngineError(f"the ONNX Runtime trace holds {len(runs)} runs; expected more than "
                          f"{skip_runs}")
    start = runs[skip_runs]
    totals: dict[str, tuple[str, float]] = {}
    for event in events:
        name = str(event.get("name", ""))
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        if float(event["ts"]) < start:
            continue
        kernel = name.removesuffix("_kernel_time")
        op = str(event.get("args", {}).get("op_name", "?"))
        kernel = kernel or op
        previous = totals.get(kernel, (op, 0.0))[1]
        totals[kernel] = (op, previous + float(event["dur"]) / 1000.0)
    return totals


def top_layers(kernels: Mapping[str, tuple[str, float]], modules: Mapping[str, str],
               calls: int, top: int) -> tuple[LayerTime, ...]:
    """Group kernels by module, ms per call, the ``top`` largest, the rest as ``(other)``."""
    grouped: dict[str, dict[str, float]] = {}
    for kernel, (op, total) in kernels.items():
        ops = grouped.setdefault(modules.get(kernel, kernel), {})
        ops[op] = ops.get(op, 0.0) + total / calls
    rows = sorted(((name, max(ops, key=lambda o: ops[o]), sum(ops.values()))
                   for name, ops in grouped.items()), key=lambda r: (-r[2], r[0]))
    total_ms = sum(r[2] for r in rows)
    if total_ms <= 0:
        return ()
    kept = [LayerTime(name, op, ms, ms / total_ms) for name, op, ms in rows[:top]]
    rest = sum(r[2] for r in rows[top:])
    if rest > 0:
        kept.append(LayerTime(OTHER, "-", rest, rest / total_ms))
    return tuple(kept)


def onnxruntime_layer_times(name: str, path: Path, batch: npt.NDArray[np.float32], *,
                            scale: int, tile: int | None, threads: int, runs: int,
                            top: int) -> tuple[LayerTime, ...]:
    """Top per-layer ms per call of the ONNX Runtime engine at ``path`` on ``batch``."""
    from runtime.engines.onnxruntime import OnnxRuntimeEngine, session_options

    with tempfile.TemporaryDirectory(prefix="adasr-profile-") as tmp:
        options = session_options(threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "trace")
        optimized = Path(tmp) / "optimized.onnx"
        options.optimized_model_filepath = str(optimized)
        engine = OnnxRuntimeEngine(name, path, scale, tile, threads=threads, options=options)
        with engine:
            for _ in range(1 + runs):
                engine.infer(batch)
            trace = Path(engine.end_profiling())
        try:
            events = json.loads(trace.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise EngineError(f"cannot read ONNX Runtime's trace {trace}: {err}") from err
        modules = LayerNamer.from_onnx(path).with_optimized(optimized)
    return top_layers(kernel_times(events, skip_runs=1), modules, runs, top)
