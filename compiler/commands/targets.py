"""``adasr targets``: the device targets as a table (this machine's marked), or one in detail."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from targets import DeviceFacts, Target


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", nargs="?", metavar="NAME",
                   help="show one target in detail: a name or a target .toml file")


def run(args: argparse.Namespace) -> int:
    from runtime.errors import ConfigError
    from targets import list_targets, load_target, match_target, probe_device

    facts = probe_device()
    all_targets = list_targets()
    try:
        detected: Target | None = match_target(facts, all_targets)
    except ConfigError:
        detected = None
    if args.target is None:
        _print_table(all_targets, detected, facts)
    else:
        target = load_target(args.target)
        _print_details(target, is_here=detected is not None and detected == target)
    return 0


def _print_table(targets: Sequence[Target], detected: Target | None, facts: DeviceFacts) -> None:
    header = ("", "name", "backend", "TensorRT", "build", "opset",
              "precisions (cheapest first)", "tile/overlap")
    rows = [header]
    for t in targets:
        rows.append((
            "*" if detected is not None and t.name == detected.name else "",
            t.name,
            ",".join(t.backends),
            str(t.tensorrt) if t.tensorrt else "-",
            _build_mode(t),
            str(t.max_opset),
            " ".join(t.device_ladder),
            f"{t.default_tile}/{t.default_overlap}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    where = f"({facts.describe()})"
    if detected is not None:
        print(f"\n* this machine: {detected.name} {where}")
    else:
        print(f"\nno target matches this machine {where}")
    print("adasr targets NAME shows one target in detail")


def _print_details(t: Target, is_here: bool) -> None:
    print(f"{t.name}{'  (this machine)' if is_here else ''}")
    match = t.device_match
    rules = [f"{key} ~ {' | '.join(values)}" for key, values in (
        ("machine", match.machine), ("jetson_model", match.jetson_model),
        ("gpu_name", match.gpu_name)) if values]
    lines = [
        ("description", t.description),
        ("backend", t.backend + (f"  (also: {', '.join(t.backends[1:])}; adasr build "
                                 "--backend)" if len(t.backends) > 1 else "")),
        ("TensorRT", str(t.tensorrt) if t.tensorrt else "-"),
        ("GPU architecture", t.gpu_arch or "-"),
        ("build", _build_mode(t)),
        ("max ONNX opset", str(t.max_opset)),
        ("precisions", " < ".join(t.device_ladder) + f"  (top: {t.top_precision})"),
        ("default tile", f"{t.default_tile} px LR, overlap {t.default_overlap}"),
        ("threads", "-" if t.threads is None else (str(t.threads) if t.threads
                                                    else "0 (the backend's default)")),
        ("detected by", "; ".join(rules) or "- (never detected; name it explicitly)"),
        ("file", str(t.source) if t.source else "-"),
    ]
    width = max(len(key) for key, _ in lines)
    for key, value in lines:
        print(f"  {key.ljust(width)}  {value}")


def _build_mode(t: Target) -> str:
    """TensorRT targets build strongly typed networks (the only mode adasr builds)."""
    return "strongly typed" if t.tensorrt is not None else "-"
