"""The project's XLA:CPU flags are set, and never override the user's own."""

from __future__ import annotations

import importlib.metadata

from digitscape_jax import xla_flags


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
