"""A run's workdir: what a run leaves behind, and how readers get it back.

    WORKDIR/config.json       the config the run trains with (checked on resume)
    WORKDIR/data.json         the data's fingerprint and vocabulary (checked by every reader)
    WORKDIR/vocab.json        the vocabulary itself, and
    WORKDIR/eval_splits.npz   the evaluation splits' batches (text corpora): a reader of the run
                              whose corpus is gone uses these (`store_data`, `reader_data`)
    WORKDIR/platform.json     backend, devices, layers, precision of each start (`backend`)
    WORKDIR/lock              held by the one process training here
    WORKDIR/metrics.jsonl     one record per logged step (`vae_jax.writers`)
    WORKDIR/checkpoints/      periodic orbax checkpoints of the whole state
    WORKDIR/best/             the parameters of the best valid PPL bound, and their figures
    WORKDIR/members/<k>/      a population's member k (`vae_jax.population`): its own config,
                              data.json, metrics and best/; the checkpoints hold all members

`train` writes a workdir; `evaluate`, `generate` and the experiment scripts read one through
`load_run`, without importing the training loop. `make_model` is the one place a config becomes
a model, and `eval_key` the one key every evaluation of a run draws its noise from.
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

import jax
import ml_collections
import numpy as np
from absl import logging

from vae_jax import checkpoints, cvae, files, forward, input_pipeline, models, population, savae
from vae_jax.datasets import text

CONFIG, METRICS, BEST, DATA = "config.json", "metrics.jsonl", "best", "data.json"


def make_model(
    config: ml_collections.ConfigDict, vocab_size: int, num_topics: int = 0
) -> models.VAE | cvae.CVAE:
    """The model of ``config.model``: a `cvae.CVAE` where ``kind`` is "cvae" (``num_topics``
    from its data), else the VAE, an `savae.SAVAE` (refined by SVI) when svi_steps > 0."""
    # Lists (a config read back from JSON) as tuples: a module is a static, hashed argument.
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in config.model.to_dict().items()}
    if fields.pop("kind", "vae") == "cvae":
        if num_topics < 1:
            raise ValueError("make_model: a CVAE needs the number of topics of its data.")
        return cvae.CVAE(vocab_size=vocab_size, num_topics=num_topics, **fields)
    if fields.get("svi_steps", 0) > 0:
        return savae.SAVAE(vocab_size=vocab_size, **fields)
    fields = {k: v for k, v in fields.items() if k not in savae.SVI_FIELDS}
    return models.VAE(vocab_size=vocab_size, **fields)


def eval_key(config: ml_collections.ConfigDict) -> jax.Array:
    """The key of a run's ELBO evaluation, in training and in `vae_jax.evaluate` alike, so
    that the two report the same figures for the same parameters."""
    return jax.random.PRNGKey(config.seed + 1)


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


def data_record(config: ml_collections.ConfigDict, data: input_pipeline.Data) -> dict:
    """What identifies a run's data: its fingerprint, vocabulary size and vocabulary digest."""
    vocab = data.info.get("vocab")
    words = "\n".join(vocab.words) if vocab is not None else ""
    return {
        "name": config.data.name,
        "fingerprint": data.info["fingerprint"],
        "vocab_size": data.vocab_size,
        "vocab_sha256": hashlib.sha256(words.encode()).hexdigest() if vocab is not None else None,
    }


def bind_data(config: ml_collections.ConfigDict, data: input_pipeline.Data, workdir: str) -> None:
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


def store_data(config: ml_collections.ConfigDict, data: input_pipeline.Data, workdir: str) -> None:
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


def stored_data(config: ml_collections.ConfigDict, workdir: str) -> input_pipeline.Data:
    """The `input_pipeline.Data` a reader needs (vocabulary, evaluation splits) from the
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

    return input_pipeline.Data(
        vocab_size=len(vocab),
        train=no_training,
        eval_splits={s: [b[i] for i in sorted(b)] for s, b in splits.items()},
        steps_per_epoch=None,
        info={"vocab": vocab, "fingerprint": record["fingerprint"], "stored_in": workdir},
    )


def reader_data(
    config: ml_collections.ConfigDict, workdir: str, data_dir: str | None = None
) -> input_pipeline.Data:
    """A reader's data: the corpus where it can be read (checked against ``data.json``, and
    stored in the workdir if it was not), else the workdir's stored copy (`stored_data`). A
    text run with neither fails naming the file it lacks and what to do."""
    has_copy = stores_data(config) and os.path.exists(os.path.join(workdir, SPLITS))
    try:
        data = input_pipeline.get_data(config)
    except (FileNotFoundError, ValueError) as e:
        if has_copy and not data_dir:
            logging.info(
                "%s: the corpus cannot be read (%s); the workdir's copy is used.", workdir, e
            )
            return stored_data(config, workdir)
        if stores_data(config) and not has_copy:
            raise FileNotFoundError(
                f"{os.path.join(workdir, VOCAB)}: absent (a workdir written by an older "
                f"vae_jax) and the corpus cannot be read ({e}). Pass --data_dir=<the corpus "
                "the run was trained on> once: the workdir then stores its vocabulary and "
                "splits."
            ) from None
        raise
    if os.path.exists(os.path.join(workdir, DATA)):  # workdirs from before data.json: unchecked
        bind_data(config, data, workdir)
        store_data(config, data, workdir)
    return data


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


def check_params(model: models.VAE, params: Any, where: str) -> None:
    """Raises ``ValueError`` naming ``where`` unless ``params`` has the shapes ``model`` makes."""
    example = forward.example_batch(model)
    fresh = jax.eval_shape(lambda: forward.init(model, jax.random.PRNGKey(0), example))
    expected = {"params": fresh}
    want = {
        jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(expected)
    }
    have = {
        jax.tree_util.keystr(p): np.shape(x)
        for p, x in jax.tree_util.tree_leaves_with_path({"params": params})
    }
    if want != have:
        diff = sorted(
            f"{k}: checkpoint {have.get(k, 'missing')}, config {want.get(k, 'missing')}"
            for k in set(want) | set(have)
            if want.get(k) != have.get(k)
        )
        raise ValueError(
            f"{where}: parameters do not match the model of config.model: " + "; ".join(diff[:5])
        )


def resolve_checkpoint(workdir: str, checkpoint: str) -> str:
    """``auto`` → ``best`` where the run has saved one (it evaluates a ``valid`` split), else
    ``last`` (every synthetic run); any other name is returned as it is."""
    if checkpoint != "auto":
        return checkpoint
    has_best = os.path.exists(os.path.join(workdir, BEST, checkpoints.PARAMS))
    return "best" if has_best else "last"


def load_run(
    workdir: str, checkpoint: str = "auto", data_dir: str | None = None, member: int | None = None
) -> tuple[ml_collections.ConfigDict, input_pipeline.Data, models.VAE, Any, dict]:
    """Config, data, model, parameters and checkpoint info of a run's workdir.

    ``checkpoint``: ``best`` (lowest valid PPL bound), ``last``, a step number, or ``auto``
    (`resolve_checkpoint`); the info's ``checkpoint`` says which was loaded.
    ``data_dir`` overrides ``config.data.data_dir`` (corpora moved since training).
    ``member``: which member of a population (`vae_jax.population`) workdir; its own config
    and ``best/`` are under ``WORKDIR/members/<k>/``, its slice of the population's
    checkpoints under ``WORKDIR/checkpoints/``. The info's ``run_dir`` is the directory of
    the run read (the member's for a population), where its readers write their results.
    """
    files.check_local_path(workdir)
    config = load_config(workdir)
    run_dir = workdir
    if population.is_population(config):
        k = population.size(config)
        if member is None or not 0 <= member < k:
            raise ValueError(
                f"--workdir={workdir} holds a population of {k} members: pass --member=<k> "
                f"with k in 0..{k - 1} (got {member})."
            )
        run_dir = population.member_dir(workdir, member)
        config = load_config(run_dir)
    elif member not in (None, 0):
        raise ValueError(f"--member={member}: {workdir} is a single run, not a population.")
    if data_dir:
        config.data.data_dir = data_dir
    checkpoint = resolve_checkpoint(run_dir, checkpoint)
    if run_dir != workdir and checkpoint != "best":
        params, info = checkpoints.restore_params(workdir, checkpoint)
        params = jax.tree.map(lambda x: np.asarray(x)[member], params)
    else:
        params, info = checkpoints.restore_params(run_dir, checkpoint)
    info = {"checkpoint": checkpoint, "run_dir": run_dir, **info}
    data = reader_data(config, run_dir, data_dir)
    model = make_model(config, data.vocab_size, data.num_topics)
    check_params(model, params, f"{run_dir} checkpoint {checkpoint!r}")
    return config, data, model, params, info


def choose_split(data: input_pipeline.Data, split: str | None) -> str:
    """``split``, else ``test`` where the data has one, else its first evaluation split."""
    if not split:
        return "test" if "test" in data.eval_splits else next(iter(data.eval_splits))
    if split not in data.eval_splits:
        raise ValueError(f"--split={split}: this run's data has splits {sorted(data.eval_splits)}.")
    return split
