"""Real architectures with random weights (no download): plan, fake-quant forward, QDQ export
and onnxruntime parity. Their layer kinds (max pooling, depthwise and grouped convs, ReLU6,
Hardswish, Hardsigmoid and Sigmoid squeeze-excite scales, SiLU, stochastic depth, TF-style
padding) must quantize and export, not fall back silently."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from exporters import export_qdq, verify
from fddaq.models import build_model, layer_execution_order
from fddaq.quant.modules import FAKE_QUANT_LAYERS

from export_helpers import quantize_model, randomize_batch_norms

ARCHITECTURES = [
    "torchvision:resnet18",
    "torchvision:mobilenet_v2",
    "torchvision:mobilenet_v3_small",
    "torchvision:regnet_x_400mf",
    "torchvision:efficientnet_b0",
    "fddaq:efficientnet_lite0",
]
SIZE = 64  # pixels: every architecture above runs at it, and fast


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("spec", ARCHITECTURES)
def test_architecture_quantizes_exports_and_matches_onnxruntime(spec, bits):
    torch.manual_seed(0)
    model = randomize_batch_norms(build_model(spec))
    x = torch.randn(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    qmodel = quantize_model(model, x, bits, bits)

    layers = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert set(layer_execution_order(model, x[:1])) == set(layers)
    quantized = {name for name, m in qmodel.named_modules() if isinstance(m, FAKE_QUANT_LAYERS)}
    assert quantized == set(layers)  # squeeze-excite convs and classifiers included

    report = verify(export_qdq(qmodel, (3, SIZE, SIZE)), qmodel, x)
    assert report.agreement == report.optimized_agreement == 100.0
    # each layer, fed the graph's inputs, computes the graph's integers but for rare one-step ties
    assert report.local_max_step_diff <= 1
    assert report.local_mismatches <= 1e-4 * report.activation_values
    if bits == 8 and spec != "torchvision:efficientnet_b0":  # SiLU outputs are not Clip/Relu: no fusion
        assert report.integer_ops.get("QLinearConv", 0) >= 1


def test_squeeze_excite_and_hardswish_layers_are_in_the_plan():
    model = build_model("torchvision:mobilenet_v3_small")
    order = layer_execution_order(model, torch.zeros(1, 3, SIZE, SIZE))
    assert "features.1.block.1.fc1" in order and "features.1.block.1.fc2" in order  # SE convs
    assert {type(m) for m in model.modules()} >= {nn.Hardswish, nn.Hardsigmoid}
