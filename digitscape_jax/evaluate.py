"""How good are a generator's digits? The command line of the sample-quality metrics.

    python -m digitscape_jax.evaluate --ckpt ckpt/ --mnist-idx ../shared/mnist
    python -m digitscape_jax.evaluate --npz samples.npz --json metrics.json
    python -m digitscape_jax.evaluate --calibrate --mnist-idx ../shared/mnist
    python -m digitscape_jax.evaluate --train-classifier --mnist-idx ../shared/mnist
    python -m digitscape_jax.evaluate --train-classifier --space held_out --mnist-idx ../shared/mnist

It scores digits drawn from a checkpoint, or read from an .npz, with
`evaluator.Evaluator` against the MNIST test set (`sample_metrics` describes
each metric), in each feature space: `selection` (where choices are made) and
`held_out` (where results are stated). `--calibrate` scores digits of known
quality instead, and `--train-classifier` retrains the classifier of one space.
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

from digitscape_jax import classifier, cli, records
from digitscape_jax.config import Config
from digitscape_jax.errors import UserError
from digitscape_jax.evaluator import (MEMORIZATION_PERCENTILE, MIN_SAMPLES, REAL_TRAIN,
                                      Evaluator, calibration_sets)
from digitscape_jax.files import write_atomically
from digitscape_jax.sample_metrics import K, check_labels
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


# Each space's metrics as rows of the report: (key, name, format); k fills in {k}.
SPACE_ROWS = (("fd", "FD, classifier features (lower is better)", "{:.3f}"),
              ("inception_score", "classifier inception score (max 10)", "{:.3f}"),
              ("class_kl", "class KL to uniform (max 2.303)", "{:.4f}"),
              ("precision", "precision, k={k} (best 1)", "{:.4f}"),
              ("recall", "recall, k={k} (best 1)", "{:.4f}"),
              ("density", "density, k={k} (real about 1)", "{:.4f}"))


def format_report(result: dict[str, Any], source: str) -> str:
    """A readable table of one evaluation: a column per feature space."""
    spaces = result["spaces"]
    names = list(spaces)
    k = next((s["k"] for s in spaces.values() if "k" in s), K)
    rows = [(name.format(k=k), [fmt.format(spaces[s][key]) if key in spaces[s] else ""
                                for s in names])
            for key, name, fmt in SPACE_ROWS if any(key in spaces[s] for s in names)]
    if "memorization_rate" in result:
        name = (f"memorization rate (nearest train < {result['memorization_threshold']:.3f}; "
                f"unseen digits {MEMORIZATION_PERCENTILE / 100:.2f})")
        rows.append((name, [f"{result['memorization_rate']:.4f}"]))  # pixels: all spaces'
    if "label_accuracy" in result:
        rows.append(("label accuracy (requested class)", [f"{result['label_accuracy']:.4f}"]))
    width = max([len(name) for name, _ in rows] + [0]) + 2
    lines = [f"{result['n']} digits from {source}, vs {result['reference_n']} MNIST test digits",
             f"  {'feature space':<{width}}" + "".join(f"{s:>11}" for s in names)]
    lines += [f"  {name:<{width}}" + "".join(f"{v:>11}" for v in values)
              for name, values in rows]
    for s in names:
        if "class_fractions" in spaces[s]:
            lines.append(f"  class fractions ({s}): " + "  ".join(
                f"{c}: {f:.3f}" for c, f in enumerate(spaces[s]["class_fractions"])))
    return "\n".join(lines)


def calibration_table(results: dict[str, dict[str, Any]], space: str) -> str:
    """The calibration in one feature space as a markdown table; `FD / real` is each FD over
    that of the real training digits (real-vs-real)."""
    real = results.get(REAL_TRAIN, {}).get("spaces", {}).get(space, {}).get("fd")
    lines = ["| digits | n | FD | FD / real | IS | class KL | precision | recall | density | "
             "memorization |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, result in results.items():
        r = result["spaces"][space]
        ratio = f"{r['fd'] / real:.1f}" if real else ""
        lines.append(f"| {name} | {result['n']} | {r['fd']:.2f} | {ratio} | "
                     f"{r['inception_score']:.2f} | {r['class_kl']:.3f} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r['density']:.3f} | "
                     f"{result['memorization_rate']:.3f} |")
    return "\n".join(lines)


def calibration_tables(results: dict[str, dict[str, Any]]) -> str:
    """The calibration as a markdown table per feature space, each under its name."""
    spaces = list(next(iter(results.values()))["spaces"]) if results else []
    return "\n\n".join(f"{space} space:\n\n{calibration_table(results, space)}"
                        for space in spaces)


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
                             "generator (.msgpack); a conditional one is asked for the test "
                             "set's class mix, and scored on label accuracy too")
    source.add_argument("--npz", type=Path, default=None,
                        help="evaluate the uint8 (N, 28, 28) digits under 'images' in this .npz "
                             "(as sample.py --npz writes), with per-digit 'labels' if present")
    source.add_argument("--calibrate", action="store_true",
                        help="evaluate sets of known quality (real, blurred, binarised, noisy, "
                             "one class, uniform noise) and print a markdown table per "
                             "feature space")
    source.add_argument("--train-classifier", action="store_true",
                        help="retrain the --space classifier on the MNIST training set and "
                             "write it to --classifier, with a JSON of its test accuracy beside "
                             "it")
    p.add_argument("--step", type=cli.positive_int, default=None,
                   help="with --ckpt: which checkpoint step (default: the newest readable one)")
    p.add_argument("--raw", action="store_true",
                   help="with --ckpt: G's trained weights instead of their moving average")
    p.add_argument("--n", type=cli.positive_int, default=DEFAULT_N,
                   help="digits to draw with --ckpt, and per set with --calibrate")
    p.add_argument("--seed", type=cli.seed, default=None,
                   help="seed of the noise (--ckpt) or the sets (--calibrate), 0 unless given; "
                        "of the training with --train-classifier, the --space network's "
                        "unless given")
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="also write the numbers to PATH as JSON")
    p.add_argument("--record", type=Path, default=None, metavar="DIR",
                   help="also write a result record to DIR/<name>.json (docs/results/ holds "
                        "the ones the docs show): the numbers with the code, libraries and "
                        "machine, and with --ckpt the run's config, speed and quality curve")
    p.add_argument("--mnist-idx", default=None, metavar="DIR",
                   help="read MNIST from the four IDX .gz files in DIR (nothing is written); "
                        "without it, from tfds's prepared mnist in --data-dir")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="tensorflow-datasets data dir (tfds's default when unset)")
    p.add_argument("--space", choices=list(classifier.NETWORKS), default="selection",
                   help="with --train-classifier: which feature space's classifier to train")
    p.add_argument("--classifier", type=Path, default=None, metavar="FILE",
                   help="the selection classifier's weights (msgpack; default: the shipped "
                        "ones); with --train-classifier, where the --space classifier goes "
                        "(default: its shipped file)")
    p.add_argument("--held-out-classifier", type=Path, default=None, metavar="FILE",
                   help="the held-out classifier's weights (default: the shipped ones)")
    p.add_argument("--epochs", type=cli.positive_int, default=None,
                   help="with --train-classifier: passes over the training set (default: the "
                        "--space network's)")
    args = p.parse_args(argv)
    if args.record is not None and args.train_classifier:
        p.error("--record goes with --ckpt, --npz or --calibrate")
    if args.record is not None and args.ckpt is not None and not args.ckpt.is_dir():
        p.error(f"--record needs --ckpt to be a training run's --ckpt-dir, got {args.ckpt}")
    for flag in ("step", "raw"):
        if getattr(args, flag) not in (None, False) and args.ckpt is None:
            p.error(f"--{flag} needs --ckpt")
    if args.seed is None:
        args.seed = classifier.NETWORKS[args.space].seed if args.train_classifier else 0
    if args.space != "selection" and not args.train_classifier:
        p.error("--space needs --train-classifier (evaluations report every space)")
    for flag in ("json", "classifier", "held_out_classifier"):
        path = getattr(args, flag)
        if path is not None and (not path.name or path.name in (".", "..")):
            p.error(f"--{flag.replace('_', '-')} needs a file name, got {str(path)!r}")
    return args


def train_classifier(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    """Trains the --space classifier, writes it and its JSON to `args.classifier` (default:
    its shipped file); returns the JSON."""
    from digitscape_jax import data  # TensorFlow: only when MNIST is needed

    network = classifier.NETWORKS[args.space]
    path = network.weights if args.classifier is None else args.classifier
    epochs = network.epochs if args.epochs is None else args.epochs
    seed = args.seed
    (train_images, train_labels), (test_images, test_labels) = data.load_mnist(args.data_dir,
                                                                               args.mnist_idx)
    start = time.perf_counter()
    params = classifier.train(train_images, train_labels, network=network, epochs=epochs,
                              seed=seed, log=log)
    seconds = time.perf_counter() - start
    predicted = classifier.classify(params, test_images, network=network)[1].argmax(1)
    info = {
        "space": network.name,
        "test_accuracy": float(np.mean(predicted == test_labels)),
        "test_errors": int(np.sum(predicted != test_labels)),
        "test_n": len(test_labels),
        "train_n": len(train_labels),
        "epochs": epochs,
        "seed": seed,
        "batch_size": network.batch_size,
        "learning_rate": network.learning_rate,
        "param_count": classifier.param_count(params),
        "train_seconds": round(seconds, 1),
        "architecture": network.describe(),
        "input": "uint8 (N, 28, 28) -> float32 / 255",
        "command": "python -m digitscape_jax.evaluate --train-classifier --space "
                   f"{network.name} --mnist-idx DIR",
        "jax": jax.__version__,
    }
    summary = (f"test accuracy {info['test_accuracy']:.4f} ({info['test_errors']} errors of "
               f"{info['test_n']}), {info['param_count']} parameters, {seconds:.0f} s")
    weak = info["test_accuracy"] < MIN_CLASSIFIER_ACCURACY
    if weak and path.resolve() == network.weights.resolve():
        raise UserError(f"the retrained classifier's {summary}: below {MIN_CLASSIFIER_ACCURACY}, "
                        "so the shipped weights were kept; pass --classifier FILE to keep it")
    classifier.save(path, params, info)
    log(f"classifier -> {path}: {summary}")
    if weak:
        cli.warn(f"warning: test accuracy {info['test_accuracy']:.4f} is below "
                 f"{MIN_CLASSIFIER_ACCURACY}")
    return info


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    config = None
    if args.train_classifier:
        output: Any = train_classifier(args)
    else:
        params = classifier.load(args.classifier)
        held_out_params = classifier.load(args.held_out_classifier, classifier.HELD_OUT)
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
            source = (f"{args.ckpt} (step {step}, arch {config.arch}, seed {args.seed}"
                      f"{', raw weights' if args.raw else ''})")
        from digitscape_jax import data  # TensorFlow: only when MNIST is needed

        (train_images, train_labels), (test_images, test_labels) = data.load_mnist(
            args.data_dir, args.mnist_idx)
        evaluator = Evaluator(test_images, train_images, test_labels=test_labels, params=params,
                              held_out_params=held_out_params)
        if args.ckpt is not None:
            # A conditional G is asked for the test set's class mix; an unconditional one: None.
            labels = class_labels(config, args.n, mix=evaluator.class_counts)
            images = generate(config, variables, jax.random.key(args.seed), args.n, labels=labels)
        if args.calibrate:
            output = {name: evaluator.evaluate(images)
                      for name, images in calibration_sets(evaluator, train_labels, args.n,
                                                           args.seed).items()}
            print(calibration_tables(output))
        else:
            output = evaluator.evaluate(images, labels)
            print(format_report(output, source))
    if args.json is not None:
        write_atomically(args.json, (json.dumps(output, indent=2) + "\n").encode())
        print(f"numbers -> {args.json}")
    if args.record is not None:
        print(f"record -> {records.write(args.record, make_record(args, output, config))}")


def make_record(args: argparse.Namespace, output: Any, config: Config | None) -> dict[str, Any]:
    """The result record of this evaluation (`records` describes them); `config`: that of
    --ckpt."""
    common = "".join(f" --{flag} {value}" for flag, value, default in
                     (("n", args.n, DEFAULT_N), ("seed", args.seed, 0)) if value != default)
    if args.calibrate:
        return records.make("calibration", "calibration", "python -m digitscape_jax.evaluate "
                            f"--calibrate{common} --record docs/results/", output)
    if args.npz is not None:
        return records.make("samples", f"samples-{args.npz.stem}",
                            f"python -m digitscape_jax.evaluate --npz {args.npz} "
                            "--record docs/results/", output)
    flags = (f"{common}{' --raw' if args.raw else ''}"
             f"{f' --step {args.step}' if args.step is not None else ''}")
    return records.training_record(config, args.ckpt, output, evaluate_flags=flags, raw=args.raw)


if __name__ == "__main__":
    sys.exit(cli.run(main))
