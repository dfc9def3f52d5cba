"""Time one GAN update of this project against the same update in TensorFlow/Keras and PyTorch.

Run from the repository root, after `pip install -r requirements-bench.txt`:

    python bench/bench.py                                   # fast, seed, dcgan; batches 64, 256
    python bench/bench.py --archs dcgan --batches 256 --rounds 5 --json results.json
    python bench/bench.py --device gpu                      # jax and torch on the GPU

What is timed is one full update of G and D as `digitscape_jax.steps.train_step` defines it,
with each arch's recipe (`Config(arch=...)`): noise -> G, then D (with dropout where the arch
has it) on the real batch and on the fakes (two calls), d_loss = (bce(real, 1) + bce(fake, 0))
/ 2 and g_loss = bce(fake, 1) (or the hinge losses; plus the mode-seeking term, over fakes
drawn in pairs of one class, where the arch has it: `fast`), both gradients from that one
forward pass, and an Adam step (eps 1e-7, with the arch's learning rates, their decay, and
betas) on each network. Each framework backpropagates each loss only where it depends: d_loss
into D, g_loss through D's fake call into G. An arch conditioned on labels or clusters (`fast`)
conditions both networks in every framework: G's label embedding beside the noise (less its
first entry with clusters), and D's projection of its features onto an embedding of the
label. The "real" images are one fixed random batch in [-1, 1], with fixed random classes:
there is no input pipeline, only the step.

- jax: ours, `create_states` + `jit_train_step`, with the XLA flags `digitscape_jax` sets.
- tf: Keras G and D with the same layers (Sequential, or functional with a label input) and a
  `@tf.function` step (one persistent GradientTape). CPU only.
- torch: the same layers as `nn.Sequential` (inside a module with the embeddings where the arch
  is conditioned), NCHW, eager (`--torch-compile` compiles G and D).

Each framework runs in its own subprocess, one per (arch, batch, round), and the three are
interleaved (jax tf torch jax tf torch ...) so that changes in the machine's load fall on all of
them alike. A worker runs `--warmup` steps (the first one, compilation included, is timed on its
own as "first s"), then times each of `--steps` steps. The table gives, per framework:

    s/step     median over every timed step of every round
    iqr%       interquartile range of those steps, in % of the median (noise of the machine)
    img/s      batch / median
    GFLOP/s    `step_flops` / median (TFLOP/s with --device gpu)
    first s    the first step, compilation included (median over rounds)
    d_loss@1   d_loss of the first step: about log(2) = 0.69 at initialisation for all three
    RSS MB     the worker's peak resident memory (max over rounds)
    vs ours    the framework's median s/step / jax's: above 1 means ours is faster
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]

from digitscape_jax import cli, provenance, records  # (cli sets our XLA flags, inherited by the workers)
from digitscape_jax.config import ARCHS, Config, Network

if TYPE_CHECKING:
    import keras
    import torch

FRAMEWORKS = ("jax", "tf", "torch")

# The settings of digitscape_jax.models (and its .layers) and .steps, repeated here so that
# the tf and torch workers need not import JAX (which would count in their memory).
LATENT_DIM = Config().latent_dim
LEAKY_SLOPE = 0.3
BN_MOMENTUM = 0.99  # Keras/Flax semantics: running = momentum * running + (1 - momentum) * batch
BN_EPSILON = 1e-3
ADAM_EPSILON = 1e-7
KERNEL = 5  # D's kernels and G's but the first (config.g_first_kernel)
SEED_SIZE = 7  # G's first feature map is 7x7; images are 28x28x1.
LABEL_EMBEDDING = 16  # Size of a conditioned G's label embedding, beside the noise.
IMAGE_SIZE = 28
MODE_SEEKING_EPSILON = 1e-5


# --- Work per step ----------------------------------------------------------------------------


def generator_inputs(config: Config) -> int:
    """The size of G's Dense input: the noise (less the entry that draws a cluster, where G
    draws one) and the label embedding of a conditioned G."""
    return LATENT_DIM - (config.clusters > 0) + LABEL_EMBEDDING * (config.label_count > 0)


def generator_macs(config: Config) -> int:
    """Multiply-adds of G's Dense and transposed convolutions for one noise vector."""
    network = config.network
    c0, (c1, c2) = network.g_dense_channels, network.g_conv_channels
    pixels_in = SEED_SIZE**2, (2 * SEED_SIZE) ** 2
    return (
        generator_inputs(config) * pixels_in[0] * c0              # Dense
        + pixels_in[0] * config.g_first_kernel**2 * c0 * c1       # 7x7 -> 7x7
        + pixels_in[0] * KERNEL**2 * c1 * c2                      # 7x7 -> 14x14
        + pixels_in[1] * KERNEL**2 * c2 * 1                       # 14x14 -> 28x28
    )


def discriminator_macs(network: Network) -> int:
    """Multiply-adds of D's convolutions and Dense for one image."""
    d1, d2 = network.d_channels
    pixels_out = (IMAGE_SIZE // 2) ** 2, (IMAGE_SIZE // 4) ** 2
    return (
        pixels_out[0] * KERNEL**2 * 1 * d1             # 28x28 -> 14x14
        + pixels_out[1] * KERNEL**2 * d1 * d2          # 14x14 -> 7x7
        + pixels_out[1] * d2                           # Dense to one logit
    )


def step_flops(config: Config, batch: int) -> int:
    """Analytical FLOPs of one update: 3 * F_G + 3.5 * F_D.

    F_G = 2 * MACs of G on `batch` noise vectors and F_D = 2 * MACs of D on 2 * `batch` images
    (the real and the fake batch). A convolution's MACs are output pixels x k^2 x C_in x C_out;
    a transposed one's are input pixels x k^2 x C_in x C_out; a Dense's are inputs x outputs.
    Backward costs 2x forward for the parts that get gradients (one pass for the input
    gradient, one for the weight gradient):

        forward                                         F_G + F_D
        d_loss backward through D                       2 * F_D
        g_loss backward: D's input gradients, fakes     F_D / 2
                         then all of G                  2 * F_G

    BatchNorm, activations, dropout, label embeddings and projections, the losses and Adam are
    elementwise (or nearly) and left out; taps on
    'SAME' padding are counted. The count is the same for every framework, so GFLOP/s compare
    as the times do.
    """
    f_g = 2 * generator_macs(config) * batch
    f_d = 2 * discriminator_macs(config.network) * 2 * batch
    return 3 * f_g + 7 * f_d // 2


# --- Workers: build a step, time it -------------------------------------------------------------


@dataclass
class Built:
    """A framework's ready update: `step()` runs one, waits for it, and returns its d_loss."""

    step: Callable[[], float]
    version: str
    device: str


def fixed_images(batch: int) -> np.ndarray:
    """The 'real' batch, NHWC float32 in [-1, 1], the same for every framework."""
    rng = np.random.default_rng(0)
    return rng.uniform(-1, 1, (batch, IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32)


def fixed_labels(batch: int, config: Config) -> np.ndarray | None:
    """The real batch's classes (digits or clusters) where the arch is conditioned on them,
    int32, the same for every framework; else None."""
    if not config.label_count:
        return None
    return np.random.default_rng(1).integers(0, config.label_count, batch).astype(np.int32)


def fake_labels_of(batch: int, config: Config) -> np.ndarray | None:
    """The classes G draws: the real batch's, or with mode seeking, its first half's twice
    (the fakes come in pairs of one class)."""
    labels = fixed_labels(batch, config)
    if labels is None or not config.mode_seeking:
        return labels
    return np.tile(labels[:batch // 2], 2)


def build_jax(arch: str, batch: int, gpu: bool) -> Built:
    """Ours: `create_states` and `jit_train_step`, blocking on the new states and metrics."""
    if not gpu:
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import jax.numpy as jnp

    from digitscape_jax.steps import create_states, jit_train_step

    expected = "gpu" if gpu else "cpu"
    if jax.default_backend() != expected:
        raise SystemExit(f"jax runs on {jax.default_backend()}, not {expected}")
    config = Config(arch=arch, batch_size=batch)
    key = jax.random.key(config.seed)
    states = create_states(config, key)
    train_step = jit_train_step(config)
    images = jnp.asarray(fixed_images(batch))
    labels = fixed_labels(batch, config)
    labels = None if labels is None else jnp.asarray(labels)

    def step() -> float:
        nonlocal states
        g_state, d_state, metrics = jax.block_until_ready(train_step(*states, images, key,
                                                                     labels))
        states = g_state, d_state
        return float(metrics["d_loss"])

    device = jax.devices()[0]
    return Built(step, jax.__version__, f"{device.platform}:{device.device_kind}")


def peer_recipe(arch: str) -> Config:
    """The arch's recipe, which the tf and torch workers reproduce: R1, translation and the
    minibatch standard deviation are not written for them, so an arch that uses any is
    refused rather than timed without."""
    config = Config(arch=arch)
    if config.r1_gamma or config.translate or config.minibatch_std:
        raise SystemExit(f"{arch}: the tf and torch peers do not implement R1, translation "
                         "or the minibatch standard deviation")
    return config


def keras_models(config: Config) -> tuple[keras.Model, keras.Model]:
    """G and D as Keras models, layer for layer as in digitscape_jax.models: Sequential, or
    with two inputs (noise or images, and labels) where the arch is conditioned on labels."""
    import keras
    from keras import layers

    def batch_norm_leaky() -> list[keras.Layer]:
        return [layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON),
                layers.LeakyReLU(negative_slope=LEAKY_SLOPE)]

    def conv_transpose(channels: int, strides: int, kernel: int = KERNEL,
                       **kwargs: Any) -> keras.Layer:
        return layers.Conv2DTranspose(channels, kernel, strides=strides, padding="same",
                                      use_bias=False, **kwargs)

    class SpectrallyNormalisedConv2D(layers.Conv2D):
        """Conv2D with its kernel divided by its largest singular value at each call, computed
        as `layers.spectral_normalize` computes it."""

        def convolution_op(self, inputs: Any, kernel: Any) -> Any:
            matrix = keras.ops.reshape(kernel, (-1, kernel.shape[-1]))
            if matrix.shape[0] < matrix.shape[1]:
                matrix = keras.ops.transpose(matrix)
            _, vectors = keras.ops.eigh(keras.ops.matmul(keras.ops.transpose(matrix), matrix))
            top = keras.ops.stop_gradient(vectors[:, -1])
            sigma = keras.ops.norm(keras.ops.matmul(matrix, top))
            return super().convolution_op(inputs, kernel / sigma)

    network = config.network
    c0, (c1, c2) = network.g_dense_channels, network.g_conv_channels
    g_body = keras.Sequential([
        keras.Input((generator_inputs(config),)),
        layers.Dense(SEED_SIZE * SEED_SIZE * c0, use_bias=False), *batch_norm_leaky(),
        layers.Reshape((SEED_SIZE, SEED_SIZE, c0)),
        conv_transpose(c1, 1, kernel=config.g_first_kernel), *batch_norm_leaky(),
        conv_transpose(c2, 2), *batch_norm_leaky(),
        conv_transpose(1, 2, activation="tanh"),
    ])
    d_conv = SpectrallyNormalisedConv2D if config.spectral_norm == "convs" else layers.Conv2D
    d_layers: list[keras.Layer] = []
    for channels in network.d_channels:
        d_layers += [d_conv(channels, KERNEL, strides=2, padding="same"),
                     layers.LeakyReLU(negative_slope=LEAKY_SLOPE)]
        d_layers += [layers.Dropout(config.d_dropout)] if config.d_dropout else []
    d_features = keras.Sequential([keras.Input((IMAGE_SIZE, IMAGE_SIZE, 1)), *d_layers,
                                   layers.Flatten()])
    d_head = layers.Dense(1)
    if not config.label_count:
        return g_body, keras.Sequential([d_features, d_head])
    noise, images = keras.Input((LATENT_DIM,)), keras.Input((IMAGE_SIZE, IMAGE_SIZE, 1))
    g_labels, d_labels = keras.Input((), dtype="int32"), keras.Input((), dtype="int32")
    kept_noise = noise[:, 1:] if config.clusters else noise  # the first entry draws a cluster

    def embedding(features: int) -> keras.Layer:  # initialised as Flax's: N(0, 1 / features)
        return layers.Embedding(config.label_count, features, embeddings_initializer=
                                keras.initializers.RandomNormal(stddev=features**-0.5))

    embedded = embedding(LABEL_EMBEDDING)(g_labels)
    generator = keras.Model([noise, g_labels], g_body(layers.Concatenate()([kept_noise, embedded])))
    features = d_features(images)
    projection = embedding(features.shape[-1])(d_labels)
    logits = d_head(features) + keras.ops.sum(projection * features, axis=-1, keepdims=True)
    return generator, keras.Model([images, d_labels], logits)


def build_tf(arch: str, batch: int) -> Built:
    """Keras models and a `@tf.function` step with one persistent GradientTape, on the CPU."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    keras.utils.set_random_seed(0)
    config = peer_recipe(arch)
    network = config.network
    generator, discriminator = keras_models(config)
    def decayed(lr: float) -> Any:  # --lr-half-life: halving every half-life steps, smoothly
        if not config.lr_half_life:
            return lr
        return keras.optimizers.schedules.ExponentialDecay(lr, config.lr_half_life, 0.5)

    g_opt, d_opt = (keras.optimizers.Adam(decayed(lr), config.beta1, config.beta2,
                                          epsilon=ADAM_EPSILON)
                    for lr in (config.learning_rate, config.learning_rate * config.d_lr_scale))
    g_opt.build(generator.trainable_variables)
    d_opt.build(discriminator.trainable_variables)
    sample_noise = tf.random.uniform if network.noise == "uniform" else tf.random.normal
    images = tf.constant(fixed_images(batch))
    labels, fake_labels = (None if classes is None else tf.constant(classes)
                           for classes in (fixed_labels(batch, config),
                                           fake_labels_of(batch, config)))

    def bce(logits: tf.Tensor, label: float) -> tf.Tensor:
        targets = tf.fill(tf.shape(logits), label)
        return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(targets, logits))

    def conditioned(x: tf.Tensor, labels: tf.Tensor | None) -> Any:
        return x if labels is None else [x, labels]

    @tf.function
    def train_step(real: tf.Tensor) -> tf.Tensor:
        noise = sample_noise((batch, LATENT_DIM))
        with tf.GradientTape(persistent=True) as tape:
            fake = generator(conditioned(noise, fake_labels), training=True)
            real_logits = discriminator(conditioned(real, labels), training=True)[:, 0]
            fake_logits = discriminator(conditioned(fake, fake_labels), training=True)[:, 0]
            if config.loss == "hinge":
                d_loss = (tf.reduce_mean(tf.nn.relu(1.0 - real_logits))
                          + tf.reduce_mean(tf.nn.relu(1.0 + fake_logits))) / 2
                g_loss = -tf.reduce_mean(fake_logits)
            else:
                d_loss = (bce(real_logits, 1.0) + bce(fake_logits, 0.0)) / 2
                g_loss = bce(fake_logits, 1.0)
            if config.mode_seeking:
                half = batch // 2
                spread = (tf.reduce_mean(tf.abs(fake[:half] - fake[half:]))
                          / tf.reduce_mean(tf.abs(noise[:half] - noise[half:])))
                g_loss += config.mode_seeking / (spread + MODE_SEEKING_EPSILON)
        d_grads = tape.gradient(d_loss, discriminator.trainable_variables)
        g_grads = tape.gradient(g_loss, generator.trainable_variables)
        d_opt.apply_gradients(zip(d_grads, discriminator.trainable_variables))
        g_opt.apply_gradients(zip(g_grads, generator.trainable_variables))
        return d_loss

    return Built(lambda: float(train_step(images)), tf.__version__, "cpu")


def torch_models(config: Config) -> tuple[torch.nn.Module, torch.nn.Module]:
    """G and D, NCHW, with Keras's BatchNorm, slopes and glorot_uniform: `nn.Sequential`, or
    taking labels too where the arch is conditioned on them."""
    import torch
    from torch import nn
    from torch.nn.utils import parametrize

    class SpectrallyNormalised(nn.Module):
        """A convolution's weight divided by its largest singular value, computed as
        `layers.spectral_normalize` computes it."""

        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            matrix = weight.flatten(1)
            if matrix.shape[0] < matrix.shape[1]:
                matrix = matrix.T
            with torch.no_grad():
                top = torch.linalg.eigh(matrix.T @ matrix).eigenvectors[:, -1]
            return weight / torch.linalg.vector_norm(matrix @ top)

    def batch_norm_leaky(channels: int, norm: type[nn.Module] = nn.BatchNorm2d) -> list[nn.Module]:
        # torch's momentum weighs the new batch: 1 - Keras's.
        return [norm(channels, eps=BN_EPSILON, momentum=1 - BN_MOMENTUM), nn.LeakyReLU(LEAKY_SLOPE)]

    def conv_transpose(c_in: int, c_out: int, stride: int, kernel: int = KERNEL) -> nn.Module:
        # padding kernel // 2 and output_padding stride - 1 give 'SAME's output size (an odd
        # kernel), input x stride.
        return nn.ConvTranspose2d(c_in, c_out, kernel, stride, padding=kernel // 2,
                                  output_padding=stride - 1, bias=False)

    network = config.network
    c0, (c1, c2) = network.g_dense_channels, network.g_conv_channels
    generator = nn.Sequential(
        nn.Linear(generator_inputs(config), SEED_SIZE * SEED_SIZE * c0, bias=False),
        *batch_norm_leaky(SEED_SIZE * SEED_SIZE * c0, nn.BatchNorm1d),
        nn.Unflatten(1, (c0, SEED_SIZE, SEED_SIZE)),
        conv_transpose(c0, c1, 1, kernel=config.g_first_kernel), *batch_norm_leaky(c1),
        conv_transpose(c1, c2, 2), *batch_norm_leaky(c2),
        conv_transpose(c2, 1, 2), nn.Tanh(),
    )
    d1, d2 = network.d_channels
    dropped = [nn.Dropout(config.d_dropout)] if config.d_dropout else []
    d_features = nn.Sequential(
        nn.Conv2d(1, d1, KERNEL, 2, padding=KERNEL // 2), nn.LeakyReLU(LEAKY_SLOPE), *dropped,
        nn.Conv2d(d1, d2, KERNEL, 2, padding=KERNEL // 2), nn.LeakyReLU(LEAKY_SLOPE), *dropped,
        nn.Flatten(),
    )
    d_head = nn.Linear((IMAGE_SIZE // 4) ** 2 * d2, 1)
    for module in [*generator, *d_features, d_head]:
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    if config.spectral_norm == "convs":
        for module in d_features:
            if isinstance(module, nn.Conv2d):
                parametrize.register_parametrization(module, "weight", SpectrallyNormalised())
    if not config.label_count:
        return generator, nn.Sequential(*d_features, d_head)

    def embedding(features: int) -> nn.Embedding:
        """An embedding of the labels, initialised as Flax's: N(0, 1 / features)."""
        table = nn.Embedding(config.label_count, features)
        nn.init.normal_(table.weight, std=features**-0.5)
        return table

    class ConditionedGenerator(nn.Module):
        """The label's embedding joins the noise (less its first entry, which draws a cluster
        where G draws one)."""

        def __init__(self) -> None:
            super().__init__()
            self.embedding = embedding(LABEL_EMBEDDING)
            self.body = generator

        def forward(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            kept = noise[:, 1:] if config.clusters else noise
            return self.body(torch.cat([kept, self.embedding(labels)], dim=1))

    class ProjectionDiscriminator(nn.Module):
        """The logit adds the features' inner product with an embedding of the label."""

        def __init__(self) -> None:
            super().__init__()
            self.features, self.head = d_features, d_head
            self.projection = embedding(d_head.in_features)

        def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            features = self.features(images)
            return self.head(features) + (self.projection(labels) * features).sum(
                dim=1, keepdim=True)

    return ConditionedGenerator(), ProjectionDiscriminator()


def build_torch(arch: str, batch: int, gpu: bool, threads: int, compile_models: bool) -> Built:
    """Eager PyTorch: one forward pass, both gradients by `torch.autograd.grad`, two Adams."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if gpu and not torch.cuda.is_available():
        raise SystemExit("torch sees no CUDA device")
    device = torch.device("cuda" if gpu else "cpu")
    config = peer_recipe(arch)
    network = config.network
    generator, discriminator = (model.to(device) for model in torch_models(config))
    g_params, d_params = list(generator.parameters()), list(discriminator.parameters())
    g_opt, d_opt = (torch.optim.Adam(params, lr, (config.beta1, config.beta2), eps=ADAM_EPSILON)
                    for params, lr in ((g_params, config.learning_rate),
                                       (d_params, config.learning_rate * config.d_lr_scale)))
    half_life = config.lr_half_life or float("inf")  # --lr-half-life: halving, smoothly
    schedules = [torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** (step / half_life))
                 for opt in (d_opt, g_opt)]
    if compile_models:
        # The d_loss gradient retains the graph: compiled backwards must not donate buffers.
        torch._functorch.config.donated_buffer = False
        generator, discriminator = torch.compile(generator), torch.compile(discriminator)
    sample_noise = torch.rand if network.noise == "uniform" else torch.randn
    images = torch.from_numpy(fixed_images(batch)).permute(0, 3, 1, 2).contiguous().to(device)
    labelled, fake_labelled = (
        () if classes is None else (torch.from_numpy(classes).long().to(device),)
        for classes in (fixed_labels(batch, config), fake_labels_of(batch, config)))

    def bce(logits: torch.Tensor, label: float) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))

    def step() -> float:
        noise = sample_noise(batch, LATENT_DIM, device=device)
        fake = generator(noise, *fake_labelled)
        real_logits = discriminator(images, *labelled)[:, 0]
        fake_logits = discriminator(fake, *fake_labelled)[:, 0]
        if config.loss == "hinge":
            d_loss = (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()) / 2
            g_loss = -fake_logits.mean()
        else:
            d_loss = (bce(real_logits, 1.0) + bce(fake_logits, 0.0)) / 2
            g_loss = bce(fake_logits, 1.0)
        if config.mode_seeking:
            half = batch // 2
            spread = ((fake[:half] - fake[half:]).abs().mean()
                      / (noise[:half] - noise[half:]).abs().mean())
            g_loss = g_loss + config.mode_seeking / (spread + MODE_SEEKING_EPSILON)
        d_grads = torch.autograd.grad(d_loss, d_params, retain_graph=True)
        g_grads = torch.autograd.grad(g_loss, g_params)
        for params, grads, opt, schedule in ((d_params, d_grads, d_opt, schedules[0]),
                                             (g_params, g_grads, g_opt, schedules[1])):
            for param, grad in zip(params, grads):
                param.grad = grad
            opt.step()
            schedule.step()
        return d_loss.item()  # Waits for the whole step, on the GPU too.

    name = torch.cuda.get_device_name(device) if gpu else "cpu"
    return Built(step, torch.__version__, name)


def build(args: argparse.Namespace) -> Built:
    gpu = args.device == "gpu"
    if args.worker == "jax":
        return build_jax(args.arch, args.batch, gpu)
    if args.worker == "tf":
        return build_tf(args.arch, args.batch)
    return build_torch(args.arch, args.batch, gpu, args.torch_threads, args.torch_compile)


def timed(step: Callable[[], float]) -> tuple[float, float]:
    """Runs `step` once: (seconds, d_loss)."""
    start = time.perf_counter()
    d_loss = step()
    return time.perf_counter() - start, d_loss


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Builds one framework's step, warms it up and times `args.steps` steps one by one."""
    built = build(args)
    first_step_s, first_d_loss = timed(built.step)
    for _ in range(args.warmup - 1):
        built.step()
    step_s = [timed(built.step)[0] for _ in range(args.steps)]
    return {
        "framework": args.worker,
        "version": built.version,
        "device": built.device,
        "first_step_s": first_step_s,
        "first_d_loss": first_d_loss,
        "step_s": step_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# --- The parent: run the workers, summarise ---------------------------------------------------


def spawn_worker(framework: str, arch: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """Runs one worker in a fresh interpreter and returns its JSON line."""
    command = [sys.executable, __file__, "--worker", framework, "--arch", arch,
               "--batch", str(batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--device", args.device, "--torch-threads", str(args.torch_threads),
               *(["--torch-compile"] if args.torch_compile else [])]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise SystemExit(f"{framework} worker failed ({arch}, batch {batch}, "
                         f"exit {proc.returncode}):\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(arch: str, batch: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One framework's rounds at one (arch, batch), reduced to the table's numbers."""
    steps = [s for run in runs for s in run["step_s"]]
    median = statistics.median(steps)
    q1, _, q3 = statistics.quantiles(steps, n=4) if len(steps) > 1 else (median,) * 3
    return {
        "arch": arch,
        "batch": batch,
        "framework": runs[0]["framework"],
        "version": runs[0]["version"],
        "device": runs[0]["device"],
        "median_step_s": median,
        "iqr_pct": 100 * (q3 - q1) / median,
        "images_per_s": batch / median,
        "gflops_per_s": step_flops(Config(arch=arch), batch) / median / 1e9,
        "first_step_s": statistics.median(run["first_step_s"] for run in runs),
        "first_d_loss": runs[0]["first_d_loss"],
        "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
        "round_medians_s": [statistics.median(run["step_s"]) for run in runs],
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Sets each row's `vs_ours`: its median s/step over jax's at the same (arch, batch)."""
    ours = {(r["arch"], r["batch"]): r["median_step_s"] for r in rows if r["framework"] == "jax"}
    for row in rows:
        reference = ours.get((row["arch"], row["batch"]))
        row["vs_ours"] = row["median_step_s"] / reference if reference else None


def benchmark(args: argparse.Namespace, frameworks: Sequence[str]) -> list[dict[str, Any]]:
    """Every (arch, batch), each framework once per round, interleaved."""
    rows = []
    for arch in args.archs:
        for batch in args.batches:
            runs: dict[str, list[dict[str, Any]]] = {fw: [] for fw in frameworks}
            for round_ in range(1, args.rounds + 1):
                for fw in frameworks:
                    run = spawn_worker(fw, arch, batch, args)
                    runs[fw].append(run)
                    print(f"[{arch} b{batch} round {round_}/{args.rounds}] {fw}: "
                          f"{statistics.median(run['step_s']):.4f} s/step", file=sys.stderr)
            rows += [summarize(arch, batch, runs[fw]) for fw in frameworks]
    add_ratios(rows)
    return rows


def machine() -> dict[str, Any]:
    """The code's machine (`provenance.machine`: CPU model, cores, instruction set), with the
    load from other processes and the Python version."""
    return {**provenance.machine(), "load_1min": os.getloadavg()[0],
            "python": platform.python_version()}


def format_table(rows: list[dict[str, Any]], gpu: bool) -> str:
    """The rows as an aligned text table."""
    flops_unit, flops_scale = ("TFLOP/s", 1e-3) if gpu else ("GFLOP/s", 1.0)
    header = ["arch", "batch", "framework", "s/step", "iqr%", "img/s", flops_unit, "first s",
              "d_loss@1", "RSS MB", "vs ours"]
    cells = [header] + [[
        r["arch"], str(r["batch"]), r["framework"], f"{r['median_step_s']:.4f}",
        f"{r['iqr_pct']:.0f}", f"{r['images_per_s']:.0f}",
        f"{r['gflops_per_s'] * flops_scale:.{2 if gpu else 1}f}", f"{r['first_step_s']:.2f}",
        f"{r['first_d_loss']:.3f}", f"{r['peak_rss_mb']:.0f}",
        "-" if r["vs_ours"] is None else f"{r['vs_ours']:.2f}",
    ] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def report(args: argparse.Namespace, rows: list[dict[str, Any]], notes: list[str]) -> str:
    """The machine, the versions, the work per step, the table and the notes."""
    info = machine()
    versions = {r["framework"]: f"{r['version']} ({r['device']})" for r in rows}
    work = ", ".join(f"{a} b{b}: {step_flops(Config(arch=a), b) / 1e9:.2f}"
                     for a in args.archs for b in args.batches)
    cpu = info["cpu"]
    lines = [
        f"machine: {cpu['model']} ({cpu['instruction_set']}), {cpu['cores']} cores, load "
        f"{info['load_1min']:.1f} (1 min); python {info['python']}",
        "versions: " + ", ".join(f"{fw} {v}" for fw, v in versions.items()),
        f"GFLOP per step (bench.step_flops): {work}",
        f"{args.rounds} round(s) x {args.steps} timed step(s) after {args.warmup} warmup "
        f"step(s), device {args.device}; vs ours = framework s/step / jax s/step "
        "(> 1: ours is faster)",
        "",
        format_table(rows, args.device == "gpu"),
    ]
    return "\n".join(lines + [f"note: {n}" for n in notes])


def results(args: argparse.Namespace, rows: list[dict[str, Any]],
            notes: list[str]) -> dict[str, Any]:
    return {
        "machine": machine(),
        "settings": {k: getattr(args, k) for k in
                     ("archs", "batches", "frameworks", "rounds", "steps", "warmup", "device",
                      "torch_threads", "torch_compile")},
        "flops_per_step": {f"{a}/{b}": step_flops(Config(arch=a), b)
                           for a in args.archs for b in args.batches},
        "results": rows,
        "notes": notes,
    }


def command(argv: Sequence[str]) -> str:
    """The command line that repeats this run, less where it writes."""
    words, skip = [], False
    for word in argv:
        if skip or word in ("--json", "--record"):
            skip = word in ("--json", "--record")
            continue
        words.append(word)
    return " ".join(["python bench/bench.py", *words, "--record docs/results/"])


def record(args: argparse.Namespace, document: dict[str, Any], argv: Sequence[str]) -> Path:
    """Writes the run as a result record, `bench-<device>-<instruction set>.json`."""
    isa = document["machine"]["cpu"]["instruction_set"]
    name = f"bench-{args.device}-{isa.lower().replace('-', '')}"
    return records.write(args.record, records.make("bench", name, command(argv), document))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--archs", nargs="+", choices=sorted(ARCHS), default=["fast", "seed", "dcgan"],
                   help="architectures of digitscape_jax.config.ARCHS")
    p.add_argument("--batches", nargs="+", type=cli.positive_int, default=[64, 256],
                   help="batch sizes (images per update)")
    p.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS),
                   help="which implementations to run; the ratio needs jax")
    p.add_argument("--rounds", type=cli.positive_int, default=3,
                   help="runs of each framework per (arch, batch), interleaved")
    p.add_argument("--steps", type=cli.positive_int, default=10, help="timed steps per run")
    p.add_argument("--warmup", type=cli.positive_int, default=3,
                   help="untimed steps before them; the first is reported as 'first s'")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="gpu: jax's default backend and torch's cuda; tf is skipped")
    p.add_argument("--torch-threads", type=cli.positive_int, default=os.cpu_count() or 1,
                   help="torch.set_num_threads; jax and tf use every core by default")
    p.add_argument("--torch-compile", action="store_true", help="torch.compile G and D")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="also write the results as JSON to FILE, or to stdout without FILE "
                        "(the table then goes to stderr)")
    p.add_argument("--record", type=Path, default=None, metavar="DIR",
                   help="also write a result record to DIR (docs/results/ holds the one the "
                        "docs show): the results with the code, libraries and machine")
    p.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    p.add_argument("--arch", choices=sorted(ARCHS), default="seed", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=cli.positive_int, default=64, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    notes = []
    frameworks = list(dict.fromkeys(args.frameworks))
    if args.device == "gpu" and "tf" in frameworks:
        frameworks.remove("tf")
        notes.append("tf skipped: this project installs tensorflow-cpu, so the TF peer is CPU-only")
    if not frameworks:
        raise SystemExit("no framework left to run")
    if set(frameworks) - {"jax"}:
        for arch in args.archs:  # before any worker is timed
            peer_recipe(arch)
    rows = benchmark(args, frameworks)
    table = report(args, rows, notes)
    print(table, file=sys.stderr if args.json == "-" else sys.stdout)
    document = results(args, rows, notes)
    if args.json == "-":
        print(json.dumps(document, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    if args.record:
        print(f"record -> {record(args, document, argv if argv is not None else sys.argv[1:])}",
              file=sys.stderr if args.json == "-" else sys.stdout)


if __name__ == "__main__":
    main()
