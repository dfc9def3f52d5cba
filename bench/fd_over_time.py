"""FD against wall-clock minutes, one line per run, drawn from the runs' metrics.jsonl.

    python bench/fd_over_time.py --out docs/fd_over_time.png \\
        fast=ckpt-fast/ dcgan=ckpt-dcgan/ seed=ckpt-seed/

Each run's points are the FD measurements its training logged (--eval-every),
at the wall time its records give (`wall_s`: since the run began, data loading,
compilation and evaluations included). Compare runs of one machine and one
--eval-samples.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from digitscape_jax import cli
from digitscape_jax.metrics import MetricsLog
from digitscape_jax.plots import plot_fd_over_time


def run_spec(text: str) -> tuple[str, Path]:
    name, sep, path = text.rpartition("=")  # the name may hold "=", as in "--lr=1e-3"
    if not (sep and name and path):
        raise argparse.ArgumentTypeError(f"expected NAME=CKPT_DIR, got {text!r}")
    return name, Path(path)


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=run_spec, metavar="NAME=CKPT_DIR")
    parser.add_argument("--out", type=Path, default=Path("fd_over_time.png"))
    args = parser.parse_args(argv)
    runs = {name: MetricsLog(ckpt_dir).read() for name, ckpt_dir in args.runs}
    print(f"wrote {plot_fd_over_time(runs, args.out)}")


if __name__ == "__main__":
    sys.exit(cli.run(main))
