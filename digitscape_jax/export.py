"""The trained generator on its own, as the original's `generator.h5` was.

Three forms: a msgpack file of G's variables and config, which `sample.py` loads
without Orbax or any optimizer state; a TensorFlow SavedModel, through jax2tf,
to serve the generator; and an ONNX model, through jax2onnx, for ONNX Runtime
(in Python, or in a browser with onnxruntime-web: demo/).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
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


def not_an_export(path: Path) -> UserError:
    """The error for a file that `load_msgpack` cannot read, saying what it reads instead."""
    if path.suffix == ".onnx":
        return UserError(f"{path} is an ONNX model, for the browser demo (demo/) and "
                         "onnxruntime; sample.py reads a --ckpt-dir, or the .msgpack that "
                         "`sample.py --export` writes")
    return UserError(f"{path} is not a generator export: expected a --ckpt-dir, or a .msgpack "
                     "written by `sample.py --export`")


def load_msgpack(path: str | Path) -> tuple[Config, dict[str, Any], int]:
    """Reads a file written by `save_msgpack`: (config, variables, step), all checked."""
    path = Path(path)
    data = path.read_bytes()  # outside the try: a file that cannot be read says why
    try:
        payload = serialization.msgpack_restore(data)
    except Exception:  # msgpack raises several types for damaged data, none worth showing
        raise not_an_export(path) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise not_an_export(path)
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


def inference(config: Config, variables: Any) -> Callable[..., jax.Array]:
    """G's plain forward pass in inference mode (BatchNorm with its running statistics):
    `f(noise)`, or `f(noise, labels)` for a conditional G, -> images in [-1, 1]."""
    generator, _ = networks(config)
    variables = jax.device_get(variables)
    return lambda noise, *labels: generator.apply(variables, noise, train=False,
                                                  labels=labels[0] if labels else None)


def save_savedmodel(directory: str | Path, config: Config, variables: Any) -> Path:
    """Writes G as a SavedModel whose `generate(noise)` maps (N, latent_dim) noise to
    (N, 28, 28, 1) images in [-1, 1], for any N; a conditional G's is
    `generate(noise, labels)`, with (N,) int32 labels."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    signature = [tf.TensorSpec([None, config.latent_dim], tf.float32, name="noise")]
    shapes = [f"(batch, {config.latent_dim})"]
    if config.conditional:
        signature.append(tf.TensorSpec([None], tf.int32, name="labels"))
        shapes.append("(batch,)")
    generate = jax2tf.convert(inference(config, variables), polymorphic_shapes=shapes,
                              with_gradient=False)
    module = tf.Module()
    module.generate = tf.function(generate, autograph=False, input_signature=signature)

    def write(partial: Path) -> None:
        try:
            tf.saved_model.save(module, str(partial),
                                signatures={"serving_default": module.generate})
        except tf.errors.OpError as e:  # TensorFlow's own file errors, not OSError
            raise UserError(f"cannot write the SavedModel to {directory}: {e.message}") from None

    return replace_directory(directory, write)


# jax2onnx declares orbax-checkpoint<0.11.37 and the libraries of its other front-ends, none of
# which its converter imports: it is installed without them (requirements-onnx.txt).
ONNX_INSTALL = ("pip install onnx onnx-ir onnxruntime && "
                "pip install --no-deps -r requirements-onnx.txt")


def onnx_description(config: Config, step: int) -> dict[str, Any]:
    """What `save_onnx` writes beside the model: how to feed it (with `clusters`, the noise's
    first entry picks a cluster), and which run it comes from."""
    return {"format": "digitscape-onnx", "arch": config.arch, "conditional": config.conditional,
            "clusters": config.clusters, "latent_dim": config.latent_dim,
            "noise": config.network.noise, "step": step}


@contextlib.contextmanager
def _quiet_converter() -> Iterator[None]:
    """Hides the converter's routine warnings: jax2onnx logs a traceback for each of its
    plugins for other libraries (Equinox, dm-pix) that are not installed."""
    loggers = [logging.getLogger(name) for name in ("jax2onnx", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def save_onnx(path: str | Path, config: Config, variables: Any, step: int) -> Path:
    """Writes G as an ONNX model that maps `noise` (N, latent_dim) float32 (and, for a
    conditional G, `labels` (N,) int32) to `images` (N, 28, 28, 1) in [-1, 1], for any N;
    and beside it, under the same name with `.json`, its `onnx_description`."""
    path = Path(path)
    try:
        from jax2onnx import to_onnx
    except ImportError:
        raise UserError(f"the ONNX export needs jax2onnx: {ONNX_INSTALL}") from None
    (batch,) = jax.export.symbolic_shape("N")
    inputs = [jax.ShapeDtypeStruct((batch, config.latent_dim), jnp.float32)]
    if config.conditional:
        inputs.append(jax.ShapeDtypeStruct((batch,), jnp.int32))
    with _quiet_converter():
        model = to_onnx(inference(config, variables), inputs, model_name="digitscape_generator",
                        input_names=["noise", "labels"][:len(inputs)], output_names=["images"])
    # Shape hints on intermediate values are optional, and some of jax2onnx's are stale
    # (NHWC where its layout pass made the tensor NCHW), which ONNX Runtime warns about.
    del model.graph.value_info[:]
    write_atomically(path, model.SerializeToString())
    description = json.dumps(onnx_description(config, step), indent=2) + "\n"
    write_atomically(path.with_suffix(".json"), description.encode())
    return path
