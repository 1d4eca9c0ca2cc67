"""Whole-or-nothing file writes, for the small files a run keeps beside its checkpoints.

Imports nothing of the package (nor jax), so the sweep launcher can use it and start fast.
"""

from __future__ import annotations

import os

# Never through a symbolic link: a link planted in a workdir must not redirect a run's writes.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class NotWritableError(ValueError):
    """A directory a command must write to cannot be written (read-only, not a directory)."""


def check_writable(directory: str, what: str) -> None:
    """Raises `NotWritableError` starting with ``what`` unless a file can be created in
    ``directory`` (made if absent): before hours of work, not after them."""
    probe = os.path.join(directory, f".write-probe-{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644))
        os.remove(probe)
    except OSError as e:
        raise NotWritableError(f"{what}: cannot write in {directory} ({e.strerror or e})") from None


def open_nofollow(path: str, mode: str = "a", encoding: str = "utf-8", **kwargs):
    """``open(path, mode)`` for a text file a run writes, refusing a symbolic link at ``path``
    (`ValueError` naming it) instead of writing through it to its target."""
    flags = {
        "a": os.O_APPEND | os.O_CREAT,
        "a+": os.O_APPEND | os.O_CREAT | os.O_RDWR,
        "w": os.O_CREAT | os.O_TRUNC,
    }[mode]
    if "+" not in mode:
        flags |= os.O_WRONLY
    try:
        fd = os.open(path, flags | _NOFOLLOW, 0o644)
    except OSError:
        if os.path.islink(path):
            raise ValueError(
                f"{path} is a symbolic link; a run writes no file through one (remove it)"
            ) from None
        raise
    return os.fdopen(fd, mode, encoding=encoding, **kwargs)


def write_atomic(path: str, data: bytes | str) -> None:
    """Writes ``data`` to ``path``: a reader, a crash or ``kill -9`` sees the old file or the new
    one, never part of it. The bytes go to ``<path>.tmp-<pid>`` (two processes never share it;
    never through a link planted there), are fsynced, then renamed over ``path``
    (``os.replace`` is atomic on POSIX and Windows, and replaces a link at ``path`` itself, not
    its target)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
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
