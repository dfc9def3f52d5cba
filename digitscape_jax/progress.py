"""What a person watching training sees: a progress bar on a terminal or in a notebook, plain
lines elsewhere."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

from digitscape_jax.metrics import format_metrics


class Progress:
    """A tqdm bar with ETA, steps/s and the latest metrics when `stream` is a terminal, or a
    Jupyter kernel's output (a notebook cell, Colab's included: it redraws the bar on `\\r`).

    Elsewhere (CI, nohup, files) it prints one plain line per report instead, so that logs
    stay readable.
    """

    def __init__(self, start: int, total: int, stream: TextIO | None = None):
        self.stream = stream = stream or sys.stdout
        self.total = total
        self.started = time.perf_counter()
        terminal = stream.isatty()
        self.bar = (tqdm(total=total, initial=start, unit="step", file=stream,
                         dynamic_ncols=terminal)
                    if terminal or in_notebook(stream) else None)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def report(self, step: int, steps_per_s: float, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(format_metrics(metrics), refresh=False)
        else:
            self.write(f"step {step}/{self.total}  {steps_per_s:.2f} steps/s  "
                       f"{format_metrics(metrics)}")

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> float:
        """Ends the bar; returns the wall time since the start, in seconds."""
        if self.bar is not None:
            self.bar.close()
        return time.perf_counter() - self.started


def in_notebook(stream: TextIO) -> bool:
    """Whether `stream` is the output of a Jupyter kernel (ipykernel's, as in Colab)."""
    iostream = sys.modules.get("ipykernel.iostream")  # Present only inside a kernel.
    out_stream = getattr(iostream, "OutStream", None)
    return out_stream is not None and isinstance(stream, out_stream)


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {seconds:02d}s" if hours else f"{minutes}m {seconds:02d}s"
