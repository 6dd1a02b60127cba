"""A small UNet written the way people write their own segmentation models: ConvTranspose2d
upsampling, concatenated skip connections, a per-pixel class map as output.

    fddaq plan model.pth --arch examples/architectures/unet.py:unet --input-size 64 ...
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 4, width: int = 16) -> None:
        super().__init__()
        self.down1 = block(in_channels, width)
        self.down2 = block(width, 2 * width)
        self.bottom = block(2 * width, 4 * width)
        self.pool = nn.MaxPool2d(2)
        self.up2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2)
        self.dec2 = block(4 * width, 2 * width)
        self.up1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.dec1 = block(2 * width, width)
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        skip1 = self.down1(x)
        skip2 = self.down2(self.pool(skip1))
        y = self.bottom(self.pool(skip2))
        y = self.dec2(torch.cat([self.up2(y), skip2], dim=1))
        y = self.dec1(torch.cat([self.up1(y), skip1], dim=1))
        return self.head(y)


def unet(num_classes: int = 4) -> UNet:
    return UNet(num_classes=num_classes)
