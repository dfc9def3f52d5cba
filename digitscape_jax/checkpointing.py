"""Orbax checkpoints of both train states, with the run's config as JSON beside them.

Each step is its own directory, written to a temporary name and renamed when
complete, so a crash mid-save never leaves a checkpoint that looks whole.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax.training import train_state

from digitscape_jax.config import Config
from digitscape_jax.errors import UserError
from digitscape_jax.steps import GeneratorState, create_states

KEEP_LAST = 3
MAX_ERROR_CHARS = 200  # tensorstore's messages run to kilobytes on one line.


def _is_closed_loop_report(unraisable: Any) -> bool:
    return (unraisable.exc_type is RuntimeError
            and "Event loop is closed" in str(unraisable.exc_value))


def _silence_late_read_callbacks() -> None:
    """Drops the "Event loop is closed" reports of reads still in flight after a failed restore.

    When one array of a checkpoint is unreadable, orbax closes its event loop at
    once; tensorstore then completes the other reads and reports each to the
    closed loop through `sys.unraisablehook`, as a traceback. That is noise:
    the failure itself is raised, and reported as one line.
    """
    default_hook = sys.unraisablehook
    if getattr(default_hook, "silences_closed_loop", False):
        return

    def hook(unraisable: Any) -> None:
        if not _is_closed_loop_report(unraisable):
            default_hook(unraisable)

    hook.silences_closed_loop = True
    sys.unraisablehook = hook


def abstract_states(config: Config, sharding: jax.sharding.Sharding | None = None) -> Any:
    """Shapes and dtypes of (g_state, d_state) for `config`, computed without running anything."""
    abstract = jax.eval_shape(lambda: create_states(config, jax.random.key(0)))
    if sharding is None:
        return abstract
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)


class Checkpointer:
    """The checkpoints in one directory: save, list, and restore them."""

    def __init__(self, directory: str | Path, read_only: bool = False):
        self.directory = Path(directory).absolute()
        if read_only and not self.directory.is_dir():
            problem = "is not a directory" if self.directory.exists() else "does not exist"
            raise UserError(f"checkpoint directory {directory} {problem}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else KEEP_LAST, save_interval_steps=0 if read_only else 1,
            create=not read_only, read_only=read_only,
            enable_async_checkpointing=False,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, g_state: GeneratorState, d_state: train_state.TrainState,
             config: Config) -> None:
        """Writes step `step`; a step that is already on disk is left as it is."""
        if step in self.all_steps():
            return
        self._manager.save(step, args=ocp.args.Composite(
            g_state=ocp.args.StandardSave(g_state),
            d_state=ocp.args.StandardSave(d_state),
            config=ocp.args.JsonSave(config.to_json()),
        ))
        self._manager.wait_until_finished()

    def resolve_step(self, step: int | None) -> int:
        """`step`, or the latest one when None; a clear error when there is none."""
        steps = self.all_steps()
        if not steps:
            raise UserError(f"{self.directory} holds no checkpoint")
        if step is None:
            return max(steps)
        if step not in steps:
            raise UserError(f"{self.directory} has no checkpoint at step {step}; it has {steps}")
        return step

    def _restore(self, step: int, **items: ocp.args.CheckpointArgs) -> Any:
        """Reads the named items of one step; any failure to read is the checkpoint's fault."""
        _silence_late_read_callbacks()
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax and tensorstore raise many types for unreadable data
            message = textwrap.shorten(str(e) or type(e).__name__, MAX_ERROR_CHARS)
            raise UserError(f"checkpoint {self.directory / str(step)} is unreadable: {message}") from None

    def load_config(self, step: int) -> Config:
        return Config.from_json(self._restore(step, config=ocp.args.JsonRestore())["config"])

    def restore(self, step: int, abstract: Any) -> tuple[GeneratorState, train_state.TrainState]:
        """Both states at `step`, laid out like `abstract` (see `abstract_states`)."""
        g_abstract, d_abstract = abstract
        restored = self._restore(step, g_state=ocp.args.StandardRestore(g_abstract),
                                 d_state=ocp.args.StandardRestore(d_abstract))
        return restored["g_state"], restored["d_state"]

    def restore_generator(self, step: int, abstract: Any) -> GeneratorState:
        """G's state alone, for sampling."""
        g_abstract, _ = abstract
        return self._restore(step, g_state=ocp.args.StandardRestore(g_abstract))["g_state"]
