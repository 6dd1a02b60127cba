"""Tiny seeded models and a cheap calibration for the export tests (CPU, no downloads)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fddaq.config import QuantConfig
from fddaq.quant.calibrate import calibrate_min_max
from fddaq.quant.capture import capture
from fddaq.quant.modules import QuantizedModel
from fddaq.quant.plan import resolve_layer_plan
from fddaq.quant.prepare import prepare
from fddaq.quant.primitives import activation_params, activation_range


@torch.no_grad()
def quantize_model(model: nn.Module, images: Tensor, weight_bits: int, act_bits: int, clip: float = 0.8,
                   weight_grid: str = "auto", activations: str = "auto") -> QuantizedModel:
    """The fake-quant version of `model` with ranges at `clip` times the observed extremes (so
    weights and activations saturate too): per-channel max |w| and per-tensor min/max input.

    (Cheap on purpose: the MSE searches of `fddaq.quant.calibrate` take seconds on 2 cores.)"""
    model = model.eval()
    found = capture(model, images[:1])
    quant = QuantConfig(weight_bits=weight_bits, act_bits=act_bits, weight_grid=weight_grid, activations=activations)
    qmodel = prepare(model, found, resolve_layer_plan(found, quant),
                     found.outputs[0].name)
    calibrate_min_max(qmodel, images)
    for layer in qmodel.layers:
        layer.weight_quant.set_scale(clip * layer.weight_quant.scale())
    for quant in qmodel.activation_quantizers().values():
        qmin, qmax = activation_range(quant.bits)
        low, high = (qmin - quant.zero_point.item()) * quant.scale().item(), (qmax - quant.zero_point.item()) * quant.scale().item()
        quant.set_params(*activation_params(clip * low, clip * high, quant.bits))
    return qmodel
