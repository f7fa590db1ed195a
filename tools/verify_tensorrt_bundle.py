#!/usr/bin/env python3
"""Check a TensorRT bundle's plans against their ONNX graphs' own semantics (needs a GPU).

Run on the device, after ``adasr build --finish BUNDLE``: for every engine of the bundle that has
a plan, runs the plan with adasr's own :class:`TensorRTEngine` (the runtime that serves frames)
and the engine's ONNX graph with ONNX Runtime (CPU) **with its graph optimizations off**
(``ORT_DISABLE_ALL``: the graph's ONNX semantics; ORT's optimizer would substitute its own
QLinearConv arithmetic and move low-bit grids), on a random and a smooth batch in [0, 1]. Both
outputs are rounded to 8-bit pixels as the runtime writes them, and the tool reports the share
of pixel values that differ (the lowering's claim: none for FP32 graphs, whose quantized convs
sum integer levels exactly), with max |diff| and PSNR (peak 1.0). Files are checked against their
manifest checksums first; plans built on another device or TensorRT version are refused. Exit
status: 0 when every engine's share is at most ``--max-differing``, 1 otherwise, 2 on an error.

    python tools/verify_tensorrt_bundle.py out/edsr-x2-jetson-orin-nano --batch 4

The same check runs as ``pytest -m gpu tests/runtime/test_verify_tensorrt_gpu.py`` on a machine
with a GPU and TensorRT. Without TensorRT this imports and prints ``--help``; anything else
stops with adasr's "TensorRT is not installed" error.
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
from runtime.engines.onnxruntime import OnnxRuntimeEngine, session_options  # noqa: E402
from runtime.engines.tensorrt import (  # noqa: E402
    SharedScratch,
    TensorRTEngine,
    current_device,
    require_tensorrt,
)
from runtime.errors import AdasrError, BundleError  # noqa: E402
from runtime.imaging import to_uint8  # noqa: E402
from runtime.manifest import EngineSpec, Manifest, read_manifest  # noqa: E402

INPUT_KINDS = ("random", "smooth")


@dataclass(frozen=True)
class Comparison:
    engine: str
    kind: str
    differing: float  # share of 8-bit output values that differ
    max_abs: float
    psnr: float
    passed: bool


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run every TensorRT plan of a bundle with adasr's TensorRT engine and its "
                    "ONNX graph with ONNX Runtime (optimizations off), on random and smooth "
                    "tiles, and report the share of differing 8-bit output values (needs a GPU "
                    "and TensorRT).")
    parser.add_argument("bundle", type=Path, help="the bundle folder (with manifest.json)")
    parser.add_argument("--engine", action="append", default=None, metavar="NAME",
                        help="check only this engine (repeatable; default: all with a plan)")
    parser.add_argument("--batch", type=int, default=1,
                        help="tiles per input when the plan's batch is dynamic (1)")
    parser.add_argument("--max-differing", type=float, default=0.0,
                        help="largest allowed share of differing 8-bit output values (0: "
                             "identical, the claim for FP32 graphs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random input (0)")
    parser.add_argument("--threads", type=int, default=0,
                        help="ONNX Runtime intra-op threads (0: its default)")
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
        print(f"FAIL: {', '.join(failed)} (more than {args.max_differing:.4%} of the 8-bit "
              "output values differ)")
        return 1
    print(f"PASS: {len(specs)} engine(s) with at most {args.max_differing:.4%} of the 8-bit "
          "output values differing")
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
                                batch=shape[0], bundle=root)
    ort_engine = OnnxRuntimeEngine(spec.name, onnx_path, scale, shape[2],
                                   options=session_options(args.threads, optimize=False))
    results = []
    with trt_engine, ort_engine:
        for kind, tile in zip(INPUT_KINDS, make_inputs(shape, args.seed), strict=True):
            got, ref = trt_engine.infer(tile), ort_engine.infer(tile)
            differing = float(np.mean(to_uint8(got) != to_uint8(ref)))
            diff = got.astype(np.float64) - ref.astype(np.float64)
            max_abs = float(np.abs(diff).max())
            psnr = psnr_db(float(np.mean(diff * diff)))
            passed = differing <= args.max_differing
            results.append(Comparison(spec.name, kind, differing, max_abs, psnr, passed))
            print(f"  {spec.name:<8} {kind:<7} {'x'.join(map(str, shape))}: {differing:.4%} "
                  f"of 8-bit values differ, max |diff| {max_abs:.3g}, PSNR {psnr:.2f} dB  "
                  f"{'ok' if passed else 'MISMATCH'}")
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
