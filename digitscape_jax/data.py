"""MNIST through tensorflow-datasets: preparing it (offline from IDX files), and streaming it.

The training stream is a pure function of (seed, step): each epoch is a
stateless permutation keyed by (seed, epoch), so a resumed run sees exactly the
batches an uninterrupted one would have.
"""

from __future__ import annotations

import gzip
import socket
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification.mnist import MNIST

from digitscape_jax.errors import UserError

# tf.data runs on the host: keep TensorFlow off any GPU, which JAX owns.
tf.config.set_visible_devices([], "GPU")

IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
MNIST_HOST = "storage.googleapis.com"  # where tfds downloads MNIST from
REACHABILITY_TIMEOUT_S = 3.0
LOAD_CHUNK = 10_000  # Examples per read when loading a split into memory.


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Reads one gzipped IDX file: uint8 images (N, 28, 28) or labels (N,)."""
    if not path.is_file():
        raise UserError(f"missing MNIST file {path}")
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"corrupt MNIST file {path}: not a valid .gz ({e})") from None
    n_dims = 3 if magic == IMAGES_MAGIC else 1
    header_size = 4 * (1 + n_dims)
    if len(raw) < header_size or int.from_bytes(raw[:4], "big") != magic:
        raise UserError(f"corrupt MNIST file {path}: expected an IDX header with magic {magic}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(n_dims))
    if n_dims == 3 and shape[1:] != (28, 28):
        raise UserError(f"corrupt MNIST file {path}: images are {shape[1:]}, not 28x28")
    data = np.frombuffer(raw, np.uint8, offset=header_size)
    if data.size != np.prod(shape):
        raise UserError(
            f"corrupt MNIST file {path}: header says {shape} but holds {data.size} values"
        )
    return data.reshape(shape)


def read_idx_split(idx_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads one split's images (N, 28, 28) and labels (N,) from an IDX folder."""
    images_file, labels_file = IDX_FILES[split]
    images = read_idx(idx_dir / images_file, IMAGES_MAGIC)
    labels = read_idx(idx_dir / labels_file, LABELS_MAGIC)
    if len(images) != len(labels):
        raise UserError(
            f"MNIST {split} files in {idx_dir} disagree: {len(images)} images, {len(labels)} labels"
        )
    if labels.size and labels.max() > 9:
        raise UserError(f"corrupt MNIST file {idx_dir / labels_file}: a label above 9")
    return images, labels


class _IdxMNIST(MNIST, skip_registration=True):
    """tfds's own MNIST builder, fed from local IDX files instead of a download.

    It keeps the name, version, features and example keys of `mnist`, so it
    writes exactly the dataset that `tfds.load('mnist')` reads.
    """

    name = "mnist"

    def __init__(self, idx_dir: Path, **kwargs):
        self._idx_dir = idx_dir
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing is downloaded.
        return {split: self._examples(*read_idx_split(self._idx_dir, split)) for split in IDX_FILES}

    def _examples(self, images: np.ndarray, labels: np.ndarray):
        for index, (image, label) in enumerate(zip(images, labels)):
            yield index, {"image": image[..., None], "label": int(label)}


def _reachable(host: str, port: int = 443) -> bool:
    try:
        with socket.create_connection((host, port), timeout=REACHABILITY_TIMEOUT_S):
            return True
    except OSError:
        return False


def idx_folder(mnist_idx: str) -> Path:
    """The --mnist-idx folder, refused at once when it is not one."""
    idx_dir = Path(mnist_idx)
    if not idx_dir.is_dir():
        raise UserError(f"--mnist-idx {mnist_idx}: no such folder")
    return idx_dir


def prepare_mnist(data_dir: str | None = None, mnist_idx: str | None = None) -> None:
    """Makes `tfds.load('mnist', data_dir=data_dir, download=False)` work.

    Uses the IDX files in `mnist_idx` when given, else tfds's download, and
    fails at once, naming `--mnist-idx`, when neither can work.
    """
    if tfds.builder("mnist", data_dir=data_dir).is_prepared():
        return
    if mnist_idx is not None:
        idx_dir = idx_folder(mnist_idx)
        for split in IDX_FILES:  # Validate every file before writing anything.
            read_idx_split(idx_dir, split)
        _IdxMNIST(idx_dir, data_dir=data_dir).download_and_prepare()
    elif _reachable(MNIST_HOST):
        tfds.builder("mnist", data_dir=data_dir).download_and_prepare()
    else:
        where = data_dir or tfds.core.constants.DATA_DIR
        raise UserError(
            f"MNIST is not prepared in {where} and {MNIST_HOST} cannot be reached; "
            "pass --mnist-idx DIR, a folder with the four MNIST IDX .gz files"
        )


def load_split(split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A prepared split, whole and in tfds's order: images uint8 (N, 28, 28, 1), labels (N,)."""
    dataset = tfds.load("mnist", split=split, data_dir=data_dir, download=False,
                        as_supervised=True)
    chunks = list(tfds.as_numpy(dataset.batch(LOAD_CHUNK)))
    return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])


def to_unit_range(images: tf.Tensor) -> tf.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1], as the original scales its inputs."""
    return tf.cast(images, tf.float32) / 127.5 - 1.0


def train_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int, start_step: int = 0,
    rows: slice = slice(None),
) -> tf.data.Dataset:
    """Endless shuffled (images in [-1, 1], int32 labels) batches; batch `s` depends only on
    (seed, s).

    Each epoch is a fresh stateless permutation of the whole split, keyed by
    (seed, epoch); the epochs are concatenated and cut into full batches, so
    the stream can be started at any step without replaying earlier ones.
    Only `rows` of each batch are read: a process's part of the global batch,
    so that the processes of a run read disjoint images.
    """
    n = len(images)
    if batch_size > n:
        raise UserError(f"--batch-size {batch_size} is larger than the dataset ({n} images)")
    first = start_step * batch_size
    pixels, classes = tf.constant(images), tf.constant(labels, tf.int32)

    def epoch_order(epoch: tf.Tensor) -> tf.data.Dataset:
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), epoch])
        )
        return tf.data.Dataset.from_tensor_slices(order)

    return (
        tf.data.Dataset.range(first // n, np.iinfo(np.int64).max)
        .flat_map(epoch_order)
        .skip(first % n)
        .batch(batch_size, drop_remainder=True)
        .map(lambda index: (to_unit_range(tf.gather(pixels, index[rows.start:rows.stop])),
                            tf.gather(classes, index[rows.start:rows.stop])),
             num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )


def stack_batches(batches: Iterator[tuple[np.ndarray, ...]],
                  sizes: Iterator[int]) -> Iterator[tuple[np.ndarray, ...]]:
    """Groups consecutive batches for calls of several steps: a size of k > 1 stacks the next
    k batches along a new leading axis; a size of 1 passes one batch through as it is."""
    for k in sizes:
        group = [next(batches) for _ in range(k)]
        yield group[0] if k == 1 else tuple(np.stack(parts) for parts in zip(*group))


def prefetch_to_device(
    batches: Iterator[np.ndarray], to_device: Callable[[np.ndarray], jax.Array], size: int = 2
) -> Iterator[jax.Array]:
    """Keeps `size` batches in flight to the devices, so the step loop never waits on a copy."""
    in_flight: list[jax.Array] = []
    for batch in batches:
        in_flight.append(to_device(batch))
        if len(in_flight) > size:
            yield in_flight.pop(0)
    yield from in_flight

