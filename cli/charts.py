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


def curve_chart(title: str, points: list[tuple[float, float, str]], target_size: float | None = None,
                target_agreement: float | None = None, width: int = 720, height: int = 440) -> np.ndarray:
    """uint8 (H, W, 3) image: agreement (y, percent) against size (x, ratio to float) of
    `points` (x, y, kind): "curve" points joined by a line in size order, "uniform" and
    "chosen" points marked and labelled; the budget as a dashed line."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), title, fill="black", font=font)
    left, right, top, bottom = 60, width - 20, 30, height - 40
    xs = [x for x, _, _ in points] + ([target_size] if target_size is not None else [])
    ys = [y for _, y, _ in points] + ([target_agreement] if target_agreement is not None else [])
    x0, x1 = 0.0, max(xs + [0.1]) * 1.05
    y0, y1 = max(0.0, min(ys + [100.0]) - 2.0), 100.0
    y0 = min(y0, y1 - 1.0)

    def at(x: float, y: float) -> tuple[float, float]:
        return left + (right - left) * (x - x0) / (x1 - x0), bottom - (bottom - top) * (y - y0) / (y1 - y0)

    draw.rectangle((left, top, right, bottom), outline="black")
    for step in range(6):
        x, y = x0 + (x1 - x0) * step / 5, y0 + (y1 - y0) * step / 5
        px, _ = at(x, y0)
        _, py = at(x0, y)
        draw.line((px, bottom, px, bottom + 4), fill="black")
        draw.text((px - 12, bottom + 6), f"{x:.2f}", fill="black", font=font)
        draw.line((left - 4, py, left, py), fill="black")
        draw.text((8, py - 6), f"{y:.1f}", fill="black", font=font)
    draw.text(((left + right) // 2 - 90, height - 18), "ONNX size / float ONNX size", fill="black", font=font)
    draw.text((left + 4, top + 4), "top-1 agreement with float, held-out images (%)", fill="black", font=font)
    dash = (200, 60, 60)
    if target_size is not None:
        px, _ = at(target_size, y0)
        for y in range(top, bottom, 8):
            draw.line((px, y, px, min(y + 4, bottom)), fill=dash)
    if target_agreement is not None:
        _, py = at(x0, target_agreement)
        for x in range(left, right, 8):
            draw.line((x, py, min(x + 4, right), py), fill=dash)
    curve = sorted((x, y) for x, y, kind in points if kind == "curve")
    if len(curve) > 1:
        draw.line([at(x, y) for x, y in curve], fill=(70, 110, 180), width=2)
    for x, y, kind in points:
        px, py = at(x, y)
        if kind == "curve":
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=(70, 110, 180))
        elif kind == "chosen":
            draw.ellipse((px - 6, py - 6, px + 6, py + 6), outline=(200, 60, 60), width=3)
            draw.text((px + 8, py - 14), "chosen", fill=(200, 60, 60), font=font)
        else:
            draw.rectangle((px - 4, py - 4, px + 4, py + 4), fill=(90, 90, 90))
            draw.text((px + 7, py + 2), kind, fill=(90, 90, 90), font=font)
    return np.asarray(image)
