"""Digits from a generator: in bounded-memory batches, reproducible from a seed."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from digitscape_jax.config import NUM_CLASSES, Config
from digitscape_jax.errors import UserError
from digitscape_jax.export import load_msgpack
from digitscape_jax.models import Generator, networks, sample_noise
from digitscape_jax.steps import abstract_states

SAMPLE_BATCH = 1000
WALK_POINTS = 4  # Random latent points that each interpolation walk passes through.


def to_uint8(images: jax.Array) -> jax.Array:
    """Generator output in [-1, 1] -> uint8 pixels, dropping the channel axis."""
    return jnp.clip(jnp.round((images[..., 0] + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnums=0)
def render(generator: Generator, variables: Mapping[str, Any], noise: jax.Array,
           labels: jax.Array | None = None) -> jax.Array:
    """uint8 digits (N, 28, 28) from noise (and, if conditional, labels), BatchNorm in
    inference mode."""
    return to_uint8(generator.apply(variables, noise, train=False, labels=labels))


# How many of each digit the MNIST test set holds: the class mix that a conditional generator
# is asked for when its digits are compared with the test set (`class_labels`' `mix`).
MNIST_TEST_CLASS_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)


def proportional_counts(n: int, mix: Sequence[float]) -> np.ndarray:
    """n split into len(mix) whole counts proportional to `mix` (largest remainders, ties to
    the lower class): each count is the floor or the ceiling of its exact share."""
    weights = np.asarray(mix, np.float64)
    if weights.ndim != 1 or len(weights) == 0 or np.any(weights < 0) or weights.sum() <= 0:
        raise UserError(f"a class mix needs non-negative weights, not all zero, got {mix}")
    exact = n * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    remainders = exact - counts
    order = np.lexsort((np.arange(len(weights)), -remainders))  # largest first, then by class
    counts[order[:n - counts.sum()]] += 1
    return counts


def class_labels(config: Config, n: int, digit: int | None = None,
                 rows_of: int | None = None,
                 mix: Sequence[float] | None = None) -> np.ndarray | None:
    """What a conditional generator is asked to draw: `digit` n times; with `mix` (a weight
    per class, such as MNIST_TEST_CLASS_COUNTS), each class its share of n (see
    `proportional_counts`), in class order; else 0..9 in turn (each of `rows_of` consecutive
    digits the same class: a grid row per class). None for an unconditional generator, which
    refuses `digit`."""
    if not config.conditional:
        if digit is not None:
            raise UserError("this generator was trained without labels (train.py --conditional "
                            "trains one that takes --digit)")
        return None
    if digit is not None:
        return np.full(n, digit, np.int32)
    if mix is not None:
        if len(mix) != NUM_CLASSES:
            raise UserError(f"a class mix needs {NUM_CLASSES} weights, got {len(mix)}")
        return np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), proportional_counts(n, mix))
    return (np.arange(n, dtype=np.int32) // (rows_of or 1)) % NUM_CLASSES


def render_batches(config: Config, variables: Mapping[str, Any],
                   batches: Iterable[tuple[jax.Array, jax.Array | None]]) -> np.ndarray:
    """uint8 digits (N, 28, 28) from (noise, labels) given a batch at a time, to bound memory."""
    generator, _ = networks(config)
    chunks = [np.asarray(render(generator, variables, noise, labels)) for noise, labels in batches]
    return np.concatenate(chunks) if chunks else np.zeros((0, 28, 28), np.uint8)


def generate(config: Config, variables: Mapping[str, Any], key: jax.Array, n: int, *,
             labels: np.ndarray | None = None, batch_size: int = SAMPLE_BATCH) -> np.ndarray:
    """`n` digits as uint8 (n, 28, 28), drawn `batch_size` at a time; a conditional
    generator draws `labels` (see `class_labels`).

    Batch i's noise comes from `fold_in(key, i)`, so the result depends only on
    (key, n, labels, batch_size), and memory stays bounded however large `n` is.
    """
    return render_batches(config, variables, (
        (sample_noise(jax.random.fold_in(key, i), config.network.noise,
                      (min(batch_size, n - start), config.latent_dim)),
         None if labels is None else labels[start:start + batch_size])
        for i, start in enumerate(range(0, n, batch_size))))


def load_generator(source: str | Path, step: int | None = None,
                   warn: Callable[[str], None] = print,
                   raw: bool = False) -> tuple[Config, dict[str, Any], int]:
    """The config, G variables and step of a checkpoint directory or a `--export` file.

    From a directory without `step`, the newest readable checkpoint: a corrupt
    newer one is skipped with a warning.
    """
    source = Path(source)
    if source.is_file():
        for flag, given in (("--step picks a checkpoint", step is not None),
                            ("--raw picks the trained weights of a checkpoint", raw)):
            if given:
                raise UserError(f"{flag}, but {source} is an exported generator")
        return load_msgpack(source)
    from digitscape_jax.checkpointing import Checkpointer  # needs Orbax

    ckpt = Checkpointer(source, read_only=True)

    def read(step: int) -> tuple[Config, dict[str, Any]]:
        config = ckpt.load_config(step)
        g_state = ckpt.restore_generator(step, abstract_states(config))
        return config, g_state.variables if raw else g_state.ema_variables

    step, (config, variables) = ckpt.load(step, read, warn)
    return config, variables, step


def slerp(a: jax.Array, b: jax.Array, t: jax.Array) -> jax.Array:
    """Spherical interpolation, which keeps N(0, 1) noise at a typical norm."""
    cos = jnp.sum(a * b, -1, keepdims=True) / (
        jnp.linalg.norm(a, axis=-1, keepdims=True) * jnp.linalg.norm(b, axis=-1, keepdims=True))
    omega = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
    sin = jnp.sin(omega)
    safe = sin > 1e-6  # nearly parallel: plain lerp is exact enough
    wa = jnp.where(safe, jnp.sin((1 - t) * omega) / jnp.where(safe, sin, 1.0), 1 - t)
    wb = jnp.where(safe, jnp.sin(t * omega) / jnp.where(safe, sin, 1.0), t)
    return wa * a + wb * b


def latent_walks(key: jax.Array, config: Config, walks: int, frames: int) -> jax.Array:
    """Noise (walks, frames, latent_dim): each walk loops through WALK_POINTS random points.

    Slerp between N(0, 1) points, lerp between U[0, 1) ones (which stays in the
    unit cube); the last frame leads back to the first, so a GIF of it loops. A
    self-conditioned G's walk keeps its first noise entry, and so its cluster.
    """
    points = sample_noise(key, config.network.noise, (walks, WALK_POINTS, config.latent_dim))
    position = jnp.arange(frames) * WALK_POINTS / frames  # along the closed loop
    segment = jnp.floor(position).astype(jnp.int32)
    t = (position - segment)[None, :, None]
    start = points[:, segment]
    end = points[:, (segment + 1) % WALK_POINTS]
    path = slerp(start, end, t) if config.network.noise == "normal" else start + t * (end - start)
    if config.clusters:
        path = path.at[..., 0].set(points[:, :1, 0])
    return path


def render_walks(config: Config, variables: Mapping[str, Any], key: jax.Array, walks: int,
                 frames: int, labels: np.ndarray | None = None) -> np.ndarray:
    """uint8 digits (walks, frames, 28, 28) along `latent_walks`; a conditional generator
    draws `labels` (walks * frames of them, one class per walk: see `class_labels`)."""
    noise = latent_walks(key, config, walks, frames).reshape(walks * frames, config.latent_dim)
    images = render_batches(config, variables, (
        (noise[i:i + SAMPLE_BATCH], None if labels is None else labels[i:i + SAMPLE_BATCH])
        for i in range(0, len(noise), SAMPLE_BATCH)))
    return images.reshape(walks, frames, 28, 28)
