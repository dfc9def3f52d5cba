"""Shared fixtures: the real MNIST files beside the repo, and small IDX folders."""

from __future__ import annotations

import fcntl
import gzip
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = Path(os.environ.get("DIGITSCAPE_MNIST_IDX", REPO.parent / "shared" / "mnist"))

# One compilation cache for the session's runs, in and out of process and shared by the
# pytest-xdist workers of one run, kept out of ~/.cache.
_RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"digitscape-xla-{_RUN_ID}") if _RUN_ID
    else tempfile.mkdtemp(prefix="digitscape-xla-"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Long tests (marked `slow`) first, then the other users of `trained_run`, each in file
    order. pytest-xdist's work stealing gives one worker the first half and the other the
    second, so the second starts on tests that need no `trained_run` while the first builds
    it, and at the end the workers steal short tests from each other, where a long test
    started last would keep one busy while the other idled."""
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None,
                                 "trained_run" not in item.fixturenames))


@pytest.fixture(scope="session")
def mnist_idx() -> Path:
    """The four real MNIST IDX files. They are required: these tests never skip."""
    missing = [f for f in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                           "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
               if not (SHARED_MNIST / f).is_file()]
    assert not missing, f"real MNIST IDX files not found in {SHARED_MNIST}"
    return SHARED_MNIST


@pytest.fixture(scope="session")
def real_batch(mnist_idx):
    """The first 64 MNIST training digits, as the step takes them: float32 in [-1, 1]."""
    from digitscape_jax.data import read_idx_split

    images, _ = read_idx_split(mnist_idx, "train")
    return (images[:64, ..., None].astype(np.float32) / 127.5 - 1.0)


def write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    """Writes `array` (uint8) as a gzipped IDX file."""
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture
def small_idx(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A folder of four tiny, random IDX files, and the arrays they hold."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "idx"
    folder.mkdir()
    arrays = {}
    for split, prefix, n in (("train", "train", 40), ("test", "t10k", 12)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, (n,), dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 2051, images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 2049, labels)
        arrays[split] = (images, labels)
    return folder, arrays


TRAIN_FLAGS = ["--arch", "seed", "--steps", "30", "--log-every", "10", "--sample-every", "10",
               "--ckpt-every", "10", "--eval-every", "0"]


def run_script(script: str, *args, cwd: Path,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs train.py or sample.py in a fresh process, as a user would, with `env` added."""
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The folder `name`, made by `build(folder)` once per test run: pytest-xdist's workers
    share it, the first to ask builds it while the others wait, so its cost is paid once."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / ".built").exists():
            folder.mkdir(exist_ok=True)
            build(folder)
            (folder / ".built").touch()
    return folder


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, mnist_idx):
    """`train.py` from nothing: prepares MNIST from the IDX files, trains 30 steps of `seed`,
    with TensorBoard events, measuring sample quality at steps 20 and 30. Run once for all
    workers (`built_once`): tests read it, and copy what they change.

    Returns the working directory (with `ckpt/`, `generated_images/` and the tfds
    data dir `tfds/`) and the finished process, its output included.
    """
    def build(workdir: Path) -> None:
        result = run_script("train.py", *TRAIN_FLAGS, "--eval-every", "20", "--eval-samples",
                            "200", "--tensorboard", "--mnist-idx", mnist_idx,
                            "--data-dir", workdir / "tfds", cwd=workdir)
        assert result.returncode == 0, result.stderr
        (workdir / "stdout.txt").write_text(result.stdout)
        (workdir / "stderr.txt").write_text(result.stderr)

    workdir = built_once(tmp_path_factory, "trained_run", build)
    return workdir, subprocess.CompletedProcess(
        ["train.py"], 0, (workdir / "stdout.txt").read_text(), (workdir / "stderr.txt").read_text())


def gif_frames(path: Path) -> list[np.ndarray]:
    """The frames of a GIF as uint8 grayscale arrays."""
    from PIL import Image

    with Image.open(path) as gif:
        frames = []
        for index in range(gif.n_frames):
            gif.seek(index)
            frames.append(np.asarray(gif.convert("L")))
    return frames
