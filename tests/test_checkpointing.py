"""Checkpoints round-trip exactly, and the config inside them is validated."""

from __future__ import annotations

import json

import jax
import pytest

from digitscape_jax.checkpointing import Checkpointer
from digitscape_jax.config import Config
from digitscape_jax.errors import UserError
from digitscape_jax.steps import abstract_states, create_states, jit_train_step
from test_steps import assert_trees_equal, state_trees, to_numpy


def test_restore_then_step_is_bit_identical_to_stepping_on(tmp_path):
    config = Config(arch="seed", batch_size=16)
    step = jit_train_step(config, donate=False)
    batches = jax.random.uniform(jax.random.key(5), (4, 16, 28, 28, 1), minval=-1, maxval=1)
    key = jax.random.key(config.seed)
    g_state, d_state = create_states(config, jax.random.key(0))
    for batch in batches[:3]:
        g_state, d_state, _ = step(g_state, d_state, batch, key)
    Checkpointer(tmp_path).save(3, g_state, d_state, config)

    reader = Checkpointer(tmp_path, read_only=True)
    assert reader.latest_step() == 3 and reader.load_config(3) == config
    g_restored, d_restored = reader.restore(3, abstract_states(config))
    assert_trees_equal(to_numpy(state_trees(g_restored, d_restored)),
                       to_numpy(state_trees(g_state, d_state)))

    live = step(g_state, d_state, batches[3], key)
    resumed = step(g_restored, d_restored, batches[3], key)
    assert_trees_equal(to_numpy((state_trees(*live[:2]), live[2])),
                       to_numpy((state_trees(*resumed[:2]), resumed[2])))


def test_only_the_last_three_are_kept(tmp_path):
    config = Config(arch="seed", batch_size=16)
    g_state, d_state = create_states(config, jax.random.key(0))
    ckpt = Checkpointer(tmp_path)
    for s in (1, 2, 3, 4):
        ckpt.save(s, g_state, d_state, config)
    assert ckpt.all_steps() == [2, 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "3", "4"]


def test_a_config_takes_its_archs_batch_size_and_adam_unless_given():
    seed, default = Config(arch="seed"), Config()
    assert (seed.batch_size, seed.learning_rate, seed.beta1) == (64, 1e-4, 0.9)  # the original's
    assert (default.arch, default.batch_size, default.learning_rate, default.beta1,
            default.d_dropout, default.clusters, default.lr_half_life, default.mode_seeking) == (
        "fast", 64, 5e-4, 0.5, 0.0, 300, 6000, 0.2)
    assert (seed.mode_seeking, Config(arch="dcgan").mode_seeking) == (0.0, 0.0)
    assert (default.spectral_norm, seed.spectral_norm, Config(arch="dcgan").spectral_norm,
            Config(arch="small").spectral_norm) == ("convs", "none", "none", "none")
    # fast's weight with labels is its own, and a given weight is kept in either form.
    assert (Config(conditional=True).mode_seeking, Config(arch="seed", conditional=True)
            .mode_seeking, Config(conditional=True, mode_seeking=0.3).mode_seeking) == (
        0.1, 0.0, 0.3)
    assert (Config(arch="dcgan").batch_size, Config(arch="dcgan").learning_rate) == (256, 2e-4)
    given = Config(arch="seed", batch_size=8, learning_rate=3e-4, beta1=0.0)
    assert (given.batch_size, given.learning_rate, given.beta1) == (8, 3e-4, 0.0)
    assert Config.from_json(seed.to_json()) == seed
    with pytest.raises(UserError, match="'beta1' must be float, got null"):
        Config.from_json({**seed.to_json(), "beta1": None})


def test_config_json_round_trip_and_validation():
    config = Config(arch="seed", batch_size=32, learning_rate=2e-4, beta1=0.5)
    assert Config.from_json(config.to_json()) == config
    assert Config.from_json({"learning_rate": 1}).learning_rate == 1.0  # JSON ints are numbers
    with pytest.raises(UserError, match="unknown field.*colour"):
        Config.from_json({**config.to_json(), "colour": "blue"})
    with pytest.raises(UserError, match="'batch_size' must be int"):
        Config.from_json({"batch_size": "64"})
    with pytest.raises(UserError, match="'steps' must be int"):
        Config.from_json({"steps": True})
    with pytest.raises(UserError, match="unknown arch"):
        Config.from_json({"arch": "resnet"})
    with pytest.raises(UserError, match="batch_size must be positive"):
        Config.from_json({"batch_size": 0})
    with pytest.raises(UserError, match="JSON object"):
        Config.from_json([1, 2])


def test_resume_check_names_both_values():
    with pytest.raises(UserError, match="latent_dim=100 but this run asks for latent_dim=64"):
        Config(latent_dim=64).check_resumable_with(Config(latent_dim=100))
    with pytest.raises(UserError, match="conditional=False but this run asks for conditional=True"):
        Config(conditional=True).check_resumable_with(Config())
    Config(steps=5, learning_rate=1e-3).check_resumable_with(Config())  # not a model field


def test_a_fast_checkpoint_from_before_g_first_kernel_restores_as_its_5x5_layer(tmp_path):
    """Its config JSON lacks the field: it reads as the 5x5 layer it holds, restores bit for
    bit, and today's default (3x3) is refused on resume rather than misread."""
    old = Config(batch_size=16, g_first_kernel=5)
    g_state, d_state = create_states(old, jax.random.key(0))
    Checkpointer(tmp_path).save(1, g_state, d_state, old)
    config_file = tmp_path / "1" / "config" / "metadata"  # Orbax's JsonSave item
    saved = json.loads(config_file.read_text())
    del saved["g_first_kernel"]
    config_file.write_text(json.dumps(saved))

    reader = Checkpointer(tmp_path, read_only=True)
    config = reader.load_config(1)
    assert config == old
    g_restored, d_restored = reader.restore(1, abstract_states(config))
    assert g_restored.params["ConvTranspose_0"]["kernel"].shape == (5, 5, 128, 64)
    assert_trees_equal(to_numpy(state_trees(g_restored, d_restored)),
                       to_numpy(state_trees(g_state, d_state)))
    with pytest.raises(UserError, match="g_first_kernel=5 but this run asks for g_first_kernel=3"):
        Config(batch_size=16).check_resumable_with(config)
