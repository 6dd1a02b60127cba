"""A small MobileNetV2-style network for 28x28 grey images: the bundled mobile example
(`fddaq:fashion_mobilenet`), the hard case for 4 bits.

Inverted residuals: a 1x1 expand conv-BN-ReLU6, a 3x3 depthwise conv-BN-ReLU6 and a 1x1
projection conv-BN with no activation after it (a linear bottleneck); the block adds its input
when the shape is unchanged, so the residual stream is signed.
"""

from __future__ import annotations

from torch import Tensor, nn

# (expansion, out channels, repeats, first stride) per stage, as in MobileNetV2's table.
STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (4, 24, 2, 2),
    (4, 40, 3, 2),
    (4, 64, 2, 1),
)
STEM_CHANNELS = 16
HEAD_CHANNELS = 256


def conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [*conv_bn(in_channels, hidden, 1), nn.ReLU6()]
        layers += [*conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6()]
        layers += conv_bn(hidden, out_channels, 1)
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        return x + out if self.residual else out


class MobileNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(in_channels, STEM_CHANNELS, 3), nn.ReLU6())
        blocks = []
        channels = STEM_CHANNELS
        for expansion, width, repeats, stride in STAGES:
            for index in range(repeats):
                blocks.append(InvertedResidual(channels, width, stride if index == 0 else 1, expansion))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(*conv_bn(channels, HEAD_CHANNELS, 1), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(0.1)
        self.fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(self.dropout(self.flatten(self.pool(x))))


def fashion_mobilenet(num_classes: int = 10, in_channels: int = 1) -> MobileNet:
    """The architecture of the bundled mobile Fashion-MNIST example (`fddaq:fashion_mobilenet`)."""
    return MobileNet(num_classes=num_classes, in_channels=in_channels)
