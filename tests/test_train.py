"""The training loop in-process, on tfds's mock MNIST: outputs, resume, metrics, stops."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import shutil
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from digitscape_jax import clusters, data, trainer
from digitscape_jax.checkpointing import Checkpointer
from digitscape_jax.clusters import cluster_bounds
from digitscape_jax.config import Config
from digitscape_jax.outputs import FINAL_GRID, PROGRESS_GIF, RunPaths
from digitscape_jax.plots import metric_panels
from digitscape_jax.steps import abstract_states, train_step
from conftest import gif_frames


@pytest.fixture
def mock_mnist(monkeypatch):
    """tfds's random stand-in for MNIST (as the flax examples' train_test.py use it); its
    prepare step is a no-op, so the network check before a download is passed too."""
    monkeypatch.setattr(data, "_reachable", lambda *args: True)
    data._load_split.cache_clear()  # what load_split keeps must not outlive the mock
    with tfds.testing.mock_data(num_examples=256):
        yield
    data._load_split.cache_clear()


def run_paths(tmp_path) -> RunPaths:
    return RunPaths(tmp_path / "ckpt", tmp_path / "samples", data_dir=str(tmp_path / "tfds"))


def records(paths: RunPaths) -> list[dict]:
    return [json.loads(line) for line in (paths.ckpt_dir / "metrics.jsonl").open()]


def test_train_writes_every_output_and_resumes_in_process(mock_mnist, tmp_path):
    paths = run_paths(tmp_path)
    config = Config(arch="seed", batch_size=16, steps=12, log_every=4, sample_every=5,
                    ckpt_every=6, eval_every=0)
    out = io.StringIO()
    assert trainer.train(config, paths, stream=out) == 12
    text = out.getvalue()
    assert "step 8/12" in text and "d_loss" in text and "D(G(z))" in text
    assert "done: 12 steps (1..12)" in text
    assert Checkpointer(paths.ckpt_dir).all_steps() == [6, 12]
    assert [r["step"] for r in records(paths)] == [4, 8, 12]
    # Rows at each --sample-every step, and the last step always writes its row.
    assert sorted(p.name for p in paths.samples_dir.iterdir()) == [
        "generated_images_10.png", "generated_images_12.png", "generated_images_5.png"]
    assert len(gif_frames(paths.ckpt_dir / PROGRESS_GIF)) == 3
    assert (paths.ckpt_dir / FINAL_GRID).is_file()

    out = io.StringIO()
    assert trainer.train(dataclasses.replace(config, steps=16), paths, stream=out) == 16
    assert "resuming" in out.getvalue() and "from step 12" in out.getvalue()
    assert [r["step"] for r in records(paths)] == [4, 8, 12, 16]
    # The wall clock of each record counts on from the run it resumed.
    walls = [r["wall_s"] for r in records(paths)]
    assert 0 < walls[0] and walls == sorted(walls) and walls[3] > walls[2]
    # Each (re)start's first log holds its first call's time, and runs.jsonl its provenance.
    assert [r["step"] for r in records(paths) if "first_call_s" in r] == [4, 16]
    starts = [json.loads(line) for line in (paths.ckpt_dir / "runs.jsonl").open()]
    assert [s["start_step"] for s in starts] == [0, 12]
    assert all(s["versions"]["jax"] and "commit" in s for s in starts)


def test_a_clustered_run_keeps_its_cluster_prior_and_resumes_bitwise(mock_mnist, tmp_path):
    """--clusters: G's checkpointed prior is the clusters' frequencies in the split, and a run
    stopped and resumed (which clusters the split again) ends where an unstopped one does."""
    config = Config(arch="seed", clusters=4, cluster_features="normalised", batch_size=16,
                    steps=6, log_every=3, ckpt_every=3, sample_every=6, eval_every=0)
    whole, halves = run_paths(tmp_path / "whole"), run_paths(tmp_path / "halves")
    trainer.train(config, whole, stream=io.StringIO())
    # A run stopped at step 3 has the unstopped run's checkpoint of step 3 (bit-exact resume
    # of the other archs is tested end to end in test_reliability.py).
    (halves.ckpt_dir / "3").parent.mkdir(parents=True)
    shutil.copytree(whole.ckpt_dir / "3", halves.ckpt_dir / "3")
    trainer.train(config, halves, stream=io.StringIO())
    abstract = abstract_states(config)
    (g_whole, d_whole), (g_halves, d_halves) = (
        Checkpointer(paths.ckpt_dir).restore(6, abstract) for paths in (whole, halves))
    jax.tree.map(np.testing.assert_array_equal, (g_whole, d_whole), (g_halves, d_halves))
    images, _ = data.load_split("train", whole.data_dir)
    _, frequencies = clusters.kmeans(images, 4, config.cluster_features)
    np.testing.assert_allclose(g_whole.constants["cluster_bounds"],
                               cluster_bounds(frequencies, "uniform"))


def patch_step(monkeypatch, dispatched: list | None = None, busy_matmuls: int = 0,
               **extra_metrics: float) -> None:
    """Wraps the loop's jitted step: it returns `extra_metrics` beside its own, spends
    `busy_matmuls` more matrix products on the device (a slow step, with no host callback,
    which would make the dispatch synchronous), and appends each call's metrics to
    `dispatched` as it is dispatched."""

    def step_fn(g_state, d_state, images, key, labels=None, *, config):
        g_state, d_state, metrics = train_step(g_state, d_state, images, key, labels,
                                               config=config)
        extra = {k: jnp.float32(v) for k, v in extra_metrics.items()}
        if busy_matmuls:
            work = jax.lax.fori_loop(0, busy_matmuls, lambda i, y: jnp.tanh(y @ y),
                                     jnp.full((384, 384), metrics["d_loss"] / 384))
            extra["busy"] = work.mean()
        return g_state, d_state, {**metrics, **extra}

    def jit_step(config, steps_per_call=1):
        jitted = jax.jit(functools.partial(step_fn, config=config))

        def dispatch(*args):
            out = jitted(*args)
            if dispatched is not None:
                dispatched.append(out[2]["d_loss"])
            return out

        return dispatch

    monkeypatch.setattr(trainer, "jit_train_step", jit_step)


def test_a_new_metric_of_the_step_reaches_the_screen_the_log_and_the_plot(
        mock_mnist, tmp_path, monkeypatch):
    patch_step(monkeypatch, grad_norm=1.25)
    paths = run_paths(tmp_path)
    out = io.StringIO()
    config = Config(arch="seed", batch_size=16, steps=4, log_every=2, eval_every=0)
    assert trainer.train(config, paths, stream=out) == 4
    assert "step 2/4" in out.getvalue() and "grad_norm 1.25" in out.getvalue()
    assert [r["grad_norm"] for r in records(paths)] == [1.25, 1.25]
    assert ("grad_norm", ("grad_norm",)) in metric_panels(records(paths))


def test_a_stop_acts_within_two_steps_of_the_last_finished_one(mock_mnist, tmp_path,
                                                               monkeypatch):
    """SIGTERM to a run whose every step is slow, and which never waits for a log: it stops
    within 2 steps of the last step that had finished when the signal came (counted by the
    steps' results that were ready), says so at once, and saves a checkpoint there."""
    dispatched: list[jax.Array] = []
    finished_at_signal: list[int] = []

    def send_sigterm_after_five_steps() -> None:
        while sum(m.is_ready() for m in list(dispatched)) < 5:
            threading.Event().wait(0.005)
        os.kill(os.getpid(), signal.SIGTERM)
        finished_at_signal.append(sum(m.is_ready() for m in list(dispatched)))

    patch_step(monkeypatch, dispatched, busy_matmuls=60)
    paths = run_paths(tmp_path)
    config = Config(arch="seed", batch_size=16, steps=200, log_every=1000, ckpt_every=1000,
                    sample_every=1000, eval_every=0)
    out = io.StringIO()
    threading.Thread(target=send_sigterm_after_five_steps, daemon=True).start()
    stopped = trainer.train(config, paths, stream=out)
    assert 5 <= stopped <= finished_at_signal[0] + 2, (stopped, finished_at_signal, len(dispatched))
    text = out.getvalue()
    assert f"SIGTERM: stopping at step {stopped}" in text, text
    assert f"SIGTERM: stopped at step {stopped}" in text
    assert Checkpointer(paths.ckpt_dir).latest_step() == stopped
