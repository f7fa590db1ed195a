"""``adasr quickstart`` (what ``python build.py`` runs with no arguments): the default job.

Builds the bundle of the default x2 model for this machine's target (``adasr build``: AdaBM W8A6
calibration on the shipped images, engine plan, lowering, engines, the rung ladder's costs and
loss models, manifest), then runs the runtime's adaptive dispatcher with its default policy
(``quality`` at the bundle's default target; ``threshold`` for a bundle without a ladder) on the
shipped sample image, prints the tiles per rung, and writes the upscaled image plus a labelled
side-by-side picture (bicubic | reference engine | adaptive) to ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("out/quickstart"),
                   help="output folder for the images (default out/quickstart)")
    p.add_argument("--bundle", type=Path, help="bundle folder (default build/default_x2-<target>)")
    p.add_argument("--steps", type=int, default=500, help="calibration steps (default 500)")


def run(args: argparse.Namespace) -> int:
    from compiler.commands import build
    from targets.loader import detect_target

    target = detect_target()
    bundle = args.bundle or Path("build") / f"default_x2-{target.name}"
    _outputs(args.out)  # before the build: files in --out that are not quickstart's own
    parser = argparse.ArgumentParser()
    build.add_arguments(parser)
    code = build.run(parser.parse_args(["--steps", str(args.steps), "-o", str(bundle)]))
    if code:
        return code
    return _run_sample(bundle, args.out)


QUICKSTART_MARK = "adasr.quickstart/1"  # the marker of a folder quickstart wrote
SCALE = 2  # the default model's


def _outputs(out: Path) -> list[Path]:
    """The images quickstart writes into ``out``; refused (one line) when one exists and ``out``
    is not a folder quickstart wrote (its marker): a re-run replaces only its own files."""
    from compiler.defaults import SAMPLE_DATASET
    from runtime.outputs import Outputs, is_marked

    guard = Outputs([], force=is_marked(out, QUICKSTART_MARK))
    names = [f"{path.stem}_x{SCALE}_adaptive.png" for path in
             sorted((SAMPLE_DATASET / "HR").glob("*.png"))] + ["compare.png"]
    return [guard.claim(out / name, "--out", replace=False) for name in names]


def _run_sample(bundle_path: Path, out: Path) -> int:
    import numpy as np

    from compiler.defaults import SAMPLE_DATASET
    from runtime.benchmark import load_benchmark
    from runtime.bundle import open_bundle
    from runtime.dispatch import Dispatcher
    from runtime.imaging import save_rgb
    from runtime.metrics import psnr_y
    from runtime.outputs import mark_folder
    from runtime.resize import imresize_bicubic

    bundle = open_bundle(bundle_path)
    if bundle.manifest.pending:
        print("the TensorRT plans are built on the device: nothing to run here")
        return 0
    m = bundle.manifest
    scale = m.model.scale
    image = load_benchmark(SAMPLE_DATASET, scale)[0]
    print(f"\nsample image {image.name}: {image.lr.shape[1]}x{image.lr.shape[0]} LR -> x{scale}, "
          f"tiles {m.tile} px (overlap {m.overlap})")
    engines = bundle.engines()
    policy = "quality" if m.rungs.rungs else "threshold"
    with Dispatcher(m, engines, policy=policy) as adaptive:
        result = adaptive.upscale(image.lr)
    with Dispatcher(m, engines, policy=f"fixed:{m.reference.name}") as reference:
        ref = reference.upscale(image.lr)
    bicubic = imresize_bicubic(image.lr, scale)
    print(f"  {'':<26}{'PSNR (Y)':>9}{'FAB':>7}")
    print(f"  {'bicubic':<26}{psnr_y(bicubic, image.hr, scale):>9.2f}{'-':>7}")
    print(f"  {'reference engine ' + m.reference.name:<26}"
          f"{psnr_y(ref.sr, image.hr, scale):>9.2f}{m.reference.fab:>7.2f}")
    label = f"adaptive ({adaptive.policy})"
    print(f"  {label:<26}{psnr_y(result.sr, image.hr, scale):>9.2f}{result.fab(m):>7.2f}")
    counts = result.histogram
    print(f"  tiles per rung ({len(result.engines)} tiles): "
          + ", ".join(f"{name} {counts.get(name, 0)}" for name in adaptive.names)
          + ("" if result.predicted_db is None
             else f"; predicted loss vs {m.reference.name} {result.predicted_db:.3f} dB"))
    adaptive_path, compare_path = _outputs(out)
    mark_folder(out, QUICKSTART_MARK)
    save_rgb(adaptive_path, result.sr)
    h, w = result.sr.shape[:2]
    y, x, size = h // 4, w // 4, min(h, w) // 2
    labels = ("bicubic", f"{m.reference.name} engine", label)
    crops = [_labelled(c[y:y + size, x:x + size], text)
             for c, text in zip((bicubic, ref.sr, result.sr), labels, strict=True)]
    save_rgb(compare_path, np.concatenate(crops, axis=1))
    print(f"\nwrote {adaptive_path} and {compare_path} ({' | '.join(labels)}, labelled)")
    print(f"next: adasr run VIDEO.mp4 -o OUT.mp4 --bundle {bundle_path} --save-map MAP.mp4")
    return 0


def _labelled(crop: Any, text: str) -> Any:
    """``crop`` (H x W x 3 uint8) with ``text`` on a dark band at its top."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    picture = Image.fromarray(np.ascontiguousarray(crop))
    draw = ImageDraw.Draw(picture)
    size = max(10, picture.width // 16)
    font = ImageFont.load_default(size=size)
    draw.rectangle((0, 0, picture.width, size + 6), fill=(0, 0, 0))
    draw.text((4, 3), text, fill=(255, 255, 255), font=font)
    return np.asarray(picture)
