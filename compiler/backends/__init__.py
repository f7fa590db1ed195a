"""The compiler's backend registry: how each backend's engines are exported, lowered and built.

The compiler-side twin of :mod:`runtime.backends`: a backend is one module here that defines
``BUILDER``, an instance of a :class:`Builder` subclass, answering what the planner and the bundle
writer ask -- the lowering dialect of its graphs, whether its graphs have static shapes, which
files an engine becomes, what it records about the build machine, rungs it adds to a plan, and
the device-side finishing step (TensorRT plans). Nobody outside the registry compares a backend's
name with a string; adding a backend is one module and one line here (plus its runtime twin).

Backend modules are imported the first time they are asked for and import their heavy libraries
(onnx, tensorrt, openvino) inside functions, so the planner can ask a fact without loading the
lowering.
"""

from __future__ import annotations

import platform
from abc import ABC
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from runtime.backends import RuntimeBackend, registered, runtime_backend
from runtime.errors import BundleError

if TYPE_CHECKING:
    import onnx

    from compiler.layers import EngineLayer
    from compiler.plan import EnginePlan, PlannedEngine
    from runtime.manifest import Manifest
    from targets.loader import Target

__all__ = ["Builder", "Export", "all_builders", "builder"]

Progress = Callable[[str], None]

# name -> the module that defines its BUILDER (the same names as runtime.backends.BACKENDS)
_MODULES: dict[str, str] = {
    "onnxruntime": "compiler.backends.onnxruntime",
    "tensorrt": "compiler.backends.tensorrt",
    "openvino": "compiler.backends.openvino",
}


@dataclass(frozen=True)
class Export:
    """How the FP network is exported for a backend's engine graphs."""

    opset: int
    batch: int  # static batch (ignored when dynamic)
    dynamic: bool  # dynamic batch, height and width (one graph for every tile size)


class Builder(ABC):
    """One backend's compiler side (see the module docstring); the defaults fit a backend that
    runs the ONNX Runtime dialect's dynamic-shape graphs as they are (nothing built after)."""

    name: ClassVar[str]
    # its float layers compute exactly: the image conv on the integer pixels, a closing conv
    # on its input's integer levels (the ORT dialect's float layers, compiler.plan)
    exact_float_layers: ClassVar[bool] = True
    static_shapes: ClassVar[bool] = False  # graphs of batch x 3 x tile x tile (else dynamic)
    engine_suffixes: ClassVar[tuple[str, ...]] = (".onnx",)  # file kinds under engines/
    bundle_files: ClassVar[tuple[str, ...]] = ()  # files it writes at the bundle's top level
    # the build measures the rung ladder (runtime.rungs) by running its engines on this machine
    rung_ladder: ClassVar[bool] = False

    @property
    def runtime(self) -> RuntimeBackend:
        return runtime_backend(self.name)

    @property
    def dialect(self) -> str:
        """The lowering dialect of its graphs (:mod:`compiler.lower.dialects`)."""
        return self.runtime.dialect

    def export(self, target: Target, opset: int, batch: int) -> Export:
        """How to export the FP graph for ``target`` (``opset`` and ``batch`` asked for)."""
        if self.static_shapes:
            return Export(min(opset, target.max_opset), batch, dynamic=False)
        return Export(opset, batch, dynamic=True)

    def files(self, engine: str) -> tuple[str, ...]:
        """The files one engine becomes in the bundle (for ``adasr build --dry-run``)."""
        return (f"engines/{engine}.onnx",)

    def complete(self, plan: EnginePlan) -> EnginePlan:
        """``plan`` with the rungs this backend adds on this machine (default: none); called by
        :func:`compiler.plan.plan_engines`."""
        return plan

    def lower(self, fp: onnx.ModelProto, planned: PlannedEngine,
              plan: EnginePlan) -> onnx.ModelProto:
        """The graph of one planned engine: the FP graph for float engines, else the Q/DQ graph
        in the ORT dialect (hardware ladder: INT8 end to end; emulate: exact placement)."""
        from compiler.lower.dialects import lower_engine

        if planned.reference or not planned.specs:
            return fp
        return lower_engine(fp, planned.specs, requantize=plan.ladder == "hardware")

    def widening_graph(self, fp: onnx.ModelProto, specs: tuple[EngineLayer, ...]
                       ) -> tuple[onnx.ModelProto, bool]:
        """The graph the build's widening check runs for ``specs`` (exact placement, dynamic
        shapes) and whether ONNX Runtime may optimize it (False: its plain ONNX semantics)."""
        from compiler.lower.dialects import lower_engine

        return lower_engine(fp, specs, streams=False), True

    def build_info(self, target: Target) -> dict[str, Any]:
        """What the manifest's ``build`` records of this machine: the CPU machine it was built
        on, the backend's version and the precisions it runs here (its capability probe)."""
        found = self.runtime.probe()
        return {"device": platform.machine(), "backend_version": found.version,
                "capabilities": found.precisions}

    def finish(self, staging: Path, manifest: Manifest, target: Target, batch: int,
               destination: Path, progress: Progress) -> Manifest:
        """After the graphs are written (in ``staging``): build what only this machine can
        (TensorRT plans); default nothing."""
        return manifest

    def finish_on_device(self, bundle: Path, manifest: Manifest, target: Target,
                         batch: int | None, progress: Progress) -> Manifest:
        """``adasr build --finish``: build the pending files on the device."""
        raise BundleError(f"bundle {bundle} is an {manifest.backend} bundle: nothing to finish")


@cache
def builder(name: str) -> Builder:
    """The registered builder of backend ``name``."""
    found: Builder = registered(_MODULES, name, "BUILDER")
    return found


def all_builders() -> tuple[Builder, ...]:
    """Every registered builder."""
    return tuple(builder(name) for name in _MODULES)
