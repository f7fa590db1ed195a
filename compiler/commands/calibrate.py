"""``adasr calibrate``: AdaBM / Granular-DQ / CADyQ / DDTB / static PTQ calibration from unlabeled
LR images."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from runtime.commands.run import add_force_argument
from runtime.progress import quiet_progress


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", type=Path, required=True, help="checkpoint (.pt/.pth)")
    p.add_argument("--calib", type=Path, required=True,
                   help="folder of LR images (only these are read; no HR needed)")
    p.add_argument("--scale", type=int, choices=(2, 3, 4),
                   help="needed only for multi-scale checkpoints")
    add_quant_arguments(p)
    p.add_argument("-o", "--output", type=Path, required=True, help="calibration record (.json)")
    add_force_argument(p)


def add_quant_arguments(p: argparse.ArgumentParser, *, fq_default: bool = False,
                        bac_default: str = "auto") -> None:
    """The quantization and calibration options (shared with ``adasr build``)."""
    p.add_argument("--wbits", type=int, default=8, help="weight bits (default 8)")
    p.add_argument("--abits", type=int, default=6, help="base activation bits (default 6)")
    p.add_argument("--fq", action=argparse.BooleanOptionalAction, default=fq_default,
                   help="fully quantized: head, upsampler and tail at fixed 8 bits "
                   f"(default {'on' if fq_default else 'off'}; --no-fq: body only)")
    p.add_argument("--method", default="adabm",
                   help="adabm (default), granular (Granular-DQ: one bit-width per patch "
                   "for every layer, base - 2 / base / base + 2), cadyq (CADyQ: a trained "
                   "selector per layer picks base - 2 / base / base + 2 per patch from the image "
                   "gradients and the layer's input std), ddtb, minmax, percentile")
    p.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=None,
                   help="weight clips per output channel (default: at <= 4 weight bits; "
                   "--no-per-channel: one per tensor, as in the paper)")
    p.add_argument("--symmetric", action="store_true",
                   help="symmetric activation grids [-a, a] (default: learned asymmetric [l, u])")
    p.add_argument("--patches", type=int, default=100)
    p.add_argument("--patch-size", type=int, default=48)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--schedule", default="cyclic",
                   help="cyclic (one parameter group per epoch, as released) or joint")
    p.add_argument("--range-init", default="global", choices=("global", "ema", "percentile"),
                   help="activation range init: global min/max (default), ema (the paper's) or "
                   "percentile (0.1%% / 99.9%%: IMDN x4 W4A4 -2.09 dB on Set5 against -4.05 with "
                   "global, EDSR x2 W4A4 -0.57 against -0.34)")
    p.add_argument("--downscale", type=int, default=None,
                   help="bicubic-downscale the calibration images by N first, degrading photos "
                   "as the network's LR inputs were (default: the model's scale; 1 for the "
                   "shipped images and for LR frames of the content you will upscale)")
    p.add_argument("--bac", default=bac_default, choices=("auto", "on", "off"),
                   help="bit-aware clipping of the activation bounds: auto (at a base of <= 4 "
                   "bits, where the simulated network measures better), on (the paper), off; "
                   f"default {bac_default}")
    p.add_argument("--layer-offsets", default="auto", choices=("auto", "on", "off"),
                   help="adabm: train a bit offset per layer (on), or run every layer at base + "
                   "image offset (off: the bit margin then re-places the image thresholds, as "
                   "for granular); default auto: on above a base of 4 bits, where lowering "
                   "layers to 3 bits costs more than it saves and varies with the machine")
    p.add_argument("--bit-margin", type=float, default=None,
                   help="adabm: after training, lower layers one bit at a time (the cheapest "
                   "first) until the mean layer offset is <= -MARGIN, room for content busier "
                   "than the calibration patches (with --layer-offsets off: as granular); "
                   "cadyq: shift every selector's logits from its high candidate to its low one "
                   "and pull them onto its base one, the pair of least calibration L1 with "
                   "calibration FAB just <= abits - MARGIN; granular: re-place both complexity "
                   "thresholds (the pair of least calibration L1 with calibration FAB <= "
                   "abits - MARGIN; a class no calibration patch reaches is off); 0 given "
                   "keeps the learned mapping (default 0.15; cadyq: 0, budgeted to the base)")
    p.add_argument("--refine-steps", type=int, default=0,
                   help="adabm: after the bit budget, train the activation bounds and weight "
                   "clips this many more steps at the final bits (default 0)")
    p.add_argument("--clusters", type=int, default=3, choices=(1, 2, 3),
                   help="cadyq: cluster the selectors' per-patch, per-layer bits on calibration "
                   "patches into this many configurations, one engine each, routed by the "
                   "complexity statistic (default 3: the runtime's three image classes)")
    p.add_argument("--validation", type=int, default=10,
                   help="calibration patches whose loss picks the best state and the budget's "
                   "layers (default 10)")
    p.add_argument("--holdout", type=int, default=0,
                   help="extra calibration patches, never trained on, whose loss picks the best "
                   "state and the budget's layers instead of the first --validation ones "
                   "(default 0: the first --validation)")
    p.add_argument("--average", type=float, default=None,
                   help="each epoch ends with the weight clips and activation bounds at their "
                   "mean over this fraction of its last steps, not at the last step's values "
                   "(default: 0.5 for adabm / granular / cadyq at a base of <= 4 bits, where it "
                   "holds the result across seeds and machines; else 0, off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")


def downscale_of(args: argparse.Namespace, loaded: Any) -> int:
    """``--downscale`` as given, else 1 for the shipped (LR) images (also when ``--calib`` is
    unset) and the model's scale for any other folder: photos, which the network never saw
    undegraded (EDSR x2 W4A4, Set5: -0.418 dB calibrated on ../shared/data/calibration as they
    are, -0.336 dB downscaled x2)."""
    from compiler.defaults import CALIBRATION_IMAGES

    if args.downscale is not None:
        return int(args.downscale)
    shipped = args.calib is None or Path(args.calib).resolve() == CALIBRATION_IMAGES.resolve()
    return 1 if shipped else int(loaded.model.scale)


def calibrate_from_args(args: argparse.Namespace, loaded: Any) -> Any:
    """Run the calibration the quant options of ``args`` describe on ``loaded`` (with a bar)."""
    from compiler.quant.calibrate import CalibrationConfig, calibrate
    from compiler.quant.qmodel import QuantSettings

    downscale = downscale_of(args, loaded)

    settings = QuantSettings(method=args.method, wbits=args.wbits, abits=args.abits, fq=args.fq,
                             per_channel=args.per_channel, symmetric=args.symmetric)
    config = CalibrationConfig(patches=args.patches, patch_size=args.patch_size, steps=args.steps,
                               batch=args.batch, seed=args.seed, schedule=args.schedule,
                               range_init=args.range_init, downscale=downscale,
                               bac=args.bac, layer_offsets=args.layer_offsets,
                               bit_margin=args.bit_margin,
                               refine_steps=args.refine_steps, validation=args.validation,
                               clusters=args.clusters, holdout=args.holdout,
                               average=args.average)
    print(f"calibrating {loaded.info.describe()} with {settings.method} "
          f"W{settings.wbits}A{settings.abits}{' FQ' if settings.fq else ''} on {args.calib}"
          + (f" (downscaled x{downscale})" if downscale > 1 else ""))
    return calibrate(loaded, settings, config, args.calib, progress=quiet_progress(args.quiet))


def calibration_inputs(args: argparse.Namespace) -> list[Path]:
    """The files calibration reads: the checkpoint and every image of ``--calib``."""
    from compiler.defaults import CALIBRATION_IMAGES
    from compiler.quant.patches import list_images

    return [*([args.weights] if args.weights else []),
            *list_images(args.calib or CALIBRATION_IMAGES)]


def run(args: argparse.Namespace) -> int:
    from compiler.quant.record import save_record
    from compiler.zoo import load_model
    from runtime.outputs import Outputs

    # before the long work: the record must not be an input and its folder must be writable
    Outputs(calibration_inputs(args), args.force).claim(args.output, "-o")
    loaded = load_model(args.weights, scale=args.scale)
    result = calibrate_from_args(args, loaded)
    save_record(args.output, result.record)
    info = result.record["calibration"]
    print(f"done in {info['seconds']:.1f} s; FAB on calibration patches "
          f"{info['calibration_fab']:.2f}; record: {args.output}")
    clusters = result.record.get("clusters")
    if clusters:
        print(f"  {clusters['count']} clustered configurations (engines) of the selectors' bits "
              f"on {clusters['patches']} calibration patches; router agreement "
              f"{100 * clusters['agreement']:.1f}%")
    for offset, bits in result.record["bit_vectors"].items():
        print(f"  d_img={int(offset):+d}: {' '.join(f'{b:g}' for b in bits)}")
    return 0
