"""Model outputs and accuracy on decoded images."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .device import model_device


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """Logits of `model` (eval mode) for `images`, batch by batch on the model's device, as a
    float32 CPU tensor."""
    model.eval()
    device = model_device(model)
    return torch.cat([
        model(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)
    ])


def top1(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()



@torch.no_grad()
def layer_sqnr(float_model: nn.Module, quant_model: nn.Module, layers: list[str], images: Tensor,
               batch_size: int = 64) -> dict[str, float]:
    """Signal-to-quantization-noise ratio in dB of each named layer's output: the quantized
    model's (errors of the layers before it included) against the float model's, over `images`:
    10 log10(sum f^2 / sum (f - q)^2). Both models must have the same layers, in the same form
    (BatchNorm folded in both or in neither); infinity where the outputs are equal."""
    signal = dict.fromkeys(layers, 0.0)
    noise = dict.fromkeys(layers, 0.0)
    outputs: dict[str, dict[str, Tensor]] = {"float": {}, "quant": {}}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda m, args, out, name=name, side=side: outputs[side].__setitem__(name, out.detach().double())
        )
        for side, model in (("float", float_model), ("quant", quant_model))
        for name in layers
    ]
    try:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(model_device(float_model))
            float_model.eval()(batch)
            quant_model.eval()(batch)
            for name in layers:
                f, q = outputs["float"][name], outputs["quant"][name]
                signal[name] += float(f.square().sum())
                noise[name] += float((f - q).square().sum())
    finally:
        for handle in handles:
            handle.remove()
    return {
        name: math.inf if noise[name] == 0 else 10 * math.log10(max(signal[name], 1e-300) / noise[name])
        for name in layers
    }
