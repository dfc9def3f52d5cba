"""Fast stand-ins for Flax's ConvTranspose, Conv and Dropout, with the same parameters.

The straightforward Flax networks (`nn.ConvTranspose`, `nn.Conv`, `nn.Dropout`)
ran a `dcgan` update at batch 256 4.7x slower than TF/Keras on the CPU. Each
layer here holds the same parameters as its Flax counterpart, under the same
names and shapes (so checkpoints and parameter counts are Flax's), initialises
its kernels as Keras does (Glorot uniform), and computes the same function
(Dropout: the same distribution of masks); only how XLA is asked to compute
it differs, for speed on XLA:CPU (docs/performance.md measures each change):

- `ConvTranspose` (`conv_transpose`): XLA:CPU runs a strided transposed
  convolution over the zero-dilated input, mostly multiplying zeros, and its
  kernel gradient is slower still. Here each output phase is an ordinary
  stride-1 convolution with the kernel taps that reach it, interleaved by
  depth-to-space: one stacked convolution below PER_PHASE_MIN_FEATURES output
  channels, one per phase from there up.
- `Conv` (`strided_conv`): the input gradient of a strided convolution is a
  transposed one, with the same zero-dilation cost; a custom VJP computes it
  with `conv_transpose` (2.5x faster for the discriminator's second layer),
  and leaves the forward pass and the kernel gradient to XLA.
- `Dropout`: generating random bits is most of dropout's cost on the CPU;
  16 bits per unit instead of 32 keep each unit with a probability exact to
  2**-16, and scale the kept ones by 1 / keep as `nn.Dropout` and Keras do.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

glorot_uniform = nn.initializers.glorot_uniform()  # Keras's default kernel initialiser
DIMENSIONS = ("NHWC", "HWIO", "NHWC")  # Layouts of convolution inputs, kernels and outputs.


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


def spectral_normalize(kernel: jax.Array) -> jax.Array:
    """`kernel` divided by its largest singular value as a (fan-in, fan-out) matrix (Miyato
    et al., 2018), computed exactly, with no state to carry: with `v` the top eigenvector of
    the smaller Gram matrix, held constant, sigma = |matrix @ v|, whose gradient u v^T is
    that of the singular value itself. Full-precision products: an accelerator's default
    (TF32, bfloat16) would move sigma by 1e-4 or more.
    """
    matrix = kernel.reshape(-1, kernel.shape[-1])
    if matrix.shape[0] < matrix.shape[1]:
        matrix = matrix.T
    highest = jax.lax.Precision.HIGHEST
    _, vectors = jnp.linalg.eigh(jnp.matmul(matrix.T, matrix, precision=highest))
    top = jax.lax.stop_gradient(vectors[:, -1])
    return kernel / jnp.linalg.norm(jnp.matmul(matrix, top, precision=highest))


class Conv(nn.Module):
    """`nn.Conv(padding='SAME')` with a square kernel, computed by `strided_conv`.

    It holds the same `kernel` and `bias` parameters; with `spectral_norm`, it convolves
    with the kernel divided by its largest singular value (`spectral_normalize`).
    """

    features: int
    kernel_size: int = 5
    strides: int = 1
    dtype: Any = jnp.float32  # of the computation; the parameters stay float32
    spectral_norm: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", glorot_uniform, (k, k, x.shape[-1], self.features))
        if self.spectral_norm:
            kernel = spectral_normalize(kernel)
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
