"""The training loop: data in, jitted steps, logs, sample grids and checkpoints out.

A run can be killed at any moment and rerun with the same command: it resumes
from the newest readable checkpoint and ends bitwise where an uninterrupted run
would, because the batches and every random draw are functions of (seed, step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from digitscape_jax import cli, data, evaluate, parallel
from digitscape_jax.checkpointing import Checkpointer, RunLock
from digitscape_jax.config import Config
from digitscape_jax.errors import TrainingDiverged
from digitscape_jax.metrics import MetricsLog, TensorBoardLog, format_metrics
from digitscape_jax.models import NUM_CLASSES, networks, sample_noise
from digitscape_jax.plots import image_grid, plot_losses, save_gif, save_grid, save_image
from digitscape_jax.progress import Progress, format_duration
from digitscape_jax.sampling import render
from digitscape_jax.steps import GeneratorState, abstract_states, create_states, jit_train_step

REAL_IMAGES = "real_images.png"
FINAL_GRID = "generated_images.png"
PROGRESS_GIF = "progress.gif"
LOSSES_PLOT = "losses.png"
TENSORBOARD_DIR = "tensorboard"
ROW_LENGTH = 10  # Digits in each periodic sample row, as in the original.
FINAL_ROWS, FINAL_COLS = 4, 4


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """Where a run reads its data and writes its outputs."""

    ckpt_dir: Path
    samples_dir: Path
    data_dir: str | None = None
    mnist_idx: str | None = None
    tensorboard: bool = False

    def sample_row(self, step: int) -> Path:
        return self.samples_dir / f"generated_images_{step}.png"


def _read_frame(path: Path) -> np.ndarray | None:
    """An earlier sample row for the GIF, or None where it is missing or unreadable (say, cut
    short by a crash of an older version): the GIF is a view, and never stops training."""
    try:
        with Image.open(path) as image:
            return np.asarray(image)
    except (OSError, ValueError):
        return None


class RunOutputs:
    """The pictures and logs of a run, written at its logging and sampling points only.

    Every process computes the digits (they come from the replicated state);
    only the primary one writes files.
    """

    def __init__(self, config: Config, paths: RunPaths, sample_key: jax.Array,
                 sharding: jax.sharding.Sharding):
        self.config, self.paths = config, paths
        self.primary = parallel.is_primary()
        self.generator, _ = networks(config)
        n = FINAL_ROWS * FINAL_COLS
        self.fixed_noise, self.fixed_labels = jax.device_put(
            (sample_noise(sample_key, config.spec.noise, (n, config.latent_dim)),
             jnp.arange(n) % NUM_CLASSES),  # A conditional row of 10 counts 0 to 9.
            sharding)
        self.metrics = MetricsLog(paths.ckpt_dir)
        self.tensorboard = (TensorBoardLog(paths.ckpt_dir / TENSORBOARD_DIR)
                            if paths.tensorboard and self.primary else None)

    def log(self, record: dict[str, float]) -> None:
        if not self.primary:
            return
        self.metrics.append(record)
        if self.tensorboard:
            self.tensorboard.scalars(record["step"], {k: v for k, v in record.items() if k != "step"})

    def digits(self, g_state: GeneratorState, n: int) -> np.ndarray:
        return jax.device_get(render(self.generator, g_state.ema_variables, self.fixed_noise[:n],
                                     self.fixed_labels[:n]))

    def sample(self, step: int, g_state: GeneratorState) -> None:
        """The fixed-noise row of `step`, and the GIF and loss curves up to it."""
        row = image_grid(self.digits(g_state, ROW_LENGTH), 1, ROW_LENGTH)
        if not self.primary:
            return
        save_image(self.paths.sample_row(step), row)
        if self.tensorboard:
            self.tensorboard.image(step, "samples", row)
        earlier = range(self.config.sample_every, step, self.config.sample_every)
        frames = [frame for s in earlier  # written by earlier runs too
                  if (frame := _read_frame(self.paths.sample_row(s))) is not None]
        save_gif(self.paths.ckpt_dir / PROGRESS_GIF, [*frames, row])
        self.plot()

    def plot(self) -> None:
        records = self.metrics.read()
        if records:
            plot_losses(records, self.paths.ckpt_dir / LOSSES_PLOT)

    def finish(self, g_state: GeneratorState) -> None:
        digits = self.digits(g_state, FINAL_ROWS * FINAL_COLS)
        if self.primary:
            save_grid(self.paths.ckpt_dir / FINAL_GRID, digits, FINAL_ROWS, FINAL_COLS)
            self.plot()

    def where(self) -> list[tuple[str, Path]]:
        """Every output of the run, for the closing summary."""
        ckpt, samples = self.paths.ckpt_dir, self.paths.samples_dir
        places = [("checkpoints", ckpt), ("metrics", self.metrics.path),
                  ("loss curves", ckpt / LOSSES_PLOT), ("progress GIF", ckpt / PROGRESS_GIF),
                  ("real digits", ckpt / REAL_IMAGES), ("final grid", ckpt / FINAL_GRID),
                  ("sample rows", samples / "generated_images_<step>.png")]
        if self.tensorboard:
            places.append(("TensorBoard", ckpt / TENSORBOARD_DIR))
        return places


def call_plan(start: int, end: int, steps_per_call: int,
              every: tuple[int, ...]) -> Iterator[int]:
    """How many updates each device call runs, from step `start` to `end`: `steps_per_call`,
    or single steps where a call would pass over a step that logs, samples or saves (a
    multiple of one of `every`), since those happen between calls."""
    step = start
    while step < end:
        k = steps_per_call
        if step + k > end or any((step + i) % e == 0 for i in range(1, k) for e in every):
            k = 1
        step += k
        yield k


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


def train(config: Config, paths: RunPaths, stream: TextIO | None = None,
          warn: Callable[[str], None] = cli.warn) -> int:
    """Trains up to `config.steps` updates, resuming from the newest readable checkpoint.

    Progress goes to `stream` (stdout by default), warnings to `warn`. Returns
    the step it stopped at: `config.steps`, or earlier on SIGTERM/SIGINT.
    """
    if not parallel.is_primary():  # The primary process speaks and holds the lock for all.
        stream, warn = io.StringIO(), lambda message: None
    lock = RunLock(paths.ckpt_dir) if parallel.is_primary() else contextlib.nullcontext()
    with lock, StopRequest() as stop:
        return _train(config, paths, stream or sys.stdout, warn, stop)


def _resume(config: Config, ckpt: Checkpointer, abstract: Any, warn: Callable[[str], None]):
    """(step, states) of the newest readable checkpoint, or (0, None) in an empty directory."""
    if not ckpt.all_steps():
        return 0, None

    def read(step: int):
        saved = ckpt.load_config(step)
        config.check_resumable_with(saved)
        return saved, ckpt.restore(step, abstract)

    step, (saved, states) = ckpt.load(None, read, warn)
    changed = config.changed_from(saved)
    if changed:
        warn(f"warning: resuming step {step} with changed settings ({', '.join(changed)}); "
             "the result will differ from an uninterrupted run")
    return step, states


def _train(config: Config, paths: RunPaths, stream: TextIO, warn: Callable[[str], None],
           stop: StopRequest) -> int:
    mesh = parallel.data_parallel_mesh(config.batch_size)
    replicated = parallel.replicated(mesh)

    ckpt = Checkpointer(paths.ckpt_dir)
    start, states = _resume(config, ckpt, abstract_states(config, replicated), warn)
    if start >= config.steps:
        print(f"{paths.ckpt_dir} is already at step {start} >= --steps {config.steps}: "
              "nothing to do", file=stream)
        return start
    for moved in ckpt.set_aside_after(start):  # Unreadable newer steps, out of the way of saves.
        warn(f"warning: set the unreadable checkpoint aside as {moved}")

    for turn in ("primary", "others"):  # One at a time: processes may share a data dir.
        if parallel.is_primary() == (turn == "primary"):
            data.prepare_mnist(paths.data_dir, paths.mnist_idx)
        parallel.sync(f"mnist prepared by the {turn}")
    images, labels = data.load_split("train", paths.data_dir)
    # data.order_key keeps the data order apart from these four streams.
    init_key, step_key, sample_key, eval_key = jax.random.split(jax.random.key(config.seed), 4)
    evaluator = None
    if config.eval_every and parallel.is_primary():  # The primary process measures and logs.
        test_images, _ = data.load_split("test", paths.data_dir)
        evaluator = evaluate.Evaluator(test_images[..., 0], images[..., 0])
    outputs = RunOutputs(config, paths, sample_key, replicated)
    progress = Progress(start, config.steps, stream)
    if outputs.primary:
        outputs.metrics.truncate_after(start)  # Records past the checkpoint are logged again.
    if states is None:
        g_state, d_state = jax.device_put(create_states(config, init_key), replicated)
        if outputs.primary:
            save_grid(paths.ckpt_dir / REAL_IMAGES, images[:ROW_LENGTH], 1, ROW_LENGTH)
    else:
        g_state, d_state = states
        progress.write(f"resuming {paths.ckpt_dir} from step {start}")
    progress.write(parallel.startup_report(config, mesh, start))

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

    step_fns = {1: jit_train_step(config),
                config.steps_per_call: jit_train_step(config, steps_per_call=config.steps_per_call)}
    plan = list(call_plan(start, config.steps, config.steps_per_call,
                          (config.log_every, config.sample_every, config.ckpt_every,
                           config.eval_every or config.steps)))
    batches = _batches(config, mesh, images, labels, start, plan)
    compile_start = time.perf_counter()
    first_step_s = interval_start = 0.0
    interval_steps = 0
    logged: dict[str, float] = {}
    step = start
    try:
        for call_steps in plan:
            image_batch, label_batch = next(batches)
            g_state, d_state, metrics = step_fns[call_steps](g_state, d_state, image_batch,
                                                             step_key, label_batch)
            step += call_steps
            progress.advance(call_steps)
            if step == start + call_steps:  # Time from here on: the first call includes compiling.
                jax.block_until_ready(metrics)
                first_step_s = time.perf_counter() - compile_start
                progress.write(f"first call ({call_steps} step{'s' * (call_steps > 1)}, with "
                               f"compilation) took {first_step_s:.1f} s")
                interval_start, interval_steps = time.perf_counter(), 0
            else:
                interval_steps += call_steps
            evaluating = config.eval_every and (step % config.eval_every == 0
                                                or step == config.steps)
            logging = step % config.log_every == 0 or step == config.steps or evaluating
            sampling = step % config.sample_every == 0
            requested = stop.signal_name is not None
            if jax.process_count() > 1:  # Agreeing costs a collective: only at log and save steps.
                requested = ((logging or step % config.ckpt_every == 0)
                             and parallel.any_process(requested))
            stopping = requested and step < config.steps
            saving = step % config.ckpt_every == 0 or step == config.steps or stopping
            if logging or sampling or saving:  # Never log, draw or save a diverged state.
                check_finite(step, (g_state, d_state, metrics))
            if saving:
                parallel.check_replicas_agree((g_state, d_state), step)
            if logging:
                logged = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - interval_start
                steps_per_s = (interval_steps / elapsed if interval_steps
                               else (step - start) / first_step_s)
                if evaluating and evaluator is not None:
                    logged |= evaluate.during_training(
                        evaluator, config, jax.device_get(g_state.ema_variables), eval_key,
                        config.eval_samples)
                outputs.log({"step": step, "steps_per_s": steps_per_s, **logged})
                progress.report(step, steps_per_s, logged)
                interval_start, interval_steps = time.perf_counter(), 0
            if saving:  # First, so that no failure in the pictures can cost a checkpoint.
                ckpt.save(step, g_state, d_state, config)
            if sampling:
                outputs.sample(step, g_state)
            if stopping:
                progress.write(f"{stop.signal_name or 'another process was stopped'}: stopped at "
                               f"step {step} and saved a checkpoint "
                               f"in {paths.ckpt_dir}; rerun the same command to resume")
                return step
        outputs.finish(g_state)
    finally:
        wall_s = progress.close()
    _summary(stream, config, start, wall_s, logged, outputs)
    return config.steps


def _batches(config: Config, mesh: jax.sharding.Mesh, images: np.ndarray, labels: np.ndarray,
             start: int, plan: list[int]) -> Iterator[tuple[jax.Array, jax.Array]]:
    """Each call's (images, labels) on the devices, from `start`: gathered there from a
    resident copy of the split, or streamed from the host by tf.data."""
    if config.data_on_device:
        return data.DeviceData(images, labels, config.batch_size, config.seed, mesh).batches(
            start, plan)
    rows = parallel.process_rows(mesh, config.batch_size)

    def to_device(batch: tuple[np.ndarray, np.ndarray]) -> tuple[jax.Array, jax.Array]:
        axis = batch[0].ndim - 4  # 1 for batches stacked for a call of several steps
        return tuple(parallel.global_batch(x, mesh, config.batch_size, axis) for x in batch)

    return data.prefetch_to_device(data.stack_batches(
        data.train_batches(images, labels, config.batch_size, config.seed, start,
                           rows).as_numpy_iterator(), iter(plan)), to_device)


def _summary(stream: TextIO, config: Config, start: int, wall_s: float,
             metrics: dict[str, float], outputs: RunOutputs) -> None:
    """One screen that closes the run: how far, how fast, how good, and where everything is."""
    steps = config.steps - start
    lines = [
        f"done: {steps} steps ({start + 1}..{config.steps}) in {format_duration(wall_s)}, "
        f"{steps / wall_s:.2f} steps/s on average",
        f"final: {format_metrics(metrics)}",
        *(f"  {name:<13} {path}" for name, path in outputs.where()),
        f"draw digits with: python sample.py --ckpt {outputs.paths.ckpt_dir}",
    ]
    print("\n".join(lines), file=stream, flush=True)
