"""Fake-quantizers and bit mapping: grids, pass-through above 8 bits, STE gradients."""

from __future__ import annotations

import torch

from compiler.quant.bitmap import ImageToBit, LayerToBit, complexity
from compiler.quant.quantizers import (
    ActQuantizer,
    quantize_asymmetric,
    quantize_weight,
    search_weight_clip,
)


def test_asymmetric_grid_has_at_most_2_pow_b_levels_and_keeps_zero() -> None:
    x = torch.linspace(-3, 7, 10001)
    for bits in (2, 4, 6, 8):
        q = quantize_asymmetric(x, torch.tensor(-1.3), torch.tensor(5.1), torch.tensor(float(bits)))
        assert q.unique().numel() <= 2**bits
        assert q.unique().numel() >= 2**bits - 1
        assert 0.0 in q.unique().tolist()  # zero-anchored: zero padding stays exact
        assert float(q.min()) >= -1.3 - 1e-6 - 6.4 / (2**bits - 1)


def test_bits_vary_per_sample_and_above_8_pass_through() -> None:
    x = torch.randn(3, 4, 5, 5)
    bits = torch.tensor([2.0, 8.0, 9.0])
    q = quantize_asymmetric(x, torch.tensor(-2.0), torch.tensor(2.0), bits)
    assert q[0].unique().numel() <= 4
    assert q[1].unique().numel() <= 256
    assert torch.equal(q[2], x[2])


def test_weight_grid_is_symmetric_int_levels() -> None:
    w = torch.randn(16, 8, 3, 3)
    clip = search_weight_clip(w, 4, per_channel=False)
    q = quantize_weight(w, clip, 4)
    steps = (q / (clip / 7)).round()
    assert steps.abs().max() <= 7
    assert torch.allclose(steps * clip / 7, q, atol=1e-6)
    mse_searched = (q - w).pow(2).mean()
    mse_max = (quantize_weight(w, w.abs().max(), 4) - w).pow(2).mean()
    assert mse_searched <= mse_max


def test_per_channel_clip_has_one_value_per_output_channel() -> None:
    w = torch.randn(16, 8, 3, 3) * torch.linspace(0.1, 3, 16).view(16, 1, 1, 1)
    clip = search_weight_clip(w, 8, per_channel=True)
    assert clip.shape == (16,)
    per_tensor = quantize_weight(w, search_weight_clip(w, 4, False), 4)
    per_channel = quantize_weight(w, search_weight_clip(w, 4, True), 4)
    assert (per_channel - w).pow(2).mean() < (per_tensor - w).pow(2).mean()


def test_activation_bounds_get_gradients_through_ste() -> None:
    aq = ActQuantizer()
    aq.set_bounds(-1.0, 1.0)
    x = torch.randn(2, 4, 8, 8) * 2
    aq(x, torch.tensor([4.0, 4.0])).sum().backward()
    assert aq.lower.grad is not None and aq.upper.grad is not None
    assert float(aq.lower.grad) != 0.0 and float(aq.upper.grad) != 0.0


def test_image_to_bit_is_hard_forward_and_differentiable() -> None:
    itb = ImageToBit()
    itb.init_from(torch.linspace(0, 100, 101))
    assert abs(itb.lower.item() - 10) < 1e-4 and abs(itb.upper.item() - 90) < 1e-4
    g = torch.tensor([5.0, 50.0, 95.0])
    d = itb(g)
    assert d.tolist() == [-1.0, 0.0, 1.0]
    d.sum().backward()
    assert itb.lower.grad is not None and float(itb.lower.grad.abs()) > 0


def test_layer_to_bit_init_percentiles() -> None:
    ltb = LayerToBit(10)
    ltb.init_from(torch.arange(10.0))
    assert ltb.hard() == [-1, -1, -1, 0, 0, 0, 0, 1, 1, 1]


def test_complexity_flat_and_edge() -> None:
    flat = torch.full((1, 3, 16, 16), 0.5)
    assert float(complexity(flat)) == 0.0
    edge = torch.zeros(1, 3, 16, 16)
    edge[..., 8:] = 1.0
    # |Sobel_x| = (1 + 2 + 1) / 8 = 0.5 on the two columns beside the step, 0 elsewhere and in y:
    # mean over 2*H*W values = 0.5 * 2 * 16 / (2 * 256); times 1000.
    expected = 1000 * 0.5 * 2 * 16 / (2 * 256)
    assert abs(float(complexity(edge)) - expected) < 1e-3
