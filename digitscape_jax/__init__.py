"""Digitscape JAX: a DCGAN that learns to write MNIST digits, in JAX and Flax."""
