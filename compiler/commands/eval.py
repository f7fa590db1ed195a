"""``adasr eval``: PSNR/SSIM on a benchmark set of a checkpoint (full precision or simulated
quantized) or of a bundle's engines (``--bundle``: the real engine outputs, through the runtime's
dispatcher, tiled as the bundle says)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.commands.run import add_force_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", type=Path, help="checkpoint (.pt/.pth)")
    p.add_argument("--bundle", type=Path, help="evaluate a bundle's engines instead of a "
                   "checkpoint (adaptive dispatch unless --engine)")
    p.add_argument("--engine", help="with --bundle: run every tile on this engine")
    p.add_argument("--mode", default="patch", choices=("patch", "image"),
                   help="with --bundle: engine choice per tile (default) or per image")
    p.add_argument("--dataset", type=Path, required=True,
                   help="folder with HR/ and optionally LR_bicubic/X{scale}/")
    p.add_argument("--scale", type=int, required=True, choices=(2, 3, 4))
    p.add_argument("--calibration", type=Path, help="calibration record: evaluate the simulated "
                   "quantized network (adds fab, bitops and d_img histograms)")
    p.add_argument("--routed", action="store_true",
                   help="with --calibration: the network as its bundle routes it, each patch on "
                   "its image class's bit vector (CADyQ: the clustered configurations instead of "
                   "the selectors; AdaBM, Granular-DQ: the same network)")
    p.add_argument("--tile", type=int, help="evaluate patch-wise with LR tiles of this size "
                   "(the papers use 96)")
    p.add_argument("--overlap", type=int, default=6, help="tile overlap in LR pixels (default 6)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--quiet", action="store_true", help="no per-image table")
    add_force_argument(p)


def _claim_json(args: argparse.Namespace) -> None:
    """``--json`` against the inputs (checkpoint, record, dataset, bundle files), before work."""
    from runtime.outputs import Outputs

    if args.json is None:
        return
    folders = [folder for folder in (args.dataset, args.bundle) if folder is not None]
    files = [path for path in (args.weights, args.calibration) if path is not None]
    files += [path for folder in folders if folder.is_dir() for path in folder.rglob("*")
              if path.is_file()]
    Outputs(files, args.force).claim(args.json, "--json")


def run(args: argparse.Namespace) -> int:
    from torch import nn

    from compiler.simulate import TorchUpscaler
    from compiler.zoo import load_model
    from runtime.benchmark import evaluate as score
    from runtime.benchmark import load_benchmark
    from runtime.fileio import atomic_write_json

    _claim_json(args)
    if args.bundle is not None:
        return _run_bundle(args)
    if args.weights is None:
        from runtime.errors import ConfigError

        raise ConfigError("give --weights CHECKPOINT or --bundle DIR")
    loaded = load_model(args.weights, scale=args.scale)
    net: nn.Module = loaded.model
    if args.calibration is not None:
        from compiler.quant.record import apply_record, read_record

        net = apply_record(loaded, read_record(args.calibration), routed=args.routed)
    elif args.routed:
        from runtime.errors import ConfigError

        raise ConfigError("--routed needs --calibration RECORD")
    images = load_benchmark(args.dataset, args.scale)
    upscaler = TorchUpscaler(net, args.scale, tile=args.tile, overlap=args.overlap)
    result = score(upscaler, images, args.scale, progress=_progress(args.quiet))
    payload: dict[str, Any] = result.to_json()
    payload["model"] = loaded.info.describe()
    payload["dataset"] = str(args.dataset)
    payload["lr_source"] = sorted({image.lr_source for image in images})
    if args.calibration is not None:
        payload["routed"] = bool(args.routed)
    if upscaler.bits:
        for entry, bits in zip(payload["images"], upscaler.bits, strict=True):
            entry.update(fab=bits.fab, d_img=bits.d_img, bitops=bits.bitops)
        payload["fab"] = sum(b.fab for b in upscaler.bits) / len(upscaler.bits)
        payload["bitops"] = sum(b.bitops for b in upscaler.bits) / len(upscaler.bits)
        payload["bitops_unit"] = "GBitOPs per image (MACs x w_bits/32 x a_bits/32)"
    _print_table(payload, quiet=args.quiet)
    if args.json is not None:
        atomic_write_json(args.json, payload)
    return 0


def _run_bundle(args: argparse.Namespace) -> int:
    from runtime.benchmark import evaluate as score
    from runtime.benchmark import load_benchmark
    from runtime.bundle import open_bundle
    from runtime.dispatch import Dispatcher
    from runtime.errors import ConfigError
    from runtime.fileio import atomic_write_json

    bundle = open_bundle(args.bundle)
    m = bundle.manifest
    if args.scale != m.model.scale:
        raise ConfigError(f"--scale {args.scale} but bundle {args.bundle} upscales "
                          f"x{m.model.scale}")
    policy = f"fixed:{m.engine(args.engine).name}" if args.engine else "threshold"
    tile, overlap = (args.tile or m.tile), (args.overlap if args.tile else m.overlap)
    if tile != m.tile or overlap != m.overlap:
        from dataclasses import replace

        m = replace(m, tile=tile, overlap=overlap)
    images = load_benchmark(args.dataset, args.scale)
    frames: list[Any] = []
    with Dispatcher(m, bundle.engines(), mode=args.mode, policy=policy) as dispatcher:
        def upscale(lr: Any) -> Any:
            result = dispatcher.upscale(lr)
            frames.append(result)
            return result.sr.astype("float32") / 255

        result = score(upscale, images, args.scale, progress=_progress(args.quiet))
    payload: dict[str, Any] = result.to_json()
    payload.update(model=f"{m.model.name} ({m.model.arch} x{m.model.scale}) bundle "
                   f"{args.bundle}, {policy}, {args.mode} mode, tile {tile}/{overlap}",
                   dataset=str(args.dataset), bundle=str(args.bundle), policy=policy,
                   lr_source=sorted({image.lr_source for image in images}))
    for entry, frame in zip(payload["images"], frames, strict=True):
        entry.update(fab=frame.fab(m), engines=frame.histogram,
                     d_img={str(d): frame.offsets.count(d) for d in (-1, 0, 1)})
    payload["fab"] = sum(e["fab"] for e in payload["images"]) / len(frames)
    payload["engines"] = {name: sum(e["engines"].get(name, 0) for e in payload["images"])
                          for name in m.names}
    _print_table(payload, quiet=args.quiet)
    print("tiles per engine: " + ", ".join(f"{k} {v}" for k, v in payload["engines"].items()))
    if args.json is not None:
        atomic_write_json(args.json, payload)
    return 0


def _progress(quiet: bool) -> Callable[[int, int, str], None] | None:
    if quiet or not sys.stderr.isatty():
        return None

    def report(done: int, total: int, name: str) -> None:
        print(f"\r[{done}/{total}] {name:<20}", end="" if done < total else "\n", file=sys.stderr)

    return report


def _print_table(payload: dict[str, Any], quiet: bool) -> None:
    quantized = "fab" in payload
    header = f"{'image':<16}{'PSNR':>9}{'SSIM':>9}" + (f"{'FAB':>7}  d_img(-1/0/+1)" if quantized
                                                        else "")
    print(f"{payload['model']} on {payload['dataset']}")
    if not quiet:
        print(header)
        for entry in payload["images"]:
            line = f"{entry['name']:<16}{entry['psnr']:>9.3f}{entry['ssim']:>9.4f}"
            if quantized:
                d = entry["d_img"]
                line += f"{entry['fab']:>7.2f}  {d['-1']}/{d['0']}/{d['1']}"
            print(line)
    mean = f"{'mean':<16}{payload['psnr']:>9.3f}{payload['ssim']:>9.4f}"
    if quantized:
        mean += f"{payload['fab']:>7.2f}"
        if "bitops" in payload:
            mean += f"  BitOPs {payload['bitops']:.2f} G"
    print(mean)
