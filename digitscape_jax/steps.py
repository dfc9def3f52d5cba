"""Train states and the one pure, jitted update over both of them."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from digitscape_jax import xla_flags
from digitscape_jax.clusters import cluster_bounds
from digitscape_jax.config import Config
from digitscape_jax.losses import (discriminator_loss, generator_loss, mode_seeking_loss,
                                   r1_penalty, translate)
from digitscape_jax.models import IMAGE_SHAPE, networks, sample_noise

# Keras's Adam epsilon; optax's default is 1e-8.
ADAM_EPSILON = 1e-7

Metrics = dict[str, jax.Array]


class GeneratorState(train_state.TrainState):
    """G's params and optimizer state, its BatchNorm running statistics, its constants
    (with --clusters, where its noise draws each cluster; else none), and the exponential moving
    average of its params, which draws smoother digits."""

    batch_stats: Any
    constants: Any
    ema_params: Any

    @property
    def variables(self) -> dict[str, Any]:
        """What `Generator.apply` takes: the trained params, the BatchNorm statistics and the
        constants."""
        return self.with_params(self.params)

    @property
    def ema_variables(self) -> dict[str, Any]:
        """The averaged params with the same statistics and constants: what sampling uses."""
        return self.with_params(self.ema_params)

    def with_params(self, params: Any) -> dict[str, Any]:
        """G's variables with `params` in place of its own."""
        constants = {"constants": self.constants} if self.constants else {}
        return {"params": params, "batch_stats": self.batch_stats, **constants}


def create_states(config: Config, key: jax.Array,
                  cluster_frequencies: np.ndarray | jax.Array | None = None
                  ) -> tuple[GeneratorState, train_state.TrainState]:
    """Freshly initialised G and D states, each with its own Adam; with --clusters, G draws
    clusters by `cluster_frequencies` (by default, all equally often).

    Compiled as one program (run op by op, the initialisation took longer than
    compiling and running the first update), without XLA:CPU's costliest optimisations: it
    runs once.
    """
    return _jit_create_states(config)(key, cluster_frequencies)


@functools.cache
def _jit_create_states(config: Config) -> Callable[[jax.Array, Any], Any]:
    return xla_flags.jit_run_once(functools.partial(_create_states, config))


def _create_states(config: Config, key: jax.Array,
                   cluster_frequencies: np.ndarray | jax.Array | None
                   ) -> tuple[GeneratorState, train_state.TrainState]:
    g_key, d_key = jax.random.split(key)
    generator, discriminator = networks(config, jnp.dtype(config.dtype))
    labels = jnp.zeros((1,), jnp.int32)  # Used by conditional networks only.
    g_vars = generator.init(g_key, jnp.zeros((1, config.latent_dim)), train=False, labels=labels)
    d_vars = discriminator.init(d_key, jnp.zeros((1, *IMAGE_SHAPE)), train=False, labels=labels)

    def adam(learning_rate: float) -> optax.GradientTransformation:
        return optax.adam(learning_rate, config.beta1, config.beta2, eps=ADAM_EPSILON)

    constants = g_vars.get("constants", {})
    if cluster_frequencies is not None:
        constants = {"cluster_bounds": cluster_bounds(cluster_frequencies, config.network.noise)}
    g_state = GeneratorState.create(
        apply_fn=generator.apply, params=g_vars["params"], tx=adam(config.learning_rate),
        batch_stats=g_vars["batch_stats"], constants=constants,
        ema_params=jax.tree.map(jnp.copy, g_vars["params"]),  # its own buffers, to donate
    )
    d_state = train_state.TrainState.create(
        apply_fn=discriminator.apply, params=d_vars["params"],
        tx=adam(config.learning_rate * config.d_lr_scale)
    )
    return g_state, d_state


def abstract_states(config: Config, sharding: jax.sharding.Sharding | None = None) -> Any:
    """Shapes, dtypes and placement of (g_state, d_state) for `config`, computed without running.

    Placed by `sharding`, by default on this process's first device: a checkpoint
    written by any number of devices or processes restores onto it.
    """
    abstract = jax.eval_shape(functools.partial(_create_states, config), jax.random.key(0), None)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)


def train_step(
    g_state: GeneratorState,
    d_state: train_state.TrainState,
    images: jax.Array,
    key: jax.Array,
    labels: jax.Array | None = None,
    *,
    config: Config,
) -> tuple[GeneratorState, train_state.TrainState, Metrics]:
    """One GAN update: a single forward pass, both gradients, both applied together.

    `key` is the run's key; the step's randomness (noise, dropout, translations)
    is folded in from `g_state.step`, so it is a pure function of (seed, step).
    A conditional (or clustered) G draws fakes of the real batch's `labels` (its
    digits' classes, clusters, or clusters within digits), so D sees both halves
    with the same classes;
    an unconditional one ignores them. With `config.mode_seeking`, G draws its
    fakes in pairs of one class instead (the first half's labels, twice) and adds
    the mode-seeking term over the pairs to its loss.

    D scores the real and the fake batch in two calls (it has no batch
    statistics), so that each loss backpropagates only where it depends:
    d_loss into D's params, g_loss through D's fake half alone into G. Every
    `config.r1_every`-th step (counting from 1) also adds the R1 penalty's
    gradient, weighted by `r1_every` so that its average matches an every-step one.
    """
    if config.label_count and labels is None:
        raise ValueError("a conditional or clustered model trains on labelled batches")
    step_key = jax.random.fold_in(key, g_state.step)
    noise_key, dropout_key = jax.random.split(step_key)
    real_key, fake_key = jax.random.split(dropout_key)
    # fold_in(k, i) is split(k)[i] for i < 2: 2 keeps the shifts apart from noise and dropout.
    real_shift_key, fake_shift_key = jax.random.split(jax.random.fold_in(step_key, 2))
    noise = sample_noise(noise_key, config.network.noise, (images.shape[0], config.latent_dim))
    images = translate(real_shift_key, images, config.translate)
    # With mode seeking, fakes come in pairs of one class: the two halves of the batch draw
    # the classes of the real batch's first half.
    fake_labels = labels
    if config.mode_seeking and labels is not None:
        fake_labels = jnp.tile(labels[:labels.shape[0] // 2], 2)

    def generate(g_params):
        fake, updates = g_state.apply_fn(g_state.with_params(g_params), noise, train=True,
                                         classes=fake_labels, mutable=["batch_stats"])
        return fake, updates["batch_stats"]

    def discriminate(d_params, batch, labels, dropout_key):
        return d_state.apply_fn({"params": d_params}, batch, train=True, labels=labels,
                                rngs={"dropout": dropout_key})[:, 0]

    fake, g_backward, batch_stats = jax.vjp(generate, g_state.params, has_aux=True)
    real_logits, real_backward = jax.vjp(
        lambda d_params: discriminate(d_params, images, labels, real_key), d_state.params)
    fake_logits, fake_backward = jax.vjp(
        lambda d_params, fake: discriminate(
            d_params, translate(fake_shift_key, fake, config.translate), fake_labels, fake_key),
        d_state.params, fake)

    d_loss, (real_cotangent, fake_cotangent) = jax.value_and_grad(
        discriminator_loss, argnums=(0, 1))(real_logits, fake_logits, config.loss)
    g_loss, g_cotangent = jax.value_and_grad(generator_loss)(fake_logits, config.loss)
    (d_grads,) = real_backward(real_cotangent)
    d_grads = jax.tree.map(jnp.add, d_grads, fake_backward(fake_cotangent)[0])
    fake_cotangent_of_g = fake_backward(g_cotangent)[1]
    extra_metrics = {}
    if config.mode_seeking:
        mode_seeking, mode_seeking_cotangent = jax.value_and_grad(mode_seeking_loss)(fake, noise)
        fake_cotangent_of_g += config.mode_seeking * mode_seeking_cotangent
        extra_metrics["mode_seeking"] = mode_seeking
    (g_grads,) = g_backward(fake_cotangent_of_g)
    if config.r1_gamma:
        r1, d_grads = _add_r1(d_state.params, d_grads, g_state.step, config,
                              lambda d_params, x: discriminate(d_params, x, labels, real_key),
                              images)
        extra_metrics["r1"] = r1
    metrics = {
        "d_loss": d_loss,
        "g_loss": g_loss,
        "d_real": jax.nn.sigmoid(real_logits).mean(),  # D(x)
        "d_fake": jax.nn.sigmoid(fake_logits).mean(),  # D(G(z))
        **extra_metrics,
    }
    lr_scale = learning_rate_scale(g_state.step, config.lr_half_life)
    g_state = apply_gradients(g_state, g_grads, lr_scale, batch_stats=batch_stats)
    g_state = g_state.replace(ema_params=update_ema(g_state.ema_params, g_state.params,
                                                    config.ema_decay, g_state.step))
    d_state = apply_gradients(d_state, d_grads, lr_scale)
    return g_state, d_state, metrics


def _add_r1(d_params: Any, d_grads: Any, step: jax.Array, config: Config,
            discriminate: Callable[[Any, jax.Array], jax.Array], real: jax.Array
            ) -> tuple[jax.Array, Any]:
    """(R1 penalty, d_grads plus its weighted gradient) on R1 steps; (0, d_grads) on others,
    where the branch costs nothing (`lax.cond` runs only the branch taken)."""
    weight = config.r1_gamma / 2 * config.r1_every

    def with_penalty(d_params):
        r1, grads = jax.value_and_grad(
            lambda p: r1_penalty(lambda x: discriminate(p, x), real))(d_params)
        return r1, jax.tree.map(lambda g, r: g + weight * r, d_grads, grads)

    if config.r1_every == 1:
        return with_penalty(d_params)
    return jax.lax.cond((step + 1) % config.r1_every == 0, with_penalty,
                        lambda _: (jnp.zeros((), jnp.float32), d_grads), d_params)


def learning_rate_scale(step: jax.Array, half_life: int) -> jax.Array | None:
    """What the learning rates are multiplied by at `step`: 0.5 ** (step / half_life), a smooth
    exponential decay (None where half_life is 0: no decay)."""
    if not half_life:
        return None
    return 0.5 ** (step.astype(jnp.float32) / half_life)


def apply_gradients(state: Any, grads: Any, lr_scale: jax.Array | None, **changes: Any) -> Any:
    """`state.apply_gradients`, with Adam's updates scaled by `lr_scale`, which scales its
    learning rate. Kept out of the optimizer, the decay adds no optimizer state, so
    checkpoints of every half-life have one structure and a resume may change it."""
    if lr_scale is None:
        return state.apply_gradients(grads=grads, **changes)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda update: update * lr_scale, updates)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state, **changes)


def update_ema(average: Any, params: Any, decay: float, step: jax.Array) -> Any:
    """One step of the moving average, with TF's warm-up: the decay is at most
    (1 + step) / (10 + step), so early averages are not stuck at the initialisation."""
    decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return optax.incremental_update(params, average, 1.0 - decay)


TrainStep = Callable[
    ...,  # (g_state, d_state, images, key, labels=None)
    tuple[GeneratorState, train_state.TrainState, Metrics],
]


def train_steps(
    g_state: GeneratorState,
    d_state: train_state.TrainState,
    images: jax.Array,
    key: jax.Array,
    labels: jax.Array | None = None,
    *,
    config: Config,
) -> tuple[GeneratorState, train_state.TrainState, Metrics]:
    """`len(images)` updates in one call, one per leading slice of `images` (and `labels`);
    the metrics are the last update's.

    The loop is unrolled: XLA:CPU runs the convolution gradients many times slower
    inside a rolled `lax.scan`.
    """
    for i in range(images.shape[0]):
        g_state, d_state, metrics = train_step(
            g_state, d_state, images[i], key, None if labels is None else labels[i], config=config)
    return g_state, d_state, metrics


def jit_train_step(config: Config, donate: bool = True, steps_per_call: int = 1) -> TrainStep:
    """`train_step` for this config, jitted once, donating both states by default.

    With `steps_per_call` above 1, `train_steps` instead: batches stacked along a
    new leading axis, that many updates per call, to save per-call overhead.
    """
    step = train_step if steps_per_call == 1 else train_steps
    return jax.jit(functools.partial(step, config=config), donate_argnums=(0, 1) if donate else ())
