"""``adasr profile``: latency per engine / tile / batch / threads, quality per engine, plots.

``adasr profile BUNDLE`` measures every engine of the bundle and the adaptive dispatcher
(:mod:`profiles.profiler`), prints a table, writes the bundle's ``profile.json`` (referenced by
its manifest), a copy in ``--results DIR`` (``DIR/<target>/<model>.json``) when asked, and
``latency.png``, ``pareto.png``, ``layers.png`` and ``report.md`` into ``--plots DIR`` (default
``BUNDLE/profile/``; with ``--no-bundle`` ``out/profile/<bundle>/``, with the JSON there too).
``--video CLIP`` (default: carphone_pristine.mp4 of the shared data when present, as the benchmark
folders; ``--no-video``: none) adds every rung and the default adaptive policy on the clip's first
``--video-frames`` frames: Y-PSNR, VMAF NEG, frames/s, tiles per rung (:mod:`profiles.video`).
Every output is checked before measuring (:mod:`runtime.outputs`): existing files are replaced
only with ``--force``, except the default folder's own. ``adasr profile --compare A.json B.json``
shows two profiles side by side.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from profiles.video import MAX_FRAMES as MAX_VIDEO_FRAMES
from runtime.commands.run import add_force_argument

if TYPE_CHECKING:
    from profiles.schema import Profile

QUICK = {"runs": 5, "warmup": 1, "repeat": 2, "layer_runs": 2, "frame_repeats": 1,
         "video_frames": 4}
FULL = {"runs": 20, "warmup": 3, "repeat": 3, "layer_runs": 5, "frame_repeats": 3,
        "video_frames": 8}


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") \
            from err
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", nargs="?", type=Path, metavar="BUNDLE",
                   help="bundle folder (manifest.json inside)")
    p.add_argument("--tiles", type=_int_list, metavar="T,T", help="LR tile sizes "
                   "(default: the bundle's tile)")
    p.add_argument("--batch", type=_int_list, default=(1, 8), metavar="N,N",
                   help="tiles per engine call (default 1,8)")
    p.add_argument("--threads", type=_int_list, metavar="N,N", help="ONNX Runtime intra-op "
                   "threads, 0 = its default (default: the bundle's)")
    p.add_argument("--backends", type=lambda text: tuple(v.strip() for v in text.split(",")
                                                         if v.strip()), default=(),
                   metavar="B,B", help="also time every engine with these backends, side by "
                   "side (entries NAME@BACKEND), e.g. onnxruntime,openvino")
    p.add_argument("--runs", type=int, help=f"timed runs per repeat (default {FULL['runs']}; "
                   f"at least {FULL['runs']} unless --quick)")
    p.add_argument("--warmup", type=int, help=f"untimed runs first (default {FULL['warmup']})")
    p.add_argument("--repeat", type=int, metavar="K", help="measure K times; the spread of the "
                   f"K medians is the reported noise (default {FULL['repeat']})")
    p.add_argument("--layer-runs", type=int, help="profiled runs for the per-layer times, 0 = "
                   f"none (default {FULL['layer_runs']})")
    p.add_argument("--dataset", type=Path, action="append", metavar="DIR",
                   help="benchmark folder with HR/ (repeatable; default Set5 and Set14 from "
                   "the shared data when present)")
    p.add_argument("--max-images", type=int, metavar="N", help="first N images per dataset")
    p.add_argument("--frame-repeats", type=int, help="times each benchmark frame is upscaled "
                   f"(default {FULL['frame_repeats']})")
    p.add_argument("--video", type=Path, metavar="CLIP", help="video quality on this clip: its "
                   "first frames are the originals, their MATLAB-bicubic x1/scale the input; "
                   "every rung and the default adaptive policy, Y-PSNR and VMAF NEG (default: "
                   "carphone_pristine.mp4 from the shared data when present; a 720p clip "
                   "takes about a minute a frame per rung on a CPU)")
    p.add_argument("--no-video", action="store_true", help="no video quality")
    p.add_argument("--video-frames", type=int, metavar="N", help="first N frames of the clip "
                   f"(default {FULL['video_frames']}, at most {MAX_VIDEO_FRAMES})")
    p.add_argument("--quick", action="store_true", help="rough smoke measurement: defaults "
                   + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in QUICK.items())
                   + f"; allows --runs < {FULL['runs']}")
    p.add_argument("--json", type=Path, metavar="OUT.json", help="also write the profile here")
    p.add_argument("--plots", type=Path, metavar="DIR", help="plots and report.md here "
                   "(default BUNDLE/profile/, with --no-bundle out/profile/<bundle>/)")
    p.add_argument("--results", type=Path, metavar="DIR",
                   help="also write the profile to DIR/<target>/<model>.json")
    p.add_argument("--no-bundle", action="store_true",
                   help="leave the bundle untouched (no profile.json, manifest unchanged)")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"),
                   help="show two profiles side by side (latency ratios B/A) and exit")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_force_argument(p)


def run(args: argparse.Namespace) -> int:
    from profiles.report import compare_table, markdown_report, terminal_report
    from profiles.schema import read_profile
    from runtime.errors import ConfigError

    if args.compare is not None:
        if args.bundle is not None:
            raise ConfigError(f"--compare takes two profile files, not a bundle too (got "
                              f"{args.bundle})")
        print(compare_table(read_profile(args.compare[0]), read_profile(args.compare[1])))
        return 0
    if args.bundle is None:
        raise ConfigError("nothing to profile: give a BUNDLE folder, or --compare A.json B.json")

    from profiles.profiler import PROFILE_NAME, ProfileOptions, profile_bundle, save_profile
    from runtime.commands.run import MAX_BATCH, check_threads
    from runtime.errors import check_range
    from runtime.fileio import atomic_write_bytes, atomic_write_json
    from runtime.manifest import TILES

    check_threads(args.threads)
    for tile in args.tiles or ():
        check_range("--tiles", tile, *TILES)
    for batch in args.batch:
        check_range("--batch", batch, 1, MAX_BATCH)
    if args.video_frames is not None:
        check_range("--video-frames", args.video_frames, 1, MAX_VIDEO_FRAMES)
    video = _video(args)
    defaults = QUICK if args.quick else FULL
    counts = {key: defaults[key] if getattr(args, key) is None else getattr(args, key)
              for key in FULL}
    options = ProfileOptions(
        tiles=args.tiles or (), batches=args.batch, threads=args.threads or (),
        datasets=tuple(args.dataset or ()), max_images=args.max_images, quick=args.quick,
        backends=args.backends, video=video, **counts)
    folder, json_path = _claim_outputs(args, video)
    profile = profile_bundle(args.bundle, options, progress=None if args.quiet else _progress)
    results = save_profile(profile, args.bundle, results_dir=args.results,
                           update_bundle=not args.no_bundle)
    written = [path for path in (results, json_path) if path is not None]
    written += [] if args.no_bundle else [args.bundle / PROFILE_NAME]
    if json_path is not None:
        atomic_write_json(json_path, profile.to_json())
    plots = _plots(profile, folder)
    if args.plots is None:  # the command's own folder: no plot of an earlier run stays behind
        from profiles.plots import PLOTS

        for name in set(PLOTS.values()) - {path.name for path in plots.values()}:
            (folder / name).unlink(missing_ok=True)
    report = folder / REPORT
    atomic_write_bytes(report, markdown_report(
        profile, {title: path.name for title, path in plots.items()}).encode())
    print(terminal_report(profile))
    for path in [*written, *plots.values(), report]:
        print(f"wrote {path}")
    return 0


REPORT = "report.md"


def _video(args: argparse.Namespace) -> Path | None:
    """The clip to measure: ``--video``, else the shared carphone_pristine.mp4 when present and the
    VMAF tool is installed (else a note on stderr), None with ``--no-video``."""
    from profiles.profiler import default_video
    from runtime.errors import ConfigError

    if args.no_video:
        if args.video is not None:
            raise ConfigError(f"--video {args.video} and --no-video contradict: give one")
        return None
    if args.video is not None:
        return Path(args.video)
    found = default_video()
    if found is not None:
        from runtime.vmaf import ffmpeg_path

        try:
            ffmpeg_path()
        except ConfigError as err:
            print(f"adasr profile: no video quality on {found}: {err}", file=sys.stderr)
            return None
    return found


def _claim_outputs(args: argparse.Namespace, video: Path | None) -> tuple[Path, Path | None]:
    """Check every output before measuring; the plots folder and the JSON path (None: none)."""
    from profiles.plots import PLOTS
    from profiles.profiler import PROFILE_NAME
    from runtime.outputs import Outputs

    bundle: Path = args.bundle
    own = args.plots is None  # the default folder is the command's own: replaced each run
    folder = args.plots or (Path("out") / "profile" / bundle.resolve().name if args.no_bundle
                            else bundle / "profile")
    json_path = args.json or (folder / PROFILE_NAME if args.no_bundle and args.results is None
                              else None)
    writes_here = {bundle / PROFILE_NAME, bundle / "manifest.json"}
    guard = Outputs([p for p in bundle.rglob("*") if p.is_file()
                     and (p not in writes_here or args.no_bundle)
                     and not (own and p.parent == folder)] + ([] if video is None else [video]),
                    args.force)
    if json_path is not None:
        guard.claim(json_path, "--json", replace=own and json_path.parent == folder)
    for name in [*PLOTS.values(), REPORT]:
        guard.claim(folder / name, "--plots", replace=own)
    return folder, json_path


def _plots(profile: Profile, folder: Path) -> dict[str, Path]:
    try:
        import matplotlib  # noqa: F401  (optional on a device)
    except ImportError:
        print("adasr profile: matplotlib is not installed: no plots (pip install matplotlib)",
              file=sys.stderr)
        return {}
    from profiles.plots import write_plots

    return write_plots(profile, folder)


def _progress(message: str) -> None:
    print(f"[profile] {message}", file=sys.stderr, flush=True)
