#!/usr/bin/env python3
"""Train adasr's embedded default models (small EDSR-layout x2 and x4) on scikit-image's samples.

Recipe: EDSR-PyTorch layout with 4 residual blocks of 32 features (so the zoo, calibration and
lowering treat it like any EDSR checkpoint); L1 loss; Adam (1e-3, cosine to 1e-5); HR patches
cut from scikit-image's bundled sample images, LR made with adasr's MATLAB-compatible bicubic;
random flips and 90-degree rotations. ``chelsea`` is held out (it ships as the sample input).

Data license: the images used are CC0 or public domain per scikit-image's ``skimage.data``
docstrings (astronaut, rocket and hubble_deep_field: NASA/SpaceX public domain; coffee, chelsea,
camera, brick, grass, gravel, retina, ...: CC0). Needs ``pip install scikit-image`` (in the
``[test]`` extra). Usage: ``python tools/train_default_model.py --scale 2 --minutes 12``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from compiler.zoo.edsr import EDSR  # noqa: E402
from runtime.resize import imresize_bicubic  # noqa: E402

TRAIN_IMAGES = ("astronaut", "coffee", "hubble_deep_field", "immunohistochemistry",
                "stereo_motorcycle", "retina", "rocket", "camera", "brick", "grass", "gravel",
                "coins", "moon", "page", "text", "clock", "cell", "colorwheel")
HELD_OUT = "chelsea"
N_RESBLOCKS, N_FEATS = 4, 32


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    image = image[..., :3]
    if image.dtype != np.uint8:
        image = np.clip(np.round(image * 255 if image.max() <= 1 else image), 0, 255)
    return image.astype(np.uint8)


def load_pairs(scale: int, patch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(HR, LR) uint8 pairs: each image at full, 3/4 and 1/2 size (more texture scales)."""
    from skimage import data

    pairs = []
    for name in TRAIN_IMAGES:
        image = getattr(data, name)()
        base = _rgb(image[0] if isinstance(image, tuple) else image)  # stereo pair: left view
        for factor in (1.0, 0.75, 0.5):
            hr = base if factor == 1.0 else imresize_bicubic(base, factor)
            h, w = (hr.shape[0] // scale) * scale, (hr.shape[1] // scale) * scale
            if min(h, w) < scale * patch:  # too small for one LR patch
                continue
            hr = np.ascontiguousarray(hr[:h, :w])
            pairs.append((hr, imresize_bicubic(hr, 1 / scale)))
    return pairs


def batches(pairs: list[tuple[np.ndarray, np.ndarray]], scale: int, size: int, batch: int,
            rng: np.random.Generator):
    while True:
        lrs, hrs = [], []
        for _ in range(batch):
            hr, lr = pairs[int(rng.integers(len(pairs)))]
            y = int(rng.integers(0, lr.shape[0] - size + 1))
            x = int(rng.integers(0, lr.shape[1] - size + 1))
            lp = lr[y:y + size, x:x + size]
            hp = hr[y * scale:(y + size) * scale, x * scale:(x + size) * scale]
            k = int(rng.integers(4))
            flip = bool(rng.integers(2))
            lp, hp = np.rot90(lp, k), np.rot90(hp, k)
            if flip:
                lp, hp = lp[:, ::-1], hp[:, ::-1]
            lrs.append(lp)
            hrs.append(hp)
        to_t = lambda a: torch.from_numpy(np.stack(a).astype(np.float32) / 255).permute(0, 3, 1, 2)  # noqa: E731
        yield to_t(lrs), to_t(hrs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=2, choices=(2, 3, 4))
    parser.add_argument("--minutes", type=float, default=12.0, help="training time budget")
    parser.add_argument("--patch", type=int, default=32, help="LR patch size")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    output = args.output or REPO / "compiler" / "assets" / f"default_x{args.scale}.pt"
    pairs = load_pairs(args.scale, args.patch)
    model = EDSR(N_RESBLOCKS, N_FEATS, args.scale, 1.0, 255.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    budget = args.minutes * 60
    start = time.perf_counter()
    step, running = 0, 0.0
    for lr_batch, hr_batch in batches(pairs, args.scale, args.patch, args.batch, rng):
        elapsed = time.perf_counter() - start
        if elapsed > budget:
            break
        for group in optimizer.param_groups:  # cosine over the time budget
            group["lr"] = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * elapsed / budget))
        loss = F.l1_loss(model(lr_batch), hr_batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        step += 1
        if step % 200 == 0:
            print(f"step {step} {elapsed / 60:.1f} min loss {running:.4f}", flush=True)
    model.eval()
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), output)
    print(f"{step} steps in {(time.perf_counter() - start) / 60:.1f} min -> {output} "
          f"({output.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
