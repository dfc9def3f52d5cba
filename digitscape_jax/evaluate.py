"""How good are a generator's digits? Sample-quality metrics against MNIST, and their CLI.

    python -m digitscape_jax.evaluate --ckpt ckpt/ --mnist-idx ../shared/mnist
    python -m digitscape_jax.evaluate --npz samples.npz --json metrics.json
    python -m digitscape_jax.evaluate --calibrate --mnist-idx ../shared/mnist
    python -m digitscape_jax.evaluate --train-classifier --mnist-idx ../shared/mnist

Every metric compares the samples with the MNIST test set, through the small
classifier of `digitscape_jax.classifier` (uint8 digits (N, 28, 28) in):

- `fd`: the Fréchet distance between Gaussians fitted to the classifier's
  128-d penultimate features of the samples and of the test set (FID's formula,
  with this classifier in place of Inception). Lower is better; it is biased
  upwards for small samples, so compare FDs of equal sample counts.
- `inception_score`: exp(E_x KL(p(y|x) || p(y))) with the classifier's p(y|x):
  10 for confident, evenly spread classes, 1 for a single class or none.
- `class_fractions`, `class_kl`: how often each class is predicted, and the KL
  divergence of that histogram from uniform (0 to log 10 = 2.30).
- `precision`, `recall`: Kynkäänniemi et al. (2019), k = 3, in the feature
  space: the fraction of samples inside the union of the test digits' k-NN
  balls, and of test digits inside the samples' ones. The reference is
  min(N, 10,000) test digits, so both sets are the same size, as in the paper.
  Precision has a known blind spot: fakes that all fall in the large ball of an
  unusual real digit count as precise. Uniform noise does exactly that here
  (its features sit together, inside the balls of two or three odd test
  digits), so it scores a high precision. `density` (Naeem et al. 2020), the
  mean number of real balls holding a sample over k (about 1 for real digits),
  counts each such ball once and sees through it.
- `memorization_rate`: the fraction of samples whose nearest training digit
  (pixel-space L2, pixels in [0, 1]) is closer than `memorization_threshold`:
  the 1st percentile of the same distance over the held-out test digits. Real
  unseen digits score 0.01 by construction, copies of training digits 1.0.
  (Thin digits, 1s above all, have the nearest neighbours, so they dominate it.)
- `label_accuracy`, when per-sample requested labels are given: the fraction
  that the classifier puts in the requested class.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import zipfile
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from digitscape_jax import classifier, cli
from digitscape_jax.config import Config
from digitscape_jax.errors import UserError
from digitscape_jax.files import write_atomically
from digitscape_jax.sampling import class_labels, generate

K = 3  # Neighbours that set the radii of precision and recall.
MIN_SAMPLES = K + 1
MEMORIZATION_PERCENTILE = 1.0
METRICS = ("fd", "inception_score", "classes", "precision_recall", "memorization")
DEFAULT_N = 10_000
MIN_CLASSIFIER_ACCURACY = 0.99  # on the MNIST test set; a weaker one never replaces the shipped one
QUERY_BLOCK = 1000  # Rows of a distance matrix computed at once.
TRAIN_CHUNK = 10_000  # Training digits per step of the nearest-neighbour scan.
BLUR_SIGMA = 1.5


# --- The metrics, as plain functions of features and probabilities. ---


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (N, D), in float64."""
    features = np.asarray(features, np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix, via eigh."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians.

    tr (S1 S2)^(1/2) is computed as tr (S1^(1/2) S2 S1^(1/2))^(1/2), whose
    matrix is symmetric PSD: stable through eigh, with no complex parts.
    """
    root1 = sqrtm_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    distance = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root
    return float(max(distance, 0.0))


def softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def inception_score(probs: np.ndarray) -> float:
    """exp(mean_x KL(p(y|x) || p(y))), p(y) the mean of p(y|x) over the samples."""
    probs = np.clip(np.asarray(probs, np.float64), 1e-12, 1.0)
    marginal = probs.mean(0, keepdims=True)
    return float(np.exp(np.mean(np.sum(probs * (np.log(probs) - np.log(marginal)), 1))))


def class_fractions(predicted: np.ndarray, classes: int = classifier.CLASSES) -> np.ndarray:
    """How often each class is predicted, as fractions (classes,)."""
    return np.bincount(predicted, minlength=classes) / max(len(predicted), 1)


def kl_to_uniform(fractions: np.ndarray) -> float:
    """KL(fractions || uniform), with 0 log 0 = 0: 0 for even classes, log C for one."""
    f = fractions[fractions > 0]
    return float(np.sum(f * np.log(f * len(fractions))))


def _sq_distances(a: jax.Array, b: jax.Array, b_sq: jax.Array) -> jax.Array:
    """Squared L2 distances (A, B), through ||a||^2 + ||b||^2 - 2 a.b, clipped at 0."""
    return jnp.maximum(jnp.sum(a * a, 1)[:, None] + b_sq[None] - 2 * a @ b.T, 0.0)


def _tolerance(a: jax.Array, b_sq: jax.Array) -> jax.Array:
    """Float32 rounding of `_sq_distances`, so a point is inside its own zero-radius ball."""
    return 1e-5 * (jnp.sum(a * a, 1)[:, None] + b_sq[None])


@functools.partial(jax.jit, static_argnums=2)
def _kth_sq_block(block: jax.Array, points: jax.Array, k: int) -> jax.Array:
    d = _sq_distances(block, points, jnp.sum(points * points, 1))
    return -jax.lax.top_k(-d, k + 1)[0][:, k]  # the point itself is the 0th


def knn_radii(features: np.ndarray, k: int = K) -> np.ndarray:
    """Each point's squared distance (N,) to its k-th nearest other point of the set."""
    points = jnp.asarray(features, jnp.float32)
    if len(points) <= k:
        raise UserError(f"k-NN radii with k = {k} need more than {k} points, got {len(points)}")
    return np.concatenate([np.asarray(_kth_sq_block(points[i:i + QUERY_BLOCK], points, k))
                           for i in range(0, len(points), QUERY_BLOCK)])


@jax.jit
def _count_block(block: jax.Array, points: jax.Array, radii_sq: jax.Array) -> jax.Array:
    points_sq = jnp.sum(points * points, 1)
    d = _sq_distances(block, points, points_sq)
    return jnp.sum(d <= radii_sq[None] + _tolerance(block, points_sq), 1)


def ball_counts(queries: np.ndarray, points: np.ndarray, radii_sq: np.ndarray) -> np.ndarray:
    """How many balls around `points`, of squared radii `radii_sq`, hold each query (Q,)."""
    queries = jnp.asarray(queries, jnp.float32)
    points, radii_sq = jnp.asarray(points, jnp.float32), jnp.asarray(radii_sq, jnp.float32)
    return np.concatenate([np.asarray(_count_block(queries[i:i + QUERY_BLOCK], points, radii_sq))
                           for i in range(0, len(queries), QUERY_BLOCK)])


def precision_recall_density(real: np.ndarray, fake: np.ndarray, k: int = K,
                             real_radii_sq: np.ndarray | None = None
                             ) -> tuple[float, float, float]:
    """Precision, recall (Kynkäänniemi et al. 2019) and density (Naeem et al. 2020).

    Of feature sets real (N, D) and fake (M, D): precision is the fraction of
    fakes inside any real k-NN ball, recall the fraction of reals inside any
    fake one, density the mean number of real balls holding a fake, over k.
    """
    if real_radii_sq is None:
        real_radii_sq = knn_radii(real, k)
    counts = ball_counts(fake, real, real_radii_sq)
    recall = ball_counts(real, fake, knn_radii(fake, k)) > 0
    return float(np.mean(counts > 0)), float(recall.mean()), float(counts.mean() / k)


def _flat_pixels(images: np.ndarray | jax.Array) -> jax.Array:
    return jnp.asarray(images).reshape(len(images), -1).astype(jnp.float32) / 255.0


@jax.jit
def _nearest_sq_block(block: jax.Array, chunks: jax.Array, chunks_sq: jax.Array) -> jax.Array:
    queries = _flat_pixels(block)

    def chunk_min(best: jax.Array, chunk: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        pixels, pixels_sq = chunk
        d = _sq_distances(queries, _flat_pixels(pixels), pixels_sq)
        return jnp.minimum(best, d.min(1)), None

    return jax.lax.scan(chunk_min, jnp.full(len(queries), jnp.inf), (chunks, chunks_sq))[0]


class NearestTrain:
    """Pixel-space L2 distance (pixels in [0, 1]) from digits to their nearest training digit.

    The training digits stay on the device as uint8, in chunks of TRAIN_CHUNK (the last
    padded with copies of the first digit, which leave every minimum as it is).
    """

    def __init__(self, train_images: np.ndarray):
        train_images = classifier.check_images(train_images, "training images")
        if len(train_images) == 0:
            raise UserError("memorization needs training digits, got none")
        pad = -len(train_images) % TRAIN_CHUNK if len(train_images) > TRAIN_CHUNK else 0
        padded = np.concatenate([train_images, np.repeat(train_images[:1], pad, 0)])
        chunk = min(TRAIN_CHUNK, len(padded))
        self.chunks = jnp.asarray(padded.reshape(-1, chunk, 28, 28))
        self.chunks_sq = jax.vmap(lambda c: jnp.sum(_flat_pixels(c) ** 2, 1))(self.chunks)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Distances (N,) of uint8 digits (N, 28, 28)."""
        return np.concatenate([
            np.sqrt(np.asarray(_nearest_sq_block(images[i:i + QUERY_BLOCK], self.chunks,
                                                 self.chunks_sq)))
            for i in range(0, len(images), QUERY_BLOCK)])


def check_labels(labels: Any, n: int) -> np.ndarray:
    """Requested classes (N,) as integers 0-9, or a UserError saying why not."""
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"labels must be {n} integers (one per image), got {labels.dtype} "
                        f"{labels.shape}")
    if n and (labels.min() < 0 or labels.max() >= classifier.CLASSES):
        raise UserError(f"labels must be classes 0-{classifier.CLASSES - 1}")
    return labels.astype(np.int64)


# --- The evaluator: the reference statistics, computed once. ---


class Evaluator:
    """Metrics of uint8 digits against a reference test set, which it processes once.

    Built from arrays (uint8 (N, 28, 28)). The test set's features and
    statistics are computed at once; the k-NN radii of each reference size, the
    training digits in the form the nearest-neighbour scan needs, and the
    memorization threshold when first needed, then cached.
    """

    def __init__(self, test_images: np.ndarray, train_images: np.ndarray, *,
                 params: Any = None, k: int = K,
                 memorization_percentile: float = MEMORIZATION_PERCENTILE, seed: int = 0):
        self.params = classifier.load() if params is None else params
        self.test_images = classifier.check_images(test_images, "test images")
        self.train_images = classifier.check_images(train_images, "training images")
        if len(self.test_images) <= k:
            raise UserError(f"the reference needs more than k = {k} test digits")
        self.k = k
        self.memorization_percentile = memorization_percentile
        self.test_features, _ = classifier.classify(self.params, self.test_images)
        self.test_mu, self.test_sigma = feature_stats(self.test_features)
        # Precision/recall references of smaller sizes: a fixed random subset.
        self._order = np.random.default_rng(seed).permutation(len(self.test_images))
        self._radii: dict[int, np.ndarray] = {}
        self._nearest: NearestTrain | None = None
        self._threshold: float | None = None

    def reference_indices(self, n: int) -> np.ndarray:
        """Which min(n, all) test digits are the precision/recall reference of n samples."""
        return np.sort(self._order[:n])

    def reference(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """min(n, all) test digits' features and squared k-NN radii, cached by size."""
        n = min(n, len(self.test_features))
        features = self.test_features[self.reference_indices(n)]
        if n not in self._radii:
            self._radii[n] = knn_radii(features, self.k)
        return features, self._radii[n]

    def nearest_train(self, images: np.ndarray) -> np.ndarray:
        """Pixel-space distances (N,) of digits to their nearest training digit."""
        if self._nearest is None:
            self._nearest = NearestTrain(self.train_images)
        return self._nearest(images)

    @property
    def memorization_threshold(self) -> float:
        """The MEMORIZATION_PERCENTILE-th percentile of the test digits' nearest-train distances."""
        if self._threshold is None:
            self._threshold = float(np.percentile(self.nearest_train(self.test_images),
                                                  self.memorization_percentile))
        return self._threshold

    def evaluate(self, images: np.ndarray, labels: np.ndarray | None = None,
                 metrics: Collection[str] = METRICS) -> dict[str, Any]:
        """The `metrics` (names from METRICS) of uint8 digits (N, 28, 28), as a JSON-ready dict.

        With `labels` (N,), the requested class of each digit, also `label_accuracy`.
        """
        images = classifier.check_images(images)
        unknown = set(metrics) - set(METRICS)
        if unknown:
            raise UserError(f"unknown metrics {sorted(unknown)}; choose from {list(METRICS)}")
        n = len(images)
        if n < MIN_SAMPLES:
            raise UserError(f"need at least {MIN_SAMPLES} digits to evaluate, got {n}")
        if labels is not None:
            labels = check_labels(labels, n)
        features, logits = classifier.classify(self.params, images)
        predicted = logits.argmax(1)
        result: dict[str, Any] = {"n": n, "reference_n": len(self.test_images)}
        if "fd" in metrics:
            result["fd"] = frechet_distance(*feature_stats(features), self.test_mu, self.test_sigma)
        if "inception_score" in metrics:
            result["inception_score"] = inception_score(softmax(logits))
        if "classes" in metrics:
            fractions = class_fractions(predicted)
            result["class_fractions"] = [float(f) for f in fractions]
            result["class_kl"] = kl_to_uniform(fractions)
        if "precision_recall" in metrics:
            real, radii = self.reference(n)
            result["precision"], result["recall"], result["density"] = precision_recall_density(
                real, features, self.k, radii)
            result["k"] = self.k
        if "memorization" in metrics:
            threshold = self.memorization_threshold
            result["memorization_rate"] = float(np.mean(self.nearest_train(images) < threshold))
            result["memorization_threshold"] = threshold
        if labels is not None:
            result["label_accuracy"] = float(np.mean(predicted == labels))
        return result


def during_training(evaluator: Evaluator, config: Config, variables: Any, key: jax.Array,
                    n: int) -> dict[str, float]:
    """What the training loop logs every --eval-every steps: FD and IS of `n` digits from
    fixed noise (`key`), and for a conditional G the accuracy of its labels (0..9 in turn)."""
    labels = class_labels(config, n)
    images = generate(config, variables, key, n, labels=labels)
    result = evaluator.evaluate(images, labels, metrics=("fd", "inception_score"))
    quality = {"fd": result["fd"], "is": result["inception_score"]}
    if labels is not None:
        quality["label_accuracy"] = result["label_accuracy"]
    return quality


# --- Data. ---


def load_mnist(data_dir: str | None = None, mnist_idx: str | None = None
               ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """MNIST (train, test) as (uint8 images (N, 28, 28), labels (N,)).

    From the IDX files in `mnist_idx` when given (read directly, nothing is
    written), else from tfds's prepared `mnist` in `data_dir` (downloaded first
    if it can be).
    """
    from digitscape_jax import data  # TensorFlow: only when MNIST is needed

    if mnist_idx is not None:
        idx_dir = data.idx_folder(mnist_idx)
        return data.read_idx_split(idx_dir, "train"), data.read_idx_split(idx_dir, "test")
    data.prepare_mnist(data_dir)
    splits = [data.load_split(split, data_dir) for split in ("train", "test")]
    return tuple((images[..., 0], labels) for images, labels in splits)  # type: ignore[return-value]


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


def gaussian_blur(images: np.ndarray, sigma: float = BLUR_SIGMA) -> np.ndarray:
    """uint8 digits blurred by a Gaussian (zero padding, kernel radius ceil(3 sigma))."""
    radius = int(np.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    x = np.pad(images.astype(np.float64), ((0, 0), (radius, radius), (radius, radius)))
    x = sum(w * x[:, i:i + x.shape[1] - 2 * radius] for i, w in enumerate(taps))
    x = sum(w * x[:, :, i:i + x.shape[2] - 2 * radius] for i, w in enumerate(taps))
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def calibration_sets(evaluator: Evaluator, train_labels: np.ndarray, n: int,
                     seed: int = 0) -> dict[str, np.ndarray]:
    """Sets of `n` digits with known quality (fewer where MNIST has fewer), best first."""
    rng = np.random.default_rng(seed)
    train = evaluator.train_images
    train_subset = train[rng.permutation(len(train))[:n]]
    ones = np.flatnonzero(train_labels == 1)
    return {
        "real test digits (the reference itself)":
            evaluator.test_images[evaluator.reference_indices(n)],
        "real train digits": train_subset,
        f"blurred train digits (Gaussian, sigma {BLUR_SIGMA})": gaussian_blur(train_subset),
        "one class: train 1s, drawn with replacement": train[rng.choice(ones, n)],
        "uniform noise": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
    }


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
    (train_images, train_labels), (test_images, test_labels) = load_mnist(args.data_dir,
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
        (train_images, train_labels), (test_images, _) = load_mnist(args.data_dir, args.mnist_idx)
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
