"""Build the fake-quant model from a float model and a layer plan."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import fx, nn

from .fold import trace
from .modules import FAKE_QUANT_LAYERS, FAKE_QUANT_TYPES
from .plan import LayerPlan

# Layers and calls through which a clipped range passes unchanged (pooling and flattening keep
# values inside it; zero padding too when 0 lies inside it).
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten)
_PASS_CALLS = {torch.flatten, F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d, "flatten", "view", "reshape"}


def prepare(model: nn.Module, plan: LayerPlan) -> nn.Module:
    """A deep copy of `model` in eval mode in which every quantized layer of `plan` is replaced
    by its fake-quant version (same weights; quantizer parameters still to be calibrated)."""
    qmodel = copy.deepcopy(model).eval()
    for entry in plan.quantized:
        parent_name, _, child = entry.name.rpartition(".")
        parent = qmodel.get_submodule(parent_name)
        float_layer = getattr(parent, child)
        fq_type = FAKE_QUANT_TYPES[nn.Conv2d if entry.kind == "conv" else nn.Linear]
        setattr(parent, child, fq_type.from_float(float_layer, entry.weight_bits, entry.act_bits))
    for name, bounds in clipped_inputs(qmodel).items():
        qmodel.get_submodule(name).input_quant.bounds = bounds
    return qmodel


def clipped_inputs(model: nn.Module) -> dict[str, tuple[float, float]]:
    """Fake-quant layer name -> (low, high) of the clip (ReLU6, Hardtanh) its input comes from,
    through pooling, flattening and zero padding; layers of a model fx cannot trace have none."""
    try:
        graph = trace(model).graph
    except Exception:  # fx raises many types (TraceError, TypeError, ...)
        return {}
    modules = dict(model.named_modules())
    found = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], FAKE_QUANT_LAYERS) and node.args:
            bounds = _clip_bounds(node.args[0], modules)
            if bounds is not None:
                found[node.target] = bounds
    return found


def _clip_bounds(node: object, modules: dict[str, nn.Module]) -> tuple[float, float] | None:
    if not isinstance(node, fx.Node) or not node.args:
        return None
    module = modules.get(node.target) if node.op == "call_module" else None
    if isinstance(module, nn.Hardtanh):  # nn.ReLU6 too
        return float(module.min_val), float(module.max_val)
    if node.op == "call_function" and node.target is F.relu6:
        return 0.0, 6.0
    if node.op == "call_function" and node.target is F.hardtanh:
        low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        high = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
        return float(low), float(high)
    padding = _is_zero_padding(node, module)
    passes = isinstance(module, _PASS_MODULES) or (node.op in ("call_function", "call_method") and node.target in _PASS_CALLS)
    if not (padding or passes):
        return None
    bounds = _clip_bounds(node.args[0], modules)
    if padding and bounds is not None and not bounds[0] <= 0 <= bounds[1]:
        return None
    return bounds


def _is_zero_padding(node: fx.Node, module: nn.Module | None) -> bool:
    if isinstance(module, nn.ConstantPad2d):  # nn.ZeroPad2d too
        return module.value == 0
    if node.op == "call_function" and node.target is F.pad:
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
        return mode == "constant" and not value
    return False
