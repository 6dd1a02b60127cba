"""Small seeded models the tests share (importable as `tests.models`)."""

from __future__ import annotations

import torch
from torch import nn


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
