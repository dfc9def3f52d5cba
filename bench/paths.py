"""Time whole `train.py` runs with each fast path against the plain one, interleaved.

Run from the repository root, with MNIST prepared (or given by --mnist-idx):

    python bench/paths.py --mnist-idx ../shared/mnist
    python bench/paths.py --arch dcgan --steps 200 --rounds 3 --json paths.json

Where bench.py times the update alone, this times what a run adds around it: the input
pipeline, the dispatch of each call, logging. Each variant is one `train.py` process (no
evaluation, no sample rows, one checkpoint at the end, no compilation cache), run in turn
(plain, then each variant, then plain again, ...) so that the machine's load falls on all
alike. Its speed is the median of the steps/s that `metrics.jsonl` records every `--log-every`
steps, leaving out the first interval (compilation); the table gives each variant's median
over the rounds and its ratio to the plain path's (above 1: faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from digitscape_jax import cli
from digitscape_jax.config import ARCHS, Config

VARIANTS = {
    "plain (tf.data stream)": [],
    "--steps-per-call 8": ["--steps-per-call", "8"],
    "--data-on-device": ["--data-on-device"],
    "--data-on-device --steps-per-call 8": ["--data-on-device", "--steps-per-call", "8"],
}


def run_once(args: argparse.Namespace, flags: list[str], workdir: Path) -> float:
    """One train.py run; the median steps/s of its logged intervals after the first."""
    ckpt = workdir / "ckpt"
    command = [sys.executable, str(REPO / "train.py"), "--arch", args.arch, "--steps",
               str(args.steps), "--log-every", str(args.log_every), "--eval-every", "0",
               "--sample-every", str(args.steps + 1), "--ckpt-every", str(args.steps),
               "--ckpt-dir", str(ckpt), "--samples-dir", str(workdir / "samples"),
               "--compile-cache", "", *flags]
    if args.batch_size:
        command += ["--batch-size", str(args.batch_size)]
    for name in ("mnist_idx", "data_dir"):
        if getattr(args, name):
            command += [f"--{name.replace('_', '-')}", getattr(args, name)]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"train.py {' '.join(flags)} failed:\n{result.stderr.strip()}")
    records = [json.loads(line) for line in (ckpt / "metrics.jsonl").open()]
    return statistics.median(r["steps_per_s"] for r in records[1:])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(ARCHS), default="seed")
    p.add_argument("--batch-size", type=cli.positive_int, default=None, help="default: the arch's")
    p.add_argument("--steps", type=cli.positive_int, default=800, help="steps per run")
    p.add_argument("--log-every", type=cli.positive_int, default=80,
                   help="steps per timed interval; a multiple of 8 keeps calls of 8 whole")
    p.add_argument("--rounds", type=cli.positive_int, default=2)
    p.add_argument("--mnist-idx", default=None, help="folder of the MNIST IDX .gz files")
    p.add_argument("--data-dir", default=None, help="tensorflow-datasets data dir")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results here")
    args = p.parse_args(argv)
    if args.steps < 3 * args.log_every:
        p.error("--steps must be at least 3 x --log-every, to time two intervals after the first")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    speeds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for i, (name, flags) in enumerate(VARIANTS.items()):
                workdir = Path(tmp) / f"{round_}-{i}"
                workdir.mkdir()
                speeds[name].append(run_once(args, flags, workdir))
                print(f"[round {round_ + 1}/{args.rounds}] {name}: {speeds[name][-1]:.2f} steps/s",
                      file=sys.stderr, flush=True)
    plain = statistics.median(speeds["plain (tf.data stream)"])
    rows = [{"variant": name, "steps_per_s": statistics.median(v),
             "vs_plain": statistics.median(v) / plain, "runs": v} for name, v in speeds.items()]
    batch = args.batch_size or Config(arch=args.arch).batch_size
    print(f"{args.arch} batch {batch}, {args.steps} steps per run, {args.rounds} round(s)\n")
    print(f"{'variant':<40} {'steps/s':>8} {'vs plain':>9}")
    for row in rows:
        print(f"{row['variant']:<40} {row['steps_per_s']:>8.2f} {row['vs_plain']:>9.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"arch": args.arch, "batch": batch,
                                               "steps": args.steps, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
