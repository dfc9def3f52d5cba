"""A small MNIST classifier: the feature space and the class labels of the sample-quality metrics.

Its one input is what `sampling.generate` returns, uint8 digits (N, 28, 28); `preprocess`
turns them into the network's float32 (N, 28, 28, 1) in [0, 1]. (The generator's own output,
float [-1, 1] (N, 28, 28, 1), becomes uint8 through `sampling.to_uint8`.) The trained weights
ship with the package, in `weights/`, with a JSON of how they were made and how well they do.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from digitscape_jax.errors import UserError
from digitscape_jax.files import write_atomically

WEIGHTS = Path(__file__).resolve().parent / "weights" / "mnist_classifier.msgpack"
CLASSES = 10
FEATURES = 128  # Width of the penultimate layer, the space of FD and precision/recall.
CONV_CHANNELS = (16, 32, 64)  # 3x3 convolutions, each followed by a 2x2 max-pool: 28 -> 14 -> 7 -> 3.
EPOCHS = 5
BATCH_SIZE = 128
LEARNING_RATE = 3e-3
SEED = 0
APPLY_BATCH = 1000  # Images per forward pass when classifying: bounds memory, fixes the shape.


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """`nn.max_pool(x, (2, 2), strides=(2, 2))` (an odd last row or column dropped), as a reshape.

    The same function, but its gradient is a plain mask rather than XLA's
    select-and-scatter, which is about 4x slower on the CPU.
    """
    n, h, w, c = x.shape
    x = x[:, :h // 2 * 2, :w // 2 * 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class Classifier(nn.Module):
    """Three conv/pool blocks, a 128-unit ReLU feature layer, and the 10 class logits."""

    def setup(self) -> None:
        self.convs = [nn.Conv(c, (3, 3), name=f"conv{i}") for i, c in enumerate(CONV_CHANNELS)]
        self.hidden = nn.Dense(FEATURES, name="features")
        self.head = nn.Dense(CLASSES, name="logits")

    def features(self, x: jax.Array) -> jax.Array:
        """The penultimate layer (N, FEATURES) of preprocessed images (N, 28, 28, 1)."""
        for conv in self.convs:
            x = max_pool_2x2(nn.relu(conv(x)))
        return nn.relu(self.hidden(x.reshape(x.shape[0], -1)))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Class logits (N, CLASSES) of preprocessed images (N, 28, 28, 1)."""
        return self.head(self.features(x))

    def features_and_logits(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        features = self.features(x)
        return features, self.head(features)


def check_images(images: Any, what: str = "images") -> np.ndarray:
    """uint8 digits (N, 28, 28) (a trailing channel of 1 is dropped), or a UserError saying why not."""
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise UserError(f"{what} must have shape (N, 28, 28), got {images.shape}")
    if images.dtype != np.uint8:
        raise UserError(f"{what} must be uint8 pixels in [0, 255], got {images.dtype} "
                        "(generator output in [-1, 1] converts with sampling.to_uint8)")
    return images


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 (N, 28, 28) -> the network's float32 (N, 28, 28, 1) in [0, 1]."""
    return (jnp.asarray(images, jnp.float32) / 255.0)[..., None]


def init_params(key: jax.Array) -> Any:
    return Classifier().init(key, jnp.zeros((1, 28, 28, 1)))["params"]


def param_count(params: Any) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))


@jax.jit
def _apply(params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    return Classifier().apply({"params": params}, preprocess(images),
                              method=Classifier.features_and_logits)


def classify(params: Any, images: np.ndarray,
             batch_size: int = APPLY_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, FEATURES) and logits (N, CLASSES), float32, of uint8 digits (N, 28, 28).

    Runs `batch_size` images at a time, padding the last batch, so one compiled
    shape serves any N.
    """
    images = check_images(images)
    features, logits = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        n = len(batch)
        if n < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - n, 28, 28), np.uint8)])
        f, lg = _apply(params, batch)
        features.append(np.asarray(f[:n]))
        logits.append(np.asarray(lg[:n]))
    if not features:
        return np.zeros((0, FEATURES), np.float32), np.zeros((0, CLASSES), np.float32)
    return np.concatenate(features), np.concatenate(logits)


def accuracy(params: Any, images: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(classify(params, images)[1].argmax(1) == labels))


def train(train_images: np.ndarray, train_labels: np.ndarray, *, epochs: int = EPOCHS,
          seed: int = SEED, batch_size: int = BATCH_SIZE, learning_rate: float = LEARNING_RATE,
          log: Callable[[str], None] = print) -> Any:
    """Trains a Classifier with Adam and a cosine-decayed learning rate; returns its params.

    Deterministic from `seed`: it sets the initialisation and each epoch's
    shuffle (`fold_in(shuffle_key, epoch)`). The last partial batch of each
    epoch is dropped (a set smaller than a batch is one batch).
    """
    train_images = check_images(train_images, "training images")
    n = len(train_images)
    if n == 0:
        raise UserError("no training images")
    batch_size = min(batch_size, n)
    steps_per_epoch = n // batch_size
    init_key, shuffle_key = jax.random.split(jax.random.key(seed))
    params = init_params(init_key)
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, epochs * steps_per_epoch))
    images, labels = jnp.asarray(train_images), jnp.asarray(train_labels, jnp.int32)

    def loss_fn(params: Any, images: jax.Array, labels: jax.Array) -> jax.Array:
        logits = Classifier().apply({"params": params}, preprocess(images))
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    # The data are arguments, not constants, which XLA would fold at compile time; and
    # the epoch is a Python loop over this jitted step, since XLA:CPU runs convolutions
    # inside a scan about 100x slower.
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params: Any, opt_state: Any, images: jax.Array, labels: jax.Array,
             index: jax.Array) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(params, images[index], labels[index])
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    for e in range(epochs):
        start = time.perf_counter()
        order = jax.random.permutation(jax.random.fold_in(shuffle_key, e), n)
        losses = []
        for i in range(steps_per_epoch):
            params, opt_state, loss = step(params, opt_state, images, labels,
                                           order[i * batch_size:(i + 1) * batch_size])
            losses.append(loss)
        loss = jnp.mean(jnp.stack(losses))
        log(f"epoch {e + 1}/{epochs}: loss {float(loss):.4f} ({time.perf_counter() - start:.0f} s)")
    return params


def save(path: str | Path, params: Any, info: dict[str, Any]) -> Path:
    """Writes the params (flax msgpack) to `path` and `info` to the JSON beside it, atomically."""
    write_atomically(path, serialization.to_bytes(jax.device_get(params)))
    write_atomically(info_path(path), (json.dumps(info, indent=2) + "\n").encode())
    return Path(path)


def info_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


@functools.cache
def _load(path: Path) -> Any:
    if not path.is_file():
        raise UserError(f"no classifier weights at {path}; write them with "
                        "python -m digitscape_jax.evaluate --train-classifier")
    # The params' structure and shapes, without computing an initialisation to throw away.
    template = jax.eval_shape(init_params, jax.random.key(0))
    try:
        params = serialization.from_bytes(template, path.read_bytes())
    except Exception as e:  # noqa: BLE001  (msgpack and flax raise many types for bad data)
        raise UserError(f"{path} is not a classifier weights file: {type(e).__name__}") from None
    shapes = jax.tree_util.tree_map(np.shape, params)
    if shapes != jax.tree_util.tree_map(lambda leaf: leaf.shape, template):
        raise UserError(f"{path} holds weights of another architecture")
    return jax.device_put(params)


def load(path: str | Path = WEIGHTS) -> Any:
    """The classifier params saved at `path` (the committed weights by default), read once."""
    return _load(Path(path).resolve())


def load_info(path: str | Path = WEIGHTS) -> dict[str, Any]:
    """The JSON written beside the weights: test accuracy, epochs, seed, parameter count."""
    return json.loads(info_path(path).read_text())
