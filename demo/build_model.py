"""(Re)builds the model that the demo page ships, from a checkpoint, in one command:

    python demo/build_model.py --ckpt CKPT --mnist-idx DIR --screenshot docs/demo.png

It measures G as `python -m digitscape_jax.evaluate` does (FD and IS of 10,000 digits in the
held-out feature space, the figures this project states; label accuracy if conditional), then
writes demo/model/generator.onnx as `sample.py --export-onnx` does, demo/model/generator.json:
the description that export writes, plus those numbers, and demo/model/generator.msgpack, the
same generator for `sample.py --ckpt` (as `sample.py --export` writes it).
With --screenshot, it also photographs the page running the new model, in headless Chromium.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # sample.py and digitscape_jax, without an install

import sample  # noqa: E402
from demo import browser  # noqa: E402
from demo.serve import SHIPPED_MODEL  # noqa: E402
from digitscape_jax import cli, evaluate  # noqa: E402
from digitscape_jax.files import write_atomically  # noqa: E402

MAX_BYTES = 5_000_000  # what the repository takes for the shipped model
SCREENSHOT_SEED = 7


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0].rstrip(":"),
                           formatter_class=cli.HelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True,
                   help="a checkpoint directory of train.py, or a generator .msgpack file")
    p.add_argument("--step", type=cli.positive_int, default=None,
                   help="which checkpoint step (default: the newest readable one)")
    p.add_argument("--raw", action="store_true",
                   help="G's trained weights instead of their moving average")
    p.add_argument("--mnist-idx", default=None, metavar="DIR",
                   help="the four MNIST IDX .gz files the evaluator compares with (default: "
                        "tfds's prepared mnist)")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="tfds's data dir")
    p.add_argument("--n", type=cli.positive_int, default=evaluate.DEFAULT_N,
                   help="digits the evaluator draws")
    p.add_argument("--out", type=Path, default=SHIPPED_MODEL, metavar="FILE.onnx",
                   help="the model; its description goes beside it, as .json")
    p.add_argument("--screenshot", type=Path, default=None, metavar="PNG",
                   help=f"also a screenshot of the page with the new model, at ?seed="
                        f"{SCREENSHOT_SEED} (needs chromium, playwright and npm ci --prefix demo)")
    args = p.parse_args(argv)
    if args.out.suffix != ".onnx":
        p.error(f"--out {args.out} must name a .onnx file")
    return args


def screenshot(model: Path, png: Path) -> None:
    """The whole page running `model`, 1000 pixels wide."""
    with browser.serve(model) as url, browser.chromium() as chromium:
        page = chromium.new_page(viewport={"width": 1000, "height": 600})
        page.goto(f"{url}?seed={SCREENSHOT_SEED}")
        browser.wait_for_renders(page, 1)
        png.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(png), full_page=True)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    source = ["--ckpt", str(args.ckpt), *(["--step", str(args.step)] if args.step else []),
              *(["--raw"] if args.raw else [])]
    with tempfile.TemporaryDirectory() as tmp:
        numbers = Path(tmp) / "quality.json"
        evaluate.main([*source, "--n", str(args.n), "--json", str(numbers),
                       *(["--mnist-idx", args.mnist_idx] if args.mnist_idx else []),
                       *(["--data-dir", args.data_dir] if args.data_dir else [])])
        quality = json.loads(numbers.read_text())
    sample.main([*source, "--export-onnx", str(args.out)])
    sample.main([*source, "--export", str(args.out.with_suffix(".msgpack"))])
    description = args.out.with_suffix(".json")
    info = json.loads(description.read_text())
    selection, held_out = quality["spaces"]["selection"], quality["spaces"]["held_out"]
    info.update({"fd": held_out["fd"], "is": held_out["inception_score"],
                 "space": "held-out", "fd_selection": selection["fd"],
                 "eval_samples": quality["n"]})
    if "label_accuracy" in quality:
        info["label_accuracy"] = quality["label_accuracy"]
    write_atomically(description, (json.dumps(info, indent=2) + "\n").encode())
    size = args.out.stat().st_size
    print(f"{args.out} ({size / 1e6:.1f} MB) and {description}: FD {info['fd']:.2f}, "
          f"IS {info['is']:.2f}")
    if size > MAX_BYTES:
        cli.warn(f"warning: {args.out} is over {MAX_BYTES / 1e6:.0f} MB, more than the "
                 "repository should carry (arch fast, small or seed fit)")
    if args.screenshot:
        screenshot(args.out, args.screenshot)
        print(f"the page with it -> {args.screenshot}")


if __name__ == "__main__":
    sys.exit(cli.run(main))
