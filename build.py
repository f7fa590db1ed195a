#!/usr/bin/env python3
"""Thin wrapper over the ``adasr`` CLI: ``python build.py ARGS`` == ``adasr ARGS``.

With no arguments it runs the embedded default job (``adasr quickstart``).

Kept as a script (not installed as a module: it would shadow PyPA's ``build``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compiler.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
