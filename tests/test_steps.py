"""The update: pure, deterministic, the right gradients, and it teaches D."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from digitscape_jax.config import Config
from digitscape_jax.models import sample_noise
from digitscape_jax.steps import create_states, jit_train_step, update_ema


def to_numpy(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def state_trees(g_state, d_state):
    return (g_state.step, g_state.params, g_state.opt_state, g_state.batch_stats,
            g_state.ema_params, d_state.step, d_state.params, d_state.opt_state)


def test_train_step_is_pure_and_deterministic(real_batch):
    config = Config(arch="seed", batch_size=64)
    g_state, d_state = create_states(config, jax.random.key(0))
    key = jax.random.key(1)
    before = to_numpy((state_trees(g_state, d_state), real_batch))
    step = jit_train_step(config, donate=False)

    first = step(g_state, d_state, real_batch, key)
    second = step(g_state, d_state, real_batch, key)
    assert_trees_equal(to_numpy((state_trees(*first[:2]), first[2])),
                       to_numpy((state_trees(*second[:2]), second[2])))
    assert_trees_equal(before, to_numpy((state_trees(g_state, d_state), real_batch)))
    assert int(first[0].step) == int(first[1].step) == 1
    assert set(first[2]) == {"d_loss", "g_loss", "d_real", "d_fake"}

    # The donating version, used for training, computes the same.
    donated = jit_train_step(config)(*jax.tree.map(jnp.copy, (g_state, d_state)), real_batch, key)
    assert_trees_equal(to_numpy(state_trees(*donated[:2])), to_numpy(state_trees(*first[:2])))

    # The step's noise and dropout are folded in from the step count: the same states at
    # another step count draw anew.
    later = step(g_state.replace(step=1), d_state, real_batch, key)
    assert float(later[2]["d_fake"]) != float(first[2]["d_fake"])


def test_one_forward_pass_gives_each_network_its_own_loss_gradient(real_batch):
    """The update applies jax.grad of d_loss (w.r.t. D) and of g_loss (w.r.t. G)."""
    config = Config(arch="seed", batch_size=64)
    g_state, d_state = create_states(config, jax.random.key(0))
    key = jax.random.key(3)
    noise_key, dropout_key = jax.random.split(jax.random.fold_in(key, 0))
    real_key, fake_key = jax.random.split(dropout_key)
    noise = sample_noise(noise_key, "uniform", (64, 100))

    def logits(g_params, d_params):
        fake, _ = g_state.apply_fn({"params": g_params, "batch_stats": g_state.batch_stats},
                                   noise, train=True, mutable=["batch_stats"])
        return [d_state.apply_fn({"params": d_params}, images, train=True,
                                 rngs={"dropout": dropout})[:, 0]
                for images, dropout in ((real_batch, real_key), (fake, fake_key))]

    def bce(x, label):
        return optax.sigmoid_binary_cross_entropy(x, jnp.full_like(x, label)).mean()

    def d_loss(g_params, d_params):
        real, fake = logits(g_params, d_params)
        return (bce(real, 1.0) + bce(fake, 0.0)) / 2

    def g_loss(g_params, d_params):
        return bce(logits(g_params, d_params)[1], 1.0)

    # With plain SGD at rate 1, each update is exactly minus the gradient it applied.
    sgd = optax.sgd(1.0)
    g_sgd = g_state.replace(tx=sgd, opt_state=sgd.init(g_state.params))
    d_sgd = d_state.replace(tx=sgd, opt_state=sgd.init(d_state.params))
    new_g, new_d, metrics = jit_train_step(config, donate=False)(g_sgd, d_sgd, real_batch, key)
    applied = {"g": jax.tree.map(lambda a, b: a - b, g_state.params, new_g.params),
               "d": jax.tree.map(lambda a, b: a - b, d_state.params, new_d.params)}
    g_value, g_grad = jax.jit(jax.value_and_grad(g_loss, 0))(g_state.params, d_state.params)
    d_value, d_grad = jax.jit(jax.value_and_grad(d_loss, 1))(g_state.params, d_state.params)
    expected = {"g": g_grad, "d": d_grad}
    for net in ("g", "d"):
        scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(expected[net]))
        jax.tree.map(lambda a, b, scale=scale: np.testing.assert_allclose(
                         a, b, rtol=1e-4, atol=1e-4 * scale),
                     applied[net], expected[net])
    np.testing.assert_allclose(metrics["d_loss"], d_value, rtol=1e-6)
    np.testing.assert_allclose(metrics["g_loss"], g_value, rtol=1e-6)


def discriminator_accuracy(g_state, d_state, real, key) -> float:
    """Fraction of real and fake digits that D (in inference mode) classifies correctly."""
    noise = sample_noise(key, "uniform", (real.shape[0], 100))
    fake = g_state.apply_fn({"params": g_state.params, "batch_stats": g_state.batch_stats},
                            noise, train=False)
    real_logits = d_state.apply_fn({"params": d_state.params}, real, train=False)
    fake_logits = d_state.apply_fn({"params": d_state.params}, fake, train=False)
    return float(((real_logits > 0).mean() + (fake_logits < 0).mean()) / 2)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_few_dozen_steps_teach_d_to_tell_real_from_fake(real_batch, dtype):
    config = Config(arch="seed", batch_size=64, learning_rate=1e-3, dtype=dtype)
    g_state, d_state = create_states(config, jax.random.key(0))
    eval_key = jax.random.key(7)
    before = discriminator_accuracy(g_state, d_state, real_batch, eval_key)
    step = jit_train_step(config)
    first_loss = None
    for _ in range(40):
        g_state, d_state, metrics = step(g_state, d_state, real_batch, jax.random.key(1))
        first_loss = first_loss if first_loss is not None else float(metrics["d_loss"])
    after = discriminator_accuracy(g_state, d_state, real_batch, eval_key)
    assert before < 0.7
    assert after > 0.95
    assert float(metrics["d_loss"]) < first_loss - 0.2
    assert float(metrics["d_real"]) > float(metrics["d_fake"]) + 0.3
    # Mixed precision computes in bf16 but keeps every state and loss in float32.
    for leaf in jax.tree.leaves((state_trees(g_state, d_state), metrics)):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype


def test_bfloat16_computes_in_bfloat16(real_batch):
    """The bf16 forward pass really runs in bf16: it differs from float32 by bf16 rounding."""
    g32, _ = create_states(Config(arch="seed"), jax.random.key(0))
    g16, _ = create_states(Config(arch="seed", dtype="bfloat16"), jax.random.key(0))
    noise = sample_noise(jax.random.key(1), "uniform", (8, 100))
    out32 = g32.apply_fn(g32.variables, noise, train=False)
    out16 = g16.apply_fn(g32.variables, noise, train=False)  # the same float32 params
    assert out16.dtype == jnp.bfloat16 and out32.dtype == jnp.float32
    difference = float(jnp.abs(out16.astype(jnp.float32) - out32).max())
    assert 1e-4 < difference < 0.1


def test_the_generator_average_follows_the_params(real_batch):
    """EMA: a weighted average of the params after each update, warmed up; 0 turns it off."""
    decay = 0.9
    config = Config(arch="seed", ema_decay=decay)
    g_state, d_state = create_states(config, jax.random.key(0))
    step = jit_train_step(config, donate=False)
    expected = g_state.params
    for i in range(3):
        g_state, d_state, _ = step(g_state, d_state, real_batch, jax.random.key(1))
        weight = min(decay, (1 + i + 1) / (10 + i + 1))
        expected = jax.tree.map(lambda e, p, w=weight: w * e + (1 - w) * p,
                                expected, g_state.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 g_state.ema_params, expected)
    assert any(bool(jnp.any(a != b)) for a, b in zip(
        jax.tree.leaves(g_state.ema_params), jax.tree.leaves(g_state.params)))
    # The step's average is update_ema's (above); at decay 0 it is the params themselves.
    off = update_ema(g_state.ema_params, g_state.params, 0.0, g_state.step)
    jax.tree.map(np.testing.assert_array_equal, off, g_state.params)
