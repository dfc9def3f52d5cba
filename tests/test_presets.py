"""The presets `--arch` names: what each resolves to, how --help shows them, and a rerun without
--arch resuming the arch its checkpoint was trained with."""

from __future__ import annotations

import jax
import pytest

import train
from digitscape_jax import cli, config
from digitscape_jax.checkpointing import Checkpointer
from digitscape_jax.config import ARCHS, Config, Network
from digitscape_jax.steps import create_states
from test_cli import one_line_error
from test_losses import BEFORE_THEIR_FIELDS

# Every field of each preset's Config, without and with --conditional, as they were when the
# presets became one declaration each: a preset's run never changes by accident.
FAST = {"steps": 20000, "arch": "fast", "conditional": False, "clusters": 300,
        "cluster_features": "normalised", "batch_size": 64, "learning_rate": 0.0005,
        "lr_half_life": 6000, "beta1": 0.5, "beta2": 0.999, "d_lr_scale": 1.0, "loss": "bce",
        "r1_gamma": 0.0, "r1_every": 4, "d_dropout": 0.0, "translate": 0, "mode_seeking": 0.2,
        "minibatch_std": 0, "spectral_norm": "convs", "g_first_kernel": 3, "ema_decay": 0.999,
        "latent_dim": 100, "seed": 0, "log_every": 100, "sample_every": 1000,
        "ckpt_every": 1000, "eval_every": 2000, "eval_samples": 2000, "dtype": "float32",
        "steps_per_call": 1, "data_on_device": False}
# What the others share, and fast does not.
PLAIN = {"clusters": 0, "cluster_features": "pixels", "lr_half_life": 0, "d_dropout": 0.3,
         "mode_seeking": 0.0, "spectral_norm": "none", "g_first_kernel": 5}
PINNED = {
    ("fast", False): FAST,
    ("fast", True): {**FAST, "conditional": True, "clusters": 0, "mode_seeking": 0.1},
    ("seed", False): {**FAST, **PLAIN, "arch": "seed", "learning_rate": 0.0001, "beta1": 0.9},
    ("dcgan", False): {**FAST, **PLAIN, "arch": "dcgan", "batch_size": 256,
                       "learning_rate": 0.0002},
    ("small", False): {**FAST, **PLAIN, "arch": "small", "learning_rate": 0.0002},
}
for _arch in ("seed", "dcgan", "small"):  # --conditional changes nothing else of theirs
    PINNED[_arch, True] = {**PINNED[_arch, False], "conditional": True}

# The original Keras model's network, the TensorFlow DCGAN tutorial's, and half of it.
NETWORKS = {"seed": Network(8, (8, 16), (16, 32), "uniform"),
            "dcgan": Network(256, (128, 64), (64, 128), "normal"),
            "small": Network(128, (64, 32), (32, 64), "normal"),
            "fast": Network(128, (64, 32), (32, 64), "normal")}


@pytest.mark.parametrize("arch,conditional", sorted(PINNED))
def test_each_preset_resolves_to_its_pinned_config(arch, conditional):
    resolved = Config(arch=arch, conditional=conditional).to_json()
    assert resolved == PINNED[arch, conditional]
    assert [type(v) for v in resolved.values()] == [type(v) for v in PINNED[arch, conditional]
                                                    .values()]
    assert ARCHS[arch].network == NETWORKS[arch]
    assert Config(arch=arch, conditional=conditional).network == NETWORKS[arch]


def test_seed_is_the_base_recipe_and_a_preset_names_only_what_it_changes():
    base = config.base_recipe()
    assert Config(arch="seed").to_json() == {**base, "arch": "seed"}
    for name, preset in ARCHS.items():
        assert set(preset.recipe) | set(preset.labelled) <= set(base), name
        assert all(base[field] != value for field, value in preset.recipe.items()), name
        unlabelled = preset.defaults(False)
        assert all(unlabelled[field] != value for field, value in preset.labelled.items()), name


def test_a_checkpoint_config_without_a_field_reads_as_what_runs_had_before_it():
    assert config.backfills() == BEFORE_THEIR_FIELDS


def test_each_flags_help_lists_the_presets_values_where_they_differ():
    flags = {flag.name: flag for flag in config.flags()}
    assert flags["lr"].default is None
    assert flags["lr"].help.endswith(
        "; default: the arch's (seed 0.0001, dcgan 0.0002, small 0.0002, fast 0.0005)")
    assert flags["mode-seeking"].help.endswith(
        "(seed 0, dcgan 0, small 0, fast 0.2; with --conditional: fast 0.1)")
    assert flags["clusters"].help.endswith(
        "(seed 0, dcgan 0, small 0, fast 300; with --conditional: fast 0)")
    assert (flags["beta2"].default, flags["loss"].default) == (0.999, "bce")  # all the same
    assert "the arch's" not in flags["beta2"].help
    for name, preset in ARCHS.items():
        assert f"'{name}': {preset.about} ({preset.network.describe()}" in flags["arch"].help
    assert "--lr 0.0005" in flags["arch"].help and "--g-first-kernel 3" in flags["arch"].help


def train_flags(idx_dir, tmp_path, steps: int) -> list[str]:
    """A tiny run on random digits, in tmp_path, without --arch."""
    return ["--steps", str(steps), "--batch-size", "8", "--log-every", "1", "--eval-every", "0",
            "--mnist-idx", str(idx_dir), "--data-dir", str(tmp_path / "tfds"),
            "--ckpt-dir", str(tmp_path / "ckpt"), "--samples-dir", str(tmp_path / "samples")]


@pytest.fixture
def seed_run(tmp_path, small_idx, capsys):
    """A checkpoint of `--arch seed` at step 2, on random digits; its flags without --arch."""
    def flags(steps: int) -> list[str]:
        return train_flags(small_idx[0], tmp_path, steps)

    assert cli.run(train.main, ["--arch", "seed", *flags(2)]) == 0
    capsys.readouterr()
    return flags


def test_a_rerun_without_arch_resumes_the_arch_of_its_checkpoint(seed_run, tmp_path, capsys):
    saved = Checkpointer(tmp_path / "ckpt", read_only=True).load_config(2)
    args = train.parse_args(seed_run(3))
    assert args.arch == "seed"
    assert train.config_from_args(args).to_json() == {**saved.to_json(), "steps": 3}
    assert cli.run(train.main, seed_run(3)) == 0
    out, err = capsys.readouterr()
    assert "resuming" in out and "from step 2" in out
    assert "warning" not in err  # every setting as the checkpoint's: nothing changed
    resumed = Checkpointer(tmp_path / "ckpt", read_only=True).load_config(3)
    assert resumed.to_json() == {**saved.to_json(), "steps": 3}


def test_an_explicit_other_arch_is_refused_on_resume(tmp_path, capsys):
    seed = Config(arch="seed", batch_size=8)
    Checkpointer(tmp_path / "ckpt").save(2, *create_states(seed, jax.random.key(0)), seed)
    flags = train_flags(tmp_path / "idx", tmp_path, 3)  # refused before any data is read
    assert cli.run(train.main, ["--arch", "dcgan", *flags]) == 1
    line = one_line_error(capsys)
    assert "arch='seed'" in line and "arch='dcgan'" in line


def test_without_a_checkpoint_the_arch_is_the_default(tmp_path):
    args = train.parse_args(["--ckpt-dir", str(tmp_path / "new")])
    assert train.config_from_args(args).arch == config.DEFAULT_ARCH
    (tmp_path / "empty").mkdir()
    args = train.parse_args(["--ckpt-dir", str(tmp_path / "empty")])
    assert train.config_from_args(args).arch == config.DEFAULT_ARCH
