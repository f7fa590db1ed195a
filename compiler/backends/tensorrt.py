"""TensorRT's compiler side: static ``batch x 3 x tile x tile`` graphs in the TensorRT dialect
(checked by :mod:`compiler.lower.trt_check`), and plans built from them on the target's device.

On a machine that is not the target's device (or has no TensorRT) the bundle holds the portable
half and its manifest names the one command that finishes it on the device (``adasr build
--finish BUNDLE``); plans are built only on a device the target's ``device_match`` names, with a
TensorRT in its range (``compiler.engines.tensorrt_build.check_build_device``). The widening
check runs the TensorRT dialect's FP32 graphs with ONNX Runtime's optimizations off (their ONNX
semantics).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compiler.backends import Builder, Progress
from runtime.bundlepaths import bundle_path
from runtime.errors import EngineError
from runtime.fileio import atomic_write_bytes
from runtime.manifest import INPUT_NAME, Manifest, file_ref
from targets.loader import Target, probe_device

if TYPE_CHECKING:
    import onnx

    from compiler.layers import EngineLayer
    from compiler.plan import EnginePlan, PlannedEngine

TIMING_CACHE = "timing.cache"


class TensorRTBuilder(Builder):
    name = "tensorrt"
    exact_float_layers = False
    static_shapes = True
    engine_suffixes = (".onnx", ".plan")
    bundle_files = (TIMING_CACHE,)

    def files(self, engine: str) -> tuple[str, ...]:
        return (f"engines/{engine}.onnx", f"engines/{engine}.<key>.plan")

    def lower(self, fp: onnx.ModelProto, planned: PlannedEngine,
              plan: EnginePlan) -> onnx.ModelProto:
        from compiler.lower.dialects import lower_engine
        from compiler.lower.trt_check import check_tensorrt_graph

        target = plan.target
        float_type = "fp16" if target.top_precision == "fp16" else "fp32"
        model = lower_engine(fp, planned.specs, dialect="tensorrt", float_type=float_type,
                             max_opset=target.max_opset)
        check_tensorrt_graph(model, target.max_opset)
        return model

    def widening_graph(self, fp: onnx.ModelProto, specs: tuple[EngineLayer, ...]
                       ) -> tuple[onnx.ModelProto, bool]:
        from compiler.lower.dialects import lower_engine

        return lower_engine(fp, specs, dialect="tensorrt"), False

    def build_info(self, target: Target) -> dict[str, Any]:
        return {}  # the device and TensorRT version are recorded when the plans are built

    def finish(self, staging: Path, manifest: Manifest, target: Target, batch: int,
               destination: Path, progress: Progress) -> Manifest:
        version, device = device_facts()
        if version is not None and device is not None and _builds_here(target, version):
            return build_plans(staging, manifest, target, batch, progress, version, device)
        # the portable half; on another device or TensorRT, --finish says what to do (the
        # bundle's own name: the device knows nothing of this machine's paths)
        command = f"adasr build --finish {destination.name}"
        return replace(manifest, build=replace(manifest.build, finish_command=command))

    def finish_on_device(self, bundle: Path, manifest: Manifest, target: Target,
                         batch: int | None, progress: Progress) -> Manifest:
        version, device = device_facts()
        if version is None or device is None:
            raise EngineError(f"TensorRT and an NVIDIA GPU are needed to finish {bundle}: run "
                              f"this on the {manifest.target}")
        size = batch or manifest.engines[0].input_shape[0]
        return build_plans(bundle, manifest, target, size, progress, version, device)


def device_facts() -> tuple[str | None, str | None]:
    """(TensorRT version, device name) when both are present here, else (None, None)."""
    from compiler.engines import tensorrt_build as trt_build

    try:
        return trt_build.tensorrt_version(), trt_build.device_name()
    except EngineError:
        return None, None


def _builds_here(target: Target, version: str) -> bool:
    """Whether this device and TensorRT may build ``target``'s plans."""
    from compiler.engines import tensorrt_build as trt_build

    try:
        trt_build.check_build_device(target, probe_device(), version, Path("."))
    except EngineError:
        return False
    return True


def build_plans(root: Path, manifest: Manifest, plan_target: Target, batch: int,
                progress: Progress, version: str, device: str) -> Manifest:
    """Build every pending TensorRT plan of ``manifest`` (files under ``root``) on this device
    (TensorRT ``version``, named ``device``)."""
    from compiler.engines import tensorrt_build as trt_build

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
    build_info = replace(manifest.build, tensorrt=version, backend_version=version,
                         device=device, finish_command=None)
    return replace(manifest, engines=tuple(engines), build=build_info)


BUILDER = TensorRTBuilder()
