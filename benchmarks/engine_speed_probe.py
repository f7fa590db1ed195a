#!/usr/bin/env python3
"""INT8 engine vs FP32 export in ONNX Runtime (CPU): EDSR x2 (8 blocks), W8A8 minmax, 256x256.

Calibrates W8A8 with the static ``minmax`` method (no training) on ../shared/data/calibration,
lowers the d_img = 0 engine (``compiler.lower``) and exports the FP32 graph at a static LR tile,
then times both sessions (2 intra-op threads by default), alternating runs so that load from
other processes hits both alike, and prints the median of each. The last line is
``int8_vs_fp32_speedup=<float>``. CPU heavy: about a minute.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
from common import shared

from compiler.lower.export import INPUT_NAME, export_onnx
from compiler.lower.qdq import engine_layers, lower_engine, lowering_summary, ort_fused_layers
from compiler.quant.calibrate import CalibrationConfig, calibrate
from compiler.quant.qmodel import QuantSettings
from compiler.zoo import load_model

WEIGHTS = "weights/edsr_r8f64_x2_krasserm.pt"
CALIBRATION = "calibration/sun_hays8"


def session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-fq", dest="fq", action="store_false",
                        help="leave head, upsampler and tail in FP32 (AdaBM's default setting)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = QuantSettings(method="minmax", wbits=8, abits=8, fq=args.fq)
    record = calibrate(load_model(shared(WEIGHTS)), settings, CalibrationConfig(steps=0),
                       shared(CALIBRATION)).record
    fp32 = export_onnx(load_model(shared(WEIGHTS)).model, args.tile)
    int8 = lower_engine(fp32, engine_layers(record, 0))
    fused = ort_fused_layers(int8)
    quantized = [layer["name"] for layer in lowering_summary(int8) if layer["act_bits"] <= 8]
    print(f"W8A8 minmax fq={args.fq}: {len(fused)} of {len(quantized)} quantized convs run as "
          f"QLinearConv (float outputs: {sorted(set(quantized) - fused)})")

    sessions = {"fp32": session(fp32, args.threads), "int8": session(int8, args.threads)}
    x = np.random.default_rng(0).random((1, 3, args.tile, args.tile), dtype=np.float32)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for s in sessions.values():
        s.run(None, {INPUT_NAME: x})  # warm-up (allocations, prepacking)
    for _ in range(args.runs):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, {INPUT_NAME: x})
            times[name].append(time.perf_counter() - start)
    median = {name: float(np.median(t)) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name}: median {median[name] * 1000:.1f} ms, min {min(t) * 1000:.1f} ms "
              f"({args.runs} runs, {args.tile}x{args.tile} LR, {args.threads} threads)")
    print(f"int8_vs_fp32_speedup={median['fp32'] / median['int8']:.3f}")


if __name__ == "__main__":
    main()
