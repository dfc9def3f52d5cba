"""Class-conditional generation: labels reach both networks, and sample.py asks for digits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from digitscape_jax import cli
from digitscape_jax.checkpointing import Checkpointer
from digitscape_jax.config import Config
from digitscape_jax.errors import UserError
from digitscape_jax.models import networks, sample_noise
from digitscape_jax.sampling import MNIST_TEST_CLASS_COUNTS, class_labels, proportional_counts
from digitscape_jax.steps import create_states, jit_train_step
from test_cli import flag_error, one_line_error

import sample

CONDITIONAL = Config(arch="seed", conditional=True)


@pytest.fixture(scope="module")
def conditional_ckpt(tmp_path_factory):
    """A conditional checkpoint at step 1, straight from the initial states."""
    g_state, d_state = create_states(CONDITIONAL, jax.random.key(0))
    directory = tmp_path_factory.mktemp("conditional") / "ckpt"
    Checkpointer(directory).save(1, g_state, d_state, CONDITIONAL)
    return directory


def test_the_label_changes_what_each_network_computes():
    generator, discriminator = networks(CONDITIONAL)
    g_state, d_state = create_states(CONDITIONAL, jax.random.key(0))
    noise = jnp.repeat(sample_noise(jax.random.key(1), "uniform", (1, 100)), 10, axis=0)
    digits = generator.apply(g_state.variables, noise, train=False, labels=jnp.arange(10))
    assert digits.shape == (10, 28, 28, 1)
    assert len({np.asarray(d).tobytes() for d in digits}) == 10  # same noise, ten labels
    images = jnp.repeat(digits[:1], 10, axis=0)
    logits = discriminator.apply({"params": d_state.params}, images, train=False,
                                 labels=jnp.arange(10))
    assert len(np.unique(np.asarray(logits))) == 10


def test_a_conditional_step_needs_labels_and_uses_them(mnist_idx):
    from digitscape_jax.data import read_idx_split

    images, labels = read_idx_split(mnist_idx, "train")
    batch = jnp.asarray(images[:64, ..., None], jnp.float32) / 127.5 - 1.0
    step = jit_train_step(CONDITIONAL, donate=False)
    g_state, d_state = create_states(CONDITIONAL, jax.random.key(0))
    with pytest.raises(ValueError, match="labelled batches"):
        step(g_state, d_state, batch, jax.random.key(1))
    _, _, right = step(g_state, d_state, batch, jax.random.key(1), jnp.asarray(labels[:64]))
    _, _, wrong = step(g_state, d_state, batch, jax.random.key(1),
                       jnp.asarray((labels[:64] + 1) % 10))
    assert float(right["d_loss"]) != float(wrong["d_loss"])


def test_class_labels():
    assert class_labels(Config(arch="seed"), 5) is None
    with pytest.raises(UserError, match="trained without labels"):
        class_labels(Config(arch="seed"), 5, digit=3)
    np.testing.assert_array_equal(class_labels(CONDITIONAL, 4, digit=7), [7, 7, 7, 7])
    np.testing.assert_array_equal(class_labels(CONDITIONAL, 6, rows_of=2), [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(class_labels(CONDITIONAL, 12), [*range(10), 0, 1])


def test_class_labels_at_the_test_sets_class_mix():
    mix = MNIST_TEST_CLASS_COUNTS
    assert class_labels(Config(arch="seed"), 100, mix=mix) is None
    labels = class_labels(CONDITIONAL, 10_000, mix=mix)  # the test set's own size: its counts
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), mix)
    for n in (7, 200, 999, 8800):
        labels = class_labels(CONDITIONAL, n, mix=mix)
        counts = np.bincount(labels, minlength=10)
        exact = n * np.asarray(mix) / sum(mix)
        assert len(labels) == n and np.all(np.abs(counts - exact) < 1), n  # floor or ceiling
        assert np.all(np.diff(labels) >= 0)  # in class order
        np.testing.assert_array_equal(class_labels(CONDITIONAL, n, mix=mix), labels)
    assert list(proportional_counts(7, [1, 1, 1])) == [3, 2, 2]  # ties: the lower class first
    for bad in ([1, 2, 3], [0] * 10, [-1] + [1] * 9):
        with pytest.raises(UserError, match="class mix"):
            class_labels(CONDITIONAL, 10, mix=bad)


def test_sample_draws_the_digit_asked_for(conditional_ckpt, tmp_path):
    out = tmp_path / "seven.npz"
    assert cli.run(sample.main, ["--ckpt", str(conditional_ckpt), "--digit", "7", "--n", "20",
                                 "--npz", str(out), "--out", str(tmp_path / "s.png")]) == 0
    np.testing.assert_array_equal(np.load(out)["labels"], np.full(20, 7))
    default = tmp_path / "grid.npz"
    assert cli.run(sample.main, ["--ckpt", str(conditional_ckpt), "--npz", str(default),
                                 "--out", str(tmp_path / "grid.png")]) == 0
    labels = np.load(default)["labels"]
    np.testing.assert_array_equal(labels.reshape(10, 10), np.repeat(np.arange(10), 10).reshape(10, 10))


def test_digit_is_refused_for_an_unconditional_generator(trained_run, tmp_path, capsys):
    assert cli.run(sample.main, ["--ckpt", str(trained_run[0] / "ckpt"), "--digit", "7",
                                 "--out", str(tmp_path / "s.png")]) == 1
    assert "trained without labels" in one_line_error(capsys)
    assert "--digit: invalid choice: 10" in flag_error(
        capsys, sample.main, ["--ckpt", str(trained_run[0] / "ckpt"), "--digit", "10"])


def test_conditional_savedmodel_matches_the_jax_generator(conditional_ckpt, tmp_path):
    import tensorflow as tf

    from digitscape_jax.sampling import load_generator

    assert cli.run(sample.main, ["--ckpt", str(conditional_ckpt), "--export-savedmodel",
                                 str(tmp_path / "sm")]) == 0
    config, variables, _ = load_generator(conditional_ckpt)
    noise = np.asarray(sample_noise(jax.random.key(2), "uniform", (5, 100)))
    labels = np.array([0, 3, 3, 9, 1], np.int32)
    expected = networks(config)[0].apply(variables, noise, train=False, labels=labels)
    (got,) = tf.saved_model.load(str(tmp_path / "sm")).signatures["serving_default"](
        noise=tf.constant(noise), labels=tf.constant(labels)).values()
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
