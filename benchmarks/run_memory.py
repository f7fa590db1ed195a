#!/usr/bin/env python3
"""Resident memory of ``adasr run`` over a 720p clip: it must stay flat (no growth per frame).

Runs ``adasr run ../shared/data/video/bigbuckbunny.mp4 --frames N --bundle B`` (1280x720 in,
x2 out) in a subprocess, samples its resident set size every 0.2 s, and compares the peak of the
first and second halves of what follows the first ``--warmup`` share of the run (sessions,
buffers and x264's lookahead of about 30 frames fill first).
Ends with ``rss_growth_mb=<float> peak_rss_mb=<float>``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, shared


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--warmup", type=float, default=0.5,
                        help="share of the run ignored first (x264 fills its lookahead of ~30 "
                        "frames; sessions and buffers warm up)")
    args = parser.parse_args()
    video = shared("video/bigbuckbunny.mp4")
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "compiler.cli", "run", str(video), "-o",
                   f"{tmp}/out.mp4", "--bundle", str(args.bundle), "--frames", str(args.frames),
                   "--quiet", "--stats", f"{tmp}/stats.json"]
        process = subprocess.Popen(command, cwd=REPO)
        samples: list[tuple[float, float]] = []
        start = time.perf_counter()
        while process.poll() is None:
            rss = _rss_mb(process.pid)
            if rss is not None:
                samples.append((time.perf_counter() - start, rss))
            time.sleep(0.2)
        if process.returncode != 0:
            raise SystemExit(f"adasr run failed with exit status {process.returncode}")
    end = samples[-1][0]
    steady = [(t, r) for t, r in samples if t >= args.warmup * end]
    middle = steady[0][0] + (end - steady[0][0]) / 2
    first = max(r for t, r in steady if t < middle)
    second = max(r for t, r in steady if t >= middle)
    print(f"{args.frames} frames of 1280x720 -> 2560x1440 in {end:.0f} s; RSS samples "
          f"{len(samples)}: after warm-up first half peak {first:.0f} MB, second half peak "
          f"{second:.0f} MB")
    print(f"rss_growth_mb={second - first:.1f} peak_rss_mb={max(r for _, r in samples):.1f}")


if __name__ == "__main__":
    main()
