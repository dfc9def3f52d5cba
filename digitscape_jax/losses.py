"""The GAN objectives, D's R1 penalty and the translation both halves see, as pure functions.

`train_step` combines them; each is tested on its own against a plain-JAX
reference (tests/test_losses.py).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

BACKGROUND = -1.0  # An empty MNIST pixel, in the [-1, 1] range the networks see.
MODE_SEEKING_EPSILON = 1e-5  # The reference implementation's, against dividing by 0.


def bce_with_logits(logits: jax.Array, label: float) -> jax.Array:
    return optax.sigmoid_binary_cross_entropy(logits, jnp.full_like(logits, label)).mean()


def discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array, kind: str) -> jax.Array:
    """D's loss, the mean of its real and fake halves: binary cross-entropy ("bce"), or the
    hinge ("hinge": relu(1 - D(x)) and relu(1 + D(G(z))))."""
    if kind == "hinge":
        real, fake = jax.nn.relu(1.0 - real_logits).mean(), jax.nn.relu(1.0 + fake_logits).mean()
    else:
        real, fake = bce_with_logits(real_logits, 1.0), bce_with_logits(fake_logits, 0.0)
    return (real + fake) / 2


def generator_loss(fake_logits: jax.Array, kind: str) -> jax.Array:
    """G's loss: the non-saturating -log D(G(z)) ("bce"), or -D(G(z)) ("hinge")."""
    if kind == "hinge":
        return -fake_logits.mean()
    return bce_with_logits(fake_logits, 1.0)


def mode_seeking_loss(fake: jax.Array, noise: jax.Array) -> jax.Array:
    """The mode-seeking term (Mao et al., 2019), pairing the batch's first half with its second:
    the inverse of the mean absolute difference between paired fakes over that between their
    noises. G minimises it, so two noises of one class must draw two different digits."""
    half = fake.shape[0] // 2
    spread = (jnp.abs(fake[:half] - fake[half:]).mean()
              / jnp.abs(noise[:half] - noise[half:]).mean())
    return 1.0 / (spread + MODE_SEEKING_EPSILON)


def r1_penalty(logits_of: Callable[[jax.Array], jax.Array], real: jax.Array) -> jax.Array:
    """R1 (Mescheder et al., 2018): the mean over the batch of the squared norm of the
    gradient of D's logit with respect to its real input image."""
    grads = jax.grad(lambda images: logits_of(images).sum())(real)
    return jnp.sum(jnp.square(grads), axis=tuple(range(1, grads.ndim))).mean()


def translate(key: jax.Array, images: jax.Array, max_shift: int) -> jax.Array:
    """Each image shifted by its own random (dy, dx) in [-max_shift, max_shift], the pixels
    uncovered filled with background: DiffAugment's translation (Zhao et al., 2020), which
    passes G's gradients through."""
    if not max_shift:
        return images
    shifts = jax.random.randint(key, (images.shape[0], 2), -max_shift, max_shift + 1)
    pad = ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0))
    padded = jnp.pad(images, pad, constant_values=BACKGROUND)

    def crop(image: jax.Array, shift: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice(image, (max_shift - shift[0], max_shift - shift[1], 0),
                                     images.shape[1:])

    return jax.vmap(crop)(padded, shifts)
