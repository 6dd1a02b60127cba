import doctest
import math

import pytest
import torch

from fddaq.quant import primitives
from fddaq.quant.primitives import (
    MIN_SCALE,
    activation_params,
    activation_range,
    fake_quant,
    mse_activation_params,
    mse_affine_weight_grid,
    mse_weight_scales,
    weight_grid,
    weight_range,
)


def test_the_module_examples_hold():
    result = doctest.testmod(primitives)
    assert result.attempted >= 3 and result.failed == 0


def test_ranges():
    assert weight_range(2) == (-2, 1)  # affine grids: every level of the signed type
    assert weight_range(4) == (-8, 7)
    assert weight_range(8) == (-127, 127)  # symmetric, narrow: what integer kernels take
    assert activation_range(2) == (0, 3)
    assert activation_range(8) == (0, 255)


def test_rounds_half_to_even_like_quantize_linear():
    x = torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5])
    q = fake_quant(x, torch.tensor(1.0), 0.0, -8, 7)
    assert q.tolist() == [0.0, 2.0, 2.0, 4.0, -0.0, -2.0, -2.0]


def test_divides_by_scale_not_multiplies_by_reciprocal():
    # float32: x / 0.1 rounds to -152 (what QuantizeLinear gives), x * (1 / 0.1) to -153
    x = torch.tensor([-15.250000953674316])
    scale = torch.tensor(0.1)
    assert torch.round(x * (1 / scale)).item() == -153.0
    assert fake_quant(x, scale, 0.0, -255, 255).item() == (torch.tensor(-152.0) * scale).item()


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
    assert scale == pytest.approx(3.0 / 255) and zp == 85.0  # 0 - (-1) / (3 / 255)
    assert fake_quant(torch.tensor([0.0]), torch.tensor(scale), torch.tensor(zp), 0, 255).item() == 0.0


def test_constant_activation_never_gives_zero_scale():
    scale, zp = mse_activation_params(torch.zeros(100), 4)
    assert scale >= MIN_SCALE and math.isfinite(scale)
    # an input that was always 0 gets the grid of [0, 1]: float noise stays at code 0
    assert (scale, zp) == (1.0 / 15, 0.0) == activation_params(0.0, 0.0, 4)


def test_mse_activation_clips_outliers_and_keeps_relu_zero_point():
    torch.manual_seed(0)
    x = torch.rand(10000).pow(3) * 4
    x[0] = 40.0
    scale, zp = mse_activation_params(x, 4)
    assert zp == 0.0
    assert scale * 15 < 40.0  # clipped the outlier


# --- the custom autograd Function against the plain autograd composition --------------------


def reference_fake_quant(x, scale, zero_point, qmin, qmax):
    """The definition: divide, round half to even with a straight-through gradient, add the
    zero point, clamp, dequantize; every gradient left to autograd."""
    v = x / scale
    return (torch.clamp(v + (torch.round(v) - v).detach() + zero_point, qmin, qmax) - zero_point) * scale


def grid_values(scale: torch.Tensor, zero_point: float, qmin: int, qmax: int, n: int, seed: int) -> torch.Tensor:
    """Random values over and beyond the grid, plus, per scale, every tie k + 0.5, values that
    land exactly on the bounds, round onto them, or just miss them, and tiny negatives that
    round to -0 (exactly so when the scale is a power of two)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = qmin - zero_point, qmax - zero_point
    special = torch.tensor(
        [k + 0.5 for k in range(int(lo) - 2, int(hi) + 2)]
        + [lo, hi, lo - 0.25, hi + 0.25, lo - 0.5, hi + 0.5, lo - 1, hi + 1, lo + 0.75, hi - 0.75]
        + [-0.25, -0.5, 0.0, 1e6, -1e6]
    )
    spread = (torch.rand(n, generator=g) * 1.6 - 0.3) * (hi - lo) + lo
    units = torch.cat([special, spread])
    return units * scale.reshape(-1, *[1] * (scale.dim() - 1)) if scale.dim() else units * scale


def run_both(x, scale, zero_point, qmin, qmax, grad_seed=0, x_grad=True):
    """(y, x.grad, scale.grad, zero_point.grad) of fake_quant and of the reference."""
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(grad_seed))
    results = []
    for fn in (fake_quant, reference_fake_quant):
        xi = x.detach().clone().requires_grad_(x_grad)
        si = scale.detach().clone().requires_grad_(True)
        zi = zero_point
        if isinstance(zero_point, torch.Tensor) and zero_point.requires_grad:
            zi = zero_point.detach().clone().requires_grad_(True)
        y = fn(xi, si, zi, qmin, qmax)
        y.backward(g)
        zgrad = zi.grad if isinstance(zi, torch.Tensor) else None
        results.append((y.detach(), xi.grad, si.grad, zgrad, g))
    return results


def assert_same(ours, ref, x, scale):
    y, gx, gs, gz, g = ours
    y_ref, gx_ref, gs_ref, gz_ref, _ = ref
    # forward: bit-exact, signed zeros included
    assert torch.equal(y, y_ref)
    assert torch.equal(torch.signbit(y), torch.signbit(y_ref))
    # dL/dx: the same elements pass (ours is g exactly, the reference (g * s) / s)
    if gx_ref is None:
        assert gx is None
    else:
        assert torch.equal(gx == 0, gx_ref == 0)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-6, atol=0)
    # dL/ds: sums over many elements with cancellation (the reference has it too); compare
    # within float32 rounding of the magnitude of the summed terms
    magnitude = (g.abs() * ((x / scale).abs() + y.abs() / scale)).sum_to_size(scale.shape)
    assert gs.shape == scale.shape
    assert torch.all((gs - gs_ref).abs() <= 1e-6 * magnitude + 1e-6), (gs, gs_ref)
    if gz_ref is not None:
        torch.testing.assert_close(gz, gz_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "zero_point, qmin, qmax",
    [
        (torch.tensor(3.0), 0, 15), (torch.tensor(0.0), 0, 15), (0.0, -7, 7), (0, -127, 127),
        (1.0, 0, 3), (0.0, -1, 1),
    ],
)
@pytest.mark.parametrize("scale_value", [0.25, 2.0**-7, 0.1, 0.013])
def test_fake_quant_per_tensor_matches_reference(zero_point, qmin, qmax, scale_value):
    scale = torch.tensor(scale_value)
    zp = float(zero_point)
    x = grid_values(scale, zp, qmin, qmax, 1000, seed=1)[:1000].reshape(10, 100)
    ours, ref = run_both(x, scale, zero_point, qmin, qmax)
    assert_same(ours, ref, x, scale)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fake_quant_per_channel_conv_and_linear_weights_match_reference(bits):
    qmin, qmax = weight_range(bits)
    conv_scale = torch.tensor([0.5, 0.25, 2.0**-6, 0.07, 1.0, 0.0123]).reshape(-1, 1, 1, 1)
    units = grid_values(torch.tensor(1.0), 0.0, qmin, qmax, 6 * 4 * 9, seed=2)
    w = units[torch.randperm(len(units), generator=torch.Generator().manual_seed(3))[: 6 * 4 * 9]]
    w = w.reshape(6, 4, 3, 3) * conv_scale
    ours, ref = run_both(w, conv_scale, 0.0, qmin, qmax)
    assert_same(ours, ref, w, conv_scale)

    linear_scale = conv_scale.reshape(-1, 1)
    w = w.reshape(6, -1)
    ours, ref = run_both(w, linear_scale, 0.0, qmin, qmax, grad_seed=4)
    assert_same(ours, ref, w, linear_scale)


def test_fake_quant_large_activation_and_layouts_match_reference():
    torch.manual_seed(5)
    x = torch.randn(8, 16, 12, 12).relu() * 3
    scale = torch.tensor(0.21)
    ours, ref = run_both(x, scale, torch.tensor(0.0), 0, 15)
    assert_same(ours, ref, x, scale)
    # channels-last input and a scale of shape (1, 1, 1, 1)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    ours, ref = run_both(x_cl, scale.reshape(1, 1, 1, 1), 2.0, 0, 15)
    assert_same(ours, ref, x_cl, scale.reshape(1, 1, 1, 1))


def test_fake_quant_input_without_gradient_still_trains_the_scale():
    x = grid_values(torch.tensor(0.5), 0.0, 0, 255, 500, seed=6)
    ours, ref = run_both(x, torch.tensor(0.5), torch.tensor(0.0), 0, 255, x_grad=False)
    assert ours[1] is None and ref[1] is None
    assert_same(ours, ref, x, torch.tensor(0.5))


def test_fake_quant_zero_point_tensor_per_channel_and_learnable():
    scale = torch.tensor([[0.5], [0.125], [0.3]])
    zero_point = torch.tensor([[0.0], [3.0], [8.0]], requires_grad=True)
    x = torch.cat([grid_values(s, z, 0, 15, 60, seed=7)[None] for s, z in zip(scale, zero_point.detach())])
    ours, ref = run_both(x, scale, zero_point, 0, 15)
    assert ours[3] is not None and ours[3].shape == zero_point.shape
    assert_same(ours, ref, x, scale)


def test_fake_quant_upstream_gradient_of_a_sum_and_a_chain():
    x = torch.linspace(-3, 3, 101, requires_grad=True)
    s = torch.tensor(0.25, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    s_ref = s.detach().clone().requires_grad_()
    fake_quant(fake_quant(x, s, 0.0, -7, 7) * 1.3, s, 0.0, -7, 7).sum().backward()  # expanded gradient
    reference_fake_quant(reference_fake_quant(x_ref, s_ref, 0.0, -7, 7) * 1.3, s_ref, 0.0, -7, 7).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-5, atol=1e-5)


def test_fake_quant_without_gradients_is_the_same_bits():
    scale = torch.tensor([0.5, 2.0**-6, 0.07]).reshape(-1, 1)
    x = torch.cat([grid_values(s, 0.0, -7, 7, 100, seed=8)[None] for s in scale])
    with torch.no_grad():
        y = fake_quant(x, scale, 0.0, -7, 7)
    y_ref = reference_fake_quant(x, scale, 0.0, -7, 7)
    assert torch.equal(y, y_ref) and torch.equal(torch.signbit(y), torch.signbit(y_ref))
    x_act = grid_values(torch.tensor(0.1), 3.0, 0, 15, 300, seed=9)
    y = fake_quant(x_act, torch.tensor(0.1), torch.tensor(3.0), 0, 15)  # nothing requires grad
    y_ref = reference_fake_quant(x_act, torch.tensor(0.1), torch.tensor(3.0), 0, 15)
    assert torch.equal(y, y_ref) and torch.equal(torch.signbit(y), torch.signbit(y_ref))
    assert not y.requires_grad
    learnable = torch.tensor(0.1, requires_grad=True)
    with torch.no_grad():  # evaluation of a model with learnable scales
        y = fake_quant(x_act.requires_grad_(), learnable, torch.tensor(3.0), 0, 15)
    assert not y.requires_grad and torch.equal(y, y_ref) and torch.equal(torch.signbit(y), torch.signbit(y_ref))


def test_fake_quant_does_not_modify_its_inputs():
    x = torch.randn(50)
    s = torch.tensor(0.3, requires_grad=True)
    x_before = x.clone()
    fake_quant(x, s, torch.tensor(2.0), 0, 15).sum().backward()
    assert torch.equal(x, x_before) and s.item() == pytest.approx(0.3)


# --- the range searches find the grid that minimises the error --------------------------------


def weight_error(w: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    return (reference_fake_quant(w, scale[:, None], 0.0, -qmax, qmax) - w).pow(2).sum(dim=1)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_mse_weight_scales_recover_an_exact_grid_and_beat_other_clips(bits):
    torch.manual_seed(bits)
    _, qmax = weight_range(bits, affine=False)
    steps = torch.rand(12) + 0.1
    w = torch.randint(-qmax, qmax + 1, (12, 45)).float() * steps[:, None]  # every channel on a grid
    w[:, 0] = qmax * steps  # that its max |w| spans
    w[3] = 0.0
    found = mse_weight_scales(w, bits)
    assert found[3] == 1.0  # an all-zero channel: any step is exact
    assert torch.allclose(found, torch.where(w.abs().amax(1) > 0, steps, torch.ones(12)), rtol=1e-6)
    noisy = torch.randn(12, 45) * torch.rand(12, 1)
    noisy[4, 0] = 9.0  # an outlier: clipping it pays
    found = weight_error(noisy, mse_weight_scales(noisy, bits), qmax)
    for ratio in torch.rand(50).tolist():  # clips between the search's grid points do a little better at most
        assert (found <= weight_error(noisy, noisy.abs().amax(1) * max(ratio, 0.01) / qmax, qmax) * 1.15).all()


@pytest.mark.parametrize("kind", ["relu", "signed", "negative"])
def test_mse_activation_params_beat_the_full_range_and_other_clips(kind):
    torch.manual_seed(11)
    x = torch.randn(4000)
    x = {"relu": x.relu() ** 2, "signed": x, "negative": -x.abs() - 0.1}[kind]
    qmin, qmax = activation_range(4)

    def error(params: tuple[float, float]) -> float:
        return (reference_fake_quant(x, torch.tensor(params[0]), params[1], qmin, qmax) - x).pow(2).mean().item()

    found = error(mse_activation_params(x, 4, 8))
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    assert found < error(activation_params(lo, hi, 4))
    for a, b in torch.rand(30, 2).tolist():  # clips between the search's grid points do a little better at most
        assert found <= error(activation_params(lo * max(a, 0.05), hi * max(b, 0.05), 4)) * 1.15


def test_affine_weight_grid_fits_a_skewed_channel_better_than_a_symmetric_one():
    torch.manual_seed(0)
    w = torch.rand(6, 27) * torch.linspace(0.1, 2.0, 6)[:, None]  # all positive: half a symmetric grid unused
    w[1] -= 0.3
    w[5] = 0.0
    scale, zero_point = mse_affine_weight_grid(w, 4)
    assert scale[5] == 1.0 and zero_point[5] == 0.0  # an all-zero channel: exact
    assert (zero_point == zero_point.round()).all() and (zero_point >= -8).all() and (zero_point <= 7).all()
    affine = fake_quant(w, scale[:, None], zero_point[:, None], -8, 7)
    assert torch.equal(affine[5], w[5])
    symmetric = fake_quant(w, mse_symmetric(w), 0.0, -7, 7)
    assert ((affine - w).square().sum(1)[:5] < (symmetric - w).square().sum(1)[:5]).all()


def mse_symmetric(w):
    """The best of 100 symmetric 15-level grids per channel (4-bit weights before the affine grid)."""
    best, best_err = None, None
    for ratio in torch.linspace(1.0, 0.01, 100):
        scale = (w.abs().amax(1, keepdim=True) * ratio / 7).clamp(min=1e-8)
        err = (fake_quant(w, scale, 0.0, -7, 7) - w).square().sum(1, keepdim=True)
        best = scale if best is None else torch.where(err < best_err, scale, best)
        best_err = err if best_err is None else torch.minimum(err, best_err)
    return best


def test_weight_grid_covers_the_range_with_zero_inside():
    scale, zero_point = weight_grid(torch.tensor([-1.0, 0.5, 0.0]), torch.tensor([0.5, 3.0, 0.0]), 4)
    assert scale[0].item() == pytest.approx(1.5 / 15) and zero_point[0].item() == round(-8 + 1.0 / (1.5 / 15))
    assert scale[1].item() == pytest.approx(3.0 / 15) and zero_point[1].item() == -8  # lo clamps to 0
    assert scale[2].item() == 1.0 and zero_point[2].item() == 0.0
