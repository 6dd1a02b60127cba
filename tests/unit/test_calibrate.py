"""Initial ranges from the calibration images."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fddaq.quant.calibrate import calibrate
from fddaq.quant.modules import FakeQuantLinear
from fddaq.quant.primitives import mse_activation_params


def test_activation_ranges_are_measured_through_the_calibrated_weights():
    """The second layer's input range is that of the first layer's output with its weights
    quantized as calibrated (it used to be sampled before the weight scales were set, through
    weights rounded at step 1: mostly zeros for weights of magnitude ~0.1)."""
    torch.manual_seed(0)
    first, second = FakeQuantLinear(32, 32, weight_bits=4, act_bits=4), FakeQuantLinear(32, 4, weight_bits=4, act_bits=4)
    with torch.no_grad():
        first.weight.mul_(0.5)  # |w| < 0.1: all zeros at step 1
    model = nn.Sequential(first, nn.ReLU(), second)
    x = torch.randn(512, 32, generator=torch.Generator().manual_seed(1))
    calibrate(model, x)
    first.input_quant.enabled = False
    with torch.no_grad():
        hidden = torch.relu(first(x))
    assert hidden.max() > 0.5
    scale, zero_point = mse_activation_params(hidden, 4)
    assert second.input_quant.scale().item() == pytest.approx(scale, rel=1e-6)
    assert second.input_quant.zero_point.item() == zero_point
