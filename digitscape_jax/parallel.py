"""Data parallelism over every device of every process: the mesh, the batch, the processes.

One process drives the local devices of one host; several join through JAX's
own distributed runtime (`jax.distributed`). Each process feeds only its rows
of every global batch, and the params are replicated on every device.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from digitscape_jax.config import Config
from digitscape_jax.errors import UserError

DATA_AXIS = "data"


def initialize_distributed(coordinator: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
    """Joins a multi-process run; call before anything touches a device.

    With no arguments, JAX finds the cluster itself (Cloud TPU pods, SLURM,
    Open MPI); otherwise all three name it. CPU processes talk over gloo.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    except (RuntimeError, ValueError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"could not join the distributed run: {first_line}") from None


def default_dtype() -> str:
    """bfloat16 on TPU, where it is the native matmul type; float32 elsewhere."""
    return "bfloat16" if jax.default_backend() == "tpu" else "float32"


def is_primary() -> bool:
    """Whether this process writes the run's files (all processes compute)."""
    return jax.process_index() == 0


def data_parallel_mesh(batch_size: int) -> Mesh:
    """A 1-D mesh over every device of every process; the batch is split along `data`."""
    n = jax.device_count()
    if batch_size % n:
        raise UserError(f"--batch-size {batch_size} is not divisible by the {n} devices")
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, axis: int = 0) -> NamedSharding:
    """Split along `data` on `axis` (1 for batches stacked for several steps per call)."""
    return NamedSharding(mesh, PartitionSpec(*[None] * axis, DATA_AXIS))


def process_rows(mesh: Mesh, batch_size: int) -> slice:
    """The rows of each global batch that live on this process's devices."""
    indices = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
    starts = sorted(index[0].indices(batch_size)[:2] for index in indices.values())
    for (_, stop), (start, _) in zip(starts, starts[1:]):
        if stop != start:
            raise UserError("this process's devices do not hold one contiguous part of the batch")
    return slice(starts[0][0], starts[-1][1])


def global_batch(local_rows: np.ndarray, mesh: Mesh, batch_size: int, axis: int = 0) -> jax.Array:
    """The global batch array, from this process's rows of it; the batch runs along `axis`
    (1 for batches stacked for several steps per call)."""
    shape = (*local_rows.shape[:axis], batch_size, *local_rows.shape[axis + 1:])
    return jax.make_array_from_process_local_data(batch_sharding(mesh, axis), local_rows, shape)


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process: a collective, so every process must call it."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.process_allgather(np.array(flag)).any())


def sync(name: str) -> None:
    """Waits until every process gets here."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def check_replicas_agree(tree: Any, step: int) -> None:
    """Fails if the replicated state has drifted apart between processes."""
    if jax.process_count() == 1:
        return
    local = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)
    try:
        multihost_utils.assert_equal(local)
    except AssertionError:
        raise RuntimeError(f"the processes' copies of the train state differ at step {step}") from None


def startup_report(config: Config, mesh: Mesh, start: int) -> str:
    """What the run found and how it will use it: devices, mesh, per-device batch, dtype."""
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return "\n".join([
        f"devices: {len(devices)} x {jax.default_backend()} ({', '.join(kinds)}), "
        f"{jax.local_device_count()} local; process {jax.process_index()} of {jax.process_count()}",
        f"mesh: {dict(mesh.shape)}; batch {config.batch_size} = "
        f"{config.batch_size // mesh.size} per device; compute dtype {config.dtype}",
        f"training {config.arch}, steps {start + 1}..{config.steps}",
    ])
