"""Host-side settings that make the CPU backend fast.

glibc's malloc serves large blocks with ``mmap`` and returns them with ``munmap`` on free, so
each train step's multi-megabyte XLA temporaries land on fresh pages, and every 4 KiB page
faults on first touch (about 3 µs each on a small VM: tens of ms per PTB-size step). Raising
the mmap and trim thresholds keeps freed blocks in the heap for the next step to reuse
(`keep_freed_memory`). Blocks above glibc's 32 MiB cap on that threshold (PTB logits at longer
lengths, the 1024-unit model's output layer) are still mapped afresh; glibc's
``glibc.malloc.hugetlb=1`` tunable backs them with transparent huge pages, one fault per 2 MiB
instead of per 4 KiB. Tunables are read at process start, hence `reexec_with_malloc_tunables`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from absl import logging

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8
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
    # mmap threshold is capped by glibc at HEAP_MAX (32 MiB on 64-bit) and fails above it.
    ok = mallopt(_M_MMAP_THRESHOLD, min(threshold_bytes, 32 << 20)) == 1
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
