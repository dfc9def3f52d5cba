"""sample.py --export-onnx: the ONNX generator computes what the JAX one does, at any batch size."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from digitscape_jax import cli
from digitscape_jax.checkpointing import Checkpointer
from digitscape_jax.config import Config
from digitscape_jax.models import networks, sample_noise
from digitscape_jax.steps import GeneratorState, create_states

import sample

TOLERANCE = 1e-4  # max abs difference from the JAX generator, in [-1, 1]


def checkpoint(directory: Path, conditional: bool, clusters: int = 0
               ) -> tuple[Config, GeneratorState]:
    """Writes a `seed` checkpoint whose moving average differs from the trained weights, with
    BatchNorm statistics far from their initial (0, 1), so that each one shows in the output
    (and, with clusters, unequal cluster frequencies); returns its config and G's state."""
    config = Config(arch="seed", conditional=conditional, clusters=clusters)
    shares = np.linspace(1.0, 2.0, clusters) / np.linspace(1.0, 2.0, clusters).sum()
    # Within each digit: a row of its own, so that a digit read from another's row shows.
    frequencies = np.stack([np.roll(shares, d) for d in range(10)]) if conditional else shares
    g_state, d_state = create_states(config, jax.random.key(0), frequencies if clusters else None)
    leaves, tree = jax.tree.flatten(g_state.batch_stats)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    stats = [jax.random.uniform(k, x.shape, minval=0.5, maxval=1.5) for k, x in zip(keys, leaves)]
    g_state = g_state.replace(batch_stats=jax.tree.unflatten(tree, stats),
                              ema_params=jax.tree.map(lambda p: 0.5 * p, g_state.params))
    Checkpointer(directory).save(1, g_state, d_state, config)
    return config, g_state


@pytest.mark.parametrize("conditional, clusters, raw",
                         [(False, 0, False), (True, 0, True), (False, 5, False),
                          (True, 3, False)],
                         ids=["unconditional-ema", "conditional-raw", "clustered-ema",
                              "conditional-clustered-ema"])
def test_onnx_export_matches_the_jax_generator(tmp_path, conditional, clusters, raw):
    import onnxruntime

    ckpt = tmp_path / "ckpt"
    config, g_state = checkpoint(ckpt, conditional, clusters)
    variables, other_variables = g_state.variables, g_state.ema_variables
    if not raw:
        variables, other_variables = other_variables, variables
    path = tmp_path / "g.onnx"
    assert cli.run(sample.main, ["--ckpt", str(ckpt), "--export-onnx", str(path),
                                 *(["--raw"] if raw else [])]) == 0
    assert json.loads(path.with_suffix(".json").read_text()) == {
        "format": "digitscape-onnx", "arch": "seed", "conditional": conditional,
        "clusters": clusters, "latent_dim": 100, "noise": "uniform", "step": 1}
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["noise", "labels"][:1 + conditional]
    assert session.get_inputs()[0].shape == ["N", 100]  # any batch size
    generator = networks(config)[0]
    errors = []
    for n in (1, 7):
        noise = np.array(sample_noise(jax.random.key(n), "uniform", (n, 100)))
        if clusters:  # first entries spread over the clusters' bounds
            noise[:, 0] = np.linspace(0.05, 0.95, n)
        feeds = {"noise": noise}
        labels = None
        if conditional:
            labels = feeds["labels"] = np.arange(n, dtype=np.int32) % 10
        (got,) = session.run(None, feeds)
        expected = np.asarray(generator.apply(variables, noise, train=False, labels=labels))
        assert got.shape == (n, 28, 28, 1) and got.dtype == np.float32
        errors.append(float(np.abs(got - expected).max()))
        # The weights exported are the ones asked for: the other set draws other digits.
        other = np.asarray(generator.apply(other_variables, noise, train=False, labels=labels))
        assert np.abs(other - expected).max() > 100 * TOLERANCE
    print(f"ONNX vs JAX, max abs error at batch 1 and 7: {errors}")
    assert max(errors) <= TOLERANCE


def test_export_onnx_needs_an_onnx_name(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample.parse_args(["--ckpt", str(tmp_path), "--export-onnx", str(tmp_path / "g.json")])
    assert exit_info.value.code == 2
    assert "must name a .onnx file" in capsys.readouterr().err
