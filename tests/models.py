"""Small seeded models the tests share (importable as `tests.models`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TinyResNet(nn.Module):
    """Conv-BN-ReLU stem, one residual block with a 1x1 conv shortcut, ReLU6, pool, Linear."""

    def __init__(self, in_channels: int = 1, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.short = nn.Conv2d(8, 12, 1, stride=2)
        self.act = nn.ReLU6()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.act(self.bn2(self.conv2(x)) + self.short(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class ExportResNet(nn.Module):
    """The export tests' network, with more to export than `TinyResNet`: a conv-BN-ReLU stem in
    a Sequential, one residual block (1x1 conv-BN shortcut, Add, ReLU6), two average poolings,
    flatten and a Linear head; 3 input channels."""

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


def randomize_bn(model: nn.Module, seed: int = 0, negative_gammas: bool = False) -> nn.Module:
    """Random running statistics and affine parameters in every BatchNorm2d of `model`, so that
    folding is really tested (`negative_gammas`: gammas of either sign); eval mode."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            with torch.no_grad():
                module.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                gamma = torch.randn(n, generator=generator) if negative_gammas else 0.5 + torch.rand(n, generator=generator)
                module.weight.copy_(gamma)
                module.bias.copy_(0.2 * torch.randn(n, generator=generator))
    return model.eval()
