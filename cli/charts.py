"""Bar charts as PNG arrays, drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

import numpy as np


def bar_chart(title: str, rows: list[tuple[str, float]], unit: str, width: int = 900) -> np.ndarray:
    """uint8 (H, W, 3) image: one horizontal bar per (label, value), longest for the largest
    value, its value written after it."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    row_height, top, label_width = 16, 28, 330
    height = top + row_height * max(1, len(rows)) + 8
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), title, fill="black", font=font)
    largest = max((value for _, value in rows), default=0.0) or 1.0
    span = width - label_width - 90
    for index, (label, value) in enumerate(rows):
        y = top + index * row_height
        draw.text((8, y + 2), label[-52:], fill="black", font=font)
        length = max(1, round(span * max(value, 0.0) / largest))
        draw.rectangle((label_width, y + 3, label_width + length, y + row_height - 3), fill=(70, 110, 180))
        draw.text((label_width + length + 6, y + 2), f"{value:.3g} {unit}", fill="black", font=font)
    return np.asarray(image)
