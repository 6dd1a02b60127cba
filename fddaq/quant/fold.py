"""The deployed form of a model: each BatchNorm that directly follows a convolution is folded into
it, exactly as the exported graph computes it.

Eval-mode BatchNorm is ``a * y + b`` per channel. Folding keeps a fake-quant conv's integer
weights, moves the sign of ``a`` into them and ``|a|`` into the per-channel step size, and makes
``a * bias + b`` the bias. The folded model is what `exporters/` writes and what accuracy is
measured on, so PyTorch and the runtime compute the same graph (bias quantization included,
see `FakeQuantConv2d`).

Found with `torch.fx`: a BatchNorm2d is folded when its input is the output of an `nn.Conv2d`
(or fake-quant conv) that nothing else reads, and both modules are called once. A model fx
cannot trace is returned unfolded (the exporter then reports why it cannot trace it).
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from .modules import FAKE_QUANT_LAYERS, FakeQuantConv2d
from .primitives import MIN_SCALE

FOLDABLE_CONVS = (nn.Conv2d, FakeQuantConv2d)


class Tracer(fx.Tracer):
    """Keeps torch.nn modules (Sequential excepted) and fake-quant layers as single nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, FAKE_QUANT_LAYERS) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    """The fx graph of `model` (raises whatever fx raises for an untraceable forward)."""
    return fx.GraphModule(model, Tracer().trace(model))


def module_calls(graph: fx.Graph) -> dict[str, int]:
    """How many times each module is called in `graph`."""
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


def batch_norm_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (a, b) in float64 with bn(y) = a * y + b in eval mode."""
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    a = gamma / torch.sqrt(var + bn.eps)
    return a, beta - a * mean


def foldable_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, BatchNorm name) of every fold: the BatchNorm is the only reader of the conv."""
    try:
        graph = Tracer().trace(model)
    except Exception:  # fx raises many types (TraceError, TypeError, ...)
        return []
    modules = dict(model.named_modules())
    calls = module_calls(graph)
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or type(modules[node.target]) is not nn.BatchNorm2d:
            continue
        bn, source = modules[node.target], node.args[0] if node.args else None
        if (
            isinstance(source, fx.Node)
            and source.op == "call_module"
            and type(modules[source.target]) in FOLDABLE_CONVS
            and len(source.users) == 1
            and calls[source.target] == calls[node.target] == 1
            and bn.running_mean is not None
            and modules[source.target].out_channels == bn.num_features
        ):
            pairs.append((source.target, node.target))
    return pairs


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    a, shift = batch_norm_affine(bn)
    bias = a * (conv.bias.double() if conv.bias is not None else 0.0) + shift
    channel = (-1, *[1] * (conv.weight.dim() - 1))
    if isinstance(conv, FakeQuantConv2d):
        quant = conv.weight_quant
        integers = quant.quantize(conv.weight).double() * torch.where(a < 0, -1.0, 1.0).reshape(channel)
        conv.bias = nn.Parameter(bias.float(), requires_grad=conv.weight.requires_grad)
        _set_weight(conv, integers, a.abs() * quant.scale().double())
    else:
        conv.weight.copy_(conv.weight.double() * a.reshape(channel))
        conv.bias = nn.Parameter(bias.float(), requires_grad=conv.weight.requires_grad)


@torch.no_grad()
def _set_weight(layer: nn.Module, integers: torch.Tensor, scale: torch.Tensor) -> None:
    """Make a fake-quant layer's weight `integers` x `scale` (per output channel). A channel
    whose integers are all 0 outputs its bias alone: it gets the step size that makes its int32
    bias exact to 2^-24 (the step of an unused weight is free; otherwise the bias would be
    rounded to the step input scale x weight scale of whatever scale calibration left)."""
    dead = (integers.flatten(1) == 0).all(dim=1) | (scale < MIN_SCALE)
    integers[dead] = 0.0
    if layer.bias is not None and layer.input_quant.enabled:
        input_scale = layer.input_quant.scale().double()
        scale[dead] = (layer.bias.double()[dead].abs() / (input_scale * 2.0**24)).clamp(min=MIN_SCALE)
    layer.weight_quant.set_scale(scale.float())
    layer.weight.copy_(integers.float() * layer.weight_quant.scale().reshape(-1, *[1] * (integers.dim() - 1)))


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """A copy of `model` (eval mode) in its deployed form: every foldable BatchNorm2d folded
    into its conv and replaced by `nn.Identity`, and every fake-quant layer's weight set to its
    integers x step size (see `_set_weight` for all-zero channels)."""
    model = copy.deepcopy(model).eval()
    pairs = foldable_pairs(model)
    for conv_name, bn_name in pairs:
        _fold(model.get_submodule(conv_name), model.get_submodule(bn_name))
        parent_name, _, child = bn_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, nn.Identity())
    folded = {conv_name for conv_name, _ in pairs}
    for name, layer in model.named_modules():
        if isinstance(layer, FAKE_QUANT_LAYERS) and name not in folded:
            _set_weight(layer, layer.weight_quant.quantize(layer.weight).double(), layer.weight_quant.scale().double())
    return model
