"""A run's workdir: what a run leaves behind, and how readers get it back.

    WORKDIR/config.json       the config the run trains with (checked on resume)
    WORKDIR/data.json         the data's fingerprint and vocabulary (checked by every reader)
    WORKDIR/vocab.json        the vocabulary itself, and
    WORKDIR/eval_splits.npz   the evaluation splits' batches (text corpora): a reader of the run
                              whose corpus is gone uses these (`store_data`, `reader_data`)
    WORKDIR/platform.json     backend, devices, layers, precision of each start (`backend`)
    WORKDIR/lock              held by the one process training here
    WORKDIR/metrics.jsonl     one record per logged step (`vae_jax.run.writers`)
    WORKDIR/checkpoints/      periodic orbax checkpoints of the whole state
    WORKDIR/best/             the parameters of the best valid PPL bound, and their figures
    WORKDIR/members/<k>/      a population's member k (`vae_jax.run.population`): its own config,
                              data.json, metrics and best/; the checkpoints hold all members

The training loop (`vae_jax.run.loop`) writes a workdir; `evaluate`, `generate` and the
experiment scripts read one through `vae_jax.run.build.load_run`, without importing the loop.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import socket
import time
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from vae_jax.data import batching, text
from vae_jax.run import checkpoints, files

CONFIG, METRICS, BEST, DATA = "config.json", "metrics.jsonl", "best", "data.json"


# --- The saved config ------------------------------------------------------------------------


def eval_results_path(run_dir: str, split: str) -> str:
    """Where ``python -m vae_jax.evaluate`` writes a run's scores on ``split``."""
    return os.path.join(run_dir, f"eval_{split}.json")


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes ``config.json`` whole or not at all (a reader never sees half of it)."""
    path = os.path.join(workdir, CONFIG)
    files.write_atomic(path, config.to_json_best_effort(indent=1))


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The run's ``config.json`` as a ConfigDict."""
    path = os.path.join(workdir, CONFIG)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--workdir={workdir}: no {path} (written when a run starts).")
    with open(path, encoding="utf-8") as f:
        return ml_collections.ConfigDict(json.load(f))


def check_workdir_config(
    config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool
) -> None:
    """Refuses a workdir whose ``config.json`` differs from ``config``, naming the keys.

    A key the saved config lacks (a field added to the code since the run started) is no
    change: it is logged and takes its current value, so new code resumes old runs. A key
    whose value differs, or one the current config lacks, is refused unless
    ``allow_config_change``.
    """
    path = os.path.join(workdir, CONFIG)
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        old = _flatten(json.load(f))
    new = _flatten(json.loads(config.to_json_best_effort()))
    added = sorted(new.keys() - old.keys())
    if added:
        logging.warning(
            "%s: fields added since its run started, taken at their current values: %s",
            workdir,
            ", ".join(f"{k}={new[k]!r}" for k in added),
        )
    diff = sorted(k for k in old.keys() if k not in new or old[k] != new[k])
    if diff and not allow_config_change:
        lines = "\n".join(f"  {k}: {old[k]!r} -> {new.get(k, '<absent>')!r}" for k in diff)
        raise ValueError(
            f"{workdir} holds a run with a different config (workdir -> now):\n{lines}\n"
            "Use another --workdir, or pass --allow_config_change to continue it anyway."
        )
    if diff:
        logging.warning("Continuing %s with a changed config: %s", workdir, diff)


def flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``config`` as ``{dotted field: value}``, as ``config.json`` holds it."""
    return _flatten(json.loads(config.to_json_best_effort()))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


# --- The data a run is bound to ----------------------------------------------------------


class DataMismatchError(ValueError):
    """The data a reader would use is not the data the workdir's run was trained on."""


def data_record(config: ml_collections.ConfigDict, data: batching.Data) -> dict:
    """What identifies a run's data: its fingerprint, vocabulary size and vocabulary digest."""
    vocab = data.info.get("vocab")
    words = "\n".join(vocab.words) if vocab is not None else ""
    return {
        "name": config.data.name,
        "fingerprint": data.info["fingerprint"],
        "vocab_size": data.vocab_size,
        "vocab_sha256": hashlib.sha256(words.encode()).hexdigest() if vocab is not None else None,
    }


def bind_data(config: ml_collections.ConfigDict, data: batching.Data, workdir: str) -> None:
    """Records the run's data in ``data.json`` the first time; afterwards refuses other data
    (`DataMismatchError` naming both fingerprints) for resume, evaluation and generation alike.
    """
    path = os.path.join(workdir, DATA)
    now = data_record(config, data)
    if not os.path.exists(path):
        files.write_atomic(path, json.dumps(now, indent=1))
        return
    with open(path, encoding="utf-8") as f:
        then = json.load(f)
    if then != now:
        diff = ", ".join(
            f"{k}: {then.get(k)!r} -> {now.get(k)!r}" for k in now if then.get(k) != now.get(k)
        )
        raise DataMismatchError(
            f"{workdir} was trained on other data than config.data gives now ({diff}; run "
            f"fingerprint {then.get('fingerprint')}, now {now['fingerprint']}). Point "
            "config.data.data_dir (or --data_dir) at the corpus the run was trained on."
        )


# --- The data a reader needs, stored in the workdir ---------------------------------------

VOCAB, SPLITS = "vocab.json", "eval_splits.npz"


def stores_data(config: ml_collections.ConfigDict) -> bool:
    """Whether a run of ``config`` stores its vocabulary and evaluation splits: a text corpus
    (a dialog corpus's readers need its dialogs; the synthetic task is made from the config)."""
    return config.data.name in text.CORPORA


def store_data(config: ml_collections.ConfigDict, data: batching.Data, workdir: str) -> None:
    """Writes ``vocab.json`` and ``eval_splits.npz`` unless there: what `evaluate` and
    `generate` need of the corpus (only after `bind_data` accepted ``data``)."""
    if not stores_data(config) or os.path.exists(os.path.join(workdir, SPLITS)):
        return
    vocab = data.info["vocab"]
    files.write_atomic(
        os.path.join(workdir, VOCAB),
        json.dumps({"words": list(vocab.words), "unk_token": vocab.unk_token}),
    )
    arrays = {
        f"{split}/{i:06d}/{field}": value
        for split, batches in data.eval_splits.items()
        for i, batch in enumerate(batches)
        for field, value in batch.items()
    }
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    files.write_atomic(os.path.join(workdir, SPLITS), buffer.getvalue())  # written last


def stored_data(config: ml_collections.ConfigDict, workdir: str) -> batching.Data:
    """The `batching.Data` a reader needs (vocabulary, evaluation splits) from the
    workdir's `store_data` files, checked against ``data.json``; no training stream."""
    with open(os.path.join(workdir, VOCAB), encoding="utf-8") as f:
        stored = json.load(f)
    vocab = text.Vocab(stored["words"], stored["unk_token"])
    with open(os.path.join(workdir, DATA), encoding="utf-8") as f:
        record = json.load(f)
    digest = hashlib.sha256("\n".join(vocab.words).encode()).hexdigest()
    if digest != record["vocab_sha256"]:
        raise DataMismatchError(
            f"{os.path.join(workdir, VOCAB)}: not the vocabulary {os.path.join(workdir, DATA)} "
            "records; pass --data_dir=<the run's corpus> to read it from there."
        )
    splits: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    with np.load(os.path.join(workdir, SPLITS)) as arrays:
        for name in arrays.files:
            split, i, field = name.split("/")
            splits.setdefault(split, {}).setdefault(int(i), {})[field] = arrays[name]

    def no_training(step: int):
        raise RuntimeError(f"{workdir}: stored data has no training split; train on the corpus.")

    return batching.Data(
        vocab_size=len(vocab),
        train=no_training,
        eval_splits={s: [b[i] for i in sorted(b)] for s, b in splits.items()},
        steps_per_epoch=None,
        info={"vocab": vocab, "fingerprint": record["fingerprint"], "stored_in": workdir},
    )


# --- Resuming --------------------------------------------------------------------------------


def truncate_metrics(workdir: str, step: int) -> None:
    """Drops the records after ``step`` from ``metrics.jsonl``: a resumed run writes them again.

    An incomplete last record (a crash or a full disk mid-write) is dropped with a warning; an
    unreadable record before it is an error naming the file and line.
    """
    path = os.path.join(workdir, METRICS)
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number < len(lines) and any(rest.strip() for rest in lines[number:]):
                raise ValueError(
                    f"{path}:{number}: not a JSON record ({e.msg}); records follow it, so this "
                    "is not a torn last line. Repair or remove the file to resume."
                ) from None
            logging.warning("%s:%d: dropping an incomplete last record %.60r", path, number, line)
            continue
        if record["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    files.write_atomic(path, "".join(kept))


class HistoryAtRiskError(RuntimeError):
    """A run would start again from step 0 over a workdir that holds an earlier run's record."""


def history(directories: list[str], checkpoint_every: int) -> list[str]:
    """The files in ``directories`` (a run's, or its members') that a start from step 0 would
    overwrite and that a checkpoint was due for: ``best/``, ``eval_*.json``, and
    ``metrics.jsonl`` with a record at or after ``checkpoint_every`` steps (records before the
    first checkpoint are what any resume drops)."""
    found = []
    for directory in directories:
        if os.path.isdir(os.path.join(directory, BEST)):
            found.append(os.path.join(directory, BEST) + "/")
        found += sorted(
            os.path.join(directory, n)
            for n in (os.listdir(directory) if os.path.isdir(directory) else ())
            if n.startswith("eval_") and n.endswith(".json")
        )
        path = os.path.join(directory, METRICS)
        if os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        step = json.loads(line)["step"]
                    except (ValueError, KeyError, TypeError):
                        continue
                    if step >= checkpoint_every:
                        found.append(path)
                        break
    return found


def check_fresh_start(
    workdir: str,
    directories: list[str],
    moved: list[tuple[int, str]],
    checkpoint_every: int,
    start_over: bool,
) -> None:
    """Before a run starts from step 0: refuses (`HistoryAtRiskError`) when ``workdir`` holds
    an earlier run's history (`history`) and no checkpoint to resume it, naming what is
    damaged (``moved`` now, and what ``checkpoints_corrupt/`` already held) and what is intact;
    ``start_over`` moves that history to ``<dir>/superseded-<time>/`` instead and goes on."""
    intact = history(directories, checkpoint_every)
    if not intact:
        return
    corrupt = os.path.join(workdir, checkpoints.CORRUPT)
    damaged = [where for _, where in moved]
    if os.path.isdir(corrupt):
        damaged += [os.path.join(corrupt, n) for n in sorted(os.listdir(corrupt))]
    damaged = sorted(set(damaged))
    if not start_over:
        raise HistoryAtRiskError(
            f"{workdir}: no usable checkpoint to resume from "
            f"({'damaged: ' + ', '.join(damaged) if damaged else 'none in checkpoints/'}), but "
            f"it holds an earlier run's history (intact: {', '.join(intact)}); starting again "
            "from step 0 would overwrite it. Pass --start_over to start again (the history is "
            "moved to superseded-<time>/), or use another --workdir."
        )
    stamp = f"superseded-{time.strftime('%Y%m%d-%H%M%S')}"
    for path in intact:
        path = path.rstrip("/")
        target = os.path.join(os.path.dirname(path), stamp)
        os.makedirs(target, exist_ok=True)
        shutil.move(path, os.path.join(target, os.path.basename(path)))
    logging.warning("%s: starting again from step 0; the earlier history is in %s/.", workdir,
                    stamp)  # fmt: skip


class WorkdirLockedError(RuntimeError):
    """Another live process trains in this workdir."""


class WorkdirLock:
    """An exclusive lock on a workdir for one training process (``WORKDIR/lock``).

    ``flock`` on the file: the kernel releases it when the holder exits in any way (kill -9
    included), so a lock left by a dead process is simply taken over; the file's content (pid,
    host) names a live holder in the error.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "lock")
        self._file = None

    def __enter__(self) -> WorkdirLock:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        try:  # held until __exit__; a link planted there is refused, not followed
            f = files.open_nofollow(self.path, "a+")
        except OSError as e:  # a read-only workdir: one line, not a traceback
            raise files.NotWritableError(
                f"{self.path}: cannot open the workdir's lock for writing ({e.strerror or e}); "
                "a run needs a writable --workdir."
            ) from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise WorkdirLockedError(
                f"{os.path.dirname(self.path)} is in use by another training process ({holder}); "
                "wait for it to finish, or use another --workdir."
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.truncate(0)
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


# Valid figures a run may keep its best parameters by (lower is better): the PPL bound (the
# β = 1 ELBO per token), or Rec alone, for an autoencoder (β = 0), whose KL is no objective.
BEST_METRICS = ("ppl_bound", "rec")


def best_metric(config: ml_collections.ConfigDict) -> str:
    """``config.best_metric``; configs written before it existed kept the PPL bound."""
    return config.get("best_metric", "ppl_bound")


def best_value(workdir: str, metric: str = "ppl_bound") -> float:
    """The valid ``metric`` of the saved best parameters; inf if none are saved."""
    path = os.path.join(workdir, BEST, checkpoints.INFO)
    if not os.path.exists(path):
        return float("inf")
    info = checkpoints.read_info(os.path.join(workdir, BEST))
    try:
        return float(info["valid"][metric])
    except (KeyError, TypeError, ValueError):
        raise checkpoints.CorruptCheckpointError(f"{path}: no valid {metric!r} in it") from None


# --- Reading a run ---------------------------------------------------------------------------


def resolve_checkpoint(workdir: str, checkpoint: str) -> str:
    """``auto`` → ``best`` where the run has saved one (it evaluates a ``valid`` split), else
    ``last`` (every synthetic run); any other name is returned as it is."""
    if checkpoint != "auto":
        return checkpoint
    has_best = os.path.exists(os.path.join(workdir, BEST, checkpoints.PARAMS))
    return "best" if has_best else "last"
