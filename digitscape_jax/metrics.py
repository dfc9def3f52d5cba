"""The run's metrics log: one JSON object per logged step, in `metrics.jsonl`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends logged metrics to `<directory>/metrics.jsonl` and reads them back."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / METRICS_FILE

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drops records past `step`: a resumed run logs those steps again."""
        kept = [r for r in self.read() if r["step"] <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def format_metrics(metrics: dict[str, float]) -> str:
    """One readable line: d_loss, g_loss, D(x) and D(G(z))."""
    return (f"d_loss {metrics['d_loss']:.4f}  g_loss {metrics['g_loss']:.4f}  "
            f"D(x) {metrics['d_real']:.3f}  D(G(z)) {metrics['d_fake']:.3f}")
