"""The training loop: data in, jitted steps, logs, sample grids and checkpoints out."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from digitscape_jax import data
from digitscape_jax.checkpointing import Checkpointer, abstract_states
from digitscape_jax.config import Config
from digitscape_jax.errors import UserError
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


def train(config: Config, paths: RunPaths, log: Callable[[str], None] = print) -> int:
    """Trains up to `config.steps` updates, resuming from the latest checkpoint; returns the step."""
    ckpt = Checkpointer(paths.ckpt_dir)
    start = ckpt.latest_step() or 0
    if start:
        config.check_resumable_with(ckpt.load_config(start))
        if start >= config.steps:
            log(f"{paths.ckpt_dir} is already at step {start} >= --steps {config.steps}: nothing to do")
            return start

    data.prepare_mnist(paths.data_dir, paths.mnist_idx)
    images, _ = data.load_split("train", paths.data_dir)
    mesh = data_parallel_mesh(config.batch_size)
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))

    init_key, step_key, sample_key = jax.random.split(jax.random.key(config.seed), 3)
    metrics_log = MetricsLog(paths.ckpt_dir)
    if start:
        g_state, d_state = ckpt.restore(start, abstract_states(config, replicated))
        metrics_log.truncate_after(start)
        log(f"resuming {paths.ckpt_dir} from step {start}")
    else:
        g_state, d_state = jax.device_put(create_states(config, init_key), replicated)
        save_grid(paths.ckpt_dir / REAL_IMAGES, images[:ROW_LENGTH], 1, ROW_LENGTH)

    log(f"training {config.arch} on {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"batch {config.batch_size}, steps {start + 1}..{config.steps}")
    generator = Generator(config.spec)
    fixed_noise = sample_noise(sample_key, config.spec.noise,
                               (FINAL_ROWS * FINAL_COLS, config.latent_dim))

    def sample_grid(path: Path, n: int, rows: int, cols: int) -> None:
        variables = {"params": g_state.params, "batch_stats": g_state.batch_stats}
        save_grid(path, jax.device_get(render(generator, variables, fixed_noise[:n])), rows, cols)

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
        if step % config.log_every == 0 or step == config.steps:
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            elapsed = time.perf_counter() - interval_start
            steps_per_s = interval_steps / elapsed if interval_steps else 1 / first_step_s
            metrics_log.append({"step": step, "steps_per_s": steps_per_s, **metrics})
            log(f"step {step}/{config.steps}  {steps_per_s:.2f} steps/s  {format_metrics(metrics)}")
            interval_start, interval_steps = time.perf_counter(), 0
        if step % config.sample_every == 0:
            sample_grid(paths.samples_dir / f"generated_images_{step}.png", ROW_LENGTH, 1, ROW_LENGTH)
        if step % config.ckpt_every == 0 or step == config.steps:
            ckpt.save(step, g_state, d_state, config)

    sample_grid(paths.ckpt_dir / FINAL_GRID, FINAL_ROWS * FINAL_COLS, FINAL_ROWS, FINAL_COLS)
    log(f"done: step {config.steps}; checkpoints, {metrics_log.path.name}, {REAL_IMAGES} and "
        f"{FINAL_GRID} in {paths.ckpt_dir}, sample rows in {paths.samples_dir}")
    return config.steps
