"""Digitscape JAX: a DCGAN that learns to write MNIST digits, in JAX and Flax."""

import os

from digitscape_jax import xla_flags

xla_flags.apply()  # Before anything starts JAX's backends.
# TensorFlow (tf.data and tfds only: no TF math runs here) prints routine C++ notices on
# stderr at import, oneDNN's among them; turn those off, before anything imports it, so a
# user error stays one line. Warnings and errors still show.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
