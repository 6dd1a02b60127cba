"""A YOLO-style detector written from scratch: a small CSP backbone, an SPPF block (repeated
5x5 max pooling), a PAN neck with nearest upsampling and concatenations, SiLU everywhere,
and three detection heads returned as a tuple.

    fddaq plan model.pth --arch examples/architectures/yolo_neck.py:yolo_neck --input-size 64 ...
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConvBNSiLU(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class CSP(nn.Module):
    """Split, a bottleneck on one half with a residual, concatenate."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.split = ConvBNSiLU(channels, channels)
        self.bottleneck = nn.Sequential(ConvBNSiLU(channels // 2, channels // 2, 3), ConvBNSiLU(channels // 2, channels // 2, 3))
        self.merge = ConvBNSiLU(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.split(x).chunk(2, dim=1)
        return self.merge(torch.cat([a, b + self.bottleneck(b)], dim=1))


class SPPF(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reduce = ConvBNSiLU(channels, channels // 2)
        self.pool = nn.MaxPool2d(5, stride=1, padding=2)
        self.expand = ConvBNSiLU(2 * channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.reduce(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.expand(torch.cat([x, y1, y2, self.pool(y2)], dim=1))


class YoloNeck(nn.Module):
    def __init__(self, num_classes: int = 3, width: int = 16, anchors: int = 3) -> None:
        super().__init__()
        self.stem = ConvBNSiLU(3, width, 3, 2)
        self.stage1 = nn.Sequential(ConvBNSiLU(width, 2 * width, 3, 2), CSP(2 * width))  # stride 4
        self.stage2 = nn.Sequential(ConvBNSiLU(2 * width, 4 * width, 3, 2), CSP(4 * width))  # stride 8
        self.stage3 = nn.Sequential(ConvBNSiLU(4 * width, 8 * width, 3, 2), CSP(8 * width), SPPF(8 * width))  # 16
        self.lateral = ConvBNSiLU(8 * width, 4 * width)
        self.top_down = CSP(8 * width)
        self.reduce = ConvBNSiLU(8 * width, 2 * width)
        self.fine = CSP(4 * width)
        self.down1 = ConvBNSiLU(4 * width, 4 * width, 3, 2)
        self.bottom_up1 = CSP(12 * width)
        self.down2 = ConvBNSiLU(12 * width, 8 * width, 3, 2)
        self.bottom_up2 = CSP(12 * width)
        outputs = anchors * (5 + num_classes)
        self.heads = nn.ModuleList(nn.Conv2d(c, outputs, 1) for c in (4 * width, 12 * width, 12 * width))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c2 = self.stage1(self.stem(x))
        c3 = self.stage2(c2)
        c4 = self.stage3(c3)
        p4 = self.lateral(c4)
        p3 = self.top_down(torch.cat([F.interpolate(p4, scale_factor=2, mode="nearest"), c3], dim=1))
        p2 = self.fine(torch.cat([F.interpolate(self.reduce(p3), scale_factor=2, mode="nearest"), c2], dim=1))
        n3 = self.bottom_up1(torch.cat([self.down1(p2), p3], dim=1))
        n4 = self.bottom_up2(torch.cat([self.down2(n3), p4], dim=1))
        return tuple(head(feature) for head, feature in zip(self.heads, (p2, n3, n4)))


def yolo_neck(num_classes: int = 3) -> YoloNeck:
    return YoloNeck(num_classes=num_classes)
