"""β and learning-rate schedules: reference values, JAX transformations, properties, errors."""

import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import fixture_path
from hypothesis import given, settings
from hypothesis import strategies as st

from vae_jax.core import schedules


def _reference_cases():
    with open(fixture_path("cyclical_linear_reference.json")) as f:
        return json.load(f)["cases"]


def test_cyclical_linear_equals_reference_loop():
    cases = _reference_cases()
    assert cases, "fixture holds no cases"
    for case in cases:
        beta = schedules.cyclical(
            case["n_iter"], case["n_cycle"], case["ratio"], case["start"], case["stop"]
        )
        values = np.asarray(beta(np.arange(case["n_iter"])))
        assert values.dtype == np.float32
        np.testing.assert_allclose(values, case["values"], rtol=0, atol=1e-6, err_msg=str(case))


def test_past_total_steps_holds_stop():
    beta = schedules.cyclical(100, num_cycles=4, ratio=0.5, start=0.2, stop=0.8)
    np.testing.assert_array_equal(beta(np.arange(100, 1000)), np.float32(0.8))
    lr = schedules.cyclical_cosine_lr(1.0, 100, 4)
    np.testing.assert_allclose(lr(np.arange(100, 200)), 0.0, atol=1e-7)


def test_python_int_and_arrays_of_any_shape():
    beta = schedules.cyclical(100, 4)
    assert beta(13).shape == () and beta(13).dtype == jnp.float32
    steps = np.arange(24).reshape(2, 3, 4)
    out = beta(steps)
    assert out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out.reshape(-1), beta(np.arange(24)))
    for sched in (schedules.constant(0.5), schedules.monotonic(10)):
        assert sched(steps).shape == (2, 3, 4) and sched(steps).dtype == jnp.float32


@pytest.mark.parametrize("shape", schedules.SHAPES)
def test_jit_vmap_and_grad(shape):
    beta = schedules.cyclical(1000, 4, 0.5, shape=shape)
    steps = jnp.arange(1000)
    eager = beta(steps)
    np.testing.assert_allclose(jax.jit(beta)(steps), eager, atol=1e-7)
    np.testing.assert_allclose(jax.vmap(beta)(steps), eager, atol=1e-7)

    def loss(w, step):  # Rec + β·KL with a traced step, as in a train step.
        return jnp.sum(w**2) + beta(step) * jnp.sum(jnp.abs(w))

    w = jnp.array([1.0, -2.0])
    g = jax.jit(jax.grad(loss))(w, jnp.int32(60))
    np.testing.assert_allclose(g, 2 * w + beta(60) * jnp.sign(w), rtol=1e-6)


def test_monotonic():
    beta = schedules.monotonic(10, start=0.1, stop=1.0)
    want = [0.1 + 0.09 * t for t in range(10)] + [1, 1]
    np.testing.assert_allclose(beta(np.arange(12)), want, rtol=1e-6)
    np.testing.assert_array_equal(schedules.monotonic(0, stop=0.7)(np.arange(3)), np.float32(0.7))


def test_curved_shapes_span_start_to_stop():
    for shape in ("sigmoid", "cosine"):
        beta = schedules.cyclical(400, 4, 0.5, start=0.1, stop=0.9, shape=shape)
        values = np.asarray(beta(np.arange(100)))
        assert values[0] == pytest.approx(0.1, abs=1e-6)
        assert values[50] == pytest.approx(0.9, abs=1e-6)  # v = 1 exactly: end of the ramp
        assert values[25] == pytest.approx(0.5, abs=1e-6)  # both shapes are symmetric


def test_sigmoid_matches_formula():
    beta = schedules.cyclical(400, 4, 0.5, shape="sigmoid")  # P = 100, ramp 50 steps
    lo, hi = 1 / (1 + math.exp(6)), 1 / (1 + math.exp(-6))
    for i in (0, 10, 25, 40, 50):
        v = i / 50
        want = (1 / (1 + math.exp(-(12 * v - 6))) - lo) / (hi - lo)
        assert float(beta(i)) == pytest.approx(want, abs=1e-6)
        assert float(beta(100 + i)) == pytest.approx(want, abs=1e-6)
    cos = schedules.cyclical(400, 4, 0.5, shape="cosine")
    assert float(cos(20)) == pytest.approx(0.5 - 0.5 * math.cos(math.pi * 0.4), abs=1e-6)


def test_cosine_lr_per_epoch_like_the_paper():
    steps_per_epoch, epochs_per_cycle = 7, 10
    lr = schedules.cyclical_cosine_lr(
        1e-3, total_steps=40 * steps_per_epoch, num_cycles=4, steps_per_update=steps_per_epoch
    )
    for epoch in range(1, 41):
        want = 1e-3 * 0.5 * (1 + math.cos(math.pi * ((epoch - 1) % epochs_per_cycle) / 10))
        first, last = (epoch - 1) * steps_per_epoch, epoch * steps_per_epoch - 1
        np.testing.assert_allclose(lr(np.arange(first, last + 1)), want, rtol=1e-5)


def test_cosine_lr_per_step_restarts_with_beta_cycles():
    lr = schedules.cyclical_cosine_lr(2.0, total_steps=97, num_cycles=3)
    beta = schedules.cyclical(97, 3)
    steps = np.arange(97)
    restarts = steps[np.asarray(lr(steps)) == np.float32(2.0)]
    cycle_starts = steps[np.asarray(beta(steps)) == 0.0]
    np.testing.assert_array_equal(restarts, cycle_starts)
    np.testing.assert_array_equal(restarts, [0, 32, 64])  # floor(c · 97/3)


# Hypothesis properties of the cyclical schedule, for every shape.
cyclical_args = st.tuples(
    st.integers(1, 12),  # num_cycles
    st.integers(1, 400),  # steps per cycle (rounded), so total_steps >= num_cycles
    st.integers(0, 30),  # extra steps making P fractional
    st.floats(0.05, 1.0),  # ratio
    st.floats(0.0, 1.0),
    st.floats(0.0, 1.0),
    st.sampled_from(schedules.SHAPES),
)


# Every example is evaluated on the same step array, so eager dispatch compiles each
# primitive once instead of once per array shape.
ALL_STEPS = np.arange(12 * 400 + 30 + 10)


def _build(args):
    cycles, per_cycle, extra, ratio, a, b, shape = args
    total = cycles * per_cycle + extra
    start, stop = min(a, b), max(a, b)
    return schedules.cyclical(total, cycles, ratio, start, stop, shape), total, cycles, start, stop


@settings(max_examples=40, deadline=None)
@given(cyclical_args)
def test_property_within_range(args):
    beta, total, _, start, stop = _build(args)
    values = np.asarray(beta(ALL_STEPS))[: total + 5]
    assert np.all(values >= np.float32(start) - 1e-6) and np.all(values <= np.float32(stop) + 1e-6)


@settings(max_examples=40, deadline=None)
@given(cyclical_args)
def test_property_cycles_start_at_start_and_repeat(args):
    beta, total, cycles, start, _ = _build(args)
    period = total / cycles
    starts = [math.floor(c * period) for c in range(cycles)]
    np.testing.assert_allclose(np.asarray(beta(ALL_STEPS))[starts], start, atol=1e-6)
    # β(floor(c·P) + i) is the same in every cycle c for every i that all cycles contain;
    # for integral P this is β(t + P) = β(t).
    shortest = min(np.diff(starts + [total]))
    all_values = np.asarray(beta(ALL_STEPS))
    values = all_values[np.array(starts)[:, None] + np.arange(shortest)]
    np.testing.assert_allclose(values, np.broadcast_to(values[:1], values.shape), atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(cyclical_args)
def test_property_non_decreasing_within_a_cycle(args):
    beta, total, cycles, _, _ = _build(args)
    period = total / cycles
    bounds = [math.floor(c * period) for c in range(cycles)] + [total]
    values = np.asarray(beta(ALL_STEPS))
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        assert np.all(np.diff(values[lo:hi]) >= -1e-6)


def _cfg(**kwargs):
    return ml_collections.ConfigDict(kwargs)


def test_make_schedule_builds_each_kind():
    beta = schedules.make_schedule(
        _cfg(name="cyclical", total_steps=100, num_cycles=4, ratio=0.5, start=0.0, stop=1.0)
    )
    np.testing.assert_array_equal(beta(np.arange(100)), schedules.cyclical(100)(np.arange(100)))
    assert float(schedules.make_schedule(_cfg(name="constant", value=0.3))(5)) == pytest.approx(0.3)
    mono = schedules.make_schedule(_cfg(name="monotonic", warmup_steps=4))
    np.testing.assert_allclose(mono(np.arange(6)), [0, 0.25, 0.5, 0.75, 1, 1])
    lr = schedules.make_schedule(
        _cfg(name="cyclical_cosine_lr", init_value=1.0, total_steps=8, num_cycles=2)
    )
    assert float(lr(4)) == pytest.approx(1.0) and float(lr(2)) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(name="warmup_cosine"), r"name='warmup_cosine'.*one of"),
        (dict(name="cyclical", total_steps=100, num_cycles=0), r"num_cycles=0.*>= 1"),
        (dict(name="cyclical", total_steps=100, ratio=0.0), r"ratio=0.0.*\(0, 1\]"),
        (dict(name="cyclical", total_steps=100, ratio=1.5), r"ratio=1.5.*\(0, 1\]"),
        (dict(name="cyclical", total_steps=100, start=0.9, stop=0.1), r"start=0.9 > stop=0.1"),
        (dict(name="cyclical", total_steps=3, num_cycles=4), r"total_steps=3.*num_cycles=4"),
        (dict(name="cyclical", total_steps=100, shape="square"), r"shape='square'"),
        (dict(name="monotonic", warmup_steps=-1), r"warmup_steps=-1.*>= 0"),
        (dict(name="monotonic", warmup_steps=5, start=1.0, stop=0.0), r"start=1.0 > stop=0.0"),
        (dict(name="cyclical", total_steps=100, cycles=4), r"unknown field.*cycles"),
        (
            dict(
                name="cyclical_cosine_lr",
                init_value=1e-3,
                total_steps=10,
                num_cycles=2,
                steps_per_update=0,
            ),
            r"steps_per_update=0",
        ),
    ],
)
def test_make_schedule_rejects_invalid(fields, match):
    with pytest.raises(ValueError, match=match):
        schedules.make_schedule(_cfg(**fields))


def test_exponential_decays_continuously():
    fn = schedules.make_schedule(
        {"name": "exponential", "init_value": 1e-4, "transition_steps": 10, "decay_rate": 0.99}
    )
    np.testing.assert_allclose([fn(0), fn(10), fn(5)], [1e-4, 0.99e-4, 1e-4 * 0.99**0.5], rtol=1e-6)
