"""The recipe's terms against plain-JAX references: hinge, R1 (lazy), translation, TTUR, mode
seeking, the minibatch standard deviation, spectral normalisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from digitscape_jax import clusters
from digitscape_jax.config import ARCHS, Config, ConfigError
from digitscape_jax.layers import spectral_normalize
from digitscape_jax.losses import (discriminator_loss, generator_loss, mode_seeking_loss,
                                   r1_penalty, translate)
from digitscape_jax.models import minibatch_std, networks, sample_noise
from digitscape_jax.steps import create_states, jit_train_step


def test_the_losses_are_their_textbook_formulas():
    real, fake = jnp.array([2.0, -0.5, 0.3]), jnp.array([-3.0, 0.9, 1.5])
    np.testing.assert_allclose(discriminator_loss(real, fake, "hinge"),
                               (np.mean(np.maximum(0, 1 - real)) +
                                np.mean(np.maximum(0, 1 + fake))) / 2, rtol=1e-6)
    np.testing.assert_allclose(generator_loss(fake, "hinge"), -np.mean(fake), rtol=1e-6)
    sigmoid = 1 / (1 + np.exp(-np.asarray(fake)))
    np.testing.assert_allclose(generator_loss(fake, "bce"), -np.mean(np.log(sigmoid)), rtol=1e-6)
    np.testing.assert_allclose(
        discriminator_loss(real, fake, "bce"),
        (-np.mean(np.log(1 / (1 + np.exp(-np.asarray(real))))) - np.mean(np.log(1 - sigmoid))) / 2,
        rtol=1e-6)


def test_r1_is_the_mean_squared_norm_of_each_real_digits_input_gradient(real_batch):
    config = Config(arch="small", d_dropout=0.0)
    _, d_state = create_states(config, jax.random.key(0))
    images = jnp.asarray(real_batch[:6])

    def logit(image):  # one digit at a time: no batch to mix them
        return d_state.apply_fn({"params": d_state.params}, image[None], train=False)[0, 0]

    input_grad = jax.jit(jax.grad(logit))
    expected = np.mean([float(jnp.sum(input_grad(image) ** 2)) for image in images])
    got = jax.jit(r1_penalty, static_argnums=0)(
        lambda x: d_state.apply_fn({"params": d_state.params}, x, train=False)[:, 0], images)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert expected > 0


def test_the_update_applies_the_hinge_and_lazy_r1_gradients(real_batch):
    """D's gradient is that of its hinge loss plus, every r1_every-th step (counting from 1),
    r1_every * gamma / 2 times R1's; the other steps skip R1 (and report 0)."""
    config = Config(arch="seed", loss="hinge", r1_gamma=2.0, r1_every=4, d_dropout=0.0)
    g_state, d_state = create_states(config, jax.random.key(0))
    sgd = optax.sgd(1.0)  # at rate 1, each update is minus the gradient it applied
    g_state = g_state.replace(tx=sgd, opt_state=sgd.init(g_state.params))
    d_state = d_state.replace(tx=sgd, opt_state=sgd.init(d_state.params))
    key = jax.random.key(3)
    train_step = jit_train_step(config, donate=False)

    def d_logits(d_params, images):
        return d_state.apply_fn({"params": d_params}, images, train=True)[:, 0]

    @jax.jit
    def reference(step, r1_weight):
        noise_key, _ = jax.random.split(jax.random.fold_in(key, step))
        fake, _ = g_state.apply_fn(g_state.variables, sample_noise(noise_key, "uniform", (64, 100)),
                                   train=True, mutable=["batch_stats"])

        def loss(d_params):
            hinge = (jax.nn.relu(1 - d_logits(d_params, real_batch)).mean()
                     + jax.nn.relu(1 + d_logits(d_params, fake)).mean()) / 2
            r1 = r1_penalty(lambda x: d_logits(d_params, x), real_batch)
            return hinge + r1_weight * r1, r1

        return jax.value_and_grad(loss, has_aux=True)(d_state.params)

    for step, applies_r1 in ((3, True), (4, False)):
        _, new_d, metrics = train_step(g_state.replace(step=step), d_state.replace(step=step),
                                       real_batch, key)
        applied = jax.tree.map(lambda a, b: a - b, d_state.params, new_d.params)
        (_, r1), expected = reference(step, 4 * 2.0 / 2 if applies_r1 else 0.0)
        scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(expected))
        jax.tree.map(lambda a, b, scale=scale: np.testing.assert_allclose(
            a, b, rtol=1e-4, atol=1e-4 * scale), applied, expected)
        np.testing.assert_allclose(metrics["r1"], r1 if applies_r1 else 0.0, rtol=1e-5)


def test_the_mode_seeking_term_is_its_formula():
    """1 / (mean |fake_i - fake_(i+n/2)| / mean |z_i - z_(i+n/2)| + 1e-5), over both halves."""
    rng = np.random.default_rng(0)
    fake, noise = rng.uniform(-1, 1, (6, 28, 28, 1)), rng.normal(size=(6, 100))
    spread = np.abs(fake[:3] - fake[3:]).mean() / np.abs(noise[:3] - noise[3:]).mean()
    np.testing.assert_allclose(mode_seeking_loss(jnp.asarray(fake, jnp.float32),
                                                 jnp.asarray(noise, jnp.float32)),
                               1 / (spread + 1e-5), rtol=1e-5)
    # Pairs of identical fakes are the worst case: the term is then 1 / epsilon.
    same = jnp.asarray(np.concatenate([fake[:3], fake[:3]]), jnp.float32)
    np.testing.assert_allclose(mode_seeking_loss(same, jnp.asarray(noise)), 1e5, rtol=1e-6)


def test_the_update_adds_the_mode_seeking_gradient_to_gs(real_batch):
    """G's gradient is that of its loss on D(G(z)) plus `mode_seeking` times the term's, with
    the fakes drawn in pairs of one class: both halves take the real batch's first half of
    classes, and D scores them with those classes."""
    config = Config(arch="seed", clusters=4, mode_seeking=0.5, d_dropout=0.0)
    g_state, d_state = create_states(config, jax.random.key(0))
    sgd = optax.sgd(1.0)  # at rate 1, each update is minus the gradient it applied
    g_state = g_state.replace(tx=sgd, opt_state=sgd.init(g_state.params))
    key, step = jax.random.key(3), 7
    labels = jnp.asarray(np.random.default_rng(1).integers(0, 4, len(real_batch)), jnp.int32)
    pair_labels = jnp.concatenate([labels[:32], labels[:32]])

    @jax.jit
    def reference():
        noise_key, _ = jax.random.split(jax.random.fold_in(key, step))
        noise = sample_noise(noise_key, "uniform", (64, 100))

        def loss(g_params):
            fake, _ = g_state.apply_fn(g_state.with_params(g_params), noise, train=True,
                                       labels=pair_labels, mutable=["batch_stats"])
            logits = d_state.apply_fn({"params": d_state.params}, fake, train=True,
                                      labels=pair_labels)[:, 0]
            seeking = mode_seeking_loss(fake, noise)
            return generator_loss(logits, "bce") + 0.5 * seeking, seeking

        return jax.value_and_grad(loss, has_aux=True)(g_state.params)

    new_g, _, metrics = jit_train_step(config, donate=False)(
        g_state.replace(step=step), d_state.replace(step=step), real_batch, key, labels)
    applied = jax.tree.map(lambda a, b: a - b, g_state.params, new_g.params)
    (_, seeking), expected = reference()
    scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(expected))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale),
                 applied, expected)
    np.testing.assert_allclose(metrics["mode_seeking"], seeking, rtol=1e-5)
    assert float(seeking) > 0


def test_the_minibatch_std_channel_is_its_formula():
    """One channel appended, the same over each group of consecutive samples and each pixel: the
    mean over the features of their standard deviation within the group."""
    x = np.random.default_rng(0).normal(size=(8, 3, 3, 5)).astype(np.float32)
    out = np.asarray(jax.jit(minibatch_std, static_argnums=1)(jnp.asarray(x), 4))
    assert out.shape == (8, 3, 3, 6)
    np.testing.assert_array_equal(out[..., :5], x)
    for group in range(2):
        members = x[4 * group:4 * group + 4]
        expected = np.mean(np.sqrt(members.var(axis=0) + 1e-8))
        np.testing.assert_allclose(out[4 * group:4 * group + 4, :, :, 5], expected, rtol=1e-5)
    # Fewer samples than a group: they are one group.
    np.testing.assert_allclose(np.asarray(minibatch_std(jnp.asarray(x[:2]), 4))[:, 0, 0, 5],
                               np.mean(np.sqrt(x[:2].var(axis=0) + 1e-8)), rtol=1e-5)


def test_with_minibatch_std_a_digits_logit_depends_on_its_group_alone(real_batch):
    """D scores each digit with its group of four: changing the last digit changes the logits
    of its group, not those of the groups before it; without the feature, nothing else."""
    images = jnp.asarray(real_batch[:8])
    changed = images.at[7].set(-images[7])
    for group_size, moved in ((4, [4, 5, 6, 7]), (0, [7])):
        config = Config(arch="seed", d_dropout=0.0, minibatch_std=group_size)
        _, discriminator = networks(config)
        params = discriminator.init(jax.random.key(0), images, train=False)
        logits = [discriminator.apply(params, batch, train=False)[:, 0]
                  for batch in (images, changed)]
        assert list(np.flatnonzero(np.asarray(logits[0] != logits[1]))) == moved


def test_minibatch_std_is_checked_against_the_batch():
    assert Config(minibatch_std=4).minibatch_std == 4
    with pytest.raises(ConfigError, match="minibatch_std must be 0 or at least 2, got 1"):
        Config(minibatch_std=1)
    with pytest.raises(ConfigError, match=r"batch_size must be a multiple of --minibatch-std "
                       r"\(3\), got 64"):
        Config(minibatch_std=3)


@pytest.mark.parametrize("shape", [(5, 5, 1, 32), (5, 5, 32, 64), (3, 3, 2, 40)])
def test_spectral_normalize_divides_by_the_largest_singular_value(shape):
    """Its value and its gradient are those of dividing by numpy's and JAX's SVD, for kernels
    with more rows than columns and more columns than rows."""
    kernel = jax.random.normal(jax.random.key(0), shape)
    matrix = np.asarray(kernel).reshape(-1, shape[-1])
    normalised = np.asarray(jax.jit(spectral_normalize)(kernel))
    np.testing.assert_allclose(normalised, kernel / np.linalg.svd(matrix, compute_uv=False)[0],
                               rtol=1e-5, atol=1e-7)
    assert np.linalg.svd(normalised.reshape(matrix.shape), compute_uv=False)[0] == (
        pytest.approx(1.0, abs=1e-5))

    def through(normalize):
        return jax.jit(jax.grad(lambda k: jnp.sum(jnp.sin(3.0 * normalize(k)))))(kernel)

    def by_svd(k):
        return k / jnp.linalg.svd(k.reshape(-1, k.shape[-1]), compute_uv=False)[0]

    expected = through(by_svd)
    np.testing.assert_allclose(through(spectral_normalize), expected, rtol=1e-4,
                               atol=1e-5 * float(jnp.abs(expected).max()))


def test_with_spectral_norm_d_convolves_with_its_normalised_kernels(real_batch):
    """D with --spectral-norm convs, on its parameters, scores as plain D does on the same
    parameters with each convolution kernel divided by its largest singular value; its dense
    layer is left as it is. (The division itself is the test above's.)"""
    images = jnp.asarray(real_batch[:8])
    _, normalised_d = networks(Config(arch="small", d_dropout=0.0, spectral_norm="convs"))
    _, plain_d = networks(Config(arch="small", d_dropout=0.0))
    params = plain_d.init(jax.random.key(0), images, train=False)["params"]
    divided = {name: ({**layer, "kernel": spectral_normalize(layer["kernel"])}
                      if name.startswith("Conv") else layer) for name, layer in params.items()}
    assert sum(name.startswith("Conv") for name in params) == 2
    got = normalised_d.apply({"params": params}, images, train=False)
    np.testing.assert_allclose(got, plain_d.apply({"params": divided}, images, train=False),
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, plain_d.apply({"params": params}, images, train=False))


def test_d_sees_both_halves_translated_with_their_own_shifts(real_batch):
    """D's mean outputs in the step are those of the real batch and of G's fakes, each
    shifted by translate() with the step's own keys (apart from the noise's and dropout's)."""
    config = Config(arch="seed", translate=2, d_dropout=0.0)
    g_state, d_state = create_states(config, jax.random.key(0))
    key, step = jax.random.key(4), 7
    _, _, metrics = jit_train_step(config, donate=False)(
        g_state.replace(step=step), d_state.replace(step=step), real_batch, key)
    step_key = jax.random.fold_in(key, step)
    noise_key, dropout_key = jax.random.split(step_key)
    real_shift, fake_shift = jax.random.split(jax.random.fold_in(step_key, 2))
    assert len({str(jax.random.key_data(k)) for k in (noise_key, dropout_key, real_shift,
                                                       fake_shift)}) == 4
    fake, _ = g_state.apply_fn(g_state.variables, sample_noise(noise_key, "uniform", (64, 100)),
                               train=True, mutable=["batch_stats"])

    def d_mean(images):
        return float(jax.nn.sigmoid(d_state.apply_fn({"params": d_state.params}, images,
                                                     train=True)).mean())

    np.testing.assert_allclose(metrics["d_real"], d_mean(translate(real_shift, real_batch, 2)),
                               rtol=1e-5)
    np.testing.assert_allclose(metrics["d_fake"], d_mean(translate(fake_shift, fake, 2)),
                               rtol=1e-5)
    assert abs(float(metrics["d_real"]) - d_mean(real_batch)) > 1e-4  # the shift mattered


def test_r1_gradient_through_the_fast_conv_is_flax_convs():
    """R1's gradient is second order: through Conv's custom input gradient, it must match
    what plain XLA computes through nn.Conv with the same params."""
    from flax import linen as nn

    from digitscape_jax.layers import Conv

    x = jax.random.normal(jax.random.key(0), (3, 28, 28, 1))
    ours = Conv(16, strides=2)
    variables = ours.init(jax.random.key(1), x)
    plain = nn.Conv(16, (5, 5), strides=2, padding="SAME")

    def r1_grad(module):
        def penalty(variables):
            return r1_penalty(lambda images: jnp.tanh(module.apply(variables, images)).sum(
                axis=(1, 2, 3)), x)
        return jax.grad(penalty)(variables)

    for a, b in zip(jax.tree.leaves(r1_grad(ours)), jax.tree.leaves(r1_grad(plain)),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        assert float(jnp.abs(b).max()) > 0


def test_d_has_its_own_learning_rate():
    config = Config(arch="small", learning_rate=1e-4, d_lr_scale=4.0)
    g_state, d_state = create_states(config, jax.random.key(0))
    grads = jax.tree.map(jnp.ones_like, d_state.params)
    moved = d_state.apply_gradients(grads=grads)
    # Adam's first step moves each parameter by its learning rate (the gradient is constant).
    for before, after in zip(jax.tree.leaves(d_state.params), jax.tree.leaves(moved.params)):
        np.testing.assert_allclose(before - after, 4e-4, rtol=1e-3)
    g_moved = g_state.apply_gradients(grads=jax.tree.map(jnp.ones_like, g_state.params))
    leaf = jax.tree.leaves(g_state.params)[0] - jax.tree.leaves(g_moved.params)[0]
    np.testing.assert_allclose(leaf, 1e-4, rtol=1e-3)


def test_translation_shifts_each_digit_within_bounds_and_fills_background(real_batch):
    images = jnp.asarray(real_batch[:32])
    assert translate(jax.random.key(0), images, 0) is images
    moved = np.asarray(translate(jax.random.key(0), images, 2))
    padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=-1.0)
    shifts = set()
    for image, out in zip(padded, moved):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if np.array_equal(out, image[2 - dy:30 - dy, 2 - dx:30 - dx])]
        assert matches, "an output is not a shift of its input by at most 2 pixels"
        shifts.add(matches[0])
    assert len(shifts) > 5  # each digit draws its own shift
    # G's gradient passes through: d(sum of kept pixels)/d(input) is 1 where a pixel is kept.
    grad = jax.grad(lambda x: translate(jax.random.key(0), x, 2).sum())(images)
    assert set(np.unique(np.asarray(grad))) <= {0.0, 1.0} and float(grad.sum()) > 0.8 * grad.size


# What every run trained with before these fields existed: a checkpoint config that lacks them
# reads as these values (each setting's `backfill`).
BEFORE_THEIR_FIELDS = {"d_lr_scale": 1.0, "loss": "bce", "r1_gamma": 0.0, "r1_every": 4,
                       "d_dropout": 0.3, "translate": 0, "mode_seeking": 0.0, "clusters": 0,
                       "lr_half_life": 0, "cluster_features": "pixels", "minibatch_std": 0,
                       "spectral_norm": "none", "g_first_kernel": 5}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_a_checkpoint_config_from_before_the_recipe_fields_reads_as_its_old_recipe(arch):
    saved = {"steps": 20000, "arch": arch, "conditional": False, "batch_size": 64,
             "learning_rate": 0.0002, "beta1": 0.5, "beta2": 0.999, "ema_decay": 0.999,
             "latent_dim": 100, "seed": 0, "log_every": 100, "sample_every": 1000,
             "ckpt_every": 1000, "eval_every": 2000, "eval_samples": 2000, "dtype": "float32",
             "steps_per_call": 1, "data_on_device": False}
    config = Config.from_json(saved)
    assert (config.loss, config.r1_gamma, config.d_dropout, config.translate) == ("bce", 0.0,
                                                                                  0.3, 0)
    assert (config.learning_rate, config.d_lr_scale) == (2e-4, 1.0)
    # Whatever the arch's defaults have become: these are what every run used before.
    for name, value in BEFORE_THEIR_FIELDS.items():
        assert getattr(config, name) == value
    assert Config.from_json(config.to_json()) == config


@pytest.mark.slow
def test_the_regularised_recipe_trains(real_batch):
    """A short run with every lever on, self-conditioned on clusters of the batch: finite, and
    D learns to tell real from fake."""
    config = Config(arch="seed", loss="hinge", r1_gamma=1.0, r1_every=2, translate=2,
                    d_dropout=0.0, d_lr_scale=2.0, learning_rate=1e-3, beta2=0.99, clusters=4,
                    mode_seeking=0.5, minibatch_std=4, spectral_norm="convs")
    pixels = np.round((real_batch + 1.0) * 127.5).astype(np.uint8)
    batch_clusters, frequencies = clusters.kmeans(pixels, 4, "pixels")
    g_state, d_state = create_states(config, jax.random.key(0), frequencies)
    step = jit_train_step(config)
    first = None
    for _ in range(30):
        g_state, d_state, metrics = step(g_state, d_state, real_batch, jax.random.key(1),
                                         batch_clusters)
        first = first or {k: float(v) for k, v in metrics.items()}
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert float(metrics["d_real"]) > float(metrics["d_fake"]) + 0.2
    assert float(metrics["d_loss"]) < first["d_loss"]


def test_the_learning_rates_halve_every_half_life(real_batch):
    """With --lr-half-life H, the update at step s moves both networks 0.5 ** (s / H) as far as
    the update without decay (Adam's moments are the same: the decay scales its step alone)."""
    constant = Config(arch="seed", d_dropout=0.0)
    decaying = Config(arch="seed", d_dropout=0.0, lr_half_life=100)
    g_state, d_state = create_states(constant, jax.random.key(0))
    key = jax.random.key(2)
    steps = {config.lr_half_life: jit_train_step(config, donate=False)
             for config in (constant, decaying)}
    for step, scale in ((0, 1.0), (100, 0.5), (250, 0.5 ** 2.5)):
        at = g_state.replace(step=step), d_state.replace(step=step)
        (g0, d0, _), (g1, d1, _) = (steps[h](*at, real_batch, key) for h in (0, 100))
        for start, plain, decayed in ((g_state.params, g0.params, g1.params),
                                      (d_state.params, d0.params, d1.params)):
            # To the rounding of the params (an update is ~5e-5; a float32 near 1 rounds by 6e-8).
            jax.tree.map(lambda s, p, d: np.testing.assert_allclose(
                d - s, scale * (p - s), rtol=1e-4, atol=2e-7), start, plain, decayed)
        jax.tree.map(np.testing.assert_array_equal, g1.opt_state, g0.opt_state)
