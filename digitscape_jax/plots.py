"""Image grids of digits, written as exact 8-bit grayscale PNGs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

GRID_PAD = 2  # Pixels between tiles.
GRID_BACKGROUND = 128  # Mid-gray, so that the black edges of digits stay visible.


def grid_shape(n: int) -> tuple[int, int]:
    """Rows and columns of the squarest grid that holds `n` tiles."""
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def image_grid(images: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Tiles uint8 images (N, H, W) or (N, H, W, 1) row by row into one (rows*H, cols*W) image."""
    images = images.reshape(images.shape[:3])
    n, h, w = images.shape
    if n > rows * cols:
        raise ValueError(f"{n} images do not fit a {rows}x{cols} grid")
    step_h, step_w = h + GRID_PAD, w + GRID_PAD
    grid = np.full((rows * step_h - GRID_PAD, cols * step_w - GRID_PAD), GRID_BACKGROUND, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * step_h : r * step_h + h, c * step_w : c * step_w + w] = image
    return grid


def save_grid(path: str | Path, images: np.ndarray, rows: int, cols: int) -> Path:
    """Writes `images` as a rows x cols grid PNG, creating the folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(images, rows, cols), mode="L").save(path)
    return path
