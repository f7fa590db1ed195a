"""The ``adasr`` command line: a thin client of the library.

Each subcommand is a module with ``add_arguments(parser)`` and ``run(args) -> int``. The device
commands (``run``, ``inspect``: :mod:`runtime.commands`; ``profile``: :mod:`profiles.command`)
import only the runtime, so they work where adasr was installed without the compiler's extra; the
others (``compiler/commands/``) need it (torch, onnx) and say so in one line when it is missing.
Command modules import only argparse at module level, so ``adasr --help`` is instant.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

from runtime.errors import AdasrError
from runtime.outputs import INTERRUPT_SIGNALS, one_line_os_error

# name -> (module implementing it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("compiler.commands.quickstart",
                   "the embedded default job: build the default bundle, run it on the sample"),
    "eval": ("compiler.commands.eval",
             "evaluate a checkpoint (optionally quantized) on a benchmark folder"),
    "calibrate": ("compiler.commands.calibrate",
                  "calibrate an adaptive quantized network (AdaBM, DDTB, static PTQ)"),
    "targets": ("compiler.commands.targets",
                "list the device targets (the machine's own is marked)"),
    "profile": ("profiles.command",
                "measure a bundle: latency per engine, quality, adaptive vs static, plots"),
    "run": ("runtime.commands.run",
            "upscale an image, a folder of images or a video with a bundle"),
    "cluster": ("runtime.commands.cluster",
                "adasr run on a Ray cluster: many videos or image folders, chunks across workers"),
    "serve": ("runtime.commands.serve",
              "upscale images over HTTP with a Ray Serve application (per-engine batching)"),
    "build": ("compiler.commands.build",
              "calibrate, plan, lower and build the engines of a bundle for a target"),
    "inspect": ("runtime.commands.inspect",
                "print a bundle's manifest readably and verify its checksums"),
}
# Modules of the compiler's extra (`pip install 'adasr[compiler]'`), absent on a device install.
COMPILER_MODULES = ("torch", "onnx", "onnxscript")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adasr",
        description="Adaptive-bit-width quantized super-resolution.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv if argv is None or list(argv) else ["quickstart"])
    received: list[int] = []
    previous = _handle_signals(received)
    try:
        return int(args._module.run(args))
    except AdasrError as err:
        print(f"adasr {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        if err.name not in COMPILER_MODULES:
            raise
        print(f"adasr {args.command}: error: this command needs the compiler ({err.name} is not "
              "installed): pip install 'adasr[compiler]'; on a device, `adasr run`, `inspect` "
              "and `profile` work without it", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        signum = received[-1] if received else signal.SIGINT
        name = "" if signum == signal.SIGINT else f" ({signal.Signals(signum).name})"
        print(f"adasr {args.command}: interrupted{name}", file=sys.stderr)
        return 128 + signum
    except OSError as err:  # a write the command did not wrap: disk full, ulimit -f, read-only
        if err.errno not in _WRITE_ERRNOS:
            raise
        where = f" {err.filename}" if err.filename else ""
        print(f"adasr {args.command}: error: cannot write{where}: {one_line_os_error(err)}",
              file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


_WRITE_ERRNOS = {errno.EFBIG, errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT,
                 errno.EEXIST, errno.EISDIR, errno.ENOTDIR, errno.EPERM}


def _handle_signals(received: list[int]) -> dict[int, Any]:
    """SIGTERM and SIGHUP stop a command as Ctrl-C does (KeyboardInterrupt: partial output kept,
    temp files removed; the signals are appended to ``received``); SIGXFSZ (``ulimit -f``) is
    ignored so the write fails with EFBIG and is reported in one line. Returns the handlers
    replaced."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in INTERRUPT_SIGNALS:
            previous[sig] = signal.signal(sig, interrupt)
        if hasattr(signal, "SIGXFSZ"):
            previous[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return previous


if __name__ == "__main__":
    sys.exit(main())
