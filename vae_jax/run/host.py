"""Host-side settings that make the CPU backend fast.

glibc's malloc serves large blocks with ``mmap`` and returns them with ``munmap`` on free, so
each train step's multi-megabyte XLA temporaries land on fresh pages, and every page faults on
first touch and is zeroed by the kernel (about 3 µs per 4 KiB page on a small VM: tens of ms per
PTB-size step). `keep_freed_memory` turns ``mmap`` off for malloc (``M_MMAP_MAX`` = 0; its
threshold alone is capped at 32 MiB, below XLA's per-step temporary buffer of 100–200 MB) and
raises the trim threshold, so every block comes from the heap and freed blocks stay there for the
next step to reuse: after the first steps a train step touches no new page. glibc's
``glibc.malloc.hugetlb=1`` tunable backs the heap with transparent huge pages while it grows (one
fault per 2 MiB instead of per 4 KiB); tunables are read at process start, hence
`reexec_with_malloc_tunables`.

Both change the whole process, so only entry points call them (`tune_cpu_host`: ``main``,
``evaluate``, ``generate``, the benchmarks), never the library, and only when JAX is going to
run on the CPU (`cpu_backend_expected`). ``VAE_JAX_NO_REEXEC=1`` keeps the process as started.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import os
import sys

from absl import logging

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -3, -4, -8
_applied = False


def keep_freed_memory(threshold_bytes: int = 1 << 30) -> bool:
    """Raises glibc's mmap/trim thresholds and uses one arena (no-op without glibc).

    Call before the first computation: arenas already made by worker threads stay.

    Returns whether the settings were applied. Costs resident memory (freed blocks stay
    mapped), not time; once per process.
    """
    global _applied
    if _applied:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    # mmap threshold is capped by glibc at HEAP_MAX (32 MiB on 64-bit) and fails above it;
    # larger blocks (XLA's temporary buffer) would still be mapped afresh every step, so malloc
    # is told not to use mmap at all.
    ok = mallopt(_M_MMAP_THRESHOLD, min(threshold_bytes, 32 << 20)) == 1
    ok &= mallopt(_M_MMAP_MAX, 0) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, threshold_bytes) == 1
    ok &= mallopt(_M_TOP_PAD, 256 << 20) == 1
    # XLA's worker threads would otherwise get arenas of their own, which glibc shrinks
    # (unmaps) eagerly whatever the trim threshold: one shared arena keeps its pages.
    ok &= mallopt(_M_ARENA_MAX, 1) == 1
    _applied = ok
    logging.info("glibc malloc thresholds raised: %s", ok)
    return ok


TUNABLE = "glibc.malloc.hugetlb=1"


def reexec_with_malloc_tunables(module: str | None = None) -> None:
    """Restarts ``python -m module argv…`` (``python script argv…`` without ``module``) with
    ``GLIBC_TUNABLES`` including `TUNABLE`.

    Linux only, once (the variable marks the restarted process), and never under
    ``VAE_JAX_NO_REEXEC=1``. Call first thing in a command-line entry point, before jax loads.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if not sys.platform.startswith("linux") or "glibc.malloc.hugetlb" in tunables:
        return
    if os.environ.get("VAE_JAX_NO_REEXEC") == "1":
        return
    env = {**os.environ, "GLIBC_TUNABLES": ":".join(t for t in (tunables, TUNABLE) if t)}
    sys.stdout.flush()
    sys.stderr.flush()
    command = ["-m", module] if module else [sys.argv[0]]
    os.execve(sys.executable, [sys.executable, *command, *sys.argv[1:]], env)


# Distributions that give JAX an accelerator backend.
_ACCELERATOR_PLUGINS = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu", "jax-tpu")


def cpu_backend_expected() -> bool:
    """Whether JAX will run on the CPU, decided without starting JAX (whose backend start
    would spawn the threads these settings must precede): ``JAX_PLATFORMS`` when set (its
    first entry), else whether no accelerator plugin (CUDA, ROCm, TPU) is installed."""
    platforms = os.environ.get("JAX_PLATFORMS") or os.environ.get("JAX_PLATFORM_NAME")
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith(_ACCELERATOR_PLUGINS):
            return False
    return True


def tune_cpu_host(module: str | None = None) -> bool:
    """The entry points' host set-up on the CPU backend: re-exec with `TUNABLE`, then
    `keep_freed_memory`. Call first thing, before jax computes anything (importing it is fine).
    ``module``: see `reexec_with_malloc_tunables`. Returns whether the settings apply."""
    if not cpu_backend_expected():
        return False
    reexec_with_malloc_tunables(module)
    return keep_freed_memory()
