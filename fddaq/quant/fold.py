"""The deployed form of a quantized model: integer weights, each BatchNorm that reads only a
layer's output folded into it, exactly as the exported graph computes it.

Eval-mode BatchNorm is ``a * y + b`` per channel. Folding keeps a layer's integer weights,
moves the sign of ``a`` into them and ``|a|`` into the per-channel step size, and makes
``a * bias + b`` the bias (the bias correction, `QuantLayer.bias_shift`, added first). A layer
without a folded BatchNorm keeps the bias each call passes and its shift (zeros when it has none,
so that the deployed form is the same for every model of an architecture and plan). The deployed model is what `exporters/` writes and what accuracy is
measured on, so PyTorch and the runtime compute the same graph (bias quantization included,
see `QuantLayer`). Which BatchNorms fold comes from `capture.Capture.folds`."""

from __future__ import annotations

import copy
from typing import cast

import torch
from torch import Tensor

from .capture import BatchNormFold
from .modules import QuantizedModel, QuantLayer
from .primitives import MIN_SCALE


def _named(model: torch.nn.Module, name: str) -> Tensor:
    """A parameter or buffer of `model` by name (frozen BatchNorms keep their affine in buffers)."""
    owner, _, leaf = name.rpartition(".")
    value: Tensor = getattr(model.get_submodule(owner), leaf)
    return value.detach().double()


def batch_norm_affine(model: torch.nn.Module, fold: BatchNormFold) -> tuple[Tensor, Tensor]:
    """Per-channel (a, b) in float64 with batch_norm(y) = a * y + b in eval mode."""
    mean, var = _named(model, fold.running_mean), _named(model, fold.running_var)
    gamma = _named(model, fold.weight) if fold.weight else torch.ones_like(mean)
    beta = _named(model, fold.bias) if fold.bias else torch.zeros_like(mean)
    a = gamma / torch.sqrt(var + fold.eps)
    return a, beta - a * mean


@torch.no_grad()
def fold_batch_norms(qmodel: QuantizedModel) -> QuantizedModel:
    """A copy of `qmodel` (eval mode) in its deployed form: each layer's weight as integers x
    step size, each foldable BatchNorm folded into its layer (and the identity where it is
    called). A deployed model is copied as it is."""
    qmodel = copy.deepcopy(qmodel).eval()
    if qmodel.deployed:
        return qmodel
    tensors = qmodel.layer_tensors()
    folds = {fold.layer: fold for fold in qmodel.capture.folds}
    for layer in qmodel.layers:
        weight, bias = tensors[layer.name]
        quant = layer.weight_quant
        integers = quant.quantize(weight).double()
        scale = quant.scale().double()
        bias = cast(Tensor, layer.shifted_bias(bias)).double()  # the recorded bias is never None
        fold = folds.get(layer.name)
        if fold is not None:
            a, shift = batch_norm_affine(qmodel.model, fold)
            integers = quant.negate(integers, a < 0)
            scale = a.abs() * scale
            bias = a * bias + shift
        _deploy(layer, integers, scale, bias, folded=fold is not None)
    return qmodel


def _deploy(layer: QuantLayer, integers: Tensor, scale: Tensor, bias: Tensor, folded: bool) -> None:
    """Make `layer` compute with `integers` x `scale` (per output channel), and with `bias` when
    a BatchNorm is `folded` into it (else with the bias each call passes plus its shift, which
    `bias` is for the first call). A channel
    whose integers are all 0 outputs its bias alone: it gets the step size that makes its int32
    bias exact to 2^-24 (the step of an unused weight is free; otherwise the bias would be
    rounded to the step input scale x weight scale of whatever scale calibration left)."""
    quant = layer.weight_quant
    zero_point = quant.zero_point.double()[:, None]
    dead = (quant.channels_first(integers).flatten(1) == zero_point).all(dim=1) | (scale < MIN_SCALE)
    integers = quant.channels_first(integers).clone()
    integers[dead] = 0.0
    quant.zero_point[dead] = 0.0
    integers = integers if quant.axis == 0 else integers.movedim(0, quant.axis)
    if layer.input_quant.enabled and bias.numel() == scale.numel():
        input_scale = layer.input_quant.scale().double()
        scale[dead] = (bias[dead].abs() / (input_scale * 2.0**24)).clamp(min=MIN_SCALE)
    quant.set_scale(scale.float())
    layer.integers = integers.to(torch.int8).contiguous()
    if folded:
        layer.deployed_bias, layer.bias_shift = bias.float(), None
    elif layer.bias_shift is None:
        layer.bias_shift = torch.zeros_like(bias, dtype=torch.float32)
