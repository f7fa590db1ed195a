"""Open a bundle on a device: read the manifest, verify the files, check the device, make engines.

``open_bundle`` refuses (with :class:`BundleError`) a bundle whose files are missing or fail their
sha256, a CPU bundle built for another machine architecture, and a TensorRT bundle whose plans are
not built yet; the TensorRT engine module refuses plans built on another GPU or TensorRT version
when they are activated. ``--allow-other-device`` style overrides exist for the CPU check only
(ONNX graphs are portable; TensorRT plans are not).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.backends import OpenRequest, runtime_backend
from runtime.bundlepaths import bundle_path, check_single_file_onnx
from runtime.engines.base import Engine
from runtime.errors import BundleError
from runtime.fileio import sha256_file
from runtime.manifest import EngineSpec, FileRef, Manifest, read_manifest

__all__ = ["Bundle", "open_bundle", "verify_file"]


def verify_file(root: Path, ref: FileRef, what: str) -> Path:
    """The path of ``ref`` under ``root`` after checking it lies inside the bundle (no symbolic
    link, :func:`~runtime.bundlepaths.bundle_path`), exists, matches its sha256 and, for an ONNX
    graph, keeps no external data. Nothing outside the bundle is opened or hashed."""
    path = bundle_path(root, ref.path, what)
    if not path.is_file():
        raise BundleError(f"{what}: {ref.path} is missing from bundle {root}; rebuild the bundle")
    digest = sha256_file(path)
    if digest != ref.sha256:
        raise BundleError(f"{what}: {ref.path} fails its checksum (manifest {ref.sha256[:12]}, "
                          f"file {digest[:12]}): it was modified or corrupted; rebuild the bundle")
    if path.suffix == ".onnx":
        check_single_file_onnx(path, what)
    return path


def _check_machine(manifest: Manifest, machine: str) -> None:
    allowed = manifest.device_match.machine
    if allowed and machine.lower() not in {m.lower() for m in allowed}:
        raise BundleError(f"bundle was built for target {manifest.target!r} (machine "
                          f"{'/'.join(allowed)}) but this machine is {machine}: build one for "
                          "this machine with `adasr build` (its target is detected by default)")


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Manifest

    @property
    def scale(self) -> int:
        return self.manifest.model.scale

    def path(self, ref: FileRef, what: str) -> Path:
        """Where the bundle file ``ref`` is (inside the bundle; symbolic links refused)."""
        return bundle_path(self.root, ref.path, what)

    def engine(self, name: str, *, threads: int | None = None, static: bool = True,
               scratch: Any = None, backend: str | None = None) -> Engine:
        """The engine ``name``, not yet active. ``static``: refuse other than tile-size inputs
        when the engine was built for a static shape. ``scratch``: what the backend's engines
        share (:meth:`~runtime.backends.RuntimeBackend.shared_state`; None: their own).
        ``backend``: open it with another backend that reads the same graphs (``adasr profile
        --backends``; :meth:`~runtime.backends.RuntimeBackend.runs` says which can)."""
        spec = self.manifest.engine(name)
        return self._make(spec, self.manifest.threads if threads is None else threads, static,
                          scratch, backend or spec.backend)

    def engines(self, *, threads: int | None = None) -> dict[str, Engine]:
        """Every engine, sharing what their backend shares (TensorRT: one scratch buffer)."""
        shared = runtime_backend(self.manifest.backend).shared_state()
        return {name: self.engine(name, threads=threads, scratch=shared)
                for name in self.manifest.names}

    def _make(self, spec: EngineSpec, threads: int, static: bool, scratch: Any,
              name: str) -> Engine:
        tile = spec.input_shape[2] if static and spec.input_shape[2] > 0 else None
        backend = runtime_backend(name)
        if name != spec.backend and backend.runs(spec) is not None:
            raise BundleError(f"cannot open engine {spec.name!r} of this {spec.backend} bundle "
                              f"with {name}: {backend.runs(spec)}")
        ref = spec.runnable_file
        if ref is None:
            raise BundleError(f"engine {spec.name!r} has no {backend.label} plan yet")
        path = self.path(ref, f"engine {spec.name!r}")
        if path.suffix == ".onnx" and path.is_file():  # a missing one: the engine's error
            check_single_file_onnx(path, f"engine {spec.name!r}")  # when it is activated
        return backend.open(OpenRequest(spec, self.manifest, path, self.root, self.scale, tile,
                                        threads, scratch))


def open_bundle(root: Path, *, verify: bool = True, any_machine: bool = False,
                machine: str | None = None) -> Bundle:
    """Read and check the bundle folder ``root`` (see the module docstring)."""
    manifest = read_manifest(root)
    backend = runtime_backend(manifest.backend)
    if manifest.pending:
        names = ", ".join(e.name for e in manifest.pending)
        finish = manifest.build.finish_command or "adasr build --finish " + str(root)
        raise BundleError(f"bundle {root} holds the portable half only: the {backend.label} "
                          f"plans of {names} are not built yet; on the {manifest.target} run: "
                          f"{finish}")
    if backend.portable and not any_machine:
        _check_machine(manifest, machine or platform.machine())
    if verify:
        verify_file(root, manifest.calibration.file, "calibration record")
        for spec in manifest.engines:
            ref = spec.runnable_file
            if ref is not None:
                verify_file(root, ref, f"engine {spec.name!r}")
    return Bundle(root, manifest)
