"""Progress bars for long work: tqdm on a terminal, silent in logs."""

from __future__ import annotations

from typing import Any


def progress_bar(total: int, description: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="step", disable=None, dynamic_ncols=True)
