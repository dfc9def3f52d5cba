"""Files written whole or not at all."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | Path, data: bytes) -> Path:
    """Writes `data` to `path` through a temporary file renamed over it, so that a crash
    leaves the old file or the new one, never part of one. Makes missing parent folders.
    The temporary file has a unique name, so writers of the same file at once (processes,
    hosts on a shared disk) each rename a whole one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def replace_directory(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Builds a directory with `write(temporary)` and renames it to `path`, replacing an earlier
    one: a crash never leaves a half-written directory at `path` (at worst, between the two
    renames, the earlier one waits beside it as `<path>.old`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial, old = (path.with_name(path.name + suffix) for suffix in (".partial", ".old"))
    for leftover in (partial, old):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        write(partial)
        if path.is_dir():
            os.replace(path, old)
        os.replace(partial, path)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path
