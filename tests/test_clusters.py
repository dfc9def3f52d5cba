"""Self-conditioning (--clusters): k-means on pixels or shapes, within labels too, the cluster
prior in G's noise, and checkpoints from before G had constants or a choice of cluster
features."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from digitscape_jax import clusters
from digitscape_jax.checkpointing import Checkpointer
from digitscape_jax.config import Config, ConfigError
from digitscape_jax.errors import UserError
from digitscape_jax.models import networks, sample_noise
from digitscape_jax.steps import abstract_states, create_states, train_step


def groups_of_images(sizes: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images in len(sizes) well-separated groups (each its own bright square), and
    each image's group."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(len(sizes)), sizes)
    images = rng.integers(0, 20, (len(groups), 28, 28, 1)).astype(np.uint8)
    for group in range(len(sizes)):
        row, col = divmod(group, 4)
        images[groups == group, 7 * row:7 * row + 7, 7 * col:7 * col + 7] = 250
    order = rng.permutation(len(groups))
    return images[order], groups[order]


def test_kmeans_finds_separated_groups_and_their_shares_deterministically():
    sizes = [30, 60, 90, 20]
    images, groups = groups_of_images(sizes)
    assignments, frequencies = clusters.kmeans(images, 4, "pixels")
    assert assignments.dtype == np.int32 and assignments.shape == (200,)
    # One cluster per group, whatever their numbering.
    pairs = set(zip(groups.tolist(), assignments.tolist()))
    assert len(pairs) == 4 and len({c for _, c in pairs}) == 4
    by_group = dict(pairs)
    np.testing.assert_allclose([frequencies[by_group[g]] for g in range(4)],
                               np.array(sizes) / 200, atol=1e-6)
    again, _ = clusters.kmeans(images, 4, "pixels")
    np.testing.assert_array_equal(again, assignments)
    with pytest.raises(UserError, match="--clusters 201 is more than the 200 training images"):
        clusters.kmeans(images, 201, "pixels")


def test_kmeans_within_labels_clusters_each_labels_images_apart(monkeypatch):
    """Each image's class is its label times k plus its cluster among its label's images; each
    row of frequencies is a label's clusters' shares of that label."""
    images, groups = groups_of_images([30, 10, 40, 20])
    labels = groups // 2  # label 0: groups 0 and 1; label 1: groups 2 and 3
    classes, frequencies = clusters.kmeans_within_labels(images, labels, 2, 2, "pixels")
    assert classes.dtype == np.int32 and frequencies.shape == (2, 2)
    np.testing.assert_array_equal(classes // 2, labels)
    for label, sizes in ((0, [30, 10]), (1, [40, 20])):
        members = labels == label
        alone, shares = clusters.kmeans(images[members], 2, "pixels")
        np.testing.assert_array_equal(classes[members], 2 * label + alone)
        np.testing.assert_allclose(frequencies[label], shares)
        np.testing.assert_allclose(sorted(frequencies[label]), sorted(np.array(sizes) / sum(sizes)),
                                   atol=1e-6)
        group_clusters = [set(alone[groups[members] == group].tolist())
                          for group in (2 * label, 2 * label + 1)]
        assert [len(c) for c in group_clusters] == [1, 1]  # each group's images share a cluster
        assert group_clusters[0] != group_clusters[1]  # and the two groups' clusters differ
    # The label with the fewest images (1: 20 without group 2) is refused before any k-means.
    monkeypatch.setattr(clusters, "kmeans", lambda *args: pytest.fail("k-means ran"))
    with pytest.raises(UserError, match="--clusters 21 is more than the 20 training images "
                       "of label 1"):
        clusters.kmeans_within_labels(images[groups != 2], labels[groups != 2], 2, 21,
                                      "pixels")


def test_training_classes_are_the_clusters_the_clusters_within_labels_or_the_labels():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 28, 28, 1)).astype(np.uint8)
    labels = np.arange(40) % 10
    for config, expected in (
            (Config(arch="seed", clusters=3), clusters.kmeans(images, 3, "pixels")),
            (Config(arch="seed", clusters=3, cluster_features="normalised"),
             clusters.kmeans(images, 3, "normalised")),
            (Config(arch="seed", conditional=True, clusters=2, cluster_features="normalised"),
             clusters.kmeans_within_labels(images, labels, 10, 2, "normalised")),
            (Config(arch="seed", conditional=True), (labels, None))):
        classes, frequencies = clusters.training_classes(config, images, labels)
        np.testing.assert_array_equal(classes, expected[0])
        if expected[1] is None:
            assert frequencies is None
        else:
            np.testing.assert_array_equal(frequencies, expected[1])


def test_normalised_features_group_digits_by_shape_not_by_ink():
    """Two overlapping shapes, each drawn bold and faint: on pixels the ink splits them,
    normalised the shape does. The normalised points are centred and of unit length."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 20, (80, 28, 28, 1)).astype(np.uint8)
    shapes, faint = np.arange(80) % 2, np.arange(80) % 4 >= 2
    for shape in (0, 1):
        images[shapes == shape, 7:14, 7 + 2 * shape:14 + 2 * shape] = 250
    images[faint] //= 10  # the same digits with a tenth of the ink
    points = np.asarray(clusters.cluster_points(images, "normalised"))
    np.testing.assert_allclose(points.mean(axis=1), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(points, axis=1), 1.0, rtol=1e-5)

    def clusters_are(assignments: np.ndarray, kinds: np.ndarray) -> bool:
        """Whether the two clusters are the two kinds, whatever their numbering."""
        return len(set(zip(kinds.tolist(), assignments.tolist()))) == 2

    by_pixels, _ = clusters.kmeans(images, 2, "pixels")
    by_shape, _ = clusters.kmeans(images, 2, "normalised")
    assert clusters_are(by_pixels, faint) and not clusters_are(by_pixels, shapes)
    assert clusters_are(by_shape, shapes) and not clusters_are(by_shape, faint)
    blank = clusters.cluster_points(np.zeros((2, 28, 28, 1), np.uint8), "normalised")
    assert np.isfinite(np.asarray(blank)).all()


@pytest.mark.parametrize("noise", ["normal", "uniform"])
def test_the_noise_draws_each_cluster_at_its_frequency(noise):
    frequencies = jnp.array([0.5, 0.0, 0.2, 0.3])
    bounds = clusters.cluster_bounds(frequencies, noise)
    first = sample_noise(jax.random.key(0), noise, (200_000, 1))[:, 0]
    drawn = np.bincount(np.asarray(clusters.draw_clusters(first, bounds)), minlength=4)
    np.testing.assert_allclose(drawn / len(first), frequencies, atol=0.005)
    assert drawn[1] == 0  # an empty cluster is never drawn


def test_a_clustered_generator_draws_its_cluster_from_the_first_noise_entry(real_batch):
    """...and its update needs the real batch's clusters."""
    config = Config(arch="seed", clusters=3)
    frequencies = np.array([0.2, 0.3, 0.5], np.float32)
    g_state, d_state = create_states(config, jax.random.key(0), frequencies)
    with pytest.raises(ValueError, match="trains on labelled batches"):
        train_step(g_state, d_state, real_batch, jax.random.key(1), config=config)
    bounds = g_state.constants["cluster_bounds"]
    np.testing.assert_allclose(bounds, [0.2, 0.5], rtol=1e-6)  # uniform noise: cumulative shares
    generator, discriminator = networks(config)
    assert (generator.num_classes, discriminator.num_classes) == (3, 3)
    noise = sample_noise(jax.random.key(1), "uniform", (64, 100))
    picked = clusters.draw_clusters(noise[:, 0], bounds)
    assert set(np.asarray(picked).tolist()) == {0, 1, 2}

    def draw(noise, labels=None):
        return generator.apply(g_state.variables, noise, train=False, labels=labels)

    np.testing.assert_array_equal(draw(noise), draw(noise, picked))
    # Given labels, the first entry only picks: it changes nothing else.
    moved = noise.at[:, 0].set(0.99)
    np.testing.assert_array_equal(draw(moved, picked), draw(noise, picked))
    assert float(jnp.abs(draw(noise, (picked + 1) % 3) - draw(noise, picked)).max()) > 1e-3


def test_a_conditional_clustered_generator_draws_a_cluster_of_the_digit_asked_for():
    """With --conditional --clusters k, G's classes are k clusters within each digit: given a
    digit, its noise's first entry picks one of that digit's clusters by their frequencies
    within it, and the update passes the class itself."""
    config = Config(arch="seed", conditional=True, clusters=3)
    frequencies = np.tile([0.2, 0.3, 0.5], (10, 1)).astype(np.float32)
    frequencies[7] = [0.0, 0.5, 0.5]
    g_state, _ = create_states(config, jax.random.key(0), frequencies)
    bounds = g_state.constants["cluster_bounds"]
    assert bounds.shape == (10, 2)
    np.testing.assert_allclose(bounds[7], [0.0, 0.5], atol=1e-6)
    generator, discriminator = networks(config)
    assert (generator.num_classes, discriminator.num_classes) == (30, 30)
    noise = sample_noise(jax.random.key(1), "uniform", (64, 100))
    digits = jnp.arange(64) % 10
    classes = 3 * digits + clusters.draw_clusters(noise[:, 0], bounds[digits])
    np.testing.assert_array_equal(classes // 3, digits)
    assert set(np.asarray(classes[digits == 7]).tolist()) == {22, 23}  # 7's cluster 0 is empty

    def draw(noise, **kwargs):
        return generator.apply(g_state.variables, noise, train=False, **kwargs)

    np.testing.assert_array_equal(draw(noise, labels=digits), draw(noise, classes=classes))
    assert float(jnp.abs(draw(noise, classes=(classes + 1) % 30)
                         - draw(noise, classes=classes)).max()) > 1e-3


def test_a_conditional_clustered_update_conditions_both_networks_on_the_classes(real_batch):
    """The update of --conditional --clusters takes each real digit's class (digit * k + its
    cluster), with mode seeking's pairs too: another cluster of the same digits changes
    both losses and G's new params."""
    config = Config(arch="seed", conditional=True, clusters=3, mode_seeking=0.5)
    g_state, d_state = create_states(config, jax.random.key(0),
                                     np.full((10, 3), 1 / 3, np.float32))
    step = jax.jit(functools.partial(train_step, config=config))
    digits = jnp.arange(64) % 10
    runs = [step(g_state, d_state, real_batch, jax.random.key(1), 3 * digits + cluster)
            for cluster in (0, 1)]
    for _, _, metrics in runs:
        assert all(np.isfinite(float(value)) for value in metrics.values())
    (g_first, _, first), (g_second, _, second) = runs
    assert float(first["d_loss"]) != float(second["d_loss"])
    assert float(first["g_loss"]) != float(second["g_loss"])
    assert not np.array_equal(g_first.params["Dense_0"]["kernel"],
                              g_second.params["Dense_0"]["kernel"])


def test_clusters_are_the_arch_s_unless_the_model_is_conditional():
    assert Config(arch="seed").clusters == 0
    assert (Config().cluster_features, Config(arch="seed").cluster_features) == (
        "normalised", "pixels")
    with pytest.raises(ConfigError, match="unknown 'edges'"):
        Config(cluster_features="edges")
    assert Config(arch="seed", clusters=8).label_count == 8
    assert Config(arch="seed", conditional=True).label_count == 10
    for name in ("seed", "dcgan", "small"):
        assert Config(arch=name, conditional=True).clusters == 0
    assert Config(arch="seed", conditional=True, clusters=8).label_count == 80
    with pytest.raises(ConfigError, match="must be 0 or at least 2, got 1"):
        Config(arch="seed", clusters=1)
    with pytest.raises(ConfigError, match="latent_dim must be at least 2 with --clusters, got 1"):
        Config(arch="seed", clusters=4, latent_dim=1)


def test_a_checkpoint_from_before_g_had_constants_restores(tmp_path):
    """Such a checkpoint stores G's state without a `constants` field: it reads as none."""
    config = Config(arch="seed")
    g_state, d_state = create_states(config, jax.random.key(0))
    ckpt = Checkpointer(tmp_path)
    old_g_state = {name: getattr(g_state, name)
                   for name in ("step", "params", "opt_state", "batch_stats", "ema_params")}
    ckpt._manager.save(7, args=ocp.args.Composite(
        g_state=ocp.args.StandardSave(old_g_state), d_state=ocp.args.StandardSave(d_state),
        config=ocp.args.JsonSave(config.to_json())))
    ckpt._manager.wait_until_finished()
    restored_g, restored_d = ckpt.restore(7, abstract_states(config))
    assert restored_g.constants == {}
    jax.tree.map(np.testing.assert_array_equal, (restored_g.params, restored_g.ema_params,
                                                 restored_d.params),
                 (g_state.params, g_state.ema_params, d_state.params))
    assert ckpt.restore_generator(7, abstract_states(config)).variables.keys() == {
        "params", "batch_stats"}


def test_a_checkpoint_from_before_cluster_features_clustered_pixels_and_resumes_only_so():
    """Its config has no `cluster_features`: it reads as 'pixels', what every run clustered
    then, and a run that asks for `fast`'s new default is refused rather than resumed on other
    clusters."""
    saved = Config().to_json()
    del saved["cluster_features"]
    old = Config.from_json(saved)
    assert (old.arch, old.clusters, old.cluster_features) == ("fast", 300, "pixels")
    with pytest.raises(UserError, match="cluster_features='pixels' but this run asks for "
                                        "cluster_features='normalised'"):
        Config().check_resumable_with(old)
    Config(cluster_features="pixels").check_resumable_with(old)


def test_a_checkpoint_of_fast_on_200_clusters_reads_as_200_and_the_default_does_not_resume_it():
    """`fast` drew 200 clusters until it took 300: such a checkpoint's saved config builds
    G's and D's 200-row embeddings, and the default, on 300, refuses to resume it."""
    old = Config.from_json({**Config().to_json(), "clusters": 200})
    g_state, d_state = abstract_states(old)
    assert [state.params["Embed_0"]["embedding"].shape[0] for state in (g_state, d_state)] == [
        200, 200]
    assert Config().clusters == 300
    with pytest.raises(UserError, match="trained with clusters=200 but this run asks for "
                                        "clusters=300"):
        Config().check_resumable_with(old)
    Config(clusters=200).check_resumable_with(old)
