"""A built-in test image, so ``run`` and the tests need no image file."""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["make_test_card"]


def make_test_card(height: int = 336, width: int = 448) -> Image.Image:
    """Colour bars over a horizontal gradient with a dark square: structure at every scale."""
    y, x = np.mgrid[0:height, 0:width]
    bars = np.array(
        [
            [235, 235, 235],
            [235, 235, 16],
            [16, 235, 235],
            [16, 235, 16],
            [235, 16, 235],
            [235, 16, 16],
            [16, 16, 235],
            [16, 16, 16],
        ],
        dtype=np.float64,
    )
    rgb = bars[(x * len(bars)) // width]
    lower = y >= (2 * height) // 3
    rgb[lower] = (255.0 * x[lower] / (width - 1))[:, None]
    square = (abs(y - height // 3) < height // 8) & (abs(x - width // 2) < height // 8)
    rgb[square] = (40, 40, 40)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")
