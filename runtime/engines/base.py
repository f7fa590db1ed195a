"""The engine protocol: ``activate / infer / deactivate`` with checked state (Polygraphy style).

An engine turns a batch of LR tiles into SR tiles: ``infer`` takes an ``N x 3 x H x W`` float32
array in [0, 1] (C-contiguous) and returns ``N x 3 x sH x sW`` float32 (not clipped; the caller
rounds to uint8). Nothing touches a device or loads a session before ``activate``; ``deactivate``
frees it. Subclasses implement the ``_impl`` methods only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType

import numpy as np
import numpy.typing as npt

from runtime.errors import EngineError

Batch = npt.NDArray[np.float32]


class Engine(ABC):
    """One runnable engine of a bundle (see the module docstring for the array contract)."""

    def __init__(self, name: str, scale: int, tile: int | None = None) -> None:
        self.name = name
        self.scale = scale
        self.tile = tile  # static input edge (None: any H x W)
        self._active = False

    @property
    def is_active(self) -> bool:
        return self._active

    def activate(self) -> None:
        if self._active:
            raise EngineError(f"engine {self.name!r} is already active")
        self._activate_impl()
        self._active = True

    def deactivate(self) -> None:
        if not self._active:
            raise EngineError(f"engine {self.name!r} is not active")
        try:
            self._deactivate_impl()
        finally:
            self._active = False

    def infer(self, batch: Batch) -> Batch:
        if not self._active:
            raise EngineError(f"engine {self.name!r} is not active: call activate() first")
        if batch.ndim != 4 or batch.shape[1] != 3 or batch.dtype != np.float32:
            raise EngineError(f"engine {self.name!r} takes N x 3 x H x W float32, got "
                              f"{batch.shape} {batch.dtype}")
        if self.tile is not None and batch.shape[2:] != (self.tile, self.tile):
            raise EngineError(f"engine {self.name!r} is built for {self.tile} x {self.tile} "
                              f"tiles, got {batch.shape[2]} x {batch.shape[3]}")
        out = self._infer_impl(np.ascontiguousarray(batch))
        n, _, h, w = batch.shape
        expected = (n, 3, h * self.scale, w * self.scale)
        if out.shape != expected:
            raise EngineError(f"engine {self.name!r} returned {out.shape}, expected {expected}")
        return out

    def __enter__(self) -> Engine:
        self.activate()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._active:
            self.deactivate()

    @abstractmethod
    def _activate_impl(self) -> None: ...

    @abstractmethod
    def _infer_impl(self, batch: Batch) -> Batch: ...

    @abstractmethod
    def _deactivate_impl(self) -> None: ...
