"""What people look at: training visuals, progress, sample modes and the exported generator."""

from __future__ import annotations

import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import gif_frames
from digitscape_jax import cli
from digitscape_jax.config import Config
from digitscape_jax.errors import UserError
from digitscape_jax.export import load_msgpack
from digitscape_jax.models import networks, sample_noise
from digitscape_jax.progress import Progress
from digitscape_jax.sampling import latent_walks, load_generator, slerp
from test_cli import grid_size

import sample


def test_training_writes_a_progress_gif_and_loss_curves(trained_run):
    workdir, result = trained_run
    ckpt = workdir / "ckpt"
    frames = gif_frames(ckpt / "progress.gif")
    assert len(frames) == 3  # one per --sample-every 10, over 30 steps
    for frame, step in zip(frames, (10, 20, 30)):
        row = np.asarray(Image.open(workdir / "generated_images" / f"generated_images_{step}.png"))
        np.testing.assert_array_equal(frame, row)
    losses = Image.open(ckpt / "losses.png")
    assert losses.size == (2000, 350)  # four panels: losses, D's outputs, FD and IS
    assert np.asarray(losses.convert("L")).std() > 10  # curves, not a blank canvas


def test_tensorboard_events_hold_the_scalars_and_the_sample_rows(trained_run):
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained_run[0] / "ckpt" / "tensorboard"),
                              size_guidance={"tensors": 0}).Reload()
    tags = set(events.Tags()["tensors"])
    assert {"d_loss", "g_loss", "d_real", "d_fake", "steps_per_s", "samples"} <= tags
    assert [e.step for e in events.Tensors("d_loss")] == [10, 20, 30]
    records = [json.loads(line) for line in (trained_run[0] / "ckpt" / "metrics.jsonl").open()]
    logged = [float(tf.make_ndarray(e.tensor_proto)) for e in events.Tensors("d_loss")]
    np.testing.assert_allclose(logged, [r["d_loss"] for r in records], rtol=1e-6)
    assert [e.step for e in events.Tensors("samples")] == [10, 20, 30]
    assert [e.step for e in events.Tensors("fd")] == [e.step for e in events.Tensors("is")] == [20, 30]


def test_the_run_ends_with_a_summary_of_where_everything_went(trained_run):
    out = trained_run[1].stdout
    assert "done: 30 steps (1..30)" in out and "steps/s on average" in out
    assert "final: d_loss" in out
    for name in ("metrics.jsonl", "losses.png", "progress.gif", "real_images.png",
                 "generated_images.png", "generated_images_<step>.png", "tensorboard",
                 "python sample.py --ckpt ckpt"):
        assert name in out


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere(terminal):
    stream = FakeTerminal() if terminal else io.StringIO()
    progress = Progress(start=10, total=40, stream=stream)
    for _ in range(5):
        progress.advance()
    progress.report(15, 12.5, {"d_loss": 0.5, "g_loss": 1.0, "d_real": 0.7, "d_fake": 0.3})
    progress.write("hello")
    progress.close()
    out = stream.getvalue()
    assert "hello" in out
    if terminal:
        assert "15/40" in out and "\r" in out and "step/s" in out
    else:
        assert out.splitlines() == [
            "step 15/40  12.50 steps/s  d_loss 0.5000  g_loss 1.0000  D(x) 0.700  D(G(z)) 0.300",
            "hello"]


def draw(tmp_path, ckpt, *flags) -> tuple[str, np.ndarray]:
    out, npz = tmp_path / "s.png", tmp_path / "s.npz"
    assert cli.run(sample.main, ["--ckpt", str(ckpt), "--out", str(out), "--npz", str(npz),
                                 *map(str, flags)]) == 0
    with np.load(npz) as f:
        return str(out), f["images"]


def test_grid_and_individual_digits(trained_run, tmp_path):
    out, images = draw(tmp_path, trained_run[0] / "ckpt", "--grid", "3x5", "--save-individual",
                       tmp_path / "single")
    assert images.shape == (15, 28, 28)
    assert Image.open(out).size == grid_size(3, 5)
    singles = sorted((tmp_path / "single").iterdir())
    assert [p.name for p in singles] == [f"digit_{i:05d}.png" for i in range(15)]
    for path, image in zip(singles, images):
        np.testing.assert_array_equal(np.asarray(Image.open(path)), image)


def test_interpolation_strip_and_gif_are_reproducible(trained_run, tmp_path):
    ckpt = trained_run[0] / "ckpt"
    out, images = draw(tmp_path, ckpt, "--interpolate", "--grid", "3x12", "--seed", "5")
    assert images.shape == (36, 28, 28)
    assert Image.open(out).size == grid_size(3, 12)
    frames = gif_frames(tmp_path / "s.gif")
    assert len(frames) == 12 and frames[0].shape == (28, 3 * 28 + 2 * 2)
    strip = np.asarray(Image.open(out))
    np.testing.assert_array_equal(frames[4][:, :28], strip[:28, 4 * 30: 4 * 30 + 28])
    _, again = draw(tmp_path, ckpt, "--interpolate", "--grid", "3x12", "--seed", "5")
    np.testing.assert_array_equal(images, again)
    _, other = draw(tmp_path, ckpt, "--interpolate", "--grid", "3x12", "--seed", "6")
    assert not np.array_equal(images, other)
    # Neighbouring frames of a walk are closer than digits from unrelated noise.
    walk = images.reshape(3, 12, -1).astype(float)
    step_change = np.abs(np.diff(walk, axis=1)).mean()
    assert step_change < np.abs(walk[0] - walk[1]).mean()


def test_slerp_ends_at_its_points_and_keeps_the_norm():
    a, b = jax.random.normal(jax.random.key(0), (2, 100))
    b = b * jnp.linalg.norm(a) / jnp.linalg.norm(b)
    np.testing.assert_allclose(slerp(a, b, 0.0), a, atol=1e-5)
    np.testing.assert_allclose(slerp(a, b, 1.0), b, atol=1e-5)
    for t in (0.25, 0.5, 0.9):
        np.testing.assert_allclose(jnp.linalg.norm(slerp(a, b, t)), jnp.linalg.norm(a), rtol=1e-5)
    np.testing.assert_allclose(slerp(a, a, 0.3), a, atol=1e-5)  # parallel: no division by zero


@pytest.mark.parametrize("arch", ["seed", "dcgan", "fast"])
def test_latent_walks_loop_through_their_points(arch):
    config = Config(arch=arch)
    walks = latent_walks(jax.random.key(3), config, walks=2, frames=8)  # 2 frames per segment
    points = sample_noise(jax.random.key(3), config.network.noise, (2, 4, 100))
    if config.clusters:  # each walk keeps its first point's first entry: one cluster
        np.testing.assert_array_equal(walks[..., 0], np.repeat(points[:, :1, 0], 8, axis=1))
        walks, points = walks[..., 1:], points[..., 1:]
    np.testing.assert_allclose(walks[:, ::2], points, atol=1e-5)
    if arch == "seed":  # lerp keeps uniform noise inside [0, 1)
        assert float(walks.min()) >= 0 and float(walks.max()) < 1


def test_msgpack_export_samples_exactly_like_the_checkpoint(trained_run, tmp_path):
    ckpt = trained_run[0] / "ckpt"
    assert cli.run(sample.main, ["--ckpt", str(ckpt), "--export", str(tmp_path / "g.msgpack")]) == 0
    config, variables, step = load_msgpack(tmp_path / "g.msgpack")
    assert config.arch == "seed" and step == 30
    assert set(variables) == {"params", "batch_stats"}
    _, from_ckpt = draw(tmp_path, ckpt, "--n", "20", "--seed", "2")
    _, from_file = draw(tmp_path, tmp_path / "g.msgpack", "--n", "20", "--seed", "2")
    np.testing.assert_array_equal(from_ckpt, from_file)


def test_a_damaged_or_foreign_export_is_refused(trained_run, tmp_path):
    ckpt = trained_run[0] / "ckpt"
    path = tmp_path / "g.msgpack"
    assert cli.run(sample.main, ["--ckpt", str(ckpt), "--export", str(path)]) == 0
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match="is not a generator export"):
        load_msgpack(path)
    (tmp_path / "x.msgpack").write_bytes(b"\x81\xa1a\x01")  # msgpack of {"a": 1}
    with pytest.raises(UserError, match="is not a generator export"):
        load_msgpack(tmp_path / "x.msgpack")
    with pytest.raises(UserError, match="--step picks a checkpoint"):
        load_generator(tmp_path / "x.msgpack", step=3)


def test_savedmodel_matches_the_jax_generator(trained_run, tmp_path):
    import tensorflow as tf

    ckpt = trained_run[0] / "ckpt"
    (tmp_path / "sm").mkdir()
    (tmp_path / "sm" / "stale.txt").write_text("an earlier export, replaced whole")
    assert cli.run(sample.main, ["--ckpt", str(ckpt), "--export-savedmodel",
                                 str(tmp_path / "sm")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sm"]  # no partial or old copy left
    assert not (tmp_path / "sm" / "stale.txt").exists()
    config, variables, _ = load_generator(ckpt)
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    for n in (1, 7):  # any batch size
        noise = np.asarray(sample_noise(jax.random.key(n), config.network.noise, (n, 100)))
        expected = networks(config)[0].apply(variables, noise, train=False)
        got = loaded.signatures["serving_default"](noise=tf.constant(noise))
        (got,) = got.values()
        assert got.shape == (n, 28, 28, 1)
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


def test_a_savedmodel_that_cannot_be_written_is_a_one_line_error_that_keeps_the_old_one(
        trained_run, tmp_path, capsys, monkeypatch):
    import tensorflow as tf

    def refuse(*args, **kwargs):
        raise tf.errors.PermissionDeniedError(None, None, "write denied")

    monkeypatch.setattr(tf.saved_model, "save", refuse)
    (tmp_path / "sm").mkdir()
    (tmp_path / "sm" / "saved_model.pb").write_bytes(b"the earlier export")
    assert cli.run(sample.main, ["--ckpt", str(trained_run[0] / "ckpt"), "--export-savedmodel",
                                 str(tmp_path / "sm")]) == 1
    assert capsys.readouterr().err == (
        f"error: cannot write the SavedModel to {tmp_path / 'sm'}: write denied\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sm"]
    assert (tmp_path / "sm" / "saved_model.pb").read_bytes() == b"the earlier export"
