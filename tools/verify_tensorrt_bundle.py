#!/usr/bin/env python3
"""Check a TensorRT engine against ONNX Runtime on the same ONNX engine graph (needs a GPU).

Run on the device, with TensorRT installed: builds the plan with adasr's builder (or loads
``--plan`` when it exists), runs it with Polygraphy's ``TrtRunner`` and the graph with
``OnnxrtRunner`` (CPU) on a random and a smooth input in [0, 1], compares the outputs with
Polygraphy's ``Comparator`` and prints max |diff| and PSNR (peak 1.0, the SR output range) per
input. Exit status: 0 when every comparison passes, 1 on a mismatch, 2 on an error.

    python tools/verify_tensorrt_bundle.py out/bundle/x2_w4a4.onnx --tile 64 --plan x2_w4a4.plan

Without TensorRT it imports and prints ``--help``; anything else stops with adasr's
"TensorRT is not installed" error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from compiler.engines.tensorrt_build import (  # noqa: E402
    TrtBuildSpec,
    build_engine,
    device_name,
    engine_cache_key,
    spec_for_target,
    tensorrt_version,
)
from runtime.errors import AdasrError, ConfigError  # noqa: E402
from runtime.fileio import atomic_write_bytes, sha256_file  # noqa: E402

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

TRT_RUNNER = "tensorrt"
ORT_RUNNER = "onnxruntime"
INPUT_KINDS = ("random", "smooth")


@dataclass(frozen=True)
class GraphInput:
    """The ONNX graph's image input: name, dims (-1 where dynamic) and numpy dtype."""

    name: str
    dims: tuple[int, ...]
    dtype: np.dtype[np.generic]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Build (or load) a TensorRT engine for an ONNX engine graph and compare it "
                    "with ONNX Runtime on random and smooth inputs (needs a GPU and TensorRT).")
    parser.add_argument("onnx", type=Path, help="the ONNX engine graph (Q/DQ)")
    parser.add_argument("--plan", type=Path,
                        help="engine file: loaded when it exists, else built and written here")
    parser.add_argument("--rebuild", action="store_true", help="build even if --plan exists")
    parser.add_argument("--target", default=None,
                        help="target name or .toml file for the precision recipe "
                             "(default: detect this device)")
    parser.add_argument("--tile", type=int, help="LR tile size when the graph's H, W are dynamic")
    parser.add_argument("--batch", type=int, default=1, help="batch when N is dynamic (1)")
    parser.add_argument("--dla-core", type=int, default=None, help="build for this DLA core")
    parser.add_argument("--timing-cache", type=Path, help="timing cache file to load and update")
    parser.add_argument("--atol", type=float, default=2e-2,
                        help="largest allowed max |TensorRT - ONNX Runtime| (0.02)")
    parser.add_argument("--min-psnr", type=float, default=40.0,
                        help="smallest allowed PSNR in dB, peak 1.0 (40)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random input (0)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return verify(args)
    except AdasrError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def verify(args: argparse.Namespace) -> int:
    graph_input = read_graph_input(args.onnx)
    shape = static_shape(graph_input, args.tile, args.batch)
    spec = build_spec(args, graph_input.name, shape)
    key = engine_cache_key(sha256_file(args.onnx), spec, tensorrt_version(), device_name())
    print(f"engine {args.onnx.name}: shape {shape}, recipe {spec.recipe}, cache key {key[:16]}")
    plan = load_or_build(spec, args.plan, args.rebuild)
    feeds = make_inputs(graph_input, shape, args.seed)
    return compare(args.onnx, plan, graph_input.name, feeds, args.atol, args.min_psnr)


def read_graph_input(path: Path) -> GraphInput:
    import onnx
    from onnx import helper

    if not path.is_file():
        raise ConfigError(f"ONNX file not found: {path}")
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    inputs = [value for value in graph.input if value.name not in weights]
    if len(inputs) != 1:
        raise ConfigError(f"{path}: expected one image input, found {[v.name for v in inputs]}")
    tensor = inputs[0].type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
    return GraphInput(inputs[0].name, dims, helper.tensor_dtype_to_np_dtype(tensor.elem_type))


def static_shape(graph_input: GraphInput, tile: int | None,
                 batch: int) -> tuple[int, int, int, int]:
    """The graph's NCHW input shape, with --batch and --tile filling dynamic dimensions."""
    dims = graph_input.dims
    if len(dims) != 4:
        raise ConfigError(f"input {graph_input.name!r} has shape {dims}: expected NCHW")
    if (dims[2] < 0 or dims[3] < 0) and tile is None:
        raise ConfigError(f"input {graph_input.name!r} has dynamic H, W {dims}: give --tile")
    n, c, h, w = (dim if dim > 0 else fill for dim, fill in
                  zip(dims, (batch, 3, tile or 0, tile or 0), strict=True))
    return n, c, h, w


def build_spec(args: argparse.Namespace, input_name: str,
               shape: tuple[int, int, int, int]) -> TrtBuildSpec:
    from targets.loader import detect_target, load_target

    target = load_target(args.target) if args.target else detect_target()
    if target.backend != "tensorrt":
        raise ConfigError(f"this machine matched target {target.name!r} ({target.backend}): "
                          "name its TensorRT target with --target")
    return spec_for_target(target, args.onnx, input_name, shape, dla_core=args.dla_core,
                           timing_cache=args.timing_cache)


def load_or_build(spec: TrtBuildSpec, plan_path: Path | None, rebuild: bool) -> bytes:
    if plan_path is not None and plan_path.is_file() and not rebuild:
        print(f"loading {plan_path}")
        return plan_path.read_bytes()
    print(f"building {spec.onnx_path} with TensorRT {tensorrt_version()} on {device_name()}")
    plan = build_engine(spec)
    if plan_path is not None:
        atomic_write_bytes(plan_path, plan)
        print(f"wrote {plan_path} ({len(plan) / 1e6:.1f} MB)")
    return plan


def make_inputs(graph_input: GraphInput, shape: tuple[int, int, int, int],
                seed: int) -> list[dict[str, npt.NDArray[np.generic]]]:
    """A uniform-noise image and a smooth one (low-frequency waves), both in [0, 1]."""
    import numpy as np

    n, c, h, w = shape
    noise = np.random.default_rng(seed).random(shape)
    y, x = np.meshgrid(np.linspace(0.0, 1.0, h), np.linspace(0.0, 1.0, w), indexing="ij")
    phases = np.arange(n * c, dtype=np.float64).reshape(n, c, 1, 1)
    smooth = 0.5 + 0.45 * np.sin(2.0 * np.pi * (0.7 * x + 0.4 * y) + phases)
    return [{graph_input.name: image.astype(graph_input.dtype)} for image in (noise, smooth)]


def compare(onnx_path: Path, plan: bytes, input_name: str,
            feeds: list[dict[str, npt.NDArray[np.generic]]], atol: float,
            min_psnr: float) -> int:
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator

    runners = [TrtRunner(EngineFromBytes(plan), name=TRT_RUNNER),
               OnnxrtRunner(SessionFromOnnx(str(onnx_path)), name=ORT_RUNNER)]
    results = Comparator.run(runners, data_loader=feeds)
    verdict = bool(Comparator.compare_accuracy(results, compare_func=max_abs_compare_func(atol)))
    psnr_ok = print_summary(results, min_psnr)
    passed = verdict and psnr_ok
    print(f"{'PASS' if passed else 'FAIL'}: max |diff| <= {atol} "
          f"{'met' if verdict else 'NOT met'}, PSNR >= {min_psnr} dB "
          f"{'met' if psnr_ok else 'NOT met'} (input {input_name!r})")
    return 0 if passed else 1


def max_abs_compare_func(atol: float) -> Any:
    """Polygraphy's simple comparison on the max absolute error alone (rtol 0)."""
    try:
        from polygraphy.comparator import SimpleCompareFunc
    except ImportError:  # older Polygraphy: only the (now deprecated) CompareFunc.simple
        from polygraphy.comparator import CompareFunc

        return CompareFunc.simple(atol=atol, rtol=0.0, check_error_stat="max")
    return SimpleCompareFunc(atol=atol, rtol=0.0, check_error_stat="max")


def print_summary(results: Any, min_psnr: float) -> bool:
    """Print max |diff| and PSNR per input kind and output; whether every PSNR is high enough."""
    import numpy as np

    trt_iterations = results[TRT_RUNNER]  # Polygraphy's RunResults, by runner name
    ort_iterations = results[ORT_RUNNER]
    ok = True
    for kind, trt_out, ort_out in zip(INPUT_KINDS, trt_iterations, ort_iterations, strict=True):
        for name in ort_out:
            diff = np.asarray(trt_out[name], np.float64) - np.asarray(ort_out[name], np.float64)
            max_abs = float(np.abs(diff).max())
            psnr = psnr_db(float(np.mean(diff * diff)))
            ok = ok and psnr >= min_psnr
            print(f"  {kind:<7} {name}: max |diff| {max_abs:.3g}, PSNR {psnr:.2f} dB")
    return ok


def psnr_db(mse: float, peak: float = 1.0) -> float:
    import math

    return math.inf if mse == 0.0 else 10.0 * math.log10(peak * peak / mse)


if __name__ == "__main__":
    sys.exit(main())
