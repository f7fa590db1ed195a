"""Run a zoo network (full precision or fake-quantized) as an upscaler, measuring its bits.

``TorchUpscaler`` turns a network into the ``LR uint8 -> SR float`` callable that
``runtime.benchmark.evaluate`` scores, optionally tile by tile (``tile``: LR tile size, with the
same tiling and centre-crop stitching the device runtime uses). For a quantized network it keeps,
per image, the feature average bit-width (FAB: per patch, then over patches), the histogram of
image offsets and the BitOPs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

from compiler.quant.qmodel import QConv2d, QuantizedSR
from runtime.tiling import extract_tiles, plan_tiles, stitch

TILE_BATCH = 8


@dataclass
class ImageBits:
    fab: float
    d_img: dict[str, int]
    bitops: float  # BitOPs of this image, in units of 1e9 (MACs at 32x32 bits count as 1)


@dataclass
class _OpCounter:
    """Forward hooks that add up MACs (weighted by bits for quantized convs) of one pass."""

    bitops: float = 0.0
    handles: list[Any] = field(default_factory=list)

    def attach(self, net: nn.Module) -> None:
        inner = {id(m.conv) for m in net.modules() if isinstance(m, QConv2d)}
        for module in net.modules():
            if isinstance(module, QConv2d) or (isinstance(module, nn.Conv2d)
                                               and id(module) not in inner):
                self.handles.append(module.register_forward_hook(self._count))

    def _count(self, module: nn.Module, _inputs: Any, output: Tensor) -> None:
        conv = module.conv if isinstance(module, QConv2d) else module
        assert isinstance(conv, nn.Conv2d)
        kh, kw = conv.kernel_size
        macs = output.numel() * conv.in_channels // conv.groups * kh * kw
        if isinstance(module, QConv2d) and module.context.enabled:
            a_bits = float(module.bits(output.shape[0]).clamp(max=32).mean())
            w_bits = float(module.weight_quant.bits)
            macs = macs * (w_bits / 32) * (a_bits / 32)
        self.bitops += macs

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class TorchUpscaler:
    """``LR uint8 HxWx3 -> SR float HxWx3 in [0, 1]`` through a torch network."""

    def __init__(self, net: nn.Module, scale: int, tile: int | None = None,
                 overlap: int = 6) -> None:
        self.net = net.eval()
        self.scale = scale
        self.tile = tile
        self.overlap = overlap
        self.bits: list[ImageBits] = []

    def _run(self, batch: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.float32], list[float],
                                                          list[int]]:
        x = torch.from_numpy(np.array(batch, copy=True)).permute(0, 3, 1, 2).float() / 255.0
        with torch.no_grad():
            y = self.net(x)
        fab: list[float] = []
        d_img: list[int] = []
        if isinstance(self.net, QuantizedSR):
            fab = self.net.sample_bits().tolist()
            d_img = [int(v) for v in self.net.context.d_img.round().tolist()]
        out = y.permute(0, 2, 3, 1).clamp(0, 1).numpy()
        return out, fab, d_img

    def __call__(self, lr: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        counter = _OpCounter()
        counter.attach(self.net)
        try:
            if self.tile is None:
                out, fab, d_img = self._run(lr[None])
                sr = out[0]
            else:
                plan = plan_tiles(lr.shape[0], lr.shape[1], self.tile, self.overlap, self.scale)
                tiles = extract_tiles(lr, plan)
                parts, fab, d_img = [], [], []
                for start in range(0, len(tiles), TILE_BATCH):
                    out, f, d = self._run(tiles[start:start + TILE_BATCH])
                    parts.append(out)
                    fab += f
                    d_img += d
                sr = stitch(np.concatenate(parts), plan)
        finally:
            counter.detach()
        if fab:
            histogram = Counter(d_img)
            self.bits.append(ImageBits(
                fab=float(np.mean(fab)),
                d_img={str(k): histogram.get(k, 0) for k in (-1, 0, 1)},
                bitops=counter.bitops / 1e9,
            ))
        return sr.astype(np.float32)
