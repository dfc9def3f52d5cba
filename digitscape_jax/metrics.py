"""The run's metrics log: one JSON object per logged step, in `metrics.jsonl`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from digitscape_jax.errors import UserError
from digitscape_jax.files import write_atomically

METRICS_FILE = "metrics.jsonl"
# One record per (re)start of a run: its first step, and the code, libraries and machine
# that ran it (`provenance.describe`).
RUNS_FILE = "runs.jsonl"


class MetricsLog:
    """Appends JSON records to `<directory>/<name>` (metrics.jsonl) and reads them back."""

    def __init__(self, directory: str | Path, name: str = METRICS_FILE):
        self.path = Path(directory) / name

    def read(self) -> list[dict[str, Any]]:
        """The records; a line cut short by a crash mid-write is skipped."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> list[dict[str, Any]]:
        """Drops records past `step` (all of them for 0), atomically: they are logged again.
        Returns the records kept."""
        kept = [r for r in self.read() if r["step"] <= step]
        write_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        return kept


# How the known metrics read on screen and in plots; any other metric of the step or the
# evaluation shows as its own name, with 4 significant digits.
DISPLAY = {"d_loss": ("d_loss", "{:.4f}"), "g_loss": ("g_loss", "{:.4f}"),
           "d_real": ("D(x)", "{:.3f}"), "d_fake": ("D(G(z))", "{:.3f}"),
           "r1": ("R1", "{:.4f}"), "fd": ("FD", "{:.2f}"), "is": ("IS", "{:.2f}"),
           "fd_held_out": ("FD held-out", "{:.2f}"), "label_accuracy": ("label acc", "{:.3f}")}
# Fields of a metrics.jsonl record that are not metrics of the model. wall_s: seconds since
# the run began (data loading, compilation and evaluations included), over all its resumes;
# first_call_s, in the first record of each (re)start only: its first call, compilation
# included.
BOOKKEEPING = ("step", "steps_per_s", "wall_s", "first_call_s")


def label(name: str) -> str:
    """A metric's name on screen and in plots: D(x) for d_real, and so on."""
    return DISPLAY.get(name, (name, ""))[0]


def format_metrics(metrics: dict[str, float]) -> str:
    """One readable line of every metric: the known ones in DISPLAY's order (losses, D's
    outputs, then the sample quality where it was measured), then any other the step
    returns (jit hands dicts back with sorted keys, so the order is set here)."""
    names = sorted((n for n in metrics if n not in BOOKKEEPING),
                   key=lambda n: list(DISPLAY).index(n) if n in DISPLAY else len(DISPLAY))
    return "  ".join(f"{label(n)} {DISPLAY.get(n, (n, '{:.4g}'))[1].format(metrics[n])}"
                     for n in names)


class TensorBoardLog:
    """TensorBoard event files: the logged scalars and the sample grids, through tf.summary."""

    def __init__(self, directory: str | Path):
        try:
            import tensorboard  # noqa: F401  (tf.summary writes through it)
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        import tensorflow as tf

        self._tf = tf
        self._writer = tf.summary.create_file_writer(str(directory))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        with self._writer.as_default(step=step):
            for name, value in values.items():
                self._tf.summary.scalar(name, value)
        self._writer.flush()

    def image(self, step: int, name: str, grid) -> None:
        """`grid`: a uint8 (H, W) image."""
        with self._writer.as_default(step=step):
            self._tf.summary.image(name, grid[None, :, :, None])
        self._writer.flush()
