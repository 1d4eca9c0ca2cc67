"""Where a run computes and how: backend and devices, matmul precision, the compilation cache.

- `matmul_precision(config)`: ``config.matmul_precision``, checked; `with_precision` applies
  it to a step function while it is traced, so the compiled program carries it.
- `describe(config)`: backend, device kind and count, processes, the layer set ``kernels =
  "auto"`` resolves to, dtype and precision; `record` logs it and appends it to
  ``WORKDIR/platform.json`` (one entry per start, so a run resumed elsewhere shows both).
- `enable_compilation_cache(path)`: JAX's persistent cache, for the command lines only (their
  ``main``); importing vae_jax changes no JAX setting.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from absl import logging

from vae_jax.core import kernels
from vae_jax.run import files

PLATFORM = "platform.json"
# jax.default_matmul_precision's names (the algorithm names it also takes are left out).
PRECISIONS = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32")
# Configs written before the field trained on the CPU, where every float32 dot is exact
# float32: "highest" is what they computed, so they read back as that.
DEFAULT_PRECISION = "highest"
DEFAULT_CACHE = os.path.join("~", ".cache", "vae_jax", "jax_cache")


def matmul_precision(config: ml_collections.ConfigDict) -> str:
    """``config.matmul_precision`` (`DEFAULT_PRECISION` where absent); ValueError naming the
    field for a name JAX does not know."""
    value = config.get("matmul_precision", DEFAULT_PRECISION)
    if value not in PRECISIONS:
        raise ValueError(
            f"config.matmul_precision={value!r}: must be one of {PRECISIONS} "
            "(jax.default_matmul_precision's names)."
        )
    return value


def with_precision(fn: Callable, precision: str | None) -> Callable:
    """``fn`` traced under ``jax.default_matmul_precision(precision)``: every dot it binds
    (the backward pass's too) carries that precision; None leaves ``fn`` as it is."""
    if precision is None:
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with jax.default_matmul_precision(precision):
            return fn(*args, **kwargs)

    return wrapper


def describe(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What this process computes on: backend, devices, processes, layers, dtype, precision."""
    model = config.model
    name = model.get("kernels", "auto")
    devices = jax.devices()
    return {
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "kernels": f"{name}->{kernels.resolve(name)}" if name == "auto" else name,
        "dtype": model.get("dtype", "float32"),
        "matmul_precision": matmul_precision(config),
        "jax": jax.__version__,
    }


def record(config: ml_collections.ConfigDict, workdir: str | None, primary: bool = True) -> dict:
    """Logs `describe` and, on the primary process, appends it (with the time) to
    ``WORKDIR/platform.json``."""
    info = describe(config)
    logging.info("Platform: %s", ", ".join(f"{k}={v}" for k, v in info.items()))
    if workdir is not None and primary:
        path = os.path.join(workdir, PLATFORM)
        entries = read_platform(workdir)
        entries.append({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **info})
        files.write_atomic(path, json.dumps(entries, indent=1))
    return info


def read_platform(workdir: str) -> list[dict]:
    """The entries of ``WORKDIR/platform.json``, oldest first ([] if none)."""
    path = os.path.join(workdir, PLATFORM)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def enable_compilation_cache(path: str) -> str | None:
    """Turns on JAX's persistent compilation cache in ``path`` ('' : off) unless one is set
    already (``JAX_COMPILATION_CACHE_DIR``, ``--jax_compilation_cache_dir``); returns the
    directory in use. Process-wide: for a command line's ``main``, never at import."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    if not path:
        return None
    path = os.path.expanduser(path)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    return path


class _QuietOrbax:
    """Drops orbax's INFO records (a sixth of a short run's log); warnings stay."""

    def filter(self, record) -> bool:
        import logging as std_logging

        quiet = f"{os.sep}orbax{os.sep}" in record.pathname
        return not (quiet and record.levelno < std_logging.WARNING)


def quiet_orbax_logging() -> None:
    """Filters orbax's INFO lines out of the absl log. For a command line's ``main``."""
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _QuietOrbax) for f in handler.filters):
        handler.addFilter(_QuietOrbax())
