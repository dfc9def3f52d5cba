"""Where a figure came from: the code's commit, the libraries' versions and the machine.

Every result record (`records`) and every training run (`<ckpt-dir>/runs.jsonl`) carries
this, so that a number always names the code and the hardware that produced it: speed
ratios in particular move with the CPU and its instruction set.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# The widest vector instruction set a CPU offers, by its /proc/cpuinfo flag, widest first.
INSTRUCTION_SETS = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("sse4_2", "SSE4.2"),
                    ("asimd", "NEON"))
LIBRARIES = ("jax", "jaxlib", "flax", "optax")


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    return fields


def cpu() -> dict[str, Any]:
    """The CPU's model, the cores this process may use and its widest vector instruction set."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    isa = next((name for flag, name in INSTRUCTION_SETS if flag in flags), "unknown")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": info.get("model name") or platform.processor() or platform.machine(),
            "cores": cores, "instruction_set": isa}


def accelerator() -> dict[str, Any]:
    """JAX's default backend: its platform, device kind and device count."""
    import jax

    devices = jax.devices()
    return {"platform": devices[0].platform, "kind": devices[0].device_kind,
            "count": len(devices)}


def machine() -> dict[str, Any]:
    return {"cpu": cpu(), "accelerator": accelerator()}


def versions() -> dict[str, str | None]:
    """The installed versions of the libraries that decide the numbers."""
    found: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def source(repo: Path = REPO) -> dict[str, Any]:
    """The git commit of the code, and whether tracked files differed from it (None where
    the code is not a git checkout)."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True,
                                  text=True, check=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def describe() -> dict[str, Any]:
    """All of it: the code, the libraries and the machine."""
    return {**source(), "versions": versions(), "machine": machine()}
