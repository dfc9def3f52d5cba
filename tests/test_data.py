"""MNIST preparation from IDX files, the tf.data stream, and the batches gathered on the devices."""

from __future__ import annotations

import gzip
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import write_idx
from digitscape_jax import data
from digitscape_jax.data import DeviceData, epoch_order, order_key, stack_batches, train_batches
from digitscape_jax.errors import UserError
from digitscape_jax.parallel import data_parallel_mesh


def sort_examples(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Puts examples in a canonical order (tfds shuffles them when it writes)."""
    flat = images.reshape(len(images), -1)
    order = np.lexsort(np.concatenate([flat, labels[:, None]], axis=1).T[::-1])
    return images[order], labels[order]


def test_mnist_idx_prepares_the_standard_tfds_dataset_bit_for_bit(small_idx, tmp_path):
    idx_dir, arrays = small_idx
    data_dir = str(tmp_path / "tfds")
    data.prepare_mnist(data_dir, str(idx_dir))
    for split, (images, labels) in arrays.items():
        # A plain tfds.load, as any user of tfds would call it.
        loaded = tfds.as_numpy(tfds.load("mnist", split=split, data_dir=data_dir, download=False,
                                          batch_size=-1, as_supervised=True))
        assert loaded[0].shape == (len(images), 28, 28, 1) and loaded[0].dtype == np.uint8
        got = sort_examples(loaded[0][..., 0], loaded[1])
        want = sort_examples(images, labels.astype(np.int64))
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    info = tfds.builder("mnist", data_dir=data_dir).info
    assert info.splits["train"].num_examples == 40 and info.splits["test"].num_examples == 12
    # Prepared once: a second call reads nothing from the IDX folder.
    data.prepare_mnist(data_dir, str(tmp_path / "no-such-folder"))


@pytest.mark.parametrize("damage", ["missing", "not_gzip", "truncated", "bad_magic", "count"])
def test_bad_idx_files_are_refused_before_anything_is_written(small_idx, tmp_path, damage):
    idx_dir, arrays = small_idx
    target = idx_dir / "train-images-idx3-ubyte.gz"
    if damage == "missing":
        target.unlink()
    elif damage == "not_gzip":
        target.write_bytes(b"this is not gzip")
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[:200])
    elif damage == "bad_magic":
        write_idx(target, 2049, arrays["train"][0])
    elif damage == "count":  # 39 images against 40 labels
        write_idx(target, 2051, arrays["train"][0][:39])
    data_dir = tmp_path / "tfds"
    with pytest.raises(UserError, match="train-images-idx3-ubyte.gz|disagree"):
        data.prepare_mnist(str(data_dir), str(idx_dir))
    assert not (data_dir / "mnist").exists()


def test_idx_header_lies_about_its_size(tmp_path):
    path = tmp_path / "x.gz"
    header = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (5, 28, 28))
    path.write_bytes(gzip.compress(header + bytes(28 * 28 * 4)))
    with pytest.raises(UserError, match=r"header says \(5, 28, 28\) but holds 3136"):
        data.read_idx(path, data.IMAGES_MAGIC)


def test_unprepared_and_unreachable_mnist_fails_at_once_naming_the_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_reachable", lambda host: False)
    with pytest.raises(UserError, match="--mnist-idx"):
        data.prepare_mnist(str(tmp_path / "empty"), None)
    with pytest.raises(UserError, match="no such folder"):
        data.prepare_mnist(str(tmp_path / "empty"), str(tmp_path / "nowhere"))


def test_reachability_check_answers_for_a_closed_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        assert data._reachable("127.0.0.1", port) is False


@pytest.fixture
def mock_mnist(tmp_path):
    data._load_split.cache_clear()  # what load_split keeps must not outlive the mock
    with tfds.testing.mock_data(num_examples=100):
        images, labels = data.load_split("train", tmp_path / "tfds")
    data._load_split.cache_clear()
    return images, labels


def test_a_split_is_read_once_and_read_only(tmp_path):
    data._load_split.cache_clear()
    with tfds.testing.mock_data(num_examples=20):
        first = data.load_split("train", tmp_path)
        again = data.load_split("train", str(tmp_path / "."))
    data._load_split.cache_clear()
    assert again[0] is first[0] and again[1] is first[1]
    with pytest.raises(ValueError, match="read-only"):
        first[0][0, 0, 0, 0] = 1


def test_a_split_decoded_once_is_read_from_its_decoded_copy_until_prepared_anew(
        small_idx, tmp_path, monkeypatch):
    """The next process reads the arrays the first decoded, not the records; records written
    anew, or a damaged copy, are decoded again."""
    idx_dir, arrays = small_idx
    data_dir = tmp_path / "tfds"
    data.prepare_mnist(str(data_dir), str(idx_dir))
    decoded = []
    tfds_load = tfds.load
    monkeypatch.setattr(tfds, "load", lambda *a, **k: decoded.append(a) or tfds_load(*a, **k))

    def load_in_a_new_process():
        data._load_split.cache_clear()
        return data.load_split("train", data_dir)

    first = load_in_a_new_process()
    images, labels = arrays["train"]
    got, want = sort_examples(first[0][..., 0], first[1]), sort_examples(images, labels)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    copy = data_dir / "mnist" / "3.0.1" / "decoded-train.npz"
    assert copy.is_file() and len(decoded) == 1
    again = load_in_a_new_process()
    assert len(decoded) == 1  # read from the copy
    for kept, fresh in zip(again, first):
        np.testing.assert_array_equal(kept, fresh)
        assert kept.dtype == fresh.dtype and not kept.flags.writeable
    record = next(copy.parent.glob("mnist-train.tfrecord*"))
    os.utime(record, ns=(record.stat().st_atime_ns, record.stat().st_mtime_ns + 10**9))
    load_in_a_new_process()
    assert len(decoded) == 2  # prepared anew: decoded anew
    load_in_a_new_process()
    assert len(decoded) == 2
    copy.write_bytes(b"not an npz")
    damaged = load_in_a_new_process()
    assert len(decoded) == 3
    np.testing.assert_array_equal(damaged[0], first[0])
    data._load_split.cache_clear()


def test_a_data_dir_it_cannot_write_to_is_still_read(small_idx, tmp_path, monkeypatch):
    idx_dir, arrays = small_idx
    data.prepare_mnist(str(tmp_path / "tfds"), str(idx_dir))

    def refuse(path, contents):
        raise PermissionError(f"read-only: {path}")

    monkeypatch.setattr(data, "write_atomically", refuse)
    data._load_split.cache_clear()
    images, _ = data.load_split("test", tmp_path / "tfds")
    data._load_split.cache_clear()
    assert images.shape == (12, 28, 28, 1)
    assert not list((tmp_path / "tfds").rglob("decoded-*"))


def batches(images, batch_size, seed, start_step, count, labels=None):
    """The first `count` image batches; checks that each label travels with its image."""
    labels = np.arange(len(images)) if labels is None else labels
    lookup = {image.tobytes(): label for image, label in zip(images, labels)}
    it = data.train_batches(images, labels, batch_size, seed, start_step).as_numpy_iterator()
    stream = []
    for _ in range(count):
        image_batch, label_batch = next(it)
        assert label_batch.dtype == np.int32
        pixels = np.round((image_batch + 1.0) * 127.5).astype(np.uint8)
        assert [lookup[p.tobytes()] for p in pixels] == list(label_batch)
        stream.append(image_batch)
    return np.stack(stream)


def test_stream_under_tfds_mock_data(mock_mnist):
    images, labels = mock_mnist
    assert images.shape == (100, 28, 28, 1) and images.dtype == np.uint8
    assert labels.shape == (100,)
    stream = batches(images, 20, seed=0, start_step=0, count=10, labels=labels)  # two epochs
    assert stream.shape == (10, 20, 28, 28, 1) and stream.dtype == np.float32
    scaled = (images.astype(np.float32) / 127.5 - 1.0).reshape(100, -1)  # as tf.data computes it
    assert stream.min() >= -1.0 and stream.max() <= 1.0
    assert len(np.unique(scaled, axis=0)) == 100  # the mock images are distinct, so...
    for epoch in stream.reshape(2, 100, -1):  # ...each epoch holds every image exactly once
        np.testing.assert_array_equal(np.unique(epoch, axis=0), np.unique(scaled, axis=0))
    assert not np.array_equal(stream[:5], stream[5:])  # reshuffled every epoch


def test_stream_is_a_pure_function_of_seed_and_step(mock_mnist):
    images, _ = mock_mnist
    whole = batches(images, 32, seed=3, start_step=0, count=12)  # batches cross epochs
    np.testing.assert_array_equal(whole, batches(images, 32, seed=3, start_step=0, count=12))
    for start in (1, 3, 7):
        np.testing.assert_array_equal(whole[start:], batches(images, 32, 3, start, 12 - start))
    assert not np.array_equal(whole, batches(images, 32, seed=4, start_step=0, count=12))


def test_batch_larger_than_the_dataset_is_refused(mock_mnist):
    with pytest.raises(UserError, match="larger than the dataset"):
        data.train_batches(*mock_mnist, 101, 0)


@pytest.mark.parametrize("start,plan", [(0, [1] * 14), (5, [3, 1, 3, 3, 1, 7]), (6, [2, 1])])
def test_device_data_gathers_the_streams_batches(start, plan):
    """The resident split, batched on the devices, gives the tf.data stream's batches exactly,
    one per call or stacked for a call of several steps, across epoch boundaries."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (100, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, 100)
    streamed = stack_batches(train_batches(images, labels, 16, 7, start).as_numpy_iterator(),
                             iter(plan))
    gathered = DeviceData(images, labels, 16, 7, data_parallel_mesh(16)).batches(start, plan)
    calls = list(zip(plan, streamed, gathered, strict=False))
    assert len(calls) == len(plan)
    for steps, (stream_images, stream_labels), (device_images, device_labels) in calls:
        assert device_images.shape == ((16, 28, 28, 1) if steps == 1 else (steps, 16, 28, 28, 1))
        assert device_images.dtype == np.float32 and device_labels.dtype == np.int32
        np.testing.assert_array_equal(np.asarray(device_images), stream_images)
        np.testing.assert_array_equal(np.asarray(device_labels), stream_labels)


def test_epoch_order_is_a_permutation_keyed_by_epoch():
    key = jax.random.key(3)
    first, second = (np.asarray(epoch_order(key, epoch, 1000)) for epoch in (0, 1))
    np.testing.assert_array_equal(np.sort(first), np.arange(1000))
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(first, np.asarray(epoch_order(jax.random.key(3), 0, 1000)))


def test_the_data_order_shares_no_key_with_the_runs_other_streams():
    def raw(key: jax.Array) -> tuple[int, ...]:
        return tuple(np.asarray(jax.random.key_data(key)).tolist())

    seed = 5
    streams = jax.random.split(jax.random.key(seed), 4)  # the trainer's init, step, sample, eval
    others = {raw(k) for k in streams} | {raw(jax.random.fold_in(k, i)) for k in streams
                                          for i in range(16)}  # and their per-step keys
    epochs = {raw(jax.random.fold_in(order_key(seed), epoch)) for epoch in range(16)}
    assert len(epochs) == 16 and not epochs & others
