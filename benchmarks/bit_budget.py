#!/usr/bin/env python3
"""CADyQ / Granular-DQ records at several bit margins from one trained record (no retraining).

``adasr calibrate --method cadyq`` trains the selectors, then applies the bit budget
(``compiler.quant.selector_budget.fit_selector_budget``): a shared logit shift toward the low
candidates and pull onto the base one, the pair of least calibration L1 whose calibration FAB is
<= abits - margin. ``--method granular`` trains the two image
thresholds, then re-places them (``compiler.quant.granular.fit_threshold_budget``): the pair of
least calibration L1 whose calibration FAB is <= abits - margin. Training does not depend on the
margin in either, so a record calibrated with ``--bit-margin 0`` gives the record of any margin
by running only the budget (a test checks both against calibrating with the margin); a CADyQ
record's selector choices are clustered again, as ``adasr calibrate`` does after its budget. Writes
``OUT_DIR/<stem>_m<margin>.s<seed>.json`` per margin (for ``quant_table.py --records``) and
prints each margin's budget and calibration FAB, ending with ``records=<int>``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from common import shared

from compiler.quant.clusters import cluster_calibration
from compiler.quant.granular import fit_threshold_budget, fp_outputs
from compiler.quant.patches import sample_patches
from compiler.quant.record import apply_record, read_record, record_of, save_record
from compiler.quant.selector_budget import fit_selector_budget
from compiler.zoo import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", type=Path, required=True,
                        help="a cadyq or granular record calibrated with --bit-margin 0")
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--calib", type=Path, default=None,
                        help="the calibration folder (default ../shared/data/calibration)")
    parser.add_argument("--margins", default="0.15,0.3,0.5")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = read_record(args.record)
    info = dict(source.data["calibration"])
    config = dict(info["config"])
    method = source.settings.method
    if method not in ("cadyq", "granular") or config["bit_margin"] != 0:
        raise SystemExit(f"{args.record}: not a cadyq or granular record calibrated with "
                         "--bit-margin 0")
    calib = args.calib or shared("calibration")
    patches = sample_patches(calib, config["patches"], config["patch_size"], config["seed"],
                             config["downscale"])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for margin in (float(m) for m in args.margins.split(",")):
        loaded = load_model(args.weights)
        qnet = apply_record(loaded, source)
        target = source.settings.abits - margin
        budget: dict[str, Any]
        if method == "cadyq":
            fitted = fit_selector_budget(qnet, patches, fp_outputs(qnet, patches), target)
            budget = {"selector_budget": fitted.to_json(), "selector_shift": fitted.shift}
        else:
            chosen = fit_threshold_budget(qnet, patches, fp_outputs(qnet, patches), target)
            budget = {"threshold_budget": chosen.to_json()}
        with torch.no_grad():
            qnet(patches[: config["validation"]])
            fab = float(qnet.sample_bits().mean())
            qnet(patches)
            fab_all = float(qnet.sample_bits().mean())
        record = record_of(qnet, loaded, {
            **info, "config": {**config, "bit_margin": margin}, "bit_margin": margin, **budget,
            "calibration_fab": fab, "budget_from": args.record.name})
        if method == "cadyq":  # the source's clusters are of its own selectors: cluster anew
            record = cluster_calibration(record, qnet, calib, config, config.get("clusters", 3))
        out = args.out_dir / f"{args.record.stem}_m{margin:g}.s{config['seed']}.json"
        if out.resolve() == args.record.resolve():
            raise SystemExit(f"{out} would overwrite the input record")
        save_record(out, record)
        written += 1
        print(f"margin {margin:g}: {budget}, FAB on the calibration patches "
              f"{fab_all:.3f} (validation {fab:.3f}) -> {out}", flush=True)
    print(f"records={written}")


if __name__ == "__main__":
    main()
