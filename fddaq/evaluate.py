"""Model outputs and accuracy on decoded images."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .device import batches, model_device
from .distributed import Ranks, gather, total


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int = 256, ranks: Ranks = Ranks()) -> Tensor:
    """Logits of `model` (eval mode) for `images`, batch by batch on the model's device, as a
    float32 CPU tensor. With several `ranks` (which must all call it), each computes its part
    of the images and all receive all logits."""
    model.eval()
    if len(images) < ranks.world:  # too few to give every rank a part
        ranks = Ranks()
    part = images[ranks.part(len(images))]
    logits = torch.cat([model(batch).float() for batch in batches(part, batch_size, model_device(model))])
    return gather(logits, len(images), ranks).cpu()


def top1(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


@torch.no_grad()
def layer_sqnr(float_model: nn.Module, quant_model: nn.Module, layers: list[str], images: Tensor,
               batch_size: int = 64, ranks: Ranks = Ranks()) -> dict[str, float]:
    """Signal-to-quantization-noise ratio in dB of each named layer's output: the quantized
    model's (errors of the layers before it included) against the float model's, over `images`:
    10 log10(sum f^2 / sum (f - q)^2). Both models must have the same layers, in the same form
    (BatchNorm folded in both or in neither); infinity where the outputs are equal. With
    several `ranks` (which must all call it), each measures its part of the images."""
    device = model_device(float_model)
    sums = torch.zeros(2, len(layers), dtype=torch.float64, device=device)  # signal and noise per layer
    outputs: dict[str, dict[str, Tensor]] = {"float": {}, "quant": {}}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda m, args, out, name=name, side=side: outputs[side].__setitem__(name, out.detach().double())
        )
        for side, model in (("float", float_model), ("quant", quant_model))
        for name in layers
    ]
    try:
        for batch in batches(images[ranks.part(len(images))], batch_size, device):
            float_model.eval()(batch)
            quant_model.eval()(batch)
            for index, name in enumerate(layers):
                f, q = outputs["float"][name], outputs["quant"][name]
                sums[0, index] += f.square().sum()
                sums[1, index] += (f - q).square().sum()
    finally:
        for handle in handles:
            handle.remove()
    signal, noise = total(sums, ranks).tolist()
    return {name: math.inf if n == 0 else 10 * math.log10(max(s, 1e-300) / n) for name, s, n in zip(layers, signal, noise)}
