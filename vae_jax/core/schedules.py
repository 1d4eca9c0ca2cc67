"""Schedules for the KL weight β and the learning rate, in optax's `Schedule` form.

A schedule is a pure function ``step -> value``: ``step`` is a Python int or an integer array of
any shape, the value is float32 of the same shape. There is no Python branching on the step, so
every schedule can be called inside `jax.jit`, mapped with `jax.vmap` and used in a
differentiated loss.

The training objective of a VAE with a weighted KL term is (Fu et al. 2019, Eq. 4)

    L_β = E_q(z|x)[log p(x|z)] − β · KL(q(z|x) ‖ p(z)),

and the schedules below are the ways of moving β over training that the paper compares:
`constant` (β = 1 is the plain ELBO), `monotonic` (Bowman et al. 2016) and `cyclical`
(Fu et al. 2019, Eq. 5–6).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax

Schedule = Callable[[Any], jnp.ndarray]

SHAPES = ("linear", "sigmoid", "cosine")


def _as_step(step: Any) -> jnp.ndarray:
    return jnp.asarray(step).astype(jnp.int32)


def constant(value: float) -> Schedule:
    """β(t) = value."""
    value = float(value)

    def schedule(step):
        return jnp.full(jnp.shape(step), value, jnp.float32)

    return schedule


def monotonic(warmup_steps: int, start: float = 0.0, stop: float = 1.0) -> Schedule:
    """β(t) = start + (stop − start) · min(t / warmup_steps, 1)  (Bowman et al. 2016).

    With ``warmup_steps = 0`` β is ``stop`` from the first step.
    """
    _check_range("start", start, "stop", stop)
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps!r}: must be >= 0.")
    if warmup_steps == 0:
        return constant(stop)
    ramp = optax.linear_schedule(float(start), float(stop), int(warmup_steps))
    return lambda step: ramp(_as_step(step)).astype(jnp.float32)


def cycle_position(
    step: Any, total_steps: int, num_cycles: int
) -> tuple[jnp.ndarray, jnp.ndarray, float]:
    """Cycle index c and position i = t − floor(c·P) of step t, with period P = T / M.

    Cycle c covers the steps floor(c·P) ≤ t < floor((c+1)·P), exactly as in the paper's
    reference loop (which writes step ``int(i + c·P)``). Integer arithmetic keeps the cycle
    boundaries exact for any fractional P: floor(c·P) ≤ t ⟺ c·T < (t + 1)·M, so
    c = ((t + 1)·M − 1) // T. Past ``total_steps`` the last cycle continues (c stays M − 1),
    so i keeps growing and every cycle-based schedule holds its end value.
    """
    t = jnp.maximum(_as_step(step), 0)
    c = jnp.minimum(((t + 1) * num_cycles - 1) // total_steps, num_cycles - 1)
    i = t - (c * total_steps) // num_cycles
    return c, i, total_steps / num_cycles


def _ramp_shape(v: jnp.ndarray, shape: str) -> jnp.ndarray:
    """Maps the ramp fraction v ∈ [0, 1] onto [0, 1]."""
    if shape == "linear":
        return v
    if shape == "sigmoid":
        # 1 / (1 + exp(−(12v − 6))) rescaled so that it starts at exactly 0 and ends at 1.
        lo, hi = 1.0 / (1.0 + np.exp(6.0)), 1.0 / (1.0 + np.exp(-6.0))
        return (jnp.reciprocal(1.0 + jnp.exp(-(12.0 * v - 6.0))) - lo) / (hi - lo)
    if shape == "cosine":
        return 0.5 - 0.5 * jnp.cos(jnp.pi * v)
    raise ValueError(f"shape={shape!r}: must be one of {SHAPES}.")


def cyclical(
    total_steps: int,
    num_cycles: int = 4,
    ratio: float = 0.5,
    start: float = 0.0,
    stop: float = 1.0,
    shape: str = "linear",
) -> Schedule:
    """Cyclical annealing (Fu et al. 2019, Eq. 5–6).

    With period P = T / M and cycle position i (see `cycle_position`), the ramp fraction is
    v = i / (P·R): β = start + (stop − start) · f(v) while v ≤ 1, then β = stop until the
    next cycle. f is the identity for ``linear`` (the paper's choice, equal to the reference
    loop's values), a logistic 1/(1+exp(−(12v−6))) for ``sigmoid`` and 0.5 − 0.5·cos(πv) for
    ``cosine``; the two curved shapes are rescaled to go exactly from 0 to 1.

    Past ``total_steps`` β holds ``stop``: training ends on the full ELBO, never on a
    restarted ramp.
    """
    _check_cyclical(total_steps, num_cycles, ratio, start, stop, shape)
    start, stop = float(start), float(stop)

    def schedule(step):
        _, i, period = cycle_position(step, total_steps, num_cycles)
        # One multiply by the reference loop's per-step increment, so the linear shape
        # reproduces its values.
        v = i.astype(jnp.float32) * (1.0 / (period * ratio))
        ramp = start + (stop - start) * _ramp_shape(jnp.minimum(v, 1.0), shape)
        return jnp.where(v <= 1.0, ramp, stop).astype(jnp.float32)

    return schedule


def cyclical_cosine_lr(
    init_value: float, total_steps: int, num_cycles: int, steps_per_update: int = 1
) -> Schedule:
    """Cosine learning rate restarted at the start of every β cycle.

    lr(t) = init_value · 0.5 · (1 + cos(π·τ)), τ = i / P the position in the cycle (see
    `cycle_position`). The step is first rounded down to a multiple of ``steps_per_update``,
    so ``steps_per_update = steps_per_epoch`` gives the per-epoch schedule of the paper's
    language-model code, lr = lr₀ · 0.5 · (1 + cos(π · ((epoch − 1) mod C) / C)) for cycles of
    C epochs. Past ``total_steps`` the last cycle's decay runs out and holds 0.
    """
    if init_value < 0:
        raise ValueError(f"init_value={init_value!r}: must be >= 0.")
    _check_cycles(total_steps, num_cycles)
    if steps_per_update < 1:
        raise ValueError(f"steps_per_update={steps_per_update!r}: must be >= 1.")
    # optax's cosine decay from init_value to 0 over one (normalised) cycle.
    decay = optax.cosine_decay_schedule(float(init_value), decay_steps=1)

    def schedule(step):
        t = _as_step(step)
        t = (t // steps_per_update) * steps_per_update
        _, i, period = cycle_position(t, total_steps, num_cycles)
        return decay(i.astype(jnp.float32) / period).astype(jnp.float32)

    return schedule


def exponential(init_value: float, transition_steps: int, decay_rate: float) -> Schedule:
    """lr(t) = init_value · decay_rate^(t / transition_steps), continuous (`optax.exponential_decay`
    without staircase): e.g. × 0.99 every two epochs, as Fu et al.'s Yelp code decays it."""
    if init_value < 0 or not 0 < decay_rate <= 1:
        raise ValueError(
            f"init_value={init_value!r}, decay_rate={decay_rate!r}: need init_value >= 0 and "
            "0 < decay_rate <= 1."
        )
    if transition_steps < 1:
        raise ValueError(f"transition_steps={transition_steps!r}: must be >= 1.")
    decay = optax.exponential_decay(float(init_value), int(transition_steps), float(decay_rate))
    return lambda step: decay(_as_step(step)).astype(jnp.float32)


def _check_range(lo_name: str, lo: float, hi_name: str, hi: float) -> None:
    if not lo <= hi:
        raise ValueError(f"{lo_name}={lo!r} > {hi_name}={hi!r}: need {lo_name} <= {hi_name}.")


def _check_cycles(total_steps: int, num_cycles: int) -> None:
    if int(num_cycles) != num_cycles or num_cycles < 1:
        raise ValueError(f"num_cycles={num_cycles!r}: must be an integer >= 1.")
    if int(total_steps) != total_steps or total_steps < num_cycles:
        raise ValueError(
            f"total_steps={total_steps!r}: must be an integer >= num_cycles={num_cycles!r} "
            "(every cycle needs at least one step)."
        )


def _check_cyclical(total_steps, num_cycles, ratio, start, stop, shape) -> None:
    _check_cycles(total_steps, num_cycles)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio={ratio!r}: must be in (0, 1] (the ramp's share of a cycle).")
    _check_range("start", start, "stop", stop)
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r}: must be one of {SHAPES}.")


# Name -> (factory, the fields it takes). `make_schedule` reads exactly these fields.
_FACTORIES: dict[str, tuple[Callable[..., Schedule], tuple[str, ...]]] = {
    "constant": (constant, ("value",)),
    "monotonic": (monotonic, ("warmup_steps", "start", "stop")),
    "cyclical": (cyclical, ("total_steps", "num_cycles", "ratio", "start", "stop", "shape")),
    "cyclical_cosine_lr": (
        cyclical_cosine_lr,
        ("init_value", "total_steps", "num_cycles", "steps_per_update"),
    ),
    "exponential": (exponential, ("init_value", "transition_steps", "decay_rate")),
}


def make_schedule(cfg: Mapping[str, Any]) -> Schedule:
    """Builds a schedule from a config: ``cfg.name`` plus the fields of that schedule.

    Fields the factory does not know are rejected (a typo would otherwise silently fall back
    to a default); missing fields take the factory's defaults. Every error names the field,
    the value and what is allowed.
    """
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    if name not in _FACTORIES:
        raise ValueError(f"schedule name={name!r}: must be one of {sorted(_FACTORIES)}.")
    factory, fields = _FACTORIES[name]
    unknown = sorted(set(cfg) - set(fields))
    if unknown:
        raise ValueError(
            f"schedule {name!r} got unknown field(s) {unknown}: allowed fields are {list(fields)}."
        )
    return factory(**cfg)


# Fields that count steps; a config with ``schedule_unit = "epochs"`` gives them in epochs.
STEP_FIELDS = ("warmup_steps", "total_steps", "steps_per_update", "transition_steps")
UNITS = ("steps", "epochs")


def in_steps(cfg: Mapping[str, Any], unit: str, steps_per_epoch: int | None) -> dict[str, Any]:
    """A schedule config with its `STEP_FIELDS` in steps: given in ``unit`` ("steps" or
    "epochs"), epoch values are multiplied by ``steps_per_epoch`` and rounded."""
    cfg = dict(cfg)
    if unit not in UNITS:
        raise ValueError(f"config.schedule_unit={unit!r}: must be 'steps' or 'epochs'.")
    if unit == "epochs":
        if not steps_per_epoch:
            raise ValueError(
                "config.schedule_unit='epochs' needs a dataset with epochs; this one has none. "
                "Use schedule_unit='steps'."
            )
        for field in STEP_FIELDS:
            if field in cfg:
                cfg[field] = int(round(cfg[field] * steps_per_epoch))
        if "steps_per_update" in cfg:  # an update interval under one step: every step
            cfg["steps_per_update"] = max(1, cfg["steps_per_update"])
    return cfg
