"""``adasr cluster`` on a local Ray cluster against one ``adasr run`` process, on 2 clips.

Clips: the 720p bigbuckbunny and carphone (176 x 144), the first ``--frames`` of each. Runs, all
with ``--threads`` engine threads per process / worker, the same bundle, policy (threshold),
hysteresis (0.1, ``adasr run``'s video default) and lossless H.264 (``crf 0``), so that outputs
can be compared exactly:

1. single process: :func:`runtime.pipeline.upscale_video` per clip, one after the other (what
   ``adasr run`` runs), recording a sha256 of every SR frame before encoding;
2. a local cluster (127.0.0.1, 2 CPUs; its start is timed apart) with 1 worker, then 2 workers;
3. 2 workers again, one SIGKILLed a little way into a bigbuckbunny chunk.

Every cluster run must give the same per-frame digests as the single process, and the decoded
outputs of the 2-worker and the fault runs must equal the single process's frame for frame
(``identical_frames``). ``scaling_2_workers`` = time(1 worker) / time(2 workers);
``ray_overhead_pct`` = time(1 worker) / time(single process) - 1, in percent. Times are of the
whole job: actors started and engines loaded, decoding, chunks, joins. The load average is
printed because the machine may be shared.

The bundle: ``python build.py build --ladder emulate -o build/default_x2-emulate`` (the
embedded default x2 model; one engine per image offset, so the dispatch really chooses).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
from common import REPO, shared

from runtime.bundle import open_bundle
from runtime.cluster.job import JobReport, connect, plan_inputs, run_job
from runtime.cluster.progress import JobProgress
from runtime.cluster.worker import DispatchSettings, frame_digest
from runtime.dispatch import Dispatcher, FrameResult
from runtime.fileio import atomic_write_bytes
from runtime.pipeline import upscale_video
from runtime.video import EncoderSettings, read_frames

CLIPS = ("video/bigbuckbunny.mp4", "video/carphone_pristine.mp4")


class _Digesting:
    def __init__(self, inner: Dispatcher) -> None:
        self.inner, self.digests = inner, list[str]()

    def upscale(self, frame: np.ndarray) -> FrameResult:
        result = self.inner.upscale(frame)
        self.digests.append(frame_digest(result.sr))
        return result

    def reset(self) -> None:
        self.inner.reset()


def single(clips: list[Path], out: Path, spec: DispatchSettings,
           frames: int) -> tuple[float, list[str]]:
    start = time.perf_counter()
    digests: list[str] = []
    bundle = open_bundle(spec.bundle)
    for clip in clips:
        with spec.dispatcher(bundle) as dispatcher:
            upscaler = _Digesting(dispatcher)
            upscale_video(clip, out / f"{clip.stem}.mp4", upscaler, bundle.manifest,
                          settings=spec.encoder, limit=frames, keep_records=False)
        digests += upscaler.digests
    return time.perf_counter() - start, digests


class _Killer:
    """Kills one worker once it is a little way into a chunk of the first clip."""

    def __init__(self, after: int) -> None:
        self.after = after
        self.killed: str | None = None

    def __call__(self, progress: JobProgress) -> None:
        for (job, _), attempt in progress.running.items():
            if self.killed is None and job == 0 and attempt.frames >= self.after:
                self.killed = attempt.worker
                os.kill(int(attempt.worker.rsplit(":", 1)[1]), signal.SIGKILL)


def same_videos(a: Path, b: Path) -> bool:
    left, right = read_frames(a), read_frames(b)
    count = 0
    for x, y in zip(left, right, strict=False):
        if not np.array_equal(x, y):
            return False
        count += 1
    rest = next(left, None) is None and next(right, None) is None
    return rest and count > 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "build" / "default_x2-emulate")
    parser.add_argument("--frames", type=int, default=48, help="frames of each clip")
    parser.add_argument("--chunk-frames", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("/tmp/adasr-cluster-bench"))
    parser.add_argument("--results", type=Path,
                        default=REPO / "benchmarks" / "results" / "cluster.md")
    args = parser.parse_args()
    if not (args.bundle / "manifest.json").is_file():
        raise SystemExit(f"no bundle at {args.bundle}: python build.py build --ladder emulate "
                         f"-o {args.bundle}")
    clips = [shared(clip) for clip in CLIPS]
    spec = DispatchSettings(bundle=args.bundle, hysteresis=0.1, threads=args.threads,
                            encoder=EncoderSettings(crf=0, preset="ultrafast"))
    load_before = os.getloadavg()
    outs = {name: args.out / name for name in ("single", "w1", "w2", "fault")}
    for folder in outs.values():
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.iterdir():
            stale.unlink()

    print(f"single process, {args.threads} thread(s) ...", file=sys.stderr)
    single_s, digests = single(clips, outs["single"], spec, args.frames)
    start = time.perf_counter()
    reports: dict[str, JobReport] = {}
    killer = _Killer(after=max(1, args.chunk_frames // 4))
    with connect(None, num_cpus=2):
        cluster_start_s = time.perf_counter() - start
        for name, workers, hook in (("w1", 1, None), ("w2", 2, None), ("fault", 2, killer)):
            print(f"cluster {name}: {workers} worker(s) ...", file=sys.stderr)
            reports[name] = run_job(plan_inputs(clips, outs[name]), spec, workers=workers,
                                    chunk_frames=args.chunk_frames, limit=args.frames,
                                    digests=True, on_progress=hook, poll_s=0.05)
    load_after = os.getloadavg()

    same_digests = {name: list(report.digests) == digests for name, report in reports.items()}
    same_decoded = {name: all(same_videos(outs["single"] / f"{clip.stem}.mp4",
                                          outs[name] / f"{clip.stem}.mp4") for clip in clips)
                    for name in ("w2", "fault")}
    identical = all(same_digests.values()) and all(same_decoded.values())
    w1, w2 = reports["w1"].wall_s, reports["w2"].wall_s
    scaling = w1 / w2
    overhead = 100 * (w1 / single_s - 1)
    retried = reports["fault"].retried
    frames = len(digests)

    rows = [("single process", 1, single_s, "-", "-", "-"),
            *((f"cluster, {r.workers} worker{'s' * (r.workers > 1)}"
               + (" (one killed)" if name == "fault" else ""), r.workers, r.wall_s,
               r.retried, same_digests[name], same_decoded.get(name, "-"))
              for name, r in reports.items())]
    lines = [
        "# adasr cluster vs one process (`python benchmarks/cluster.py`)", "",
        f"Bundle `{args.bundle.name}` ({', '.join(open_bundle(args.bundle).manifest.names)}), "
        f"threshold policy, hysteresis 0.1, {args.threads} engine thread(s) per process / "
        f"worker, chunks of {args.chunk_frames} frames, lossless H.264 (crf 0, ultrafast). "
        f"Clips: {', '.join(c.name for c in clips)}, first {args.frames} frames each "
        f"({frames} frames). Machine: {os.cpu_count()} CPUs; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (1 min). Local cluster start: "
        f"{cluster_start_s:.1f} s (not in the times).", "",
        "| run | workers | seconds | fps | retried chunks | SR digests = single | "
        "decoded = single |", "|---|---|---|---|---|---|---|",
        *(f"| {run} | {n} | {s:.1f} | {frames / s:.2f} | {r} | {d} | {v} |"
          for run, n, s, r, d, v in rows), "",
        f"Fault run: killed {killer.killed}.", "",
        f"identical_frames={identical} scaling_2_workers={scaling:.2f} "
        f"ray_overhead_pct={overhead:.1f} retried_chunks={retried}",
    ]
    text = "\n".join(lines) + "\n"
    atomic_write_bytes(args.results, text.encode())
    print(text)


if __name__ == "__main__":
    main()
