"""train.py and sample.py end to end on real MNIST, and their answers to bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, TRAIN_FLAGS, run_script
from digitscape_jax import cli, data
from digitscape_jax.plots import GRID_PAD

import sample
import train


def grid_size(rows: int, cols: int) -> tuple[int, int]:
    """(width, height) of a saved grid of 28x28 digits."""
    return cols * (28 + GRID_PAD) - GRID_PAD, rows * (28 + GRID_PAD) - GRID_PAD


@pytest.mark.slow
def test_train_writes_every_output(trained_run):
    workdir, result = trained_run
    ckpt = workdir / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.isdigit()) == ["10", "20", "30"]
    assert Image.open(ckpt / "real_images.png").size == grid_size(1, 10)
    assert Image.open(ckpt / "generated_images.png").size == grid_size(4, 4)
    for step in (10, 20, 30):
        row = Image.open(workdir / "generated_images" / f"generated_images_{step}.png")
        assert row.size == grid_size(1, 10) and row.mode == "L"
    records = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30]
    losses = {"step", "steps_per_s", "wall_s", "d_loss", "g_loss", "d_real", "d_fake"}
    for r in records:  # Sample quality at --eval-every 20, and at the end.
        assert set(r) == (losses | {"fd", "is", "fd_held_out"} if r["step"] in (20, 30)
                          else losses | {"first_call_s"})  # the first record: the first call's
        assert 0 < r["d_real"] < 1 and 0 < r["d_fake"] < 1 and r["d_loss"] > 0
    assert records[0]["first_call_s"] > 0
    (start,) = [json.loads(line) for line in (ckpt / "runs.jsonl").read_text().splitlines()]
    assert start["start_step"] == 0 and start["machine"]["cpu"]["cores"] >= 1
    # 30 steps draw blobs of one kind: far from MNIST (real digits score FD ~1, IS ~9.8).
    assert records[2]["fd"] > 100 and 1 <= records[2]["is"] < 3
    assert "FD " in result.stdout and "IS " in result.stdout
    assert "step 30/30" in result.stdout and "D(G(z))" in result.stdout
    assert "devices: 1 x cpu" in result.stdout and "process 0 of 1" in result.stdout


def test_real_images_are_the_first_ten_training_digits(trained_run):
    workdir, _ = trained_run
    images, _ = data.load_split("train", str(workdir / "tfds"))
    grid = np.asarray(Image.open(workdir / "ckpt" / "real_images.png"))
    for i in range(10):
        tile = grid[:, i * (28 + GRID_PAD): i * (28 + GRID_PAD) + 28]
        np.testing.assert_array_equal(tile, images[i, ..., 0])


def test_sample_rebuilds_the_generator_from_the_checkpoint_alone(trained_run, tmp_path, capsys):
    ckpt = shutil.copytree(trained_run[0] / "ckpt", tmp_path / "ckpt")
    assert cli.run(sample.main, ["--ckpt", str(ckpt), "--n", "50", "--npz", str(tmp_path / "s.npz"),
                                 "--out", str(tmp_path / "samples.png")]) == 0
    assert "step 30" in capsys.readouterr().out
    assert Image.open(tmp_path / "samples.png").size == grid_size(7, 8)
    with np.load(tmp_path / "s.npz") as f:
        images = f["images"]
    assert images.shape == (50, 28, 28) and images.dtype == np.uint8
    assert images.std() > 0  # digits, not a constant


def test_sample_is_reproducible_and_picks_steps(trained_run, tmp_path):
    ckpt = str(trained_run[0] / "ckpt")

    def draw(*flags: str) -> np.ndarray:
        out = tmp_path / "s.npz"
        assert cli.run(sample.main, ["--ckpt", ckpt, "--out", str(tmp_path / "s.png"),
                                     "--npz", str(out), *flags]) == 0
        with np.load(out) as f:
            return f["images"]

    first = draw("--n", "1200", "--seed", "3")  # more than one generation batch
    assert first.shape == (1200, 28, 28)
    np.testing.assert_array_equal(first, draw("--n", "1200", "--seed", "3"))
    assert not np.array_equal(first, draw("--n", "1200", "--seed", "4"))
    assert not np.array_equal(first, draw("--n", "1200", "--seed", "3", "--step", "10"))


def test_rerun_resumes_and_trains_up_to_steps(trained_run, tmp_path, capsys):
    workdir, _ = trained_run
    shutil.copytree(workdir / "ckpt", tmp_path / "ckpt")
    assert cli.run(train.main, [*TRAIN_FLAGS[:2], "--eval-every", "0", "--steps", "40",
                                "--log-every", "10", "--data-dir", str(workdir / "tfds"),
                                "--ckpt-dir", str(tmp_path / "ckpt"),
                                "--samples-dir", str(tmp_path / "generated_images")]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "from step 30" in out
    assert "step 40/40" in out and "step 10/" not in out
    steps = sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit())
    assert steps == [20, 30, 40]  # the last 3 are kept
    records = [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [10, 20, 30, 40]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def flag_error(capsys, main, flags) -> str:
    """The error of a command line with a bad flag: exit 2 and one line, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(flags)
    assert exit_info.value.code == 2
    return one_line_error(capsys)


@pytest.mark.parametrize("flags,message", [
    (["--steps", "0"], "--steps: must be positive"),
    (["--steps", "-5"], "--steps: must be positive"),
    (["--steps", "ten"], "--steps: expected a positive integer"),
    (["--batch-size", "0"], "--batch-size: must be positive"),
    (["--batch-size", "-64"], "--batch-size: must be positive"),
    (["--arch", "resnet"], "--arch: invalid choice: 'resnet'"),
    (["--lr", "nan"], "--lr: must be positive and finite"),
    (["--g-first-kernel", "4"], "--g-first-kernel: must be positive and odd"),
])
def test_train_rejects_bad_flags(capsys, flags, message):
    assert message in flag_error(capsys, train.main, flags)


def test_train_rejects_bad_mnist_idx(capsys, tmp_path, small_idx):
    base = ["--steps", "1", "--data-dir", str(tmp_path / "tfds"), "--ckpt-dir", str(tmp_path / "c")]
    assert cli.run(train.main, base + ["--mnist-idx", str(tmp_path)]) == 1
    assert "missing MNIST file" in one_line_error(capsys)
    idx_dir, _ = small_idx
    (idx_dir / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    assert cli.run(train.main, base + ["--mnist-idx", str(idx_dir)]) == 1
    assert "corrupt MNIST file" in one_line_error(capsys)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_resuming_with_another_arch_is_refused(capsys, trained_run):
    workdir, _ = trained_run
    assert cli.run(train.main, ["--arch", "dcgan", "--ckpt-dir", str(workdir / "ckpt")]) == 1
    assert "arch='seed'" in (line := one_line_error(capsys)) and "arch='dcgan'" in line


def test_steps_already_done_changes_nothing(capsys, trained_run):
    ckpt = trained_run[0] / "ckpt"
    before = sorted(p.name for p in ckpt.iterdir())
    assert cli.run(train.main, ["--arch", "seed", "--steps", "30", "--ckpt-dir", str(ckpt)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert sorted(p.name for p in ckpt.iterdir()) == before


@pytest.mark.parametrize("case", ["missing", "empty", "not_a_checkpoint", "a_file", "bad_step"])
def test_sample_rejects_bad_ckpt(capsys, tmp_path, trained_run, case):
    target = tmp_path / "ckpt"
    flags = []
    if case == "empty":
        target.mkdir()
    elif case == "not_a_checkpoint":
        (target / "pictures").mkdir(parents=True)
        (target / "notes.txt").write_text("not a checkpoint")
    elif case == "a_file":
        target.write_text("not a directory")
    elif case == "bad_step":
        target, flags = trained_run[0] / "ckpt", ["--step", "15"]
    assert cli.run(sample.main, ["--ckpt", str(target), "--out", str(tmp_path / "s.png"),
                                 *flags]) == 1
    reason = {"missing": f"checkpoint directory {target} does not exist",
              "empty": f"{target} holds no checkpoint",
              "not_a_checkpoint": f"{target} holds no checkpoint",
              "a_file": f"{target} is not a generator export: ",  # read as an exported G
              "bad_step": f"{target} has no checkpoint at step 15; it has [10, 20, 30]"}[case]
    assert one_line_error(capsys).startswith(f"error: {reason}")
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("name,content", [("g.msgpack", b"\x81\xa1a\x01"),  # msgpack {"a": 1}
                                          ("notes.txt", b"not a generator"),
                                          ("g.msgpack", b"\xc1 not msgpack")])
def test_sample_says_what_it_reads_for_a_file_that_is_no_generator(capsys, tmp_path, name,
                                                                    content):
    (tmp_path / name).write_bytes(content)
    assert cli.run(sample.main, ["--ckpt", str(tmp_path / name), "--digit", "7"]) == 1
    assert one_line_error(capsys) == (
        f"error: {tmp_path / name} is not a generator export: expected a --ckpt-dir, or a "
        ".msgpack written by `sample.py --export`")


def test_sample_says_the_shipped_onnx_model_is_for_the_browser_demo(capsys):
    onnx = REPO / "demo" / "model" / "generator.onnx"
    assert cli.run(sample.main, ["--ckpt", str(onnx), "--digit", "7"]) == 1
    line = one_line_error(capsys)
    assert line.startswith(f"error: {onnx} is an ONNX model, for the browser demo")
    assert "onnxruntime" in line and ".msgpack that `sample.py --export` writes" in line
    assert "ExtraData" not in line


def test_sample_names_a_step_directory_that_is_not_a_checkpoint(capsys, tmp_path):
    (tmp_path / "ckpt" / "7").mkdir(parents=True)
    (tmp_path / "ckpt" / "7" / "notes.txt").write_text("not a checkpoint")
    assert cli.run(sample.main, ["--ckpt", str(tmp_path / "ckpt")]) == 1
    warning, error = capsys.readouterr().err.strip().splitlines()
    assert warning.startswith(f"warning: checkpoint {tmp_path / 'ckpt' / '7'} is unreadable")
    assert error == f"error: no readable checkpoint in {tmp_path / 'ckpt'} (steps [7] are all corrupt)"


def test_cli_errors_are_one_line_in_a_real_process(tmp_path):
    result = run_script("sample.py", "--ckpt", tmp_path / "nowhere", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: checkpoint directory {tmp_path / 'nowhere'} does not exist"
    result = run_script("train.py", "--batch-size", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("train.py: error: argument --batch-size: must be positive, "
                                     "got 0 (see --help)")
    result = subprocess.run([sys.executable, "-m", "digitscape_jax.evaluate", "--npz",
                             str(tmp_path / "nowhere.npz")], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: --npz {tmp_path / 'nowhere.npz'}: no such file"


def test_unwritable_output_paths_are_one_line_errors(capsys, tmp_path, trained_run):
    ckpt = str(trained_run[0] / "ckpt")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for flags in (["--out", str(blocker / "s.png")],
                  ["--out", str(tmp_path / "s.png"), "--npz", str(blocker / "s.npz")],
                  ["--export", str(tmp_path)]):
        assert cli.run(sample.main, ["--ckpt", ckpt, *flags]) == 1
        assert one_line_error(capsys).startswith("error: ")
    assert not list(tmp_path.glob("*.partial"))
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", ckpt, "--out", "s.txt"])
    assert "must name a .png file" in one_line_error(capsys)
    assert cli.run(train.main, ["--steps", "1", "--ckpt-dir", str(blocker)]) == 1
    assert one_line_error(capsys).startswith("error: ")


def test_a_failing_picture_never_costs_a_checkpoint(capsys, tmp_path, trained_run):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code = cli.run(train.main, ["--arch", "seed", "--eval-every", "0", "--steps", "3", "--sample-every", "2",
                                "--ckpt-every", "2", "--ckpt-dir", str(tmp_path / "ckpt"),
                                "--samples-dir", str(blocker),
                                "--data-dir", str(trained_run[0] / "tfds")])
    assert code == 1
    assert one_line_error(capsys).startswith("error: ")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == ["2"]


def test_a_fresh_start_replaces_the_metrics_of_a_run_that_saved_nothing(tmp_path, trained_run):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "metrics.jsonl").write_text('{"step": 1, "d_loss": 9}\n{"step": 2, "d_l')
    assert cli.run(train.main, ["--arch", "seed", "--eval-every", "0", "--steps", "2", "--log-every", "1",
                                "--ckpt-dir", str(ckpt), "--samples-dir", str(tmp_path / "g"),
                                "--data-dir", str(trained_run[0] / "tfds")]) == 0
    records = [json.loads(line) for line in (ckpt / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [1, 2] and records[0]["d_loss"] != 9


def test_each_arch_brings_its_own_defaults():
    seed = train.config_from_args(train.parse_args(["--arch", "seed"]))
    assert (seed.batch_size, seed.learning_rate, seed.beta1) == (64, 1e-4, 0.9)  # the original
    default = train.config_from_args(train.parse_args([]))
    assert (default.arch, default.batch_size, default.learning_rate, default.beta1,
            default.clusters, default.spectral_norm, default.g_first_kernel) == (
        "fast", 64, 5e-4, 0.5, 300, "convs", 3)
    dcgan = train.config_from_args(train.parse_args(["--arch", "dcgan"]))
    assert (dcgan.batch_size, dcgan.learning_rate, dcgan.beta1, dcgan.clusters,
            dcgan.g_first_kernel) == (256, 2e-4, 0.5, 0, 5)
    mine = train.config_from_args(train.parse_args(["--lr", "3e-4", "--beta1", "0",
                                                    "--spectral-norm", "none"]))
    assert (mine.learning_rate, mine.beta1, mine.spectral_norm) == (3e-4, 0.0, "none")
