"""``adasr cluster``: ``adasr run`` on a Ray cluster, for one or many videos or image folders.

Takes every option of ``adasr run`` (the frames are the same: see :mod:`runtime.cluster`), one
or more inputs (several go into the folder ``-o``), and where to run: ``--address`` of a running
cluster (``ray start --head`` on one machine, ``ray start --address HEAD:6379`` on the others)
or, by default, a local cluster on this machine. Needs the ``ray`` extra. Imports only the runtime.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runtime.cluster.job import ClusterInput, JobReport
    from runtime.cluster.progress import JobProgress

_LINE_EVERY_S = 5.0  # progress lines when stderr is not a terminal


def add_arguments(p: argparse.ArgumentParser) -> None:
    from runtime.commands import run as single

    single.add_arguments(p)
    p.epilog = ("Here --threads is per worker (engine threads, and CPUs it reserves; default 1), "
                "--frames applies to each input, and --save-map is not supported. Inputs come "
                "before the options.")
    p.add_argument("more", nargs="*", type=Path, metavar="INPUT",
                   help="more inputs (videos, images or image folders); -o is then a folder")
    p.add_argument("--address", metavar="ADDRESS",
                   help="the Ray cluster to use: auto (the one this machine belongs to) or "
                   "HOST:PORT of its head (default: start a local cluster on this machine)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="dispatcher actors, each loading the engines once (default: the "
                   "cluster's CPUs / --threads)")
    p.add_argument("--chunk-frames", type=int, default=16, metavar="N",
                   help="frames per chunk (default 16)")
    p.add_argument("--retries", type=int, default=3, metavar="N",
                   help="restarts of a dead worker, and tries of its chunk (default 3)")
    with contextlib.suppress(argparse.ArgumentError):  # unless adasr run has it already
        p.add_argument("--force", action="store_true", help="replace outputs that exist")


def run(args: argparse.Namespace) -> int:
    from runtime.cluster.job import connect, plan_inputs, run_job
    from runtime.cluster.worker import DispatchSettings
    from runtime.commands.run import _bitrate
    from runtime.errors import ConfigError
    from runtime.video import EncoderSettings

    if args.save_map is not None:
        raise ConfigError("--save-map is not supported by adasr cluster; use adasr run")
    if args.frames is not None and args.frames < 1:
        raise ConfigError(f"--frames must be >= 1, got {args.frames}")
    threads = 1 if args.threads is None else args.threads
    if threads < 1:
        raise ConfigError(f"--threads must be >= 1 per worker, got {threads}")
    inputs = plan_inputs([args.input, *args.more], args.output)
    _check_outputs(inputs, force=args.force)
    settings = DispatchSettings(
        bundle=args.bundle, mode=args.mode, policy=args.policy, batch=args.batch,
        stitch=args.stitch, hysteresis=0.1 if args.hysteresis is None else args.hysteresis,
        threads=threads,
        encoder=EncoderSettings(crf=args.crf, bitrate=_bitrate(args.bitrate),
                                preset=args.preset, codec=args.codec))
    show = _Progress(quiet=args.quiet)
    local_cpus = None if args.workers is None else args.workers * threads
    try:
        with connect(args.address, num_cpus=local_cpus):
            workers = _workers(args.workers, threads)
            report = run_job(inputs, settings, workers=workers, chunk_frames=args.chunk_frames,
                             limit=args.frames, retries=args.retries, on_progress=show.update)
    finally:
        show.close()
    if args.stats is not None:
        _write_stats(args, settings.hysteresis, report)
    if not args.quiet:
        print(_summary(report))
    return 0


def _workers(asked: int | None, threads: int) -> int:
    import ray

    from runtime.errors import ConfigError

    cpus = int(ray.cluster_resources().get("CPU", 0))
    if asked is None:
        if cpus < threads:
            raise ConfigError(f"the cluster has {cpus} CPUs, fewer than --threads {threads}")
        return cpus // threads
    if asked < 1 or asked * threads > cpus:
        raise ConfigError(f"--workers {asked} x --threads {threads} CPUs do not fit the "
                          f"cluster's {cpus} CPUs")
    return asked


def _check_outputs(inputs: list[ClusterInput], *, force: bool) -> None:
    from runtime.errors import ConfigError

    for spec in inputs:
        targets = [spec.output] if spec.video else [out for _, out in spec.images()]
        if spec.video and spec.output.resolve() == spec.source.resolve():
            raise ConfigError(f"output {spec.output} is the input: choose another name")
        existing = [path for path in targets if path.exists()]
        if existing and not force:
            raise ConfigError(f"{existing[0]} exists{' (and more)' * (len(existing) > 1)}: "
                              "pass --force to replace it, or choose another output")


def _write_stats(args: argparse.Namespace, hysteresis: float, report: JobReport) -> None:
    from runtime.fileio import atomic_write_json

    payload: dict[str, Any] = {
        "schema": "adasr.cluster-stats/1",
        "inputs": [str(path) for path in [args.input, *args.more]], "bundle": str(args.bundle),
        "mode": args.mode, "policy": args.policy, "hysteresis": hysteresis,
        "batch": args.batch, "stitch": args.stitch, "workers": report.workers,
        "chunk_frames": args.chunk_frames,
        "summary": {"frames": report.frames, "fps": round(report.fps, 3),
                    "fab": round(report.mean_fab, 4), "engines": dict(report.histogram),
                    "wall_s": round(report.wall_s, 3), "retried_chunks": report.retried},
        "outputs": [{"output": str(path), "frames": frames} for path, frames in report.outputs],
        "frames": [record.to_json() for record in report.records]}
    atomic_write_json(args.stats, payload)


def _summary(report: JobReport) -> str:
    engines = ", ".join(f"{name} {count}" for name, count in sorted(report.histogram.items()))
    outputs = ", ".join(str(path) for path, _ in report.outputs)
    return (f"wrote {outputs}: {report.frames} frame{'s' * (report.frames != 1)} at "
            f"{report.fps:.1f} fps on {report.workers} workers, FAB {report.mean_fab:.2f}, "
            f"{report.retried} chunks retried, tiles per engine: {engines}")


class _Progress:
    """A tqdm bar on a terminal; otherwise a line every few seconds (logs, CI)."""

    def __init__(self, *, quiet: bool) -> None:
        self.quiet = quiet
        self.bar: Any = None
        self.last_line = 0.0
        self.last: JobProgress | None = None

    def update(self, progress: JobProgress) -> None:
        self.last = progress
        if self.quiet:
            return
        if sys.stderr.isatty():
            if self.bar is None:
                from runtime.progress import progress_bar

                self.bar = progress_bar(progress.frames_total or 0, "upscaling")
                self.bar.unit = "frame"
            self.bar.total = progress.frames_total or None
            self.bar.n = progress.frames_done
            self.bar.set_postfix(retried=progress.retried, refresh=False)
            self.bar.refresh()
        elif time.monotonic() - self.last_line >= _LINE_EVERY_S:
            self.last_line = time.monotonic()
            print(f"adasr cluster: {progress.line()}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.last is not None and not self.quiet:
            print(f"adasr cluster: {self.last.line()}", file=sys.stderr, flush=True)

