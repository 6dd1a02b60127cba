import pytest
import torch
from torch import nn

from fddaq.config import QuantConfig
from fddaq.quant.capture import capture
from fddaq.quant.plan import resolve_layer_plan
from fddaq.quant.prepare import prepare

torch.set_num_threads(min(2, torch.get_num_threads()))


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


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


@pytest.fixture
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(TinyResNet())


def fake_quant_model(model: nn.Module, input_shape=(1, 16, 16), **bits) -> nn.Module:
    found = capture(model, torch.zeros(1, *input_shape))
    return prepare(model, found, resolve_layer_plan(found, QuantConfig(**bits)), found.outputs[0].name)
