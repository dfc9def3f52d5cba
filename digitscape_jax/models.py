"""The generator and discriminator, with Keras's defaults where they differ from Flax's.

Their convolutions and dropout are the fast layers of `digitscape_jax.layers`,
which compute what Flax's own would, with the same parameters.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from digitscape_jax.clusters import cluster_bounds, draw_clusters
from digitscape_jax.config import Config, Network, NoiseKind
from digitscape_jax.layers import Conv, ConvTranspose, Dropout, glorot_uniform

# Keras defaults that the original model relies on.
LEAKY_SLOPE = 0.3
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3

IMAGE_SHAPE = (28, 28, 1)
SEED_SIZE = 7  # The generator's first feature map is SEED_SIZE x SEED_SIZE.
LABEL_EMBEDDING = 16  # Size of the label embedding a conditional generator appends to its noise.


def sample_noise(key: jax.Array, kind: NoiseKind, shape: tuple[int, ...]) -> jax.Array:
    """The latent prior: U[0, 1) as in the original, or N(0, 1) as in the TF tutorial."""
    if kind == "uniform":
        return jax.random.uniform(key, shape)
    return jax.random.normal(key, shape)


def leaky_relu(x: jax.Array) -> jax.Array:
    return nn.leaky_relu(x, negative_slope=LEAKY_SLOPE)


def batch_norm(train: bool, dtype: Any) -> nn.BatchNorm:
    """Keras's BatchNorm; its statistics are reduced and kept in float32 whatever `dtype` is."""
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                        dtype=dtype)


class Generator(nn.Module):
    """Noise (N, latent_dim) -> images (N, 28, 28, 1) in [-1, 1].

    `dtype` is the compute dtype (bfloat16 for mixed precision); params and
    BatchNorm statistics are float32 either way. With `num_classes`, it draws
    the class `labels` asks for: a learned embedding of the class joins the noise.
    With `draws_labels` too (self-conditioning, `clusters.py`), the classes are
    clusters, and where no `labels` are given the noise's first entry picks one
    by the clusters' frequencies (the "constants" collection); the rest of the
    noise draws the digit. With `clusters_per_label` as well (a conditional G on
    clusters within each label), `labels` are digits, and the first entry picks
    one of the digit's clusters, by their frequencies within it. The update
    passes the classes themselves (`classes`: the real batch's clusters), which
    the noise then does not pick. `first_kernel` is the side of the first transposed
    convolution's kernel (Config.g_first_kernel).
    """

    network: Network
    dtype: Any = jnp.float32
    num_classes: int = 0
    draws_labels: bool = False
    clusters_per_label: int = 0
    first_kernel: int = 5  # Keras Digitscape's

    @nn.compact
    def __call__(self, z: jax.Array, train: bool, labels: jax.Array | None = None,
                 classes: jax.Array | None = None) -> jax.Array:
        c0 = self.network.g_dense_channels
        c1, c2 = self.network.g_conv_channels
        dtype = self.dtype
        if self.draws_labels:
            shape = self._cluster_shape()
            bounds = self.variable("constants", "cluster_bounds", lambda: cluster_bounds(
                jnp.full(shape, 1.0 / shape[-1]), self.network.noise))
            if classes is None and self.clusters_per_label:
                classes = (labels * self.clusters_per_label
                           + draw_clusters(z[:, 0], jnp.take(bounds.value, labels, axis=0)))
            elif classes is None:
                classes = draw_clusters(z[:, 0], bounds.value) if labels is None else labels
            z = z[:, 1:]
        elif classes is None:
            classes = labels
        if self.num_classes:
            z = jnp.concatenate([z, nn.Embed(self.num_classes, LABEL_EMBEDDING)(classes)],
                                axis=-1)
        x = nn.Dense(SEED_SIZE * SEED_SIZE * c0, use_bias=False, kernel_init=glorot_uniform,
                     dtype=dtype)(z)
        x = leaky_relu(batch_norm(train, dtype)(x))
        x = x.reshape(-1, SEED_SIZE, SEED_SIZE, c0)
        x = ConvTranspose(c1, kernel_size=self.first_kernel, strides=1, dtype=dtype)(x)
        x = leaky_relu(batch_norm(train, dtype)(x))
        x = leaky_relu(batch_norm(train, dtype)(ConvTranspose(c2, strides=2, dtype=dtype)(x)))
        return jnp.tanh(ConvTranspose(IMAGE_SHAPE[-1], strides=2, dtype=dtype)(x))

    def _cluster_shape(self) -> tuple[int, ...]:
        """The shape of the clusters' frequencies: (labels, clusters of each) or (clusters,)."""
        if self.clusters_per_label:
            return (self.num_classes // self.clusters_per_label, self.clusters_per_label)
        return (self.num_classes,)


def minibatch_std(x: jax.Array, group_size: int) -> jax.Array:
    """`x` (N, H, W, C) with one more channel: the standard deviation of each feature over
    each group of `group_size` consecutive samples (all of them, where N is smaller),
    averaged over the features, the same for every sample of the group.

    Groups are consecutive, not strided as in ProGAN: a fake batch drawn in mode-seeking
    pairs repeats its first half's classes in its second, so a strided group would hold a
    same-class pair that a real batch's groups do not.
    """
    n, height, width, _ = x.shape
    group_size = min(group_size, n)
    if n % group_size:
        raise ValueError(f"a batch of {n} does not split into groups of {group_size}")
    groups = x.astype(jnp.float32).reshape(n // group_size, group_size, -1)
    spread = jnp.sqrt(jnp.var(groups, axis=1) + 1e-8).mean(axis=-1)
    channel = jnp.broadcast_to(jnp.repeat(spread, group_size)[:, None, None, None],
                               (n, height, width, 1))
    return jnp.concatenate([x, channel.astype(x.dtype)], axis=-1)


class Discriminator(nn.Module):
    """Images (N, 28, 28, 1) -> real/fake logits (N, 1), float32 whatever the compute dtype.

    With `num_classes`, a projection discriminator (Miyato & Koyama, 2018): the
    logit adds the inner product of the features with an embedding of `labels`.
    `dropout_rate` 0 leaves dropout out; `std_group_size` adds the minibatch
    standard deviation to the last convolution's features (0: not);
    `spectral_norm` divides each convolution's kernel by its largest singular value.
    """

    network: Network
    dtype: Any = jnp.float32
    num_classes: int = 0
    dropout_rate: float = 0.3  # Keras Digitscape's
    std_group_size: int = 0
    spectral_norm: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, labels: jax.Array | None = None) -> jax.Array:
        for channels in self.network.d_channels:
            x = Conv(channels, strides=2, dtype=self.dtype, spectral_norm=self.spectral_norm)(x)
            x = leaky_relu(x)
            if self.dropout_rate:
                x = Dropout(self.dropout_rate)(x, deterministic=not train)
        if self.std_group_size:
            x = minibatch_std(x, self.std_group_size)
        x = x.reshape(x.shape[0], -1)
        logits = nn.Dense(1, kernel_init=glorot_uniform, dtype=self.dtype)(x).astype(jnp.float32)
        if self.num_classes:
            embedding = nn.Embed(self.num_classes, x.shape[-1])(labels)
            logits += jnp.sum(embedding * x.astype(jnp.float32), axis=-1, keepdims=True)
        return logits


def networks(config: Config, dtype: Any = jnp.float32) -> tuple[Generator, Discriminator]:
    """G and D of `config`'s arch, conditioned on labels or clusters when it says so,
    computing in `dtype`."""
    classes = config.label_count
    return (Generator(config.network, dtype, classes, draws_labels=config.clusters > 0,
                      clusters_per_label=config.clusters if config.conditional else 0,
                      first_kernel=config.g_first_kernel),
            Discriminator(config.network, dtype, classes, config.d_dropout, config.minibatch_std,
                          spectral_norm=config.spectral_norm == "convs"))
