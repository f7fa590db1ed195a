"""Shared fixtures: the offline data beside the checkout (../shared/data).

Tests that need a data file ask for it through ``shared_file``. When the file is missing the test
is skipped on a developer machine but fails loudly when ``CI`` is set, so CI never passes by
skipping.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("ADASR_SHARED_DATA", REPO.parent / "shared" / "data"))


def require_shared(relative: str) -> Path:
    """Path of a file or folder under ../shared/data; skip (dev) or fail (CI) when missing."""
    path = SHARED_DATA / relative
    if not path.exists():
        message = f"shared data missing: {path} (set ADASR_SHARED_DATA or check out ../shared)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def shared_file() -> Callable[[str], Path]:
    return require_shared
