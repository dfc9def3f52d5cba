"""Digitscape JAX: a DCGAN that learns to write MNIST digits, in JAX and Flax."""

from digitscape_jax import xla_flags

xla_flags.apply()  # Before anything starts JAX's backends.
