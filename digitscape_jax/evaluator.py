"""The evaluator: sample-quality metrics of digits against a reference MNIST test set.

`Evaluator` computes the test set's classifier features and statistics once,
then scores any number of sample sets with the metrics of
`digitscape_jax.sample_metrics` (which describes them). `during_training` is
what the training loop logs with it; `calibration_sets` are digits of known
quality, from real to noise, that show where each metric puts them.
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
from digitscape_jax.sampling import class_labels, generate

MIN_SAMPLES = K + 1
MEMORIZATION_PERCENTILE = 1.0
METRICS = ("fd", "inception_score", "classes", "precision_recall", "memorization")
BLUR_SIGMA = 1.5  # of the blurred calibration set


class Evaluator:
    """Metrics of uint8 digits against a reference test set, which it processes once.

    Built from arrays (uint8 (N, 28, 28)). The test set's features and
    statistics are computed at once; the k-NN radii of each reference size, the
    training digits in the form the nearest-neighbour scan needs, and the
    memorization threshold when first needed, then cached.
    """

    def __init__(self, test_images: np.ndarray, train_images: np.ndarray, *,
                 params: Any = None, k: int = K,
                 memorization_percentile: float = MEMORIZATION_PERCENTILE, seed: int = 0) -> None:
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
