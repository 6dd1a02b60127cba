"""Pure fake-quantization math, bit-exact with ONNX QuantizeLinear/DequantizeLinear.

ONNX computes ``q = saturate(round_half_even(x / scale) + zero_point)`` and
``y = (q - zero_point) * scale``. The functions here *divide* by the scale exactly like the
runtime (``torch.fake_quantize_*`` multiplies by ``1/scale`` and can flip a step at ties) and
pass gradients straight through the rounding (STE), so scales and inputs stay learnable.

>>> import torch
>>> fake_quant(torch.tensor([0.5, 1.5, 2.5, -0.5]), torch.tensor(1.0), 0, -8, 7)
tensor([0., 2., 2., 0.])
>>> fake_quant(torch.tensor([100.0, -100.0]), torch.tensor(0.5), 0, -7, 7)
tensor([ 3.5000, -3.5000])
>>> weight_range(4), activation_range(4)
((-7, 7), (0, 15))
"""

from __future__ import annotations

import torch
from torch import Tensor

# Smallest scale ever used: an all-zero weight channel or a constant activation would
# otherwise get scale 0 and divide by it (NaN). Any positive value is exact for zeros.
MIN_SCALE = 1e-8


def weight_range(bits: int) -> tuple[int, int]:
    """Signed, symmetric, narrow range: zero point 0 and ``-q`` always representable, so a
    negative BatchNorm gamma can be folded by negating integers."""
    qmax = 2 ** (bits - 1) - 1
    return -qmax, qmax


def activation_range(bits: int) -> tuple[int, int]:
    """Unsigned range with an integer zero point."""
    return 0, 2**bits - 1


def round_ste(x: Tensor) -> Tensor:
    """Round half to even in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor | float, qmin: int, qmax: int) -> Tensor:
    """Integer grid values (as floats) exactly as QuantizeLinear computes them."""
    return torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)


def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor | float, qmin: int, qmax: int) -> Tensor:
    """Quantize then dequantize; gradients flow to `x` inside the range and to `scale` (LSQ)."""
    return (quantize(x, scale, zero_point, qmin, qmax) - zero_point) * scale


def mse_weight_scales(weight: Tensor, bits: int, grid: int = 100) -> Tensor:
    """Per-output-channel symmetric scales minimising the squared quantization error.

    Searches clipping ratios in (0, 1] of each channel's max |w| (vectorised over channels);
    an all-zero channel gets scale 1.0 (its integers are all 0, exactly)."""
    _, qmax = weight_range(bits)
    w = weight.detach().reshape(weight.shape[0], -1)
    w_max = w.abs().amax(dim=1)
    best_scale = torch.ones_like(w_max)
    best_err = torch.full_like(w_max, float("inf"))
    for ratio in torch.linspace(1.0, 1.0 / grid, grid):
        scale = torch.clamp(w_max * ratio / qmax, min=MIN_SCALE)[:, None]
        err = (fake_quant(w, scale, 0.0, -qmax, qmax) - w).pow(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale[:, 0], best_scale)
    return torch.where(w_max > 0, best_scale, torch.ones_like(best_scale))


def activation_params(lo: float, hi: float, bits: int) -> tuple[float, float]:
    """Scale and integer zero point of the affine grid covering [lo, hi] (0 always inside, so
    zero padding is exact)."""
    qmin, qmax = activation_range(bits)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / (qmax - qmin), MIN_SCALE)
    zero_point = float(min(max(round(qmin - lo / scale), qmin), qmax))
    return scale, zero_point


def mse_activation_params(samples: Tensor, bits: int, grid: int = 24) -> tuple[float, float]:
    """Per-tensor (scale, zero_point) minimising the squared error on `samples`.

    Searches a grid of clipping ratios for the negative and the positive side jointly
    (only the positive side when all samples are non-negative, as after a ReLU)."""
    x = samples.detach().flatten().float()
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    if hi - lo <= 0:
        return activation_params(0.0, 0.0, bits)
    qmin, qmax = activation_range(bits)
    ratios = torch.linspace(1.0, 1.0 / grid, grid).tolist()
    lo_ratios = ratios if lo < 0 else [1.0]
    hi_ratios = ratios if hi > 0 else [1.0]
    best, best_err = activation_params(lo, hi, bits), float("inf")
    for a in lo_ratios:
        for b in hi_ratios:
            scale, zero_point = activation_params(lo * a, hi * b, bits)
            err = (fake_quant(x, torch.tensor(scale), zero_point, qmin, qmax) - x).pow(2).mean().item()
            if err < best_err:
                best, best_err = (scale, zero_point), err
    return best
