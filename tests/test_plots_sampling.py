"""Grids are laid out exactly; sampling is batched, bounded and reproducible."""

from __future__ import annotations

import jax
import numpy as np
from PIL import Image

from digitscape_jax.config import Config
from digitscape_jax.plots import GRID_BACKGROUND, GRID_PAD, grid_shape, image_grid, save_grid
from digitscape_jax.sampling import generate, to_uint8
from digitscape_jax.steps import create_states


def test_grid_places_each_tile_row_by_row(tmp_path):
    tiles = np.arange(5 * 28 * 28, dtype=np.uint32).reshape(5, 28, 28, 1).astype(np.uint8)
    grid = image_grid(tiles, 2, 3)
    assert grid.shape == (2 * 28 + GRID_PAD, 3 * 28 + 2 * GRID_PAD)
    step = 28 + GRID_PAD
    for i in range(5):
        r, c = divmod(i, 3)
        np.testing.assert_array_equal(grid[r * step: r * step + 28, c * step: c * step + 28],
                                      tiles[i, ..., 0])
    assert (grid[28:28 + GRID_PAD] == GRID_BACKGROUND).all()  # the gap between rows
    assert (grid[step:, 2 * step:] == GRID_BACKGROUND).all()  # the empty sixth cell
    np.testing.assert_array_equal(np.asarray(Image.open(save_grid(tmp_path / "g.png", tiles, 2, 3))),
                                  grid)


def test_grid_shape_is_as_square_as_possible():
    assert [grid_shape(n) for n in (1, 10, 16, 50, 100)] == [(1, 1), (3, 4), (4, 4), (7, 8), (10, 10)]


def test_to_uint8_maps_the_tanh_range_onto_pixels():
    out = to_uint8(jax.numpy.array([-1.0, -0.5, 0.0, 1.0, 1.5]).reshape(1, 5, 1))
    np.testing.assert_array_equal(out, [[0, 64, 128, 255, 255]])


def test_generate_in_batches_is_reproducible_and_batch_sized():
    config = Config(arch="seed")
    g_state, _ = create_states(config, jax.random.key(0))
    variables = {"params": g_state.params, "batch_stats": g_state.batch_stats}
    images = generate(config, variables, jax.random.key(1), 25, batch_size=10)
    assert images.shape == (25, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, generate(config, variables, jax.random.key(1), 25, batch_size=10))
    # Each batch has its own noise, and the first batches do not depend on the total.
    np.testing.assert_array_equal(images[:20], generate(config, variables, jax.random.key(1), 20, batch_size=10))
    assert not np.array_equal(images[:10], images[10:20])


def test_the_shipped_generator_draws_the_digit_asked_for_without_training():
    """README's first sampling command: demo/model/generator.msgpack, the demo's generator as
    `sample.py --export` writes it, draws 7s that the evaluator's classifier reads as 7s."""
    from pathlib import Path

    from digitscape_jax import classifier
    from digitscape_jax.sampling import class_labels, load_generator

    shipped = Path(__file__).resolve().parents[1] / "demo" / "model" / "generator.msgpack"
    config, variables, step = load_generator(shipped)
    assert config.conditional and step > 0
    digits = generate(config, variables, jax.random.key(0), 200,
                      labels=class_labels(config, 200, digit=7))
    assert digits.shape == (200, 28, 28) and digits.dtype == np.uint8
    predicted = classifier.classify(classifier.load(), digits)[1].argmax(1)
    assert np.mean(predicted == 7) >= 0.9
