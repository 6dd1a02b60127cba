"""A grid of synthetic images, one row per class, back in pixel space, each row labelled with
its class name."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from ..data import Preprocess

GAP = 2  # pixels between images
LABEL_CHARS = 24  # longest class name shown in full


def preview_grid(images: Tensor, labels: Tensor, preprocess: Preprocess, class_names: list[str] | None = None,
                 per_class: int = 8, max_classes: int = 20) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3) array: up to `per_class` images of each of the first
    `max_classes` classes present, de-normalised with `preprocess`, 2-pixel gaps; with
    `class_names`, a white column on the left names each row's class."""
    mean = torch.tensor(preprocess.mean).reshape(1, -1, 1, 1)
    std = torch.tensor(preprocess.std).reshape(1, -1, 1, 1)
    pixels = (images * std + mean).clamp(0, 1)
    classes = labels.unique()[:max_classes]
    c, h, w = images.shape[1:]
    grid = torch.ones(c, len(classes) * (h + GAP) - GAP, per_class * (w + GAP) - GAP)
    for row, k in enumerate(classes):
        for col, image in enumerate(pixels[labels == k][:per_class]):
            grid[:, row * (h + GAP) : row * (h + GAP) + h, col * (w + GAP) : col * (w + GAP) + w] = image
    array = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    array = array[:, :, 0] if c == 1 else array
    if class_names is None:
        return array
    names = [_short(class_names[k]) for k in classes.tolist()]
    font = ImageFont.load_default()
    width = max(int(font.getlength(name)) for name in names) + 2 * GAP + 2
    column = Image.new("L" if c == 1 else "RGB", (width, array.shape[0]), "white")
    draw = ImageDraw.Draw(column)
    for row, name in enumerate(names):
        top, bottom = draw.textbbox((0, 0), name, font=font)[1::2]
        draw.text((GAP, row * (h + GAP) + (h - (bottom - top)) / 2 - top), name, fill="black", font=font)
    return np.concatenate([np.asarray(column), array], axis=1)


def _short(name: str) -> str:
    return name if len(name) <= LABEL_CHARS else name[: LABEL_CHARS - 3] + "..."
