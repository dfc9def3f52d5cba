"""Scale: one run over 8 devices, or over 2 processes, matches the run on 1 device."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import REPO, built_once, run_script
from digitscape_jax import cli
from digitscape_jax.checkpointing import Checkpointer
from digitscape_jax.config import Config
from digitscape_jax.steps import abstract_states
from test_cli import flag_error

import sample
import train

STEPS = 10
LEARNING_RATE = 1e-4
FLAGS = ["--arch", "seed", "--steps", STEPS, "--log-every", 1, "--ckpt-every", 5,
         "--sample-every", 5, "--eval-every", 0, "--lr", LEARNING_RATE]
# Adam moves each parameter by about the learning rate per step, whatever the size of its
# gradient, so rounding can flip the direction of a near-zero gradient's step: after n steps,
# runs that differ only in rounding can differ by up to 2 * lr * n in a parameter.
PARAM_ATOL = 2 * LEARNING_RATE * STEPS


def host_devices(n: int) -> dict[str, str]:
    return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}


def final_params(ckpt: Path):
    g_state, d_state = Checkpointer(ckpt, read_only=True).restore(
        STEPS, abstract_states(Config(arch="seed")))
    return {"g": g_state.params, "batch_stats": g_state.batch_stats, "d": d_state.params}


def losses(ckpt: Path) -> list[dict]:
    return [json.loads(line) for line in (ckpt / "metrics.jsonl").open()]


def assert_same_run(ckpt: Path, reference: Path) -> None:
    """Losses agree to 1e-4 relative at every step, and the params to PARAM_ATOL."""
    for ours, theirs in zip(losses(ckpt), losses(reference), strict=True):
        for key in ("d_loss", "g_loss", "d_real", "d_fake"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4), (ours["step"], key)
    ours, theirs = final_params(ckpt), final_params(reference)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=PARAM_ATOL)


@pytest.fixture(scope="session")
def one_device_run(tmp_path_factory, trained_run) -> tuple[Path, Path]:
    """The reference: FLAGS on one device, run once for all workers (`built_once`). Returns
    (its ckpt dir, the prepared tfds dir)."""
    data_dir = trained_run[0] / "tfds"

    def build(workdir: Path) -> None:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):  # in this process, which has one device
            assert cli.run(train.main, [*map(str, FLAGS), "--data-dir", str(data_dir),
                                        "--ckpt-dir", str(workdir / "ckpt"), "--samples-dir",
                                        str(workdir / "samples")]) == 0
        assert "devices: 1 x cpu" in out.getvalue() and "compute dtype float32" in out.getvalue()

    return built_once(tmp_path_factory, "one_device_run", build) / "ckpt", data_dir


@pytest.mark.slow
def test_eight_devices_match_one(tmp_path, one_device_run):
    """With the batches gathered on the 8 devices from their copy of the split, too: the
    reference streams them from the host."""
    reference, data_dir = one_device_run
    result = run_script("train.py", *FLAGS, "--data-dir", data_dir, "--data-on-device",
                        cwd=tmp_path, env=host_devices(8))
    assert result.returncode == 0, result.stderr
    assert "devices: 8 x cpu (cpu), 8 local; process 0 of 1" in result.stdout
    assert "mesh: {'data': 8}; batch 64 = 8 per device" in result.stdout
    assert_same_run(tmp_path / "ckpt", reference)


def test_a_batch_the_devices_do_not_divide_is_refused(tmp_path, trained_run):
    uneven = run_script("train.py", "--arch", "seed", "--batch-size", "60",
                        "--data-dir", trained_run[0] / "tfds", cwd=tmp_path, env=host_devices(8))
    assert uneven.returncode == 1
    assert uneven.stderr.strip() == "error: --batch-size 60 is not divisible by the 8 devices"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_one_model(tmp_path, one_device_run):
    """Two train.py processes on localhost, joined by jax.distributed over gloo.

    Each reads its half of every batch; process 0 writes the files. Their
    replicas are compared at every checkpoint (the run fails if they differ),
    the result matches the 1-device run, and a 1-process sample.py reads it.
    """
    reference, data_dir = one_device_run
    cluster = ["--coordinator", f"localhost:{free_port()}", "--num-processes", "2"]
    env = {**os.environ, **host_devices(1)}
    processes = [
        subprocess.Popen([sys.executable, str(REPO / "train.py"), *map(str, FLAGS), *cluster,
                          "--process-id", str(i), "--data-dir", str(data_dir)],
                         cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in processes]
    for p, (out, err) in zip(processes, outputs):
        assert p.returncode == 0, err
    primary, secondary = (out for out, _ in outputs)
    assert "devices: 2 x cpu (cpu), 1 local; process 0 of 2" in primary
    assert "mesh: {'data': 2}; batch 64 = 32 per device" in primary
    assert f"done: {STEPS} steps" in primary
    assert "step" not in secondary and "done" not in secondary  # Only process 0 reports.
    assert_same_run(tmp_path / "ckpt", reference)

    assert cli.run(sample.main, ["--ckpt", str(tmp_path / "ckpt"), "--out",
                                 str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").is_file()


@pytest.mark.parametrize("flags,message", [
    (["--coordinator", "localhost:1234"], "--coordinator, --num-processes and --process-id go"),
    (["--num-processes", "2", "--process-id", "0"], "--coordinator, --num-processes and"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
     "--process-id 2 must be below --num-processes 2"),
    (["--process-id", "-1"], "--process-id: must be >= 0"),
    (["--dtype", "float16"], "--dtype: invalid choice: 'float16'"),
])
def test_cluster_and_dtype_flags_are_checked(capsys, flags, message):
    assert message in flag_error(capsys, train.main, flags)
