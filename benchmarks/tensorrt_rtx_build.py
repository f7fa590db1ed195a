#!/usr/bin/env python3
"""Every TensorRT-dialect graph of real bundles, parsed and built by TensorRT for RTX (no GPU).

For EDSR x2 (8 blocks) and IMDN x4 (AdaBM W8A6 FQ records, as ``bundle_parity.py`` calibrates
them; ``--records DIR`` shares its cache) and every TensorRT target: ``write_bundle`` writes the
portable half (the hardware ladder, and the emulate ladder on ``--emulate-target``), then each
engine graph goes through the product's build path with the real TensorRT-RTX parser and builder
(``compiler.engines.tensorrt_build.build_with``): parse, check that every quantized conv reads
``DQ -> Conv`` directly (``compiler.engines.tensorrt_network``), build. Per engine: layers, convs
with quantized weights, those read as DQ -> Conv, fill Slices (constant Pads) in the network,
engine bytes and build seconds (2-core CPU, no GPU: TensorRT-RTX builds without timing). Writes
benchmarks/results/tensorrt_rtx_build.{md,json}; ends with ``graphs=`` and
``int8_convs_all_fused=``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import tensorrt_rtx
import torch
from bundle_parity import MODELS, calibration_record
from common import REPO, shared, table

from compiler.bundle import BuildOptions, write_bundle
from compiler.engines.tensorrt_build import TrtBuildSpec, build_with
from compiler.lower.export import INPUT_NAME
from compiler.plan import plan_engines
from compiler.quant.patches import sample_patches
from compiler.zoo import load_model
from runtime.fileio import atomic_write_bytes, atomic_write_json
from runtime.manifest import read_manifest
from targets.loader import list_targets, load_target

HEADER = ["model", "target", "ladder", "engine", "layers", "DQ->Conv / quantized convs",
          "fill slices", "engine MB", "build s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--wbits", type=int, default=8)
    parser.add_argument("--abits", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--records", default=None,
                        help="folder of calibration records: read when present, else written")
    parser.add_argument("--batch", type=int, default=1, help="static batch of the graphs (1)")
    parser.add_argument("--emulate-target", default="jetson-orin-nano",
                        help="the target whose emulate ladder is built too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    targets = [t.name for t in list_targets() if t.backend == "tensorrt"]
    rows, payload = [], []
    for key in args.models.split(","):
        file, scale = MODELS[key]
        weights = shared(f"weights/{file}")
        record = calibration_record(key, weights, scale, args)
        patches = sample_patches(shared("calibration/sun_hays8"), 8, 48, seed=0,
                                 downscale=scale).numpy()
        for name in targets:
            ladders = ("hardware", "emulate") if name == args.emulate_target else ("hardware",)
            for ladder in ladders:
                plan = plan_engines(record, load_target(name), ladder)
                with tempfile.TemporaryDirectory() as tmp:
                    root = Path(tmp) / "bundle"
                    write_bundle(load_model(weights), record, plan, root, patches=patches,
                                 options=BuildOptions(batch=args.batch))
                    for spec in read_manifest(root).engines:
                        shape = (args.batch, 3, plan.tile, plan.tile)
                        start = time.perf_counter()
                        data, report = build_with(tensorrt_rtx, TrtBuildSpec(
                            root / spec.onnx.path, INPUT_NAME, shape))
                        seconds = time.perf_counter() - start
                        entry: dict[str, Any] = {
                            "model": key, "target": name, "ladder": ladder, "engine": spec.name,
                            "layers": len(report.layers), "quantized_convs": len(report.quantized),
                            "dq_conv": len(report.int8), "fill_slices": report.fill_slices,
                            "engine_bytes": len(data), "build_s": seconds, "tile": plan.tile,
                            "layer_list": list(report.layers)}
                        payload.append(entry)
                        rows.append([key, name, ladder, spec.name, str(entry["layers"]),
                                     f"{entry['dq_conv']} / {entry['quantized_convs']}",
                                     str(report.fill_slices), f"{len(data) / 1e6:.2f}",
                                     f"{seconds:.1f}"])
                        print(table(rows[-1:], HEADER).splitlines()[-1], flush=True)
    text = table(rows, HEADER)
    print(text)
    fused = all(e["dq_conv"] == e["quantized_convs"] for e in payload)
    note = (f"TensorRT for RTX {tensorrt_rtx.__version__} (tensorrt-rtx-cu13), CPU only, strongly "
            f"typed networks; AdaBM W{args.wbits}A{args.abits} FQ, {args.steps} steps; graphs "
            f"as adasr build writes them (static batch {args.batch}, the target's tile); "
            "DQ->Conv: convs whose input comes straight from a DequantizeLinear and whose "
            "kernel from one; fill slices: constant-mode Pads (a shifted grid's border), none "
            "between a DQ and its conv when DQ->Conv = quantized. Total build time "
            f"{sum(e['build_s'] for e in payload):.0f} s.\n\n")
    results = REPO / "benchmarks" / "results"
    atomic_write_bytes(results / "tensorrt_rtx_build.md", (note + text + "\n").encode())
    atomic_write_json(results / "tensorrt_rtx_build.json", payload)
    print(f"graphs={len(payload)} int8_convs_all_fused={fused} "
          f"build_s_total={sum(e['build_s'] for e in payload):.1f}")


if __name__ == "__main__":
    main()
