"""``adasr run``: upscale an image, a folder of images or a video with a bundle.

Images -> PNG (a folder -> a folder of PNGs with the same names); videos -> H.264 with the input's
frame rate and audio. Decoding, dispatch and encoding overlap (:mod:`runtime.pipeline`). A video
output appears under its name only when complete; on an error or Ctrl-C the frames done are kept,
playable, in ``NAME.partial.EXT`` (:mod:`runtime.video`). Imports only the runtime (inside
``run``): it works on a device without torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from runtime.pipeline import FrameRecord, RunStats

_BITRATE_UNITS = {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000}
_MIN_BITRATE, _MAX_BITRATE = 10_000, 2_000_000_000
MAX_BATCH = 1024  # tiles per engine call
VIDEO_HYSTERESIS = 0.1  # default --hysteresis for a video input (images: 0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, metavar="INPUT", help="image file, folder of images or "
                   "video file")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUTPUT",
                   help="image file, folder (for a folder input) or video file (.mp4/.mkv/.mov)")
    p.add_argument("--bundle", type=Path, required=True, metavar="DIR", help="bundle folder")
    p.add_argument("--mode", default="patch", metavar="patch|image",
                   help="one engine per tile (patch, default) or per frame (image)")
    p.add_argument("--policy", metavar="POLICY",
                   help="quality[:DB] (lose at most DB dB against the top rung per frame, the "
                   "cheapest rung per tile; default, at the bundle's default target), threshold "
                   "(calibrated bit mapping; the default for bundles without a rung ladder), "
                   "fixed:NAME (one engine or rung) or budget:MS (per-frame latency budget)")
    p.add_argument("--stats", type=Path, metavar="STATS.json",
                   help="write per-frame engine histograms, FAB and stage times here")
    p.add_argument("--reference", type=Path, metavar="VIDEO",
                   help="with --stats and a video: the original frames at the output size; "
                   "the stats gain VMAF NEG and Y-PSNR of the output against them")
    p.add_argument("--save-map", type=Path, metavar="MAP",
                   help="write the engine chosen per tile as an overlay: a video for a video "
                   "input, a PNG (a folder of PNGs for a folder) for images")
    p.add_argument("--batch", type=int, default=8, help="tiles per engine call (default 8)")
    p.add_argument("--threads", type=int,
                   help="intra-op threads of CPU engines (default: the bundle's)")
    p.add_argument("--hysteresis", type=float,
                   help="relative threshold margin before a tile changes engine between frames "
                   f"(default {VIDEO_HYSTERESIS:g} for video, 0 for images)")
    p.add_argument("--frames", type=int, metavar="N", help="upscale the first N frames only")
    p.add_argument("--stitch", default="crop", metavar="crop|feather",
                   help="tile seams: cut at the overlap centre (crop, default) or blend (feather)")
    p.add_argument("--crf", type=int, default=18,
                   help="H.264 constant quality, 0 (lossless) .. 51 (default 18)")
    p.add_argument("--bitrate", metavar="RATE",
                   help="H.264 bitrate instead of --crf, e.g. 8M or 800k")
    p.add_argument("--preset", default="fast", help="x264 speed preset (default fast)")
    p.add_argument("--codec", help="video encoder (default libx264, else mpeg4); e.g. "
                   "h264_nvenc on NVIDIA desktop GPUs (--crf/--preset apply to libx264 only)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary line")
    add_force_argument(p)


def add_force_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="overwrite existing output files (never an input)")


def run(args: argparse.Namespace) -> int:
    from runtime.bundle import open_bundle
    from runtime.dispatch import Dispatcher
    from runtime.fileio import atomic_write_json
    from runtime.pipeline import upscale_images, upscale_video
    from runtime.policies import bundle_policy
    from runtime.video import EncoderSettings, video_encoder

    source: Path = args.input
    inputs = _inputs(args)
    settings = EncoderSettings(crf=args.crf, bitrate=_bitrate(args.bitrate), preset=args.preset,
                               codec=args.codec)
    if inputs.video and args.codec is None and video_encoder() != "libx264" and not args.quiet:
        print("adasr run: note: this PyAV build has no libx264; writing MPEG-4 Part 2",
              file=sys.stderr)

    bundle = open_bundle(args.bundle)
    manifest = bundle.manifest
    _claim_outputs(args, inputs, bundle.root)
    policy, latencies = bundle_policy(args.policy, bundle.root, manifest)
    video = inputs.video
    hysteresis = (args.hysteresis if args.hysteresis is not None
                  else VIDEO_HYSTERESIS if video else 0.0)
    dispatcher = Dispatcher(manifest, bundle.engines(threads=args.threads), mode=args.mode,
                            policy=policy, batch=args.batch, stitch=args.stitch,
                            hysteresis=hysteresis, latencies=latencies)
    bar = _Progress(inputs.total, quiet=args.quiet)
    try:
        with dispatcher:
            if video:
                stats = upscale_video(source, args.output, dispatcher, manifest,
                                      map_path=args.save_map, settings=settings,
                                      limit=args.frames, keep_records=args.stats is not None,
                                      on_frame=bar.update)
            else:
                stats = upscale_images(inputs.jobs, dispatcher, manifest, map_paths=inputs.maps,
                                       keep_records=args.stats is not None,
                                       on_frame=bar.update)
    except KeyboardInterrupt as interrupt:
        bar.close()
        if interrupt.args:
            print(f"adasr run: {interrupt}", file=sys.stderr)
        raise
    finally:
        bar.close()
    if args.stats is not None:
        payload: dict[str, Any] = {
            "input": str(source), "output": str(args.output), "bundle": str(args.bundle),
            "mode": args.mode, "policy": str(policy), "hysteresis": hysteresis,
            "batch": args.batch, "stitch": args.stitch, **stats.to_json()}
        if args.reference is not None and video:
            from runtime.vmaf import video_scores

            payload["quality"] = video_scores(args.output, args.reference, limit=args.frames)
        atomic_write_json(args.stats, payload)
    if not args.quiet:
        print(_summary(stats, args.output))
    return 0


class _Inputs(NamedTuple):
    video: bool
    jobs: list[tuple[Path, Path]]  # images: (input, output)
    maps: list[Path] | None  # images: engine map per job
    total: int  # frames to do (0: unknown)


def _inputs(args: argparse.Namespace) -> _Inputs:
    """Check the input and the frame options; plan the image jobs or probe the video."""
    from runtime.errors import ConfigError, check_range
    from runtime.pipeline import image_jobs, is_image
    from runtime.video import probe

    source: Path = args.input
    if not source.exists():
        raise ConfigError(f"input {source} does not exist")
    if args.frames is not None and args.frames < 1:
        raise ConfigError(f"--frames must be >= 1, got {args.frames}")
    check_threads(args.threads)
    check_range("--batch", args.batch, 1, MAX_BATCH)
    check_range("--crf", args.crf, 0, 51)
    if source.is_dir() or is_image(source):
        jobs = image_jobs(source, args.output)[: args.frames]
        maps = None if args.save_map is None else \
            [out for _, out in image_jobs(source, args.save_map)][: len(jobs)]
        return _Inputs(False, jobs, maps, len(jobs))
    info = probe(source)
    known = [count for count in (info.frames, args.frames) if count]
    return _Inputs(True, [], None, min(known) if known else 0)


def _claim_outputs(args: argparse.Namespace, inputs: _Inputs, bundle: Path) -> None:
    """Check every output against the inputs (media, bundle files) and each other, up front."""
    from runtime.outputs import Outputs

    sources = [path for path, _ in inputs.jobs] if inputs.jobs else [args.input]
    guard = Outputs([*sources, *(p for p in bundle.rglob("*") if p.is_file())], args.force)
    if inputs.video:
        guard.claim(args.output, "-o")
        if args.save_map is not None:
            guard.claim(args.save_map, "--save-map")
    else:
        for _, output in inputs.jobs:
            guard.claim(output, "-o")
        for output in inputs.maps or ():
            guard.claim(output, "--save-map")
    if args.stats is not None:
        guard.claim(args.stats, "--stats")


def check_threads(threads: int | Sequence[int] | None) -> None:
    """--threads within 0 (the backend's default) .. MAX_THREADS."""
    from runtime.engines.onnxruntime import MAX_THREADS
    from runtime.errors import check_range

    for value in [threads] if isinstance(threads, int) else threads or ():
        check_range("--threads", value, 0, MAX_THREADS)


def _bitrate(text: str | None) -> int | None:
    """Bits per second from ``8M``, ``800k`` or ``1500000``."""
    if text is None:
        return None
    from runtime.errors import ConfigError

    number, unit = text.strip()[:-1], text.strip()[-1:].lower()
    if unit.isdigit():
        number, unit = text.strip(), ""
    try:
        value = float(number) * _BITRATE_UNITS[unit]
    except (KeyError, ValueError) as err:
        raise ConfigError(f"--bitrate {text!r} is not a bitrate; use bits/s like 8M, 800k or "
                          "1500000") from err
    if not _MIN_BITRATE <= value <= _MAX_BITRATE:  # also NaN and inf
        raise ConfigError(f"--bitrate must be in 10k..2G bits/s, got {text!r}")
    return int(value)


def _summary(stats: RunStats, output: Path) -> str:
    engines = ", ".join(f"{name} {count}" for name, count in sorted(stats.histogram.items()))
    return (f"wrote {output}: {stats.frames} frame{'s' * (stats.frames != 1)} at "
            f"{stats.fps:.1f} fps, FAB {stats.mean_fab:.2f}, tiles per engine: {engines}")


class _Progress:
    """A tqdm bar (terminal only) showing frames, frames/s and the running mean FAB."""

    def __init__(self, total: int, *, quiet: bool) -> None:
        self._bar: Any = None
        if not quiet:
            from runtime.progress import progress_bar

            # unit frame: the rate reads frame/s, the fps
            self._bar = progress_bar(total or None, "upscaling", unit="frame")
        self._frames = 0
        self._fab = 0.0

    def update(self, record: FrameRecord) -> None:
        self._frames += 1
        self._fab += record.fab
        if self._bar is not None:
            self._bar.set_postfix(fab=f"{self._fab / self._frames:.2f}", refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
