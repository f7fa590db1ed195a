"""Video quality of every rung and the bundle's default adaptive policy on a real clip.

:func:`load_clip` decodes the first ``frames`` frames of a video (cropped to a multiple of the
bundle's scale): they are the HR reference; their MATLAB-bicubic x1/scale
(:func:`runtime.resize.imresize_bicubic`, as ``benchmarks/dispatch.py``) is the LR input.

:func:`measure_video` runs every rung or engine the bundle can dispatch to (``fixed:NAME``, in
:func:`runtime.policies.rung_order`) and the bundle's default policy
(:func:`runtime.policies.bundle_policy` with no policy: ``quality`` with a rung ladder, else
``threshold``; temporal hysteresis :data:`runtime.commands.run.VIDEO_HYSTERESIS`, as ``adasr run``
on a video) through the dispatcher. Each dispatcher upscales the first frame once untimed, then
per frame every policy runs one after the other (interleaved: machine noise hits them alike).
Per policy: mean Y-PSNR against the original frames (``scale`` border pixels cropped, as the
benchmark images), VMAF NEG of the whole sequence (:func:`runtime.vmaf.vmaf_neg`), frames/s and
ms per frame of the timed ``Dispatcher.upscale`` calls, and the tiles per rung.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from profiles.schema import VideoPolicy, VideoQuality
from runtime.bundle import Bundle
from runtime.errors import ConfigError, MediaError
from runtime.imaging import mod_crop
from runtime.metrics import psnr_y
from runtime.resize import imresize_bicubic
from runtime.vmaf import MODEL, vmaf_neg

__all__ = ["ADAPTIVE", "MAX_FRAMES", "Clip", "check_frames", "load_clip", "measure_video"]

MAX_FRAMES = 100  # every output frame of every policy is kept for VMAF: bounded memory
ADAPTIVE = "adaptive"  # the name of the default policy's row

_Frame = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class Clip:
    """The decoded frames of a video: ``hr`` (the reference) and ``lr`` (the input)."""

    path: Path
    hr: tuple[_Frame, ...]
    lr: tuple[_Frame, ...]
    requested: int  # frames asked for (the clip may hold fewer)


def check_frames(frames: object, option: str = "video frames") -> None:
    """ConfigError unless ``frames`` is an integer in 1..MAX_FRAMES."""
    if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= MAX_FRAMES:
        raise ConfigError(f"{option} must be an integer in 1..{MAX_FRAMES}, got {frames!r}")


def load_clip(path: Path, frames: int, scale: int) -> Clip:
    """The first ``frames`` frames of the video ``path`` and their x1/``scale`` LR frames
    (MediaError: not a video, frames of changing size or smaller than ``scale``; ConfigError:
    ``frames`` out of 1..MAX_FRAMES)."""
    from runtime.video import read_frames  # PyAV: only when a clip is read

    check_frames(frames)
    decoded = tuple(read_frames(Path(path), limit=frames))
    if not decoded:
        raise MediaError(f"{path} has no frames")
    sizes = {frame.shape[:2] for frame in decoded}
    if len(sizes) > 1:
        raise MediaError(f"{path}: the frame size changes within the first {len(decoded)} frames "
                         f"({', '.join(f'{w}x{h}' for h, w in sorted(sizes))}): VMAF needs one")
    height, width = decoded[0].shape[:2]
    if min(height, width) < scale:
        raise MediaError(f"{path}: frames of {width}x{height} are too small to downscale by "
                         f"{scale}: need at least {scale}x{scale}")
    hr = tuple(mod_crop(frame, scale) for frame in decoded)
    height, width = hr[0].shape[:2]
    lr = tuple(imresize_bicubic(frame, 1 / scale, (height // scale, width // scale))
               for frame in hr)
    return Clip(Path(path), hr, lr, frames)


def measure_video(bundle: Bundle, clip: Clip, *, batch: int, threads: int,
                  progress: Callable[[str], None] | None = None) -> VideoQuality:
    """Every ``fixed:NAME`` and the bundle's default policy on ``clip`` (module docstring),
    ``batch`` tiles per engine call, engines with the bundle's threads (recorded as
    ``threads``: 0 where threads do not apply)."""
    from runtime.commands.run import VIDEO_HYSTERESIS
    from runtime.dispatch import Dispatcher, FrameResult
    from runtime.policies import bundle_policy, rung_order

    say = progress or (lambda _message: None)
    manifest = bundle.manifest
    scale = manifest.model.scale
    names = rung_order(manifest)
    adaptive, latencies = bundle_policy(None, bundle.root, manifest)
    engines = bundle.engines()  # the bundle's threads, as the quality measurement
    dispatchers = {name: Dispatcher(manifest, engines, policy=f"fixed:{name}", batch=batch)
                   for name in names}
    dispatchers[ADAPTIVE] = Dispatcher(manifest, engines, policy=adaptive, batch=batch,
                                       hysteresis=VIDEO_HYSTERESIS, latencies=latencies)
    seconds: dict[str, list[float]] = {name: [] for name in dispatchers}
    outputs: dict[str, list[_Frame]] = {name: [] for name in dispatchers}
    tiles: dict[str, Counter[str]] = {name: Counter() for name in dispatchers}
    with ExitStack() as stack:
        for engine in engines.values():
            engine.activate()
            stack.callback(engine.deactivate)
        for dispatcher in dispatchers.values():
            stack.enter_context(dispatcher)
            dispatcher.upscale(clip.lr[0])  # warm-up: first-call allocations, plan caches
            dispatcher.reset()
        for index, lr in enumerate(clip.lr):
            say(f"video {clip.path.name} frame {index + 1}/{len(clip.lr)}: "
                f"{len(dispatchers)} policies")
            for name, dispatcher in dispatchers.items():
                start = time.perf_counter()
                result: FrameResult = dispatcher.upscale(lr)
                seconds[name].append(time.perf_counter() - start)
                outputs[name].append(result.sr)
                tiles[name].update(result.engines)
    rows = []
    for name in dispatchers:
        say(f"video {clip.path.name}: VMAF NEG of {name}")
        vmaf, _ = vmaf_neg(outputs[name], clip.hr)
        psnr = [psnr_y(sr, hr, scale) for sr, hr in zip(outputs[name], clip.hr, strict=True)]
        total = sum(seconds[name])
        rows.append(VideoPolicy(
            name=name, policy=str(dispatchers[name].policy), psnr=float(np.mean(psnr)),
            vmaf_neg=vmaf, fps=len(seconds[name]) / total if total > 0 else 0.0,
            ms_per_frame=1000.0 * total / len(seconds[name]), histogram=dict(tiles[name])))
    height, width = clip.hr[0].shape[:2]
    top = manifest.rungs.names[-1] if manifest.rungs.rungs else manifest.reference.name
    return VideoQuality(
        clip=str(clip.path), frames=len(clip.hr), width=width, height=height, vmaf_model=MODEL,
        hysteresis=VIDEO_HYSTERESIS, batch=batch, threads=threads, top=top,
        policies=tuple(rows))
