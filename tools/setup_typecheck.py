#!/usr/bin/env python3
"""Install TensorRT type stubs for mypy without TensorRT itself.

``tensorrt-stubs`` hard-requires the ``tensorrt`` wheel, which cannot be installed without NVIDIA's
package index, so it is installed with ``--no-deps``. Its ``tensorrt.pyi`` has two syntax slips
(parameters named ``in``; a non-default ``channel_axis`` after defaulted parameters in
``add_scale_nd``). This script copies the stub, patched, to ``typings/tensorrt/__init__.pyi``, which
``[tool.mypy] mypy_path`` points at. Idempotent; CI runs it before the tests.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import util
from pathlib import Path

STUBS_VERSION = "10.13.0.35.1"
REPO = Path(__file__).resolve().parent.parent
TARGET = REPO / "typings" / "tensorrt" / "__init__.pyi"


def _stub_source() -> Path:
    spec = util.find_spec("tensorrt_bindings")
    if spec is None or spec.submodule_search_locations is None:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps",
             f"tensorrt-stubs=={STUBS_VERSION}"],
            check=True,
        )
        spec = util.find_spec("tensorrt_bindings")
    if spec is None or spec.submodule_search_locations is None:
        raise SystemExit("tensorrt-stubs installed but tensorrt_bindings is not importable")
    return Path(next(iter(spec.submodule_search_locations))) / "tensorrt.pyi"


def patch(text: str) -> str:
    """Fix the two syntax slips of the generated stub."""
    text = re.sub(r"\bin: ", "in_: ", text)
    return text.replace(
        "power: Weights = None, channel_axis: int)", "power: Weights = None, channel_axis: int = 0)"
    )


def main() -> int:
    source = _stub_source()
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    TARGET.write_text(patch(source.read_text()))
    compile(TARGET.read_text(), str(TARGET), "exec", flags=0x400)  # PyCF_ONLY_AST: syntax check
    print(f"tensorrt stubs {STUBS_VERSION} -> {TARGET.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
