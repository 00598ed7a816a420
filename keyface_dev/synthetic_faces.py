"""Generated test images for detection (tests/test_detection.py and benchmarks/detection.py draw the same ones)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Where the patch sits on obama_and_biden.jpg (on the suits, away from the faces), and its radius.
PATCH_CENTRE_RADIUS = (1000, 1150, 90)


def round_patch(image: np.ndarray, seed: int = 204) -> np.ndarray:
    """`image` (obama_and_biden.jpg) with a round coloured patch with blobs drawn on the suits: seed 204 of a search
    for patches that the plain HOG detector takes for a face."""
    base = Image.fromarray(image)
    cx, cy, r = PATCH_CENTRE_RADIUS
    rng = np.random.default_rng(seed)
    draw = ImageDraw.Draw(base)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(v) for v in rng.integers(60, 240, 3)))
    for _ in range(rng.integers(2, 6)):
        bx, by = rng.uniform(-0.6, 0.6, 2) * r
        br = rng.uniform(0.08, 0.3) * r
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        draw.ellipse((cx + bx - br, cy + by - br * rng.uniform(0.5, 1.5), cx + bx + br,
                      cy + by + br * rng.uniform(0.5, 1.5)), fill=colour)
    return np.asarray(base.filter(ImageFilter.GaussianBlur(2)))
