"""Training and evaluation: `TrainState`, `train_step`, `eval_step`, `train_and_evaluate`.

Both steps get the model's objective and sums from `vae_jax.forward.apply`, the one forward
pass; the run's workdir (saved config, resume, best parameters) is `vae_jax.runs`'.

This module owns the device axis: steps are `jax.pmap`-ed (`make_p_train_step`,
`make_p_eval_step`) over ``jax.local_device_count()`` devices; a global batch of B rows is split
into equal shards. Each example's noise (its z sample
and dropout masks) comes from ``fold_in(fold_in(state.rng, step), n)`` with n its position in the
global batch, and gradients and statistics are summed over devices, so N devices compute what
one device computes on the same global batch.
"""

from __future__ import annotations

import collections
import functools
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import jax_utils
from flax.training import train_state

from vae_jax import (
    checkpoints,
    config_checks,
    forward,
    input_pipeline,
    metrics,
    models,
    objectives,
    runs,
    schedules,
    writers,
)
from vae_jax.tokens import sequence_lengths

AXIS = "devices"  # the pmap axis name, used nowhere else


class TrainState(train_state.TrainState):
    """Parameters, optimizer state, step, the run's base PRNG key; the numbers of consecutive
    steps skipped for a non-finite loss or gradient and for a loss spike; the losses of the
    last applied steps (NaN where none yet), which the loss-spike guard compares against."""

    rng: jax.Array
    nonfinite_run: jax.Array
    spike_run: jax.Array
    loss_history: jax.Array


Callback = Callable[[int, TrainState], None]


def make_schedules(
    config: ml_collections.ConfigDict, steps_per_epoch: int | None
) -> tuple[schedules.Schedule, schedules.Schedule]:
    """β and learning-rate schedules, with epoch-valued fields converted to steps."""

    if config.schedule_unit == "epochs" and not steps_per_epoch:
        raise ValueError(
            "config.schedule_unit='epochs' needs a dataset with epochs; "
            f"{config.data.name!r} has none. Use schedule_unit='steps'."
        )

    def in_steps(cfg: ml_collections.ConfigDict) -> dict:
        return schedules.in_steps(cfg.to_dict(), config.schedule_unit, steps_per_epoch)

    beta_fn = schedules.make_schedule(in_steps(config.beta_schedule))
    lr_fn = schedules.make_schedule(in_steps(config.lr_schedule))
    return beta_fn, lr_fn


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """g ← g · min(1, max_norm / ‖g‖₂), ‖g‖ over all leaves (Pascanu et al., 2013).

    `optax.clip_by_global_norm` with the same (empty) state, but the caller may pass the norm it
    already has (``global_norm=``), and the scale is a multiplication, which XLA folds into the
    optimizer's per-leaf passes instead of writing a clipped copy of every gradient.
    """

    def update(updates, state, params=None, *, global_norm=None, **extra_args):
        del params, extra_args
        norm = optax.tree.norm(updates) if global_norm is None else global_norm
        scale = jnp.minimum(1.0, max_norm / norm)
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def create_train_state(
    config: ml_collections.ConfigDict,
    model: models.VAE,
    lr_fn: schedules.Schedule,
    rng: jax.Array,
    seq_len: int,
) -> TrainState:
    init_rng, run_rng = jax.random.split(rng)
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    params = model.init(init_rng, tokens, jax.random.split(init_rng, 1), train=False)["params"]
    tx = optax.chain(clip_by_global_norm(config.grad_clip_norm), optax.adam(lr_fn))
    return TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=tx,
        rng=run_rng,
        nonfinite_run=jnp.int32(0),
        spike_run=jnp.int32(0),
        loss_history=jnp.full((config.loss_spike.window,), jnp.nan, jnp.float32),
    )


def example_keys(key: jax.Array, local_batch: int) -> jax.Array:
    """One key per example of this device's shard, indexed by global position in the batch."""
    first = jax.lax.axis_index(AXIS) * local_batch
    return jax.vmap(jax.random.fold_in, (None, 0))(key, first + jnp.arange(local_batch))


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: models.VAE,
    beta_fn: schedules.Schedule,
    lr_fn: schedules.Schedule,
    objective: Callable,
    spike_factor: float = 0.0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step on a device's shard; call through `jax.pmap` with `AXIS`.

    The loss is the global batch mean of Rec + β·KL with β = beta_fn(state.step), for an
    `savae.SAVAE` at the posterior its SVI refinement (on the same β) reaches. Each shard's
    objective is divided by the *global* number of sequences and the gradients are summed
    over devices: that is the gradient of the global mean, also when shards hold different
    numbers of real (non-filler) rows, where averaging per-device means would not be.

    Not applied (the step and the data move on, parameters and optimizer state stay): a step
    whose loss or gradient is not finite, and, with ``spike_factor`` > 0 (the loss-spike
    guard, ``config.loss_spike.factor``), a step whose loss exceeds ``spike_factor`` × the
    median of the last applied steps' losses (once half of ``state.loss_history`` is filled).
    """
    tokens = batch["tokens"]
    beta = beta_fn(state.step)
    keys = example_keys(jax.random.fold_in(state.rng, state.step), tokens.shape[0])
    num_seqs = jax.lax.psum(jnp.sum(sequence_lengths(tokens) > 0), AXIS)

    def loss_fn(params):
        objective_sum, sums, outputs = forward.apply(
            model, params, tokens, keys, beta=beta, objective=objective, train=True
        )
        return objective_sum / jnp.maximum(num_seqs, 1), (sums, outputs["bn_stats"])

    (loss, (sums, bn_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if jax.lax.psum(1, AXIS) > 1:  # static; on one device the all-reduce would only copy
        grads = jax.lax.psum(grads, AXIS)
    sums = jax.lax.psum(sums, AXIS)
    grad_norm = optax.tree.norm(grads)
    global_loss = jax.lax.psum(loss, AXIS)
    # NaN guard: a non-finite loss or gradient on any device is never applied.
    finite = jnp.isfinite(global_loss) & jnp.isfinite(grad_norm)
    # Kept whether or not the guard is on, so that it can be switched on in a resumed run.
    history = state.loss_history.at[state.step % state.loss_history.shape[0]].set(global_loss)
    spike = jnp.bool_(False)
    if spike_factor > 0:  # static
        past = state.loss_history
        filled = jnp.sum(jnp.isfinite(past))
        median = jnp.nanmedian(jnp.where(filled > 0, past, 0.0))
        spike = finite & (2 * filled >= past.shape[0]) & (global_loss > spike_factor * median)

    def apply_gradients() -> TrainState:
        updates, opt_state = state.tx.update(
            grads, state.opt_state, state.params, global_norm=grad_norm
        )
        params = optax.apply_updates(state.params, updates)
        params = model.updated_bn_stats(params, bn_stats)  # BN-VAE: running statistics
        return state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            nonfinite_run=jnp.int32(0),
            spike_run=jnp.int32(0),
            loss_history=history,
        )

    def skip() -> TrainState:
        return state.replace(
            step=state.step + 1,
            nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1),
            spike_run=state.spike_run + spike.astype(jnp.int32),
        )

    new_state = jax.lax.cond(finite & ~spike, apply_gradients, skip)
    step_metrics = {
        "beta": beta,
        "lr": lr_fn(state.step),
        "grad_norm": grad_norm,
        "nonfinite": 1 - finite.astype(jnp.int32),
        "nonfinite_run": new_state.nonfinite_run,
        "loss": global_loss,
        "spike": spike.astype(jnp.int32),
        "spike_run": new_state.spike_run,
    }
    return new_state, {**sums, **step_metrics}


def eval_step(
    params: Any,
    batch: dict[str, jax.Array],
    key: jax.Array,
    *,
    model: models.VAE,
    objective: Callable,
) -> dict[str, jax.Array]:
    """Summed statistics of a shard without dropout, one z sample per example; an SA-VAE's at
    its refined posterior, the refinement maximising the ELBO (β = 1) under ``key``."""
    tokens = batch["tokens"]
    keys = example_keys(key, tokens.shape[0])
    _, sums, _ = forward.apply(
        model, params, tokens, keys, beta=1.0, objective=objective, train=False
    )
    return jax.lax.psum(sums, AXIS)


def make_p_train_step(
    model: models.VAE,
    beta_fn: schedules.Schedule,
    lr_fn: schedules.Schedule,
    objective: objectives.Objective,
    *,
    spike_factor: float = 0.0,
    devices: Sequence[jax.Device] | None = None,
    donate: bool = True,
    compilations: collections.Counter | None = None,
) -> Callable:
    """`train_step` pmapped over ``devices`` (default: all local ones) along `AXIS`, the input
    state donated; ``compilations["train_step_compilations"]`` counts its traces."""
    if model.bn_gamma > 0:  # BN-VAE: batch statistics over the global batch, all devices
        model = model.clone(bn_axis_name=AXIS)
    step = functools.partial(
        train_step,
        model=model,
        beta_fn=beta_fn,
        lr_fn=lr_fn,
        objective=objective,
        spike_factor=spike_factor,
    )
    if compilations is not None:
        step = _counted(step, compilations, "train_step_compilations")
    return jax.pmap(step, axis_name=AXIS, donate_argnums=(0,) if donate else (), devices=devices)


def make_p_eval_step(
    model: models.VAE,
    objective: objectives.Objective,
    *,
    devices: Sequence[jax.Device] | None = None,
    compilations: collections.Counter | None = None,
) -> Callable:
    """`eval_step` pmapped like `make_p_train_step`'s step (nothing donated)."""
    step = functools.partial(eval_step, model=model, objective=objective)
    if compilations is not None:
        step = _counted(step, compilations, "eval_step_compilations")
    return jax.pmap(step, axis_name=AXIS, devices=devices)


def replicate(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
    """A copy of ``tree`` on each device, laid out as `jax.pmap` lays out its outputs.

    ``flax.jax_utils.replicate`` gives arrays another sharding than the train step returns, so
    the second step would see new input types and compile again.
    """
    devices = list(devices or jax.local_devices())
    mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
    return jax.tree.map(
        lambda x: jax.device_put(jnp.broadcast_to(x, (len(devices), *jnp.shape(x))), sharding),
        tree,
    )


def shard(batch: input_pipeline.Batch, num_devices: int) -> input_pipeline.Batch:
    """Splits the leading (global batch) axis into (devices, per-device batch)."""
    return jax.tree.map(lambda x: x.reshape((num_devices, -1) + x.shape[1:]), batch)


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
            }
        )
    record = {k: float(np.mean([p[k] for p in per_step])) for k in per_step[0]} if per_step else {}
    # The schedules' current values rather than their average over the interval.
    record.update(beta=float(step_metrics[-1]["beta"]), lr=float(step_metrics[-1]["lr"]))
    record["nonfinite_steps"] = float(sum(int(m["nonfinite"]) for m in step_metrics))
    record["spike_steps"] = float(sum(int(m["spike"]) for m in step_metrics))
    return record


def evaluate(
    p_eval_step: Callable,
    params: Any,
    batches: Sequence[input_pipeline.Batch],
    key: jax.Array,
    num_devices: int,
) -> dict[str, float]:
    """Exact averages over a whole split (replicated ``params``)."""
    total = None
    for i, batch in enumerate(batches):
        keys = jax_utils.replicate(jax.random.fold_in(key, i))
        sums = jax_utils.unreplicate(p_eval_step(params, shard(batch, num_devices), keys))
        total = metrics.add_sums(total, jax.device_get(sums))
    return metrics.summarize(total)


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


def eval_interval(config: ml_collections.ConfigDict, steps_per_epoch: int | None) -> int:
    """``eval_every_epochs`` × steps per epoch where given, else ``eval_every_steps``."""
    if config.get("eval_every_epochs", -1) > 0 and steps_per_epoch:
        return config.eval_every_epochs * steps_per_epoch
    return config.eval_every_steps


class TrainingInterrupted(SystemExit):
    """SIGTERM or Ctrl-C: a checkpoint of the current step was saved; exits non-zero."""


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class LossSpikeError(RuntimeError):
    """The loss-spike guard stopped the run (``config.loss_spike``)."""


class _StopSignals:
    """Turns SIGTERM and SIGINT into a flag the loop checks between steps."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    callbacks: Sequence[Callback] = (),
    allow_config_change: bool = False,
) -> TrainState:
    """Trains for ``num_train_steps`` (or ``num_epochs``) and returns the final state.

    Resumes from the latest checkpoint in ``workdir`` if there is one: the state and the data
    position are restored, so the run continues as if never stopped. Writes
    ``workdir/config.json``, ``metrics.jsonl``, TensorBoard events, periodic checkpoints (every
    ``checkpoint_every_steps``, at each epoch end and at the end) and, after each evaluation on
    a split named ``valid`` with a lower PPL bound than before, the parameters under
    ``workdir/best/``. SIGTERM and Ctrl-C save a checkpoint and raise `TrainingInterrupted`.
    ``callbacks`` are called as ``callback(step, state)`` after every step (replicated state).
    """
    num_devices = jax.local_device_count()
    config_checks.check_config(config, num_devices)
    os.makedirs(workdir, exist_ok=True)
    with runs.WorkdirLock(workdir):  # a second process on this workdir stops here
        runs.check_workdir_config(config, workdir, allow_config_change)
        return _train_and_evaluate(config, workdir, callbacks, num_devices)


def _train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    callbacks: Sequence[Callback],
    num_devices: int,
) -> TrainState:
    data = input_pipeline.get_data(config)
    runs.bind_data(config, data, workdir)  # a resumed run must see the data it started on
    steps_per_epoch = data.steps_per_epoch
    num_steps = run_length(config, steps_per_epoch)
    eval_every = eval_interval(config, steps_per_epoch)
    beta_fn, lr_fn = make_schedules(config, steps_per_epoch)
    _warn_unfinished_warmup(config, steps_per_epoch, num_steps)
    objective = objectives.make(config)
    model = runs.make_model(config, data.vocab_size)

    checkpointer = checkpoints.Checkpointer(
        workdir, keep=config.checkpoints_to_keep, keep_period=config.checkpoint_keep_period
    )
    first = next(data.train(0))
    state = create_train_state(
        config, model, lr_fn, jax.random.PRNGKey(config.seed), first["tokens"].shape[1]
    )
    start = 0
    latest = checkpointer.restore_latest(target=state)  # the latest whole one
    if latest is not None:
        _, state, meta = latest
        start = int(state.step)
        logging.info("Resuming %s from step %d (%s).", workdir, start, meta)
    elif config.init_from:
        state = state.replace(params=init_params_from(config, model, state.params))
    runs.save_config(config, workdir)
    runs.truncate_metrics(workdir, start)
    best = runs.best_ppl_bound(workdir) if start else float("inf")

    def meta(step: int) -> dict:
        epoch, position = divmod(step, steps_per_epoch) if steps_per_epoch else (None, step)
        return {"step": step, "epoch": epoch, "position": position, "data_seed": config.seed}

    def save(step: int, replicated_state, valid_ppl: float | None = None) -> None:
        host_state = jax.device_get(jax_utils.unreplicate(replicated_state))
        params_finite = all(np.isfinite(x).all() for x in jax.tree.leaves(host_state.params))
        skipping = int(host_state.nonfinite_run) > 0 or int(host_state.spike_run) > 0
        info = {
            **meta(step),
            "params_finite": params_finite,
            "good": params_finite and not skipping,
        }
        checkpointer.save(step, host_state, info, valid_metric=valid_ppl)

    state = replicate(state)
    traces = collections.Counter()  # pmap traces once per new batch shape, then compiles
    spike_factor = config.loss_spike.factor
    p_train_step = make_p_train_step(
        model, beta_fn, lr_fn, objective, spike_factor=spike_factor, compilations=traces
    )
    p_eval_step = make_p_eval_step(model, objective, compilations=traces)
    eval_key = runs.eval_key(config)

    writer = writers.MetricWriter(workdir)
    progress = writers.Progress(num_steps, initial=start)
    batches: Iterator = _prefetch(data.train(start), num_devices)
    pending: list = []
    tick = time.time()
    logging.info(
        "Training steps %d..%d (%s steps/epoch) on %d device(s).",
        start + 1,
        num_steps,
        steps_per_epoch,
        num_devices,
    )
    step = start
    try:
        with _StopSignals() as stop:
            for step in range(start + 1, num_steps + 1):
                state, step_metrics = p_train_step(state, next(batches))
                pending.append(step_metrics)
                for callback in callbacks:
                    callback(step, state)
                # One step behind, so the host does not wait for the step just dispatched.
                if len(pending) > 1:
                    _check_nonfinite(pending[-2], step - 1, config, checkpointer)
                if step % config.log_every_steps == 0 or step == num_steps:
                    fetched = [jax.tree.map(lambda x: np.asarray(x[0]), m) for m in pending]
                    record = _train_record(fetched)
                    record["steps_per_second"] = len(pending) / max(time.time() - tick, 1e-9)
                    writer.write(step, record)
                    progress.update(step, record)
                    _check_nonfinite(pending[-1], step, config, checkpointer)
                    pending, tick = [], time.time()
                epoch_end = bool(steps_per_epoch) and step % steps_per_epoch == 0
                valid_ppl = None
                if step % eval_every == 0 or step == num_steps:
                    best, valid_ppl = _evaluate_and_keep_best(
                        p_eval_step, state, data, eval_key, num_devices, step, steps_per_epoch,
                        writer, workdir, best,
                    )  # fmt: skip
                if step % config.checkpoint_every_steps == 0 or epoch_end or step == num_steps:
                    save(step, state, valid_ppl)
                if stop.received:
                    save(step, state)
                    checkpointer.wait()
                    raise TrainingInterrupted(
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
        raise TrainingInterrupted(
            f"Interrupted at step {step}: saved a checkpoint in {checkpointer.directory}."
        ) from None
    finally:
        if traces:
            # At most one per batch shape (length bucket) in this process: see the log.
            writer.write(step, dict(traces))
            logging.info("Compilations in this process: %s.", dict(traces))
        checkpointer.wait()
        checkpointer.close()
        progress.close()
        writer.close()
    return jax_utils.unreplicate(state)


def init_params_from(config: ml_collections.ConfigDict, model: models.VAE, fresh: Any) -> Any:
    """The parameters of the run at ``config.init_from`` (its best checkpoint, else its last),
    with the top-level parameters whose names start with a prefix in ``config.init_reset``
    taken from ``fresh`` instead (e.g. ``("dec",)``: pre-trained encoder, new decoder; Li et al.
    2019). The optimizer state starts afresh."""
    which = runs.resolve_checkpoint(config.init_from, "auto")
    loaded, info = checkpoints.restore_params(config.init_from, which)
    runs.check_params(model, loaded, f"config.init_from={config.init_from!r} ({which})")
    reset = tuple(config.init_reset)
    unknown = [p for p in reset if not any(name.startswith(p) for name in fresh)]
    if unknown:
        raise ValueError(
            f"config.init_reset={reset!r}: {unknown} match no parameter of {sorted(fresh)}."
        )
    params = {
        name: fresh[name] if reset and name.startswith(reset) else value
        for name, value in loaded.items()
    }
    logging.info(
        "Parameters from %s (%s, step %s); re-initialised: %s.",
        config.init_from,
        which,
        info.get("step"),
        sorted(n for n in params if reset and n.startswith(reset)) or "none",
    )
    return jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), params, fresh)


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


def _counted(fn: Callable, counter: collections.Counter, name: str) -> Callable:
    """``fn``, counting its calls in ``counter[name]``: under `jax.pmap` a call of the Python
    function is a trace, and each trace (a new input shape) is followed by a compilation."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        counter[name] += 1
        return fn(*args, **kwargs)

    return wrapper


def _check_nonfinite(step_metrics, step: int, config, checkpointer) -> None:
    """Stops the run after ``max_nonfinite_steps`` skipped steps in a row (non-finite, or loss
    spikes), or at the first spike under ``loss_spike.action = "stop"``."""
    run = int(step_metrics["nonfinite_run"][0])
    if run >= config.max_nonfinite_steps:
        last = checkpointer.last_good_step()
        raise NonFiniteError(
            f"{run} consecutive steps with a non-finite loss or gradient, the last at step "
            f"{step} (beta={float(step_metrics['beta'][0]):.4g}, "
            f"lr={float(step_metrics['lr'][0]):.4g}); none was applied. "
            + _last_good(last, checkpointer)
        )
    spikes = int(step_metrics["spike_run"][0])
    stop = config.loss_spike.action == "stop" and int(step_metrics["spike"][0])
    if stop or spikes >= config.max_nonfinite_steps:
        # The spike shows the damage of the step before it: that state is suspect too.
        last = checkpointer.last_good_step(before=step - 1)
        raise LossSpikeError(
            f"Loss spike at step {step}: loss {float(step_metrics['loss'][0]):.4g} > "
            f"config.loss_spike.factor={config.loss_spike.factor:g} x the median of the last "
            f"{config.loss_spike.window} applied steps ({spikes} such steps in a row, not "
            "applied). " + _last_good(last, checkpointer)
        )


def _last_good(step: int | None, checkpointer) -> str:
    if step is None:
        return f"No checkpoint in {checkpointer.directory} is known to be good."
    return (
        f"The last checkpoint with finite parameters, saved while no step was being skipped, "
        f"is step {step} in {checkpointer.directory} (kept)."
    )


def _evaluate_and_keep_best(
    p_eval_step, state, data, eval_key, num_devices, step, steps_per_epoch, writer, workdir, best
) -> tuple[float, float | None]:
    """Evaluates every eval split, logs it, and saves the parameters if valid improved.
    Returns the best valid PPL bound so far and this evaluation's (None without a valid split)."""
    epoch = {"epoch": step / steps_per_epoch} if steps_per_epoch else {}
    results = {}
    for split, split_batches in data.eval_splits.items():
        results[split] = evaluate(p_eval_step, state.params, split_batches, eval_key, num_devices)
        writer.write(step, {**epoch, **{f"{split}_{k}": v for k, v in results[split].items()}})
        logging.info(
            "step %d %s: %s",
            step,
            split,
            "  ".join(f"{k}={v:.4g}" for k, v in results[split].items()),
        )
    writer.flush()
    valid = results.get("valid", {}).get("ppl_bound")
    if valid is not None and valid < best:
        best = valid
        params = jax.device_get(jax_utils.unreplicate(state.params))
        checkpoints.save(
            os.path.join(workdir, runs.BEST), params, {"step": step, **epoch, **results}
        )
    return best, valid


def _prefetch(batches: Iterator, num_devices: int) -> Iterator:
    """Shards host batches and keeps the next two on the devices ahead of the step."""
    return jax_utils.prefetch_to_device((shard(b, num_devices) for b in batches), size=2)
