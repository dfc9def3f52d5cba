"""The networks match the Keras originals: layer shapes, parameter counts, Keras defaults."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from digitscape_jax.config import ARCHS, Config
from digitscape_jax.layers import PER_PHASE_MIN_FEATURES, Conv, ConvTranspose, Dropout
from digitscape_jax.models import Discriminator, Generator, leaky_relu, networks, sample_noise

# Keras model.summary() of the original ("seed") and of the TF tutorial ("dcgan"), and the
# tutorial's network at half its widths ("small"), counted the same way by hand:
# (layer, output shape without the batch axis), in order, and the total parameter counts
# (Keras counts BatchNorm's moving mean and variance too).
KERAS_G = {
    "seed": ([("Dense_0", (392,)), ("BatchNorm_0", (392,)), ("ConvTranspose_0", (7, 7, 8)),
              ("BatchNorm_1", (7, 7, 8)), ("ConvTranspose_1", (14, 14, 16)),
              ("BatchNorm_2", (14, 14, 16)), ("ConvTranspose_2", (28, 28, 1))], 46_064),
    "dcgan": ([("Dense_0", (12544,)), ("BatchNorm_0", (12544,)),
               ("ConvTranspose_0", (7, 7, 128)), ("BatchNorm_1", (7, 7, 128)),
               ("ConvTranspose_1", (14, 14, 64)), ("BatchNorm_2", (14, 14, 64)),
               ("ConvTranspose_2", (28, 28, 1))], 2_330_944),
    # 100*6272 + 4*6272 + 25*128*64 + 4*64 + 25*64*32 + 4*32 + 25*32
    "small": ([("Dense_0", (6272,)), ("BatchNorm_0", (6272,)),
               ("ConvTranspose_0", (7, 7, 64)), ("BatchNorm_1", (7, 7, 64)),
               ("ConvTranspose_1", (14, 14, 32)), ("BatchNorm_2", (14, 14, 32)),
               ("ConvTranspose_2", (28, 28, 1))], 909_472),
}
KERAS_D = {
    "seed": ([("Conv_0", (14, 14, 16)), ("Dropout_0", (14, 14, 16)), ("Conv_1", (7, 7, 32)),
              ("Dropout_1", (7, 7, 32)), ("Dense_0", (1,))], 14_817),
    "dcgan": ([("Conv_0", (14, 14, 64)), ("Dropout_0", (14, 14, 64)), ("Conv_1", (7, 7, 128)),
               ("Dropout_1", (7, 7, 128)), ("Dense_0", (1,))], 212_865),
    # (25*32 + 32) + (25*32*64 + 64) + (7*7*64 + 1)
    "small": ([("Conv_0", (14, 14, 32)), ("Dropout_0", (14, 14, 32)), ("Conv_1", (7, 7, 64)),
               ("Dropout_1", (7, 7, 64)), ("Dense_0", (1,))], 55_233),
}


def count(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


def layer_shapes(module: nn.Module, x: jax.Array, **kwargs) -> tuple[list, dict, jax.Array]:
    variables = module.init(jax.random.key(0), x, train=False)
    out, state = module.apply(variables, x, train=True, capture_intermediates=True,
                              mutable=["intermediates", "batch_stats"], **kwargs)
    inter = state["intermediates"]
    shapes = [(name, inter[name]["__call__"][0].shape[1:]) for name in inter if name != "__call__"]
    return shapes, variables, out


@pytest.mark.parametrize("arch", sorted(KERAS_G))  # fast: small's with a 3x3 first kernel, below
def test_generator_matches_keras(arch):
    expected_layers, expected_params = KERAS_G[arch]
    shapes, variables, out = layer_shapes(Generator(ARCHS[arch].network), jnp.zeros((3, 100)))
    assert shapes == expected_layers
    assert out.shape == (3, 28, 28, 1)
    assert count(variables) == expected_params
    assert set(variables) == {"params", "batch_stats"}


@pytest.mark.parametrize("arch", sorted(KERAS_D))
def test_discriminator_matches_keras(arch):
    expected_layers, expected_params = KERAS_D[arch]
    shapes, variables, out = layer_shapes(Discriminator(ARCHS[arch].network),
                                          jnp.zeros((3, 28, 28, 1)),
                                          rngs={"dropout": jax.random.key(1)})
    assert shapes == expected_layers
    assert out.shape == (3, 1)
    assert count(variables) == expected_params


def test_the_default_g_maps_its_7x7_features_with_a_3x3_kernel_and_an_old_checkpoint_5x5():
    """`fast` draws its first transposed convolution with a 3x3 kernel; a checkpoint config
    from before `g_first_kernel` existed rebuilds the 5x5 layer it was trained with."""
    saved = Config().to_json()
    del saved["g_first_kernel"]
    kernels, counts = [], []
    for config in (Config(), Config.from_json(saved)):
        generator = networks(config)[0]
        z = jnp.zeros((2, config.latent_dim))
        variables = generator.init(jax.random.key(0), z, train=False)
        assert generator.apply(variables, z, train=False).shape == (2, 28, 28, 1)
        kernels.append(variables["params"]["ConvTranspose_0"]["kernel"].shape)
        counts.append(count(variables["params"]))
    assert kernels == [(3, 3, 128, 64), (5, 5, 128, 64)]
    assert counts[1] - counts[0] == (25 - 9) * 128 * 64


def test_generator_has_no_biases_and_discriminator_zero_biases():
    g = Generator(ARCHS["seed"].network).init(jax.random.key(0), jnp.zeros((1, 100)), train=False)
    d = Discriminator(ARCHS["seed"].network).init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)),
                                                  train=False)
    g_names = {path[-1].key for path, _ in jax.tree_util.tree_leaves_with_path(g["params"])}
    assert g_names == {"kernel", "scale", "bias"}  # "bias" only from BatchNorm
    assert all("BatchNorm" in path[0].key
               for path, _ in jax.tree_util.tree_leaves_with_path(g["params"])
               if path[-1].key == "bias")
    for layer in d["params"].values():
        np.testing.assert_array_equal(layer["bias"], 0.0)


def test_kernels_are_glorot_uniform():
    variables = Generator(ARCHS["dcgan"].network).init(jax.random.key(0), jnp.zeros((1, 100)),
                                                       train=False)
    kernel = np.asarray(variables["params"]["ConvTranspose_0"]["kernel"])  # (5, 5, 256, 128)
    bound = np.sqrt(6.0 / (25 * 256 + 25 * 128))
    assert np.abs(kernel).max() <= bound
    assert np.abs(kernel).max() > 0.99 * bound  # uniform on the whole interval
    assert abs(kernel.std() - bound / np.sqrt(3)) < 0.01 * bound


def test_batchnorm_uses_keras_momentum_and_epsilon():
    module = Generator(ARCHS["seed"].network)
    z = jax.random.uniform(jax.random.key(1), (16, 100))
    variables = module.init(jax.random.key(0), z, train=False)
    _, state = module.apply(variables, z, train=True, mutable=["batch_stats", "intermediates"],
                            capture_intermediates=True)
    dense_out = state["intermediates"]["Dense_0"]["__call__"][0]
    # Running mean after one step, momentum 0.99: 0.99 * 0 + 0.01 * batch mean.
    np.testing.assert_allclose(state["batch_stats"]["BatchNorm_0"]["mean"],
                               0.01 * dense_out.mean(0), rtol=1e-5, atol=1e-8)
    bn_out = state["intermediates"]["BatchNorm_0"]["__call__"][0]
    expected = (dense_out - dense_out.mean(0)) / jnp.sqrt(dense_out.var(0) + 1e-3)
    np.testing.assert_allclose(bn_out, expected, rtol=1e-4, atol=1e-4)


def test_leaky_relu_slope_is_keras_default():
    np.testing.assert_allclose(leaky_relu(jnp.array([-2.0, 0.0, 3.0])), [-0.6, 0.0, 3.0])


def test_noise_priors():
    uniform = sample_noise(jax.random.key(0), "uniform", (4000, 100))
    normal = sample_noise(jax.random.key(0), "normal", (4000, 100))
    assert 0.0 <= float(uniform.min()) and float(uniform.max()) < 1.0
    assert abs(float(uniform.mean()) - 0.5) < 0.01
    assert float(normal.min()) < -3.0 and abs(float(normal.std()) - 1.0) < 0.01


# Below PER_PHASE_MIN_FEATURES output channels, one stacked convolution; from it up, one per phase.
@pytest.mark.parametrize("features", [5, PER_PHASE_MIN_FEATURES])
@pytest.mark.parametrize("kernel_size,stride", [(5, 1), (3, 1), (5, 2), (3, 2), (4, 2), (5, 3)])
def test_conv_transpose_is_flax_and_lax_conv_transpose(kernel_size, stride, features):
    x = jax.random.normal(jax.random.key(0), (2, 7, 7, 6))
    ours = ConvTranspose(features, kernel_size=kernel_size, strides=stride)
    variables = ours.init(jax.random.key(1), x)
    kernel = variables["params"]["kernel"]
    flax_ref = nn.ConvTranspose(features, (kernel_size, kernel_size), strides=(stride, stride),
                                padding="SAME", use_bias=False)

    def ours_fn(k, x):
        return ours.apply({"params": {"kernel": k}}, x)

    def flax_fn(k, x):
        return flax_ref.apply({"params": {"kernel": k}}, x)

    def lax_fn(k, x):
        return jax.lax.conv_transpose(x, k, (stride, stride), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))

    @jax.jit  # One program: compiled faster than its operations one by one.
    def outputs_and_gradients(kernel, x, cotangent):
        grads = [jax.grad(lambda k, x, f=f: (f(k, x) * cotangent).sum(), argnums=(0, 1))(
            kernel, x) for f in (ours_fn, lax_fn)]
        return [f(kernel, x) for f in (ours_fn, flax_fn, lax_fn)], grads

    cotangent = jax.random.normal(jax.random.key(2), (2, 7 * stride, 7 * stride, features))
    (ours_out, flax_out, expected), grads = outputs_and_gradients(kernel, x, cotangent)
    assert ours_out.shape == expected.shape == (2, 7 * stride, 7 * stride, features)
    np.testing.assert_allclose(ours_out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(flax_out, expected, rtol=1e-5, atol=1e-5)
    # Same gradients with respect to the kernel and the input.
    for ours_grad, ref_grad in zip(*grads):
        np.testing.assert_allclose(ours_grad, ref_grad, rtol=1e-4, atol=1e-4)


# Channels below and from PER_PHASE_MIN_FEATURES up take both forms of the custom input
# gradient; a size that the stride does not divide, and a kernel narrower than the stride, take
# XLA's own.
@pytest.mark.parametrize("channels", [3, PER_PHASE_MIN_FEATURES])
@pytest.mark.parametrize("kernel_size,stride,size", [(5, 2, 28), (5, 2, 14), (3, 2, 12),
                                                     (4, 2, 12), (5, 3, 12), (5, 1, 7),
                                                     (5, 2, 7), (1, 2, 8)])
def test_conv_is_flax_conv_with_the_same_gradients(kernel_size, stride, size, channels):
    x = jax.random.normal(jax.random.key(0), (2, size, size, channels))
    ours = Conv(16, kernel_size=kernel_size, strides=stride)
    variables = ours.init(jax.random.key(1), x)
    variables = jax.tree.map(lambda p: p + 0.1, variables)  # a nonzero bias too
    flax_ref = nn.Conv(16, (kernel_size, kernel_size), strides=stride, padding="SAME")
    out_size = -(-size // stride)

    @jax.jit  # One program: compiled faster than its operations one by one.
    def outputs_and_gradients(variables, x, cotangent):
        grads = [jax.grad(lambda v, x, m=m: (m.apply(v, x) * cotangent).sum(), argnums=(0, 1))(
            variables, x) for m in (ours, flax_ref)]
        return [m.apply(variables, x) for m in (ours, flax_ref)], grads

    cotangent = jax.random.normal(jax.random.key(2), (2, out_size, out_size, 16))
    (ours_out, expected), grads = outputs_and_gradients(variables, x, cotangent)
    assert ours_out.shape == expected.shape == (2, out_size, out_size, 16)
    np.testing.assert_allclose(ours_out, expected, rtol=1e-5, atol=1e-5)
    # The custom input gradient (a transposed convolution) and XLA's kernel gradient.
    for ours_grad, ref_grad in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(ours_grad, ref_grad, rtol=1e-4, atol=1e-4)


def test_conv_computes_its_gradients_in_bfloat16():
    x = jax.random.normal(jax.random.key(0), (4, 14, 14, 64))
    ours = Conv(128, strides=2, dtype=jnp.bfloat16)
    variables = ours.init(jax.random.key(1), x)
    flax_ref = nn.Conv(128, (5, 5), strides=2, padding="SAME")
    cotangent = jax.random.normal(jax.random.key(2), (4, 7, 7, 128))

    def grads(module, x):
        return jax.grad(lambda v, x: (module.apply(v, x).astype(jnp.float32) * cotangent).sum(),
                        argnums=(0, 1))(variables, x)

    ours_grads, ref_grads = grads(ours, x.astype(jnp.bfloat16)), grads(flax_ref, x)
    assert ours_grads[1].dtype == jnp.bfloat16  # the input gradient, in the compute dtype
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(ours_grads[0]))  # params: f32
    for ours_grad, ref_grad in zip(jax.tree.leaves(ours_grads), jax.tree.leaves(ref_grads)):
        ours_grad, ref_grad = np.asarray(ours_grad, np.float32), np.asarray(ref_grad)
        # bf16 keeps 8 bits of mantissa: sums of hundreds of terms agree to about 2%.
        assert np.abs(ours_grad - ref_grad).max() <= 0.03 * np.abs(ref_grad).max()


def test_conv_transpose_refuses_a_kernel_narrower_than_its_stride():
    with pytest.raises(ValueError, match="a 1x1 kernel leaves gaps at stride 2"):
        ConvTranspose(4, kernel_size=1, strides=2).init(jax.random.key(0), jnp.ones((1, 7, 7, 3)))


def test_dropout_keeps_its_rate_and_scales_the_kept_units():
    x = jnp.ones((64, 14, 14, 64))
    dropout = Dropout(0.3)
    out = dropout.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    kept = np.asarray(out) != 0
    assert abs(kept.mean() - 0.7) < 0.002  # 802,816 units: the standard error is 0.0005
    np.testing.assert_allclose(np.asarray(out)[kept], 1 / 0.7, rtol=1e-6)
    # Units are dropped independently of their position: each channel and row keeps ~70%.
    assert np.all(np.abs(kept.mean(axis=(0, 1, 2)) - 0.7) < 0.02)
    assert np.all(np.abs(kept.mean(axis=(0, 2, 3)) - 0.7) < 0.02)
    other = dropout.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert not np.array_equal(np.asarray(other) != 0, kept)
    np.testing.assert_array_equal(dropout.apply({}, x, deterministic=True), x)
    dropped = Dropout(1.0).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    np.testing.assert_array_equal(dropped, np.zeros_like(x))
