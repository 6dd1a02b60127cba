"""A grid of synthetic images, one row per class, back in pixel space."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..data import Preprocess


def preview_grid(images: Tensor, labels: Tensor, preprocess: Preprocess, per_class: int = 8, max_classes: int = 20) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3) array: up to `per_class` images of each of the first
    `max_classes` classes present, de-normalised with `preprocess`, 2-pixel gaps."""
    mean = torch.tensor(preprocess.mean).reshape(1, -1, 1, 1)
    std = torch.tensor(preprocess.std).reshape(1, -1, 1, 1)
    pixels = (images * std + mean).clamp(0, 1)
    classes = labels.unique()[:max_classes]
    c, h, w = images.shape[1:]
    gap = 2
    grid = torch.ones(c, len(classes) * (h + gap) - gap, per_class * (w + gap) - gap)
    for row, k in enumerate(classes):
        for col, image in enumerate(pixels[labels == k][:per_class]):
            grid[:, row * (h + gap) : row * (h + gap) + h, col * (w + gap) : col * (w + gap) + w] = image
    array = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return array[:, :, 0] if c == 1 else array
