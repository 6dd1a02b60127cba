"""Pure fake-quantization math, bit-exact with ONNX QuantizeLinear/DequantizeLinear.

ONNX computes ``q = saturate(round_half_even(x / scale) + zero_point)`` and
``y = (q - zero_point) * scale``. The functions here *divide* by the scale exactly like the
runtime (``torch.fake_quantize_*`` multiplies by ``1/scale`` and can flip a step at ties) and
pass gradients straight through the rounding (STE), so scales and inputs stay learnable.
`fake_quant` is a custom autograd Function with those gradients written out (a few fused
kernels instead of a dozen autograd nodes per call: see `_FakeQuant` and
`benchmarks/step_cost.py`).

>>> import torch
>>> fake_quant(torch.tensor([0.5, 1.5, 2.5, -0.5]), torch.tensor(1.0), 0, -8, 7)
tensor([0., 2., 2., 0.])
>>> fake_quant(torch.tensor([100.0, -100.0]), torch.tensor(0.5), 0, -7, 7)
tensor([ 3.5000, -3.5000])
>>> weight_range(4), weight_range(8), activation_range(4)
((-8, 7), (-127, 127), (0, 15))
"""

from __future__ import annotations

import struct
from typing import Any

import torch
from torch import Tensor

# Smallest scale ever used: an all-zero weight channel or a constant activation would
# otherwise get scale 0 and divide by it (NaN). Any positive value is exact for zeros.
MIN_SCALE = 1e-8


# Biases are int32 at step input_scale * weight_scale (what integer kernels add); they saturate
# at +-2^30, a bound that float32 holds exactly (2^31 - 1 it does not).
BIAS_SPAN = 2**30


def affine_weights(bits: int) -> bool:
    """Whether weights of `bits` bits use an affine grid with a per-channel zero point (4 bits
    and fewer, stored as INT4: no runtime has an integer kernel for them, so a zero point costs
    nothing, and a 4-bit grid gains a 16th level and fits a skewed channel) rather than a
    symmetric one with zero point 0 (what 8-bit integer convolution kernels take)."""
    return bits <= 4


def weight_range(bits: int, affine: bool | None = None) -> tuple[int, int]:
    """Signed integer range of weights: every level of the type for an affine grid (-8..7 at 4
    bits; `affine` defaults to `affine_weights(bits)`); else narrow and symmetric (-127..127),
    so that ``-q`` is representable and a negative BatchNorm gamma folds by negating integers
    (an affine grid negates ``q`` to ``-1 - q`` and its zero point likewise)."""
    qmax = 2 ** (bits - 1) - 1
    return (-qmax - 1, qmax) if (affine_weights(bits) if affine is None else affine) else (-qmax, qmax)


def activation_range(bits: int) -> tuple[int, int]:
    """Unsigned range with an integer zero point."""
    return 0, 2**bits - 1


def _plain_zero_point(zero_point: Tensor | float) -> float | None:
    """`zero_point` as a Python number when that is free (a number, or a one-element CPU tensor
    without gradient), else None. `.item()` on a CPU tensor costs no device synchronisation."""
    if not isinstance(zero_point, Tensor):
        return float(zero_point)
    if zero_point.numel() == 1 and zero_point.device.type == "cpu" and not zero_point.requires_grad:
        return zero_point.item()
    return None


def _clamped_grid(
    x: Tensor, scale: Tensor, zero_point: Tensor | float, zp: float | None, qmin: int, qmax: int
) -> tuple[Tensor, float, float]:
    """``(t, lo, hi)``: a fresh tensor ``t`` of integers (as floats) clamped to ``[lo, hi]``.

    With a number zero point `zp`: ``t = clamp(round(x / scale), qmin - zp, qmax - zp)``, which
    is ``clamp(round(x / scale) + zp, qmin, qmax) - zp`` exactly (integers are exact in floating
    point) in 4 in-place kernels, ``+ 0`` turning the -0 of ``round`` into the +0 that adding
    the zero point gives. Otherwise ``t = clamp(round(x / scale) + zero_point, qmin, qmax)``."""
    if zp is not None:
        return (x / scale).round_().add_(0.0).clamp_(qmin - zp, qmax - zp), qmin - zp, qmax - zp
    return (x / scale).round_().add_(zero_point).clamp_(qmin, qmax), qmin, qmax


def _scaled_bounds(lo: float, hi: float, scale: Tensor, dtype: torch.dtype) -> tuple[float, float]:
    """``(lo * scale, hi * scale)`` rounded to `dtype` exactly as the tensor product ``q * scale``
    rounds them (`scale`: one element, on the CPU)."""
    if dtype == torch.float32 and scale.dtype == torch.float32:
        # the double product of two floats is exact, so one rounding to float gives IEEE's product
        s = scale.item()
        try:
            return struct.unpack("2f", struct.pack("2f", lo * s, hi * s))
        except OverflowError:
            pass
    return tuple(torch.tensor([lo, hi], dtype=dtype).mul_(scale).tolist())


def _reduce_to(t: Tensor, shape: torch.Size) -> Tensor:
    return t if t.shape == shape else t.sum_to_size(shape)


def _weighted_sum(a: Tensor, b: Tensor, shape: torch.Size) -> Tensor:
    """``(a * b)`` summed to `shape` (a shape that `a` and `b` broadcast from): one dot product,
    writing no product tensor, when that is a sum over everything of two same-layout tensors."""
    if a.shape == b.shape and all(n == 1 for n in shape) and a.is_contiguous() and b.is_contiguous():
        total = torch.dot(a.view(-1), b.view(-1))
        return total if len(shape) == 0 else total.view(shape)
    return (a * b).sum_to_size(shape)


# grad * (lo < t < hi) in one kernel: bounds excluded, like the gradient of torch.clamp
_gate = torch.ops.aten.hardtanh_backward.default


class _FakeQuant(torch.autograd.Function):
    """`fake_quant` with the LSQ gradients of the autograd composition
    ``(clamp(round(x / s) + zp, qmin, qmax) - zp) * s`` (`round` straight-through), computed by
    hand.

    With ``v = x / s``, ``t = clamp(round(v) + zp, qmin, qmax)``, ``q = t - zp`` and ``inside``
    = 1 where ``qmin < t < qmax`` else 0 (bounds excluded, like the gradient of `torch.clamp`
    with number bounds in this torch: an element that rounds onto a bound gets no gradient to
    x, and ``q`` to the scale):

    - dy/dx = inside,
    - dy/ds = q - inside * v (``round(v) - v`` inside the range, ``qmin - zp`` or ``qmax - zp``
      outside), so ``grad_s = sum(g * q) - sum(grad_x * x) / s``: the composition's two terms
      (its `mul` and `div` backward),
    - dy/dzp = (inside - 1) * s.

    ``t`` is clamped, so ``inside`` is ``qmin < t < qmax`` and ``grad_x`` is one fused kernel
    (`hardtanh_backward`) on the saved ``t``. With one scale on the CPU and a number zero point
    (every activation quantizer) nothing new is kept for the backward: ``y = q * s`` increases
    with ``q``, so ``inside`` is also ``qmin' * s < y < qmax' * s`` (products rounded like
    ``y``), and ``sum(g * q) = sum(g * y) / s`` up to rounding; the backward uses `x` and the
    output ``y``, which the neighbouring layers keep anyway. Forward: 5 kernels and one new
    tensor; backward: one kernel and two dot products; against the composition's 8 and ~12
    kernels (its `clamp` backward alone builds bool masks and runs `where`, 5-30x slower than
    float kernels on this CPU build) and 3 extra saved tensors. Gradients nobody asked for are
    not computed; without any (no-grad mode, or no input requiring grad) `fake_quant` does not
    use the Function at all: 5 in-place kernels on one new tensor. The output ``y`` and `x` are
    saved, so modifying either in place before the backward raises autograd's usual error.

    The result is bit-exact with the composition, signed zeros included: ``round`` gives -0 for
    ``x / s`` in [-0.5, 0) and ``+ zp`` turns that into +0, so the number zero-point path adds 0.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, zero_point: Tensor | float, qmin: int, qmax: int) -> Tensor:
        zp = _plain_zero_point(zero_point)
        t, lo, hi = _clamped_grid(x, scale, zero_point, zp, qmin, qmax)
        needs_zp = ctx.needs_input_grad[2]
        ctx.x_shape = x.shape
        ctx.zp_shape = zero_point.shape if needs_zp and isinstance(zero_point, Tensor) else None
        if not isinstance(scale, Tensor):  # a number
            ctx.scale_shape, ctx.scale_number = None, scale
            scale_saved = None
        else:
            ctx.scale_shape, ctx.scale_number = scale.shape, None
            scale_saved = scale
        if zp is not None and scale_saved is not None and scale.numel() == 1 and scale.device.type == "cpu":
            ctx.bounds = _scaled_bounds(lo, hi, scale, t.dtype)
            ctx.output_saved = True
            y = t.mul_(scale)
            ctx.save_for_backward(x, y, scale_saved)
            return y
        q = t if zp is not None else t - zero_point
        ctx.bounds = (lo, hi)
        ctx.output_saved = False
        ctx.save_for_backward(x, t, scale_saved, q)
        return q * scale

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, t, scale, *q = ctx.saved_tensors  # t: the output y, or t then q
        if scale is None:
            scale = ctx.scale_number
        needs_x, needs_scale, needs_zp = ctx.needs_input_grad[:3]
        gated = _gate(g, t, *ctx.bounds)  # g * inside
        grad_x = grad_scale = grad_zp = None
        if needs_x:
            grad_x = _reduce_to(gated, ctx.x_shape)
        if needs_scale:
            shape = ctx.scale_shape
            if ctx.output_saved:  # sum(g * y) / s = sum(g * q)
                grad_scale = (_weighted_sum(g, t, shape) - _weighted_sum(gated, x, shape)) / scale
            else:
                grad_scale = _weighted_sum(g, q[0], shape) - _weighted_sum(gated, x, shape) / scale
        if needs_zp:  # (inside - 1) * s * g
            grad_zp = _reduce_to((gated - g).mul_(scale), ctx.zp_shape)
        return grad_x, grad_scale, grad_zp, None, None


def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor | float, qmin: int, qmax: int) -> Tensor:
    """Quantize then dequantize; gradients flow to `x` inside the range and to `scale` (LSQ).

    Bit-exact with ``(clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale``
    (round half to even); the gradients are those of that expression with a straight-through
    `round` (see `_FakeQuant`)."""
    if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in (x, scale, zero_point)):
        y: Tensor = _FakeQuant.apply(x, scale, zero_point, qmin, qmax)
        return y
    zp = _plain_zero_point(zero_point)
    t, _, _ = _clamped_grid(x, scale, zero_point, zp, qmin, qmax)
    return (t if zp is not None else t.sub_(zero_point)).mul_(scale)


def mse_weight_scales(weight: Tensor, bits: int, grid: int = 100) -> Tensor:
    """Per-output-channel symmetric scales minimising the squared quantization error.

    Searches clipping ratios in (0, 1] of each channel's max |w| (vectorised over channels);
    an all-zero channel gets scale 1.0 (its integers are all 0, exactly)."""
    _, qmax = weight_range(bits, affine=False)
    w = weight.detach().reshape(weight.shape[0], -1)
    w_max = w.abs().amax(dim=1)
    best_scale = torch.ones_like(w_max)
    best_err = torch.full_like(w_max, float("inf"))
    for ratio in torch.linspace(1.0, 1.0 / grid, grid):
        scale = torch.clamp(w_max * ratio / qmax, min=MIN_SCALE)[:, None]
        err = fake_quant(w, scale, 0.0, -qmax, qmax).sub_(w).square_().sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale[:, 0], best_scale)
    return torch.where(w_max > 0, best_scale, torch.ones_like(best_scale))


def weight_grid(lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Per-channel (scale, zero point) of the affine weight grid covering [lo, hi] (0 inside);
    a channel with an empty range gets scale 1 and zero point 0."""
    qmin, qmax = weight_range(bits, affine=True)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    empty = hi <= lo
    scale = torch.where(empty, torch.ones_like(lo), (hi - lo) / (qmax - qmin)).clamp(min=MIN_SCALE)
    zero_point = torch.where(empty, torch.zeros_like(lo), torch.round(qmin - lo / scale).clamp(qmin, qmax))
    return scale, zero_point


def mse_affine_weight_grid(weight: Tensor, bits: int, grid: int = 20) -> tuple[Tensor, Tensor]:
    """Per-output-channel affine (scale, zero point) minimising the squared quantization error:
    searches `grid` x `grid` clipping ratios in (0, 1] of each channel's minimum and maximum,
    and 100 symmetric grids (zero point 0, step max|w| x ratio / qmax), vectorised over
    channels. (Without the symmetric candidates the bundled ResNet lost 0.9 points at
    calibration only: the coarser affine search missed grids the symmetric one finds.)"""
    qmin, qmax = weight_range(bits, affine=True)
    w = weight.detach().reshape(weight.shape[0], -1)
    w_min, w_max = w.amin(dim=1), w.amax(dim=1)
    best = weight_grid(w_min, w_max, bits)
    best_err = torch.full_like(w_max, float("inf"))
    ratios = torch.linspace(1.0, 1.0 / grid, grid).tolist()
    candidates = [weight_grid(w_min * a, w_max * b, bits) for a in ratios for b in ratios]
    w_abs = torch.maximum(-w_min, w_max)
    zeros = torch.zeros_like(w_max)
    candidates += [((w_abs * r / qmax).clamp(min=MIN_SCALE), zeros) for r in torch.linspace(1.0, 0.01, 100).tolist()]
    for scale, zero_point in candidates:
        err = fake_quant(w, scale[:, None], zero_point[:, None], qmin, qmax).sub_(w).square_().sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = (torch.where(better, scale, best[0]), torch.where(better, zero_point, best[1]))
    return best


def activation_params(lo: float, hi: float, bits: int) -> tuple[float, float]:
    """Scale and integer zero point of the affine grid covering [lo, hi] (0 always inside, so
    zero padding is exact). An empty range (an input that was always 0, e.g. behind a dead
    ReLU) gets the grid of [0, 1], not the smallest step: any grid holds 0 exactly, and a
    1e-8 step would turn float noise of 1e-7 into ten steps."""
    qmin, qmax = activation_range(bits)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo if hi > lo else 1.0) / (qmax - qmin), MIN_SCALE)
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
            err = fake_quant(x, torch.tensor(scale), zero_point, qmin, qmax).sub_(x).square_().mean().item()
            if err < best_err:
                best, best_err = (scale, zero_point), err
    return best
