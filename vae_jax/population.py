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

import os
from typing import Any

import ml_collections

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
