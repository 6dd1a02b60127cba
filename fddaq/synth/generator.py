"""FDDA's class-conditional generator (GDFQ style), sized from the model it feeds."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without its own affine parameters, followed by a per-class scale and shift."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.gamma = nn.Embedding(num_classes, channels)
        self.beta = nn.Embedding(num_classes, channels)
        nn.init.ones_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        return self.norm(x) * self.gamma(labels)[:, :, None, None] + self.beta(labels)[:, :, None, None]


class Generator(nn.Module):
    """z in R^latent_dim and a class label -> an image of `channels` x `image_size`^2.

    z times a learned label embedding (GDFQ's conditioning, which makes the generator
    class-conditional within hundreds of steps instead of thousands; without `label_embedding`
    z alone), Linear to width x (S/4)^2, conditional BN; twice: upsample x2, conv3x3,
    conditional BN, LeakyReLU(0.2) (width -> width -> width/2); conv3x3 to `channels`, tanh.
    Without `bounds`, GDFQ's final BatchNorm2d without affine parameters then standardises each
    channel over the batch like a normalised model input (keep the generator in train mode).
    With `bounds` (the lowest and highest input value per channel, (C, 1, 1) each:
    `Preprocess.input_range`), tanh is mapped into that range instead, so a single-class batch
    keeps its own brightness and contrast. Sizes that are not multiples of 4 are generated larger
    and centre-cropped."""

    def __init__(self, num_classes: int, channels: int, image_size: int, latent_dim: int = 100, width: int = 128,
                 bounds: tuple[Tensor, Tensor] | None = None, label_embedding: bool = True) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.latent_dim = latent_dim
        self.image_size = image_size
        self.init_size = math.ceil(image_size / 4)
        self.embed = nn.Embedding(num_classes, latent_dim) if label_embedding else None
        self.fc = nn.Linear(latent_dim, width * self.init_size**2)
        self.bn0 = ConditionalBatchNorm2d(width, num_classes)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.bn1 = ConditionalBatchNorm2d(width, num_classes)
        self.conv2 = nn.Conv2d(width, width // 2, 3, padding=1)
        self.bn2 = ConditionalBatchNorm2d(width // 2, num_classes)
        self.act = nn.LeakyReLU(0.2)
        self.to_image = nn.Conv2d(width // 2, channels, 3, padding=1)
        if bounds is None:
            self.standardise = nn.BatchNorm2d(channels, affine=False)
        else:
            self.standardise = None
            self.register_buffer("low", bounds[0].reshape(channels, 1, 1).float().clone())
            self.register_buffer("high", bounds[1].reshape(channels, 1, 1).float().clone())

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        z = z if self.embed is None else z * self.embed(labels)
        x = self.fc(z).view(len(z), -1, self.init_size, self.init_size)
        x = self.bn0(x, labels)
        x = self.act(self.bn1(self.conv1(self.up(x)), labels))
        x = self.act(self.bn2(self.conv2(self.up(x)), labels))
        x = torch.tanh(self.to_image(x))
        x = self.standardise(x) if self.standardise is not None else self.low + (self.high - self.low) * (x + 1) / 2
        offset = (x.shape[-1] - self.image_size) // 2
        return x[:, :, offset : offset + self.image_size, offset : offset + self.image_size]

    def sample(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images for `labels` from fresh latent noise."""
        z = torch.randn(len(labels), self.latent_dim, generator=generator).to(labels.device)
        return self(z, labels)
