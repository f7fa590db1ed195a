"""``adasr quickstart``: the embedded default job, end to end on the CPU.

Calibrates the default x2 model (AdaBM W8A6) on the shipped calibration crops, evaluates the full
precision and the adaptive quantized network on the shipped sample image, and writes the
upscaled sample plus a side-by-side picture (bicubic | full precision | adaptive) to ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from compiler.commands.progress import progress_bar


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("out/quickstart"),
                   help="output folder (default out/quickstart)")
    p.add_argument("--steps", type=int, default=500, help="calibration steps (default 500)")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from compiler.defaults import CALIBRATION_IMAGES, DEFAULT_SCALE, SAMPLE_DATASET, default_weights
    from compiler.quant.calibrate import CalibrationConfig, calibrate
    from compiler.quant.qmodel import QuantSettings
    from compiler.quant.record import save_record
    from compiler.simulate import TorchUpscaler
    from compiler.zoo import load_model
    from runtime.benchmark import evaluate, load_benchmark
    from runtime.imaging import save_rgb, to_uint8
    from runtime.resize import imresize_bicubic

    scale, weights = DEFAULT_SCALE, default_weights()
    fp = load_model(weights)
    print(f"[1/3] default model: {fp.info.describe()} ({weights.name})")
    settings = QuantSettings(method="adabm", wbits=8, abits=6)
    config = CalibrationConfig(steps=args.steps)
    print(f"[2/3] AdaBM W8A6 calibration on {len(list(CALIBRATION_IMAGES.glob('*.png')))} "
          f"shipped images ({config.patches} patches of {config.patch_size}px, {config.steps} "
          "steps)")
    result = calibrate(load_model(weights), settings, config, CALIBRATION_IMAGES,
                       progress=progress_bar)
    record_path = args.out / "default_x2_w8a6.json"
    save_record(record_path, result.record)
    print(f"      done in {result.record['calibration']['seconds']:.1f} s -> {record_path}")

    print(f"[3/3] sample image, x{scale} (LR made by MATLAB-compatible bicubic)")
    images = load_benchmark(SAMPLE_DATASET, scale)
    fp_up = TorchUpscaler(fp.model, scale)
    q_up = TorchUpscaler(result.qnet, scale)
    fp_score = evaluate(fp_up, images, scale)
    q_score = evaluate(q_up, images, scale)
    bicubic = evaluate(lambda lr: imresize_bicubic(lr, scale).astype(np.float32) / 255,
                       images, scale)
    print(f"      {'':<22}{'PSNR':>8}{'SSIM':>8}{'FAB':>6}")
    for label, score, fab in (("bicubic", bicubic, "-"), ("full precision", fp_score, "32"),
                              ("AdaBM W8A6 adaptive", q_score, f"{q_up.bits[0].fab:.2f}")):
        print(f"      {label:<22}{score.psnr:>8.2f}{score.ssim:>8.4f}{fab:>6}")

    image = images[0]
    sr = to_uint8(q_up(image.lr))
    save_rgb(args.out / f"{image.name}_x{scale}_adabm.png", sr)
    crops = [imresize_bicubic(image.lr, scale), to_uint8(fp_up(image.lr)), sr]
    h, w = sr.shape[:2]
    y, x, size = h // 4, w // 4, min(h, w) // 2
    picture = np.concatenate([c[y:y + size, x:x + size] for c in crops], axis=1)
    save_rgb(args.out / "compare.png", picture)
    print(f"\nwrote {args.out}/{image.name}_x{scale}_adabm.png and {args.out}/compare.png "
          "(bicubic | full precision | adaptive)")
    print("next: adasr calibrate --help, adasr eval --help (your own checkpoints and data)")
    return 0
