"""What a run leaves behind besides checkpoints: the metrics log, sample rows, the progress
GIF, the loss plots, the final grid and TensorBoard events."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from digitscape_jax import parallel
from digitscape_jax.config import NUM_CLASSES, Config
from digitscape_jax.metrics import MetricsLog, TensorBoardLog
from digitscape_jax.models import networks, sample_noise
from digitscape_jax.plots import image_grid, plot_metrics, save_gif, save_grid, save_image
from digitscape_jax.sampling import render
from digitscape_jax.steps import GeneratorState

REAL_IMAGES = "real_images.png"
FINAL_GRID = "generated_images.png"
PROGRESS_GIF = "progress.gif"
LOSSES_PLOT = "losses.png"
TENSORBOARD_DIR = "tensorboard"
ROW_LENGTH = 10  # Digits in each periodic sample row, as in the original.
FINAL_ROWS, FINAL_COLS = 4, 4


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """Where a run reads its data and writes its outputs."""

    ckpt_dir: Path
    samples_dir: Path
    data_dir: str | None = None
    mnist_idx: str | None = None
    tensorboard: bool = False

    def sample_row(self, step: int) -> Path:
        return self.samples_dir / f"generated_images_{step}.png"


def _read_frame(path: Path) -> np.ndarray | None:
    """An earlier sample row for the GIF, or None where it is missing or unreadable (say, cut
    short by a crash of an older version): the GIF is a view, and never stops training."""
    try:
        with Image.open(path) as image:
            return np.asarray(image)
    except (OSError, ValueError):
        return None


class RunOutputs:
    """The pictures and logs of a run, written at its logging and sampling points only.

    Every process computes the digits (they come from the replicated state);
    only the primary one writes files.
    """

    def __init__(self, config: Config, paths: RunPaths, sample_key: jax.Array,
                 sharding: jax.sharding.Sharding):
        self.config, self.paths = config, paths
        self.primary = parallel.is_primary()
        self.generator, _ = networks(config)
        n = FINAL_ROWS * FINAL_COLS
        # A conditional row of 10 counts 0 to 9; any other G draws from its noise alone (a
        # self-conditioned one, its clusters too).
        self.fixed_noise, self.fixed_labels = jax.device_put(
            (sample_noise(sample_key, config.network.noise, (n, config.latent_dim)),
             jnp.arange(n) % NUM_CLASSES if config.conditional else None), sharding)
        self.metrics = MetricsLog(paths.ckpt_dir)
        self.tensorboard = (TensorBoardLog(paths.ckpt_dir / TENSORBOARD_DIR)
                            if paths.tensorboard and self.primary else None)

    def log(self, record: dict[str, float]) -> None:
        if not self.primary:
            return
        self.metrics.append(record)
        if self.tensorboard:
            self.tensorboard.scalars(record["step"], {k: v for k, v in record.items() if k != "step"})

    def digits(self, g_state: GeneratorState, n: int) -> np.ndarray:
        labels = None if self.fixed_labels is None else self.fixed_labels[:n]
        return jax.device_get(render(self.generator, g_state.ema_variables, self.fixed_noise[:n],
                                     labels))

    def sample(self, step: int, g_state: GeneratorState) -> None:
        """The fixed-noise row of `step`, and the GIF and loss curves up to it."""
        row = image_grid(self.digits(g_state, ROW_LENGTH), 1, ROW_LENGTH)
        if not self.primary:
            return
        save_image(self.paths.sample_row(step), row)
        if self.tensorboard:
            self.tensorboard.image(step, "samples", row)
        earlier = range(self.config.sample_every, step, self.config.sample_every)
        frames = [frame for s in earlier  # written by earlier runs too
                  if (frame := _read_frame(self.paths.sample_row(s))) is not None]
        save_gif(self.paths.ckpt_dir / PROGRESS_GIF, [*frames, row])
        self.plot()

    def plot(self) -> None:
        records = self.metrics.read()
        if records:
            plot_metrics(records, self.paths.ckpt_dir / LOSSES_PLOT)

    def finish(self, g_state: GeneratorState) -> None:
        digits = self.digits(g_state, FINAL_ROWS * FINAL_COLS)
        if self.primary:
            save_grid(self.paths.ckpt_dir / FINAL_GRID, digits, FINAL_ROWS, FINAL_COLS)
            self.plot()

    def where(self) -> list[tuple[str, Path]]:
        """Every output of the run, for the closing summary."""
        ckpt, samples = self.paths.ckpt_dir, self.paths.samples_dir
        places = [("checkpoints", ckpt), ("metrics", self.metrics.path),
                  ("loss curves", ckpt / LOSSES_PLOT), ("progress GIF", ckpt / PROGRESS_GIF),
                  ("real digits", ckpt / REAL_IMAGES), ("final grid", ckpt / FINAL_GRID),
                  ("sample rows", samples / "generated_images_<step>.png")]
        if self.tensorboard:
            places.append(("TensorBoard", ckpt / TENSORBOARD_DIR))
        return places
