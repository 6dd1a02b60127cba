"""Tiny seeded models and a cheap calibration for the export tests (CPU, no downloads)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fddaq.config import QuantConfig
from fddaq.quant.calibrate import calibrate_min_max
from fddaq.quant.capture import capture
from fddaq.quant.modules import QuantizedModel
from fddaq.quant.plan import resolve_layer_plan
from fddaq.quant.prepare import prepare
from fddaq.quant.primitives import activation_params, activation_range


class TinyResNet(nn.Module):
    """conv-BN-ReLU stem, one residual block (1x1 conv-BN shortcut, Add, ReLU6), average
    pooling, flatten and a Linear head."""

    def __init__(self, in_channels: int = 3, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.conv1 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(2 * width)
        self.conv2 = nn.Conv2d(2 * width, 2 * width, (3, 3), padding=(1, 1))
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.shortcut = nn.Sequential(nn.Conv2d(width, 2 * width, 1, stride=(2, 2), bias=False), nn.BatchNorm2d(2 * width))
        self.act = nn.ReLU6()
        self.pool = nn.AvgPool2d(2)
        self.head_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        y = self.act(y + self.shortcut(x))
        return self.fc(torch.flatten(self.head_pool(self.pool(y)), 1))


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
