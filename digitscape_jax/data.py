"""MNIST, loaded here only: through tensorflow-datasets or from IDX files, whole or batched.

The training batches are a pure function of (seed, step): each epoch is a
permutation keyed by (seed, epoch), so a resumed run sees exactly the batches
an uninterrupted one would have. They come either streamed by tf.data from the
host (`train_batches`) or gathered on the devices from a resident copy of the
split (`DeviceData`); both give the same batches.
"""

from __future__ import annotations

import functools
import gzip
import io
import os
import socket
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification.mnist import MNIST

from digitscape_jax import parallel
from digitscape_jax.errors import UserError
from digitscape_jax.files import write_atomically

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


def load_split(split: str, data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A prepared split, whole and in tfds's order: images uint8 (N, 28, 28, 1), labels (N,).

    Read-only, and read once per process and data dir: decoding the training split's
    60,000 PNGs takes seconds, which a notebook that trains again (or a test suite) would
    otherwise pay on every run. (So a data dir deleted and prepared anew in the same process
    is not read again; `_load_split.cache_clear()` forgets what was read.) Across processes,
    the decoded arrays are kept beside the split's records (`_decoded_copy`).
    """
    return _load_split(split, None if data_dir is None else str(Path(data_dir).resolve()))


@functools.lru_cache(maxsize=4)
def _load_split(split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    builder = tfds.builder("mnist", data_dir=data_dir)
    copy, records = _decoded_copy(builder, split)
    arrays = _read_decoded(copy, records) if copy else None
    if arrays is None:
        dataset = tfds.load("mnist", split=split, data_dir=data_dir, download=False,
                            as_supervised=True)
        chunks = list(tfds.as_numpy(dataset.batch(LOAD_CHUNK)))
        arrays = np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])
        if copy and len(arrays[0]) == builder.info.splits[split].num_examples:  # not a mock's
            _write_decoded(copy, records, arrays)
    for array in arrays:
        array.flags.writeable = False
    return arrays


def _decoded_copy(builder: tfds.core.DatasetBuilder, split: str) -> tuple[Path | None, str]:
    """Where the decoded arrays of a prepared split on a local disk are kept, and a stamp of
    the records they were decoded from (names, sizes, times), so that a split prepared anew
    is decoded anew. (None, "") where the records are elsewhere (e.g. a bucket, or a mock)."""
    folder = Path(os.fspath(builder.data_dir))
    records = sorted(folder.glob(f"mnist-{split}.tfrecord*")) if folder.is_dir() else []
    if not records:
        return None, ""
    stamp = ";".join(f"{r.name}:{r.stat().st_size}:{r.stat().st_mtime_ns}" for r in records)
    return folder / f"decoded-{split}.npz", stamp


def _read_decoded(copy: Path, records: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The arrays kept in `copy` if it was decoded from `records`; None otherwise."""
    try:
        with np.load(copy) as kept:
            if str(kept["records"]) == records:
                return kept["images"], kept["labels"]
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile):
        pass  # missing or damaged: decode again
    return None


def _write_decoded(copy: Path, records: str, arrays: tuple[np.ndarray, np.ndarray]) -> None:
    """Keeps the decoded split for the next process; a folder it cannot write to only means
    decoding again."""
    buffer = io.BytesIO()
    np.savez(buffer, images=arrays[0], labels=arrays[1], records=np.array(records))
    try:
        write_atomically(copy, buffer.getvalue())
    except OSError:
        pass


def load_mnist(data_dir: str | None = None, mnist_idx: str | None = None
               ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """MNIST (train, test) as (uint8 images (N, 28, 28), labels (N,)), whole, in memory.

    From the IDX files in `mnist_idx` when given (read directly, nothing is
    written), else from tfds's prepared `mnist` in `data_dir` (downloaded first
    if it can be).
    """
    if mnist_idx is not None:
        idx_dir = idx_folder(mnist_idx)
        return read_idx_split(idx_dir, "train"), read_idx_split(idx_dir, "test")
    prepare_mnist(data_dir)
    splits = [load_split(split, data_dir) for split in ("train", "test")]
    return tuple((images[..., 0], labels) for images, labels in splits)  # type: ignore[return-value]


# uint8 [0, 255] -> float32 [-1, 1], as the original scales its inputs: one table, so that
# the host's stream and the devices' gather give the very same values.
UNIT_RANGE = np.arange(256, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)


# The run's other random streams (init, steps, samples, eval) are split(key(seed), 4), which
# equals fold_in(key(seed), i) for i < 4; folding in this constant keeps the data order's keys
# apart from theirs.
DATA_ORDER_STREAM = 0x64617461  # "data"


def order_key(seed: int) -> jax.Array:
    """The root key of the data order: a stream of the seed that no other use of it shares."""
    return jax.random.fold_in(jax.random.key(seed), DATA_ORDER_STREAM)


@functools.partial(jax.jit, static_argnums=2)
def epoch_order(key: jax.Array, epoch: jax.Array, n: int) -> jax.Array:
    """The order in which epoch `epoch` visits the n training images: a permutation keyed by
    (key, epoch). Both data paths compute it with JAX on the devices: `DeviceData` keeps it
    there, and the stream copies it to the host once an epoch."""
    return jax.random.permutation(jax.random.fold_in(key, epoch), n)


def check_batch_size(batch_size: int, n: int) -> None:
    """Refuses batches larger than the split: every batch holds distinct images."""
    if batch_size > n:
        raise UserError(f"--batch-size {batch_size} is larger than the dataset ({n} images)")


def train_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int, start_step: int = 0,
    rows: slice = slice(None),
) -> tf.data.Dataset:
    """Endless shuffled (images in [-1, 1], int32 labels) batches; batch `s` depends only on
    (seed, s).

    Each epoch is a fresh permutation of the whole split, `epoch_order`; the
    epochs are concatenated and cut into full batches, so the stream can be
    started at any step without replaying earlier ones. Only `rows` of each
    batch are read: a process's part of the global batch, so that the processes
    of a run read disjoint images.
    """
    n = len(images)
    check_batch_size(batch_size, n)
    first = start_step * batch_size
    pixels, classes = tf.constant(images), tf.constant(labels, tf.int32)
    key = order_key(seed)

    def order(epoch: tf.Tensor) -> tf.Tensor:
        indices = tf.numpy_function(lambda e: np.asarray(epoch_order(key, e, n), np.int32),
                                    [epoch], tf.int32, stateful=False)
        return tf.ensure_shape(indices, (n,))

    def gather(indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        indices = indices[rows.start:rows.stop]
        pixel_values = tf.cast(tf.gather(pixels, indices), tf.int32)
        return tf.gather(UNIT_RANGE, pixel_values), tf.gather(classes, indices)

    return (
        tf.data.Dataset.range(first // n, np.iinfo(np.int64).max)
        .map(order)
        .unbatch()
        .skip(first % n)
        .batch(batch_size, drop_remainder=True)
        .map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )


class DeviceData:
    """The whole uint8 training split resident on the devices, batched there.

    An option beside `train_batches` for accelerators, where feeding a small model
    from the host can cost more than its update: the split is copied to every
    device once (47 MB for MNIST), and each call's batches are gathered, scaled
    and sharded over the mesh on the devices, in the same order as the stream's.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int,
                 mesh: jax.sharding.Mesh) -> None:
        self._n = len(images)
        check_batch_size(batch_size, self._n)
        _check_fits(images.nbytes + labels.nbytes)
        replicated = parallel.replicated(mesh)
        self._images = jax.make_array_from_process_local_data(replicated, images)
        self._labels = jax.make_array_from_process_local_data(replicated, labels.astype(np.int32))
        self._key = jax.jit(lambda: order_key(seed), out_shardings=replicated)()
        self._batch_size = batch_size
        self._gather = {  # one per stacking: a call of one step, or of several
            axis: jax.jit(_gather, static_argnums=(4, 5), out_shardings=(
                parallel.batch_sharding(mesh, axis), parallel.batch_sharding(mesh, axis)))
            for axis in (0, 1)
        }

    def batches(self, start_step: int, plan: Iterable[int]) -> Iterator[tuple[jax.Array, jax.Array]]:
        """For each call of `plan`, its steps' (images, labels): one batch, or k stacked."""
        plan = list(plan)
        # Enough consecutive epochs to hold any call's batches from any offset in the first.
        span = 1 + -(-max(plan, default=1) * self._batch_size // self._n)
        position, orders_from, orders = start_step * self._batch_size, None, None
        held: dict[int, jax.Array] = {}  # each epoch's order, computed once
        for k in plan:
            epoch, offset = divmod(position, self._n)
            if epoch != orders_from:
                orders_from = epoch
                held = {e: held[e] if e in held else epoch_order(self._key, e, self._n)
                        for e in range(epoch, epoch + span)}
                orders = jnp.concatenate(list(held.values()))
            yield self._gather[int(k > 1)](self._images, self._labels, orders, offset, k,
                                           self._batch_size)
            position += k * self._batch_size


def _gather(images: jax.Array, labels: jax.Array, orders: jax.Array, offset: jax.Array,
            steps: int, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """`steps` batches from `offset` in `orders` (consecutive epochs' orders), scaled to [-1, 1]."""
    index = jax.lax.dynamic_slice_in_dim(orders, offset, steps * batch_size)
    if steps > 1:
        index = index.reshape(steps, batch_size)
    return jnp.asarray(UNIT_RANGE)[images[index]], labels[index]


def _check_fits(nbytes: int) -> None:
    """Refuses --data-on-device where the split would crowd out training (devices that say)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        if nbytes > free // 4:
            raise UserError(f"--data-on-device: the training split needs {nbytes >> 20} MB, more "
                            f"than a quarter of the device's {free >> 20} MB free; drop the flag "
                            "to stream it from the host")


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

