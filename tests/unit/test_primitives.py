import math

import pytest
import torch

from fddaq.quant.primitives import (
    MIN_SCALE,
    activation_params,
    activation_range,
    fake_quant,
    mse_activation_params,
    mse_weight_scales,
    quantize,
    weight_range,
)


def test_ranges():
    assert weight_range(2) == (-1, 1)
    assert weight_range(4) == (-7, 7)
    assert weight_range(8) == (-127, 127)
    assert activation_range(2) == (0, 3)
    assert activation_range(8) == (0, 255)


def test_rounds_half_to_even_like_quantize_linear():
    x = torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5])
    q = quantize(x, torch.tensor(1.0), 0.0, -8, 7)
    assert q.tolist() == [0.0, 2.0, 2.0, 4.0, -0.0, -2.0, -2.0]


def test_divides_by_scale_not_multiplies_by_reciprocal():
    # float32: x / 0.1 rounds to -152 (what QuantizeLinear gives), x * (1 / 0.1) to -153
    x = torch.tensor([-15.250000953674316])
    scale = torch.tensor(0.1)
    assert torch.round(x * (1 / scale)).item() == -153.0
    assert quantize(x, scale, 0.0, -255, 255).item() == -152.0


def test_saturates_to_range_with_zero_point():
    x = torch.tensor([-10.0, 0.0, 0.25, 10.0])
    y = fake_quant(x, torch.tensor(0.5), torch.tensor(3.0), 0, 15)
    # grid: (q - 3) * 0.5 for q in 0..15 -> [-1.5, 6.0]
    assert y.tolist() == [-1.5, 0.0, 0.0, 6.0]


def test_gradients_straight_through_inside_range_and_to_scale():
    x = torch.tensor([0.3, 5.0], requires_grad=True)
    scale = torch.tensor(1.0, requires_grad=True)
    fake_quant(x, scale, 0.0, -1, 1).sum().backward()
    assert x.grad.tolist() == [1.0, 0.0]  # clipped element gets no gradient
    # LSQ gradient: round(x/s) - x/s inside the range, qmax outside
    assert scale.grad.item() == pytest.approx((0.0 - 0.3) + 1.0)


def test_weight_scales_per_channel_and_zero_channel_is_safe():
    w = torch.zeros(3, 2, 3, 3)
    w[0] = 1.0
    w[1] = torch.linspace(-2, 2, 18).reshape(2, 3, 3)
    scales = mse_weight_scales(w, 4)
    assert scales[2] == 1.0  # all-zero channel: positive scale, integers all 0
    assert scales[0] == pytest.approx(1.0 / 7)  # constant channel: exact at full range
    assert torch.all(scales > 0)
    y = fake_quant(w, scales.reshape(-1, 1, 1, 1), 0.0, -7, 7)
    assert torch.isfinite(y).all() and torch.equal(y[2], w[2])


def test_mse_scale_beats_min_max_on_heavy_tails():
    torch.manual_seed(0)
    w = torch.randn(4, 256)
    w[:, 0] = 12.0  # one outlier per channel
    mse = mse_weight_scales(w, 4)
    minmax = w.abs().amax(1) / 7
    err = lambda s: (fake_quant(w, s[:, None], 0.0, -7, 7) - w).pow(2).sum()
    assert err(mse) < err(minmax)


def test_activation_params_cover_zero_and_use_integer_zero_point():
    scale, zp = activation_params(0.5, 3.0, 4)  # lo clamps to 0
    assert zp == 0.0 and scale == pytest.approx(3.0 / 15)
    scale, zp = activation_params(-1.0, 2.0, 8)
    assert zp == round(1.0 / scale) and zp == int(zp)
    assert fake_quant(torch.tensor([0.0]), torch.tensor(scale), torch.tensor(zp), 0, 255).item() == 0.0


def test_constant_activation_never_gives_zero_scale():
    scale, zp = mse_activation_params(torch.zeros(100), 4)
    assert scale >= MIN_SCALE and math.isfinite(scale)


def test_mse_activation_clips_outliers_and_keeps_relu_zero_point():
    torch.manual_seed(0)
    x = torch.rand(10000).pow(3) * 4
    x[0] = 40.0
    scale, zp = mse_activation_params(x, 4)
    assert zp == 0.0
    assert scale * 15 < 40.0  # clipped the outlier
