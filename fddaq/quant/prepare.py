"""Build the fake-quant model from a float model and a layer plan."""

from __future__ import annotations

import copy

from torch import nn

from .modules import FAKE_QUANT_TYPES
from .plan import LayerPlan


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
    return qmodel
