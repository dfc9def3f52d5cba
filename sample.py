"""Draw digits from a trained generator: `python sample.py --ckpt ckpt/`."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from digitscape_jax import cli

INTERPOLATION_GRID = (8, 32)  # walks x frames


def grid(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"([1-9][0-9]{0,3})x([1-9][0-9]{0,3})", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLS such as 10x10, got {text!r}")
    return int(match[1]), int(match[2])


def parse_args(argv: Sequence[str] | None = None):
    p = cli.ArgumentParser(
        description="Generate digits from a checkpoint directory written by train.py, or from "
                    "a generator exported with --export; the model is rebuilt from the config "
                    "saved with it.",
        formatter_class=cli.HelpFormatter,
    )
    p.add_argument("--ckpt", type=Path, required=True,
                   help="a checkpoint directory of train.py, or a generator .msgpack file")
    p.add_argument("--step", type=cli.positive_int, default=None,
                   help="which checkpoint step to use (default: the newest readable one)")
    p.add_argument("--n", type=cli.positive_int, default=None,
                   help="how many digits to draw (default: 100, or ROWS*COLS of --grid)")
    p.add_argument("--grid", type=grid, default=None, metavar="ROWSxCOLS",
                   help="layout of the grid PNG (default: as square as possible); with "
                        "--interpolate, walks x frames (default: 8x32)")
    p.add_argument("--raw", action="store_true",
                   help="use G's trained weights instead of their moving average (see "
                        "train.py --ema-decay)")
    p.add_argument("--digit", type=int, choices=range(10), default=None, metavar="0-9",
                   help="draw only this digit (a --conditional checkpoint; by default it draws "
                        "a row of each digit)")
    p.add_argument("--seed", type=cli.seed, default=0,
                   help="seed of the noise; the same seed gives the same digits")
    p.add_argument("--out", type=Path, default=Path("samples.png"),
                   help="the grid PNG (with --interpolate, also the GIF beside it, as .gif)")
    p.add_argument("--npz", type=Path, default=None,
                   help="also write the digits as uint8 (N, 28, 28) under the key 'images'")
    p.add_argument("--save-individual", type=Path, default=None, metavar="DIR",
                   help="also write each digit as its own PNG, DIR/digit_00000.png, ...")
    p.add_argument("--interpolate", action="store_true",
                   help="walk the latent space in loops through random points (slerp for N(0,1) "
                        "noise, lerp for uniform): --out becomes a strip of one walk per row, "
                        "and the same path with .gif an animation of all walks")
    p.add_argument("--export", type=Path, default=None, metavar="FILE",
                   help="write G's variables and config to FILE (msgpack), loadable later with "
                        "--ckpt FILE, and draw nothing")
    p.add_argument("--export-savedmodel", type=Path, default=None, metavar="DIR",
                   help="write G as a TensorFlow SavedModel (generate(noise) -> images in "
                        "[-1, 1]) through jax2tf, and draw nothing")
    p.add_argument("--export-onnx", type=Path, default=None, metavar="FILE",
                   help="write G as an ONNX model (noise, and labels if conditional -> images "
                        "in [-1, 1], any batch size) through jax2onnx, with FILE's name and "
                        ".json what the page in demo/ needs to know of it, and draw nothing")
    args = p.parse_args(argv)
    if args.n is not None and args.grid is not None and args.n != args.grid[0] * args.grid[1]:
        p.error(f"--n {args.n} does not fill --grid {args.grid[0]}x{args.grid[1]}")
    if args.interpolate and args.n is not None:
        p.error("--interpolate takes its size from --grid WALKSxFRAMES, not --n")
    if args.out.suffix.lower() != ".png":
        p.error(f"--out {args.out} must name a .png file")
    for flag in ("npz", "export"):
        path = getattr(args, flag)
        if path is not None and (not path.name or path.name in (".", "..")):
            p.error(f"--{flag.replace('_', '-')} needs a file name, got {str(path)!r}")
    if args.export_onnx is not None and args.export_onnx.suffix != ".onnx":
        p.error(f"--export-onnx {args.export_onnx} must name a .onnx file")
    if args.npz is not None and args.npz.suffix != ".npz":
        args.npz = args.npz.with_name(args.npz.name + ".npz")  # what numpy would write
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    import jax
    import numpy as np

    from digitscape_jax import export
    from digitscape_jax.plots import grid_shape, image_grid, save_gif, save_grid
    from digitscape_jax.sampling import class_labels, generate, load_generator, render_walks

    config, variables, step = load_generator(args.ckpt, args.step, warn=cli.warn, raw=args.raw)
    source = (f"{args.ckpt} (step {step}, arch {config.arch}"
              f"{', conditional' if config.conditional else ''}{', raw weights' if args.raw else ''})")
    if args.export or args.export_savedmodel or args.export_onnx:
        if args.export:
            export.save_msgpack(args.export, config, variables, step)
            print(f"generator of {source} -> {args.export}")
        if args.export_savedmodel:
            export.save_savedmodel(args.export_savedmodel, config, variables)
            print(f"generator of {source} -> SavedModel {args.export_savedmodel}")
        if args.export_onnx:
            export.save_onnx(args.export_onnx, config, variables, step)
            print(f"generator of {source} -> ONNX {args.export_onnx} "
                  f"(and {args.export_onnx.with_suffix('.json')})")
        return

    key = jax.random.key(args.seed)
    if args.interpolate:
        walks, frames = args.grid or INTERPOLATION_GRID
        labels = class_labels(config, walks * frames, args.digit, rows_of=frames)
        strip = render_walks(config, variables, key, walks, frames, labels)
        images = strip.reshape(walks * frames, 28, 28)
        save_grid(args.out, images, walks, frames)
        gif = save_gif(args.out.with_suffix(".gif"),
                       [image_grid(strip[:, f], 1, walks) for f in range(frames)], frame_ms=120)
        print(f"{walks} latent walks of {frames} frames from {source} -> {args.out}, {gif}")
    else:
        n = args.n or (args.grid[0] * args.grid[1] if args.grid else 100)
        rows, cols = args.grid or grid_shape(n)
        labels = class_labels(config, n, args.digit, rows_of=cols)
        images = generate(config, variables, key, n, labels=labels)
        save_grid(args.out, images, rows, cols)
        print(f"{n} digits from {source} -> {args.out}")
    if args.npz:
        args.npz.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.npz, images=images,
                            **({} if labels is None else {"labels": labels}))
        print(f"raw digits -> {args.npz}")
    if args.save_individual:
        args.save_individual.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            save_grid(args.save_individual / f"digit_{i:05d}.png", image[None], 1, 1)
        print(f"{len(images)} single digits -> {args.save_individual}/")


if __name__ == "__main__":
    sys.exit(cli.run(main))
