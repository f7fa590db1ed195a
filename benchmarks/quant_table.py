#!/usr/bin/env python3
"""The quantization table: AdaBM, static PTQ, DDTB, Granular-DQ, CADyQ, simulated, Set5 / Set14.

For EDSR x2 (8 blocks) and IMDN x4, calibrated on ../shared/data/calibration with the default
calibration settings (100 patches x 48x48, 500 steps, seed 0; the photos bicubic-downscaled by the
model's scale, the degradation of the networks' LR inputs), evaluated on whole images with the
provided Set5 LR and generated Set14 LR. Prints the table, writes it to
benchmarks/results/quant_table.{md,json}, and ends with ``rows=<int>``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import REPO, SetScore, cpu_name, score_network, shared, table

from compiler.quant.calibrate import (
    BAC_MODES,
    LAYER_OFFSET_MODES,
    RANGE_INITS,
    CalibrationConfig,
    calibrate,
)
from compiler.quant.qmodel import QuantSettings
from compiler.quant.record import apply_record, read_record
from compiler.simulate import TorchUpscaler
from compiler.zoo import load_model
from runtime.benchmark import evaluate, load_benchmark
from runtime.fileio import atomic_write_bytes, atomic_write_json

MODELS = {"edsr": ("edsr_r8f64_x2_krasserm.pt", 2), "imdn": ("imdn_x4.pth", 4)}
ROWS = [  # method, wbits, abits, fq
    ("adabm", 8, 6, False), ("minmax", 8, 6, False), ("percentile", 8, 6, False),
    ("adabm", 4, 4, False), ("minmax", 4, 4, False), ("percentile", 4, 4, False),
    ("ddtb", 4, 4, False),
    ("adabm", 8, 6, True), ("minmax", 8, 6, True),
    ("adabm", 4, 4, True), ("minmax", 4, 4, True), ("percentile", 4, 4, True),
    ("ddtb", 4, 4, True),
    ("granular", 8, 6, False), ("granular", 4, 4, False),
    ("cadyq", 8, 6, False), ("cadyq", 4, 4, False),
]
SETS = ("Set5", "Set14")


@dataclass
class Row:
    model: str
    setting: str
    fq: bool
    seconds: float
    psnr: dict[str, float]
    drop: dict[str, float]
    fab: dict[str, float]
    spread: dict[str, float]  # max - min of the PSNR over the seeds (0 for one seed)
    seeds: list[int]
    per_seed: dict[str, list[float]]  # PSNR per seed, per set
    bitops: dict[str, float]  # GBitOPs per image (MACs x w_bits/32 x a_bits/32), mean
    classes: dict[str, dict[str, int]]  # images (or tiles) per d_img, summed over the set
    method: str = ""
    wbits: int = 32
    abits: int = 32
    margin: float | None = None  # the calibration's --bit-margin
    threads: int = 0  # torch threads of the calibration (records: of this evaluation)
    cpu_seconds: float | None = None  # the calibration's CPU time, where known
    tile: int | None = None  # LR tile size of a patch-wise evaluation (None: whole images)
    routed: bool = False  # CADyQ: the routed cluster network a bundle runs, not the selectors


@dataclass
class Score:
    seconds: float
    sets: dict[str, SetScore]


def _calibrate_and_score(weights: Path, settings: QuantSettings, scale: int,
                         sets: dict[str, Any], args: argparse.Namespace, seed: int,
                         records: str | None) -> Score:
    """Calibrate with ``seed`` (or read its record from the ``records`` pattern); seconds, PSNR,
    FAB, BitOPs and the d_img classes per set."""
    qnet: torch.nn.Module
    if records:
        record = read_record(Path(records.format(seed=seed)))
        if record.settings != settings or record.data["calibration"]["config"]["seed"] != seed:
            raise SystemExit(f"{records.format(seed=seed)}: not a {settings} seed {seed} "
                             "record")
        qnet = apply_record(load_model(weights), record,
                            routed=args.routed and settings.method == "cadyq")
        seconds = float(record.data["calibration"]["seconds"])
    else:
        start = time.perf_counter()
        config = CalibrationConfig(steps=args.steps, downscale=scale, bac=args.bac,
                                   layer_offsets=args.layer_offsets,
                                   bit_margin=args.bit_margin, range_init=args.range_init,
                                   refine_steps=args.refine_steps, validation=args.validation,
                                   holdout=args.holdout, average=args.average, seed=seed)
        qnet = calibrate(load_model(weights), settings, config,
                         shared("calibration/sun_hays8")).qnet
        seconds = time.perf_counter() - start
    scores = score_network(qnet, sets, scale, args.tile)
    print(f"    seed {seed}: " + ", ".join(f"{s} {v.psnr:.3f}" for s, v in scores.items())
          + f" ({seconds:.0f} s)", flush=True)
    return Score(seconds, scores)


def _record_row(pattern: str, seed: int) -> tuple[str, int, int, bool]:
    """The (method, wbits, abits, fq) row of a record file."""
    settings = read_record(Path(pattern.format(seed=seed))).settings
    return settings.method, settings.wbits, settings.abits, settings.fq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="edsr,imdn")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--rows", help="comma-separated row numbers (0-based) to run; the output "
                        "then goes to quant_table_rows.{md,json}")
    parser.add_argument("--tile", type=int, help="patch-wise evaluation with LR tiles of this "
                        "size (overlap 6; each tile its own image offset), as the papers do; "
                        "the FP reference is evaluated the same way")
    parser.add_argument("--bac", default="auto", choices=BAC_MODES,
                        help="bit-aware clipping (adasr calibrate --bac; default auto)")
    parser.add_argument("--layer-offsets", default="auto", choices=LAYER_OFFSET_MODES,
                        help="adasr calibrate --layer-offsets (default auto)")
    parser.add_argument("--range-init", default="global", choices=RANGE_INITS,
                        help="adasr calibrate --range-init (default global)")
    parser.add_argument("--bit-margin", type=float, default=None,
                        help="adasr calibrate --bit-margin (default: its default)")
    parser.add_argument("--refine-steps", type=int, default=0,
                        help="adasr calibrate --refine-steps (default 0)")
    parser.add_argument("--validation", type=int, default=10,
                        help="adasr calibrate --validation (default 10)")
    parser.add_argument("--holdout", type=int, default=0,
                        help="adasr calibrate --holdout (default 0)")
    parser.add_argument("--average", type=float, default=None,
                        help="adasr calibrate --average (default: its default)")
    parser.add_argument("--seeds", default="0", help="comma-separated calibration seeds; each "
                        "row reports the mean over them and the spread (max - min)")
    parser.add_argument("--sets", default=",".join(SETS), help="benchmark sets (default "
                        f"{','.join(SETS)})")
    parser.add_argument("--records", help="evaluate the records of `adasr calibrate` runs instead "
                        "of calibrating: a path with {seed} (one model), or several, "
                        "comma-separated (one row each; with --rows, labelled with the records' "
                        "bit margin; without, each record's settings make its row); the calib "
                        "seconds are the records'")
    parser.add_argument("--routed", action="store_true",
                        help="with --records: evaluate a CADyQ record's routed cluster network "
                        "(each image or tile on the configuration its complexity routes it to: "
                        "what a bundle runs), not its selector network")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", help="results file stem in benchmarks/results (default: "
                        "quant_table, or quant_table_rows with --rows; _tileN appended)")
    args = parser.parse_args()
    if args.routed and not args.records:
        parser.error("--routed evaluates records: give --records")
    if args.threads:
        torch.set_num_threads(args.threads)
    set_names = tuple(args.sets.split(","))
    seeds = [int(v) for v in args.seeds.split(",")]
    rows: list[Row] = []
    for key in args.models.split(","):
        file, scale = MODELS[key]
        weights = shared(f"weights/{file}")
        sets = {s: load_benchmark(shared(f"benchmarks/{s}"), scale) for s in set_names}
        fp = load_model(weights)
        fp_psnr = {s: evaluate(TorchUpscaler(fp.model, scale, tile=args.tile), imgs, scale).psnr
                   for s, imgs in sets.items()}
        name = f"{fp.info.arch} x{scale}"
        rows.append(Row(name, "FP32", False, 0.0, fp_psnr, dict.fromkeys(set_names, 0.0),
                        dict.fromkeys(set_names, 32.0), dict.fromkeys(set_names, 0.0), [],
                        {s: [v] for s, v in fp_psnr.items()}, {}, {}, tile=args.tile))
        print(f"{name} FP: " + ", ".join(f"{s} {v:.3f}" for s, v in fp_psnr.items()), flush=True)
        patterns: list[str | None] = list(args.records.split(",")) if args.records else [None]
        if args.records and not args.rows:  # each record's own settings make its row
            jobs = [(_record_row(p, seeds[0]), p) for p in patterns if p]
        else:
            chosen = [int(i) for i in args.rows.split(",")] if args.rows else range(len(ROWS))
            jobs = [(ROWS[i], p) for i in chosen for p in patterns]
        for (method, wbits, abits, fq), pattern in jobs:
            settings = QuantSettings(method=method, wbits=wbits, abits=abits, fq=fq)
            runs = [_calibrate_and_score(weights, settings, scale, sets, args, seed, pattern)
                    for seed in seeds]
            label = f"{method} W{wbits}A{abits}"
            margin, threads, cpu = args.bit_margin, torch.get_num_threads(), None
            if pattern:
                info = read_record(Path(pattern.format(seed=seeds[0]))).data["calibration"]
                # None: the method's default, which the record notes as its bit_margin
                margin = info["config"]["bit_margin"]
                margin = info.get("bit_margin") if margin is None else margin
                threads = info.get("threads", 0)
                cpu = info.get("cpu_seconds")
                if len(patterns) > 1 and margin is not None:
                    label += f" margin {margin:g}"
            routed = args.routed and method == "cadyq"
            label += " routed" if routed else ""
            per_seed = {s: [run.sets[s].psnr for run in runs] for s in set_names}
            psnr = {s: statistics.fmean(v) for s, v in per_seed.items()}
            row = Row(name, label, fq, statistics.fmean(run.seconds for run in runs), psnr,
                      {s: psnr[s] - fp_psnr[s] for s in set_names},
                      {s: statistics.fmean(run.sets[s].fab for run in runs) for s in set_names},
                      {s: max(v) - min(v) for s, v in per_seed.items()}, seeds, per_seed,
                      {s: statistics.fmean(run.sets[s].bitops for run in runs) for s in set_names},
                      {s: {d: sum(run.sets[s].classes[d] for run in runs) for d in ("-1", "0", "1")}
                       for s in set_names},
                      method, wbits, abits, margin, threads, cpu, args.tile, routed)
            rows.append(row)
            print(f"  {row.setting:<18} fq={fq!s:<5} " + "  ".join(
                f"{s} {psnr[s]:.3f} ({row.drop[s]:+.3f} +-{row.spread[s]:.3f}, "
                f"FAB {row.fab[s]:.2f})" for s in set_names) + f"  {row.seconds:.0f}s",
                flush=True)
    metrics = [f"{s} {k}" for s in set_names
               for k in ("PSNR", "drop", "spread", "FAB", "GBitOPs")]
    header = ["model", "setting", "FQ", *metrics, "calib s"]
    body = [[r.model, r.setting, "yes" if r.fq else "", *[
        v for s in set_names for v in (f"{r.psnr[s]:.3f}", f"{r.drop[s]:+.3f}",
                                       f"{r.spread[s]:.3f}", f"{r.fab[s]:.2f}",
                                       f"{r.bitops[s]:.1f}" if r.bitops else "")],
        f"{r.seconds:.0f}"] for r in rows]
    text = table(body, header)
    print("\n" + text)
    results = REPO / "benchmarks" / "results"
    where = f"patch-wise (tiles {args.tile}, overlap 6)" if args.tile else "whole-image"
    note = (f"torch {torch.__version__}, {torch.get_num_threads()} threads; {where} "
            f"evaluation, Set5 with the provided MATLAB LR, Set14 with generated LR; "
            + ("calibration settings: each record's calibration.config" if args.records else
               f"--bac {args.bac}, --layer-offsets {args.layer_offsets}, "
               f"--bit-margin {'auto' if args.bit_margin is None else args.bit_margin}, "
               f"--range-init {args.range_init}, --refine-steps {args.refine_steps}, "
               f"--validation {args.validation}, --holdout {args.holdout}, "
               f"--average {'auto' if args.average is None else f'{args.average:g}'}")
            + f"; seeds {args.seeds} (PSNR and FAB: mean over "
            f"the seeds; spread: max - min PSNR); {cpu_name()}"
            + (f"; calibrated rows read from the calibration records {args.records}"
               if args.records else "") + ".\n\n")
    stem = (args.out or ("quant_table_rows" if args.rows else "quant_table")) + (
        f"_tile{args.tile}" if args.tile else "")
    atomic_write_bytes(results / f"{stem}.md", (note + "```\n" + text + "\n```\n").encode())
    atomic_write_json(results / f"{stem}.json", [r.__dict__ for r in rows])
    print(f"rows={len(rows)}")


if __name__ == "__main__":
    main()
