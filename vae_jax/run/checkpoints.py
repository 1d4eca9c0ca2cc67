"""Checkpoints of a run's workdir.

- ``workdir/checkpoints/<step>/``: the periodic checkpoints, written by orbax's
  `CheckpointManager` (asynchronous; a checkpoint appears under its final name only once it is
  complete, so a kill mid-save leaves the previous ones usable). Each holds the whole
  unreplicated `TrainState` (parameters, optimizer state, step, PRNG key, guard counters) and a
  JSON ``meta`` item (epoch, position in the epoch, data seed, whether the state was
  ``good``: finite parameters, saved outside a run of skipped steps, …). Kept (orbax's
  preservation policies): the last ``keep``, every ``keep_period``-th step (so the last
  checkpoint written before a divergence outlives the rotation), and the one with the best
  (lowest) validation metric passed with its save.
  Integrity: the meta item holds the sha256 of the state (`state_digest`), taken before the
  save; a restore recomputes it. A checkpoint that cannot be read or does not match (flipped
  bytes, a truncated or missing file) raises `CorruptCheckpointError`; `restore_latest` then
  moves it aside to ``workdir/checkpoints_corrupt/`` with a warning and uses the one before.
- ``workdir/best/``: the parameters of the best evaluation so far (``save``/``load``): msgpack
  plus ``info.json``, each written to a temporary file then renamed into place. ``info.json``
  holds the sha256 of the msgpack bytes (`PARAMS_DIGEST`), checked by every read
  (`read_best`): flipped bytes, a truncated file or an unreadable ``info.json`` raise
  `CorruptCheckpointError` naming the file. A ``best/`` written before digests is read with a
  warning that it is unverified.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import serialization
from orbax.checkpoint import checkpoint_managers

from vae_jax.run import files

CHECKPOINTS = "checkpoints"
CORRUPT = "checkpoints_corrupt"
BEST_METRIC = "valid_ppl_bound"

PARAMS, INFO = "params.msgpack", "info.json"


STATE_DIGEST = "state_sha256"
PARAMS_DIGEST = "params_sha256"  # in best/info.json: sha256 of best/params.msgpack's bytes


def state_digest(tree: Any) -> str:
    """sha256 over a pytree's leaves (path, dtype, shape and bytes, in path order): the same
    for a state and for its restored copy, whether restored into a target or as dicts."""
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    keyed = sorted((jax.tree_util.keystr(p, simple=True, separator="/"), x) for p, x in leaves)
    for key, x in keyed:
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.integer) or x.dtype == bool:
            x = x.astype(np.int64)  # a restore target may widen an int (the step: int32→int64)
        x = np.ascontiguousarray(x)
        h.update(f"{key}:{x.dtype.str}:{x.shape};".encode())
        h.update(x.tobytes())
    return h.hexdigest()


class CorruptCheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose state does not match its recorded digest."""


class UnverifiedCheckpointError(CorruptCheckpointError):
    """A readable checkpoint without a digest: written by a vae_jax from before digests."""


def save(directory: str, params: Any, info: Mapping[str, Any]) -> None:
    """Writes ``params`` (a host pytree) and ``info`` into ``directory``; params first, then
    ``info.json`` with the params' digest, so a present ``info.json`` vouches for the
    ``params.msgpack`` beside it."""
    os.makedirs(directory, exist_ok=True)
    data = serialization.to_bytes(params)
    info = {**info, PARAMS_DIGEST: hashlib.sha256(data).hexdigest()}
    files.write_atomic(os.path.join(directory, PARAMS), data)
    files.write_atomic(os.path.join(directory, INFO), json.dumps(info, indent=1).encode())


def read_info(directory: str) -> dict:
    """``directory/info.json`` (a ``best/``); `CorruptCheckpointError` naming it if unreadable."""
    path = os.path.join(directory, INFO)
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:  # a torn or bit-flipped JSON, a non-UTF-8 byte
        raise CorruptCheckpointError(f"{path} cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(info, dict):
        raise CorruptCheckpointError(f"{path} is not a JSON object")
    return info


def read_best(directory: str) -> tuple[bytes, dict]:
    """The msgpack bytes and info of a ``best/`` directory, the bytes checked against the
    digest in ``info.json`` (`CorruptCheckpointError` naming the file if they differ)."""
    path = os.path.join(directory, PARAMS)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no parameter snapshot at {path}")
    with open(path, "rb") as f:
        data = f.read()
    info = read_info(directory)
    want = info.pop(PARAMS_DIGEST, None)
    if want is None:
        # Written before digests: refusing it would make old runs unreadable.
        logging.warning("%s: no %s in %s (written before digests); unverified.", path,
                        PARAMS_DIGEST, INFO)  # fmt: skip
    else:
        have = hashlib.sha256(data).hexdigest()
        if have != want:
            raise CorruptCheckpointError(
                f"{path} does not match the digest in {INFO} (sha256 {have[:12]}…, saved "
                f"{want[:12]}…): damaged, or a save interrupted between its two files"
            )
    return data, info


def load(directory: str, target: Any) -> tuple[Any, dict]:
    """Parameters shaped like ``target`` and the info saved with them (checked: `read_best`)."""
    data, info = read_best(directory)
    return serialization.from_bytes(target, data), info


def restore_params(workdir: str, which: str = "best") -> tuple[Any, dict]:
    """Parameters (nested dict of numpy arrays) and info of one of a run's checkpoints.

    ``which``: ``"best"`` (lowest valid PPL bound, ``workdir/best``), ``"last"`` or a step
    number (the periodic checkpoints under ``workdir/checkpoints``).
    """
    if which == "best":
        path = os.path.join(workdir, "best", PARAMS)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{workdir}: no best checkpoint at {path} (a run saves one after an evaluation "
                "on a split named 'valid'); try --checkpoint=last."
            )
        data, info = read_best(os.path.join(workdir, "best"))
        try:
            return serialization.msgpack_restore(data), info
        except Exception as e:  # noqa: BLE001  (an unverified file that does not decode)
            raise CorruptCheckpointError(f"{path} cannot be decoded ({e})") from e
    manager = Checkpointer(workdir, read_only=True)
    steps = manager.steps()
    if not steps:
        raise FileNotFoundError(f"{workdir}: no checkpoint under {manager.directory}")
    if which == "last":
        latest = manager.restore_latest()
        manager.close()
        if latest is None:
            raise CorruptCheckpointError(f"{workdir}: none of the checkpoints {steps} is usable.")
        step, state, meta = latest
        return jax.device_get(state["params"]), {"step": step, **meta}
    else:
        try:
            step = int(which)
        except ValueError:
            raise ValueError(f"checkpoint={which!r}: must be 'best', 'last' or a step") from None
        if step not in steps:
            raise FileNotFoundError(f"{workdir}: no checkpoint at step {step}; have {steps}")
    state, meta = manager.restore(step)
    manager.close()
    return jax.device_get(state["params"]), {"step": step, **meta}


@dataclasses.dataclass
class _Protected(checkpoint_managers.PreservationPolicy):
    """Keeps the steps in ``steps``, a set that grows while the run goes on (`protect`)."""

    steps: set[int] = dataclasses.field(default_factory=set)

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        del context
        return [c.step in self.steps for c in checkpoints]


class Checkpointer:
    """Periodic checkpoints of one workdir (see the module docstring)."""

    def __init__(self, workdir: str, keep: int = 3, read_only: bool = False, keep_period: int = 0):
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINTS))
        if read_only:
            options = ocp.CheckpointManagerOptions(create=False, read_only=True)
        else:
            self._protected = _Protected()
            policies = [checkpoint_managers.LatestN(keep), self._protected]
            if keep_period > 0:
                policies.append(checkpoint_managers.EveryNSteps(keep_period))
            policies.append(  # lowest validation metric; checkpoints without one: the others
                checkpoint_managers.BestN(
                    get_metric_fn=lambda m: m[BEST_METRIC],
                    reverse=True,
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
            options = ocp.CheckpointManagerOptions(
                preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies)
            )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._read_only = read_only
        self.moved: list[tuple[int, str]] = []  # (step, where) of those `quarantine` moved

    def quarantine(self, step: int) -> str:
        """Moves checkpoint ``step`` out of the way (it would otherwise block a new save at
        that step); returns where it went."""
        target = os.path.join(os.path.dirname(self.directory), CORRUPT, f"{step}-{time.time():.0f}")
        if jax.process_index() == 0:  # a multi-process run's other processes wait for it
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), target)
        self.moved.append((step, target))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"quarantine {step}")
        self._manager.reload()
        return target

    def restore_latest(self, target: Any = None) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the latest checkpoint that restores and matches its digest;
        the ones after it are moved aside (`quarantine`) with a warning. None if none is."""
        for step in reversed(self.steps()):
            try:
                state, meta = self.restore(step, target)
                return step, state, meta
            except UnverifiedCheckpointError:
                raise  # not damaged: moving it aside would silently restart the run
            except CorruptCheckpointError as e:
                moved = self.quarantine(step) if not self._read_only else "(left: read-only)"
                logging.warning("%s; moved to %s, trying the one before.", e, moved)
        return None

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def protect(self, step: int) -> None:
        """Keeps checkpoint ``step`` whatever the rotation (the last one before a divergence)."""
        self._protected.steps.add(int(step))

    @property
    def protected(self) -> list[int]:
        return sorted(self._protected.steps)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(
        self, step: int, state: Any, meta: Mapping[str, Any], valid_metric: float | None = None
    ) -> None:
        """Starts writing ``state`` (an unreplicated pytree) and ``meta``; returns at once.

        ``valid_metric`` (lower is better; a finite one only) ranks it for the best-kept one.
        """
        if step in self._manager.all_steps():
            return  # already saved (e.g. the end of an epoch that is also a periodic step)
        # The digest travels inside the checkpoint: a finished checkpoint always has it.
        meta = {**meta, STATE_DIGEST: state_digest(state)}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))
        )
        metrics = None
        if valid_metric is not None and math.isfinite(valid_metric):
            metrics = {BEST_METRIC: float(valid_metric)}
        self._manager.save(step, args=args, metrics=metrics, force=True)

    def meta(self, step: int) -> dict:
        """The ``meta`` item saved with ``step``."""
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored.meta)

    def last_good_step(self, before: int | None = None) -> int | None:
        """The latest step (below ``before``, if given) whose meta says its state was good:
        finite parameters, saved while no step was being skipped. None if there is none."""
        for step in reversed(self.steps()):
            if before is not None and step >= before:
                continue
            if self.meta(step).get("good", False):
                return step
        return None

    def restore(self, step: int, target: Any = None) -> tuple[Any, dict]:
        """The state saved at ``step``, shaped like ``target`` (else as nested dicts).

        Raises `CorruptCheckpointError` naming the step if it cannot be read or its state does
        not match the digest saved with it (flipped bytes, a truncated or missing file).
        """
        abstract = None if target is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        where = f"checkpoint {step} in {self.directory}"
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:  # noqa: BLE001  (orbax / TensorStore / JSON errors alike)
            message = str(e).splitlines()[0][:300] if str(e) else ""
            raise CorruptCheckpointError(
                f"{where} cannot be read ({type(e).__name__}: {message})"
            ) from e
        meta = dict(restored.meta)
        want = meta.pop(STATE_DIGEST, None)
        if want is None:
            raise UnverifiedCheckpointError(
                f"{where} has no {STATE_DIGEST} in its meta: written by an older vae_jax, whose "
                "checkpoints this one neither verifies nor resumes (start another workdir)"
            )
        have = state_digest(jax.device_get(restored.state))
        if have != want:
            raise CorruptCheckpointError(
                f"{where} does not match its digest (sha256 {have[:12]}…, saved {want[:12]}…)"
            )
        return restored.state, meta

    def wait(self) -> None:
        """Blocks until the saves in flight are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
