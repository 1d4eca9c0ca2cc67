"""Populations: K runs of one config trained as one vmapped program.

    --config.population_size=3                                   # seeds seed, seed+1, seed+2
    --config.population_fields='(("beta_schedule.ratio", (0.25, 0.5, 0.75)),)'

Member k is the single run of `member_config(config, k)`: seed ``seed + k`` (its parameters
and noise), the k-th value of every field in ``population_fields``, and the data order of
``data_seed`` (−1: the base ``seed``), so every member sees the same batches and member k
computes what ``--config.seed=<seed+k> --config.data_seed=<seed>`` computes alone (a test
checks it). The train step is `jax.vmap`-ed over the members inside the `jax.pmap` over
devices: one compilation, one data stream; a member's β, learning rate and objective are its
own schedules selected by its index (`jax.lax.switch`; all K are evaluated, which for scalar
schedules costs nothing).

Only fields that keep the compiled program's shapes and structure may vary
(`VARYING_FIELDS`): model sizes, SVI steps, the batch or a remedy's sample count would not.

    WORKDIR/config.json         the population's config
    WORKDIR/checkpoints/        the whole population's state (members stacked on axis 0)
    WORKDIR/members/<k>/        member k as a run of its own: config.json (its single-run
                                config), data.json, metrics.jsonl, TensorBoard events, best/
"""

from __future__ import annotations

import collections
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from vae_jax.core import models, objectives
from vae_jax.run import backend, steps

MEMBERS = "members"
# Field prefixes a population may vary: numbers the step reads at run time, not shapes.
VARYING_FIELDS = ("beta_schedule.", "lr_schedule.", "free_bits.", "grad_clip_norm")


def size(config: ml_collections.ConfigDict) -> int:
    """``config.population_size`` (1 for configs without populations)."""
    return int(config.get("population_size", 1))


def is_population(config: ml_collections.ConfigDict) -> bool:
    return size(config) > 1


def member_dir(workdir: str, k: int) -> str:
    return os.path.join(workdir, MEMBERS, str(k))


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
    value = config
    for part in field.split("."):
        value = value[part]
    return value


def check(config: ml_collections.ConfigDict) -> None:
    """Raises ``ValueError`` naming the field on a bad ``population_size`` or
    ``population_fields``; run before anything is built."""
    k = config.get("population_size", 1)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"config.population_size={k!r}: must be a positive integer.")
    fields = config.get("population_fields", ())
    for entry in fields:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise ValueError(
                f"config.population_fields: {entry!r} is not a (field, values) pair, e.g. "
                "('beta_schedule.ratio', (0.25, 0.5, 0.75))."
            )
        name, values = entry
        if not (name.startswith(VARYING_FIELDS[:-1]) or name in VARYING_FIELDS):
            raise ValueError(
                f"config.population_fields: {name!r} cannot vary within a population (it would "
                f"change the compiled program); fields that can: beta_schedule.*, lr_schedule.*, "
                "free_bits.*, grad_clip_norm. "
                "Run other values as separate runs (a sweep)."
            )
        try:
            _get(config, name)
        except (KeyError, AttributeError):
            raise ValueError(
                f"config.population_fields: {name!r} names no field of the config."
            ) from None
        if not isinstance(values, (tuple, list)) or len(values) != k:
            raise ValueError(
                f"config.population_fields: {name!r} has {values!r}; it needs one value per "
                f"member (config.population_size={k})."
            )
    for k in range(size(config) if fields else 0):
        member_config(config, k)  # each value fits its field's type


def member_config(config: ml_collections.ConfigDict, k: int) -> ml_collections.ConfigDict:
    """The single-run config member ``k`` of ``config``'s population computes."""
    member = config.copy_and_resolve_references()
    with member.unlocked():
        member.seed = config.seed + k
        member.data_seed = config.get("data_seed", -1)
        if member.data_seed < 0:
            member.data_seed = config.seed
        for name, values in config.get("population_fields", ()):
            *parents, leaf = name.split(".")
            node = member
            for part in parents:
                node = node[part]
            try:  # ConfigDict keeps each field's type: an int field refuses 2.5
                node[leaf] = values[k]
            except TypeError as e:
                raise ValueError(
                    f"config.population_fields: {name!r}[{k}]={values[k]!r}: {e}"
                ) from None
        member.population_size = 1
        member.population_fields = ()
    return member


def members(config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
    """Every member's single-run config; ``[config]`` for a single run."""
    if not is_population(config):
        return [config]
    return [member_config(config, k) for k in range(size(config))]


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
    beta_fns, lr_fns = zip(
        *(steps.make_schedules(c, steps_per_epoch) for c in configs), strict=True
    )
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
    """`steps.train_step` vmapped over a population's members (`vae_jax.run.population`) and pmapped
    over devices: the state has a leading member axis, every member sees the same batch.

    Member k runs with its own β, learning rate, objective and clip norm
    (`member_hyperparameters`); its optimizer is rebuilt inside the step with them, and the
    returned state carries the shared template ``tx`` again, so the state's structure is the
    same for every member and every step. The step's optional third argument, (devices, K)
    bools, freezes members: their updates are skipped (`steps.train_step`'s ``frozen``).
    """
    if getattr(model, "bn_gamma", 0) > 0:
        model = model.clone(bn_axis_name=steps.AXIS)
    beta_fn, lr_fn, objective, clip = member_hyperparameters(configs, steps_per_epoch)

    def step(
        states: steps.TrainState, batch: dict[str, jax.Array], frozen: jax.Array | None = None
    ):
        # frozen: (K,) bools, the members that diverged; their steps are never applied.
        if frozen is None:
            frozen = jnp.zeros((len(configs),), bool)

        def member_step(state: steps.TrainState, k: jax.Array, frozen_k: jax.Array):
            tx = steps.make_tx(clip(k), lr_fn(k))
            new_state, step_metrics = steps.train_step(
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
        step = steps.counted(step, compilations, "train_step_compilations")
    return jax.pmap(
        step, axis_name=steps.AXIS, donate_argnums=(0,) if donate else (), devices=devices
    )


def make_p_population_eval_step(
    model: models.VAE,
    configs: Sequence[ml_collections.ConfigDict],
    *,
    devices: Sequence[jax.Device] | None = None,
    compilations: collections.Counter | None = None,
    precision: str | None = None,
) -> Callable:
    """`steps.eval_step` vmapped over members (stacked params, one key per member) and pmapped."""
    objective = member_objectives(configs)

    def step(params, batch, keys):
        def member_eval(p, key, k):
            return steps.eval_step(p, batch, key, model=model, objective=objective(k))

        return jax.vmap(member_eval)(params, keys, jnp.arange(len(configs)))

    step = backend.with_precision(step, precision)
    if compilations is not None:
        step = steps.counted(step, compilations, "eval_step_compilations")
    return jax.pmap(step, axis_name=steps.AXIS, devices=devices)


def stack_states(states: Sequence[steps.TrainState]) -> steps.TrainState:
    """Members' states stacked on a new leading axis, all with the first one's ``tx``."""
    template = states[0].tx
    states = [s.replace(tx=template) for s in states]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def stack_params(params: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *params)
