"""The trained generator on its own, as the original's `generator.h5` was.

Two forms: a msgpack file of G's variables and config, which `sample.py` loads
without Orbax or any optimizer state; and a TensorFlow SavedModel, through
jax2tf, to serve the generator or convert it to TF.js or TFLite.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization

from digitscape_jax.config import Config
from digitscape_jax.errors import UserError
from digitscape_jax.files import replace_directory, write_atomically
from digitscape_jax.models import networks
from digitscape_jax.steps import abstract_states

FORMAT = "digitscape-generator"
VERSION = 1


def save_msgpack(path: str | Path, config: Config, variables: Any, step: int) -> Path:
    """Writes G's variables, config and step to one msgpack file, atomically."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "config": json.dumps(config.to_json()),
        "variables": serialization.to_state_dict(jax.device_get(variables)),
    }
    return write_atomically(path, serialization.msgpack_serialize(payload))


def load_msgpack(path: str | Path) -> tuple[Config, dict[str, Any], int]:
    """Reads a file written by `save_msgpack`: (config, variables, step), all checked."""
    path = Path(path)
    try:
        payload = serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # msgpack raises several types for damaged data
        raise UserError(f"{path} is not a generator export: {type(e).__name__}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not a generator export")
    if payload.get("version") != VERSION:
        raise UserError(f"{path} is export version {payload.get('version')}; this reads {VERSION}")
    try:
        config = Config.from_json(json.loads(payload["config"]))
        variables, step = payload["variables"], int(payload["step"])
    except (KeyError, TypeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"{path} is a damaged generator export ({type(e).__name__}: {e})") from None
    expected = abstract_states(config)[0].variables
    try:
        shapes_match = jax.tree.all(jax.tree.map(
            lambda want, got: want.shape == np.shape(got) and want.dtype == np.asarray(got).dtype,
            expected, variables))
    except ValueError:  # a different tree structure
        shapes_match = False
    if not shapes_match:
        raise UserError(f"{path}: its variables do not fit its {config.arch} config")
    return config, variables, step


def save_savedmodel(directory: str | Path, config: Config, variables: Any) -> Path:
    """Writes G as a SavedModel whose `generate(noise)` maps (N, latent_dim) noise to
    (N, 28, 28, 1) images in [-1, 1], for any N; a conditional G's is
    `generate(noise, labels)`, with (N,) int32 labels."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    generator, _ = networks(config)
    variables = jax.device_get(variables)
    signature = [tf.TensorSpec([None, config.latent_dim], tf.float32, name="noise")]
    shapes = [f"(batch, {config.latent_dim})"]
    if config.conditional:
        signature.append(tf.TensorSpec([None], tf.int32, name="labels"))
        shapes.append("(batch,)")
    generate = jax2tf.convert(
        lambda noise, *labels: generator.apply(variables, noise, train=False,
                                               labels=labels[0] if labels else None),
        polymorphic_shapes=shapes, with_gradient=False)
    module = tf.Module()
    module.generate = tf.function(generate, autograph=False, input_signature=signature)

    def write(partial: Path) -> None:
        try:
            tf.saved_model.save(module, str(partial),
                                signatures={"serving_default": module.generate})
        except tf.errors.OpError as e:  # TensorFlow's own file errors, not OSError
            raise UserError(f"cannot write the SavedModel to {directory}: {e.message}") from None

    return replace_directory(directory, write)
