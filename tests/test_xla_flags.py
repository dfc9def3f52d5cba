"""The project's XLA:CPU flags are set, and never override the user's own; a program
compiled to run once computes what an optimised one does."""

from __future__ import annotations

import functools
import importlib.metadata

import jax
import numpy as np
import pytest

from digitscape_jax import steps, xla_flags
from digitscape_jax.config import Config


def test_flags_are_added_for_the_measured_jaxlib(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.10.7")
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    xla_flags.apply()
    assert xla_flags.os.environ["XLA_FLAGS"] == (
        "--xla_dump_to=/tmp/x --xla_cpu_experimental_ynn_fusion_type=")


def test_a_users_value_wins(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.10.2")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
    xla_flags.apply()
    assert xla_flags.os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"


def test_unmeasured_releases_get_no_flags(monkeypatch):
    # An unknown flag would abort XLA, so a newer jaxlib is left alone.
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.11.0")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    xla_flags.apply()
    assert "XLA_FLAGS" not in xla_flags.os.environ


@pytest.mark.parametrize("conditional", [False, True])  # clusters' bounds; a label embedding
def test_a_run_once_program_computes_the_same_bits_as_an_optimised_one(conditional):
    """The initialisation, compiled without XLA:CPU's costliest optimisations, draws the same
    params."""
    initialise = functools.partial(steps._create_states, Config(arch="fast",
                                                                conditional=conditional))
    key = jax.random.key(3)
    once = xla_flags.jit_run_once(initialise)(key, None)
    optimised = jax.jit(initialise)(key, None)
    assert len(jax.tree.leaves(once)) > 20
    jax.tree.map(np.testing.assert_array_equal, once, optimised)
