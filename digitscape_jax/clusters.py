"""Self-conditioning: k-means clusters of the training digits stand in for labels.

An unconditional GAN learns far faster as a conditional one whose classes are
clusters of its own training data, found without labels (Liu et al., 2020,
"Diverse Image Generation via Self-Conditioned GANs"; here k-means on pixels, or on
pixels normalised per digit, which groups digits by shape rather than by ink).
G and D are conditioned on the cluster of each real digit, and G draws a
cluster from its noise's first entry, by the clusters' frequencies, so that it
stays a function of noise alone for sampling, export and the demo.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from digitscape_jax.config import NUM_CLASSES, Config, NoiseKind
from digitscape_jax.errors import UserError

# Not bfloat16 (TPU) or TF32 (GPU): distances of 10-40 need float32's digits to assign points.
HIGHEST = jax.lax.Precision.HIGHEST

# Lloyd steps after k-means++: enough for the assignments to settle on MNIST (about 3 s
# for the training split on a 2-core CPU, paid at every start).
KMEANS_ITERATIONS = 20
# The clusters are the data's, not the run's: one key for every run and --seed, folded with a
# constant that no run key uses (those are split or folded with small numbers).
KMEANS_STREAM = 0x6B6D6561  # "kmea"


def kmeans(images: np.ndarray, k: int, features: str) -> tuple[np.ndarray, np.ndarray]:
    """Each uint8 image's cluster (int32 (N,)) and each cluster's share of the images
    (float32 (k,)), by Lloyd's k-means on `cluster_points(images, features)`, seeded by
    k-means++.

    Deterministic and independent of the run's --seed, in full float32 precision on any
    device: a run that resumes, with any seed, recomputes the same clusters. Fewer images
    than k is a user error."""
    check_cluster_count(k, len(images), "training images")
    pixels = cluster_points(images, features)
    centroids = _kmeans_plus_plus(pixels, jax.random.fold_in(jax.random.key(0), KMEANS_STREAM), k)
    for _ in range(KMEANS_ITERATIONS):
        centroids, assignments, counts = _lloyd_step(pixels, centroids)
    return np.asarray(assignments, np.int32), np.asarray(counts / len(images), np.float32)


def check_cluster_count(k: int, count: int, images_are: str) -> None:
    """Refuses k clusters of fewer than k images, naming them as `images_are`."""
    if k > count:
        raise UserError(f"--clusters {k} is more than the {count} {images_are}")


def cluster_points(images: np.ndarray, features: str) -> jax.Array:
    """Images as points to cluster (config.CLUSTER_FEATURES): 2x2-averaged pixels in [0, 1]
    (14 x 14 keeps a digit's shape, at a quarter of the distances' cost); 'normalised' then
    centres each digit's pixels and scales them to unit length, so that distances compare
    shapes (their correlation), not how much ink a digit holds: by the labels, which
    k-means never sees, 93.34% of the training digits share their cluster's most common
    label with 300 clusters, against 92.06% on pixels (92.22% and 90.96% with 200)."""
    pixels = jnp.asarray(images, jnp.float32).reshape(len(images), 14, 2, 14, 2) / 255.0
    pixels = pixels.mean(axis=(2, 4)).reshape(len(images), -1)
    if features == "pixels":
        return pixels
    centred = pixels - pixels.mean(axis=1, keepdims=True)
    # A blank image has no shape: it stays at the origin rather than dividing by zero.
    return centred / jnp.maximum(jnp.linalg.norm(centred, axis=1, keepdims=True), 1e-6)


@functools.partial(jax.jit, static_argnums=2)
def _kmeans_plus_plus(pixels: jax.Array, key: jax.Array, k: int) -> jax.Array:
    """k initial centroids (Arthur & Vassilvitskii, 2007): the first a random point, each next
    one drawn with probability proportional to its squared distance from those chosen, so
    that they spread over the data and no group starts without one."""
    first_key, key = jax.random.split(key)
    first = pixels[jax.random.randint(first_key, (), 0, len(pixels))]
    centroids = jnp.zeros((k, pixels.shape[1]), pixels.dtype).at[0].set(first)
    nearest = jnp.sum((pixels - first) ** 2, axis=1)

    def add(i, carry):
        centroids, nearest = carry
        chosen = pixels[jax.random.choice(jax.random.fold_in(key, i), len(pixels),
                                          p=nearest / jnp.sum(nearest))]
        return (centroids.at[i].set(chosen),
                jnp.minimum(nearest, jnp.sum((pixels - chosen) ** 2, axis=1)))

    return jax.lax.fori_loop(1, k, add, (centroids, nearest))[0]


@jax.jit
def _lloyd_step(pixels: jax.Array, centroids: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Assigns each point to its nearest centroid and moves each centroid to the mean of its
    points (an empty cluster keeps its centroid)."""
    distances = (jnp.sum(centroids**2, axis=1)  # + |x|^2, the same for every centroid
                 - 2 * jnp.matmul(pixels, centroids.T, precision=HIGHEST))
    assignments = jnp.argmin(distances, axis=1)
    members = jax.nn.one_hot(assignments, centroids.shape[0], dtype=pixels.dtype)
    counts = jnp.sum(members, axis=0)
    moved = (jnp.matmul(members.T, pixels, precision=HIGHEST)  # a matmul: fast on CPU
             / jnp.maximum(counts, 1.0)[:, None])
    return jnp.where(counts[:, None] > 0, moved, centroids), assignments, counts


def training_classes(config: Config, images: np.ndarray, labels: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray | None]:
    """What G and D are conditioned on for each training image, and the frequencies that G
    draws them by: the clusters (`--clusters`), the clusters within each label
    (`--conditional --clusters`), or the labels as they are (frequencies None)."""
    if config.clusters and config.conditional:
        return kmeans_within_labels(images, labels, NUM_CLASSES, config.clusters,
                                    config.cluster_features)
    if config.clusters:
        return kmeans(images, config.clusters, config.cluster_features)
    return labels, None


def kmeans_within_labels(images: np.ndarray, labels: np.ndarray, num_labels: int, k: int,
                         features: str) -> tuple[np.ndarray, np.ndarray]:
    """`kmeans` with k clusters within each label: each image's class, label * k + its
    cluster among its label's images (int32 (N,)), and each label's clusters' shares of
    that label (float32 (num_labels, k)).

    The label with the fewest images is checked against k before any clustering starts.
    Each label's image count is a shape of its own, so k-means compiles once per label."""
    members = [np.flatnonzero(labels == label) for label in range(num_labels)]
    fewest = min(range(num_labels), key=lambda label: len(members[label]))
    check_cluster_count(k, len(members[fewest]), f"training images of label {fewest}")
    classes = np.zeros(len(images), np.int32)
    frequencies = np.zeros((num_labels, k), np.float32)
    for label in range(num_labels):
        clusters, frequencies[label] = kmeans(images[members[label]], k, features)
        classes[members[label]] = label * k + clusters
    return classes, frequencies


def cluster_bounds(frequencies: jax.Array, noise: NoiseKind) -> jax.Array:
    """The k - 1 values of the noise's first entry that split its prior into the clusters'
    frequencies (the last axis; one row of bounds per row of frequencies): cluster c is
    drawn where it lies between bounds c - 1 and c."""
    cumulative = jnp.clip(jnp.cumsum(frequencies, axis=-1)[..., :-1], 0.0, 1.0)
    return cumulative if noise == "uniform" else jax.scipy.special.ndtri(cumulative)


def draw_clusters(first_noise: jax.Array, bounds: jax.Array) -> jax.Array:
    """The cluster (int32) that each noise's first entry falls in, between `bounds`: one
    row (k - 1,) for all, or a row per noise (N, k - 1)."""
    return jnp.sum(first_noise[:, None] > bounds, axis=1, dtype=jnp.int32)
