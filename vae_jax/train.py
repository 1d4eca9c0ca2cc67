"""Training and evaluation: `TrainState`, `train_step`, `eval_step`, `train_and_evaluate`.

Both steps get the model's objective and sums from `vae_jax.forward.apply`, the one forward
pass; the run's workdir (saved config, resume, best parameters) is `vae_jax.runs`'.

This module owns the device axis: steps are `jax.pmap`-ed (`make_p_train_step`,
`make_p_eval_step`) over every device of every process (`vae_jax.distributed`); a global batch
of B rows is split into equal shards, each process feeding its own devices'. Each example's
noise (its z sample and dropout masks) comes from ``fold_in(fold_in(state.rng, step), n)``
with n its position in the global batch, and gradients and statistics are summed over
devices, so N devices compute what one device computes on the same global batch.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
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
    backend,
    checkpoints,
    config_checks,
    distributed,
    early_stopping,
    files,
    forward,
    input_pipeline,
    metrics,
    models,
    objectives,
    population,
    runs,
    schedules,
    writers,
)
from vae_jax.tokens import sequence_lengths

AXIS = "devices"  # the pmap axis name, used nowhere else
# A population's diverged members: in the checkpoints' meta, and a file in members/<k>/.
DIVERGED, DIVERGED_FILE = "diverged", "diverged.json"
# A loss above this multiple of the recent median marks a likely divergence, guard or not:
# the last checkpoint before it is kept (named in the meta's PROTECTED), the step applied.
SUSPECT_FACTOR = 10.0
PROTECTED = "protected"


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


def make_tx(
    grad_clip_norm: float | jax.Array, lr_fn: schedules.Schedule
) -> optax.GradientTransformationExtraArgs:
    """Global-norm clipping, then Adam at the scheduled learning rate (the reference's)."""
    return optax.chain(clip_by_global_norm(grad_clip_norm), optax.adam(lr_fn))


def create_train_state(
    config: ml_collections.ConfigDict,
    model: models.VAE,
    lr_fn: schedules.Schedule,
    rng: jax.Array,
    example: int | dict[str, Any],
) -> TrainState:
    """The state at step 0. ``example``: a batch of the data's layout (a one-row one will do),
    or for token-only models the length of its rows."""
    init_rng, run_rng = jax.random.split(rng)
    if isinstance(example, int):
        example = forward.example_batch(model, example)
    params = forward.init(model, init_rng, example)
    tx = make_tx(config.grad_clip_norm, lr_fn)
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
    frozen: jax.Array | None = None,
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
    Nor, ever, a step of a ``frozen`` member (a population's member that diverged).
    """
    tokens = batch["tokens"]
    beta = beta_fn(state.step)
    keys = example_keys(jax.random.fold_in(state.rng, state.step), tokens.shape[0])
    num_seqs = jax.lax.psum(jnp.sum(sequence_lengths(tokens) > 0), AXIS)

    def loss_fn(params):
        objective_sum, sums, outputs = forward.apply(
            model, params, batch, keys, beta=beta, objective=objective, train=True
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
    past = state.loss_history
    filled = jnp.sum(jnp.isfinite(past))
    median = jnp.nanmedian(jnp.where(filled > 0, past, 0.0))
    judged = finite & (2 * filled >= past.shape[0])
    spike = jnp.bool_(False)
    if spike_factor > 0:  # static
        spike = judged & (global_loss > spike_factor * median)
    # Watched whether or not the guard is on, never skipped for: a likely divergence with
    # finite values, whose checkpoint before it the run keeps (`SUSPECT_FACTOR`).
    suspect = judged & (global_loss > SUSPECT_FACTOR * median)

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

    applied = finite & ~spike if frozen is None else finite & ~spike & ~frozen
    new_state = jax.lax.cond(applied, apply_gradients, skip)
    step_metrics = {
        "beta": beta,
        "lr": lr_fn(state.step),
        "grad_norm": grad_norm,
        "nonfinite": 1 - finite.astype(jnp.int32),
        "nonfinite_run": new_state.nonfinite_run,
        "loss": global_loss,
        "spike": spike.astype(jnp.int32),
        "spike_run": new_state.spike_run,
        "suspect": suspect.astype(jnp.int32),
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
        model, params, batch, keys, beta=1.0, objective=objective, train=False
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
    precision: str | None = None,
) -> Callable:
    """`train_step` pmapped over ``devices`` (default: all local ones) along `AXIS`, the input
    state donated; ``compilations["train_step_compilations"]`` counts its traces;
    ``precision``: the matmul precision it is traced under (`backend.with_precision`)."""
    if getattr(model, "bn_gamma", 0) > 0:  # BN-VAE: batch statistics over the global batch
        model = model.clone(bn_axis_name=AXIS)
    step = functools.partial(
        train_step,
        model=model,
        beta_fn=beta_fn,
        lr_fn=lr_fn,
        objective=objective,
        spike_factor=spike_factor,
    )
    step = backend.with_precision(step, precision)
    if compilations is not None:
        step = _counted(step, compilations, "train_step_compilations")
    return jax.pmap(step, axis_name=AXIS, donate_argnums=(0,) if donate else (), devices=devices)


def make_p_eval_step(
    model: models.VAE,
    objective: objectives.Objective,
    *,
    devices: Sequence[jax.Device] | None = None,
    compilations: collections.Counter | None = None,
    precision: str | None = None,
) -> Callable:
    """`eval_step` pmapped like `make_p_train_step`'s step (nothing donated)."""
    step = functools.partial(eval_step, model=model, objective=objective)
    step = backend.with_precision(step, precision)
    if compilations is not None:
        step = _counted(step, compilations, "eval_step_compilations")
    return jax.pmap(step, axis_name=AXIS, devices=devices)


def member_objectives(configs: Sequence[ml_collections.ConfigDict]) -> Callable:
    """``objective(k)``: member k's objective, k traced. Hyperparameters that differ between
    members are indexed arrays; those that agree stay Python values (a sample count is a
    shape)."""
    name = configs[0].objective
    fields = configs[0].get(name)
    fixed, varying = {}, {}
    for field in fields.to_dict() if fields is not None else {}:
        values = [c[name][field] for c in configs]
        if len(set(values)) == 1:
            fixed[field] = values[0]
        else:
            varying[field] = jnp.asarray(values, jnp.float32)

    def objective(k):
        values = {field: v[k] for field, v in varying.items()}
        return functools.partial(objectives.OBJECTIVES[name], **fixed, **values)

    return objective


def member_hyperparameters(
    configs: Sequence[ml_collections.ConfigDict], steps_per_epoch: int | None
) -> tuple[Callable, Callable, Callable, Callable]:
    """Per-member β, learning rate, objective and clip norm as functions of a member index k
    (traced): ``beta_fn(k)(step)``, ``lr_fn(k)(count)``, ``objective(k)``, ``clip(k)``; the
    schedules selected with `jax.lax.switch` (every branch is a scalar function)."""
    beta_fns, lr_fns = zip(*(make_schedules(c, steps_per_epoch) for c in configs), strict=True)
    clips = jnp.asarray([c.grad_clip_norm for c in configs], jnp.float32)
    return (
        lambda k: lambda step: jax.lax.switch(k, beta_fns, step),
        lambda k: lambda count: jax.lax.switch(k, lr_fns, count),
        member_objectives(configs),
        lambda k: clips[k],
    )


def make_p_population_step(
    model: models.VAE,
    configs: Sequence[ml_collections.ConfigDict],
    steps_per_epoch: int | None,
    *,
    spike_factor: float = 0.0,
    devices: Sequence[jax.Device] | None = None,
    donate: bool = True,
    compilations: collections.Counter | None = None,
    precision: str | None = None,
) -> Callable:
    """`train_step` vmapped over a population's members (`vae_jax.population`) and pmapped
    over devices: the state has a leading member axis, every member sees the same batch.

    Member k runs with its own β, learning rate, objective and clip norm
    (`member_hyperparameters`); its optimizer is rebuilt inside the step with them, and the
    returned state carries the shared template ``tx`` again, so the state's structure is the
    same for every member and every step. The step's optional third argument, (devices, K)
    bools, freezes members: their updates are skipped (`train_step`'s ``frozen``).
    """
    if getattr(model, "bn_gamma", 0) > 0:
        model = model.clone(bn_axis_name=AXIS)
    beta_fn, lr_fn, objective, clip = member_hyperparameters(configs, steps_per_epoch)

    def step(states: TrainState, batch: dict[str, jax.Array], frozen: jax.Array | None = None):
        # frozen: (K,) bools, the members that diverged; their steps are never applied.
        if frozen is None:
            frozen = jnp.zeros((len(configs),), bool)

        def member_step(state: TrainState, k: jax.Array, frozen_k: jax.Array):
            tx = make_tx(clip(k), lr_fn(k))
            new_state, step_metrics = train_step(
                state.replace(tx=tx),
                batch,
                model=model,
                beta_fn=beta_fn(k),
                lr_fn=lr_fn(k),
                objective=objective(k),
                spike_factor=spike_factor,
                frozen=frozen_k,
            )
            return new_state.replace(tx=state.tx), step_metrics

        return jax.vmap(member_step)(states, jnp.arange(len(configs)), frozen)

    step = backend.with_precision(step, precision)
    if compilations is not None:
        step = _counted(step, compilations, "train_step_compilations")
    return jax.pmap(step, axis_name=AXIS, donate_argnums=(0,) if donate else (), devices=devices)


def make_p_population_eval_step(
    model: models.VAE,
    configs: Sequence[ml_collections.ConfigDict],
    *,
    devices: Sequence[jax.Device] | None = None,
    compilations: collections.Counter | None = None,
    precision: str | None = None,
) -> Callable:
    """`eval_step` vmapped over members (stacked params, one key per member) and pmapped."""
    objective = member_objectives(configs)

    def step(params, batch, keys):
        def member_eval(p, key, k):
            return eval_step(p, batch, key, model=model, objective=objective(k))

        return jax.vmap(member_eval)(params, keys, jnp.arange(len(configs)))

    step = backend.with_precision(step, precision)
    if compilations is not None:
        step = _counted(step, compilations, "eval_step_compilations")
    return jax.pmap(step, axis_name=AXIS, devices=devices)


def stack_states(states: Sequence[TrainState]) -> TrainState:
    """Members' states stacked on a new leading axis, all with the first one's ``tx``."""
    template = states[0].tx
    states = [s.replace(tx=template) for s in states]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


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
    """This process's rows of a global batch (all of them for one process;
    `distributed.process_rows`), split into (local devices, per-device batch)."""
    batch = distributed.process_rows(batch)
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
                **({"bow": m["bow"] / m["sequences"]} if "bow" in m else {}),  # a CVAE's
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
) -> Any:
    """Exact averages over a whole split (replicated ``params``); for a population (``key``
    of shape (K, 2), one per member, and a `make_p_population_eval_step`) a list of K."""
    members = key.shape[0] if key.ndim == 2 else None
    total = None
    for i, batch in enumerate(batches):
        if members is None:
            batch_key = jax.random.fold_in(key, i)
        else:
            batch_key = jax.vmap(jax.random.fold_in, (0, None))(key, i)
        sums = p_eval_step(params, shard(batch, num_devices), jax_utils.replicate(batch_key))
        distributed.progress()
        sums = jax.device_get(jax_utils.unreplicate(sums))
        sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}  # as Python floats add
        total = sums if total is None else {k: total[k] + v for k, v in sums.items()}
    if members is None:
        return metrics.summarize({k: float(v) for k, v in total.items()})
    return [metrics.summarize({k: float(v[m]) for k, v in total.items()}) for m in range(members)]


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
    start_over: bool = False,
) -> TrainState:
    """Trains for ``num_train_steps`` (or ``num_epochs``) and returns the final state.

    Resumes from the latest checkpoint in ``workdir`` if there is one: the state and the data
    position are restored, so the run continues as if never stopped. Writes
    ``workdir/config.json``, ``metrics.jsonl``, TensorBoard events, periodic checkpoints (every
    ``checkpoint_every_steps``, at each epoch end and at the end) and, after each evaluation on
    a split named ``valid`` with a lower PPL bound than before, the parameters under
    ``workdir/best/``. SIGTERM and Ctrl-C save a checkpoint and raise `TrainingInterrupted`.
    ``callbacks`` are called as ``callback(step, state)`` after every step (replicated state).
    With no usable checkpoint, a workdir holding an earlier run's history (``best/``, metrics
    past the first checkpoint) is refused unless ``start_over`` (`runs.check_fresh_start`).
    """
    files.check_local_path(workdir)
    num_devices = jax.local_device_count()
    config_checks.check_config(config, jax.device_count())  # all processes' devices
    # Several processes: a bound on waiting for the others, and the same run in all of them.
    bound = config.get("collective_timeout_s", 1800.0) if jax.process_count() > 1 else 0
    with distributed.Watchdog(bound):
        distributed.agree("config", runs.flat_config(config))
        return _locked_train_and_evaluate(
            config, workdir, callbacks, allow_config_change, start_over, num_devices
        )


def _locked_train_and_evaluate(
    config, workdir, callbacks, allow_config_change, start_over, num_devices
) -> TrainState:
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:  # a name too long, a read-only parent: one line naming it
        raise files.NotWritableError(
            f"--workdir={workdir}: cannot create it ({e.strerror or e})"
        ) from None
    # A second run on this workdir stops here; a multi-process run's primary holds the lock.
    lock = runs.WorkdirLock(workdir) if distributed.is_primary() else contextlib.nullcontext()
    with lock:
        runs.check_workdir_config(config, workdir, allow_config_change)
        return _train_and_evaluate(config, workdir, callbacks, num_devices, start_over)


def _train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    callbacks: Sequence[Callback],
    num_devices: int,
    start_over: bool = False,
) -> TrainState:
    data = input_pipeline.get_data(config)
    distributed.agree("data", runs.data_record(config, data))
    primary = distributed.is_primary()  # the one process that writes files besides checkpoints
    if primary:
        runs.bind_data(config, data, workdir)  # a resumed run must see the data it started on
        runs.store_data(config, data, workdir)  # so its readers need no corpus
    distributed.sync("data.json")
    if not primary:
        if not os.path.exists(os.path.join(workdir, runs.DATA)):
            raise RuntimeError(
                f"{workdir}: process {jax.process_index()} does not see the {runs.DATA} process "
                "0 wrote; the workdir must be on a file system every host mounts (NFS, "
                "Filestore, gcsfuse)."
            )
        runs.bind_data(config, data, workdir)  # only checks: the primary has written it
    steps_per_epoch = data.steps_per_epoch
    num_steps = run_length(config, steps_per_epoch)
    eval_every = eval_interval(config, steps_per_epoch)
    beta_fn, lr_fn = make_schedules(config, steps_per_epoch)
    _warn_unfinished_warmup(config, steps_per_epoch, num_steps)
    objective = objectives.make(config)
    model = runs.make_model(config, data.vocab_size, data.num_topics)
    # A single run is a population of one without the member axis; a population's member k
    # writes its own records under WORKDIR/members/<k>/ (vae_jax.population).
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
        member_lr = make_schedules(member, steps_per_epoch)[1]
        rng = jax.random.PRNGKey(member.seed)
        states.append(create_train_state(member, model, member_lr, rng, example))
    state = stack_states(states) if is_population else states[0]
    start = 0
    latest = checkpointer.restore_latest(target=state)  # the latest whole one
    if latest is None and (primary or not start_over):  # only the primary moves files
        directories = [workdir] + (dirs if is_population else [])
        every = config.checkpoint_every_steps
        runs.check_fresh_start(workdir, directories, checkpointer.moved, every, start_over)
    distributed.sync("fresh start")
    # A population's members that diverged: k -> (first bad step, step frozen at); their
    # updates are skipped from then on. Saved in the checkpoints' meta, so a resume keeps them.
    diverged: dict[int, tuple[int, int]] = {}
    if latest is not None:
        _, state, saved = latest
        start = int(np.max(state.step))
        logging.info("Resuming %s from step %d (%s).", workdir, start, saved)
        diverged = {int(k): tuple(v) for k, v in saved.get(DIVERGED, {}).items()}
        for kept in saved.get(PROTECTED, []):
            checkpointer.protect(kept)
    elif config.init_from:
        fresh = [init_params_from(config, model, s.params) for s in states]
        state = state.replace(params=stack_params(fresh) if is_population else fresh[0])
    if primary:
        runs.save_config(config, workdir)
    backend.record(config, workdir, primary)  # the log and platform.json name the backend
    bests, metric = [], runs.best_metric(config)
    for k, (member, directory) in enumerate(zip(members, dirs, strict=True)):
        if primary:
            if is_population:
                os.makedirs(directory, exist_ok=True)
                runs.save_config(member, directory)
                runs.bind_data(member, data, directory)
                runs.store_data(member, data, directory)
            runs.truncate_metrics(directory, start)
            stale = os.path.join(directory, DIVERGED_FILE)  # from a divergence after `start`
            if is_population and k not in diverged and os.path.exists(stale):
                os.remove(stale)
        bests.append(runs.best_value(directory, metric) if start else float("inf"))
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
        seed = input_pipeline.data_seed(config)
        return {"step": step, "epoch": epoch, "position": position, "data_seed": seed}

    def live(x) -> np.ndarray:
        """``x`` without the frozen members' rows: they say nothing of the others' health."""
        x = np.asarray(x)
        return np.delete(x, sorted(diverged), axis=0) if is_population else x

    def save(step: int, replicated_state, valid_ppl: float | None = None) -> None:
        host_state = jax.device_get(jax_utils.unreplicate(replicated_state))
        params = jax.tree.leaves(host_state.params)
        params_finite = all(np.isfinite(live(x)).all() for x in params)
        skipping = np.any(live(host_state.nonfinite_run) > 0) or np.any(
            live(host_state.spike_run) > 0
        )
        info = {
            **meta(step),
            "params_finite": params_finite,
            "good": bool(params_finite and not skipping),
        }
        if diverged:
            info[DIVERGED] = {str(k): list(v) for k, v in sorted(diverged.items())}
        if checkpointer.protected:
            info[PROTECTED] = checkpointer.protected
        checkpointer.save(step, host_state, info, valid_metric=valid_ppl)
        saved_steps.append(step)

    saved_steps: list[int] = [start] if latest is not None else []
    trouble: list[int] = []  # the first skipped, spiking or suspect step of this process

    def frozen_mask():
        mask = np.zeros(len(members), bool)
        mask[sorted(diverged)] = True
        return replicate(jnp.asarray(mask))

    frozen = [frozen_mask()] if is_population else []  # the step's extra argument

    def _keep_checkpoint_before_trouble(step_metrics, at: int) -> None:
        """At the first skipped, spiking or suspect step: keeps the newest checkpoint saved
        before it, so a divergence never rotates the last healthy one out."""
        flags = jax.device_get({n: step_metrics[n] for n in ("nonfinite", "spike", "suspect")})
        if not any(live(np.atleast_1d(np.asarray(v)[0])).any() for v in flags.values()):
            return
        trouble.append(at)
        before = [s for s in saved_steps if s < at]
        if before:
            checkpointer.protect(before[-1])
            logging.warning(
                "Step %d was skipped, a loss spike, or a loss over %g x the recent median: "
                "checkpoint %d, the last before it, is kept whatever the rotation.",
                at, SUSPECT_FACTOR, before[-1],
            )  # fmt: skip

    def check(step_metrics, at: int) -> None:
        """Applies the guards (`_check_nonfinite`): a single run, or a population's last
        healthy members, stop; a population's other failing members are frozen."""
        if not trouble:
            _keep_checkpoint_before_trouble(step_metrics, at)
        failures = _check_nonfinite(
            step_metrics, at, config, checkpointer, is_population, skip=diverged
        )
        if not failures:
            return
        if not is_population or len(diverged) + len(failures) >= len(members):
            raise failures[0][2]
        for k, first, error in failures:
            diverged[k] = (first, at)
            logging.warning("%s Member %d is frozen from step %d on; the others go on.",
                            error, k, at)  # fmt: skip
            if primary:
                record = {"diverged_at_step": first, "frozen_at_step": at, "reason": str(error)}
                path = os.path.join(dirs[k], DIVERGED_FILE)
                files.write_atomic(path, json.dumps(record, indent=1))
        frozen[0] = frozen_mask()

    state = replicate(state)
    traces = collections.Counter()  # pmap traces once per new batch shape, then compiles
    spike_factor = config.loss_spike.factor
    precision = backend.matmul_precision(config)
    if is_population:
        p_train_step = make_p_population_step(
            model, members, steps_per_epoch, spike_factor=spike_factor, compilations=traces,
            precision=precision,
        )  # fmt: skip
        p_eval_step = make_p_population_eval_step(
            model, members, compilations=traces, precision=precision
        )
        eval_key = jnp.stack([runs.eval_key(m) for m in members])
    else:
        p_train_step = make_p_train_step(
            model, beta_fn, lr_fn, objective, spike_factor=spike_factor, compilations=traces,
            precision=precision,
        )  # fmt: skip
        p_eval_step = make_p_eval_step(model, objective, compilations=traces, precision=precision)
        eval_key = runs.eval_key(config)

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
        with _StopSignals() as stop:
            for step in range(start + 1, num_steps + 1):
                state, step_metrics = p_train_step(state, next(batches), *frozen)
                distributed.progress()
                pending.append(step_metrics)
                for callback in callbacks:
                    callback(step, state)
                # One step behind, so the host does not wait for the step just dispatched.
                if len(pending) > 1:
                    check(pending[-2], step - 1)
                if step % config.log_every_steps == 0 or step == num_steps:
                    fetched = jax.device_get(pending)
                    seconds = max(time.time() - tick, 1e-9)
                    for k, writer in enumerate(writers_):
                        views = [member_metrics(m, k) for m in fetched]
                        record = _train_record([jax.tree.map(lambda x: x[0], v) for v in views])
                        record["steps_per_second"] = len(pending) / seconds
                        if k in diverged:  # frozen: its figures are those of skipped steps
                            record["diverged"] = 1.0
                        writer.write(step, record)
                        if k == 0 and primary:
                            progress.update(step, record)
                    check(fetched[-1], step)
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
            for writer in writers_:
                writer.write(step, dict(traces))
            logging.info("Compilations in this process: %s.", dict(traces))
        checkpointer.wait()
        checkpointer.close()
        progress.close()
        for writer in writers_:
            writer.close()
    if diverged:
        logging.warning(
            "%s: population members that diverged and were frozen (their last applied "
            "parameters kept; see members/<k>/%s): %s.",
            workdir,
            DIVERGED_FILE,
            ", ".join(f"{k} at step {a} (frozen at {b})" for k, (a, b) in sorted(diverged.items())),
        )
    return jax_utils.unreplicate(state)


def stack_params(params: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *params)


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


def _check_nonfinite(
    step_metrics, step: int, config, checkpointer, label: bool = False, skip=()
) -> list[tuple[int, int, RuntimeError]]:
    """The guards' verdicts: ``max_nonfinite_steps`` skipped steps in a row (non-finite, or
    loss spikes), or a spike under ``loss_spike.action = "stop"``, as (member, first bad
    step, error to raise) for each member (leaves (devices, K) in a population, whose
    messages name it: ``label``) not in ``skip``. One host transfer of the guard counters."""
    guards = jax.device_get({n: step_metrics[n] for n in ("nonfinite_run", "spike_run", "spike")})
    runs_, spike_runs, spikes = (np.atleast_1d(guards[n][0]) for n in guards)
    stop_at_spike = config.loss_spike.action == "stop"
    failures = []
    for k, (run, spike_run, spike) in enumerate(zip(runs_, spike_runs, spikes, strict=True)):
        if k in skip:
            continue
        if run < config.max_nonfinite_steps and spike_run < config.max_nonfinite_steps:
            if not (stop_at_spike and spike):
                continue
        who = f"Population member {k}: " if label else ""
        detail = jax.device_get({n: step_metrics[n] for n in ("beta", "lr", "loss")})
        beta, lr, loss = (float(np.atleast_1d(detail[n][0])[k]) for n in ("beta", "lr", "loss"))
        if run >= config.max_nonfinite_steps:
            last = checkpointer.last_good_step()
            error = NonFiniteError(
                f"{who}{run} consecutive steps with a non-finite loss or gradient, the last at "
                f"step {step} (beta={beta:.4g}, lr={lr:.4g}); none was applied. "
                + _last_good(last, checkpointer)
            )
            failures.append((k, step - int(run) + 1, error))
            continue
        # The spike shows the damage of the step before it: that state is suspect too.
        last = checkpointer.last_good_step(before=step - 1)
        error = LossSpikeError(
            f"{who}Loss spike at step {step}: loss {loss:.4g} > "
            f"config.loss_spike.factor={config.loss_spike.factor:g} x the median of the last "
            f"{config.loss_spike.window} applied steps ({spike_run} such steps in a row, not "
            "applied). " + _last_good(last, checkpointer)
        )
        failures.append((k, step - int(spike_run) + 1, error))
    return failures


def _last_good(step: int | None, checkpointer) -> str:
    if step is None:
        return f"No checkpoint in {checkpointer.directory} is known to be good."
    return (
        f"The last checkpoint with finite parameters, saved while no step was being skipped, "
        f"is step {step} in {checkpointer.directory} (kept)."
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
    single run) under its ``best/`` if its valid ``metric`` (`runs.BEST_METRICS`) improved.
    Returns the best valid values so far and this evaluation's valid figures (the members'
    mean; None without a valid split)."""
    epoch = {"epoch": step / steps_per_epoch} if steps_per_epoch else {}
    is_population = eval_key.ndim == 2  # one key per member
    results = {}  # split -> one result per member
    for split, split_batches in data.eval_splits.items():
        out = evaluate(p_eval_step, state.params, split_batches, eval_key, num_devices)
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
                os.path.join(directory, runs.BEST), params, {"step": step, **epoch, **figures}
            )
    return bests, {n: float(np.mean([r[n] for r in results["valid"]])) for n in results["valid"][0]}


def _prefetch(batches: Iterator, num_devices: int) -> Iterator:
    """Shards host batches and keeps the next two on the devices ahead of the step."""
    return jax_utils.prefetch_to_device((shard(b, num_devices) for b in batches), size=2)
