"""``adasr build``: calibration record -> engine plan -> lowered engines -> a verified bundle.

With no options it builds the default model for the machine's own target, calibrating on the
shipped images first. ``--dry-run`` prints the plan (engines, per-layer precision, FAB, files)
and builds nothing. ``--finish BUNDLE`` runs on the device and builds a TensorRT bundle's
pending plans in place.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compiler.commands.calibrate import (
    add_quant_arguments,
    calibrate_from_args,
    calibration_inputs,
    downscale_of,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", type=Path, help="checkpoint (.pt/.pth); default: the shipped "
                   "default model")
    p.add_argument("--scale", type=int, choices=(2, 3, 4),
                   help="needed only for multi-scale checkpoints")
    p.add_argument("--target", help="device target name or .toml file (default: this machine's; "
                   "see `adasr targets`)")
    p.add_argument("--backend", help="one of the target's backends (default: the target's "
                   "first; `adasr targets NAME` lists them)")
    p.add_argument("--calibration", type=Path, help="calibration record from `adasr calibrate` "
                   "(default: calibrate now)")
    p.add_argument("--calib", type=Path, help="LR images to calibrate on (default with the "
                   "default model: the shipped calibration images); also used to measure widening")
    p.add_argument("--ladder", default="hardware", choices=("hardware", "emulate"),
                   help="hardware: cheapest real kernel per layer (default); emulate: the "
                   "simulated k-bit grids exactly inside INT8")
    p.add_argument("--float-layers", default="auto", metavar="auto|none|NAME,...",
                   help="hardware ladder: quantized layers kept at the target's top precision; "
                   "auto (default): the trunk's ends (the image conv and the conv closing the "
                   "global residual), none: every quantized layer on INT8, or layer names")
    p.add_argument("--tile", type=int, help="LR tile size (default: the target's)")
    p.add_argument("--overlap", type=int, help="tile overlap (default: the target's)")
    p.add_argument("--engine-batch", type=int, default=8,
                   help="TensorRT static batch of the tile engines (default 8)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU engine threads recorded in the bundle (default: the target's)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, build nothing")
    p.add_argument("--finish", type=Path, metavar="BUNDLE",
                   help="on the device: build the pending TensorRT plans of BUNDLE")
    p.add_argument("-o", "--output", type=Path,
                   help="bundle folder (default build/<model>-<target>); replaced only when it "
                   "is a bundle adasr wrote (or empty)")
    # engines run the learned bounds widened to 8 bits, where the clipped (BaC) bounds measure
    # better than unclipped ones (EDSR x2 W8A6 FQ on bigbuckbunny: dispatch PSNR gap to FP32
    # 0.17 dB with BaC, 0.23 dB without), so the build clips at every base width
    add_quant_arguments(p, fq_default=True, bac_default="on")


def _step(index: int, total: int, text: str) -> None:
    print(f"[{index}/{total}] {text}", flush=True)


def run(args: argparse.Namespace) -> int:
    if args.finish is not None:
        return _finish(args.finish)
    from compiler.bundle import check_destination
    from compiler.defaults import CALIBRATION_IMAGES, default_weights
    from compiler.plan import describe_plan, plan_engines
    from compiler.zoo import load_model
    from runtime.errors import ConfigError
    from targets.loader import detect_target, load_target

    started = time.perf_counter()
    _check_numbers(args)
    target = load_target(args.target) if args.target else detect_target()
    if args.backend:
        target = target.with_backend(args.backend)
    weights = args.weights or default_weights(args.scale or 2)
    if args.calib is None and args.weights is None:
        args.calib = CALIBRATION_IMAGES
    if args.calib is None and args.calibration is None:
        raise ConfigError("give --calib DIR (LR images to calibrate on) or --calibration RECORD")
    total = 3 if args.dry_run else 4
    loaded = load_model(weights, scale=args.scale)
    destination = args.output or Path("build") / f"{loaded.info.path.stem}-{target.name}"
    if not args.dry_run:  # before calibrating: a destination that cannot be written
        check_destination(destination, [weights, *([args.calibration] if args.calibration else
                                                   []), *calibration_inputs(args)])
    _step(1, total, f"model {loaded.info.describe()} ({weights.name}); target {target.name}"
          + ("" if args.target else " (detected)"))
    record = _record(args, loaded)
    _step(2, total, "engine plan")
    plan = plan_engines(record, target, args.ladder, tile=args.tile, overlap=args.overlap,
                        floats=args.float_layers)
    from compiler.backends import builder

    files = {e.name: list(builder(target.backend).files(e.name)) for e in plan.engines}
    print(describe_plan(plan, files))
    if args.dry_run:
        _step(3, total, f"dry run: would write {destination}/ (manifest.json, calibration.json, "
              f"{sum(len(f) for f in files.values())} engine files); nothing built")
        return 0
    _step(3, total, f"lowering and building {len(plan.engines)} engines -> {destination}")
    manifest = _write(args, loaded, record, plan, destination)
    _step(4, total, f"bundle written in {time.perf_counter() - started:.0f} s: {destination}")
    _next_steps(destination, manifest)
    return 0


def _check_numbers(args: argparse.Namespace) -> None:
    from runtime.commands.run import MAX_BATCH, check_threads
    from runtime.errors import check_range
    from runtime.manifest import TILES, max_overlap

    check_threads(args.threads)
    check_range("--engine-batch", args.engine_batch, 1, MAX_BATCH)
    if args.tile is not None:
        check_range("--tile", args.tile, *TILES)
    if args.overlap is not None:
        check_range("--overlap", args.overlap, 0, max_overlap(args.tile or TILES[1]))


def _record(args: argparse.Namespace, loaded: Any) -> dict[str, Any]:
    from compiler.quant.record import read_record
    from runtime.errors import CalibrationError

    if args.calibration is not None:
        record = read_record(args.calibration)
        digest = record.checkpoint.sha256
        if digest != loaded.info.sha256:
            raise CalibrationError(f"record {args.calibration} was calibrated for checkpoint "
                                   f"{digest[:12]}, not {loaded.info.path.name} "
                                   f"({loaded.info.sha256[:12]}): calibrate this checkpoint")
        print(f"      record {args.calibration}")
        return dict(record.data)
    from compiler.zoo import load_model

    # calibration quantizes the network it is given in place: give it its own copy
    result = calibrate_from_args(args, load_model(loaded.info.path, scale=loaded.info.scale))
    calibrated: dict[str, Any] = result.record
    return calibrated


def _write(args: argparse.Namespace, loaded: Any, record: dict[str, Any], plan: Any,
           destination: Path) -> Any:
    from compiler.bundle import BuildOptions, write_bundle
    from compiler.defaults import CALIBRATION_IMAGES
    from compiler.quant.patches import sample_patches

    folder = args.calib or CALIBRATION_IMAGES
    patches = sample_patches(folder, 8, args.patch_size, seed=args.seed,
                             downscale=downscale_of(args, loaded)).numpy()
    options = BuildOptions(batch=args.engine_batch, threads=args.threads)
    from compiler.quant.patches import list_images
    from runtime.imaging import load_rgb

    images = [load_rgb(path) for path in list_images(folder)]  # the rung ladder's measurements
    return write_bundle(loaded, record, plan, destination, patches=patches, options=options,
                        progress=_say(args.quiet), ladder_images=images)


def _say(quiet: bool) -> Callable[[str], None]:
    """The build's progress lines (indented under its steps); nothing with ``quiet``."""
    return (lambda _: None) if quiet else (lambda text: print(f"      {text}", flush=True))


def _next_steps(destination: Path, manifest: Any) -> None:
    for spec in manifest.engines:
        if spec.note:
            print(f"      {spec.name}: {spec.note}")
    if manifest.build.finish_command:
        print(f"\nportable half written (ONNX graphs, plan, manifest): TensorRT is not here. "
              f"Copy the folder {destination.name} to the {manifest.target} and run, in the "
              f"folder that holds it:\n  {manifest.build.finish_command}")
        return
    print("\nnext:\n"
          f"  adasr inspect {destination}\n"
          f"  adasr eval --bundle {destination} --dataset DIR --scale {manifest.model.scale}\n"
          f"  adasr run INPUT -o OUTPUT --bundle {destination}\n"
          f"  adasr profile {destination}")


def _finish(bundle: Path) -> int:
    from compiler.engines.finish import finish_bundle
    from runtime.backends import runtime_backend
    from runtime.manifest import read_manifest
    from targets.loader import load_target

    manifest = read_manifest(bundle)
    target = load_target(manifest.target).with_backend(manifest.backend)
    finished = finish_bundle(bundle, target, progress=_say(False))
    label = runtime_backend(finished.backend).label
    print(f"built {len(finished.engines)} {label} plans into {bundle} "
          f"({label} {finished.build.backend_version}, {finished.build.device})")
    return 0
