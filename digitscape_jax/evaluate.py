"""How good are a generator's digits? The command line of the sample-quality metrics.

    python -m digitscape_jax.evaluate --ckpt ckpt/ --mnist-idx ../shared/mnist
    python -m digitscape_jax.evaluate --npz samples.npz --json metrics.json
    python -m digitscape_jax.evaluate --calibrate --mnist-idx ../shared/mnist
    python -m digitscape_jax.evaluate --train-classifier --mnist-idx ../shared/mnist

It scores digits drawn from a checkpoint, or read from an .npz, with
`evaluator.Evaluator` against the MNIST test set (`sample_metrics` describes
each metric); `--calibrate` scores digits of known quality instead, and
`--train-classifier` retrains the classifier whose features the metrics use.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from digitscape_jax import classifier, cli
from digitscape_jax.errors import UserError
from digitscape_jax.evaluator import (MEMORIZATION_PERCENTILE, MIN_SAMPLES, Evaluator,
                                      calibration_sets)
from digitscape_jax.files import write_atomically
from digitscape_jax.sample_metrics import check_labels
from digitscape_jax.sampling import class_labels, generate

DEFAULT_N = 10_000
MIN_CLASSIFIER_ACCURACY = 0.99  # on the MNIST test set; a weaker one never replaces the shipped one


# --- The digits of --npz. ---


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """The uint8 digits under 'images' (what `sample.py --npz` writes) and any 'labels'."""
    if not path.is_file():
        raise UserError(f"--npz {path}: no such file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise UserError(f"--npz {path} holds one .npy array, not an .npz archive")
        with loaded as npz:
            if "images" not in npz.files:
                raise UserError(f"--npz {path} has no 'images' array (it holds {npz.files})")
            images = npz["images"]
            labels = npz["labels"] if "labels" in npz.files else None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"--npz {path} is not a readable .npz file: {e}") from None
    images = classifier.check_images(images, f"the 'images' of {path}")
    if labels is not None:
        labels = check_labels(labels, len(images))
    return images, labels


# --- Reports. ---


def format_report(result: dict[str, Any], source: str) -> str:
    """A readable table of one evaluation."""
    rows = [(f"{result['n']} digits from {source}, vs {result['reference_n']} MNIST test digits",
             "")]
    if "fd" in result:
        rows.append(("FD, classifier features (lower is better)", f"{result['fd']:.3f}"))
    if "inception_score" in result:
        rows.append(("classifier inception score (max 10)", f"{result['inception_score']:.3f}"))
    if "class_kl" in result:
        rows.append(("class KL to uniform (max 2.303)", f"{result['class_kl']:.4f}"))
    if "precision" in result:
        rows.append((f"precision, k={result['k']} (best 1)", f"{result['precision']:.4f}"))
        rows.append((f"recall, k={result['k']} (best 1)", f"{result['recall']:.4f}"))
        rows.append((f"density, k={result['k']} (real about 1)", f"{result['density']:.4f}"))
    if "memorization_rate" in result:
        name = (f"memorization rate (nearest train < {result['memorization_threshold']:.3f}; "
                f"unseen digits {MEMORIZATION_PERCENTILE / 100:.2f})")
        rows.append((name, f"{result['memorization_rate']:.4f}"))
    if "label_accuracy" in result:
        rows.append(("label accuracy (requested class)", f"{result['label_accuracy']:.4f}"))
    width = max(len(name) for name, _ in rows[1:]) + 2
    lines = [rows[0][0]] + [f"  {name:<{width}}{value:>9}" for name, value in rows[1:]]
    if "class_fractions" in result:
        lines.append("  class fractions: " + "  ".join(
            f"{c}: {f:.3f}" for c, f in enumerate(result["class_fractions"])))
    return "\n".join(lines)


def calibration_table(results: dict[str, dict[str, Any]]) -> str:
    """The calibration as a markdown table."""
    lines = ["| digits | n | FD | IS | class KL | precision | recall | density | memorization |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['n']} | {r['fd']:.2f} | {r['inception_score']:.2f} | "
                     f"{r['class_kl']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                     f"{r['density']:.3f} | {r['memorization_rate']:.3f} |")
    return "\n".join(lines)


# --- The command line. ---


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(
        prog="python -m digitscape_jax.evaluate",
        description="Measure the quality of generated digits against the MNIST test set: FD and "
                    "precision/recall in a small classifier's feature space, its inception "
                    "score, the class histogram, memorization of training digits and, given "
                    "requested labels, label accuracy.",
        formatter_class=cli.HelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", type=Path, default=None,
                        help="draw --n digits from this checkpoint directory or exported "
                             "generator (.msgpack); a conditional one is asked for 0..9 in "
                             "turn, and scored on label accuracy too")
    source.add_argument("--npz", type=Path, default=None,
                        help="evaluate the uint8 (N, 28, 28) digits under 'images' in this .npz "
                             "(as sample.py --npz writes), with per-digit 'labels' if present")
    source.add_argument("--calibrate", action="store_true",
                        help="evaluate sets of known quality (real, blurred, one class, noise) "
                             "and print a markdown table")
    source.add_argument("--train-classifier", action="store_true",
                        help="retrain the classifier on the MNIST training set and write it "
                             "to --classifier, with a JSON of its test accuracy beside it")
    p.add_argument("--step", type=cli.positive_int, default=None,
                   help="with --ckpt: which checkpoint step (default: the newest readable one)")
    p.add_argument("--raw", action="store_true",
                   help="with --ckpt: G's trained weights instead of their moving average")
    p.add_argument("--n", type=cli.positive_int, default=DEFAULT_N,
                   help="digits to draw with --ckpt, and per set with --calibrate")
    p.add_argument("--seed", type=cli.seed, default=0,
                   help="seed of the noise (--ckpt), the sets (--calibrate) or the training "
                        "(--train-classifier)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="also write the numbers to PATH as JSON")
    p.add_argument("--mnist-idx", default=None, metavar="DIR",
                   help="read MNIST from the four IDX .gz files in DIR (nothing is written); "
                        "without it, from tfds's prepared mnist in --data-dir")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="tensorflow-datasets data dir (tfds's default when unset)")
    p.add_argument("--classifier", type=Path, default=classifier.WEIGHTS, metavar="FILE",
                   help="the classifier's weights (msgpack)")
    p.add_argument("--epochs", type=cli.positive_int, default=classifier.EPOCHS,
                   help="with --train-classifier: passes over the training set")
    args = p.parse_args(argv)
    for flag in ("step", "raw"):
        if getattr(args, flag) not in (None, False) and args.ckpt is None:
            p.error(f"--{flag} needs --ckpt")
    for flag in ("json", "classifier"):
        path = getattr(args, flag)
        if path is not None and (not path.name or path.name in (".", "..")):
            p.error(f"--{flag} needs a file name, got {str(path)!r}")
    return args


def train_classifier(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    """Trains the classifier, writes it and its JSON to `args.classifier`; returns the JSON."""
    from digitscape_jax import data  # TensorFlow: only when MNIST is needed

    (train_images, train_labels), (test_images, test_labels) = data.load_mnist(args.data_dir,
                                                                               args.mnist_idx)
    start = time.perf_counter()
    params = classifier.train(train_images, train_labels, epochs=args.epochs, seed=args.seed,
                              log=log)
    seconds = time.perf_counter() - start
    predicted = classifier.classify(params, test_images)[1].argmax(1)
    info = {
        "test_accuracy": float(np.mean(predicted == test_labels)),
        "test_errors": int(np.sum(predicted != test_labels)),
        "test_n": len(test_labels),
        "train_n": len(train_labels),
        "epochs": args.epochs,
        "seed": args.seed,
        "batch_size": classifier.BATCH_SIZE,
        "learning_rate": classifier.LEARNING_RATE,
        "param_count": classifier.param_count(params),
        "train_seconds": round(seconds, 1),
        "architecture": f"3x3 conv {'/'.join(map(str, classifier.CONV_CHANNELS))}, each + ReLU + "
                        f"2x2 max-pool; dense {classifier.FEATURES} + ReLU (the features); "
                        f"dense {classifier.CLASSES}",
        "input": "uint8 (N, 28, 28) -> float32 / 255",
        "jax": jax.__version__,
    }
    summary = (f"test accuracy {info['test_accuracy']:.4f} ({info['test_errors']} errors of "
               f"{info['test_n']}), {info['param_count']} parameters, {seconds:.0f} s")
    weak = info["test_accuracy"] < MIN_CLASSIFIER_ACCURACY
    if weak and args.classifier.resolve() == classifier.WEIGHTS.resolve():
        raise UserError(f"the retrained classifier's {summary}: below {MIN_CLASSIFIER_ACCURACY}, "
                        "so the shipped weights were kept; pass --classifier FILE to keep it")
    classifier.save(args.classifier, params, info)
    log(f"classifier -> {args.classifier}: {summary}")
    if weak:
        cli.warn(f"warning: test accuracy {info['test_accuracy']:.4f} is below "
                 f"{MIN_CLASSIFIER_ACCURACY}")
    return info


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.train_classifier:
        output: Any = train_classifier(args)
    else:
        params = classifier.load(args.classifier)
        if args.npz is not None:  # Check the samples before reading MNIST.
            images, labels = read_npz(args.npz)
            if len(images) < MIN_SAMPLES:
                raise UserError(f"--npz {args.npz} holds {len(images)} digits; "
                                f"at least {MIN_SAMPLES} are needed")
            source = str(args.npz)
        elif args.ckpt is not None:
            from digitscape_jax.sampling import load_generator

            config, variables, step = load_generator(args.ckpt, args.step, warn=cli.warn,
                                                     raw=args.raw)
            if args.n < MIN_SAMPLES:
                raise UserError(f"--n {args.n}: at least {MIN_SAMPLES} digits are needed")
            labels = class_labels(config, args.n)  # 0..9 in turn if conditional, else None
            images = generate(config, variables, jax.random.key(args.seed), args.n, labels=labels)
            source = (f"{args.ckpt} (step {step}, arch {config.arch}, seed {args.seed}"
                      f"{', raw weights' if args.raw else ''})")
        from digitscape_jax import data  # TensorFlow: only when MNIST is needed

        (train_images, train_labels), (test_images, _) = data.load_mnist(args.data_dir,
                                                                         args.mnist_idx)
        evaluator = Evaluator(test_images, train_images, params=params)
        if args.calibrate:
            output = {name: evaluator.evaluate(images)
                      for name, images in calibration_sets(evaluator, train_labels, args.n,
                                                           args.seed).items()}
            print(calibration_table(output))
        else:
            output = evaluator.evaluate(images, labels)
            print(format_report(output, source))
    if args.json is not None:
        write_atomically(args.json, (json.dumps(output, indent=2) + "\n").encode())
        print(f"numbers -> {args.json}")


if __name__ == "__main__":
    sys.exit(cli.run(main))
