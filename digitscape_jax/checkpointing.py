"""Orbax checkpoints of both train states, with the run's config as JSON beside them.

Each step is its own directory, written to a temporary name and renamed when
complete, so a crash mid-save never leaves a checkpoint that looks whole.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO, TypeVar

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax.training import train_state

from digitscape_jax import parallel
from digitscape_jax.config import ARCHS, Config
from digitscape_jax.errors import CorruptCheckpoint, UserError
from digitscape_jax.steps import GeneratorState

KEEP_LAST = 3
LOCK_FILE = "train.lock"
T = TypeVar("T")
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


# Failures of the machine rather than of the data, by type and by tensorstore's status codes.
MACHINE_FAILURES = (MemoryError, PermissionError, TimeoutError, ConnectionError,
                    jax.errors.JaxRuntimeError)
MACHINE_STATUSES = ("PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED")


def _is_machine_failure(error: Exception) -> bool:
    """Whether a failed read says nothing about the checkpoint: out of memory, no permission,
    a filesystem that did not answer. Such a checkpoint must never be set aside as corrupt."""
    return (isinstance(error, MACHINE_FAILURES)
            or any(status in str(error) for status in MACHINE_STATUSES))


def saved_arch(directory: str | Path) -> str | None:
    """The arch that the newest checkpoint in `directory` with a readable config names, or
    None where there is none.

    Read without a CheckpointManager, which starts JAX's backend: train.py asks before a
    multi-process run joins its cluster, which must come first. An unreadable config is
    passed over here: resuming reports it.
    """
    for step in sorted(ocp.path.step.checkpoint_steps(directory), reverse=True):
        try:
            config = ocp.JsonCheckpointHandler().restore(  # `save`'s config item
                epath.Path(directory) / str(step) / "config")
        except (OSError, ValueError):  # ValueError: not JSON, or not text
            continue
        if isinstance(config, dict) and config.get("arch") in ARCHS:
            return config["arch"]
    return None


class Checkpointer:
    """The checkpoints in one directory: save, list, and restore them."""

    def __init__(self, directory: str | Path, read_only: bool = False):
        self.directory = Path(directory).absolute()
        if read_only and not self.directory.is_dir():
            problem = "is not a directory" if self.directory.exists() else "does not exist"
            raise UserError(f"checkpoint directory {directory} {problem}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else KEEP_LAST, save_interval_steps=0 if read_only else 1,
            create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=False,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, g_state: GeneratorState, d_state: train_state.TrainState,
             config: Config) -> None:
        """Writes step `step`, to a temporary directory renamed when complete."""
        self._manager.save(step, args=ocp.args.Composite(
            g_state=ocp.args.StandardSave(g_state),
            d_state=ocp.args.StandardSave(d_state),
            config=ocp.args.JsonSave(config.to_json()),
        ))
        self._manager.wait_until_finished()

    def load(self, step: int | None, read: Callable[[int], T],
             warn: Callable[[str], None]) -> tuple[int, T]:
        """`read(step)`, or, when `step` is None, `read` of the newest step it succeeds on.

        A corrupt newer step is skipped with a warning that names it; if no step
        is readable, or there is none, that is an error: never a silent fresh start.
        """
        steps = self.all_steps()
        if not steps:
            raise UserError(f"{self.directory} holds no checkpoint")
        if step is not None:
            if step not in steps:
                raise UserError(f"{self.directory} has no checkpoint at step {step}; it has {steps}")
            return step, read(step)
        for candidate in sorted(steps, reverse=True):
            try:
                return candidate, read(candidate)
            except CorruptCheckpoint as e:
                warn(f"warning: {e}; trying an older one")
        raise UserError(f"no readable checkpoint in {self.directory} (steps {steps} are all corrupt)")

    def set_aside_after(self, step: int) -> list[Path]:
        """Renames the steps newer than `step` to `<step>.corrupt`, out of the way of new saves.

        Nothing is deleted: a damaged checkpoint stays on disk for inspection.
        The primary process renames; the others wait for it and reread the list.
        """
        moved = []
        for newer in (s for s in self.all_steps() if s > step and parallel.is_primary()):
            target = self.directory / f"{newer}.corrupt"
            for n in itertools.count(2):
                if not target.exists():
                    break
                target = self.directory / f"{newer}.corrupt-{n}"
            os.replace(self.directory / str(newer), target)
            moved.append(target)
        parallel.sync(f"set aside checkpoints after {step}")
        self._manager.reload()
        return moved

    def _restore(self, step: int, **items: ocp.args.CheckpointArgs) -> Any:
        """Reads the named items of one step."""
        return self._run_io(step, lambda: self._manager.restore(
            step, args=ocp.args.Composite(**items)))

    def _run_io(self, step: int, read: Callable[[], T]) -> T:
        """`read()` of one step's files.

        A failure of the machine (memory, permissions, an unreachable or slow
        filesystem) is an error that changes nothing; any other failure to read is
        the checkpoint's fault, and `load` may then fall back to an older step.
        """
        _silence_late_read_callbacks()
        where = self.directory / str(step)
        try:
            return read()
        except Exception as e:  # orbax and tensorstore raise many types for unreadable data
            message = textwrap.shorten(str(e) or type(e).__name__, MAX_ERROR_CHARS)
            if _is_machine_failure(e):
                raise UserError(f"could not read checkpoint {where} ({message}); it was left as "
                                "it is: fix the cause and rerun") from None
            raise CorruptCheckpoint(f"checkpoint {where} is unreadable: {message}") from None

    def load_config(self, step: int) -> Config:
        return Config.from_json(self._restore(step, config=ocp.args.JsonRestore())["config"])

    def restore(self, step: int, abstract: Any) -> tuple[GeneratorState, train_state.TrainState]:
        """Both states at `step`, laid out like `abstract` (see `abstract_states`)."""
        g_abstract, d_abstract = abstract
        g_item, as_state = self._generator_item(step, g_abstract)
        restored = self._restore(step, g_state=ocp.args.StandardRestore(g_item),
                                 d_state=ocp.args.StandardRestore(d_abstract))
        return as_state(restored["g_state"]), restored["d_state"]

    def restore_generator(self, step: int, abstract: Any) -> GeneratorState:
        """G's state alone, for sampling."""
        g_item, as_state = self._generator_item(step, abstract[0])
        return as_state(self._restore(step, g_state=ocp.args.StandardRestore(g_item))["g_state"])

    def _generator_item(self, step: int, g_abstract: GeneratorState
                        ) -> tuple[Any, Callable[[Any], GeneratorState]]:
        """What G's state at `step` is read into, and how that becomes a GeneratorState.

        Checkpoints written before G had constants store no `constants` field: one without
        constants to read is read field by field, and then has none.
        """
        if not g_abstract.constants:
            def read_fields() -> Any:
                with ocp.StandardCheckpointer() as reader:
                    return reader.metadata(self.directory / str(step) / "g_state").item_metadata

            fields = self._run_io(step, read_fields)
            if fields is not None and "constants" not in fields:  # (None: unreadable)
                return ({name: getattr(g_abstract, name) for name in fields},
                        lambda restored: g_abstract.replace(**restored))
        return g_abstract, lambda restored: restored


class RunLock:
    """Lets one train.py at a time write to a checkpoint directory.

    An exclusive `flock` on `train.lock`, which also holds the writer's pid for
    the error message. The kernel releases the lock when its process dies, so a
    killed run never leaves a stale lock behind.
    """

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOCK_FILE
        self._file: TextIO | None = None
        self._created_directory = False

    def __enter__(self) -> RunLock:
        self._created_directory = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = self.path.open("a+")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "unknown"
            lock_file.close()
            raise UserError(
                f"{self.path.parent} is in use by another train.py (pid {holder}); "
                "wait for it to finish, stop it, or use another --ckpt-dir"
            ) from None
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"{os.getpid()}\n")
        lock_file.flush()
        self._file = lock_file
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._file is not None
        self._file.truncate(0)  # still locked: nobody reads a pid that is gone
        if self._created_directory and {p.name for p in self.path.parent.iterdir()} == {LOCK_FILE}:
            self.path.unlink()  # a run that failed before writing anything leaves no trace
            self.path.parent.rmdir()
        self._file.close()  # releases the lock
