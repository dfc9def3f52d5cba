"""The fast paths give the plain path's results: several steps per call, the compilation cache."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from conftest import run_script
from digitscape_jax.config import Config
from digitscape_jax.data import stack_batches
from digitscape_jax.steps import create_states, jit_train_step
from digitscape_jax.schedule import call_plan
from test_steps import state_trees


@pytest.mark.slow
def test_several_steps_per_call_equal_single_steps(real_batch):
    config = Config(arch="seed", conditional=True)  # labels travel through the stack too
    steps = 3  # one compiled call of three updates (a longer unrolled call compiles longer)
    images = np.stack([np.roll(np.asarray(real_batch), i, axis=0) for i in range(steps)])
    labels = np.stack([np.arange(64) % 10 + i for i in range(steps)]) % 10
    key = jax.random.key(5)
    single = jit_train_step(config, donate=False)
    g_state, d_state = create_states(config, jax.random.key(0))
    for i in range(steps):
        g_state, d_state, metrics = single(g_state, d_state, images[i], key, labels[i])
    g_many, d_many, metrics_many = jit_train_step(config, donate=False, steps_per_call=steps)(
        *create_states(config, jax.random.key(0)), images, key, labels)
    assert int(g_many.step) == int(d_many.step) == steps
    # One compiled program of several updates may round differently from as many of one
    # (gradients that nearly cancel keep only a few digits), and Adam turns a rounding-sized
    # change in a near-zero gradient into a step of up to lr. So: the losses agree to 1e-5,
    # nearly every value of every state to 1e-3 of its tensor's scale, and every param within
    # 2 * lr * steps. A wrong batch, order or step count misses all three by orders of magnitude.
    for name in metrics:
        np.testing.assert_allclose(metrics_many[name], metrics[name], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state_trees(g_many, d_many)),
                    jax.tree.leaves(state_trees(g_state, d_state)), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.mean(np.abs(a - b) <= 1e-3 * np.abs(b).max()) >= 0.999
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=0, atol=2 * config.learning_rate * steps), g_many.params, g_state.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=0, atol=2 * config.learning_rate * steps), d_many.params, d_state.params)


def test_calls_never_pass_over_a_step_that_logs_samples_or_saves():
    assert list(call_plan(0, 12, 4, (4,))) == [4, 4, 4]
    assert list(call_plan(0, 10, 4, (5,))) == [4, 1, 4, 1]  # steps 4, 5, 9, 10
    assert list(call_plan(3, 8, 4, (100,))) == [4, 1]  # resumed mid-way; the end is a boundary
    plan = list(call_plan(7, 1000, 8, (100, 30, 1000)))
    assert sum(plan) == 993
    boundaries, step = [], 7
    for k in plan:
        inner = range(step + 1, step + k)
        assert not any(s % e == 0 for s in inner for e in (100, 30))
        step += k
        boundaries.append(step)
    assert {100, 200, 30, 60, 990}.issubset(boundaries)


def test_stacked_batches_keep_the_order():
    batches = iter([(np.full((2, 1), i), np.array([i, i])) for i in range(7)])
    groups = list(stack_batches(batches, iter([1, 3, 1, 2])))
    assert [g[0].shape for g in groups] == [(2, 1), (3, 2, 1), (2, 1), (2, 2, 1)]
    np.testing.assert_array_equal(groups[1][1], [[1, 1], [2, 2], [3, 3]])
    np.testing.assert_array_equal(groups[3][0][:, 0, 0], [5, 6])


@pytest.mark.slow
def test_a_run_of_several_steps_per_call_and_its_rerun_from_the_compilation_cache(
        tmp_path, trained_run):
    """--steps-per-call 2 still logs, samples and saves at the steps asked for; a rerun loads
    every compiled program from the cache (adding no entry) and prints the same losses."""
    cache = tmp_path / "cache"
    flags = ["--arch", "seed", "--steps", "10", "--log-every", "5", "--sample-every", "5",
             "--ckpt-every", "5", "--eval-every", "0", "--steps-per-call", "2",
             "--data-dir", trained_run[0] / "tfds", "--compile-cache", cache]
    runs, entries = [], []
    for name in ("first", "rerun"):
        result = run_script("train.py", *flags, "--ckpt-dir", tmp_path / name, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert sorted(p.name for p in (tmp_path / name).iterdir() if p.name.isdigit()) == ["10", "5"]
        assert sorted(p.name for p in (tmp_path / "generated_images").iterdir()) == [
            "generated_images_10.png", "generated_images_5.png"]
        runs.append([[part for part in line.split("  ") if "steps/s" not in part]
                     for line in result.stdout.splitlines() if line.startswith("step ")])
        entries.append(sorted(p.name for p in cache.iterdir()))
    assert [r[0] for r in runs[0]] == ["step 5/10", "step 10/10"]
    assert runs[0] == runs[1]
    assert any(name.startswith("jit_train_steps") for name in entries[0])
    assert entries[1] == entries[0]  # every program was a cache hit
