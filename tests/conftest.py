"""Shared fixtures: the real MNIST files beside the repo, and small IDX folders; the tiers.

Two tiers (docs/design.md, Tests): `pytest -m "not slow"` after every edit, hermetic, and the
whole suite before a commit. A test is `slow` when it needs real MNIST (every user of the
`mnist_idx` fixture, through `real_batch` or `trained_run` too, is marked here), a browser, npm
or a child process that trains (marked in its file), or compiles or trains for more than about
two seconds (LONG_IN_PROCESS, marked here)."""

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


# Fixtures that read the real MNIST files: a test that uses one, directly or through another
# fixture, is `slow`.
REAL_MNIST_FIXTURES = {"mnist_idx"}
# Hermetic tests that compile or train for more than about two seconds on a 2-core CPU, by
# function name: `slow` too, so that the fast tier stays under a minute.
LONG_IN_PROCESS = {
    "test_a_clustered_run_keeps_its_cluster_prior_and_resumes_bitwise",
    "test_restore_then_step_is_bit_identical_to_stepping_on",
    "test_a_new_metric_of_the_step_reaches_the_screen_the_log_and_the_plot",
    "test_onnx_export_matches_the_jax_generator",
    "test_generator_matches_keras",
    "test_discriminator_matches_keras",
    "test_a_stop_acts_within_two_steps_of_the_last_finished_one",
    "test_conv_computes_its_gradients_in_bfloat16",
    "test_conv_transpose_is_flax_and_lax_conv_transpose",
    "test_conv_is_flax_conv_with_the_same_gradients",
    "test_held_out_classifier_weights_round_trip",
    "test_train_writes_every_output_and_resumes_in_process",
    "test_the_default_g_maps_its_7x7_features_with_a_3x3_kernel_and_an_old_checkpoint_5x5",
    "test_a_rerun_without_arch_resumes_the_arch_of_its_checkpoint",
    "test_train_classifier_writes_loadable_weights",
    "test_a_run_once_program_computes_the_same_bits_as_an_optimised_one",
    "test_kernels_are_glorot_uniform",
    "test_d_has_its_own_learning_rate",
    "test_conditional_savedmodel_matches_the_jax_generator",
    "test_cli_errors_are_one_line_in_a_real_process",
    "test_a_conditional_clustered_generator_draws_a_cluster_of_the_digit_asked_for",
    "test_r1_gradient_through_the_fast_conv_is_flax_convs",
    "test_the_label_changes_what_each_network_computes",
    "test_training_classes_are_the_clusters_the_clusters_within_labels_or_the_labels",
    "test_batchnorm_uses_keras_momentum_and_epsilon",
    "test_generate_in_batches_is_reproducible_and_batch_sized",
    "test_spectral_normalize_divides_by_the_largest_singular_value",
    "test_train_flags_are_accepted_or_refused_in_one_line",
    "test_sample_flags_are_accepted_or_refused_in_one_line",
    "test_normalised_features_group_digits_by_shape_not_by_ink",
    "test_a_fast_checkpoint_from_before_g_first_kernel_restores_as_its_5x5_layer",
    "test_latent_walks_loop_through_their_points",
    "test_sample_draws_the_digit_asked_for",
    "test_slerp_ends_at_its_points_and_keeps_the_norm",
    "test_kmeans_within_labels_clusters_each_labels_images_apart",
    "test_kmeans_finds_separated_groups_and_their_shares_deterministically",
    "test_generator_has_no_biases_and_discriminator_zero_biases",
    "test_conv_transpose_refuses_a_kernel_narrower_than_its_stride",
    "test_precision_and_recall_of_known_feature_sets",
    "test_the_noise_draws_each_cluster_at_its_frequency",
    "test_the_shipped_generator_draws_the_digit_asked_for_without_training",
    "test_report_check_exits_zero_on_the_committed_docs",
}

# The longest tests, by name (without parameters), and roughly how many seconds each takes on
# a 2-core CPU: they are started first, shared out between pytest-xdist's two workers. Only
# the order and the rough sizes matter; tests not named here count as SHORT_S each.
LONG_S = {
    "test_sigkill_anywhere_then_rerun_ends_bitwise_where_an_uninterrupted_run_does": 60,
    "test_two_processes_train_one_model": 40,
    "test_the_notebook_trains_and_shows_its_pictures": 35,
    "test_sigterm_and_sigint_stop_after_a_checkpoint_and_a_second_writer_is_refused": 30,
    "test_a_run_of_several_steps_per_call_and_its_rerun_from_the_compilation_cache": 30,
    "test_eight_devices_match_one": 30,
    "test_train_writes_every_output": 5,
    "test_several_steps_per_call_equal_single_steps": 20,
    "test_a_clustered_run_keeps_its_cluster_prior_and_resumes_bitwise": 30,
    "test_a_rerun_without_arch_resumes_the_arch_of_its_checkpoint": 25,
    "test_train_writes_every_output_and_resumes_in_process": 20,
    "test_the_regularised_recipe_trains": 15,
    "test_a_few_dozen_steps_teach_d_to_tell_real_from_fake": 10,
    "test_restore_then_step_is_bit_identical_to_stepping_on": 10,
    "test_divergence_stops_training_and_keeps_the_last_good_checkpoint": 10,
}
SHORT_S = 1.5
TRAINED_RUN_S = 30  # building `trained_run`, paid by the first test that asks for it
# Tests that share a costly fixture of their module or a `built_once` folder other than
# `trained_run` run on one worker, which builds it once.
KEPT_TOGETHER = {"one_device_run", "chromium"}


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(items: list[pytest.Item]):
    """Marks the users of real MNIST `slow` (before `-m` deselects), then orders the tests
    selected (after)."""
    for item in items:
        if (REAL_MNIST_FIXTURES & set(item.fixturenames)
                or getattr(item, "originalname", item.name) in LONG_IN_PROCESS):
            item.add_marker(pytest.mark.slow)
    result = yield
    items[:] = two_worker_order(items)
    return result


def two_worker_order(items: list[pytest.Item]) -> list[pytest.Item]:
    """The tests in an order that keeps two pytest-xdist workers (`-n 2 --dist worksteal`)
    busy to the end: work stealing gives the first worker the first half of the list and the
    second the rest, and a worker whose half is done steals the end of the other's.

    So each half starts with its share of the long tests (LONG_S, shared out longest first,
    each to the half with less work so far), then its short ones. The first half builds
    `trained_run` and holds the tests that use it; the second starts on tests that need
    none, so that it never waits for the build, and its last tests are the short ones left
    (the first to be stolen)."""
    def cost(item: pytest.Item) -> float:
        return LONG_S.get(getattr(item, "originalname", item.name), 0.0)

    def uses_run(item: pytest.Item) -> bool:
        return "trained_run" in item.fixturenames

    units: dict[object, list[pytest.Item]] = {}
    for item in items:
        shared = sorted(KEPT_TOGETHER & set(item.fixturenames))
        units.setdefault(shared[0] if shared else item.nodeid, []).append(item)
    long_units = sorted((unit for unit in units.values() if any(cost(i) for i in unit)),
                        key=lambda unit: -sum(cost(i) + SHORT_S for i in unit))
    short = [item for unit in units.values() if not any(cost(i) for i in unit) for item in unit]
    halves: tuple[list[pytest.Item], list[pytest.Item]] = ([], [])
    loads = [TRAINED_RUN_S if any(map(uses_run, items)) else 0.0, 0.0]
    for unit in long_units:
        half = 0 if loads[0] <= loads[1] else 1
        halves[half].extend(unit)
        loads[half] += sum(cost(i) + SHORT_S for i in unit)
    first, second = halves
    first.sort(key=lambda item: not uses_run(item))  # stable: longest first within each
    second.sort(key=uses_run)  # by the time it needs `trained_run`, the first has built it
    short.sort(key=uses_run)  # those that need no `trained_run`, then its users
    # The first half takes its short tests from the end: `trained_run`'s users.
    take = max(0, (len(items) // 2) - len(first))
    split = len(short) - take
    return first + short[split:] + second + short[:split]


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


# How many of real MNIST's digits `trained_run` prepares: the first of each split. Its users
# train a few dozen steps at most, and preparing all 70,000 as tfds records takes several
# times longer than its training.
TRAINED_RUN_DIGITS = {"train": 6_000, "test": 2_000}


def write_idx_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Writes one split's images (N, 28, 28) and labels (N,) as the standard IDX files."""
    prefix = {"train": "train", "test": "t10k"}[split]
    write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 2051, images)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 2049, labels)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, mnist_idx):
    """`train.py` from nothing: prepares MNIST from IDX files (real MNIST's first digits:
    TRAINED_RUN_DIGITS), trains 30 steps of `seed`, with TensorBoard events, measuring sample
    quality at steps 20 and 30. Run once for all workers (`built_once`): tests read it, and
    copy what they change.

    Returns the working directory (with `ckpt/`, `generated_images/` and the tfds
    data dir `tfds/`) and the finished process, its output included.
    """
    from digitscape_jax.data import read_idx_split

    def build(workdir: Path) -> None:
        idx = workdir / "mnist-idx"
        idx.mkdir(exist_ok=True)
        for split, n in TRAINED_RUN_DIGITS.items():
            images, labels = read_idx_split(mnist_idx, split)
            write_idx_split(idx, split, images[:n], labels[:n])
        result = run_script("train.py", *TRAIN_FLAGS, "--eval-every", "20", "--eval-samples",
                            "200", "--tensorboard", "--mnist-idx", idx,
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
