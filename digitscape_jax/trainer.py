"""The training loop: data in, jitted steps, logs, sample grids and checkpoints out.

A run can be killed at any moment and rerun with the same command: it resumes
from the newest readable checkpoint and ends bitwise where an uninterrupted run
would, because the batches and every random draw are functions of (seed, step).
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from digitscape_jax import cli, data
from digitscape_jax.checkpointing import Checkpointer, RunLock, abstract_states
from digitscape_jax.config import Config
from digitscape_jax.errors import TrainingDiverged, UserError
from digitscape_jax.metrics import MetricsLog, format_metrics
from digitscape_jax.models import Generator, sample_noise
from digitscape_jax.plots import save_grid
from digitscape_jax.sampling import render
from digitscape_jax.steps import create_states, jit_train_step

REAL_IMAGES = "real_images.png"
FINAL_GRID = "generated_images.png"
ROW_LENGTH = 10  # Digits in each periodic sample row, as in the original.
FINAL_ROWS, FINAL_COLS = 4, 4


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """Where a run reads its data and writes its outputs."""

    ckpt_dir: Path
    samples_dir: Path
    data_dir: str | None = None
    mnist_idx: str | None = None


def data_parallel_mesh(batch_size: int) -> jax.sharding.Mesh:
    """A 1-D mesh over every device; the batch is split along its `data` axis."""
    n = jax.device_count()
    if batch_size % n:
        raise UserError(f"--batch-size {batch_size} is not divisible by the {n} devices")
    return jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,))


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point value in `tree` is finite."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.array([jnp.isfinite(x).all() for x in leaves]))


class StopRequest:
    """Turns the first SIGTERM or SIGINT into a request to stop after the current step.

    A second one interrupts at once (as KeyboardInterrupt); checkpoints are
    written atomically, so even that loses nothing but the steps since the last.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal_name is not None:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name


def train(config: Config, paths: RunPaths, log: Callable[[str], None] = print,
          warn: Callable[[str], None] = cli.warn) -> int:
    """Trains up to `config.steps` updates, resuming from the newest readable checkpoint.

    Returns the step it stopped at: `config.steps`, or earlier on SIGTERM/SIGINT.
    """
    with RunLock(paths.ckpt_dir), StopRequest() as stop:
        return _train(config, paths, log, warn, stop)


def _resume(config: Config, ckpt: Checkpointer, abstract: Any, warn: Callable[[str], None]):
    """(step, states) of the newest readable checkpoint, or (0, None) in an empty directory."""
    if not ckpt.all_steps():
        return 0, None

    def read(step: int):
        config.check_resumable_with(ckpt.load_config(step))
        return ckpt.restore(step, abstract)

    step, states = ckpt.load(None, read, warn)
    for moved in ckpt.set_aside_after(step):
        warn(f"warning: set the unreadable checkpoint aside as {moved}")
    return step, states


def _train(config: Config, paths: RunPaths, log: Callable[[str], None],
           warn: Callable[[str], None], stop: StopRequest) -> int:
    mesh = data_parallel_mesh(config.batch_size)
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))

    ckpt = Checkpointer(paths.ckpt_dir)
    start, states = _resume(config, ckpt, abstract_states(config, replicated), warn)
    if start >= config.steps:
        log(f"{paths.ckpt_dir} is already at step {start} >= --steps {config.steps}: nothing to do")
        return start

    data.prepare_mnist(paths.data_dir, paths.mnist_idx)
    images, _ = data.load_split("train", paths.data_dir)
    init_key, step_key, sample_key = jax.random.split(jax.random.key(config.seed), 3)
    metrics_log = MetricsLog(paths.ckpt_dir)
    if states is None:
        g_state, d_state = jax.device_put(create_states(config, init_key), replicated)
        save_grid(paths.ckpt_dir / REAL_IMAGES, images[:ROW_LENGTH], 1, ROW_LENGTH)
    else:
        g_state, d_state = states
        metrics_log.truncate_after(start)
        log(f"resuming {paths.ckpt_dir} from step {start}")

    log(f"training {config.arch} on {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"batch {config.batch_size}, steps {start + 1}..{config.steps}")
    generator = Generator(config.spec)
    fixed_noise = sample_noise(sample_key, config.spec.noise,
                               (FINAL_ROWS * FINAL_COLS, config.latent_dim))

    def sample_grid(path: Path, n: int, rows: int, cols: int) -> None:
        variables = {"params": g_state.params, "batch_stats": g_state.batch_stats}
        save_grid(path, jax.device_get(render(generator, variables, fixed_noise[:n])), rows, cols)

    last_finite = start

    def check_finite(step: int, tree: Any) -> None:
        nonlocal last_finite
        if not bool(all_finite(tree)):
            good = ckpt.latest_step()
            kept = f"step {good} in {paths.ckpt_dir}" if good else "none written"
            raise TrainingDiverged(
                f"training diverged: a loss or parameter became NaN or infinite between steps "
                f"{last_finite} and {step}; the last good checkpoint is kept ({kept}); "
                "try a lower --lr or another --seed"
            )
        last_finite = step

    step_fn = jit_train_step(config)
    batches = data.prefetch_to_device(
        data.train_batches(images, config.batch_size, config.seed, start).as_numpy_iterator(),
        batch_sharding,
    )
    compile_start = time.perf_counter()
    first_step_s = interval_start = 0.0
    interval_steps = 0
    for step in range(start + 1, config.steps + 1):
        g_state, d_state, metrics = step_fn(g_state, d_state, next(batches), step_key)
        if step == start + 1:  # Time steps from here on: the first one includes compiling.
            jax.block_until_ready(metrics)
            first_step_s = time.perf_counter() - compile_start
            log(f"first step (with compilation) took {first_step_s:.1f} s")
            interval_start, interval_steps = time.perf_counter(), 0
        else:
            interval_steps += 1
        stopping = stop.signal_name is not None
        logging = step % config.log_every == 0 or step == config.steps
        saving = step % config.ckpt_every == 0 or step == config.steps or stopping
        if logging or saving:  # Never log or save a diverged state.
            check_finite(step, (g_state, d_state, metrics))
        if logging:
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            elapsed = time.perf_counter() - interval_start
            steps_per_s = interval_steps / elapsed if interval_steps else 1 / first_step_s
            metrics_log.append({"step": step, "steps_per_s": steps_per_s, **metrics})
            log(f"step {step}/{config.steps}  {steps_per_s:.2f} steps/s  {format_metrics(metrics)}")
            interval_start, interval_steps = time.perf_counter(), 0
        if step % config.sample_every == 0:
            sample_grid(paths.samples_dir / f"generated_images_{step}.png", ROW_LENGTH, 1, ROW_LENGTH)
        if saving:
            ckpt.save(step, g_state, d_state, config)
        if stopping:
            log(f"{stop.signal_name}: stopped at step {step} and saved a checkpoint in "
                f"{paths.ckpt_dir}; rerun the same command to resume")
            return step

    sample_grid(paths.ckpt_dir / FINAL_GRID, FINAL_ROWS * FINAL_COLS, FINAL_ROWS, FINAL_COLS)
    log(f"done: step {config.steps}; checkpoints, {metrics_log.path.name}, {REAL_IMAGES} and "
        f"{FINAL_GRID} in {paths.ckpt_dir}, sample rows in {paths.samples_dir}")
    return config.steps
