"""The sample-quality evaluator: its classifier, its metrics on digits of known quality, its CLI."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from conftest import write_idx

from digitscape_jax import classifier, cli, data
from digitscape_jax import evaluate as ev
from digitscape_jax import sample_metrics as sm
from digitscape_jax.errors import UserError
from digitscape_jax.evaluator import MIN_SAMPLES, SPACES, Evaluator, during_training
from test_cli import flag_error, one_line_error

REFERENCE_N = 2000  # test digits the evaluator compares with
TRAIN_N = 10_000  # training digits it checks for memorization


@pytest.fixture(scope="session")
def mnist(mnist_idx):
    """The real MNIST: ((train images, labels), (test images, labels)), uint8 (N, 28, 28)."""
    return data.read_idx_split(mnist_idx, "train"), data.read_idx_split(mnist_idx, "test")


@pytest.fixture(scope="session")
def evaluator(mnist):
    (train, _), (test, labels) = mnist
    return Evaluator(test[:REFERENCE_N], train[:TRAIN_N], test_labels=labels[:REFERENCE_N])


@pytest.fixture(scope="session")
def held_out(mnist):
    """Real test digits that the evaluator's reference does not hold, and their labels."""
    _, (test, labels) = mnist
    return test[REFERENCE_N:2 * REFERENCE_N], labels[REFERENCE_N:2 * REFERENCE_N]


@pytest.fixture(scope="session")
def ranked(mnist, evaluator, held_out):
    """The metrics but memorization of real, one-class and noise digits, 2,000 of each."""
    (train, train_labels), _ = mnist
    rng = np.random.default_rng(1)
    sets = {
        "real": held_out[0],
        "one class": train[rng.choice(np.flatnonzero(train_labels == 1), REFERENCE_N)],
        "noise": rng.integers(0, 256, (REFERENCE_N, 28, 28), dtype=np.uint8),
    }
    return {name: evaluator.evaluate(images, metrics=("fd", "inception_score", "classes",
                                                      "precision_recall"))
            for name, images in sets.items()}


def test_committed_classifier_is_over_99_percent_accurate(mnist):
    _, (test, labels) = mnist
    assert classifier.accuracy(classifier.load(), test, labels) >= 0.99
    info = classifier.load_info()
    assert info["test_accuracy"] >= 0.99 and info["test_n"] == 10_000
    assert info["param_count"] == classifier.param_count(classifier.load())
    assert classifier.WEIGHTS.stat().st_size < 1_000_000


@pytest.mark.slow
def test_committed_held_out_classifier_is_over_99_percent_accurate(mnist):
    _, (test, labels) = mnist
    network = classifier.HELD_OUT
    params = classifier.load(network=network)
    assert classifier.accuracy(params, test, labels, network=network) >= 0.99
    info = classifier.load_info(network=network)
    assert info["space"] == "held_out" and info["test_n"] == 10_000
    assert info["test_accuracy"] >= 0.99 and info["architecture"] == network.describe()
    assert info["param_count"] == classifier.param_count(params)
    assert network.weights.stat().st_size < 1_000_000
    # Another network than the selection one: other mistakes (48 of the selection's 80 shared).
    selection = classifier.classify(classifier.load(), test)[1].argmax(1)
    held_out = classifier.classify(params, test, network=network)[1].argmax(1)
    both_wrong = np.mean((selection != labels) & (held_out != labels))
    assert both_wrong < 0.75 * np.mean(selection != labels)


def test_held_out_classifier_weights_round_trip(tmp_path, small_idx):
    idx_dir, _ = small_idx  # 40 random digits: one batch, one step
    path = tmp_path / "held_out.msgpack"
    argv = ["--train-classifier", "--space", "held_out", "--epochs", "1", "--mnist-idx",
            str(idx_dir), "--classifier", str(path)]
    assert cli.run(ev.main, argv) == 0
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["space"] == "held_out" and info["seed"] == classifier.HELD_OUT.seed
    loaded = classifier.load(path, classifier.HELD_OUT)
    again = classifier.train(*data.read_idx_split(idx_dir, "train"), network=classifier.HELD_OUT,
                             epochs=1, log=lambda _: None)
    for a, b in zip(*(jax.tree_util.tree_leaves(tree) for tree in (again, loaded))):
        np.testing.assert_array_equal(a, b)  # what was saved, and deterministic from the seed
    images = data.read_idx_split(idx_dir, "test")[0]
    np.testing.assert_array_equal(
        classifier.classify(loaded, images, network=classifier.HELD_OUT)[0],
        classifier.classify(again, images, network=classifier.HELD_OUT)[0])
    assert loaded["conv0"]["kernel"].shape == (5, 5, 1, classifier.HELD_OUT.conv_channels[0])
    with pytest.raises(UserError, match="not a classifier weights file|another architecture"):
        classifier.load(path, classifier.SELECTION)  # the same file read as the other network


def test_affine_augmentation_moves_digits_but_keeps_them_whole(mnist):
    _, (test, _) = mnist
    x = classifier.preprocess(test[:64])
    moved = classifier.affine_augment(jax.random.key(0), x, classifier.HELD_OUT)
    assert moved.shape == x.shape and not np.allclose(moved, x)
    ink, moved_ink = np.asarray(x).sum((1, 2, 3)), np.asarray(moved).sum((1, 2, 3))
    np.testing.assert_allclose(moved_ink / ink, 1.0, atol=0.25)  # zoom by 1 +- 0.1: ink ~ area
    still = dataclasses.replace(classifier.HELD_OUT, shift=0.0, rotate=0.0, scale=0.0)
    np.testing.assert_allclose(classifier.affine_augment(jax.random.key(0), x, still), x,
                               atol=1e-5)


def test_classifier_weights_of_another_kind_are_refused(tmp_path):
    from flax import serialization

    params = classifier.load()
    (tmp_path / "junk.msgpack").write_bytes(b"not msgpack at all")
    narrower = {**params, "logits": {"bias": np.zeros(3, np.float32),
                                     "kernel": np.zeros((128, 3), np.float32)}}
    (tmp_path / "other.msgpack").write_bytes(serialization.to_bytes(narrower))
    for name, message in (("missing", "no classifier weights at"),
                          ("junk", "is not a classifier weights file"),
                          ("other", "holds weights of another architecture")):
        with pytest.raises(UserError, match=message):
            classifier.load(tmp_path / f"{name}.msgpack")


def test_classifier_takes_uint8_digits_only():
    params = classifier.load()
    features, logits = classifier.classify(params, np.zeros((3, 28, 28, 1), np.uint8))
    assert features.shape == (3, classifier.FEATURES) and logits.shape == (3, classifier.CLASSES)
    for bad, message in ((np.zeros((3, 28, 28), np.float32), "must be uint8"),
                         (np.zeros((3, 32, 32), np.uint8), "shape (N, 28, 28)")):
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            classifier.classify(params, bad)


@pytest.mark.parametrize("space", SPACES)
def test_fd_is_zero_for_equal_sets_symmetric_and_exact_for_diagonal_gaussians(evaluator,
                                                                              held_out, space):
    real = sm.feature_stats(evaluator.spaces[space].test_features)
    assert abs(sm.frechet_distance(*real, *real)) < 1e-6 * np.trace(real[1])
    other = sm.feature_stats(evaluator.spaces[space].classify(held_out[0])[0])
    forward, backward = sm.frechet_distance(*real, *other), sm.frechet_distance(*other, *real)
    assert forward > 0 and forward == pytest.approx(backward, rel=1e-6)
    # Commuting covariances: FD = |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2.
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    assert sm.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(5 + 1 + 0 + 4)


@pytest.mark.parametrize("space", SPACES)
def test_real_digits_rank_above_noise_and_a_single_class(ranked, space):
    real, one, noise = (ranked[name]["spaces"][space] for name in ("real", "one class", "noise"))
    for worse in (one, noise):
        assert real["fd"] < worse["fd"] / 10
        assert real["inception_score"] > worse["inception_score"] + 5
        assert real["class_kl"] < worse["class_kl"] - 1
        assert real["recall"] > worse["recall"] + 0.5
    assert real["inception_score"] > 9 and real["class_kl"] < 0.02
    assert real["precision"] > 0.8 and real["recall"] > 0.8  # two real sets of 2,000, k = 3
    assert real["density"] > 0.7 and noise["density"] < real["density"] / 2
    assert one["class_fractions"][1] > 0.95


def test_precision_and_recall_of_known_feature_sets():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(1000, 2))
    assert sm.precision_recall_density(real, real) == (1.0, 1.0, pytest.approx(4 / 3, abs=0.05))
    # (density: each point is also in its own ball, so (k + 1) / k)
    assert sm.precision_recall_density(real, real + 100.0)[:2] == (0.0, 0.0)
    half = real[real[:, 0] < 0]  # half of the real manifold, exactly
    precision, recall, _ = sm.precision_recall_density(real, half)
    assert precision == 1.0 and 0.4 < recall < 0.65
    collapsed = np.repeat(real[:1], 100, 0)  # one point: zero-radius balls
    precision, recall, _ = sm.precision_recall_density(real, collapsed)
    assert precision == 1.0 and recall == pytest.approx(1 / 1000)


def test_knn_radii_are_the_kth_smallest_distance_to_the_others_counting_duplicates():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(300, 5)).astype(np.float32)
    points[100:104] = points[0]  # five copies of one point, and two of another
    points[200] = points[1]
    expected = np.sort(((points[:, None] - points[None]) ** 2).sum(-1), 1)  # self first
    for k in (1, 3, 5):
        np.testing.assert_allclose(sm.knn_radii(points, k), expected[:, k], atol=1e-4)
    assert sm.knn_radii(points, 3)[0] == pytest.approx(0.0, abs=1e-4)  # 4 copies: the 3rd is one
    assert sm.knn_radii(points, 5)[0] > 0.01  # the 5th is another point


def test_memorization_detects_copies_of_training_digits_not_unseen_ones(evaluator, held_out):
    result = evaluator.evaluate(evaluator.train_images[:1000], metrics=["memorization"])
    assert result["memorization_rate"] == 1.0
    assert result["memorization_threshold"] > 0.5
    unseen = evaluator.evaluate(held_out[0], metrics=["memorization"])
    assert unseen["memorization_rate"] < 0.04  # 0.01 by construction, on other test digits
    nearest = sm.NearestTrain(evaluator.train_images[:3000])
    queries = held_out[0][:50]
    brute = np.sqrt(((queries[:, None].astype(np.float64) / 255 -
                      evaluator.train_images[None, :3000] / 255) ** 2).sum((2, 3))).min(1)
    np.testing.assert_allclose(nearest(queries), brute, rtol=1e-3, atol=1e-2)


def test_label_accuracy_follows_the_requested_labels(evaluator, mnist):
    _, (images, labels) = mnist
    right = evaluator.evaluate(images, labels, metrics=["classes"])
    assert right["label_accuracy"] >= 0.99
    shuffled = np.random.default_rng(0).permutation(labels)
    assert 0.08 < evaluator.evaluate(images, shuffled, metrics=[])["label_accuracy"] < 0.12
    with pytest.raises(UserError, match="labels must be"):
        evaluator.evaluate(images, labels[:10])


def test_too_few_or_bad_digits_are_refused(evaluator):
    with pytest.raises(UserError, match=f"at least {MIN_SAMPLES} digits"):
        evaluator.evaluate(evaluator.test_images[:MIN_SAMPLES - 1])
    with pytest.raises(UserError, match="unknown metrics"):
        evaluator.evaluate(evaluator.test_images, metrics=["fid"])
    with pytest.raises(UserError, match="uint8"):
        evaluator.evaluate(evaluator.test_images / 127.5 - 1.0)


@pytest.fixture(scope="session")
def small_mnist_idx(tmp_path_factory, mnist):
    """An IDX folder of real digits, smaller than MNIST, so the CLI runs fast."""
    folder = tmp_path_factory.mktemp("small_mnist")
    (train, train_labels), (test, test_labels) = mnist
    for prefix, images, labels in (("train", train[:5000], train_labels[:5000]),
                                   ("t10k", test[:1000], test_labels[:1000])):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 2051, images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 2049, labels)
    return folder


def test_cli_evaluates_an_npz(tmp_path, mnist, small_mnist_idx, capsys):
    _, (test, labels) = mnist
    np.savez_compressed(tmp_path / "real.npz", images=test[1000:1500], labels=labels[1000:1500])
    assert cli.run(ev.main, ["--npz", str(tmp_path / "real.npz"), "--mnist-idx",
                             str(small_mnist_idx), "--json", str(tmp_path / "m.json")]) == 0
    stdout = capsys.readouterr().out
    assert "FD, classifier features" in stdout and "label accuracy" in stdout
    assert "held_out" in stdout and "selection" in stdout
    numbers = json.loads((tmp_path / "m.json").read_text())
    assert numbers["n"] == 500 and numbers["reference_n"] == 1000
    assert set(numbers["spaces"]) == set(SPACES)
    for space in numbers["spaces"].values():
        assert set(space) == {"fd", "inception_score", "precision", "recall", "density", "k",
                              "class_fractions", "class_kl"}
    assert numbers["spaces"]["selection"]["fd"] < 40  # noise: about 800
    assert numbers["label_accuracy"] >= 0.98
    assert numbers["memorization_rate"] < 0.05


def test_cli_names_a_missing_npz(capsys, tmp_path):
    assert cli.run(ev.main, ["--npz", str(tmp_path / "nowhere.npz")]) == 1
    assert one_line_error(capsys) == f"error: --npz {tmp_path / 'nowhere.npz'}: no such file"


def test_cli_refuses_malformed_npz_files(capsys, tmp_path, small_mnist_idx):
    np.savez(tmp_path / "floats.npz", images=np.zeros((20, 28, 28), np.float32))
    np.savez(tmp_path / "shape.npz", images=np.zeros((20, 32, 32), np.uint8))
    np.savez(tmp_path / "key.npz", digits=np.zeros((20, 28, 28), np.uint8))
    np.savez(tmp_path / "few.npz", images=np.zeros((MIN_SAMPLES - 1, 28, 28), np.uint8))
    np.savez(tmp_path / "labels.npz", images=np.zeros((20, 28, 28), np.uint8),
             labels=np.full(20, 12))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with (tmp_path / "npy.npz").open("wb") as f:
        np.save(f, np.zeros((20, 28, 28), np.uint8))
    for name, message in (("floats", "must be uint8"), ("shape", "must have shape (N, 28, 28)"),
                          ("key", "has no 'images' array"), ("few", "at least"),
                          ("labels", "labels must be classes"), ("junk", "not a readable .npz"),
                          ("npy", "not an .npz archive"),
                          ("missing", "no such file")):
        argv = ["--npz", str(tmp_path / f"{name}.npz"), "--mnist-idx", str(small_mnist_idx)]
        assert cli.run(ev.main, argv) == 1, name
        line = one_line_error(capsys)
        assert line.startswith("error: ") and message in line, (name, line)


@pytest.mark.parametrize("flags,message", [
    ([], "one of the arguments --ckpt --npz --calibrate --train-classifier is required"),
    (["--ckpt", "c", "--npz", "s.npz"], "not allowed with argument"),
    (["--npz", "s.npz", "--step", "3"], "--step needs --ckpt"),
    (["--ckpt", "c", "--n", "0"], "--n: must be positive"),
])
def test_cli_rejects_bad_flags(capsys, flags, message):
    assert message in flag_error(capsys, ev.main, flags)


def test_cli_calibration_separates_real_digits_from_bad_ones(capsys, tmp_path, small_mnist_idx):
    argv = ["--calibrate", "--n", "300", "--mnist-idx", str(small_mnist_idx),
            "--json", str(tmp_path / "c.json")]
    assert cli.run(ev.main, argv) == 0
    table = capsys.readouterr().out
    assert table.startswith("selection space:\n\n| digits | n | FD |") and "uniform noise" in table
    assert table.count("| digits | n | FD |") == 2 and "held_out space:" in table
    assert "binarised train digits" in table
    results = json.loads((tmp_path / "c.json").read_text())
    for space in SPACES:
        fd = [r["spaces"][space]["fd"] for r in results.values()]
        assert max(fd[:2]) < min(fd[2:]), space  # real (test, train), then the degraded ones
        reference = results["real test digits (the reference itself)"]["spaces"][space]
        assert reference["precision"] == reference["recall"] == 1.0  # 300 of the 1,000
    real = results["real train digits"]
    assert real["memorization_rate"] == 1.0  # they are the training digits


def test_train_classifier_writes_loadable_weights(capsys, tmp_path, small_idx):
    idx_dir, _ = small_idx  # 40 random digits: one batch, one step
    path = tmp_path / "c.msgpack"
    argv = ["--train-classifier", "--epochs", "1", "--mnist-idx", str(idx_dir),
            "--classifier", str(path)]
    assert cli.run(ev.main, argv) == 0
    assert f"classifier -> {path}" in capsys.readouterr().out
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["epochs"] == 1 and info["train_n"] == 40 and info["test_n"] == 12
    params = classifier.load(path)
    assert classifier.param_count(params) == info["param_count"]
    again = classifier.train(*data.read_idx_split(idx_dir, "train"), epochs=1, log=lambda _: None)
    for a, b in zip(*(jax.tree_util.tree_leaves(tree) for tree in (again, params))):
        np.testing.assert_array_equal(a, b)  # deterministic from the seed


@pytest.mark.parametrize("space", SPACES)
def test_a_classifier_below_99_percent_never_replaces_the_shipped_one(capsys, tmp_path, small_idx,
                                                                     monkeypatch, space):
    shipped = tmp_path / "shipped.msgpack"  # a stand-in, so that a failure harms no real file
    weights = classifier.NETWORKS[space].weights.read_bytes()
    shipped.write_bytes(weights)
    monkeypatch.setitem(classifier.NETWORKS, space,
                        dataclasses.replace(classifier.NETWORKS[space], weights=shipped))
    argv = ["--train-classifier", "--space", space, "--epochs", "1", "--mnist-idx",
            str(small_idx[0])]
    assert cli.run(ev.main, argv) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: the retrained classifier's test accuracy ") and error.count("\n") == 1
    assert "shipped weights were kept; pass --classifier FILE" in error
    assert shipped.read_bytes() == weights
    assert not shipped.with_suffix(".json").exists()


def test_cli_draws_and_evaluates_digits_from_a_generator(capsys, tmp_path, small_mnist_idx):
    from digitscape_jax.config import Config
    from digitscape_jax.export import save_msgpack
    from digitscape_jax.steps import create_states

    config = Config(arch="seed")
    g_state, _ = create_states(config, jax.random.key(0))
    save_msgpack(tmp_path / "g.msgpack", config, g_state.variables, 0)
    argv = ["--ckpt", str(tmp_path / "g.msgpack"), "--n", "200", "--mnist-idx",
            str(small_mnist_idx), "--json", str(tmp_path / "m.json")]
    assert cli.run(ev.main, argv) == 0
    out = capsys.readouterr().out
    assert f"200 digits from {tmp_path / 'g.msgpack'} (step 0, arch seed, seed 0)" in out
    spaces = json.loads((tmp_path / "m.json").read_text())["spaces"]
    assert spaces["selection"]["fd"] > 50  # an untrained generator
    assert spaces["held_out"]["fd"] > 10 * spaces["held_out"]["k"]  # far from real digits too


def test_during_training_logs_fd_and_is_and_label_accuracy_if_conditional(evaluator):
    from digitscape_jax.config import Config
    from digitscape_jax.steps import create_states

    for conditional in (False, True):
        config = Config(arch="seed", conditional=conditional)
        g_state, _ = create_states(config, jax.random.key(0))
        logged = during_training(evaluator, config, g_state.variables, jax.random.key(1), 200)
        expected = {"fd", "is", "fd_held_out"} | ({"label_accuracy"} if conditional else set())
        assert set(logged) == expected and logged["fd"] > 50 and 1 <= logged["is"] < 10
        assert logged["fd_held_out"] > 0
