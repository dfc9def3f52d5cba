"""The demo page (demo/), in headless Chromium: it draws what ONNX Runtime computes for its
noise, draws the digit picked, and says so when its model is missing or damaged.

Needs Debian's chromium, Playwright for Python and `npm ci --prefix demo` (.ci/run installs
all three); without them these tests fail, never skip.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from conftest import REPO
from demo import browser
from demo.serve import SHIPPED_MODEL as SHIPPED
from digitscape_jax import cli
from digitscape_jax.checkpointing import Checkpointer
from digitscape_jax.config import Config
from digitscape_jax.steps import create_states

import sample

pytestmark = pytest.mark.slow  # Chromium, and the npm packages the page loads

ROWS = COLS = 10  # the page's grid (demo/demo.js)
DIRECTIONS = 3  # its sliders
SIDE = 28
GREY_TOLERANCE = 2  # levels of 255, between the page's pixels and ONNX Runtime's in Python
MIN_PICKED = 0.9  # of the digits drawn after picking one, the classifier reads as that one
SEED = 20_251_202
MASK = 0xFFFFFFFF


def mulberry32(seed: int) -> Iterator[float]:
    """demo/noise.js's PRNG: uniform draws in [0, 1)."""
    a = seed & MASK
    while True:
        a = (a + 0x6D2B79F5) & MASK
        t = ((a ^ (a >> 15)) * (1 | a)) & MASK
        t = ((t + ((t ^ (t >> 7)) * (61 | t))) & MASK) ^ t
        yield ((t ^ (t >> 14)) & MASK) / 2**32


def draw_noise(stream: Iterator[float], kind: str, count: int) -> np.ndarray:
    """demo/noise.js's drawNoise: `count` float32 values from the stream, one draw per value
    for uniform noise, two (Box-Muller) for normal."""
    draws = np.fromiter(stream, np.float64, count * (1 if kind == "uniform" else 2))
    if kind == "normal":
        draws = np.sqrt(-2 * np.log(1 - draws[0::2])) * np.cos(2 * np.pi * draws[1::2])
    return draws.astype(np.float32)


def page_noise(seed: int, kind: str, latent_dim: int) -> np.ndarray:
    """The grid's noise on first drawing at ?seed=seed, (ROWS * COLS, latent_dim) float32."""
    return page_noise_and_directions(seed, kind, latent_dim)[0]


def page_noise_and_directions(seed: int, kind: str, latent_dim: int
                              ) -> tuple[np.ndarray, np.ndarray]:
    """The grid's first noise, and the sliders' unit directions (DIRECTIONS, latent_dim)
    float32, drawn next from the same stream (demo/README.md)."""
    stream = mulberry32(seed)
    noise = draw_noise(stream, kind, ROWS * COLS * latent_dim).reshape(-1, latent_dim)
    directions = draw_noise(stream, "normal", DIRECTIONS * latent_dim).reshape(-1, latent_dim)
    norms = np.sqrt(np.sum(directions.astype(np.float64) ** 2, axis=1, keepdims=True))
    return noise, (directions / norms).astype(np.float32)


def expected_digits(model: Path, noise: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    """uint8 digits (N, 28, 28) from ONNX Runtime in Python, rounded as the page rounds."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    feeds = {"noise": noise, **({} if labels is None else {"labels": labels})}
    (images,) = session.run(None, feeds)
    return np.clip(np.floor((images[..., 0].astype(np.float64) + 1) * 127.5 + 0.5), 0, 255)


def canvas_digits(page: Any) -> np.ndarray:
    """The grid's pixels, as (ROWS * COLS, 28, 28) grey levels; checks that they are grey and
    opaque."""
    grey, opaque_grey = page.evaluate("""() => {
        const canvas = document.getElementById('grid');
        const rgba = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        let text = '', ok = true;
        for (let i = 0; i < rgba.length; i += 4) {
            text += String.fromCharCode(rgba[i]);
            ok = ok && rgba[i] === rgba[i + 1] && rgba[i] === rgba[i + 2] && rgba[i + 3] === 255;
        }
        return [btoa(text), ok];
    }""")
    assert opaque_grey
    pixels = np.frombuffer(base64.b64decode(grey), np.uint8)
    grid = pixels.reshape(ROWS, SIDE, COLS, SIDE).transpose(0, 2, 1, 3)
    return grid.reshape(ROWS * COLS, SIDE, SIDE)


def changed(digits: np.ndarray, before: np.ndarray) -> float:
    """The fraction of digits that differ from those drawn before."""
    return float((digits != before).any(axis=(1, 2)).mean())


def renders(page: Any) -> int:
    return int(page.locator("#grid").get_attribute("data-renders"))


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    with browser.chromium() as instance:
        yield instance


@pytest.fixture(scope="module")
def shipped_page(chromium) -> Iterator[Any]:
    """The page with the shipped model at ?seed=SEED, its first grid drawn."""
    with browser.serve() as url:
        page = chromium.new_page()
        page.goto(f"{url}?seed={SEED}")
        browser.wait_for_renders(page, 1)
        yield page
        page.close()


def test_the_grid_is_what_onnxruntime_draws_for_the_same_seed(shipped_page):
    info = json.loads(SHIPPED.with_suffix(".json").read_text())
    model_line = shipped_page.locator("#model").text_content()
    assert f"arch {info['arch']}" in model_line and f"{info['step']:,} steps" in model_line
    assert f"FD {info['fd']:.2f}" in model_line and f"IS {info['is']:.2f}" in model_line
    assert f"{info['space']} feature space" in model_line  # the figures the project states
    assert shipped_page.locator("#seed").text_content() == str(SEED)
    for kind in ("uniform", "normal"):  # the page's noise.js, drawn in the page
        drawn = shipped_page.evaluate(
            "([seed, kind]) => Array.from(drawNoise(mulberry32(seed), kind, 1000))", [SEED, kind])
        np.testing.assert_allclose(drawn, page_noise(SEED, kind, 10).reshape(-1)[:1000],
                                   rtol=1e-6, atol=1e-6)
    noise = page_noise(SEED, info["noise"], info["latent_dim"])
    labels = (np.arange(ROWS * COLS, dtype=np.int32) // COLS) if info["conditional"] else None
    expected = expected_digits(SHIPPED, noise, labels)
    got = canvas_digits(shipped_page)
    difference = int(np.abs(got.astype(int) - expected).max())
    print(f"page vs onnxruntime in Python: max difference {difference} grey levels")
    assert difference <= GREY_TOLERANCE
    assert got.std() > 20  # digits, not a blank or uniform grid


def test_picking_a_digit_draws_that_digit(shipped_page):
    from digitscape_jax import classifier

    assert json.loads(SHIPPED.with_suffix(".json").read_text())["conditional"]
    params = classifier.load(classifier.WEIGHTS)
    read_as = {}
    for digit in range(10):
        before = renders(shipped_page)
        shipped_page.click(f"#picker button[data-digit='{digit}']")
        browser.wait_for_renders(shipped_page, before + 1)
        _, logits = classifier.classify(params, canvas_digits(shipped_page),
                                        batch_size=ROWS * COLS)
        read_as[digit] = float(np.mean(logits.argmax(1) == digit))
    print(f"digits read as the one picked: {read_as}")
    assert min(read_as.values()) >= MIN_PICKED, read_as
    shipped_page.click("#picker button[data-digit='all']")


def test_new_digits_the_walk_and_the_sliders_redraw(shipped_page):
    def redraw(action) -> np.ndarray:
        before = renders(shipped_page)
        action()
        browser.wait_for_renders(shipped_page, before + 1)
        return canvas_digits(shipped_page)

    first = canvas_digits(shipped_page)
    fresh = redraw(lambda: shipped_page.click("#new"))
    assert changed(fresh, first) > 0.9
    moved = redraw(lambda: shipped_page.fill("#direction0", "3"))
    assert changed(moved, fresh) > 0.5
    assert shipped_page.locator("#direction0-value").text_content() == "3.0"
    shipped_page.click("#walk")
    start = renders(shipped_page)
    browser.wait_for_renders(shipped_page, start + 3)  # the walk redraws on its own
    shipped_page.click("#walk")
    assert shipped_page.locator("#walk").get_attribute("aria-pressed") == "false"


@pytest.fixture(scope="module")
def clustered_model(tmp_path_factory) -> Path:
    """A self-conditioned `seed` generator on 5 clusters of unequal shares, exported to ONNX
    with its description; its cluster embedding is scaled up, so that each cluster draws
    visibly other digits (at initialisation they differ by a grey level)."""
    config = Config(arch="seed", clusters=5)
    shares = np.linspace(1.0, 2.0, 5) / np.linspace(1.0, 2.0, 5).sum()
    g_state, d_state = create_states(config, jax.random.key(0), shares)
    params = dict(g_state.ema_params)
    params["Embed_0"] = {"embedding": 50 * params["Embed_0"]["embedding"]}
    directory = tmp_path_factory.mktemp("clustered")
    Checkpointer(directory / "ckpt").save(1, g_state.replace(ema_params=params), d_state, config)
    model = directory / "g.onnx"
    assert cli.run(sample.main, ["--ckpt", str(directory / "ckpt"),
                                 "--export-onnx", str(model)]) == 0
    return model


def test_the_sliders_keep_each_digits_cluster(chromium, clustered_model):
    """A self-conditioned G's first noise value picks the digit's cluster: a slider moves
    every other value, so each digit keeps its kind and changes its style."""
    info = json.loads(clustered_model.with_suffix(".json").read_text())
    assert info["clusters"] == 5 and info["noise"] == "uniform"
    noise, directions = page_noise_and_directions(SEED, "uniform", info["latent_dim"])
    slider = int(np.argmax(np.abs(directions[:, 0])))  # the one that moves the first value most
    moved = (noise + 3 / np.sqrt(12) * directions[slider].astype(np.float64)).astype(np.float32)
    kept = moved.copy()
    kept[:, 0] = noise[:, 0]
    expected = expected_digits(clustered_model, kept, None)
    # Moved too, the first value would take some digits to other clusters: the check can fail.
    other_clusters = np.abs(expected_digits(clustered_model, moved, None) - expected)
    assert np.mean(other_clusters.max(axis=(1, 2)) > 10 * GREY_TOLERANCE) > 0.03
    with browser.serve(clustered_model) as url:
        page = chromium.new_page()
        page.goto(f"{url}?seed={SEED}")
        browser.wait_for_renders(page, 1)
        page.fill(f"#direction{slider}", "3")
        browser.wait_for_renders(page, 2)
        difference = int(np.abs(canvas_digits(page).astype(int) - expected).max())
        page.close()
    assert difference <= GREY_TOLERANCE


def error_shown(page: Any) -> str:
    page.wait_for_selector("#status.error", timeout=browser.READY_MS)
    assert page.locator("#app").is_hidden()
    return page.locator("#status").text_content()


def test_a_missing_or_damaged_model_is_a_message_not_a_blank_page(chromium, tmp_path):
    model = tmp_path / "g.onnx"
    shutil.copy(SHIPPED, model)
    shutil.copy(SHIPPED.with_suffix(".json"), model.with_suffix(".json"))
    with browser.serve(model) as url:
        page = chromium.new_page()
        model.unlink()
        page.goto(url)
        assert "model model/generator.onnx is missing (HTTP 404)" in error_shown(page)
        model.write_bytes(b"this is not an ONNX model")
        page.reload()
        assert "ONNX Runtime cannot load the model model/generator.onnx" in error_shown(page)
        model.with_suffix(".json").write_text("{")
        page.reload()
        assert "model/generator.json is not valid JSON" in error_shown(page)
        page.close()


def test_serve_says_what_is_missing(tmp_path):
    shutil.copy(REPO / "demo" / "serve.py", tmp_path / "serve.py")  # a demo/ without node_modules
    result = subprocess.run([sys.executable, str(tmp_path / "serve.py"), "--port", "0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "run npm ci in demo/" in result.stderr
    result = subprocess.run([sys.executable, str(REPO / "demo" / "serve.py"), "--port", "0",
                             "--model", str(tmp_path / "none.onnx")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "none.onnx not found" in result.stderr
