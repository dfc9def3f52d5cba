"""The training loop: `train(config, paths)`, data in, jitted steps, logs, pictures and
checkpoints out.

A run can be killed at any moment and rerun with the same command: it resumes
from the newest readable checkpoint and ends bitwise where an uninterrupted run
would, because the batches and every random draw are functions of (seed, step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import itertools
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from digitscape_jax import cli, clusters, data, parallel, provenance
from digitscape_jax.checkpointing import Checkpointer, RunLock
from digitscape_jax.config import Config
from digitscape_jax.errors import TrainingDiverged
from digitscape_jax.evaluator import Evaluator, during_training
from digitscape_jax.metrics import RUNS_FILE, MetricsLog, format_metrics
from digitscape_jax.outputs import REAL_IMAGES, ROW_LENGTH, RunOutputs, RunPaths
from digitscape_jax.plots import save_grid
from digitscape_jax.progress import Progress, format_duration
from digitscape_jax.schedule import EVALUATE, LOG, SAMPLE, SAVE, Schedule
from digitscape_jax.steps import abstract_states, create_states, jit_train_step
from digitscape_jax.stopping import StopRequest

__all__ = ["RunPaths", "train"]


def train(config: Config, paths: RunPaths, stream: TextIO | None = None,
          warn: Callable[[str], None] = cli.warn) -> int:
    """Trains up to `config.steps` updates, resuming from the newest readable checkpoint.

    Progress goes to `stream` (stdout by default), warnings to `warn`. Returns
    the step it stopped at: `config.steps`, or earlier on SIGTERM/SIGINT.
    """
    if not parallel.is_primary():  # The primary process speaks and holds the lock for all.
        stream, warn = io.StringIO(), lambda message: None
    stream = stream or sys.stdout
    lock = RunLock(paths.ckpt_dir) if parallel.is_primary() else contextlib.nullcontext()
    with lock, StopRequest() as stop:
        return _train(config, paths, stream, warn, stop)


@dataclasses.dataclass(frozen=True)
class RunKeys:
    """The run's independent random streams (`data.order_key` keeps the data order apart)."""

    init: jax.Array
    step: jax.Array
    sample: jax.Array
    eval: jax.Array

    @classmethod
    def of(cls, seed: int) -> RunKeys:
        return cls(*jax.random.split(jax.random.key(seed), 4))


def _train(config: Config, paths: RunPaths, stream: TextIO, warn: Callable[[str], None],
           stop: StopRequest) -> int:
    began = time.perf_counter()
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

    images, labels, evaluator = _load_data(config, paths)
    labels, frequencies = clusters.training_classes(config, images, labels)
    keys = RunKeys.of(config.seed)
    outputs = RunOutputs(config, paths, keys.sample, replicated)
    progress = Progress(start, config.steps, stream)
    # Records past the checkpoint are logged again.
    earlier = outputs.metrics.truncate_after(start) if outputs.primary else []
    if outputs.primary:  # Which code, libraries and machine ran each (re)start.
        MetricsLog(paths.ckpt_dir, RUNS_FILE).append({"start_step": start,
                                                      **provenance.describe()})
    wall_before = earlier[-1].get("wall_s", 0.0) if earlier else 0.0  # of the runs resumed
    if states is None:
        g_state, d_state = jax.device_put(create_states(config, keys.init, frequencies),
                                          replicated)
        if outputs.primary:
            save_grid(paths.ckpt_dir / REAL_IMAGES, images[:ROW_LENGTH], 1, ROW_LENGTH)
    else:
        g_state, d_state = states
        progress.write(f"resuming {paths.ckpt_dir} from step {start}")
    progress.write(parallel.startup_report(config, mesh, start))
    stop.announce = progress.write

    schedule = Schedule.of(config)
    plan = list(schedule.call_plan(start, config.steps_per_call))
    step_fns = {1: jit_train_step(config),
                config.steps_per_call: jit_train_step(config, steps_per_call=config.steps_per_call)}
    actions = _Actions(config, paths, ckpt, outputs, progress, evaluator, keys.eval, start,
                       lambda: wall_before + time.perf_counter() - began)
    batches = _batches(config, mesh, images, labels, start, plan)
    call_ends = list(itertools.accumulate(plan, initial=start))[1:]  # Each call's last step.
    stop.step, in_flight = call_ends[0], None
    try:
        for index, (call_steps, step) in enumerate(zip(plan, call_ends)):
            image_batch, label_batch = next(batches)
            g_state, d_state, metrics = step_fns[call_steps](g_state, d_state, image_batch,
                                                             keys.step, label_batch)
            # Wait for the call before this one: the loop runs at most one call ahead of the
            # device, so a stop or an error is acted on within two steps.
            jax.block_until_ready(in_flight)
            in_flight = metrics
            progress.advance(call_steps)
            actions.timer.advance(step, call_steps, metrics)
            stop.step = call_ends[min(index + 1, len(plan) - 1)]  # Where a stop asked now falls.
            stopping = _stop_agreed(stop, schedule, step) and step < config.steps
            due = schedule.due(step, stopping)
            if due:
                actions.run(step, due, g_state, d_state, metrics)
            if stopping:
                progress.write(f"{stop.signal_name or 'another process was stopped'}: stopped at "
                               f"step {step} and saved a checkpoint in {paths.ckpt_dir}; rerun "
                               "the same command to resume")
                return step
        outputs.finish(g_state)
    finally:
        wall_s = progress.close()
    _summary(stream, config, start, wall_s, actions.logged, outputs)
    return config.steps


def _stop_agreed(stop: StopRequest, schedule: Schedule, step: int) -> bool:
    """Whether the run stops at `step`: on a signal to this process, or with many processes
    to any of them, agreed on at log and save steps only, where a collective costs little."""
    if jax.process_count() == 1:
        return stop.requested
    return bool(schedule.due(step) & {LOG, SAVE}) and parallel.any_process(stop.requested)


class _StepTimer:
    """Steps per second between logs; the first call, which compiles, is timed and reported
    on its own."""

    def __init__(self, start: int, progress: Progress):
        self.start, self.progress = start, progress
        self.began = time.perf_counter()
        self.first_call_s = self.interval_start = 0.0
        self.interval_steps = 0

    def advance(self, step: int, call_steps: int, metrics: Any) -> None:
        if step == self.start + call_steps:
            jax.block_until_ready(metrics)
            self.first_call_s = time.perf_counter() - self.began
            self.progress.write(f"first call ({call_steps} step{'s' * (call_steps > 1)}, with "
                                f"compilation) took {self.first_call_s:.1f} s")
            self.interval_start, self.interval_steps = time.perf_counter(), 0
        else:
            self.interval_steps += call_steps

    def steps_per_s(self, step: int) -> float:
        """The speed since the last call of this, which starts the next interval."""
        elapsed = time.perf_counter() - self.interval_start
        speed = (self.interval_steps / elapsed if self.interval_steps
                 else (step - self.start) / self.first_call_s)
        self.interval_start, self.interval_steps = time.perf_counter(), 0
        return speed


class _Actions:
    """What a step does besides updating, in this order: check the state is finite, log (with
    an evaluation when due), save (first, so no failure in the pictures costs a checkpoint),
    and draw the sample row."""

    def __init__(self, config: Config, paths: RunPaths, ckpt: Checkpointer,
                 outputs: RunOutputs, progress: Progress,
                 evaluator: Callable[[], Evaluator] | None,
                 eval_key: jax.Array, start: int, wall_s: Callable[[], float]):
        """`wall_s` tells the run's wall time so far, the runs it resumed included."""
        self.config, self.paths, self.ckpt, self.outputs = config, paths, ckpt, outputs
        self.wall_s = wall_s
        self.progress, self.evaluator, self.eval_key = progress, evaluator, eval_key
        self.timer = _StepTimer(start, progress)
        self.last_finite = start
        self.first_call_logged = False
        self.logged: dict[str, float] = {}

    def run(self, step: int, due: frozenset[str], g_state: Any, d_state: Any,
            metrics: dict[str, jax.Array]) -> None:
        self.check_finite(step, (g_state, d_state, metrics))  # Never log, draw or save NaNs.
        if SAVE in due:
            parallel.check_replicas_agree((g_state, d_state), step)
        if LOG in due:
            self.log(step, g_state, metrics, evaluate=EVALUATE in due)
        if SAVE in due:
            self.ckpt.save(step, g_state, d_state, self.config)
        if SAMPLE in due:
            self.outputs.sample(step, g_state)

    def log(self, step: int, g_state: Any, metrics: dict[str, jax.Array], evaluate: bool) -> None:
        self.logged = {k: float(v) for k, v in jax.device_get(metrics).items()}
        bookkeeping = ({} if self.first_call_logged
                       else {"first_call_s": round(self.timer.first_call_s, 2)})
        self.first_call_logged = True
        steps_per_s = self.timer.steps_per_s(step)
        if evaluate and self.evaluator is not None:
            self.logged |= during_training(self.evaluator(), self.config,
                                           jax.device_get(g_state.ema_variables), self.eval_key,
                                           self.config.eval_samples)
        self.outputs.log({"step": step, "steps_per_s": steps_per_s,
                          "wall_s": round(self.wall_s(), 1), **bookkeeping, **self.logged})
        self.progress.report(step, steps_per_s, self.logged)

    def check_finite(self, step: int, tree: Any) -> None:
        if not bool(all_finite(tree)):
            good = self.ckpt.latest_step()
            kept = f"step {good} in {self.paths.ckpt_dir}" if good else "none written"
            raise TrainingDiverged(
                f"training diverged: a loss or parameter became NaN or infinite between steps "
                f"{self.last_finite} and {step}; the last good checkpoint is kept ({kept}); "
                "try a lower --lr or another --seed"
            )
        self.last_finite = step


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point value in `tree` is finite."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.array([jnp.isfinite(x).all() for x in leaves]))


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


def _load_data(config: Config, paths: RunPaths
               ) -> tuple[np.ndarray, np.ndarray, Callable[[], Evaluator] | None]:
    """The training split, and where this process measures sample quality, the evaluator, built
    when first asked for: a run that ends before its first measurement never pays for it."""
    for turn in ("primary", "others"):  # One at a time: processes may share a data dir.
        if parallel.is_primary() == (turn == "primary"):
            data.prepare_mnist(paths.data_dir, paths.mnist_idx)
            images, labels = data.load_split("train", paths.data_dir)  # the others read its copy
        parallel.sync(f"mnist prepared by the {turn}")
    evaluator = None
    if config.eval_every and parallel.is_primary():  # The primary process measures and logs.
        evaluator = functools.cache(lambda: Evaluator(
            data.load_split("test", paths.data_dir)[0][..., 0], images[..., 0]))
    return images, labels, evaluator


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
