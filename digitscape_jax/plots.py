"""Image grids of digits, written as exact 8-bit grayscale PNGs, and the loss curves.

Every file is written whole or not at all (`files.write_atomically`): a run killed while
drawing leaves the previous picture, never a truncated one that the next run cannot read.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from digitscape_jax.errors import UserError
from digitscape_jax.files import write_atomically
from digitscape_jax.metrics import BOOKKEEPING, label

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


def _write_encoded(path: str | Path, encode: Callable[[io.BytesIO], None]) -> Path:
    """Encodes a picture into memory with `encode`, then writes it to `path` atomically."""
    buffer = io.BytesIO()
    encode(buffer)
    return write_atomically(path, buffer.getvalue())


def save_image(path: str | Path, image: np.ndarray) -> Path:
    """Writes a uint8 (H, W) image as a grayscale PNG, creating the folder if needed."""
    return _write_encoded(path, lambda out: Image.fromarray(image, mode="L").save(out, format="PNG"))


def save_grid(path: str | Path, images: np.ndarray, rows: int, cols: int) -> Path:
    """Writes `images` as a rows x cols grid PNG."""
    return save_image(path, image_grid(images, rows, cols))


def save_gif(path: str | Path, frames: list[np.ndarray], frame_ms: int = 400) -> Path:
    """Writes uint8 grayscale frames as a looping GIF."""
    images = [Image.fromarray(frame, mode="L") for frame in frames]
    return _write_encoded(path, lambda out: images[0].save(
        out, format="GIF", save_all=True, append_images=images[1:], duration=frame_ms, loop=0))


# Metrics drawn together in one panel; every other metric gets a panel of its own.
PANELS = (("loss", ("d_loss", "g_loss")), ("discriminator output", ("d_real", "d_fake")),
          ("FD to MNIST test (lower is better)", ("fd", "fd_held_out")), ("inception score (10 is best)", ("is",)))


def metric_panels(records: list[dict]) -> list[tuple[str, tuple[str, ...]]]:
    """(title, metric names) of each panel, for the metrics that `records` hold, in order."""
    names = list(dict.fromkeys(k for r in records for k in r if k not in BOOKKEEPING))
    grouped = {name for _, keys in PANELS for name in keys}
    panels = [(title, tuple(k for k in keys if k in names)) for title, keys in PANELS]
    panels += [(label(name), (name,)) for name in names if name not in grouped]
    return [(title, keys) for title, keys in panels if keys]


def plot_metrics(records: list[dict], path: str | Path) -> Path:
    """Draws every logged metric against step, from metrics.jsonl records: the losses, D's
    mean outputs, FD and IS where measured, and any other metric in a panel of its own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = metric_panels(records)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5),
                             constrained_layout=True, squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            ax.plot(*zip(*points), label=label(key), marker="." if len(points) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    try:
        return _write_encoded(path, lambda out: fig.savefig(out, format="png", dpi=100))
    finally:
        plt.close(fig)


def plot_fd_over_time(runs: dict[str, list[dict]], path: str | Path,
                      title: str = "FD against wall-clock time") -> Path:
    """FD against wall-clock minutes, a line per run, from each run's metrics.jsonl records
    that hold both `fd` and `wall_s` (a run with none is a UserError)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), constrained_layout=True)
    for name, records in runs.items():
        points = [(r["wall_s"] / 60, r["fd"]) for r in records if "fd" in r and "wall_s" in r]
        if not points:
            plt.close(fig)
            raise UserError(f"{name}: no metrics.jsonl records with both fd and wall_s")
        ax.plot(*zip(*points), marker="o", markersize=3, label=name)
    ax.set(xlabel="wall-clock minutes", ylabel="FD (lower is better)", yscale="log", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    try:
        return _write_encoded(path, lambda out: fig.savefig(out, format="png", dpi=120))
    finally:
        plt.close(fig)
