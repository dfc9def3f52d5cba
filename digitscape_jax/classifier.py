"""Small MNIST classifiers: the feature spaces and the class labels of the sample-quality metrics.

Two networks, each described by a `Network` (architecture and training recipe):

- `SELECTION`, three 3x3 conv/pool blocks and a 128-d feature layer, trained on plain
  digits: the space in which ablations and defaults are chosen.
- `HELD_OUT`, two 5x5 conv/pool blocks and a 64-d feature layer with dropout, trained from
  another seed on randomly shifted, rotated and scaled digits: the space results are stated
  in, never used to choose (docs/spaces.md says how it was picked).

Their one input is what `sampling.generate` returns, uint8 digits (N, 28, 28); `preprocess`
turns them into the network's float32 (N, 28, 28, 1) in [0, 1]. (The generator's own output,
float [-1, 1] (N, 28, 28, 1), becomes uint8 through `sampling.to_uint8`.) The trained weights
ship with the package, in `weights/`, each with a JSON of how they were made and how well
they do, written by `python -m digitscape_jax.evaluate --train-classifier --space NAME`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
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

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
CLASSES = 10
APPLY_BATCH = 1000  # Images per forward pass when classifying: bounds memory, fixes the shape.


@dataclasses.dataclass(frozen=True)
class Network:
    """A classifier's architecture and how it is trained (Adam, cosine-decayed learning rate).

    Each conv block is a `kernel` x `kernel` convolution ('SAME' padding), ReLU and a 2x2
    max-pool; then a dense ReLU layer of `features` units (the feature space of FD and
    precision/recall), with `dropout` on it while training, and the class logits. With
    `shift`, `rotate` or `scale`, each training digit is first moved by a random affine map:
    up to `shift` pixels each way, `rotate` degrees, and a zoom within 1 +- `scale`.
    """

    name: str
    weights: Path
    conv_channels: tuple[int, ...]
    kernel: int
    features: int
    dropout: float = 0.0
    shift: float = 0.0
    rotate: float = 0.0
    scale: float = 0.0
    epochs: int = 5
    batch_size: int = 128
    learning_rate: float = 3e-3
    seed: int = 0

    @property
    def augments(self) -> bool:
        return bool(self.shift or self.rotate or self.scale)

    def describe(self) -> str:
        """The architecture and training, in words (the weights' JSON holds it)."""
        side = 28
        for _ in self.conv_channels:
            side //= 2
        text = (f"{self.kernel}x{self.kernel} conv {'/'.join(map(str, self.conv_channels))}, "
                f"each + ReLU + 2x2 max-pool (28 -> {side}); dense {self.features} + ReLU "
                f"(the features{f', dropout {self.dropout} in training' if self.dropout else ''}"
                f"); dense {CLASSES}")
        if self.augments:
            text += (f"; trained on digits randomly shifted up to {self.shift:g} px, rotated up "
                     f"to {self.rotate:g} degrees and scaled by 1 +- {self.scale:g}")
        return text


SELECTION = Network("selection", WEIGHTS_DIR / "mnist_classifier.msgpack",
                    conv_channels=(16, 32, 64), kernel=3, features=128)
HELD_OUT = Network("held_out", WEIGHTS_DIR / "mnist_held_out.msgpack",
                   conv_channels=(12, 32), kernel=5, features=64, dropout=0.3,
                   shift=2.0, rotate=12.0, scale=0.1, epochs=4, seed=1)
NETWORKS = {network.name: network for network in (SELECTION, HELD_OUT)}

# The selection network's settings, under their earlier names.
WEIGHTS = SELECTION.weights
FEATURES = SELECTION.features
CONV_CHANNELS = SELECTION.conv_channels
EPOCHS = SELECTION.epochs
BATCH_SIZE = SELECTION.batch_size
LEARNING_RATE = SELECTION.learning_rate
SEED = SELECTION.seed


def network_of(name: str) -> Network:
    if name not in NETWORKS:
        raise UserError(f"no feature space {name!r}; choose from {list(NETWORKS)}")
    return NETWORKS[name]


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """`nn.max_pool(x, (2, 2), strides=(2, 2))` (an odd last row or column dropped), as a reshape.

    The same function, but its gradient is a plain mask rather than XLA's
    select-and-scatter, which is about 4x slower on the CPU.
    """
    n, h, w, c = x.shape
    x = x[:, :h // 2 * 2, :w // 2 * 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class Classifier(nn.Module):
    """Conv/pool blocks, a ReLU feature layer, and the 10 class logits (see `Network`)."""

    network: Network = SELECTION

    def setup(self) -> None:
        k = self.network.kernel
        self.convs = [nn.Conv(c, (k, k), name=f"conv{i}")
                      for i, c in enumerate(self.network.conv_channels)]
        self.hidden = nn.Dense(self.network.features, name="features")
        self.head = nn.Dense(CLASSES, name="logits")
        self.drop = nn.Dropout(self.network.dropout)

    def features(self, x: jax.Array) -> jax.Array:
        """The penultimate layer (N, features) of preprocessed images (N, 28, 28, 1)."""
        for conv in self.convs:
            x = max_pool_2x2(nn.relu(conv(x)))
        return nn.relu(self.hidden(x.reshape(x.shape[0], -1)))

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Class logits (N, CLASSES) of preprocessed images (N, 28, 28, 1); with `train`,
        dropout on the features (a 'dropout' rng then needed)."""
        features = self.features(x)
        if train and self.network.dropout:
            features = self.drop(features, deterministic=False)
        return self.head(features)

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


def affine_augment(key: jax.Array, x: jax.Array, network: Network) -> jax.Array:
    """Preprocessed digits (N, 28, 28, 1), each moved by its own random affine map: a shift
    of up to `network.shift` px each way, a rotation of up to `network.rotate` degrees and a
    zoom within 1 +- `network.scale`, about the centre (bilinear, zeros outside)."""
    n = x.shape[0]
    k_angle, k_scale, k_shift = jax.random.split(key, 3)
    angle = jax.random.uniform(k_angle, (n,), minval=-1, maxval=1) * network.rotate * math.pi / 180
    zoom = 1 + jax.random.uniform(k_scale, (n,), minval=-1, maxval=1) * network.scale
    shift = jax.random.uniform(k_shift, (n, 2), minval=-1, maxval=1) * network.shift
    centre = (28 - 1) / 2
    rows, cols = jnp.meshgrid(jnp.arange(28.0) - centre, jnp.arange(28.0) - centre,
                              indexing="ij")

    def one(image, angle, zoom, shift):
        # Where each output pixel comes from: the inverse map.
        cos, sin = jnp.cos(angle) / zoom, jnp.sin(angle) / zoom
        r, c = rows - shift[0], cols - shift[1]
        source = jnp.stack([cos * r - sin * c + centre, sin * r + cos * c + centre])
        return jax.scipy.ndimage.map_coordinates(image, list(source), order=1, mode="constant")

    return jax.vmap(one)(x[..., 0], angle, zoom, shift)[..., None]


def init_params(key: jax.Array, network: Network = SELECTION) -> Any:
    return Classifier(network).init(key, jnp.zeros((1, 28, 28, 1)))["params"]


def param_count(params: Any) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))


@functools.partial(jax.jit, static_argnums=0)
def _apply(network: Network, params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    return Classifier(network).apply({"params": params}, preprocess(images),
                                     method=Classifier.features_and_logits)


def classify(params: Any, images: np.ndarray, batch_size: int = APPLY_BATCH,
             network: Network = SELECTION) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, features) and logits (N, CLASSES), float32, of uint8 digits (N, 28, 28),
    through `network` with `params`.

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
        f, lg = _apply(network, params, batch)
        features.append(np.asarray(f[:n]))
        logits.append(np.asarray(lg[:n]))
    if not features:
        return (np.zeros((0, network.features), np.float32),
                np.zeros((0, CLASSES), np.float32))
    return np.concatenate(features), np.concatenate(logits)


def accuracy(params: Any, images: np.ndarray, labels: np.ndarray,
             network: Network = SELECTION) -> float:
    return float(np.mean(classify(params, images, network=network)[1].argmax(1) == labels))


def train(train_images: np.ndarray, train_labels: np.ndarray, *, network: Network = SELECTION,
          epochs: int | None = None, seed: int | None = None, batch_size: int | None = None,
          learning_rate: float | None = None, log: Callable[[str], None] = print) -> Any:
    """Trains a `network` classifier with Adam and a cosine-decayed learning rate; returns its
    params. `epochs`, `seed`, `batch_size` and `learning_rate` default to the network's.

    Deterministic from `seed`: it sets the initialisation, each epoch's shuffle
    (`fold_in(shuffle_key, epoch)`) and, for a network with dropout or augmentation, each
    step's randomness (`fold_in(step_key, step)`). The last partial batch of each epoch is
    dropped (a set smaller than a batch is one batch).
    """
    epochs = network.epochs if epochs is None else epochs
    seed = network.seed if seed is None else seed
    batch_size = network.batch_size if batch_size is None else batch_size
    learning_rate = network.learning_rate if learning_rate is None else learning_rate
    train_images = check_images(train_images, "training images")
    n = len(train_images)
    if n == 0:
        raise UserError("no training images")
    batch_size = min(batch_size, n)
    steps_per_epoch = n // batch_size
    init_key, shuffle_key = jax.random.split(jax.random.key(seed))
    step_key = jax.random.fold_in(jax.random.key(seed), 1)
    params = init_params(init_key, network)
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, epochs * steps_per_epoch))
    images, labels = jnp.asarray(train_images), jnp.asarray(train_labels, jnp.int32)
    model = Classifier(network)

    def loss_fn(params: Any, images: jax.Array, labels: jax.Array, key: jax.Array) -> jax.Array:
        augment_key, dropout_key = jax.random.split(key)
        x = preprocess(images)
        if network.augments:
            x = affine_augment(augment_key, x, network)
        logits = model.apply({"params": params}, x, train=True, rngs={"dropout": dropout_key})
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    # The data are arguments, not constants, which XLA would fold at compile time; and
    # the epoch is a Python loop over this jitted step, since XLA:CPU runs convolutions
    # inside a scan about 100x slower.
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params: Any, opt_state: Any, images: jax.Array, labels: jax.Array,
             index: jax.Array, key: jax.Array) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(params, images[index], labels[index], key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    for e in range(epochs):
        start = time.perf_counter()
        order = jax.random.permutation(jax.random.fold_in(shuffle_key, e), n)
        losses = []
        for i in range(steps_per_epoch):
            params, opt_state, loss = step(params, opt_state, images, labels,
                                           order[i * batch_size:(i + 1) * batch_size],
                                           jax.random.fold_in(step_key, e * steps_per_epoch + i))
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
def _load(path: Path, network: Network) -> Any:
    if not path.is_file():
        raise UserError(f"no classifier weights at {path}; write them with "
                        "python -m digitscape_jax.evaluate --train-classifier --space "
                        f"{network.name}")
    # The params' structure and shapes, without computing an initialisation to throw away.
    template = jax.eval_shape(functools.partial(init_params, network=network),
                              jax.random.key(0))
    try:
        params = serialization.from_bytes(template, path.read_bytes())
    except Exception as e:  # noqa: BLE001  (msgpack and flax raise many types for bad data)
        raise UserError(f"{path} is not a classifier weights file: {type(e).__name__}") from None
    shapes = jax.tree_util.tree_map(np.shape, params)
    if shapes != jax.tree_util.tree_map(lambda leaf: leaf.shape, template):
        raise UserError(f"{path} holds weights of another architecture")
    return jax.device_put(params)


def load(path: str | Path | None = None, network: Network = SELECTION) -> Any:
    """The `network`'s params saved at `path` (its committed weights by default), read once."""
    return _load(Path(network.weights if path is None else path).resolve(), network)


def load_info(path: str | Path | None = None, network: Network = SELECTION) -> dict[str, Any]:
    """The JSON written beside the weights: test accuracy, epochs, seed, parameter count."""
    return json.loads(info_path(network.weights if path is None else path).read_text())
