"""Empirical bias correction: each layer's mean output error, removed through its bias.

Rounding a layer's weights (and its input) to a coarse grid shifts the mean of its outputs, per
output channel: ``E[W_q Q(x) + b] != E[W x + b]``. With a few weights per channel (a depthwise
3x3 has 9) the shift does not average out, and it compounds from layer to layer. Layer by
layer, in execution order, the mean of (quantized output - float output) per output channel is
measured on images, with the inputs the quantized model gives that layer (its earlier layers
already corrected), and subtracted from the layer's bias (`QuantLayer.bias_shift`; a layer
without a bias gets one). The correction folds into the deployed bias, so the exported graph
computes it at no cost."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..device import model_device
from ..events import EventHandler, emit
from .intercept import layer_arguments, output_channel_dim
from .modules import QuantizedModel, QuantLayer, StopForward, WeightQuantizer, forward_until_stopped


def _channel_sums(out: Tensor, kind: str) -> Tensor:
    """Per-output-channel sums of `out` (channels: dimension 1 of a convolution's output, the
    last of a linear's), in float64."""
    dims = [d for d in range(out.dim()) if d != output_channel_dim(kind, out.dim())]
    return out.double().sum(dim=dims)


@torch.no_grad()
def _mean_error(model: QuantizedModel, layer: QuantLayer, images: Tensor, batch_size: int) -> Tensor | None:
    """Mean over `images` of the layer's (quantized - float) output per output channel, at its
    first call; None when the forward never calls it."""
    total: list[Tensor] = []
    count = [0]

    def probe(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
        func, call_args, call_kwargs, _ = args
        x, weight, bias, rest, options = layer_arguments(call_args, call_kwargs)
        error = out - func(x, weight, bias, *rest, **options)
        total.append(_channel_sums(error, layer.kind))
        count[0] += error.numel() // total[-1].numel()
        raise StopForward

    handle = layer.register_forward_hook(probe)
    try:
        forward_until_stopped(model, images, batch_size, model_device(model))
    finally:
        handle.remove()
    return torch.stack(total).sum(0).div(count[0]) if total else None


@torch.no_grad()
def correct_biases(model: QuantizedModel, images: Tensor, batch_size: int = 32,
                   on_event: EventHandler | None = None) -> None:
    """Set every enabled layer's `bias_shift` so that its mean output on `images` matches its
    float output, layer by layer in execution order (a model not yet deployed)."""
    if model.deployed:
        raise ValueError("bias correction needs the fake-quant model before folding")
    layers = [layer for layer in model.layers if layer.enabled]
    model.eval()
    emit(on_event, "bias", 0, len(layers))
    for index, layer in enumerate(layers, 1):
        error = _mean_error(model, layer, images, batch_size)
        if error is not None:
            shift = -error if layer.bias_shift is None else layer.bias_shift.double() - error
            layer.bias_shift = shift.float()
        emit(on_event, "bias", index, len(layers))


@torch.no_grad()
def zero_shifts(model: QuantizedModel) -> None:
    """Give every layer a zero `bias_shift` (calibration without correction: the model then has
    the same tensors as a corrected one, and training can learn them)."""
    for name, (_, bias) in model.layer_tensors().items():  # zeros for a layer without a bias
        layer = model.quant_layer(name)
        if layer.bias_shift is None:
            layer.bias_shift = torch.zeros_like(bias)


@torch.no_grad()
def rounding_shifts(model: QuantizedModel, quantizers: dict[str, list[WeightQuantizer]], images: Tensor,
                    batch_size: int = 32) -> dict[str, list[Tensor]]:
    """For each layer named in `quantizers` and each of its weight quantizers, the bias shift
    that removes the mean output error of that weight rounding alone (float inputs, every other
    value float) on `images`, at the layer's first call: DFQ's bias correction, measured. One
    float forward for all of them; the sequential `correct_biases` needs one per layer."""
    sums: dict[str, list[Tensor]] = {}
    counts: dict[str, int] = {}
    seen: set[str] = set()

    def hook(layer: QuantLayer) -> Callable[[nn.Module, tuple[Any, ...], Tensor], None]:
        def probe(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
            if layer.name in seen:
                return
            seen.add(layer.name)
            func, call_args, call_kwargs, _ = args
            x, weight, _, rest, options = layer_arguments(call_args, call_kwargs)
            errors = [_channel_sums(func(x, quant(weight) - weight, None, *rest, **options), layer.kind)
                      for quant in quantizers[layer.name]]
            sums[layer.name] = errors if layer.name not in sums else [a + b for a, b in zip(sums[layer.name], errors)]
            counts[layer.name] = counts.get(layer.name, 0) + out.numel() // errors[0].numel()

        return probe

    handles = [layer.register_forward_hook(hook(layer)) for layer in model.layers if layer.name in quantizers]
    model.tap = lambda owner, role, raw, quantized: raw  # the float model
    device = model_device(model)
    try:
        for start in range(0, len(images), batch_size):
            seen.clear()
            model.eval()(images[start : start + batch_size].to(device))
    finally:
        model.tap = None
        for handle in handles:
            handle.remove()
    return {name: [-(total / counts[name]).float() for total in found] for name, found in sums.items()}
