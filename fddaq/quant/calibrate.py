"""Initial quantizer ranges from the real calibration images (MSE-optimal), then bias
correction."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..config import CalibrationConfig
from ..device import model_device
from ..errors import ModelError
from ..events import EventHandler, emit
from .bias import correct_biases, zero_shifts
from .modules import QuantizedModel, quant_layers, switched_off
from .primitives import activation_params, mse_activation_params


@torch.no_grad()
def _sample_activations(
    model: QuantizedModel, images: Tensor, config: CalibrationConfig, batch_size: int
) -> dict[str, Tensor]:
    """For every activation quantizer (`QuantizedModel.activation_quantizers`), up to
    `max_samples` of the values it quantizes (activation quantizers off, weights quantized as
    set): a seeded random subset of each batch plus the exact extremes (so the range search
    sees them)."""
    quantizers = model.activation_quantizers()
    generator = torch.Generator().manual_seed(config.seed)
    batches = range(0, len(images), batch_size)
    per_batch = max(1, config.max_samples // len(batches))
    samples: dict[str, list[Tensor]] = {name: [] for name in quantizers}

    def hook(name: str) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0].detach().flatten()
            keep = torch.randint(len(x), (min(per_batch, len(x)),), generator=generator).to(x.device)
            samples[name].append(torch.cat([x[keep], x.min()[None], x.max()[None]]).float().cpu())

        return record

    handles = [quant.register_forward_pre_hook(hook(name)) for name, quant in quantizers.items()]
    try:
        device = model_device(model)
        with switched_off(quantizers.values()):
            for start in batches:
                model(images[start : start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name, parts in samples.items() if not parts]
    if missing:  # the forward took another path than the one captured
        raise ModelError(f"the quantized model never computed {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}: "
                         "the model's forward differs from the one fddaq captured (code that depends on the batch "
                         "or on state)")
    return {name: torch.cat(parts) for name, parts in samples.items()}


def calibrate(
    model: QuantizedModel,
    images: Tensor,
    config: CalibrationConfig = CalibrationConfig(),
    batch_size: int = 64,
    on_event: EventHandler | None = None,
) -> None:
    """Set every weight quantizer to its per-channel MSE-optimal grid, then every activation
    quantizer to the MSE-optimal range of its values on `images` (computed through the
    quantized weights, with float activations); then correct every layer's bias on a seeded
    subset of `config.bias_images` of the images (0: every layer gets a zero shift)."""
    layers = [(layer.name, layer) for layer in quant_layers(model)]
    weights = model.layer_weights()
    for name, layer in layers:  # first the weights: the activations are sampled through them
        layer.weight_quant.set_mse(weights[name])
    samples = _sample_activations(model.eval(), images, config, batch_size)
    quantizers = model.activation_quantizers()
    emit(on_event, "calibrate", 0, len(quantizers))
    for index, (name, quant) in enumerate(quantizers.items(), 1):
        quant.set_params(*mse_activation_params(samples[name], quant.bits))
        emit(on_event, "calibrate", index, len(quantizers))
    if not config.bias_images:
        zero_shifts(model)
        return
    generator = torch.Generator().manual_seed(config.seed)
    subset = torch.randperm(len(images), generator=generator)[: config.bias_images].sort().values
    correct_biases(model, images[subset], batch_size, on_event)


@torch.no_grad()
def calibrate_min_max(model: QuantizedModel, images: Tensor, batch_size: int = 64) -> None:
    """Cheap ranges, no search: per-channel max |w| and each input's observed min and max on
    `images` (export dry runs and tests)."""
    weights = model.layer_weights()
    layers = quant_layers(model)
    for layer in layers:
        layer.weight_quant.set_min_max(weights[layer.name])
    samples = _sample_activations(model.eval(), images, CalibrationConfig(max_samples=1024), batch_size)
    for name, quant in model.activation_quantizers().items():
        values = samples[name]
        quant.set_params(*activation_params(values.min().item(), values.max().item(), quant.bits))
