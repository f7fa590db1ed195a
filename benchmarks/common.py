"""Shared bits of the benchmark scripts: where the offline data lives, and table printing."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("ADASR_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared(relative: str) -> Path:
    path = SHARED / relative
    if not path.exists():
        raise SystemExit(f"missing shared data: {path} (set ADASR_SHARED_DATA)")
    return path


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), for the machine line of a results file."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True))
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def edsr_record(calibration: Path | None, steps: int, abits: int = 6) -> dict[str, Any]:
    """The EDSR x2 AdaBM W8A<abits> FQ record the bundle benchmarks build from: ``calibration`` when
    given, else calibrated now on ../shared/data/calibration (bicubic-downscaled x2), with
    ``adasr build``'s calibration defaults (bit-aware clipping on)."""
    if calibration is not None:
        record: dict[str, Any] = json.loads(calibration.read_text())
        return record
    from compiler.quant.calibrate import CalibrationConfig, calibrate
    from compiler.quant.qmodel import QuantSettings
    from compiler.zoo import load_model

    settings = QuantSettings(method="adabm", wbits=8, abits=abits, fq=True)
    return calibrate(load_model(shared("weights/edsr_r8f64_x2_krasserm.pt")), settings,
                     CalibrationConfig(steps=steps, downscale=2, bac="on"),  # as adasr build
                     shared("calibration/sun_hays8")).record


@dataclass(frozen=True)
class SetScore:
    """One network on one benchmark set: PSNR, mean FAB and BitOPs per image, and how many
    images (tiles, with ``tile``) ran in each runtime image class ``-1`` / ``0`` / ``1``."""

    psnr: float
    fab: float
    bitops: float
    classes: dict[str, int]


def score_network(qnet: Any, sets: dict[str, Any], scale: int,
                  tile: int | None = None) -> dict[str, SetScore]:
    """Evaluate a (simulated quantized) network on each of ``sets`` (name -> loaded images),
    whole images or ``tile``-px tiles."""
    from compiler.simulate import TorchUpscaler
    from runtime.benchmark import evaluate

    scores = {}
    for name, images in sets.items():
        up = TorchUpscaler(qnet, scale, tile=tile)
        psnr = evaluate(up, images, scale).psnr
        scores[name] = SetScore(psnr, statistics.fmean(b.fab for b in up.bits),
                                statistics.fmean(b.bitops for b in up.bits),
                                {d: sum(b.d_img[d] for b in up.bits) for d in ("-1", "0", "1")})
    return scores
