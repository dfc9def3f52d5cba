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
DIMENSIONS = ("NHWC", "HWIO", "NHWC")  # Layouts of convolution inputs, kernels and outputs.


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


# From this many output channels up, `conv_transpose` runs one convolution per output
# phase (25% faster for dcgan's 128 -> 64 layer on the CPU); below it, one stacked
# convolution (3x faster for the 64 -> 1 layer, whose phases have one channel each).
PER_PHASE_MIN_FEATURES = 16


def conv_transpose(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """`lax.conv_transpose(x, kernel, stride, 'SAME')` (NHWC, HWIO), as stride-1 convolutions.

    XLA:CPU is slow at a strided transposed convolution: it runs a convolution
    over the zero-dilated input, mostly multiplying zeros, and its kernel
    gradient is slower still. Here output phase (py, px), the pixels at
    (stride*m + py, stride*n + px), is an ordinary convolution of `x` with the
    kernel taps that reach it; depth-to-space interleaves the phases.
    """
    k, features = kernel.shape[0], kernel.shape[-1]
    if k < stride:
        raise ValueError(f"a {k}x{k} kernel leaves gaps at stride {stride}: phases without taps")
    taps, pad_lo, pad_hi = phase_taps(k, stride)
    if features < PER_PHASE_MIN_FEATURES:
        # One convolution to (py, px, cout) channels; taps[p, d] == k reads zeros.
        padded = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))
        stacked = padded[taps][:, :, taps].transpose(1, 3, 4, 0, 2, 5)  # dy dx cin py px cout
        stacked = stacked.reshape(*stacked.shape[:3], stride * stride * features)
        y = jax.lax.conv_general_dilated(x, stacked, (1, 1), ((pad_lo, pad_hi),) * 2,
                                         dimension_numbers=DIMENSIONS)
        y = y.reshape(*y.shape[:3], stride, stride, features)
    else:
        # One convolution per phase, over the offsets where it has taps.
        reach = [np.flatnonzero(taps[p] < k) for p in range(stride)]
        y = jnp.stack([
            jnp.stack([
                jax.lax.conv_general_dilated(
                    x, kernel[taps[py, reach[py]]][:, taps[px, reach[px]]], (1, 1),
                    [(pad_lo - reach[p][0], reach[p][-1] - pad_lo) for p in (py, px)],
                    dimension_numbers=DIMENSIONS)
                for px in range(stride)], axis=3)
            for py in range(stride)], axis=3)  # n h w py px cout
    n, h, w = y.shape[:3]
    return y.transpose(0, 1, 3, 2, 4, 5).reshape(n, h * stride, w * stride, features)


def _conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), "SAME",
                                        dimension_numbers=DIMENSIONS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def strided_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """A 'SAME' convolution with `stride` (NHWC, HWIO) whose input gradient is `conv_transpose`.

    The input gradient of a strided convolution is a transposed one, which
    XLA:CPU runs over the zero-dilated output gradient: 2.5x slower than the
    phase form for the discriminator's second layer. The forward pass and the
    kernel gradient stay XLA's own, and so does the input gradient where the
    phase form does not apply: an input whose height or width `stride` does
    not divide, or a kernel narrower than `stride`.
    """
    return _conv(x, kernel, stride)


def _strided_conv_forward(x: jax.Array, kernel: jax.Array, stride: int):
    return _conv(x, kernel, stride), (x, kernel)


def _strided_conv_backward(stride: int, residuals: tuple[jax.Array, jax.Array], dy: jax.Array):
    x, kernel = residuals
    height, width = x.shape[1:3]
    if height % stride or width % stride or kernel.shape[0] < stride:
        return jax.vjp(lambda x, k: _conv(x, k, stride), x, kernel)[1](dy)
    _, kernel_backward = jax.vjp(lambda k: _conv(x, k, stride), kernel)
    (dkernel,) = kernel_backward(dy)
    # With the kernel flipped and its channels swapped, the gradient of 'SAME' padding
    # is 'SAME' padding of the transposed convolution.
    dx = conv_transpose(dy, jnp.flip(kernel, (0, 1)).swapaxes(2, 3), stride)
    return dx, dkernel


strided_conv.defvjp(_strided_conv_forward, _strided_conv_backward)


class ConvTranspose(nn.Module):
    """`nn.ConvTranspose(padding='SAME', use_bias=False)`, computed by `conv_transpose`.

    It holds the same `kernel` parameter, of the same shape.
    """

    features: int
    kernel_size: int = 5
    strides: int = 1
    dtype: Any = jnp.float32  # of the computation; the kernel parameter stays float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", glorot_uniform, (k, k, x.shape[-1], self.features))
        return conv_transpose(x.astype(self.dtype), kernel.astype(self.dtype), self.strides)


class Conv(nn.Module):
    """`nn.Conv(padding='SAME')` with a square kernel, computed by `strided_conv`.

    It holds the same `kernel` and `bias` parameters.
    """

    features: int
    kernel_size: int = 5
    strides: int = 1
    dtype: Any = jnp.float32  # of the computation; the parameters stay float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", glorot_uniform, (k, k, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        y = strided_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.strides)
        return y + bias.astype(self.dtype)


class Dropout(nn.Module):
    """`nn.Dropout`, drawing each unit's keep-or-drop from 16 random bits instead of 32.

    On the CPU, generating the random bits is most of dropout's cost, and a third
    of the seed model's update; a keep probability exact to 2**-16 needs no more.
    """

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        keep = 1.0 - self.rate
        words = jax.random.bits(self.make_rng("dropout"), (-(-x.size // 2),), jnp.uint32)
        halves = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:x.size]
        kept = halves.reshape(x.shape) < round(keep * 2**16)
        return jnp.where(kept, x / keep, jnp.zeros_like(x))


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
            x = Conv(channels, strides=2, dtype=self.dtype)(x)
            x = Dropout(DROPOUT_RATE)(leaky_relu(x), deterministic=not train)
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
