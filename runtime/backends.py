"""The runtime's backend registry: what each engine backend runs, on what, and how it opens.

A backend is one module under ``runtime/engines/`` that defines ``BACKEND``, an instance of a
:class:`RuntimeBackend` subclass. It answers every question the rest of the code asks of a
backend -- which device kind it runs on (CPU backends take ``threads`` and match machines by
``platform.machine()``; GPU backends match Jetson models or GPU names), which kernel precisions
it runs, which bundle file its engines open (the portable ONNX graph, or a plan built on the
device), what this machine offers (:meth:`RuntimeBackend.probe`) and how it makes an engine.
Nobody outside the registry compares a backend's name with a string.

The registry is the name -> module table below; a backend module is imported the first time
its backend is asked for, and imports its heavy library (onnxruntime, openvino, tensorrt) only
inside its functions. Adding a backend is one module and one line here (and its compiler-side
twin in :mod:`compiler.backends`).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from runtime.errors import ConfigError, unknown_name

if TYPE_CHECKING:
    from runtime.engines.base import Engine
    from runtime.manifest import EngineSpec, Manifest

__all__ = ["BACKENDS", "DEVICE_RULES", "Capabilities", "OpenRequest", "RuntimeBackend",
           "installed_version", "registered", "runtime_backend"]

# name -> the module that defines its BACKEND (first: the default of a CPU target)
_MODULES: dict[str, str] = {
    "onnxruntime": "runtime.engines.onnxruntime",
    "tensorrt": "runtime.engines.tensorrt",
    "openvino": "runtime.engines.openvino",
}
BACKENDS: tuple[str, ...] = tuple(_MODULES)
DeviceKind = Literal["cpu", "gpu"]
# The DeviceMatch rules each device kind is recognised by (targets.loader checks target files).
DEVICE_RULES: dict[str, tuple[str, ...]] = {"cpu": ("machine",),
                                            "gpu": ("jetson_model", "gpu_name")}


@dataclass(frozen=True)
class Capabilities:
    """What a backend finds on this machine: its library version (None: not installed) and the
    kernel precisions it runs here (a subset of the backend's ``precisions``)."""

    version: str | None
    precisions: tuple[str, ...]


@dataclass(frozen=True)
class OpenRequest:
    """Everything a backend needs to make one engine of a bundle (nothing opened yet)."""

    spec: EngineSpec
    manifest: Manifest
    path: Path  # the engine's runnable file, inside the bundle
    root: Path  # the bundle folder
    scale: int
    tile: int | None  # static input edge (None: any)
    threads: int
    shared: Any  # what :meth:`RuntimeBackend.shared_state` made for this bundle's engines


class RuntimeBackend(ABC):
    """One engine backend (see the module docstring). Subclasses set the class facts and
    implement :meth:`open`; nothing here imports the backend's library."""

    name: ClassVar[str]
    label: ClassVar[str]  # for humans: "ONNX Runtime"
    device: ClassVar[DeviceKind]
    precisions: ClassVar[tuple[str, ...]]  # kernel precisions it can run, cheapest first
    dialect: ClassVar[str] = "ort"  # the ONNX graphs it reads (compiler.lower.dialects)
    runs_plans: ClassVar[bool] = False  # engines open a plan built on the device, not the ONNX
    pads_batch: ClassVar[bool] = False  # a static-batch engine runs fewer tiles padded
    package: ClassVar[str]  # the Python distribution that provides it (for versions)

    @property
    def threads(self) -> bool:
        """Whether intra-op ``threads`` apply (CPU backends)."""
        return self.device == "cpu"

    @property
    def portable(self) -> bool:
        """Whether its engines run on any machine the target's rules match (ONNX graphs), as
        opposed to plans tied to the device and library version they were built with."""
        return not self.runs_plans

    def version(self) -> str | None:
        return installed_version(self.package)

    def probe(self) -> Capabilities:
        """The library version and the precisions this machine runs (default: all of them)."""
        return Capabilities(self.version(), self.precisions)

    def shared_state(self) -> Any:
        """State the engines of one bundle share (TensorRT: one scratch buffer); default none."""
        return None

    def versions(self) -> dict[str, str | None]:
        """Library versions worth recording beside a measurement."""
        return {self.name: self.version()}

    def runs(self, spec: EngineSpec) -> str | None:
        """None when this backend can run the engine ``spec`` (of a bundle built for any
        backend), else why not."""
        if self.runs_plans:
            return f"{self.label} runs plans built for it, not another backend's engines"
        origin = runtime_backend(spec.backend)
        if origin.dialect != self.dialect or origin.runs_plans or origin.device != self.device:
            return f"{self.label} does not read {origin.label} engines"
        missing = sorted({layer.precision for layer in spec.layers} - set(self.precisions))
        if spec.precision not in (*self.precisions, "mixed") or missing:
            return (f"engine {spec.name!r} runs {', '.join(missing) or spec.precision} kernels, "
                    f"which {self.label} has not")
        return None

    @abstractmethod
    def open(self, request: OpenRequest) -> Engine:
        """The engine ``request`` describes, not yet active."""


def installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def registered(modules: Mapping[str, str], name: str, attribute: str) -> Any:
    """``attribute`` of the module ``modules`` registers for backend ``name`` (imported now;
    a one-line ConfigError naming the registered backends for an unknown name)."""
    if name not in modules:
        raise ConfigError(unknown_name("backend", name, tuple(modules)))
    return getattr(importlib.import_module(modules[name]), attribute)


@cache
def runtime_backend(name: str) -> RuntimeBackend:
    """The registered backend ``name`` (its module is imported now, its library is not)."""
    backend: RuntimeBackend = registered(_MODULES, name, "BACKEND")
    return backend
