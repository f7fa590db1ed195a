#!/usr/bin/env python3
"""Wall time of AdaBM calibration: EDSR x2 (8 blocks), 100 patches x 48x48, 500 steps, W8A6.

Runs the library's calibration exactly as ``adasr calibrate`` does (teacher pass, init, BaC,
500 Adam steps, per-epoch validation) on ../shared/data/calibration and ends with the line
``calibration_seconds=<float>``. ``--device cuda`` runs it on a GPU where one is present.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import shared

from compiler.quant.calibrate import CalibrationConfig, calibrate
from compiler.quant.qmodel import QuantSettings
from compiler.zoo import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(shared("weights/edsr_r8f64_x2_krasserm.pt"))
    config = CalibrationConfig(patches=100, patch_size=48, steps=args.steps)
    start = time.perf_counter()
    result = calibrate(loaded, QuantSettings(method="adabm", wbits=8, abits=6), config,
                       shared("calibration/sun_hays8"))
    seconds = time.perf_counter() - start
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"FAB on calibration patches {result.record['calibration']['calibration_fab']:.2f}")
    print(f"calibration_seconds={seconds:.1f}")


if __name__ == "__main__":
    main()
