"""Write a bundle: export once, lower every planned engine, build plans where possible, manifest.

``write_bundle`` works in a staging folder beside the destination and renames it into place only
when everything (graphs, plans, record, manifest last) is written, so an interrupted build never
leaves a bundle that looks complete, and an existing bundle is replaced only by a finished one.

ONNX Runtime targets get graphs with dynamic batch, height and width (one engine serves every tile
size and whole images). TensorRT targets get static ``batch x 3 x tile x tile`` graphs in the
TensorRT dialect; their plans are built here only when TensorRT and the target's device are
present, else the bundle holds the portable half and its manifest names the one command that
finishes it on the device (``adasr build --finish BUNDLE``, :func:`finish_bundle`).

Widening (hardware ladder): the first engine whose grids were widened to 8 bits is compared, on
calibration patches through ONNX Runtime, with the same engine on the exact simulated grids: both
against the FP graph. The widened plan is kept only when its PSNR is no worse, else the whole
plan falls back to the exact grids (``plan_engines(widen=False)``); the measured numbers are in
the engines' ``note``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compiler import __version__
from compiler.lower.export import export_onnx, save_onnx
from compiler.lower.qdq import lower_engine
from compiler.plan import EnginePlan, PlannedEngine, plan_engines
from compiler.zoo.base import LoadedModel
from runtime.engines.onnxruntime import OnnxRuntimeEngine
from runtime.errors import BundleError, EngineError
from runtime.fileio import atomic_write_bytes, sha256_file
from runtime.manifest import (
    BuildInfo,
    CalibrationInfo,
    DeviceMatch,
    EngineSpec,
    FileRef,
    Manifest,
    ModelInfo,
    read_manifest,
    write_manifest,
)
from runtime.metrics import psnr

Progress = Callable[[str], None]
RECORD_NAME = "calibration.json"
TIMING_CACHE = "timing.cache"
WIDEN_PATCHES = 8


@dataclass(frozen=True)
class BuildOptions:
    opset: int = 17
    batch: int = 8  # TensorRT: static batch of the tile engines
    threads: int = 0
    widen_patches: int = WIDEN_PATCHES


def _ref(root: Path, path: Path) -> FileRef:
    return FileRef(str(path.relative_to(root)), sha256_file(path), path.stat().st_size)


def _run_graph(model: onnx.ModelProto, path: Path, patches: np.ndarray, scale: int
               ) -> np.ndarray:
    save_onnx(model, path)
    with OnnxRuntimeEngine(path.stem, path, scale) as engine:
        return engine.infer(patches)


def _check_widening(fp: onnx.ModelProto, planned: PlannedEngine, patches: np.ndarray,
                    scratch: Path, scale: int) -> tuple[bool, str]:
    """Whether the widened engine is no worse than the exact one (vs FP), and the numbers."""
    assert planned.exact is not None
    reference = _run_graph(fp, scratch / "fp.onnx", patches, scale)
    widened = _run_graph(lower_engine(fp, planned.specs, streams=False),
                         scratch / "widened.onnx", patches, scale)
    exact = _run_graph(lower_engine(fp, planned.exact, streams=False), scratch / "exact.onnx",
                       patches, scale)
    reference = np.clip(reference, 0, 1)
    p_wide, p_exact = (psnr(np.clip(out, 0, 1), reference, 1.0) for out in (widened, exact))
    keep = p_wide >= p_exact
    note = (f"8-bit grids {'kept' if keep else 'rejected'}: PSNR vs FP on {len(patches)} "
            f"calibration patches {p_wide:.2f} dB widened, {p_exact:.2f} dB exact grids")
    return keep, note


def _lower(fp: onnx.ModelProto, planned: PlannedEngine, plan: EnginePlan) -> onnx.ModelProto:
    target = plan.target
    if target.backend == "onnxruntime":
        # emulate: exact placement (no requantized outputs), to verify the simulated accuracy
        # on integer kernels; hardware: every conv INT8 end to end, for speed
        return fp if planned.reference else lower_engine(
            fp, planned.specs, requantize=plan.ladder == "hardware")
    float_type = "fp16" if target.strongly_typed and target.top_precision == "fp16" else "fp32"
    model = lower_engine(fp, planned.specs, dialect="tensorrt", float_type=float_type,
                         max_opset=target.max_opset)
    from compiler.lower.trt import check_tensorrt_graph

    check_tensorrt_graph(model, target.max_opset)
    return model


def _device_facts() -> tuple[str | None, str | None]:
    """(TensorRT version, device name) when both are present here, else (None, None)."""
    from compiler.engines import tensorrt_build as trt_build

    try:
        return trt_build.tensorrt_version(), trt_build.device_name()
    except EngineError:
        return None, None


def _build_plans(root: Path, manifest: Manifest, plan_target: Any, batch: int,
                 progress: Progress) -> Manifest:
    """Build every pending TensorRT plan of ``manifest`` (files under ``root``) on this device."""
    from compiler.engines import tensorrt_build as trt_build

    version, device = trt_build.tensorrt_version(), trt_build.device_name()
    cache = root / TIMING_CACHE
    engines = []
    for spec in manifest.engines:
        shape = (batch, 3, manifest.tile, manifest.tile)
        build = trt_build.spec_for_target(plan_target, root / spec.onnx.path, "lr", shape,
                                          timing_cache=cache)
        key = trt_build.engine_cache_key(spec.onnx.sha256, build, version, device)
        plan_path = root / "engines" / f"{spec.name}.{key[:12]}.plan"
        if not plan_path.is_file():
            progress(f"building TensorRT plan {spec.name} ({build.recipe})")
            atomic_write_bytes(plan_path, trt_build.build_engine(build))
        engines.append(replace(spec, plan=_ref(root, plan_path), cache_key=key))
    build_info = replace(manifest.build, tensorrt=version, device=device, finish_command=None)
    return replace(manifest, engines=tuple(engines), build=build_info)


def write_bundle(loaded: LoadedModel, record: Mapping[str, Any], plan: EnginePlan,
                 destination: Path, *, patches: np.ndarray | None = None,
                 options: BuildOptions = BuildOptions(),
                 progress: Progress = lambda _: None,
                 ladder_images: Sequence[np.ndarray] | None = None) -> Manifest:
    """Build ``plan`` for ``loaded`` into the bundle folder ``destination`` (replaced atomically).

    ``patches`` (N x 3 x h x w float32 LR calibration patches) drive the widening check; without
    them widened grids are kept unmeasured and the engine note says so. ``ladder_images``
    (uint8 H x W x 3 calibration images) measure the rung ladder of an ONNX Runtime bundle
    (:func:`compiler.predictor.measure_ladder`); without them the bundle has none.
    """
    target = plan.target
    staging = destination.parent / f".{destination.name}.building-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    (staging / "engines").mkdir(parents=True)
    try:
        progress("exporting the FP network to ONNX")
        if target.backend == "onnxruntime":
            fp = export_onnx(loaded.model, plan.tile, opset=options.opset, dynamic=True,
                             dynamic_batch=True)
            shape = (-1, 3, -1, -1)
        else:
            fp = export_onnx(loaded.model, plan.tile, opset=min(options.opset, target.max_opset),
                             batch=options.batch)
            shape = (options.batch, 3, plan.tile, plan.tile)
        note = ""
        widened = [planned for planned in plan.engines if planned.widened]
        if widened and patches is None:
            note = "8-bit grids kept unmeasured (no calibration patches given)"
        elif widened:
            progress(f"measuring widened grids of {widened[0].name}")
            check_fp = fp if target.backend == "onnxruntime" else export_onnx(
                loaded.model, plan.tile, opset=options.opset, dynamic=True, dynamic_batch=True)
            keep, note = _check_widening(check_fp, widened[0], patches[:options.widen_patches],
                                         staging, loaded.info.scale)
            if not keep:
                plan = plan_engines(record, target, plan.ladder, tile=plan.tile,
                                    overlap=plan.overlap, widen=False,
                                    floats=plan.float_layers)
        specs = []
        for planned in plan.engines:
            progress(f"lowering engine {planned.name}")
            path = staging / "engines" / f"{planned.name}.onnx"
            save_onnx(_lower(fp, planned, plan), path)
            specs.append(EngineSpec(
                name=planned.name, backend=target.backend, onnx=_ref(staging, path), plan=None,
                precision=planned.precision, offsets=planned.offsets, reference=planned.reference,
                fab=planned.fab, layers=planned.layers, input_shape=shape,
                note=note if planned.widened or not plan.widen else ""))
        for scratch in ("fp.onnx", "widened.onnx", "exact.onnx"):
            (staging / scratch).unlink(missing_ok=True)
        record_path = staging / RECORD_NAME
        atomic_write_bytes(record_path, (json.dumps(record, indent=1) + "\n").encode())
        manifest = _manifest(loaded, record, plan, tuple(specs), _ref(staging, record_path),
                             options)
        if target.backend == "onnxruntime" and ladder_images:
            from compiler.predictor import measure_ladder

            ladder, summary = measure_ladder(staging, manifest, ladder_images, progress=progress)
            manifest = replace(manifest, rungs=ladder)
            progress(f"rung ladder: {summary}")
        if target.backend == "tensorrt":
            version, device = _device_facts()
            if version is not None and device is not None:
                manifest = _build_plans(staging, manifest, target, options.batch, progress)
            else:
                command = f"adasr build --finish {destination}"
                manifest = replace(manifest, build=replace(manifest.build,
                                                           finish_command=command))
        write_manifest(staging, manifest)
        _swap_into_place(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _manifest(loaded: LoadedModel, record: Mapping[str, Any], plan: EnginePlan,
              engines: tuple[EngineSpec, ...], record_ref: FileRef,
              options: BuildOptions) -> Manifest:
    import onnxruntime

    target, s = plan.target, record["settings"]
    cpu = target.backend == "onnxruntime"
    return Manifest(
        model=ModelInfo(loaded.info.path.stem,
                        loaded.info.arch, loaded.info.scale, loaded.info.sha256),
        target=target.name, backend=target.backend, ladder=plan.ladder, tile=plan.tile,
        overlap=plan.overlap, threads=options.threads or (target.threads or 0),
        thresholds=(float(record["image_thresholds"][0]), float(record["image_thresholds"][1])),
        engines=engines,
        calibration=CalibrationInfo(record_ref, str(s["method"]), int(s["wbits"]),
                                    int(s["abits"]), bool(s.get("fq", False))),
        build=BuildInfo(adasr=__version__,
                        created=datetime.datetime.now(datetime.timezone.utc).isoformat(
                            timespec="seconds"),
                        opset=options.opset, onnxruntime=onnxruntime.__version__,
                        device=platform.machine() if cpu else None),
        device_match=DeviceMatch(machine=target.device_match.machine,
                                 jetson_model=target.device_match.jetson_model,
                                 gpu_name=target.device_match.gpu_name))


def _swap_into_place(staging: Path, destination: Path) -> None:
    """Rename the finished staging folder to ``destination``; an old bundle goes only after."""
    if destination.exists():
        if not (destination / "manifest.json").is_file() and any(destination.iterdir()):
            raise BundleError(f"{destination} exists and is not a bundle: refusing to replace it "
                              "(choose another -o)")
        old = destination.parent / f".{destination.name}.old-{os.getpid()}"
        os.replace(destination, old)
        os.replace(staging, destination)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, destination)


def finish_bundle(bundle: Path, target: Any, *, batch: int | None = None,
                  progress: Progress = lambda _: None) -> Manifest:
    """On the device: build the pending TensorRT plans of ``bundle`` in place (manifest last)."""
    manifest = read_manifest(bundle)
    if manifest.backend != "tensorrt":
        raise BundleError(f"bundle {bundle} is an {manifest.backend} bundle: nothing to finish")
    version, device = _device_facts()
    if version is None or device is None:
        raise EngineError(f"TensorRT and an NVIDIA GPU are needed to finish {bundle}: run this "
                          f"on the {manifest.target}")
    size = batch or manifest.engines[0].input_shape[0]
    finished = _build_plans(bundle, manifest, target, size, progress)
    write_manifest(bundle, finished)
    return finished
