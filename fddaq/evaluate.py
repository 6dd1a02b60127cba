"""Model outputs and accuracy on decoded images."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .device import batches, model_device
from .distributed import Ranks, gather, total
from .quant.modules import QuantizedModel, activation_quantizers, quant_layers, switched_off


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


def class_logits(logits: Tensor) -> Tensor:
    """[N, classes] logits: a dense output [N, classes, *positions] averaged over its positions."""
    return logits if logits.dim() <= 2 else logits.flatten(2).mean(2)


def top1(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent (of `class_logits`)."""
    return 100.0 * (class_logits(logits).argmax(1) == labels).float().mean().item()


@torch.no_grad()
def layer_sqnr(model: QuantizedModel, images: Tensor, batch_size: int = 64, ranks: Ranks = Ranks()) -> dict[str, float]:
    """Signal-to-quantization-noise ratio in dB of each quantized layer's output: the
    fake-quant model's (errors of the layers before it included) against the float model's
    (the same model with every layer and quantizer switched off), over `images`:
    10 log10(sum f^2 / sum (f - q)^2); infinity where the outputs are equal. With several
    `ranks` (which must all call it), each measures its part of the images."""
    layers = [layer.name for layer in quant_layers(model)]
    everything = [*quant_layers(model), *activation_quantizers(model)]  # the tensors between operators too
    device = model_device(model)
    sums = torch.zeros(2, len(layers), dtype=torch.float64, device=device)  # signal and noise per layer
    model.eval()
    for batch in batches(images[ranks.part(len(images))], batch_size, device):
        outputs = []
        for off in (everything, []):  # float, then quantized
            model.outputs = {}
            try:
                with switched_off(off):
                    model(batch)
                outputs.append(model.outputs)
            finally:
                model.outputs = None
        for index, name in enumerate(layers):
            f, q = outputs[0][name].double(), outputs[1][name].double()
            sums[0, index] += f.square().sum()
            sums[1, index] += (f - q).square().sum()
    signal, noise = total(sums, ranks).tolist()
    return {name: math.inf if n == 0 else 10 * math.log10(max(s, 1e-300) / n) for name, s, n in zip(layers, signal, noise)}
