"""Build the fake-quant model from a float model, what it computes and a layer plan."""

from __future__ import annotations

import copy

from torch import nn

from ..errors import ModelError
from .capture import Capture
from .modules import ActivationQuantizer, QuantizedModel, QuantLayer
from .plan import LayerPlan, tensor_sites


def prepare(model: nn.Module, capture: Capture, plan: LayerPlan, output: str) -> QuantizedModel:
    """A `QuantizedModel` (eval mode) around a deep copy of `model`, with a `QuantLayer` for each
    quantized layer of `plan` and one for each tensor between operators the plan quantizes
    (`plan.tensor_sites`; quantizer parameters still to be calibrated). A value that comes
    from a clip (ReLU6, Hardtanh) gets that clip's bounds: see `ActivationQuantizer`."""
    layers = {layer.name: layer for layer in capture.layers}
    missing = [entry.name for entry in plan.quantized if entry.name not in layers]
    if missing:
        raise ModelError(f"the layer plan names layers the model does not compute: {', '.join(missing[:4])}"
                         f"{' ...' if len(missing) > 4 else ''} (a checkpoint of another version of the architecture?)")
    bits, tied = tensor_sites(capture, plan)
    sites = {}
    for site in capture.sites:
        if site.name in bits:
            sites[site.name] = ActivationQuantizer(bits[site.name], site.name, site.bounds)
    quant = []
    for entry in plan.quantized:
        layer = layers[entry.name]
        assert entry.weight_bits is not None and entry.act_bits is not None  # a quantized layer has both
        q = QuantLayer(layer.name, layer.kind, layer.channels, entry.weight_bits, entry.act_bits,
                       entry.weight_grid == "affine", capture.clips.get(layer.name))
        if layer.name in tied:
            q.input_quant, q.tied = sites[tied[layer.name]], True
        quant.append(q)
    return QuantizedModel(copy.deepcopy(model).eval(), capture, quant, output, list(sites.values())).eval()
