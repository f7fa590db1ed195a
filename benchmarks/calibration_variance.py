#!/usr/bin/env python3
"""Where two AdaBM calibrations of the same network differ in quality: bits, bounds or clips.

Two records of the same checkpoint and settings (another seed, thread count or machine) can differ
in their discrete choices (image thresholds, layer offsets) and in their continuous ones
(activation bounds, weight clips). This script moves one part of record A into record B at a time
and evaluates each hybrid on a benchmark set (whole images):

- B with A's thresholds and layer offsets (the bit allocation);
- B with A's activation bounds, and B with A's weight clips;
- with ``--per-layer``, B with A's activation bounds of one layer at a time.

The dB a part moves B toward A is how much of the A - B gap it carries. Prints one line per
hybrid and ends with ``gap=<dB>``; writes benchmarks/results/calibration_variance.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import torch
from common import REPO, cpu_name, shared, table

from compiler.quant.record import apply_record, read_record
from compiler.simulate import TorchUpscaler
from compiler.zoo import load_model
from runtime.benchmark import evaluate, load_benchmark
from runtime.fileio import atomic_write_bytes, atomic_write_json

PARTS = {"bits": ("image_thresholds", "layer_offset"), "act": ("a_bounds",), "clips": ("w_clip",)}


def hybrid(base: dict[str, Any], donor: dict[str, Any], keys: tuple[str, ...],
           layer: str | None = None) -> dict[str, Any]:
    """``base`` with ``donor``'s values of ``keys`` (per-layer keys only in ``layer`` if given)."""
    out = copy.deepcopy(base)
    if "image_thresholds" in keys:
        out["image_thresholds"] = donor["image_thresholds"]
    for mine, theirs in zip(out["layers"], donor["layers"], strict=True):
        if layer is None or mine["name"] == layer:
            for key in keys:
                if key in theirs:
                    mine[key] = theirs[key]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="calibration record A (the donor)")
    parser.add_argument("b", type=Path, help="calibration record B (the base)")
    parser.add_argument("--weights", default="weights/edsr_r8f64_x2_krasserm.pt",
                        help="checkpoint, relative to the shared data")
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--dataset", default="Set5")
    parser.add_argument("--per-layer", action="store_true",
                        help="also move the activation bounds one layer at a time")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default="calibration_variance", help="results file stem")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    weights = shared(args.weights)
    images = load_benchmark(shared(f"benchmarks/{args.dataset}"), args.scale)
    records = {name: read_record(path).data for name, path in (("A", args.a), ("B", args.b))}

    def psnr(record: dict[str, Any]) -> float:
        qnet = apply_record(load_model(weights), record)
        return evaluate(TorchUpscaler(qnet, args.scale), images, args.scale).psnr

    base = {name: psnr(rec) for name, rec in records.items()}
    gap = base["A"] - base["B"]
    print(f"A {base['A']:.3f}  B {base['B']:.3f}  gap {gap:+.3f} dB", flush=True)
    trials = [(f"B with A's {part}", hybrid(records["B"], records["A"], keys))
              for part, keys in PARTS.items()]
    if args.per_layer:
        trials += [(f"B with A's act of {layer['name']}",
                    hybrid(records["B"], records["A"], PARTS["act"], layer["name"]))
                   for layer in records["B"]["layers"]]
    rows = []
    for label, record in trials:
        value = psnr(record)
        rows.append({"hybrid": label, "psnr": value, "moved": value - base["B"]})
        print(f"{label:<40} {value:.3f}  ({value - base['B']:+.3f} dB)", flush=True)
    text = table([[r["hybrid"], f"{r['psnr']:.3f}", f"{r['moved']:+.3f}"] for r in rows],
                 ["hybrid", f"{args.dataset} PSNR", "moved (dB)"])
    note = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}; "
            f"{args.dataset}, whole images; A = {args.a} ({base['A']:.3f} dB), B = {args.b} "
            f"({base['B']:.3f} dB), gap {gap:+.3f} dB.\n\n")
    results = REPO / "benchmarks" / "results"
    atomic_write_bytes(results / f"{args.out}.md", (note + "```\n" + text + "\n```\n").encode())
    atomic_write_json(results / f"{args.out}.json",
                      {"a": str(args.a), "b": str(args.b), "psnr": base, "hybrids": rows})
    print(f"gap={gap:.4f}")


if __name__ == "__main__":
    main()
