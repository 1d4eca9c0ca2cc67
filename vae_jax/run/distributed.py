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

import faulthandler
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
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


def agree(what: str, record: Mapping[str, Any]) -> None:
    """Refuses to go on unless every process passes the same ``record`` (flat: field ->
    value): a `ValueError` in every process naming the fields that differ from process 0's,
    rather than processes that train different runs and wait for each other forever. One
    exchange through the runtime's all-gather; nothing for a single process."""
    if jax.process_count() == 1:
        return
    data = json.dumps(dict(record), sort_keys=True, default=repr).encode()
    lengths = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int32)))
    buffer = np.zeros(int(lengths.max()), np.uint8)
    buffer[: len(data)] = np.frombuffer(data, np.uint8)
    everyone = np.asarray(multihost_utils.process_allgather(buffer))
    records = [
        json.loads(bytes(row[: int(n)])) for row, n in zip(everyone, lengths.ravel(), strict=True)
    ]
    first = records[0]
    for index, other in enumerate(records[1:], start=1):
        keys = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
        if keys:
            diff = "; ".join(
                f"{k}: {first.get(k, '<absent>')!r} vs {other.get(k, '<absent>')!r}"
                for k in keys[:8]
            )
            raise ValueError(
                f"The processes of this run disagree on its {what} (process 0 vs process "
                f"{index}): {diff}. Start every process with the same command and data."
            )


_active: Watchdog | None = None  # the one `progress` reports to


def progress() -> None:
    """Tells the active `Watchdog`, if any, that this process is making progress."""
    if _active is not None:
        _active.progress()


class Watchdog:
    """Ends a multi-process run whose processes stop making progress: if `progress` is not
    called for ``bound`` seconds (a collective waiting for a process that has died, hangs or
    runs another program), prints every thread's stack and calls ``on_timeout`` (default:
    exit the process with status 3), instead of waiting forever."""

    def __init__(self, bound: float, on_timeout: Callable[[str], None] | None = None):
        self.bound = float(bound)
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._on_timeout = on_timeout or _exit_now
        self._thread = None

    def progress(self) -> None:
        self._last = time.monotonic()

    def __enter__(self) -> Watchdog:
        global _active
        _active = self
        if self.bound > 0:
            self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        global _active
        _active = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(min(self.bound / 4, 10.0)):
            idle = time.monotonic() - self._last
            if idle > self.bound:
                message = (
                    f"Process {jax.process_index()}: no progress for {idle:.0f} s "
                    f"(config.collective_timeout_s={self.bound:g}); another process of the run "
                    "has stopped or hangs. Ending this one; its last checkpoint stands."
                )
                logging.error(message)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                self._on_timeout(message)
                return


def _exit_now(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    os._exit(3)  # the main thread is blocked in a collective: nothing else ends it
