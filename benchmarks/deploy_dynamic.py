#!/usr/bin/env python3
"""Deployed Granular-DQ and CADyQ bundles (issue 19, item 4): engines, parity, routing.

For each given record (``--cadyq-record``, ``--granular-record``; a CADyQ record without clusters
is clustered here first, as ``adasr calibrate --method cadyq`` does, on the record's own
calibration patches) this builds the cpu-x86 bundle on the emulate ladder (ONNX Runtime) and
reports:

- the engines: per-layer activation bits of the adaptive layers, FAB, the image classes served;
  and the hardware-ladder plan's collapse line (which configurations share one kernel);
- parity: every engine against its simulation (``compiler.parity.simulate_engine``) on whole Set5
  images (``bundle_parity.engine_parity``: min PSNR over images of the uint8 outputs, inf =
  identical);
- Set14, patch-wise (LR tiles of ``--tile``, overlap ``--overlap``, the runtime's tiling and
  stitching): tiles per engine of the dispatched bundle (threshold policy, per-tile dispatch),
  its PSNR, and the router's share of the bundle's run time (the dispatcher's ``statistic``
  stage over the sum of all stages, in the same run);
- router agreement. CADyQ: the share of patches whose routed class runs the configuration
  nearest to the selectors' own per-layer bits, on the calibration patches (the record's
  ``clusters.agreement``) and on the Set14 tiles (routing as the dispatcher did it).
  Granular-DQ: its bit class is its router's output, so the share of tiles where the runtime's
  class equals the simulation's (PyTorch twin of the statistic) is the check;
- CADyQ's mismatch cost: Set14 PSNR (Y, patch-wise as ``adasr eval --tile``) of the selector
  network, of the routed cluster network (what the bundle runs) and of the oracle that gives each
  tile the configuration nearest to its selectors' choice.

Writes benchmarks/results/<--out>.{md,json}; timing ratios come from one run on a machine shared
with other jobs.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bundle_parity import bundle_engines, engine_parity
from common import REPO, cpu_name, shared, table

from compiler.bundle import write_bundle
from compiler.parity import simulate_engine
from compiler.plan import plan_engines
from compiler.quant.bitmap import complexity
from compiler.quant.clusters import cluster_calibration, last_selector_bits, nearest
from compiler.quant.qmodel import QuantizedSR
from compiler.quant.record import CalibrationRecord, apply_record, read_record, record_from_json
from compiler.simulate import TorchUpscaler
from compiler.zoo import load_model
from runtime.benchmark import BenchmarkImage, evaluate, load_benchmark
from runtime.bundle import open_bundle
from runtime.dispatch import STAGES, Dispatcher
from runtime.fileio import atomic_write_bytes, atomic_write_json
from runtime.statistic import complexity_batch, image_offsets
from runtime.tiling import extract_tiles, plan_tiles, stitch
from targets.loader import load_target

BATCH = 8


def _deployed(path: Path, weights: Path, calib: Path) -> tuple[dict[str, Any], str]:
    """The record's data, clustered here when it is a CADyQ record without clusters."""
    rec = read_record(path)
    if rec.deployable:
        return dict(rec.data), "as given"
    started = time.perf_counter()
    data = cluster_calibration(dict(rec.data), apply_record(load_model(weights), rec), calib,
                               rec.data["calibration"]["config"])
    return data, f"clustered here in {time.perf_counter() - started:.0f} s"


def _bits_summary(bits: tuple[int, ...] | list[int]) -> str:
    counts = Counter(int(b) for b in bits)
    return " ".join(f"a{b}x{counts[b]}" for b in sorted(counts))


def _run_tiles(net: QuantizedSR, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """SR of uint8 tiles (N x h x w x 3) through ``net``; with selectors, their bits [N, L]."""
    outputs, bits = [], []
    for start in range(0, len(tiles), BATCH):
        x = torch.from_numpy(tiles[start:start + BATCH].copy()).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            outputs.append(net(x).permute(0, 2, 3, 1).clamp(0, 1).numpy())
        if net.settings.selector and not net.routed:  # the bits of the pass above
            bits.append(last_selector_bits(net, x.shape[0]))
    return np.concatenate(outputs), (np.concatenate(bits) if bits else None)


def _tile_plans(images: list[BenchmarkImage], tile: int, overlap: int, scale: int) -> list[Any]:
    return [plan_tiles(image.lr.shape[0], image.lr.shape[1], tile, overlap, scale)
            for image in images]


def _psnr(outputs: list[np.ndarray], images: list[BenchmarkImage], scale: int) -> float:
    stream = iter(outputs)
    return evaluate(lambda _lr: next(stream), images, scale).psnr


def _cadyq_tiles(weights: Path, record: dict[str, Any], rec: CalibrationRecord,
                 images: list[BenchmarkImage], plans: list[Any], scale: int,
                 routed_classes: list[np.ndarray]) -> dict[str, Any]:
    """Selector, routed and oracle networks on the Set14 tiles; agreement with the router."""
    selector = apply_record(load_model(weights), record)
    routed = apply_record(load_model(weights), record, routed=True)
    configs = np.array([rec.bit_vectors[d] for d in (-1, 0, 1)], dtype=np.float64)
    outs: dict[str, list[np.ndarray]] = {"selector": [], "routed": [], "oracle": []}
    agree, total, oracle_counts = 0, 0, Counter[int]()
    for image, plan, classes in zip(images, plans, routed_classes, strict=True):
        tiles = extract_tiles(image.lr, plan)
        sr, bits = _run_tiles(selector, tiles)
        assert bits is not None
        oracle = nearest(bits, configs) - 1  # class of the nearest configuration (the first
        # of classes sharing one)
        agree += int(sum(rec.bit_vectors[int(a)] == rec.bit_vectors[int(b)]
                         for a, b in zip(classes, oracle, strict=True)))
        total += len(tiles)
        oracle_counts.update(int(d) for d in oracle)
        by_class = {}
        for d in sorted(set(classes.tolist()) | set(oracle.tolist())):
            routed.forced_d_img = d
            by_class[d] = _run_tiles(routed, tiles)[0]
        outs["selector"].append(stitch(sr, plan))
        outs["routed"].append(stitch(np.stack([by_class[int(d)][i]
                                               for i, d in enumerate(classes)]), plan))
        outs["oracle"].append(stitch(np.stack([by_class[int(d)][i]
                                               for i, d in enumerate(oracle)]), plan))
    psnrs = {key: _psnr(value, images, scale) for key, value in outs.items()}
    return {"agreement_set14": agree / total, "tiles": total,
            "oracle_classes": {str(d): oracle_counts.get(d, 0) for d in (-1, 0, 1)},
            "psnr_selector": psnrs["selector"], "psnr_routed": psnrs["routed"],
            "psnr_oracle": psnrs["oracle"],
            "mismatch_db": psnrs["selector"] - psnrs["routed"],
            "oracle_gap_db": psnrs["oracle"] - psnrs["routed"]}


def _granular_agreement(weights: Path, record: dict[str, Any], images: list[BenchmarkImage],
                        plans: list[Any], routed_classes: list[np.ndarray]) -> float:
    """The share of tiles where the runtime's class equals the simulation's (torch twin)."""
    net = apply_record(load_model(weights), record)
    agree = total = 0
    for image, plan, classes in zip(images, plans, routed_classes, strict=True):
        tiles = extract_tiles(image.lr, plan)
        x = torch.from_numpy(_source(tiles, plan).copy()).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            sim = net.image_to_bit(complexity(x)).round()
        agree += int((sim.numpy().astype(int) == classes).sum())
        total += len(tiles)
    return agree / total


def measure(method: str, path: Path, args: argparse.Namespace) -> dict[str, Any]:
    weights, calib = Path(args.weights), Path(args.calib)
    record, how = _deployed(path, weights, calib)
    rec = record_from_json(record)
    scale = rec.checkpoint.scale
    target = load_target(args.target)
    hardware = plan_engines(record, target, "hardware")
    plan = plan_engines(record, target, "emulate", tile=args.tile, overlap=args.overlap)
    set5 = load_benchmark(Path(args.set5), scale)[:args.parity_images]
    set14 = load_benchmark(Path(args.set14), scale)[:args.set14_images]
    adaptive = sum(layer.kind == "adaptive" for layer in rec.layers)
    result: dict[str, Any] = {
        "method": method, "record": str(path), "record_note": how, "target": args.target,
        "threads": args.threads, "tile": args.tile, "overlap": args.overlap,
        "parity_images": len(set5), "cpu": cpu_name(),
        "settings": f"W{rec.settings.wbits}A{rec.settings.abits}"
                    + (" FQ" if rec.settings.fq else ""),
        "thresholds": list(rec.image_thresholds), "hardware_collapse": hardware.collapse,
        "hardware_engines": [{"name": e.name, "offsets": list(e.offsets)}
                             for e in hardware.engines],
        "emulate_collapse": plan.collapse}
    if rec.clusters is not None:
        result["agreement_calibration"] = rec.clusters.agreement
        result["calibration_patches"] = rec.clusters.patches
    out = Path(args.scratch) / f"{method}_{path.stem}"
    write_bundle(load_model(weights), record, plan, out)
    engines = []
    for spec, summary, statistics, run in bundle_engines(out, args.threads):
        sim = TorchUpscaler(simulate_engine(weights, record, spec, summary=summary,
                                            statistics=statistics), scale)
        entry = engine_parity(method, "emulate", spec, run, sim, set5, scale)
        entry["offsets"] = list(spec.offsets)
        entry["bits"] = ("float" if spec.reference else
                         _bits_summary([layer.act_bits or 32 for layer in spec.layers[:adaptive]]))
        engines.append(entry)
    result["engines"] = engines
    # Set14 through the bundle's dispatcher, per-tile dispatch on --tile tiles
    bundle = open_bundle(out)
    manifest = replace(bundle.manifest, tile=args.tile, overlap=args.overlap)
    plans = _tile_plans(set14, args.tile, args.overlap, scale)
    histogram: Counter[str] = Counter()
    stages = dict.fromkeys(STAGES, 0.0)
    classes, outputs = [], []
    with Dispatcher(manifest, bundle.engines(threads=args.threads)) as dispatcher:
        for image in set14:
            frame = dispatcher.upscale(image.lr)
            histogram.update(frame.engines)
            for stage, seconds in frame.seconds.items():
                stages[stage] += seconds
            classes.append(np.array(frame.offsets))
            outputs.append(frame.sr)
    result["tiles_per_engine"] = dict(histogram)
    result["bundle_psnr_set14"] = _psnr(outputs, set14, scale)
    result["router_overhead_pct"] = 100 * stages["statistic"] / sum(stages.values())
    # the dispatcher's classes are the runtime statistic against the thresholds
    check = [image_offsets(complexity_batch(_source(extract_tiles(image.lr, plan), plan)),
                           *rec.image_thresholds) for image, plan in zip(set14, plans, strict=True)]
    assert all(np.array_equal(a, b) for a, b in zip(check, classes, strict=True))
    if method == "cadyq":
        result.update(_cadyq_tiles(weights, record, rec, set14, plans, scale, classes))
    else:
        result["agreement_set14"] = _granular_agreement(weights, record, set14, plans, classes)
        result["tiles"] = sum(len(c) for c in classes)
    return result


def _source(tiles: np.ndarray, plan: Any) -> np.ndarray:
    """The tiles' image pixels without the padding (what the dispatcher's statistic reads)."""
    source = plan.tiles[0].source
    return tiles[:, :source.h, :source.w]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cadyq-record", action="append", default=[], type=Path,
                        help="a CADyQ calibration record (repeatable)")
    parser.add_argument("--granular-record", action="append", default=[], type=Path,
                        help="a Granular-DQ calibration record (repeatable)")
    parser.add_argument("--adabm-record", action="append", default=[], type=Path,
                        help="an AdaBM record, for reference (repeatable)")
    parser.add_argument("--combine", nargs="+", type=Path, default=[],
                        help="measure nothing: write --out from these results .json files "
                        "(runs of this script, e.g. one per record in parallel)")
    parser.add_argument("--weights", default=str(shared("weights/edsr_r8f64_x2_krasserm.pt")))
    parser.add_argument("--calib", default=str(shared("calibration")),
                        help="the records' calibration images (to cluster a CADyQ record)")
    parser.add_argument("--set5", default=str(shared("benchmarks/Set5")))
    parser.add_argument("--set14", default=str(shared("benchmarks/Set14")))
    parser.add_argument("--parity-images", type=int, default=5)
    parser.add_argument("--set14-images", type=int, default=14, help="a smoke run: fewer")
    parser.add_argument("--target", default="cpu-x86")
    parser.add_argument("--tile", type=int, default=96)
    parser.add_argument("--overlap", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scratch", default=str(REPO / "build" / "deploy_dynamic"),
                        help="where the bundles are written")
    parser.add_argument("--out", default="deploy_dynamic")
    args = parser.parse_args()
    records = ([("cadyq", p) for p in args.cadyq_record]
               + [("granular", p) for p in args.granular_record]
               + [("adabm", p) for p in args.adabm_record])
    if not records and not args.combine:
        parser.error("give at least one --cadyq-record, --granular-record or --adabm-record")
    torch.set_num_threads(args.threads)
    results = [r for path in args.combine for r in json.loads(path.read_text())]
    for method, path in records:
        print(f"{method} {path}", flush=True)
        started = time.perf_counter()
        results.append(measure(method, path, args))
        print(_markdown(results[-1:]), flush=True)
        print(f"({time.perf_counter() - started:.0f} s)", flush=True)
    name = REPO / "benchmarks" / "results" / args.out
    atomic_write_bytes(name.with_suffix(".md"), (_markdown(results) + "\n").encode())
    atomic_write_json(name.with_suffix(".json"), [
        {**r, "engines": [{k: None if isinstance(v, float) and np.isinf(v) else v
                           for k, v in e.items()} for e in r["engines"]]} for r in results])
    low = min(e["engine_vs_sim_db"] or np.inf for r in results for e in r["engines"]
              if e["offsets"])
    print(f"min_engine_vs_sim_db={low:.2f} " + " ".join(
        f"{r['method']}_{r['settings'].replace(' ', '')}_agreement_set14="
        f"{r['agreement_set14']:.3f}" for r in results))


def _db(value: float | None) -> str:
    """A PSNR in dB; ``inf`` (None in the JSON): identical outputs."""
    return "inf" if value is None or np.isinf(value) else f"{value:.2f}"


def _markdown(results: list[dict[str, Any]]) -> str:
    first = results[0]
    lines = [f"EDSR x2, {first['target']} bundles on the emulate ladder (ONNX Runtime), "
             f"{first['threads']} threads, {first['cpu']} (2 cores shared with other jobs: "
             f"times are ratios within one run). Parity on the first {first['parity_images']} "
             f"Set5 images, whole (inf: identical uint8 outputs); Set14 patch-wise: LR tiles "
             f"{first['tile']}, overlap {first['overlap']}, per-tile dispatch (threshold "
             "policy). A record without FQ keeps its head conv float: ONNX Runtime and torch sum "
             "it in different orders, so the body's first quantizer flips levels next to "
             "rounding ties and the engines are not bit-identical to their simulation (an AdaBM "
             "record without FQ shows the same; AdaBM FQ engines are, bundle_parity.md).", ""]
    for r in results:
        lines += [f"## {r['method']} {r['settings']} ({Path(r['record']).name}, "
                  f"{r['record_note']})",
                  "", f"router thresholds {tuple(round(t, 3) for t in r['thresholds'])}; "
                  f"hardware ladder: {r['hardware_collapse']}; emulate ladder: "
                  f"{r['emulate_collapse']}", ""]
        rows = [[e["engine"], ",".join(f"{d:+d}" for d in e["offsets"]) or "reference",
                 e["bits"], f"{e['fab']:.2f}", _db(e["engine_vs_sim_db"]),
                 f"{100 * e['max_differing']:.3f}", f"{e['psnr_engine']:.3f}",
                 str(r["tiles_per_engine"].get(e["engine"], 0))] for e in r["engines"]]
        lines += [table(rows, ["engine", "classes", "adaptive-layer bits", "FAB",
                               "engine vs sim dB", "differing %", "Set5 PSNR",
                               "Set14 tiles"]), ""]
        facts = [f"bundle Set14 PSNR (dispatched) {r['bundle_psnr_set14']:.3f} dB",
                 f"router overhead {r['router_overhead_pct']:.2f}% of the bundle's run time",
                 f"router agreement on Set14 tiles {100 * r['agreement_set14']:.1f}% "
                 f"({r['tiles']} tiles)"]
        if "agreement_calibration" in r:
            facts += [f"router agreement on calibration patches "
                      f"{100 * r['agreement_calibration']:.1f}% ({r['calibration_patches']})",
                      f"Set14 PSNR selector network {r['psnr_selector']:.3f}, routed clusters "
                      f"{r['psnr_routed']:.3f}, oracle clusters {r['psnr_oracle']:.3f} dB: "
                      f"mismatch cost {r['mismatch_db']:+.3f} dB (selector - routed), oracle "
                      f"{r['oracle_gap_db']:+.3f} dB over routed"]
        else:
            facts.append("the runtime's class per tile equals the simulation's (router "
                         "agreement by construction)")
        lines += [f"- {fact}" for fact in facts] + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
