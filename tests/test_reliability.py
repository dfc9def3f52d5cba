"""Nothing is lost: kills, signals, corrupt checkpoints, divergence, mismatches, two writers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp
import pytest

from conftest import REPO, TRAIN_FLAGS, gif_frames
from digitscape_jax import cli
from digitscape_jax.checkpointing import LOCK_FILE, Checkpointer, RunLock
from digitscape_jax.config import Config
from digitscape_jax.errors import UserError
from digitscape_jax.steps import abstract_states
from test_steps import assert_trees_equal, state_trees, to_numpy

import sample
import train

TMP_MARK = "orbax-checkpoint-tmp"


@pytest.fixture
def start_train():
    """Starts train.py in the background; whatever a failing test leaves running is killed."""
    processes: list[subprocess.Popen] = []

    def start(*args, cwd: Path) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        processes.append(subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), *map(str, args)], cwd=cwd, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        return processes[-1]

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_for_line(process: subprocess.Popen, text: str) -> str:
    """Reads stdout until a line contains `text`; fails if the process ends first."""
    for line in process.stdout:
        if text in line:
            return line
    raise AssertionError(f"process ended before printing {text!r}: {process.stderr.read()}")


def final_states(ckpt_dir: Path, config: Config, step: int):
    return to_numpy(state_trees(*Checkpointer(ckpt_dir, read_only=True)
                                .restore(step, abstract_states(config))))


def losses(ckpt_dir: Path) -> list[tuple]:
    records = [json.loads(line) for line in (ckpt_dir / "metrics.jsonl").open()]
    return [(r["step"], r["d_loss"], r["g_loss"], r["d_real"], r["d_fake"]) for r in records]


def run_dirs(workdir: Path) -> list[str]:
    """The flags that put an in-process run's outputs where train.py run in `workdir` would."""
    return ["--ckpt-dir", str(workdir / "ckpt"), "--samples-dir", str(workdir / "generated_images")]


@pytest.mark.slow
def test_sigkill_anywhere_then_rerun_ends_bitwise_where_an_uninterrupted_run_does(
        start_train, trained_run, tmp_path, capsys):
    data_dir = trained_run[0] / "tfds"
    flags = ["--arch", "seed", "--eval-every", "0", "--batch-size", "32", "--steps", "24",
             "--ckpt-every", "1", "--log-every", "1", "--sample-every", "1000", "--data-dir", data_dir]
    # The uninterrupted run, and the last rerun below, need no process of their own.
    assert cli.run(train.main, [*map(str, flags), *run_dirs(tmp_path / "reference")]) == 0

    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    ckpt = interrupted / "ckpt"

    # 1. Killed in the middle of the step loop, just after step 5 was logged.
    process = start_train(*flags, cwd=interrupted)
    wait_for_line(process, "step 5/24")
    process.kill()
    assert process.wait() == -signal.SIGKILL

    # 2. Killed while a checkpoint is being written: the moment orbax's temporary
    #    directory appears, past step 12. (A save can complete between the sighting and
    #    the kill; then the next run, which resumes from it, is killed the same way.)
    for _ in range(3):
        process = start_train(*flags, cwd=interrupted)
        wait_for_line(process, "step 12/24")
        partial = []
        while process.poll() is None and not partial:
            partial = [p.name for p in os.scandir(ckpt) if TMP_MARK in p.name]
        process.kill()
        process.wait()
        if partial and (ckpt / partial[0]).exists():
            break
    assert partial and (ckpt / partial[0]).exists(), "no save could be interrupted"
    interrupted_save = int(partial[0].split(".")[0])

    # 3. Rerun to the end: it skips the partial save and resumes from the last complete one.
    capsys.readouterr()
    assert cli.run(train.main, [*map(str, flags), *run_dirs(interrupted)]) == 0
    assert f"from step {interrupted_save - 1}\n" in capsys.readouterr().out  # the last complete save
    assert not any(TMP_MARK in p.name for p in os.scandir(ckpt))

    config = Config(arch="seed", batch_size=32, steps=24)
    assert_trees_equal(final_states(ckpt, config, 24),
                       final_states(tmp_path / "reference" / "ckpt", config, 24))
    assert losses(ckpt) == losses(tmp_path / "reference" / "ckpt")


@pytest.mark.slow
def test_sigterm_and_sigint_stop_after_a_checkpoint_and_a_second_writer_is_refused(
        start_train, trained_run, tmp_path, capsys):
    flags = ["--arch", "seed", "--eval-every", "0", "--steps", "1000000", "--log-every", "1000000",
             "--data-dir", trained_run[0] / "tfds"]
    process = start_train(*flags, cwd=tmp_path)
    wait_for_line(process, "first call")

    # A second writer (here in this process) is refused while the first holds the lock.
    assert cli.run(train.main, [*map(str, flags), *run_dirs(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path / 'ckpt'} is in use by another train.py (pid {process.pid}); wait for "
        "it to finish, stop it, or use another --ckpt-dir")

    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    stopped_at = int(out.split("SIGTERM: stopped at step ")[1].split()[0])
    assert "rerun the same command to resume" in out
    assert Checkpointer(tmp_path / "ckpt").latest_step() == stopped_at
    assert (tmp_path / "ckpt" / LOCK_FILE).read_text() == ""  # released

    process = start_train(*flags, cwd=tmp_path)
    assert f"from step {stopped_at}" in wait_for_line(process, "resuming")
    wait_for_line(process, "first call")
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert int(out.split("SIGINT: stopped at step ")[1].split()[0]) > stopped_at


@pytest.mark.parametrize("left_behind", ["dead", "own", "empty"])
def test_a_lock_file_left_by_a_killed_run_does_not_block(trained_run, tmp_path, capsys,
                                                        left_behind):
    """The lock is the kernel's flock, not the file: whatever pid a killed run left is ignored."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_run[0] / "ckpt", ckpt)
    dead = subprocess.Popen(["true"])
    dead.wait()
    pid = {"dead": str(dead.pid), "own": str(os.getpid()), "empty": ""}[left_behind]
    (ckpt / LOCK_FILE).write_text(pid)
    assert cli.run(train.main, [*TRAIN_FLAGS, "--ckpt-dir", str(ckpt)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (ckpt / LOCK_FILE).read_text() == ""


def test_the_lock_is_exclusive_and_names_its_holder(tmp_path):
    with RunLock(tmp_path / "ckpt"):
        assert (tmp_path / "ckpt" / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        with pytest.raises(UserError, match=f"in use by another train.py \\(pid {os.getpid()}\\)"):
            RunLock(tmp_path / "ckpt").__enter__()
    with RunLock(tmp_path / "ckpt"):  # released on exit
        pass
    assert not (tmp_path / "ckpt").exists()  # created for a run that wrote nothing: removed


def damage(step_dir: Path, how: str) -> None:
    if how == "truncate":  # every data file of G's state cut to half
        for path in (step_dir / "g_state").rglob("*"):
            if path.is_file() and path.parent.name == "d":
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "delete":
        shutil.rmtree(step_dir / "d_state")
        shutil.rmtree(step_dir / "g_state" / "d")
    elif how == "config":
        (step_dir / "config" / "metadata").write_text('{"arch": "se')


@pytest.mark.parametrize("how", ["truncate", "delete", "config"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_newest_good_one(
        trained_run, tmp_path, capsys, how):
    workdir = tmp_path
    shutil.copytree(trained_run[0] / "ckpt", workdir / "ckpt")
    damage(workdir / "ckpt" / "30", how)

    assert cli.run(sample.main, ["--ckpt", str(workdir / "ckpt"), "--out",
                                 str(workdir / "s.png")]) == 0
    captured = capsys.readouterr()
    assert "warning: checkpoint" in captured.err and "/30 is unreadable" in captured.err
    assert "(step 20," in captured.out

    data_dir = str(trained_run[0] / "tfds")
    assert cli.run(train.main, [*TRAIN_FLAGS[:2], "--eval-every", "0", "--steps", "40", "--log-every", "10",
                                "--ckpt-dir", str(workdir / "ckpt"), "--data-dir", data_dir,
                                "--samples-dir", str(workdir / "gen")]) == 0
    captured = capsys.readouterr()
    assert "/30 is unreadable" in captured.err and "set the unreadable checkpoint aside" in captured.err
    assert "resuming" in captured.out and "from step 20" in captured.out
    assert (workdir / "ckpt" / "30.corrupt").is_dir()  # kept for inspection, not deleted
    assert Checkpointer(workdir / "ckpt").all_steps() == [10, 20, 40]


@pytest.mark.parametrize("failure", [MemoryError(), ValueError("UNAVAILABLE: read timed out")])
def test_a_machine_failure_while_reading_never_sets_a_checkpoint_aside(
        trained_run, tmp_path, capsys, monkeypatch, failure):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_run[0] / "ckpt", ckpt)
    restore = ocp.CheckpointManager.restore

    def failing_restore(manager, step, *args, **kwargs):
        if step == 30:
            raise failure
        return restore(manager, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", failing_restore)
    assert cli.run(train.main, [*TRAIN_FLAGS[:2], "--steps", "40", "--ckpt-dir", str(ckpt)]) == 1
    err = capsys.readouterr().err
    assert "warning" not in err and err.count("\n") == 1
    assert err.startswith(f"error: could not read checkpoint {ckpt / '30'} (")
    assert Checkpointer(ckpt).all_steps() == [10, 20, 30]
    assert sorted(p.name for p in ckpt.iterdir() if p.name[0].isdigit()) == ["10", "20", "30"]


def test_a_sample_row_cut_short_by_a_crash_does_not_stop_the_resumed_run(trained_run, tmp_path):
    workdir = tmp_path
    shutil.copytree(trained_run[0] / "ckpt", workdir / "ckpt")
    shutil.copytree(trained_run[0] / "generated_images", workdir / "gen")
    cut = workdir / "gen" / "generated_images_20.png"
    cut.write_bytes(cut.read_bytes()[:40])
    assert cli.run(train.main, [*TRAIN_FLAGS, "--steps", "40", "--ckpt-dir", str(workdir / "ckpt"),
                                "--data-dir", str(trained_run[0] / "tfds"),
                                "--samples-dir", str(workdir / "gen")]) == 0
    assert len(gif_frames(workdir / "ckpt" / "progress.gif")) == 3  # rows 10, 30, 40
    assert not list(workdir.rglob("*.partial"))


def test_a_run_with_nothing_to_do_moves_no_checkpoint(trained_run, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_run[0] / "ckpt", ckpt)
    damage(ckpt / "30", "delete")
    assert cli.run(train.main, [*TRAIN_FLAGS, "--steps", "20", "--ckpt-dir", str(ckpt)]) == 0
    captured = capsys.readouterr()
    assert "/30 is unreadable" in captured.err and "set" not in captured.err
    assert "is already at step 20 >= --steps 20: nothing to do" in captured.out
    assert sorted(p.name for p in ckpt.iterdir() if p.name[0].isdigit()) == ["10", "20", "30"]


def test_all_checkpoints_corrupt_is_an_error_not_a_fresh_start(trained_run, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_run[0] / "ckpt", ckpt)
    for step in (10, 20, 30):
        damage(ckpt / str(step), "delete")
    for main, flags in ((sample.main, ["--ckpt", str(ckpt), "--out", str(tmp_path / "s.png")]),
                        (train.main, [*TRAIN_FLAGS[:2], "--ckpt-dir", str(ckpt)])):
        assert cli.run(main, flags) == 1
        err = capsys.readouterr().err
        assert err.count("warning:") == 3
        assert err.strip().splitlines()[-1] == (
            f"error: no readable checkpoint in {ckpt} (steps [10, 20, 30] are all corrupt)")
    assert Checkpointer(ckpt).all_steps() == [10, 20, 30]


@pytest.mark.slow
def test_divergence_stops_training_and_keeps_the_last_good_checkpoint(trained_run, tmp_path,
                                                                       capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_run[0] / "ckpt", ckpt)
    before = sorted(p.name for p in ckpt.iterdir())
    code = cli.run(train.main, ["--arch", "seed", "--steps", "60", "--lr", "1e30",
                                "--log-every", "10", "--ckpt-every", "10",
                                "--ckpt-dir", str(ckpt), "--samples-dir", str(tmp_path / "gen"),
                                "--data-dir", str(trained_run[0] / "tfds")])
    assert code == 1
    warning, message = capsys.readouterr().err.strip().splitlines()
    assert warning.startswith("warning: resuming step 30 with changed settings "
                              "(learning_rate 0.0001 -> 1e+30)")
    assert message.startswith("error: training diverged: a loss or parameter became NaN or "
                              "infinite between steps 30 and 40")
    assert f"the last good checkpoint is kept (step 30 in {ckpt})" in message
    assert sorted(p.name for p in ckpt.iterdir()) == before
    g_state, d_state = Checkpointer(ckpt).restore(30, abstract_states(Config(arch="seed")))
    assert all(bool(jax.numpy.isfinite(x).all()) for x in jax.tree.leaves(g_state.params))


def test_resume_with_another_latent_size_names_both(trained_run, capsys):
    assert cli.run(train.main, [*TRAIN_FLAGS, "--latent-dim", "64",
                                "--ckpt-dir", str(trained_run[0] / "ckpt")]) == 1
    assert ("checkpoint was trained with latent_dim=100 but this run asks for latent_dim=64"
            in capsys.readouterr().err)


@pytest.mark.parametrize("edit,message", [
    ({"colour": "blue"}, "config has unknown field(s): colour"),
    ({"batch_size": "64"}, "config field 'batch_size' must be int, got \"64\""),
    ({"arch": "resnet"}, "unknown arch 'resnet'"),
])
def test_an_invalid_config_in_a_checkpoint_is_a_clear_error(trained_run, tmp_path, capsys,
                                                            edit, message):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_run[0] / "ckpt", ckpt)
    config_file = ckpt / "30" / "config" / "metadata"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **edit}))
    assert cli.run(sample.main, ["--ckpt", str(ckpt), "--out", str(tmp_path / "s.png")]) == 1
    assert message in capsys.readouterr().err
