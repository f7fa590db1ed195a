"""``adasr inspect BUNDLE``: the manifest, readably, with every file's checksum verified."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path, help="bundle folder (from `adasr build`)")
    p.add_argument("--layers", action="store_true", help="also print the per-layer table")
    p.add_argument("--json", action="store_true", help="print the raw manifest JSON")


OK = "sha256 ok"


def _check(verify: Callable[[], object]) -> str:
    """``OK`` when ``verify`` passes, else ``FAILED: <why>`` (its BundleError, shortened)."""
    from runtime.errors import BundleError

    try:
        verify()
    except BundleError as err:
        return f"FAILED: {str(err).split(': ', 1)[-1][:120]}"
    return OK


def run(args: argparse.Namespace) -> int:
    from runtime.bundle import verify_file
    from runtime.bundlepaths import bundle_path
    from runtime.manifest import read_manifest

    m = read_manifest(args.bundle)
    if args.json:
        print(json.dumps(m.to_json(), indent=1))
        return 0
    b = m.build
    print(f"bundle {args.bundle}  (schema {m.schema})")
    print(f"  model      {m.model.name}: {m.model.arch} x{m.model.scale}, "
          f"sha256 {m.model.sha256[:12]}")
    print(f"  target     {m.target} ({m.backend}), {m.ladder} ladder, tile {m.tile} overlap "
          f"{m.overlap}, threads {m.threads or 'default'}")
    print(f"  statistic  {m.statistic}; offset -1 below {m.thresholds[0]:.3f}, +1 above "
          f"{m.thresholds[1]:.3f}")
    c = m.calibration
    record_check = _check(partial(verify_file, args.bundle, c.file, "calibration record"))
    print(f"  record     {c.file.path}: {c.method} W{c.wbits}A{c.abits}{' FQ' if c.fq else ''}"
          f"  {record_check}")
    print(f"  built      {b.created} by adasr {b.adasr}, opset {b.opset}, onnxruntime "
          f"{b.onnxruntime}, tensorrt {b.tensorrt or '-'}, device {b.device or '-'}")
    bad = int(record_check != OK)
    if m.profile:
        profile_check = _check(partial(bundle_path, args.bundle, m.profile, "profile"))
        bad += profile_check != OK
        print(f"  profile    {m.profile}" + ("" if profile_check == OK else f"  {profile_check}"))
    print(f"\n  {'engine':<14}{'precision':<10}{'serves':<11}{'FAB':>6}  {'file':<34}"
          f"{'MB':>7}  check")
    for e in m.engines:
        serves = "reference" if e.reference and not e.offsets else ",".join(
            f"{d:+d}" for d in e.offsets)
        ref = e.runnable_file
        if ref is None:
            check, name, size = "plan pending", e.onnx.path, e.onnx.bytes
        else:
            check = _check(partial(verify_file, args.bundle, ref, e.name))
            bad += check != OK
            name, size = ref.path, ref.bytes
        print(f"  {e.name:<14}{e.precision:<10}{serves:<11}{e.fab:>6.2f}  {name:<34}"
              f"{size / 1e6:>7.2f}  {check}")
        if e.note:
            print(f"  {'':<14}{e.note}")
    if b.finish_command:
        print(f"\n  TensorRT plans pending; on the device run: {b.finish_command}")
    if args.layers:
        print(f"\n  {'layer':<24}" + "".join(f"{e.name:>15}" for e in m.engines))
        for i, layer in enumerate(m.engines[0].layers):
            cells = [e.layers[i] for e in m.engines]
            print(f"  {layer.name:<24}" + "".join(
                f"{lp.precision if lp.act_bits is None else f'{lp.precision} a{lp.act_bits}':>15}"
                for lp in cells))
    return 1 if bad else 0
