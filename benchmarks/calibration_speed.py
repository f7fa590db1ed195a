#!/usr/bin/env python3
"""Wall time of each calibration method, run as the checkable command a user types.

For every model x bit setting x method it runs
``adasr calibrate --weights W --calib ../shared/data/calibration --wbits B --abits B --method M
-o RECORD --quiet`` in a child process with ``--threads`` torch threads (``OMP_NUM_THREADS``),
one after another, and measures the child's wall time and CPU time (user + system). The load
average before each run is printed beside it: a figure taken while other jobs ran is not a
quiet-machine figure. Writes ``benchmarks/results/calibration_speed.{md,json}`` and ends with one
line per run, ``calibration_seconds[model,W?A?,method]=<float>``, and the largest,
``max_calibration_seconds=<float>``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import REPO, cpu_name, shared, table

from runtime.fileio import atomic_write_bytes, atomic_write_json

WEIGHTS = {"edsr_x2": "weights/edsr_r8f64_x2_krasserm.pt", "imdn_x4": "weights/imdn_x4.pth"}
LIMIT_S = 300.0  # issue 19: <= 5 minutes per method at 2 threads


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_one(weights: Path, calib: Path, wbits: int, abits: int, method: str, threads: int,
            out: Path, extra: tuple[str, ...] = (),
            env: dict[str, str] | None = None) -> dict[str, float]:
    """Run the checkable ``adasr calibrate`` (plus ``extra`` options) in a child process with
    ``threads`` torch threads and ``env`` added to the environment; its wall / CPU seconds."""
    command = [sys.executable, str(REPO / "build.py"), "calibrate", "--weights", str(weights),
               "--calib", str(calib), "--wbits", str(wbits), "--abits", str(abits),
               "--method", method, *extra, "-o", str(out), "--quiet"]
    env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": str(threads)}
    load = os.getloadavg()[0]
    cpu0, start = _children_cpu(), time.perf_counter()
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, _children_cpu() - cpu0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr.strip()[-2000:]}")
    record = json.loads(out.read_text())
    return {"wall_s": wall, "cpu_s": cpu, "load_before": load,
            "record_seconds": float(record["calibration"]["seconds"]),
            "calibration_fab": float(record["calibration"]["calibration_fab"]),
            "patches": int(record["calibration"]["config"]["patches"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="edsr_x2", help=f"of {', '.join(WEIGHTS)}")
    parser.add_argument("--bits", default="8/6,4/4", help="comma-separated W/A settings")
    parser.add_argument("--methods", default="adabm,granular,cadyq")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="calibration_speed", help="results file stem")
    args = parser.parse_args()
    calib = shared("calibration")
    runs = []
    with tempfile.TemporaryDirectory(prefix="adasr-calib-speed-") as tmp:
        for model in args.models.split(","):
            weights = shared(WEIGHTS[model])
            for bits in args.bits.split(","):
                wbits, abits = (int(b) for b in bits.split("/"))
                for method in args.methods.split(","):
                    label = f"{model},W{wbits}A{abits},{method}"
                    print(f"calibrating {label} ...", flush=True)
                    row = run_one(weights, calib, wbits, abits, method, args.threads,
                                  Path(tmp) / f"{model}_{wbits}{abits}_{method}.json")
                    runs.append({"model": model, "wbits": wbits, "abits": abits,
                                 "method": method, **row})
                    print(f"calibration_seconds[{label}]={row['wall_s']:.1f} "
                          f"(cpu {row['cpu_s']:.1f} s, load before {row['load_before']:.2f})",
                          flush=True)
    worst = max(r["wall_s"] for r in runs)
    rows = [[r["model"], f"W{r['wbits']}A{r['abits']}", r["method"], str(r["patches"]),
             f"{r['wall_s']:.1f}",
             f"{r['cpu_s']:.1f}", f"{r['load_before']:.2f}", f"{r['calibration_fab']:.2f}",
             "yes" if r["wall_s"] <= LIMIT_S else "NO"] for r in runs]
    text = (f"`python benchmarks/calibration_speed.py --models {args.models} --bits {args.bits} "
            f"--methods {args.methods} --threads {args.threads}`\n\n"
            f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{args.threads} threads per calibration, runs one after another; the checkable "
            "command `adasr calibrate ... --method M` on ../shared/data/calibration with its "
            "defaults (patches of 48 px, 500 steps).\n\n```\n"
            + table(rows, ["model", "bits", "method", "patches", "wall s", "cpu s", "load before",
                           "calib FAB", f"<= {LIMIT_S:.0f} s"])
            + f"\n```\n\nmax_calibration_seconds={worst:.1f}\n")
    results = REPO / "benchmarks" / "results"
    atomic_write_bytes(results / f"{args.out}.md", text.encode())
    atomic_write_json(results / f"{args.out}.json", {
        "cpu": cpu_name(), "threads": args.threads, "runs": runs,
        "max_calibration_seconds": worst})
    print(text)


if __name__ == "__main__":
    main()
