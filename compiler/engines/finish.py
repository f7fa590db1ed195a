"""Build a TensorRT bundle's plans on the device (``adasr build --finish``, and ``adasr build``
itself on a machine with TensorRT and a GPU).

Imports neither torch nor onnx, so it runs where adasr was installed without the compiler's
extra: a Jetson with JetPack's TensorRT. The plans go into the bundle folder (paths through
:func:`runtime.bundlepaths.bundle_path`), the manifest last.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from compiler.engines import tensorrt_build as trt_build
from runtime.bundlepaths import bundle_path
from runtime.errors import BundleError, EngineError
from runtime.fileio import atomic_write_bytes
from runtime.manifest import INPUT_NAME, Manifest, file_ref, read_manifest, write_manifest
from targets.loader import probe_device

Progress = Callable[[str], None]
TIMING_CACHE = "timing.cache"


def device_facts() -> tuple[str | None, str | None]:
    """(TensorRT version, device name) when both are present here, else (None, None)."""
    try:
        return trt_build.tensorrt_version(), trt_build.device_name()
    except EngineError:
        return None, None


def builds_here(target: Any, version: str) -> bool:
    """Whether this device and TensorRT may build ``target``'s plans."""
    try:
        trt_build.check_build_device(target, probe_device(), version, Path("."))
    except EngineError:
        return False
    return True


def build_plans(root: Path, manifest: Manifest, plan_target: Any, batch: int,
                progress: Progress, version: str, device: str) -> Manifest:
    """Build every pending TensorRT plan of ``manifest`` (files under ``root``) on this device
    (TensorRT ``version``, named ``device``)."""
    trt_build.check_build_device(plan_target, probe_device(), version, root)
    cache = bundle_path(root, TIMING_CACHE, "TensorRT timing cache")
    engines = []
    for spec in manifest.engines:
        shape = (batch, 3, manifest.tile, manifest.tile)
        what = f"engine {spec.name!r}"
        build = trt_build.spec_for_target(plan_target, bundle_path(root, spec.onnx.path, what),
                                          INPUT_NAME, shape, timing_cache=cache)
        key = trt_build.engine_cache_key(spec.onnx.sha256, build, version, device)
        plan_path = bundle_path(root, f"engines/{spec.name}.{key[:12]}.plan", what)
        if not plan_path.is_file():
            progress(f"building TensorRT plan {spec.name} ({build.recipe})")
            atomic_write_bytes(plan_path, trt_build.build_engine(build))
        engines.append(replace(spec, plan=file_ref(root, plan_path), cache_key=key))
    build_info = replace(manifest.build, tensorrt=version, device=device, finish_command=None)
    return replace(manifest, engines=tuple(engines), build=build_info)


def finish_bundle(bundle: Path, target: Any, *, batch: int | None = None,
                  progress: Progress = lambda _: None) -> Manifest:
    """On the device: build the pending TensorRT plans of ``bundle`` in place (manifest last)."""
    manifest = read_manifest(bundle)
    if manifest.backend != "tensorrt":
        raise BundleError(f"bundle {bundle} is an {manifest.backend} bundle: nothing to finish")
    version, device = device_facts()
    if version is None or device is None:
        raise EngineError(f"TensorRT and an NVIDIA GPU are needed to finish {bundle}: run this "
                          f"on the {manifest.target}")
    size = batch or manifest.engines[0].input_shape[0]
    finished = build_plans(bundle, manifest, target, size, progress, version, device)
    write_manifest(bundle, finished)
    return finished
