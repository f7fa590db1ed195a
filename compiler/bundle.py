"""Write a bundle: export once, lower every planned engine, build plans where possible, manifest.

``write_bundle`` works in a staging folder beside the destination and renames it into place only
when everything (graphs, plans, record, manifest last) is written, so an interrupted build never
leaves a bundle that looks complete, and an existing bundle is replaced only by a finished one.

ONNX Runtime targets get graphs with dynamic batch, height and width (one engine serves every tile
size and whole images). TensorRT targets get static ``batch x 3 x tile x tile`` graphs in the
TensorRT dialect; their plans are built here only when TensorRT and the target's device are
present, else the bundle holds the portable half and its manifest names the one command that
finishes it on the device (``adasr build --finish BUNDLE``,
:func:`compiler.engines.finish.finish_bundle`).

Widening (hardware ladder): the first engine whose grids were widened to 8 bits is compared, on
calibration patches through ONNX Runtime, with the same engine on the exact simulated grids: both
against the FP graph, both lowered in the target's own dialect (a TensorRT target's FP32
TensorRT-dialect graphs run with ONNX Runtime's optimizations off). The widened plan is kept
only when its PSNR is no worse, else the whole plan falls back to the exact grids
(``plan_engines(widen=False)``); the measured numbers are in the engines' ``note``.

The manifest records the engines' ONNX opset (the FP16 TensorRT graphs are opset 19). A
TensorRT target's plans are built only on a device its ``device_match`` names, with a TensorRT
in its range (``compiler.engines.tensorrt_build.check_build_device``).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compiler import __version__
from compiler.backends import Builder, all_builders, builder
from compiler.layers import EngineLayer
from compiler.lower.export import export_onnx, save_onnx
from compiler.lower.qdq import model_opset
from compiler.plan import EnginePlan, PlannedEngine, plan_engines
from compiler.quant.record import CalibrationRecord, record_from_json
from compiler.zoo.base import LoadedModel
from runtime.engines.onnxruntime import OnnxRuntimeEngine, session_options
from runtime.errors import EngineError, OutputError
from runtime.fileio import atomic_write_bytes
from runtime.manifest import (
    MANIFEST_NAME,
    SCHEMA,
    BuildInfo,
    CalibrationInfo,
    EngineSpec,
    FileRef,
    Manifest,
    ModelInfo,
    file_ref,
    write_manifest,
)
from runtime.metrics import psnr
from runtime.outputs import (
    deferred_signals,
    is_marked,
    mark_folder,
    marker_path,
    one_line_os_error,
    probe_writable,
    same_file,
)

Progress = Callable[[str], None]
RECORD_NAME = "calibration.json"
MARKER = marker_path(Path()).name
WIDEN_PATCHES = 8


@dataclass(frozen=True)
class BuildOptions:
    opset: int = 17  # the FP graph's; the manifest records the engines' (FP16 TensorRT: 19)
    batch: int = 8  # TensorRT: static batch of the tile engines
    threads: int = 0
    widen_patches: int = WIDEN_PATCHES


def _run_graph(model: onnx.ModelProto, path: Path, patches: np.ndarray, scale: int,
               optimize: bool = True) -> np.ndarray:
    save_onnx(model, path)
    options = session_options(0, optimize=optimize)
    with OnnxRuntimeEngine(path.stem, path, scale, options=options) as engine:
        return engine.infer(patches)


def _check_widening(fp: onnx.ModelProto, planned: PlannedEngine, patches: np.ndarray,
                    scratch: Path, scale: int, backend: Builder) -> tuple[bool, str]:
    """Whether the widened engine is no worse than the exact one (vs FP), and the numbers,
    measured on the backend's own dialect (:meth:`~compiler.backends.Builder.widening_graph`:
    ORT graphs as the runtime runs them, TensorRT-dialect graphs (FP32) with ONNX Runtime's
    optimizations off, i.e. their ONNX semantics)."""
    assert planned.exact is not None

    def run(specs: tuple[EngineLayer, ...], name: str) -> np.ndarray:
        graph, optimize = backend.widening_graph(fp, specs)
        return _run_graph(graph, scratch / name, patches, scale, optimize=optimize)

    reference = _run_graph(fp, scratch / "fp.onnx", patches, scale)
    widened, exact = run(planned.specs, "widened.onnx"), run(planned.exact, "exact.onnx")
    reference = np.clip(reference, 0, 1)
    p_wide, p_exact = (psnr(np.clip(out, 0, 1), reference, 1.0) for out in (widened, exact))
    keep = p_wide >= p_exact
    note = (f"8-bit grids {'kept' if keep else 'rejected'}: PSNR vs FP on {len(patches)} "
            f"calibration patches {p_wide:.2f} dB widened, {p_exact:.2f} dB exact grids "
            f"({backend.dialect} dialect)")
    return keep, note


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
    checked = record_from_json(record)  # a bundle carries only a valid record
    target = plan.target
    check_destination(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    # a new name (mkdtemp): never a folder of the user's
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.building-",
                                    dir=destination.parent))
    try:
        (staging / "engines").mkdir()
        progress("exporting the FP network to ONNX")
        backend = builder(target.backend)
        how = backend.export(target, options.opset, options.batch)
        fp = export_onnx(loaded.model, plan.tile, opset=how.opset, dynamic=how.dynamic,
                         dynamic_batch=how.dynamic, batch=1 if how.dynamic else how.batch)
        shape = (-1, 3, -1, -1) if how.dynamic else (how.batch, 3, plan.tile, plan.tile)
        note = ""
        widened = [planned for planned in plan.engines if planned.widened]
        if widened and patches is None:
            note = "8-bit grids kept unmeasured (no calibration patches given)"
        elif widened:
            progress(f"measuring widened grids of {widened[0].name}")
            check_fp = fp if how.dynamic else export_onnx(
                loaded.model, plan.tile, opset=options.opset, dynamic=True, dynamic_batch=True)
            keep, note = _check_widening(check_fp, widened[0], patches[:options.widen_patches],
                                         staging, loaded.info.scale, backend)
            if not keep:
                plan = plan_engines(record, target, plan.ladder, tile=plan.tile,
                                    overlap=plan.overlap, widen=False, floats=plan.float_layers)
        specs, opsets = [], set()
        for planned in plan.engines:
            progress(f"lowering engine {planned.name}")
            path = staging / "engines" / f"{planned.name}.onnx"
            graph = backend.lower(fp, planned, plan)
            opsets.add(model_opset(graph))
            save_onnx(graph, path)
            specs.append(EngineSpec(
                name=planned.name, backend=target.backend, onnx=file_ref(staging, path),
                plan=None,
                precision=planned.precision, offsets=planned.offsets, reference=planned.reference,
                fab=planned.fab, layers=planned.layers, input_shape=shape,
                note=note if planned.widened or not plan.widen else ""))
        for scratch in ("fp.onnx", "widened.onnx", "exact.onnx"):
            (staging / scratch).unlink(missing_ok=True)
        record_path = staging / RECORD_NAME
        atomic_write_bytes(record_path, (json.dumps(record, indent=1) + "\n").encode())
        if len(opsets) != 1:
            raise EngineError(f"the engines of one bundle have opsets {sorted(opsets)}; "
                              "expected one")
        record_ref = file_ref(staging, record_path)
        manifest = _manifest(loaded, checked, plan, tuple(specs), record_ref,
                             replace(options, opset=opsets.pop()))
        if backend.rung_ladder and ladder_images:
            from compiler.predictor import measure_ladder

            ladder, summary = measure_ladder(staging, manifest, ladder_images, progress=progress)
            manifest = replace(manifest, rungs=ladder)
            progress(f"rung ladder: {summary}")
        manifest = backend.finish(staging, manifest, target, options.batch, destination,
                                  progress)
        mark_folder(staging, SCHEMA)
        write_manifest(staging, manifest)
        _swap_into_place(staging, destination)
    except BaseException as err:
        with deferred_signals(reraise=False):
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OutputError) and isinstance(err.__cause__, OSError):
            # the staging folder is gone: name the bundle (untouched) and the cause
            raise OutputError(f"cannot write the bundle {destination}: "
                              f"{one_line_os_error(err.__cause__)}; nothing was changed") from err
        raise
    return manifest


def _manifest(loaded: LoadedModel, record: CalibrationRecord, plan: EnginePlan,
              engines: tuple[EngineSpec, ...], record_ref: FileRef,
              options: BuildOptions) -> Manifest:
    import onnxruntime

    target, s = plan.target, record.settings
    return Manifest(
        model=ModelInfo(loaded.info.path.stem,
                        loaded.info.arch, loaded.info.scale, loaded.info.sha256),
        target=target.name, backend=target.backend, ladder=plan.ladder, tile=plan.tile,
        overlap=plan.overlap, threads=options.threads or (target.threads or 0),
        thresholds=record.image_thresholds, engines=engines,
        calibration=CalibrationInfo(record_ref, s.method, s.wbits, s.abits, s.fq),
        build=BuildInfo(adasr=__version__,
                        created=datetime.datetime.now(datetime.timezone.utc).isoformat(
                            timespec="seconds"),
                        opset=options.opset, onnxruntime=onnxruntime.__version__,
                        **builder(target.backend).build_info(target)),
        device_match=target.device_match)


def is_bundle_folder(folder: Path) -> bool:
    """Whether ``folder`` is provably a bundle adasr wrote, so a rebuild may replace it: it
    carries the bundle marker (:func:`runtime.outputs.mark_folder`) and a manifest of this
    schema, or (bundles written before the marker) such a manifest and nothing but bundle
    files."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    try:
        schema = json.loads((folder / MANIFEST_NAME).read_text()).get("schema")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False
    if schema != SCHEMA:
        return False
    if is_marked(folder, SCHEMA):
        return True
    entries = {entry.name for entry in folder.iterdir()}
    engines = folder / "engines"
    files = {MANIFEST_NAME, RECORD_NAME, "engines", "profile.json", "profile"}
    suffixes = {".data"}
    for backend in all_builders():
        files.update(backend.bundle_files)
        suffixes.update(backend.engine_suffixes)
    return entries <= files and (not engines.exists() or engines.is_dir() and all(
        path.suffix in suffixes for path in engines.iterdir()))


def check_destination(destination: Path, inputs: Iterable[Path] = ()) -> None:
    """Refuse (one line, before any work) a bundle folder that cannot be (re)placed: a file or
    symlink, a folder that is not provably an adasr bundle (see :func:`is_bundle_folder`) and not
    empty, a folder holding one of ``inputs`` (other than its own record), or a parent folder that
    is read-only."""
    what = f"bundle folder -o {destination}"
    if destination.is_symlink() or destination.exists() and not destination.is_dir():
        raise OutputError(f"{what} is {'a symlink' if destination.is_symlink() else 'a file'}, "
                          "not a folder: choose another -o")
    if destination.is_dir() and any(destination.iterdir()):
        if not is_bundle_folder(destination):
            raise OutputError(f"{what} exists and is not a bundle adasr wrote (no {MARKER} "
                              "marker and adasr.bundle/1 manifest): refusing to replace it; "
                              "choose another -o")
        inside = [path for path in inputs if path.resolve().is_relative_to(destination.resolve())
                  and not same_file(path, destination / RECORD_NAME)]
        if inside:
            raise OutputError(f"{what} holds the input {inside[0]}, which a rebuild would "
                              "delete: move it out or choose another -o")
    probe_writable(destination, "bundle folder -o")


def _swap_into_place(staging: Path, destination: Path) -> None:
    """Rename the finished staging folder to ``destination``; an old bundle goes only after,
    and only when it is provably a bundle (:func:`check_destination`, checked again here)."""
    check_destination(destination)
    if destination.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=destination.parent))
        with deferred_signals():
            os.replace(destination, old)  # onto the empty new folder: rename(2) allows it
            os.replace(staging, destination)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, destination)
