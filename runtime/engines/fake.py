"""A fake engine for tests and CI: nearest-neighbour upscaling, optionally offset or delayed.

With ``gain = 1`` and ``bias = 0`` it is identity-like: every SR pixel equals its LR pixel, so a
tiled, stitched frame must equal ``np.repeat`` of the input exactly. It records the batch shapes
it was called with, for asserting grouping and batching.
"""

from __future__ import annotations

import time

import numpy as np

from runtime.engines.base import Batch, Engine


class FakeEngine(Engine):
    def __init__(self, name: str, scale: int, tile: int | None = None, *, bias: float = 0.0,
                 gain: float = 1.0, delay_s: float = 0.0) -> None:
        super().__init__(name, scale, tile)
        self.bias, self.gain, self.delay_s = bias, gain, delay_s
        self.calls: list[tuple[int, ...]] = []

    def _activate_impl(self) -> None:
        self.calls = []

    def _infer_impl(self, batch: Batch) -> Batch:
        self.calls.append(batch.shape)
        if self.delay_s:
            time.sleep(self.delay_s * batch.shape[0])
        up = batch.repeat(self.scale, axis=2).repeat(self.scale, axis=3)
        return (up * np.float32(self.gain) + np.float32(self.bias)).astype(np.float32)

    def _deactivate_impl(self) -> None:
        pass
