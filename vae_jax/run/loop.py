"""The training loop: `train_and_evaluate`.

Builds the run (`vae_jax.run.build`), resumes it from its workdir (`vae_jax.run.workdirs`,
`vae_jax.run.checkpoints`), then steps (`vae_jax.run.steps`, or a population's vmapped step,
`vae_jax.run.population`), logs, evaluates, keeps the best parameters, checkpoints, and
applies the guards (`vae_jax.run.guards`) and early stopping.
"""

from __future__ import annotations

import collections
import contextlib
import os
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import jax_utils

from vae_jax.core import objectives, schedules
from vae_jax.data import batching
from vae_jax.run import (
    backend,
    build,
    checkpoints,
    config_checks,
    distributed,
    early_stopping,
    files,
    guards,
    population,
    steps,
    workdirs,
    writers,
)


def _bind_data(config, data: batching.Data, workdir: str, primary: bool) -> None:
    """Records the data in the workdir (the primary) or checks it against the record (the
    others): a resumed run, and every process, must see the data the run started on."""
    distributed.agree("data", workdirs.data_record(config, data))
    if primary:
        workdirs.bind_data(config, data, workdir)
        workdirs.store_data(config, data, workdir)  # so its readers need no corpus
    distributed.sync("data.json")
    if not primary:
        if not os.path.exists(os.path.join(workdir, workdirs.DATA)):
            raise RuntimeError(
                f"{workdir}: process {jax.process_index()} does not see the {workdirs.DATA} "
                "process 0 wrote; the workdir must be on a file system every host mounts (NFS, "
                "Filestore, gcsfuse)."
            )
        workdirs.bind_data(config, data, workdir)  # only checks: the primary has written it


def _member_records(members, dirs, data, start: int, metric: str, watch, primary: bool):
    """Each run's (a population's members') records made ready to go on from ``start``: its
    config and data (a member's own), its metrics after ``start`` dropped, a stale divergence
    record removed; returns the best valid ``metric`` of each so far."""
    is_population = watch.is_population
    bests = []
    for k, (member, directory) in enumerate(zip(members, dirs, strict=True)):
        if primary:
            if is_population:
                os.makedirs(directory, exist_ok=True)
                workdirs.save_config(member, directory)
                workdirs.bind_data(member, data, directory)
                workdirs.store_data(member, data, directory)
            workdirs.truncate_metrics(directory, start)
            stale = os.path.join(directory, guards.DIVERGED_FILE)  # from a divergence after `start`
            if is_population and k not in watch.diverged and os.path.exists(stale):
                os.remove(stale)
        bests.append(workdirs.best_value(directory, metric) if start else float("inf"))
    return bests


def _make_steps(config, model, members, steps_per_epoch, schedules_, objective, traces):
    """The pmapped train and eval steps and the evaluation key(s): a population's vmapped
    ones, one key per member, where ``config`` is a population."""
    spike_factor = config.loss_spike.factor
    precision = backend.matmul_precision(config)
    if population.is_population(config):
        p_train_step = population.make_p_population_step(
            model, members, steps_per_epoch, spike_factor=spike_factor, compilations=traces,
            precision=precision,
        )  # fmt: skip
        p_eval_step = population.make_p_population_eval_step(
            model, members, compilations=traces, precision=precision
        )
        return p_train_step, p_eval_step, jnp.stack([build.eval_key(m) for m in members])
    beta_fn, lr_fn = schedules_
    p_train_step = steps.make_p_train_step(
        model, beta_fn, lr_fn, objective, spike_factor=spike_factor, compilations=traces,
        precision=precision,
    )  # fmt: skip
    p_eval_step = steps.make_p_eval_step(model, objective, compilations=traces, precision=precision)
    return p_train_step, p_eval_step, build.eval_key(config)


def _train_record(step_metrics: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Averages per-step figures over the steps since the last log line; skipped steps
    (non-finite, loss spikes) are counted, not averaged."""
    per_step = []
    for m in step_metrics:
        if m["nonfinite"] or m["spike"]:
            continue
        rec, kl = m["rec"] / m["sequences"], m["kl"] / m["sequences"]
        per_step.append(
            {
                "grad_norm": m["grad_norm"],
                "rec": rec,
                "kl": kl,
                "elbo": -(rec + kl),
                "loss": m["loss"],  # the objective's: Rec + β·KL, or a remedy's
                "nll_per_token": m["rec"] / m["tokens"],
                **({"bow": m["bow"] / m["sequences"]} if "bow" in m else {}),  # a CVAE's
            }
        )
    record = {k: float(np.mean([p[k] for p in per_step])) for k in per_step[0]} if per_step else {}
    # The schedules' current values rather than their average over the interval.
    record.update(beta=float(step_metrics[-1]["beta"]), lr=float(step_metrics[-1]["lr"]))
    record["nonfinite_steps"] = float(sum(int(m["nonfinite"]) for m in step_metrics))
    record["spike_steps"] = float(sum(int(m["spike"]) for m in step_metrics))
    return record


def run_length(config: ml_collections.ConfigDict, steps_per_epoch: int | None) -> int:
    """Steps to train: ``num_epochs`` × steps per epoch when the config counts epochs."""
    if config.get("num_epochs", -1) > 0:
        if not steps_per_epoch:
            raise ValueError(
                f"config.num_epochs={config.num_epochs}: {config.data.name!r} has no epochs; "
                "set config.num_train_steps instead."
            )
        return config.num_epochs * steps_per_epoch
    if config.num_train_steps < 1:
        raise ValueError(
            f"config.num_train_steps={config.num_train_steps}: must be >= 1 "
            "(or set config.num_epochs)."
        )
    return config.num_train_steps


def keep_period(config: ml_collections.ConfigDict, steps_per_epoch: int | None) -> int:
    """Steps between checkpoints kept for good: ``checkpoint_keep_every_epochs`` epochs where
    given (the epoch-end checkpoints of every such epoch, e.g. each cycle's end), else
    ``checkpoint_keep_period`` steps (0: none)."""
    epochs = config.get("checkpoint_keep_every_epochs", 0)
    if epochs > 0:
        if not steps_per_epoch:
            raise ValueError(
                f"config.checkpoint_keep_every_epochs={epochs}: {config.data.name!r} has no "
                "epochs; set config.checkpoint_keep_period (steps) instead."
            )
        return epochs * steps_per_epoch
    return config.checkpoint_keep_period


def eval_interval(config: ml_collections.ConfigDict, steps_per_epoch: int | None) -> int:
    """``eval_every_epochs`` × steps per epoch where given, else ``eval_every_steps``."""
    if config.get("eval_every_epochs", -1) > 0 and steps_per_epoch:
        return config.eval_every_epochs * steps_per_epoch
    return config.eval_every_steps


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    callbacks: Sequence[steps.Callback] = (),
    allow_config_change: bool = False,
    start_over: bool = False,
) -> steps.TrainState:
    """Trains for ``num_train_steps`` (or ``num_epochs``) and returns the final state.

    Resumes from the latest checkpoint in ``workdir`` if there is one: the state and the data
    position are restored, so the run continues as if never stopped. Writes
    ``workdir/config.json``, ``metrics.jsonl``, TensorBoard events, periodic checkpoints (every
    ``checkpoint_every_steps``, at each epoch end and at the end) and, after each evaluation on
    a split named ``valid`` with a lower PPL bound than before, the parameters under
    ``workdir/best/``. SIGTERM and Ctrl-C save a checkpoint and raise `guards.TrainingInterrupted`.
    ``callbacks`` are called as ``callback(step, state)`` after every step (replicated state).
    With no usable checkpoint, a workdir holding an earlier run's history (``best/``, metrics
    past the first checkpoint) is refused unless ``start_over`` (`workdirs.check_fresh_start`).
    """
    files.check_local_path(workdir)
    num_devices = jax.local_device_count()
    config_checks.check_config(config, jax.device_count())  # all processes' devices
    # Several processes: a bound on waiting for the others, and the same run in all of them.
    bound = config.get("collective_timeout_s", 1800.0) if jax.process_count() > 1 else 0
    with distributed.Watchdog(bound):
        distributed.agree("config", workdirs.flat_config(config))
        return _locked_train_and_evaluate(
            config, workdir, callbacks, allow_config_change, start_over, num_devices
        )


def _locked_train_and_evaluate(
    config, workdir, callbacks, allow_config_change, start_over, num_devices
) -> steps.TrainState:
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:  # a name too long, a read-only parent: one line naming it
        raise files.NotWritableError(
            f"--workdir={workdir}: cannot create it ({e.strerror or e})"
        ) from None
    # A second run on this workdir stops here; a multi-process run's primary holds the lock.
    lock = workdirs.WorkdirLock(workdir) if distributed.is_primary() else contextlib.nullcontext()
    with lock:
        workdirs.check_workdir_config(config, workdir, allow_config_change)
        return _train_and_evaluate(config, workdir, callbacks, num_devices, start_over)


def _train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    callbacks: Sequence[steps.Callback],
    num_devices: int,
    start_over: bool = False,
) -> steps.TrainState:
    data = build.get_data(config)
    primary = distributed.is_primary()  # the one process that writes files besides checkpoints
    _bind_data(config, data, workdir, primary)
    steps_per_epoch = data.steps_per_epoch
    num_steps = run_length(config, steps_per_epoch)
    eval_every = eval_interval(config, steps_per_epoch)
    beta_fn, lr_fn = steps.make_schedules(config, steps_per_epoch)
    _warn_unfinished_warmup(config, steps_per_epoch, num_steps)
    objective = objectives.make(config)
    model = build.make_model(config, data.vocab_size, data.num_topics)
    # A single run is a population of one without the member axis; a population's member k
    # writes its own records under WORKDIR/members/<k>/ (vae_jax.run.population).
    is_population = population.is_population(config)
    members = population.members(config)
    dirs = [population.member_dir(workdir, k) for k in range(len(members))]
    dirs = dirs if is_population else [workdir]

    checkpointer = checkpoints.Checkpointer(
        workdir, keep=config.checkpoints_to_keep, keep_period=keep_period(config, steps_per_epoch)
    )
    example = jax.tree.map(lambda x: x[:1], next(data.train(0)))
    states = []
    for member in members:
        member_lr = steps.make_schedules(member, steps_per_epoch)[1]
        rng = jax.random.PRNGKey(member.seed)
        states.append(steps.create_train_state(member, model, member_lr, rng, example))
    state = population.stack_states(states) if is_population else states[0]
    start = 0
    latest = checkpointer.restore_latest(target=state)  # the latest whole one
    if latest is None and (primary or not start_over):  # only the primary moves files
        directories = [workdir] + (dirs if is_population else [])
        every = config.checkpoint_every_steps
        workdirs.check_fresh_start(workdir, directories, checkpointer.moved, every, start_over)
    distributed.sync("fresh start")
    saved = None  # the resumed checkpoint's meta
    if latest is not None:
        _, state, saved = latest
        start = int(np.max(state.step))
        logging.info("Resuming %s from step %d (%s).", workdir, start, saved)
    elif config.init_from:
        fresh = [build.init_params_from(config, model, s.params) for s in states]
        state = state.replace(params=population.stack_params(fresh) if is_population else fresh[0])
    watch = guards.Watch(config, checkpointer, dirs, is_population, primary, saved, start)
    if primary:
        workdirs.save_config(config, workdir)
    backend.record(config, workdir, primary)  # the log and platform.json name the backend
    metric = workdirs.best_metric(config)
    bests = _member_records(members, dirs, data, start, metric, watch, primary)
    stopping = None  # the early-stopping rule's state, replayed from the logged validations
    if early_stopping.enabled(config):
        records = writers.read_metrics(workdir) if start else []
        stopping = early_stopping.replay(records, config)
        if stopping.stopped:
            logging.info(
                "%s stopped early after %d validations (step %d): nothing to train.",
                workdir, stopping.validations, start,
            )  # fmt: skip
            num_steps = start

    def meta(step: int) -> dict:
        epoch, position = divmod(step, steps_per_epoch) if steps_per_epoch else (None, step)
        seed = batching.data_seed(config)
        return {"step": step, "epoch": epoch, "position": position, "data_seed": seed}

    def save(step: int, replicated_state, valid_ppl: float | None = None) -> None:
        host_state = jax.device_get(jax_utils.unreplicate(replicated_state))
        info = {**meta(step), **watch.health(host_state)}
        checkpointer.save(step, host_state, info, valid_metric=valid_ppl)
        watch.saved_steps.append(step)

    state = steps.replicate(state)
    traces = collections.Counter()  # pmap traces once per new batch shape, then compiles
    p_train_step, p_eval_step, eval_key = _make_steps(
        config, model, members, steps_per_epoch, (beta_fn, lr_fn), objective, traces
    )

    def member_metrics(step_metrics: dict, k: int) -> dict:
        """Member k's view of a step's metrics, (devices,) leaves as for a single run."""
        return jax.tree.map(lambda x: x[:, k], step_metrics) if is_population else step_metrics

    writers_ = [writers.MetricWriter(d) if primary else writers.NullWriter() for d in dirs]
    progress = writers.Progress(num_steps, initial=start, enabled=None if primary else False)
    batches: Iterator = _prefetch(data.train(start), num_devices)
    pending: list = []
    tick = time.time()
    logging.info(
        "Training steps %d..%d (%s steps/epoch) on %d device(s)%s.",
        start + 1,
        num_steps,
        steps_per_epoch,
        num_devices,
        f", {len(members)} members" if is_population else "",
    )
    step = start
    try:
        with guards.StopSignals() as stop:
            for step in range(start + 1, num_steps + 1):
                state, step_metrics = p_train_step(state, next(batches), *watch.frozen)
                distributed.progress()
                pending.append(step_metrics)
                for callback in callbacks:
                    callback(step, state)
                # One step behind, so the host does not wait for the step just dispatched.
                if len(pending) > 1:
                    watch.check(pending[-2], step - 1)
                if step % config.log_every_steps == 0 or step == num_steps:
                    fetched = jax.device_get(pending)
                    seconds = max(time.time() - tick, 1e-9)
                    for k, writer in enumerate(writers_):
                        views = [member_metrics(m, k) for m in fetched]
                        record = _train_record([jax.tree.map(lambda x: x[0], v) for v in views])
                        record["steps_per_second"] = len(pending) / seconds
                        if k in watch.diverged:  # frozen: its figures are those of skipped steps
                            record["diverged"] = 1.0
                        writer.write(step, record)
                        if k == 0 and primary:
                            progress.update(step, record)
                    watch.check(fetched[-1], step)
                    pending, tick = [], time.time()
                epoch_end = bool(steps_per_epoch) and step % steps_per_epoch == 0
                valid, valid_ppl = None, None
                if step % eval_every == 0 or step == num_steps:
                    bests, valid = _evaluate_and_keep_best(
                        p_eval_step, state, data, eval_key, num_devices, step, steps_per_epoch,
                        writers_, dirs, bests, metric,
                    )  # fmt: skip
                    valid_ppl = None if valid is None else valid["ppl_bound"]
                if stopping is not None and valid is not None:
                    stopping = early_stopping.update(stopping, -valid["elbo"], config)
                stopped = stopping is not None and stopping.stopped
                if (
                    step % config.checkpoint_every_steps == 0 or epoch_end or step == num_steps
                    or stopped
                ):  # fmt: skip
                    save(step, state, valid_ppl)
                if stopped:
                    logging.info(
                        "Early stop at step %d after %d validations (patience %g; best valid "
                        "-ELBO %.4f): the run is done.",
                        step, stopping.validations, stopping.patience, stopping.best,
                    )  # fmt: skip
                    writers_[0].write(step, {"early_stopped": stopping.validations})
                    break
                if stop.received:
                    save(step, state)
                    checkpointer.wait()
                    raise guards.TrainingInterrupted(
                        f"{stop.received} at step {step}: saved a checkpoint in "
                        f"{checkpointer.directory}; run the same command to resume."
                    )
    except KeyboardInterrupt:
        # Ctrl-C outside the handler (e.g. in a callback): the last assigned state is whole
        # unless the interrupt hit the step that consumed it; then the last checkpoint stands.
        try:
            save(step, state)
            checkpointer.wait()
        except Exception:  # noqa: BLE001
            logging.exception("Could not save step %d; the last checkpoint stands.", step)
        raise guards.TrainingInterrupted(
            f"Interrupted at step {step}: saved a checkpoint in {checkpointer.directory}."
        ) from None
    finally:
        if traces:
            # At most one per batch shape (length bucket) in this process: see the log.
            for writer in writers_:
                writer.write(step, dict(traces))
            logging.info("Compilations in this process: %s.", dict(traces))
        checkpointer.wait()
        checkpointer.close()
        progress.close()
        for writer in writers_:
            writer.close()
    if watch.diverged:
        logging.warning(
            "%s: population members that diverged and were frozen (their last applied "
            "parameters kept; see members/<k>/%s): %s.",
            workdir,
            guards.DIVERGED_FILE,
            ", ".join(
                f"{k} at step {a} (frozen at {b})" for k, (a, b) in sorted(watch.diverged.items())
            ),
        )
    return jax_utils.unreplicate(state)


def _warn_unfinished_warmup(config, steps_per_epoch: int | None, num_steps: int) -> None:
    fields = schedules.in_steps(
        config.beta_schedule.to_dict(), config.schedule_unit, steps_per_epoch
    )
    if fields["name"] == "monotonic" and fields.get("warmup_steps", 0) > num_steps:
        logging.warning(
            "config.beta_schedule.warmup_steps (%d steps) is longer than the run (%d steps): "
            "beta never reaches its stop value %s.",
            fields["warmup_steps"],
            num_steps,
            fields.get("stop", 1.0),
        )


def _evaluate_and_keep_best(
    p_eval_step,
    state,
    data,
    eval_key,
    num_devices,
    step,
    steps_per_epoch,
    writers_,
    dirs,
    bests,
    metric="ppl_bound",
) -> tuple[list[float], float | None]:
    """Evaluates every eval split, logs it, and saves each member's parameters (one for a
    single run) under its ``best/`` if its valid ``metric`` (`workdirs.BEST_METRICS`) improved.
    Returns the best valid values so far and this evaluation's valid figures (the members'
    mean; None without a valid split)."""
    epoch = {"epoch": step / steps_per_epoch} if steps_per_epoch else {}
    is_population = eval_key.ndim == 2  # one key per member
    results = {}  # split -> one result per member
    for split, split_batches in data.eval_splits.items():
        out = steps.evaluate(p_eval_step, state.params, split_batches, eval_key, num_devices)
        results[split] = out if is_population else [out]
        for k, (writer, result) in enumerate(zip(writers_, results[split], strict=True)):
            writer.write(step, {**epoch, **{f"{split}_{n}": v for n, v in result.items()}})
            logging.info(
                "step %d %s%s: %s",
                step,
                split,
                f" member {k}" if is_population else "",
                "  ".join(f"{n}={v:.4g}" for n, v in result.items()),
            )
    for writer in writers_:
        writer.flush()
    if "valid" not in results:
        return bests, None
    valid = [r[metric] for r in results["valid"]]
    host_params = None
    for k, directory in enumerate(dirs):
        if valid[k] < bests[k]:
            bests[k] = valid[k]
            if not distributed.is_primary():
                continue
            if host_params is None:
                host_params = jax.device_get(jax_utils.unreplicate(state.params))
            params = (
                jax.tree.map(lambda x, k=k: x[k], host_params) if is_population else host_params
            )
            figures = {split: r[k] for split, r in results.items()}
            checkpoints.save(
                os.path.join(directory, workdirs.BEST), params, {"step": step, **epoch, **figures}
            )
    return bests, {n: float(np.mean([r[n] for r in results["valid"]])) for n in results["valid"][0]}


def _prefetch(batches: Iterator, num_devices: int) -> Iterator:
    """Shards host batches and keeps the next two on the devices ahead of the step."""
    return jax_utils.prefetch_to_device((steps.shard(b, num_devices) for b in batches), size=2)
