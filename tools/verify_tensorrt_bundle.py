#!/usr/bin/env python3
"""Check a TensorRT bundle's plans against ONNX Runtime on their ONNX graphs (needs a GPU).

Run on the device, after ``adasr build --finish BUNDLE``: for every engine of the bundle that has
a plan, runs the plan with adasr's own :class:`TensorRTEngine` (the runtime that serves frames)
and the engine's ONNX graph with :class:`OnnxRuntimeEngine` (CPU) on a random and a smooth tile in
[0, 1], and prints max |diff| and PSNR (peak 1.0, the SR output range) per engine and input.
Files are checked against their manifest checksums first; plans built on another device or
TensorRT version are refused. Exit status: 0 when every comparison passes, 1 on a mismatch,
2 on an error.

    python tools/verify_tensorrt_bundle.py out/edsr-x2-jetson-orin-nano --batch 4

Without TensorRT it imports and prints ``--help``; anything else stops with adasr's
"TensorRT is not installed" error.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from runtime.bundle import verify_file  # noqa: E402
from runtime.engines.onnxruntime import OnnxRuntimeEngine  # noqa: E402
from runtime.engines.tensorrt import (  # noqa: E402
    SharedScratch,
    TensorRTEngine,
    current_device,
    require_tensorrt,
)
from runtime.errors import AdasrError, BundleError  # noqa: E402
from runtime.manifest import EngineSpec, Manifest, read_manifest  # noqa: E402

INPUT_KINDS = ("random", "smooth")


@dataclass(frozen=True)
class Comparison:
    engine: str
    kind: str
    max_abs: float
    psnr: float
    passed: bool


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run every TensorRT plan of a bundle with adasr's TensorRT engine and its "
                    "ONNX graph with ONNX Runtime, on random and smooth tiles, and compare "
                    "(needs a GPU and TensorRT).")
    parser.add_argument("bundle", type=Path, help="the bundle folder (with manifest.json)")
    parser.add_argument("--engine", action="append", default=None, metavar="NAME",
                        help="check only this engine (repeatable; default: all with a plan)")
    parser.add_argument("--batch", type=int, default=1,
                        help="tiles per input when the plan's batch is dynamic (1)")
    parser.add_argument("--atol", type=float, default=2e-2,
                        help="largest allowed max |TensorRT - ONNX Runtime| (0.02)")
    parser.add_argument("--min-psnr", type=float, default=40.0,
                        help="smallest allowed PSNR in dB, peak 1.0 (40)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random input (0)")
    parser.add_argument("--threads", type=int, default=0,
                        help="ONNX Runtime intra-op threads (0: its default)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="run the plans through CUDA graphs, as a video run may")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return verify(args)
    except AdasrError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def verify(args: argparse.Namespace) -> int:
    require_tensorrt()  # before anything else: the one thing this script cannot do without
    manifest = read_manifest(args.bundle)
    specs = selected_engines(manifest, args.engine)
    device, version = current_device()
    print(f"bundle {args.bundle}: plans built on {manifest.build.device} with TensorRT "
          f"{manifest.build.tensorrt}; this is {device} with TensorRT {version}")
    scratch = SharedScratch()
    results = [result for spec in specs
               for result in compare_engine(args, manifest, spec, scratch)]
    failed = sorted({r.engine for r in results if not r.passed})
    if failed:
        print(f"FAIL: {', '.join(failed)} (max |diff| > {args.atol} or PSNR < "
              f"{args.min_psnr} dB)")
        return 1
    print(f"PASS: {len(specs)} engine(s) within max |diff| {args.atol} and PSNR "
          f">= {args.min_psnr} dB")
    return 0


def selected_engines(manifest: Manifest, names: list[str] | None) -> list[EngineSpec]:
    """The engines to check: those named (all by default) that have a plan."""
    for name in names or ():
        manifest.engine(name)  # BundleError naming the allowed engines
    chosen = [spec for spec in manifest.engines if not names or spec.name in names]
    for spec in chosen:
        if spec.plan is None:
            print(f"{spec.name}: no plan yet (skipped)")
    built = [spec for spec in chosen if spec.plan is not None]
    if not built:
        finish = manifest.build.finish_command or "adasr build --finish BUNDLE"
        raise BundleError(f"no plan to check among {[s.name for s in chosen]}: build them on "
                          f"the device with: {finish}")
    return built


def compare_engine(args: argparse.Namespace, manifest: Manifest, spec: EngineSpec,
                   scratch: SharedScratch) -> list[Comparison]:
    root = args.bundle
    if spec.plan is None:
        raise BundleError(f"engine {spec.name!r} has no TensorRT plan yet")
    onnx_path = verify_file(root, spec.onnx, f"engine {spec.name!r} ONNX graph")
    plan_path = verify_file(root, spec.plan, f"engine {spec.name!r} plan")
    n, _, h, _ = spec.input_shape
    shape = (n if n > 0 else args.batch, 3, h if h > 0 else manifest.tile,
             h if h > 0 else manifest.tile)
    scale = manifest.model.scale
    trt_engine = TensorRTEngine(spec.name, plan_path, scale, shape[2],
                                expect_device=manifest.build.device,
                                expect_tensorrt=manifest.build.tensorrt, scratch=scratch,
                                batch=shape[0], cuda_graphs=args.cuda_graphs, bundle=root)
    ort_engine = OnnxRuntimeEngine(spec.name, onnx_path, scale, shape[2], threads=args.threads)
    results = []
    with trt_engine, ort_engine:
        for kind, tile in zip(INPUT_KINDS, make_inputs(shape, args.seed), strict=True):
            diff = (trt_engine.infer(tile).astype(np.float64)
                    - ort_engine.infer(tile).astype(np.float64))
            max_abs = float(np.abs(diff).max())
            psnr = psnr_db(float(np.mean(diff * diff)))
            passed = max_abs <= args.atol and psnr >= args.min_psnr
            results.append(Comparison(spec.name, kind, max_abs, psnr, passed))
            print(f"  {spec.name:<8} {kind:<7} {'x'.join(map(str, shape))}: max |diff| "
                  f"{max_abs:.3g}, PSNR {psnr:.2f} dB  {'ok' if passed else 'MISMATCH'}")
    return results


def make_inputs(shape: tuple[int, int, int, int], seed: int) -> list[npt.NDArray[np.float32]]:
    """A uniform-noise batch and a smooth one (low-frequency waves), both in [0, 1]."""
    n, c, h, w = shape
    noise = np.random.default_rng(seed).random(shape)
    y, x = np.meshgrid(np.linspace(0.0, 1.0, h), np.linspace(0.0, 1.0, w), indexing="ij")
    phases = np.arange(n * c, dtype=np.float64).reshape(n, c, 1, 1)
    smooth = 0.5 + 0.45 * np.sin(2.0 * np.pi * (0.7 * x + 0.4 * y) + phases)
    return [image.astype(np.float32) for image in (noise, smooth)]


def psnr_db(mse: float, peak: float = 1.0) -> float:
    return math.inf if mse == 0.0 else 10.0 * math.log10(peak * peak / mse)


if __name__ == "__main__":
    sys.exit(main())
