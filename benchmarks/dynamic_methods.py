#!/usr/bin/env python3
"""AdaBM / CADyQ / Granular-DQ side by side, from quant_table.py results files (no evaluation).

Reads the rows of ``benchmarks/results/<stem>.json`` files written by ``quant_table.py`` (whole
images and ``--tile``), groups them by model, bit setting, set and evaluation (whole / tile N),
and puts each dynamic method beside AdaBM at the same base: PSNR, drop from FP, FAB, GBitOPs,
the gap to AdaBM and the issue's test, *within 0.10 dB of AdaBM (or better) at FAB <= base +
0.05*. A later file's row replaces an earlier one of the same model / method / bits /
evaluation, so the AdaBM rows can come from another run (e.g. a mean over seeds) by listing its
file last. CADyQ has two networks: its selectors' (``adasr eval``), and the routed cluster network
a bundle runs (``quant_table.py --routed``, ``adasr eval --routed``), each its own row. Also
lists each calibration's wall time, CPU time and threads. Writes
``benchmarks/results/dynamic_methods.{md,json}`` and ends with ``passed=<int>/<int>``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from common import REPO, table

from runtime.fileio import atomic_write_bytes, atomic_write_json

RESULTS = REPO / "benchmarks" / "results"
METHODS = ("cadyq", "granular")
GAP_DB = 0.10  # the target: within 0.10 dB of AdaBM
FAB_SLACK = 0.05  # ... at FAB <= base + 0.05


def _rows(stems: list[str]) -> dict[tuple[Any, ...], tuple[dict[str, Any], str]]:
    """(model, method, wbits, abits, tile, margin, routed) -> (row, file stem); later files
    win."""
    found: dict[tuple[Any, ...], tuple[dict[str, Any], str]] = {}
    for stem in stems:
        path = RESULTS / f"{stem}.json"
        try:
            rows = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise SystemExit(f"cannot read {path}: {err}") from err
        for row in rows:
            if row.get("method") in ("adabm", *METHODS) and not row.get("fq"):
                key = (row["model"], row["method"], row["wbits"], row["abits"], row.get("tile"),
                       row.get("margin"), row.get("routed", False))
                found[key] = (row, stem)
    return found


def _label(method: str, margin: float | None, routed: bool) -> str:
    """``cadyq routed m0.15``: the method, CADyQ's routed cluster network, the bit margin."""
    return (method + (" routed" if routed else "")
            + ("" if margin is None else f" m{margin:g}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stems", nargs="+", help="results file stems in benchmarks/results "
                        "(quant_table.py --out, with _tileN for the patch-wise ones)")
    parser.add_argument("--out", default="dynamic_methods")
    args = parser.parse_args()
    found = _rows(args.stems)
    groups = sorted({(k[0], k[2], k[3], k[4] or 0) for k in found},
                    key=lambda g: (g[0], -g[2], g[3]))
    body, results = [], []
    passed = total = 0
    for model, wbits, abits, tile in groups:
        here = sorted((((k[1], k[5], k[6]), entry) for k, entry in found.items()
                       if (k[0], k[2], k[3], k[4] or 0) == (model, wbits, abits, tile)),
                      key=lambda item: (("adabm", *METHODS).index(item[0][0]), item[0][2],
                                        -1.0 if item[0][1] is None else item[0][1]))
        adabm = next((entry for (method, _, _), entry in here if method == "adabm"), None)
        sets = sorted({s for _, (row, _) in here for s in row["psnr"]},
                      key=lambda s: (len(s), s))
        for (method, margin, routed), (row, stem) in here:
            label = _label(method, margin, routed)
            for s in sets:
                fab_ok = row["fab"][s] <= abits + FAB_SLACK
                gap = None if adabm is None else row["psnr"][s] - adabm[0]["psnr"][s]
                verdict = ""
                if method != "adabm" and gap is not None:
                    ok = fab_ok and gap >= -GAP_DB
                    passed, total = passed + ok, total + 1
                    verdict = "pass" if ok else ("fail (FAB)" if not fab_ok else "fail (dB)")
                seeds = ",".join(str(v) for v in row["seeds"])
                body.append([model, f"W{wbits}A{abits}", f"tile {tile}" if tile else "whole", s,
                             label, f"{row['psnr'][s]:.3f}", f"{row['drop'][s]:+.3f}",
                             f"{row['fab'][s]:.2f}",
                             f"{row['bitops'][s]:.1f}" if row.get("bitops") else "",
                             "" if gap is None or method == "adabm" else f"{gap:+.3f}",
                             verdict, seeds, stem])
                results.append({"model": model, "wbits": wbits, "abits": abits, "tile": tile,
                                "set": s, "method": method, "margin": margin,
                                "psnr": row["psnr"][s], "drop": row["drop"][s],
                                "fab": row["fab"][s],
                                "bitops": (row.get("bitops") or {}).get(s),
                                "gap_to_adabm": gap, "verdict": verdict, "seeds": row["seeds"],
                                "source": stem})
    header = ["model", "bits", "eval", "set", "method", "PSNR", "drop", "FAB", "GBitOPs",
              "vs AdaBM", f"<= {GAP_DB:g} dB at FAB <= base+{FAB_SLACK:g}", "seeds", "file"]
    text = table(body, header)
    timing = []
    for (model, method, wbits, abits, tile, margin, routed), (row, stem) in sorted(
            found.items(), key=lambda i: str(i[0])):
        if tile is None and not routed:  # a routed row is its selector row's calibration
            cpu = row.get("cpu_seconds")
            label = _label(method, margin, False)
            timing.append([model, label, f"W{wbits}A{abits}", f"{row['seconds']:.0f}",
                           "" if cpu is None else f"{cpu:.0f}", str(row.get("threads") or ""),
                           stem])
    times = table(timing, ["model", "method", "bits", "calib wall s", "calib CPU s", "threads",
                           "file"])
    print(text + "\n\n" + times)
    note = ("AdaBM / CADyQ / Granular-DQ at the same base bits, simulated; gap = PSNR - AdaBM's "
            f"on the same set and evaluation; pass = gap >= -{GAP_DB:g} dB and FAB <= base + "
            f"{FAB_SLACK:g}. Rows from benchmarks/results/{{{','.join(args.stems)}}}.json "
            "(each file's .md names its machine, threads and calibration settings); written by "
            "benchmarks/dynamic_methods.py.\n\n")
    atomic_write_bytes(RESULTS / f"{args.out}.md", (
        note + "```\n" + text + "\n```\n\nCalibration time (wall under the machine's load at the "
        "time; CPU seconds summed over threads, from the record where it has them):\n\n```\n"
        + times + "\n```\n").encode())
    atomic_write_json(RESULTS / f"{args.out}.json", {"rows": results, "passed": passed,
                                                     "total": total})
    print(f"passed={passed}/{total}")


if __name__ == "__main__":
    main()
