"""Draw digits from a trained checkpoint: `python sample.py --ckpt ckpt/`."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from digitscape_jax import cli


def parse_args(argv: Sequence[str] | None = None):
    p = cli.ArgumentParser(
        description="Generate digits from a checkpoint directory written by train.py; the "
                    "model is rebuilt from the config saved with the checkpoint.",
        formatter_class=cli.HelpFormatter,
    )
    p.add_argument("--ckpt", type=Path, required=True, help="checkpoint directory of a run")
    p.add_argument("--step", type=cli.positive_int, default=None,
                   help="which checkpoint step to use (default: the latest)")
    p.add_argument("--n", type=cli.positive_int, default=100, help="how many digits to draw")
    p.add_argument("--seed", type=cli.non_negative_int, default=0,
                   help="seed of the noise; the same seed gives the same digits")
    p.add_argument("--out", type=Path, default=Path("samples.png"),
                   help="grid PNG of the digits, as square as possible")
    p.add_argument("--npz", type=Path, default=None,
                   help="also write the digits as uint8 (N, 28, 28) under the key 'images'")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    import jax
    import numpy as np

    from digitscape_jax.plots import grid_shape, save_grid
    from digitscape_jax.sampling import generate, load_generator

    config, variables, step = load_generator(args.ckpt, args.step, warn=cli.warn)
    images = generate(config, variables, jax.random.key(args.seed), args.n)
    save_grid(args.out, images, *grid_shape(args.n))
    print(f"{args.n} digits from {args.ckpt} (step {step}, arch {config.arch}) -> {args.out}")
    if args.npz:
        args.npz.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.npz, images=images)
        print(f"raw digits -> {args.npz}")


if __name__ == "__main__":
    sys.exit(cli.run(main))
