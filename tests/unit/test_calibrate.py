"""Initial ranges from the calibration images."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fddaq.quant.calibrate import calibrate
from fddaq.quant.modules import FakeQuantLinear


@pytest.mark.parametrize("bits, full_range", [(8, True), (6, True), (4, False)])
def test_calibration_uses_full_ranges_from_6_bits(bits, full_range):
    layer = FakeQuantLinear(64, 2, weight_bits=bits, act_bits=bits)
    model = nn.Sequential(layer)
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(0)).pow(3)  # heavy tails
    calibrate(model, x)
    scale, zero_point = layer.input_quant.scale().item(), layer.input_quant.zero_point.item()
    covered = ((0 - zero_point) * scale, (2**bits - 1 - zero_point) * scale)
    full = covered[0] <= x.min().item() + scale and covered[1] >= x.max().item() - scale  # zero point rounding
    assert full == full_range
