"""Digits from a generator: in bounded-memory batches, reproducible from a seed."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from digitscape_jax.checkpointing import Checkpointer, abstract_states
from digitscape_jax.config import Config
from digitscape_jax.models import Generator, sample_noise

SAMPLE_BATCH = 1000


def to_uint8(images: jax.Array) -> jax.Array:
    """Generator output in [-1, 1] -> uint8 pixels, dropping the channel axis."""
    return jnp.clip(jnp.round((images[..., 0] + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnums=0)
def render(generator: Generator, variables: Mapping[str, Any], noise: jax.Array) -> jax.Array:
    """uint8 digits (N, 28, 28) from noise, with BatchNorm in inference mode."""
    return to_uint8(generator.apply(variables, noise, train=False))


def generate(config: Config, variables: Mapping[str, Any], key: jax.Array, n: int,
             batch_size: int = SAMPLE_BATCH) -> np.ndarray:
    """`n` digits as uint8 (n, 28, 28), drawn `batch_size` at a time.

    Batch i's noise comes from `fold_in(key, i)`, so the result depends only on
    (key, n, batch_size), and memory stays bounded however large `n` is.
    """
    generator = Generator(config.spec)
    chunks = []
    for i, start in enumerate(range(0, n, batch_size)):
        size = min(batch_size, n - start)
        noise = sample_noise(jax.random.fold_in(key, i), config.spec.noise, (size, config.latent_dim))
        chunks.append(np.asarray(render(generator, variables, noise)))
    return np.concatenate(chunks) if chunks else np.zeros((0, 28, 28), np.uint8)


def load_generator(ckpt_dir: str, step: int | None = None,
                   warn: Callable[[str], None] = print) -> tuple[Config, dict[str, Any], int]:
    """The config, G variables and step of a checkpoint, from its directory alone.

    Without `step`, the newest readable checkpoint: a corrupt newer one is
    skipped with a warning.
    """
    ckpt = Checkpointer(ckpt_dir, read_only=True)

    def read(step: int) -> tuple[Config, dict[str, Any]]:
        config = ckpt.load_config(step)
        g_state = ckpt.restore_generator(step, abstract_states(config))
        return config, {"params": g_state.params, "batch_stats": g_state.batch_stats}

    step, (config, variables) = ckpt.load(step, read, warn)
    return config, variables, step
