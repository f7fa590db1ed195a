"""The device's numpy statistic and the compiler's PyTorch statistic make identical decisions."""

from __future__ import annotations

import numpy as np
import torch

from compiler.quant.bitmap import complexity
from runtime.statistic import complexity_batch, image_offsets


def _tiles(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    kind = rng.integers(0, 4, size=count)
    base = rng.random((count, size, size, 3))
    flat = np.repeat(np.repeat(rng.random((count, 1, 1, 3)), size, 1), size, 2)
    ramp = np.linspace(0, 1, size)[None, :, None, None] * rng.random((count, 1, 1, 3))
    cells = -(-size // 8)
    coarse = rng.random((count, cells, cells, 3)) > 0.5
    blocks = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)[:, :size, :size]
    out = np.where(kind[:, None, None, None] == 0, base, flat)
    out = np.where(kind[:, None, None, None] == 2, ramp + 0 * out, out)
    out = np.where(kind[:, None, None, None] == 3, blocks + 0 * out, out)
    return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)


def test_identical_engine_decisions_on_10000_tiles() -> None:
    rng = np.random.default_rng(0)
    values_np, values_t = [], []
    for size in (8, 17, 32, 48, 64):
        tiles = _tiles(rng, 2000, size)
        values_np.append(complexity_batch(tiles))
        x = torch.from_numpy(tiles.astype(np.float64) / 255).permute(0, 3, 1, 2)
        values_t.append(complexity(x).numpy())
    g_np, g_t = np.concatenate(values_np), np.concatenate(values_t)
    assert g_np.shape == (10000,)
    np.testing.assert_allclose(g_np, g_t, rtol=1e-9, atol=1e-9)
    for lower, upper in np.percentile(g_np, [(10, 90), (30, 70), (5, 50)]).tolist():
        assert np.array_equal(image_offsets(g_np, lower, upper), image_offsets(g_t, lower, upper))
