"""XLA settings that make this project faster: CPU flags, compiler options for programs
that run once, and the compilation cache.

The flags are set before JAX starts its backends. They only change how XLA:CPU
compiles, so they cost nothing on a GPU or TPU. An unknown XLA flag aborts the
process, so each is set only for the jaxlib releases it was measured on.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Turning off XLA:CPU's YNNPACK fusions makes the DCGAN step about 27% faster on
# the CPU (1.57 -> 1.14 s at batch 256 for `dcgan`): they slow its convolutions.
CPU_FLAGS = {"--xla_cpu_experimental_ynn_fusion_type": ""}
MEASURED_ON = ("0.10",)  # jaxlib major.minor releases


# A program that runs once per process (the initialisation) gains nothing from XLA:CPU's
# full backend optimisation (level 3), which is most of its compile time: 4.6 -> 1.2 s for
# `seed`'s initialisation at level 1, with the same bits out (tests/test_xla_flags.py;
# level 0 rounds a few of them differently).
RUN_ONCE_OPTIONS = {"xla_backend_optimization_level": 1}

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "digitscape_jax" / "xla"


def use_compilation_cache(directory: str | Path) -> None:
    """Keeps compiled programs in `directory`, so that a rerun (a resume, say) loads the
    train step instead of compiling it again. Before the first compilation."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # Every program.


def jit_run_once(fun: Callable[..., Any]) -> Callable[..., Any]:
    """`jax.jit(fun)` for a program that runs once per process: on the CPU, compiled
    without the costliest backend optimisations, which would take longer than they save."""
    import jax

    return jax.jit(fun, compiler_options=RUN_ONCE_OPTIONS if jax.default_backend() == "cpu"
                   else None)


def apply() -> None:
    """Adds CPU_FLAGS to XLA_FLAGS, keeping any value the user has set."""
    try:
        release = ".".join(importlib.metadata.version("jaxlib").split(".")[:2])
    except importlib.metadata.PackageNotFoundError:
        return
    if release not in MEASURED_ON:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    extra = [f"{name}={value}" for name, value in CPU_FLAGS.items() if name not in flags]
    os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
