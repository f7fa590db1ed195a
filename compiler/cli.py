"""The ``adasr`` command line: a thin client of the library.

Each subcommand lives in ``compiler/commands/<name>.py`` with ``add_arguments(parser)`` and
``run(args) -> int``. Command modules import only argparse at module level, so ``adasr --help``
is instant and ``adasr run`` works on a device without torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from runtime.errors import AdasrError

# name -> one-line help. The module compiler.commands.<name with - as _> implements it.
COMMANDS: dict[str, str] = {
    "quickstart": "the embedded default job: build the default bundle, run it on the sample",
    "eval": "evaluate a checkpoint (optionally quantized) on a benchmark folder",
    "calibrate": "calibrate an adaptive quantized network (AdaBM, DDTB, static PTQ)",
    "targets": "list the device targets (the machine's own is marked)",
    "profile": "measure a bundle: latency per engine, quality, adaptive vs static, plots",
    "run": "upscale an image, a folder of images or a video with a bundle",
    "cluster": "adasr run on a Ray cluster: many videos or image folders, chunks across workers",
    "serve": "upscale images over HTTP with a Ray Serve application (per-engine batching)",
    "build": "calibrate, plan, lower and build the engines of a bundle for a target",
    "inspect": "print a bundle's manifest readably and verify its checksums",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adasr",
        description="Adaptive-bit-width quantized super-resolution.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"compiler.commands.{name.replace('-', '_')}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv if argv is None or list(argv) else ["quickstart"])
    try:
        return int(args._module.run(args))
    except AdasrError as err:
        print(f"adasr {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"adasr {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
