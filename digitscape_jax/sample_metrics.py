"""The sample-quality metrics, as plain functions of features, probabilities and pixels.

`evaluator.Evaluator` applies them to digits, against the MNIST test set,
through the small classifier of `digitscape_jax.classifier` (uint8 digits
(N, 28, 28) in), and reports them under these names:

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

The k-NN and nearest-neighbour searches run as jitted blocks of distance
matrices, QUERY_BLOCK rows at a time, so their memory stays bounded.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from digitscape_jax import classifier
from digitscape_jax.errors import UserError

K = 3  # Neighbours that set the radii of precision and recall.
QUERY_BLOCK = 1000  # Rows of a distance matrix computed at once.
TRAIN_CHUNK = 10_000  # Training digits per step of the nearest-neighbour scan.


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
    """Class probabilities (N, C) of logits (N, C), row by row, in float64."""
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
    """Squared distance of each row of `block` to its k-th nearest other point of `points`.

    The point itself is the nearest; k times, each row's nearest is set aside, and the
    minimum left is the k-th other's. `lax.top_k`, the same values, sorts each row on
    XLA:CPU: about 18x slower for a block of 1,000 rows against 10,000 points.
    """
    d = _sq_distances(block, points, jnp.sum(points * points, 1))
    rows = jnp.arange(len(d))
    for _ in range(k):
        d = d.at[rows, jnp.argmin(d, 1)].set(jnp.inf)
    return d.min(1)


def knn_radii(features: np.ndarray, k: int = K) -> np.ndarray:
    """Each point's squared distance (N,) to its k-th nearest other point of the set."""
    points = jnp.asarray(features, jnp.float32)
    if len(points) <= k:
        raise UserError(f"k-NN radii with k = {k} need more than {k} points, got {len(points)}")
    return np.concatenate([np.asarray(_kth_sq_block(points[i:i + QUERY_BLOCK], points, k))
                           for i in range(0, len(points), QUERY_BLOCK)])


@jax.jit
def _count_block(block: jax.Array, points: jax.Array, radii_sq: jax.Array) -> jax.Array:
    """How many of the balls around `points` hold each row of `block`."""
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
    """uint8 digits (N, 28, 28) as float32 rows (N, 784) in [0, 1]."""
    return jnp.asarray(images).reshape(len(images), -1).astype(jnp.float32) / 255.0


@jax.jit
def _nearest_sq_block(block: jax.Array, chunks: jax.Array, chunks_sq: jax.Array) -> jax.Array:
    """Squared pixel distance of each digit of `block` to its nearest one in `chunks`."""
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

    def __init__(self, train_images: np.ndarray) -> None:
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
