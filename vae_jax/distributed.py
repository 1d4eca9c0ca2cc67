"""Several processes (hosts) training one run: JAX's distributed runtime and who does what.

    python -m vae_jax.main ... --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0
    python -m vae_jax.main ... --distributed=auto      # TPU pod slices, SLURM: detected

Every process runs the same loop on its own devices: the pmapped step spans all devices of all
processes (`jax.pmap` over ``jax.devices()``, the all-reduces global), each process feeds the
rows of the global batch that belong to its devices (`process_rows`), and all of them take
part in the orbax checkpoints. Only the primary process (index 0) writes the workdir's other
files: ``config.json``, ``data.json``, ``metrics.jsonl``, TensorBoard events, ``best/``, and
holds the workdir lock. A run resumes on the same number of processes and devices.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize(
    coordinator_address: str = "",
    num_processes: int = 1,
    process_id: int = 0,
    auto: bool = False,
) -> None:
    """Starts JAX's distributed runtime: with the given coordinator (``host:port``), or, with
    ``auto``, from the environment (TPU pod slices, SLURM) as ``jax.distributed.initialize()``
    finds it. Nothing for a single process. Call before any computation."""
    if auto:
        jax.distributed.initialize()
        return
    if num_processes <= 1 and not coordinator_address:
        return
    if not coordinator_address or not 0 <= process_id < num_processes:
        raise ValueError(
            f"--coordinator_address={coordinator_address!r} --num_processes={num_processes} "
            f"--process_id={process_id}: a multi-process run needs the coordinator's host:port "
            "and a process id in 0..num_processes-1."
        )
    # The CPU backend's cross-process all-reduce (other backends ignore it); asking for the
    # backend here would initialise it, which must wait until after `initialize`.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def is_primary() -> bool:
    """Whether this process writes the workdir's files (process 0)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Waits until every process has reached the same ``name``d point (one process: no-op)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def process_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rows of a global batch that this process's devices hold: device i of the global
    device order (the pmap's) holds rows ``i·b … (i+1)·b − 1``, b = rows per device."""
    if jax.process_count() == 1:
        return batch
    devices = jax.devices()
    rows = len(next(iter(batch.values()))) // len(devices)
    mine = [i for i, d in enumerate(devices) if d.process_index == jax.process_index()]
    index = np.concatenate([np.arange(i * rows, (i + 1) * rows) for i in mine])
    return {k: v[index] for k, v in batch.items()}
