"""The evaluator: sample-quality metrics of digits against a reference MNIST test set.

`Evaluator` computes the test set's features and statistics once in each feature space
(`SPACES`: the `selection` classifier, in which choices are made, and the `held_out` one,
in which results are stated; see `classifier`), then scores any number of sample sets with
the metrics of `digitscape_jax.sample_metrics` (which describes them), each space's under
`spaces`. `during_training` is what the training loop logs with it; `calibration_sets` are
digits of known quality, from real to noise, that show where each metric puts them.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import jax
import numpy as np

from digitscape_jax import classifier
from digitscape_jax.config import Config
from digitscape_jax.errors import UserError
from digitscape_jax.sample_metrics import (K, NearestTrain, check_labels, class_fractions,
                                           feature_stats, frechet_distance, inception_score,
                                           kl_to_uniform, knn_radii, precision_recall_density,
                                           softmax)
from digitscape_jax.sampling import MNIST_TEST_CLASS_COUNTS, class_labels, generate

MIN_SAMPLES = K + 1
MEMORIZATION_PERCENTILE = 1.0
METRICS = ("fd", "inception_score", "classes", "precision_recall", "memorization")
SPACES = ("selection", "held_out")  # classifier.NETWORKS' names: where to choose, where to report
BLUR_SIGMA = 1.5  # of the blurred calibration set
NOISE_SIGMA = 0.1  # of the noisy calibration set, in pixels of [0, 1]
BINARY_THRESHOLD = 0.5  # of the binarised calibration set, in pixels of [0, 1]


class FeatureSpace:
    """One classifier's feature space, with the reference test digits' features and statistics
    (computed at once) and their k-NN radii for each reference size (when first needed)."""

    def __init__(self, network: classifier.Network, params: Any, test_images: np.ndarray,
                 k: int) -> None:
        self.network, self.params, self.k = network, params, k
        self.test_features, _ = self.classify(test_images)
        self.test_mu, self.test_sigma = feature_stats(self.test_features)
        self._radii: dict[int, np.ndarray] = {}

    def classify(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Features (N, D) and logits (N, 10) of uint8 digits (N, 28, 28)."""
        return classifier.classify(self.params, images, network=self.network)

    def reference(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The features of the test digits at `indices` (a reference of its size: see
        `Evaluator.reference_indices`) and their squared k-NN radii, cached by size."""
        features = self.test_features[indices]
        if len(indices) not in self._radii:
            self._radii[len(indices)] = knn_radii(features, self.k)
        return features, self._radii[len(indices)]

    def metrics(self, features: np.ndarray, logits: np.ndarray, reference: np.ndarray,
                metrics: Collection[str]) -> dict[str, Any]:
        """This space's `metrics` of digits with these features and logits."""
        result: dict[str, Any] = {}
        if "fd" in metrics:
            result["fd"] = frechet_distance(*feature_stats(features), self.test_mu,
                                            self.test_sigma)
        if "inception_score" in metrics:
            result["inception_score"] = inception_score(softmax(logits))
        if "precision_recall" in metrics:
            real, radii = self.reference(reference)
            result["precision"], result["recall"], result["density"] = (
                precision_recall_density(real, features, self.k, radii))
            result["k"] = self.k
        if "classes" in metrics:
            fractions = class_fractions(logits.argmax(1))
            result["class_fractions"] = [float(f) for f in fractions]
            result["class_kl"] = kl_to_uniform(fractions)
        return result


class Evaluator:
    """Metrics of uint8 digits against a reference test set, which it processes once.

    Built from arrays (uint8 (N, 28, 28)), and the test labels where known (their class
    counts are the mix a conditional generator is asked for; MNIST's test counts without
    them). `params` and `held_out_params` are the two spaces' classifier weights (the shipped
    ones by default). The test set's features and statistics in each space are computed at
    once; the k-NN radii of each reference size, the training digits in the form the
    nearest-neighbour scan needs, and the memorization threshold when first needed, then
    cached.
    """

    def __init__(self, test_images: np.ndarray, train_images: np.ndarray, *,
                 test_labels: np.ndarray | None = None, params: Any = None,
                 held_out_params: Any = None, k: int = K,
                 memorization_percentile: float = MEMORIZATION_PERCENTILE, seed: int = 0) -> None:
        self.test_images = classifier.check_images(test_images, "test images")
        self.train_images = classifier.check_images(train_images, "training images")
        if len(self.test_images) <= k:
            raise UserError(f"the reference needs more than k = {k} test digits")
        self.k = k
        self.memorization_percentile = memorization_percentile
        self.class_counts: tuple[int, ...] = (
            MNIST_TEST_CLASS_COUNTS if test_labels is None else
            tuple(int(c) for c in np.bincount(check_labels(test_labels, len(self.test_images)),
                                              minlength=classifier.CLASSES)))
        given = {"selection": params, "held_out": held_out_params}
        self.spaces = {name: FeatureSpace(
            classifier.NETWORKS[name],
            classifier.load(network=classifier.NETWORKS[name]) if given[name] is None
            else given[name], self.test_images, k) for name in SPACES}
        # Precision/recall references of smaller sizes: a fixed random subset.
        self._order = np.random.default_rng(seed).permutation(len(self.test_images))
        self._nearest: NearestTrain | None = None
        self._threshold: float | None = None

    def reference_indices(self, n: int) -> np.ndarray:
        """Which min(n, all) test digits are the precision/recall reference of n samples."""
        return np.sort(self._order[:n])

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
        """The `metrics` (names from METRICS) of uint8 digits (N, 28, 28), as a JSON-ready dict:

            {"n", "reference_n", "memorization_rate", "memorization_threshold",
             "label_accuracy" (with labels), "spaces": {space: {"fd", "inception_score",
             "precision", "recall", "density", "k", "class_fractions", "class_kl"}}}

        With `labels` (N,), the requested class of each digit, also `label_accuracy`, by the
        selection classifier. Memorization is in pixel space, so one figure for all spaces.
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
        result: dict[str, Any] = {"n": n, "reference_n": len(self.test_images)}
        if "memorization" in metrics:
            threshold = self.memorization_threshold
            result["memorization_rate"] = float(np.mean(self.nearest_train(images) < threshold))
            result["memorization_threshold"] = threshold
        reference = self.reference_indices(n)
        spaces = {}
        for name, space in self.spaces.items():
            features, logits = space.classify(images)
            if labels is not None and name == "selection":
                result["label_accuracy"] = float(np.mean(logits.argmax(1) == labels))
            spaces[name] = space.metrics(features, logits, reference, metrics)
        result["spaces"] = spaces
        return result


def during_training(evaluator: Evaluator, config: Config, variables: Any, key: jax.Array,
                    n: int) -> dict[str, float]:
    """What the training loop logs every --eval-every steps, of `n` digits from fixed noise
    (`key`): FD and IS in the selection space (`fd`, `is`), FD in the held-out space
    (`fd_held_out`), and for a conditional G, asked for the test set's class mix, the
    accuracy of its labels."""
    labels = class_labels(config, n, mix=evaluator.class_counts)
    images = generate(config, variables, key, n, labels=labels)
    result = evaluator.evaluate(images, labels, metrics=("fd", "inception_score"))
    selection, held_out = result["spaces"]["selection"], result["spaces"]["held_out"]
    quality = {"fd": selection["fd"], "is": selection["inception_score"],
               "fd_held_out": held_out["fd"]}
    if labels is not None:
        quality["label_accuracy"] = result["label_accuracy"]
    return quality


# --- Calibration: digits of known quality. ---


def gaussian_blur(images: np.ndarray, sigma: float = BLUR_SIGMA) -> np.ndarray:
    """uint8 digits blurred by a Gaussian (zero padding, kernel radius ceil(3 sigma))."""
    radius = int(np.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    x = np.pad(images.astype(np.float64), ((0, 0), (radius, radius), (radius, radius)))
    x = sum(w * x[:, i:i + x.shape[1] - 2 * radius] for i, w in enumerate(taps))
    x = sum(w * x[:, :, i:i + x.shape[2] - 2 * radius] for i, w in enumerate(taps))
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def binarise(images: np.ndarray, threshold: float = BINARY_THRESHOLD) -> np.ndarray:
    """uint8 digits with each pixel set to 255 where it is at least `threshold` (of 255),
    else 0."""
    return np.where(images >= threshold * 255, 255, 0).astype(np.uint8)


def add_noise(images: np.ndarray, rng: np.random.Generator,
              sigma: float = NOISE_SIGMA) -> np.ndarray:
    """uint8 digits plus N(0, sigma) noise (pixels in [0, 1]), rounded and clipped."""
    noisy = images + rng.normal(0.0, sigma * 255, images.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


REAL_TRAIN = "real train digits"  # the calibration set of real-vs-real FD


def calibration_sets(evaluator: Evaluator, train_labels: np.ndarray, n: int,
                     seed: int = 0) -> dict[str, np.ndarray]:
    """Sets of `n` digits with known quality (fewer where MNIST has fewer): the real ones,
    then the same training digits degraded, then wrong sets."""
    rng = np.random.default_rng(seed)
    train = evaluator.train_images
    train_subset = train[rng.permutation(len(train))[:n]]
    ones = np.flatnonzero(train_labels == 1)
    return {
        "real test digits (the reference itself)":
            evaluator.test_images[evaluator.reference_indices(n)],
        REAL_TRAIN: train_subset,
        f"blurred train digits (Gaussian, sigma {BLUR_SIGMA})": gaussian_blur(train_subset),
        f"binarised train digits (at {BINARY_THRESHOLD})": binarise(train_subset),
        f"noisy train digits (added N(0, {NOISE_SIGMA}))":
            add_noise(train_subset, np.random.default_rng([seed, 1])),
        "one class: train 1s, drawn with replacement": train[rng.choice(ones, n)],
        "uniform noise": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
    }
