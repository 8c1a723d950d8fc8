"""Pictures of predictions: the photo with the coloured class map blended over it and a legend.

Drawn with PIL alone (no matplotlib), one legend row per class present in the prediction, largest
first, with its share of the image.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LEGEND_MAX = 20  # classes listed; the rest are summed in one line


def overlay(rgb: np.ndarray, pred: np.ndarray, palette: np.ndarray, names: list[str], alpha: float = 0.5) -> np.ndarray:
    """HxWx3 uint8: ``rgb`` blended with the palette colours of ``pred`` (HxW class ids), a legend on the right."""
    colours = palette[np.clip(pred, 0, len(palette) - 1)]
    blended = (rgb.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha).astype(np.uint8)
    classes, counts = np.unique(pred, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    height, width = pred.shape
    size = max(12, min(22, height // 30))
    font = ImageFont.load_default(size=size)
    row = size + 8
    shown = order[:LEGEND_MAX]
    legend_w = 16 * size
    canvas = Image.new("RGB", (width + legend_w, max(height, row * (len(shown) + 2) + 8)), (255, 255, 255))
    canvas.paste(Image.fromarray(blended), (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((width + 10, 6), "predicted classes", fill=(0, 0, 0), font=font)
    for k, i in enumerate(shown):
        cls, share = int(classes[i]), counts[i] / pred.size
        y = 8 + row * (k + 1)
        draw.rectangle((width + 10, y, width + 10 + size, y + size), fill=tuple(int(c) for c in palette[cls]), outline=(0, 0, 0))
        name = names[cls] if cls < len(names) else f"class {cls}"
        draw.text((width + 18 + size, y), f"{name} {100 * share:.1f}%", fill=(0, 0, 0), font=font)
    if len(order) > LEGEND_MAX:
        rest = counts[order[LEGEND_MAX:]].sum() / pred.size
        draw.text((width + 10, 8 + row * (len(shown) + 1)), f"{len(order) - LEGEND_MAX} more: {100 * rest:.1f}%",
                  fill=(80, 80, 80), font=font)
    return np.asarray(canvas)
