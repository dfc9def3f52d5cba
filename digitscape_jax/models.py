"""The generator and discriminator, with Keras's defaults where they differ from Flax's."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from digitscape_jax.config import ArchSpec, Config, NoiseKind

# Keras defaults that the original model relies on.
LEAKY_SLOPE = 0.3
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3
DROPOUT_RATE = 0.3
glorot_uniform = nn.initializers.glorot_uniform()

IMAGE_SHAPE = (28, 28, 1)
SEED_SIZE = 7  # The generator's first feature map is SEED_SIZE x SEED_SIZE.
NUM_CLASSES = 10
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


@functools.cache
def phase_taps(kernel_size: int, stride: int) -> tuple[np.ndarray, int, int]:
    """How a 'SAME' transposed convolution splits into `stride**2` ordinary ones.

    Output pixel `o = stride*m + p` of `lax.conv_transpose(x, k, stride, 'SAME')`
    sums `x[m + d] * k[t]` over the taps t with `(p + t - pad) % stride == 0`,
    where `d = (p + t - pad) // stride` and `pad` is the padding that
    `lax.conv_transpose` puts before the dilated input.

    Returns `taps[p, d - d_min]`, the kernel index t for each phase and offset
    (`kernel_size` where no tap contributes), and the padding `(-d_min, d_max)`.
    """
    pad_total = kernel_size + stride - 2
    pad = kernel_size - 1 if stride > kernel_size - 1 else -(-pad_total // 2)
    offsets = {
        (p, (p + t - pad) // stride): t
        for p in range(stride)
        for t in range(kernel_size)
        if (p + t - pad) % stride == 0
    }
    d_min = min(d for _, d in offsets)
    d_max = max(d for _, d in offsets)
    taps = np.full((stride, d_max - d_min + 1), kernel_size)
    for (p, d), t in offsets.items():
        taps[p, d - d_min] = t
    return taps, -d_min, d_max


class ConvTranspose(nn.Module):
    """The function of `nn.ConvTranspose(padding='SAME', use_bias=False)`, as one stride-1 conv.

    XLA:CPU computes the kernel gradient of a stride-2 transposed convolution
    very slowly. This module holds the same `kernel` parameter, of the same
    shape, and computes the same function: one stride-1 convolution to
    `stride**2 * features` channels (each output phase's taps, gathered from
    the kernel), then depth-to-space.
    """

    features: int
    kernel_size: int = 5
    strides: int = 1
    dtype: Any = jnp.float32  # of the computation; the kernel parameter stays float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s = self.kernel_size, self.strides
        kernel = self.param("kernel", glorot_uniform, (k, k, x.shape[-1], self.features))
        taps, pad_lo, pad_hi = phase_taps(k, s)
        padded = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))  # index k reads zeros
        # phase_kernel[dy, dx, cin, (py, px, cout)] = kernel[taps[py, dy], taps[px, dx]]
        phase_kernel = padded[taps][:, :, taps]  # (py, dy, px, dx, cin, cout)
        phase_kernel = phase_kernel.transpose(1, 3, 4, 0, 2, 5)
        n_taps = taps.shape[1]
        phase_kernel = phase_kernel.reshape(n_taps, n_taps, x.shape[-1], s * s * self.features)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            phase_kernel.astype(self.dtype),
            window_strides=(1, 1),
            padding=((pad_lo, pad_hi), (pad_lo, pad_hi)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        n, h, w, _ = y.shape
        y = y.reshape(n, h, w, s, s, self.features).transpose(0, 1, 3, 2, 4, 5)
        return y.reshape(n, h * s, w * s, self.features)


class Generator(nn.Module):
    """Noise (N, latent_dim) -> images (N, 28, 28, 1) in [-1, 1].

    `dtype` is the compute dtype (bfloat16 for mixed precision); params and
    BatchNorm statistics are float32 either way. With `num_classes`, it draws
    the digit `labels` asks for: a learned label embedding joins the noise.
    """

    spec: ArchSpec
    dtype: Any = jnp.float32
    num_classes: int = 0

    @nn.compact
    def __call__(self, z: jax.Array, train: bool, labels: jax.Array | None = None) -> jax.Array:
        c0 = self.spec.g_dense_channels
        c1, c2 = self.spec.g_conv_channels
        dtype = self.dtype
        if self.num_classes:
            z = jnp.concatenate([z, nn.Embed(self.num_classes, LABEL_EMBEDDING)(labels)], axis=-1)
        x = nn.Dense(SEED_SIZE * SEED_SIZE * c0, use_bias=False, kernel_init=glorot_uniform,
                     dtype=dtype)(z)
        x = leaky_relu(batch_norm(train, dtype)(x))
        x = x.reshape(-1, SEED_SIZE, SEED_SIZE, c0)
        x = leaky_relu(batch_norm(train, dtype)(ConvTranspose(c1, strides=1, dtype=dtype)(x)))
        x = leaky_relu(batch_norm(train, dtype)(ConvTranspose(c2, strides=2, dtype=dtype)(x)))
        return jnp.tanh(ConvTranspose(IMAGE_SHAPE[-1], strides=2, dtype=dtype)(x))


class Discriminator(nn.Module):
    """Images (N, 28, 28, 1) -> real/fake logits (N, 1), float32 whatever the compute dtype.

    With `num_classes`, a projection discriminator (Miyato & Koyama, 2018): the
    logit adds the inner product of the features with an embedding of `labels`.
    """

    spec: ArchSpec
    dtype: Any = jnp.float32
    num_classes: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, labels: jax.Array | None = None) -> jax.Array:
        for channels in self.spec.d_channels:
            x = nn.Conv(channels, (5, 5), strides=2, padding="SAME", kernel_init=glorot_uniform,
                        dtype=self.dtype)(x)
            x = nn.Dropout(DROPOUT_RATE, deterministic=not train)(leaky_relu(x))
        x = x.reshape(x.shape[0], -1)
        logits = nn.Dense(1, kernel_init=glorot_uniform, dtype=self.dtype)(x).astype(jnp.float32)
        if self.num_classes:
            embedding = nn.Embed(self.num_classes, x.shape[-1])(labels)
            logits += jnp.sum(embedding * x.astype(jnp.float32), axis=-1, keepdims=True)
        return logits


def networks(config: Config, dtype: Any = jnp.float32) -> tuple[Generator, Discriminator]:
    """G and D of `config`'s arch, label-conditional when it says so, computing in `dtype`."""
    classes = NUM_CLASSES if config.conditional else 0
    return (Generator(config.spec, dtype, classes), Discriminator(config.spec, dtype, classes))
