"""Whole-or-nothing file writes, for the small files a run keeps beside its checkpoints.

Imports nothing of the package (nor jax), so the sweep launcher can use it and start fast.
"""

from __future__ import annotations

import os


def write_atomic(path: str, data: bytes | str) -> None:
    """Writes ``data`` to ``path``: a reader, a crash or ``kill -9`` sees the old file or the new
    one, never part of it. The bytes go to ``<path>.tmp-<pid>`` (two processes never share it),
    are fsynced, then renamed over ``path`` (``os.replace`` is atomic on POSIX and Windows)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, Ctrl-C: no half-written temporary left behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check_local_path(path: str, flag: str = "--workdir") -> None:
    """Refuses an object-store path (``gs://``…): a run's metric writer, lock and small files
    need a file system, so one line names the alternative before anything runs."""
    if "://" in path:
        raise ValueError(
            f"{flag}={path}: object stores ({path.split('://')[0]}://) are not supported as a "
            "workdir; use a file system every host mounts (NFS or Filestore, or the bucket "
            "mounted with gcsfuse, e.g. /gcs/<bucket>/...) and pass that path."
        )
