"""Initial ranges from the calibration images."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fddaq.config import QuantConfig
from fddaq.quant.calibrate import calibrate
from fddaq.quant.capture import capture
from fddaq.quant.plan import resolve_layer_plan
from fddaq.quant.prepare import prepare
from fddaq.quant.primitives import mse_activation_params


def test_activation_ranges_are_measured_through_the_calibrated_weights():
    """The second layer's input range is that of the first layer's output with its weights
    quantized as calibrated (it used to be sampled before the weight scales were set, through
    weights rounded at step 1: mostly zeros for weights of magnitude ~0.1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    with torch.no_grad():
        model[0].weight.mul_(0.5)  # |w| < 0.1: all zeros at step 1
    found = capture(model, torch.zeros(1, 32))
    qmodel = prepare(model, found, resolve_layer_plan(found, QuantConfig(4, 4, input_bits=4)), "logits")
    x = torch.randn(512, 32, generator=torch.Generator().manual_seed(1))
    calibrate(qmodel, x)
    first, second = qmodel.quant_layer("0"), qmodel.quant_layer("2")
    first.input_quant.enabled = False
    with torch.no_grad():
        hidden = torch.relu(nn.functional.linear(x, first.weight_quant(qmodel.model[0].weight), qmodel.model[0].bias))
    assert hidden.max() > 0.5
    scale, zero_point = mse_activation_params(hidden, 4)
    assert second.input_quant.scale().item() == pytest.approx(scale, rel=1e-6)
    assert second.input_quant.zero_point.item() == zero_point
