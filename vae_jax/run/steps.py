"""The train and eval steps: `TrainState`, `train_step`, `eval_step`, pmapped over devices.

Both steps get the model's objective and sums from `vae_jax.core.forward.apply`, the one forward
pass. This module owns the device axis: steps are `jax.pmap`-ed (`make_p_train_step`,
`make_p_eval_step`) over every device of every process (`vae_jax.run.distributed`); a global
batch of B rows is split into equal shards, each process feeding its own devices'. Each
example's noise (its z sample and dropout masks) comes from
``fold_in(fold_in(state.rng, step), n)`` with n its position in the global batch, and
gradients and statistics are summed over devices, so N devices compute what one device
computes on the same global batch.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import jax_utils
from flax.training import train_state

from vae_jax.core import forward, metrics, models, objectives, schedules
from vae_jax.core.tokens import sequence_lengths
from vae_jax.data import batching
from vae_jax.run import backend, distributed

AXIS = "devices"  # the pmap axis name, used nowhere else


# A loss above this multiple of the recent median marks a likely divergence, guard or not:
# the last checkpoint before it is kept (named in the meta's PROTECTED), the step applied.
SUSPECT_FACTOR = 10.0


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
        step = counted(step, compilations, "train_step_compilations")
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
        step = counted(step, compilations, "eval_step_compilations")
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


def shard(batch: batching.Batch, num_devices: int) -> batching.Batch:
    """This process's rows of a global batch (all of them for one process;
    `distributed.process_rows`), split into (local devices, per-device batch)."""
    batch = distributed.process_rows(batch)
    return jax.tree.map(lambda x: x.reshape((num_devices, -1) + x.shape[1:]), batch)


def evaluate(
    p_eval_step: Callable,
    params: Any,
    batches: Sequence[batching.Batch],
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


def counted(fn: Callable, counter: collections.Counter, name: str) -> Callable:
    """``fn``, counting its calls in ``counter[name]``: under `jax.pmap` a call of the Python
    function is a trace, and each trace (a new input shape) is followed by a compilation."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        counter[name] += 1
        return fn(*args, **kwargs)

    return wrapper
