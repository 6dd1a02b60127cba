"""Fake-quantized layers: the float layer plus a per-channel weight quantizer and a per-tensor
input quantizer. They subclass the float layers, so code that inspects `nn.Conv2d` still works."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .primitives import BIAS_SPAN, MIN_SCALE, activation_params, activation_range, fake_quant, weight_range


class WeightQuantizer(nn.Module):
    """Symmetric per-output-channel quantizer (zero point 0) with a learnable log step size."""

    def __init__(self, bits: int, channels: int) -> None:
        super().__init__()
        self.bits = bits
        self.log_scale = nn.Parameter(torch.zeros(channels))

    def scale(self) -> Tensor:
        return self.log_scale.exp().clamp(min=MIN_SCALE)

    def set_scale(self, scale: Tensor) -> None:
        with torch.no_grad():
            self.log_scale.copy_(scale.clamp(min=MIN_SCALE).log())

    def min_max_scale(self, weight: Tensor) -> Tensor:
        """Per-channel max |w| / qmax: the range-from-weights scale (never 0)."""
        _, qmax = weight_range(self.bits)
        w_max = weight.detach().reshape(weight.shape[0], -1).abs().amax(dim=1)
        return torch.where(w_max > 0, w_max / qmax, torch.ones_like(w_max))

    def _channel_scale(self, weight: Tensor) -> Tensor:
        return self.scale().reshape(-1, *[1] * (weight.dim() - 1))

    def quantize(self, weight: Tensor) -> Tensor:
        """Integer values (as floats, within the narrow signed range), no gradient."""
        qmin, qmax = weight_range(self.bits)
        return torch.clamp(torch.round(weight.detach() / self._channel_scale(weight).detach()), qmin, qmax)

    def forward(self, weight: Tensor) -> Tensor:
        qmin, qmax = weight_range(self.bits)
        return fake_quant(weight, self._channel_scale(weight), 0.0, qmin, qmax)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel"


class ActivationQuantizer(nn.Module):
    """Asymmetric per-tensor quantizer: learnable log step size, integer zero point.

    `enabled = False` makes it the identity (used while observing float inputs).
    `ema_momentum` set (e.g. 0.9) makes it an observer: each forward first moves a running
    min/max towards the batch's (EMA) and sets the grid from it (the official FDDA recipe).
    `bounds` (low, high): the input is clipped to that range (ReLU6, Hardtanh; set by
    `prepare`): the step size is capped so that no grid point lies outside it. Such points
    could never be used, and onnxruntime removes the Clip, and so runs 8-bit integer kernels,
    only when the grid lies within it."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.enabled = True
        self.ema_momentum: float | None = None
        self.observed: tuple[float, float] | None = None
        self.bounds: tuple[float, float] | None = None
        self.log_scale = nn.Parameter(torch.zeros(()))
        self.register_buffer("zero_point", torch.zeros(()))

    def scale(self) -> Tensor:
        scale = self.log_scale.exp()
        if self.bounds is not None:
            low, high = self.bounds
            qmin, qmax = activation_range(self.bits)
            margin = 1 - 2.0**-20  # float32 rounding of (q - zero_point) * scale stays inside
            if high > 0:
                scale = torch.minimum(scale, margin * high / (qmax - self.zero_point).clamp(min=1))
            if low < 0:
                scale = torch.minimum(scale, margin * low / (qmin - self.zero_point).clamp(max=-1))
        return scale.clamp(min=MIN_SCALE)

    def set_params(self, scale: float, zero_point: float) -> None:
        with torch.no_grad():
            self.log_scale.fill_(math.log(max(scale, MIN_SCALE)))
            self.zero_point.fill_(zero_point)

    def observe(self, x: Tensor) -> None:
        lo, hi = x.detach().min().item(), x.detach().max().item()
        if self.observed is not None:
            m = self.ema_momentum
            lo, hi = m * self.observed[0] + (1 - m) * lo, m * self.observed[1] + (1 - m) * hi
        self.set_observed(lo, hi)

    def set_observed(self, lo: float, hi: float) -> None:
        """The observed range (lo, hi), and the grid that covers it."""
        self.observed = (lo, hi)
        self.set_params(*activation_params(lo, hi, self.bits))

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if self.ema_momentum is not None:
            self.observe(x)
        qmin, qmax = activation_range(self.bits)
        return fake_quant(x, self.scale(), self.zero_point, qmin, qmax)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_tensor"


def _quantized_bias(layer: "FakeQuantConv2d | FakeQuantLinear") -> Tensor | None:
    """The bias as the int32 values integer kernels add, at step input scale x weight scale
    (per channel; straight-through gradient to the bias). Unquantized while the input
    quantizer is off (calibration observes float inputs)."""
    if layer.bias is None or not layer.input_quant.enabled:
        return layer.bias
    scale = (layer.input_quant.scale() * layer.weight_quant.scale()).detach()
    return fake_quant(layer.bias, scale, 0.0, -BIAS_SPAN, BIAS_SPAN)


class FakeQuantConv2d(nn.Conv2d):
    """`nn.Conv2d` whose input and weight pass through fake quantizers; its bias is int32."""

    def __init__(self, *args, weight_bits: int, act_bits: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight_quant = WeightQuantizer(weight_bits, self.out_channels)
        self.input_quant = ActivationQuantizer(act_bits)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_bits: int, act_bits: int) -> "FakeQuantConv2d":
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
            weight_bits=weight_bits, act_bits=act_bits,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        new.load_state_dict(conv.state_dict(), strict=False)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.input_quant(x), self.weight_quant(self.weight), _quantized_bias(self))


class FakeQuantLinear(nn.Linear):
    """`nn.Linear` whose input and weight pass through fake quantizers; its bias is int32."""

    def __init__(self, *args, weight_bits: int, act_bits: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight_quant = WeightQuantizer(weight_bits, self.out_features)
        self.input_quant = ActivationQuantizer(act_bits)

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_bits: int, act_bits: int) -> "FakeQuantLinear":
        new = cls(
            linear.in_features, linear.out_features, linear.bias is not None,
            weight_bits=weight_bits, act_bits=act_bits,
            device=linear.weight.device, dtype=linear.weight.dtype,
        )
        new.load_state_dict(linear.state_dict(), strict=False)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(self.input_quant(x), self.weight_quant(self.weight), _quantized_bias(self))


FAKE_QUANT_TYPES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: FakeQuantConv2d,
    nn.Linear: FakeQuantLinear,
}
FAKE_QUANT_LAYERS = (FakeQuantConv2d, FakeQuantLinear)
