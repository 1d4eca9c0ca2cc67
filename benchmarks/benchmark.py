"""Train-step speed against the machine's measured matmul peak.

    python benchmarks/benchmark.py [--out bench.json] [--steps 30] [--only ptb_23,...]
        [--no_malloc_tuning] [--profile DIR]

``--no_malloc_tuning`` measures without `vae_jax.run.host`'s allocator settings (the "before").
``--profile DIR`` also writes a profiler trace of a few steps of each train-step config (after
its timed steps), to see where a step's time goes. To compare two versions of the code, use
``benchmarks/ab_step.py``, which alternates their steps in time.

Prints a table and writes JSON: ``{"peak_gflops", "peak_gflops_all", "backend", "configs":
[{"name", "emb", "hidden", "latent", "batch", "length", "ms_median", "ms_min", "ms_max",
"compile_s", "sentences_per_s", "tokens_per_s", "gflops", "peak_gflops", "peak_gflops_rounds",
"fraction_of_peak", "fraction_of_peak_rounds", "fraction_of_best_peak", "peak_rss_mb",
"page_faults_per_step"}, …]}``.

Peak: a jitted 2048×2048 fp32 ``jnp.dot`` (2·2048³ FLOP), median of repeats (20 at the start,
``peak_gflops``; 5 before each round). A shared VM's speed drifts, so each config's steps are
timed in rounds (5; one per call for IW-NLL), each after its own peak measurement, and its
``fraction_of_peak`` is the median over rounds of (GFLOP/s of the round's median step) / (the
round's peak); ``fraction_of_best_peak`` is the conservative figure, GFLOP/s of the median step
over all rounds against the highest peak measured in the whole run.

FLOPs of one train step (B sentences of L tokens, so L encoder steps and L − 1 decoder steps;
embedding E, hidden H, latent Z, vocabulary V; a matmul of m×k by k×n costs 2mkn):
    encoder  B·L·(2·E·4H + 2·H·4H)                 input projection + recurrence
    heads    B·(2·H·2Z + 2·Z·H + 2·Z·4H)           μ, log σ², Dense(z) → h₀, z's gate share
    decoder  B·(L−1)·(2·E·4H + 2·H·4H + 2·H·V)     input projection + recurrence + output
    train    3 × forward                           backward ≈ 2 × forward
Elementwise work (gates, softmax, Adam) is not counted: the fraction of peak is a lower bound.

The Yelp row (``yelp_17``) is `configs/yelp.py`'s model (a CNN encoder of three convolutions,
300, 600 and 900 filters of width 5, stride 2, the last spanning what is left of a window of 25
positions; latent 256; decoder LSTM 256; embeddings shared with the output, vocabulary 3,641)
on rows of 17 tokens; its encoder's FLOPs are the convolutions' (`step_flops`).

The ``*_plain`` rows are the same model with ``kernels="plain"`` (`vae_jax.core.kernels`:
jax.grad of plain code, what ``auto`` picks on GPU/TPU), to show what the CPU kernels buy
here; ``*_bf16`` rows use bfloat16 matmul operands (``model.dtype``; FLOPs counted as for
float32, the fraction of the float32 peak can then exceed 1).

The population rows (``ptb_23_pop<K>``) time one vmapped step of K members at the PTB size
(`population.make_p_population_step`), FLOPs K × one step; ``ms_per_member`` = ms / K. On a CPU the
step grows about linearly in K; on an accelerator, where one batch-32 step is latency-bound, it
should not.

The dialog row (``cvae_swda``) times the CVAE of `vae_jax.dialog.cvae` at the paper's sizes (Zhao et
al. 2017: embeddings 200, utterance bi-GRU 2×300, context GRU 600, latent 200, decoder GRU 400,
vocabulary 10,002, 70 topics) on a batch of 30 responses of 24 tokens, each with 9 context
utterances padded to 40 (the pipeline's layout; the GRUs run over every padded step). FLOPs
(a GRU step of input I, hidden H: 2·I·3H + 2·H·3H), with S = B·9 + B utterances:
    utterances  S·40·2·(2·E·3H + 2·H·3H)          both directions, contexts and responses
    context     B·9·(2·(2H + 2)·3Hc + 2·Hc·3Hc)
    heads       B·(2·(c + 2H)·2Z + 2·c·400 + 2·400·2Z + 2·(c + Z)·(400 + 400 + Hd) + 2·400·V)
    decoder     B·23·(2·E·3Hd + 2·Hd·3Hd + 2·Hd·V)
    train       3 × forward, c = 30 + 4 + 4 + Hc the condition's width.

The IW-NLL row (``iwnll_k500``) times `metrics.iw_log_weights` on 64 sentences at K = 500
(3 repeats; the first call's compile reported apart), FLOPs 500 × the decoder's forward pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import resource
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

try:
    from vae_jax.core import objectives
    from vae_jax.run import build, host, population, steps

    make_model = build.make_model
except ImportError:  # ab_step.py runs this file against revisions from before the wings
    from vae_jax import host, objectives, train

    steps = population = train  # the steps and the population steps lived in train.py
    try:
        from vae_jax import runs

        make_model = runs.make_model
    except (ImportError, AttributeError):
        make_model = train.make_model

PROFILED_STEPS = 5
CONFIGS = {
    # name: (emb, hidden, latent, vocab, batch, length)
    "ptb_23": (256, 256, 32, 10_002, 32, 23),
    "ptb_40": (256, 256, 32, 10_002, 32, 40),
    "savae_size_23": (512, 1024, 32, 10_002, 32, 23),
    "yelp_17": (256, 256, 256, 3_641, 32, 17),
}
# Configs with the CNN encoder (`configs/yelp.py`'s): their model fields.
CNN_ENCODERS = {
    "yelp_17": dict(
        encoder="cnn", cnn_filters=(300, 600, 900), cnn_width=5, cnn_stride=2, cnn_length=17,
        embedding="shared_normalized",
    ),
}  # fmt: skip
# The PTB model with other layers (`vae_jax.core.kernels`): plain (for GPU/TPU) instead of the CPU
# ones, and bfloat16 matmul operands; name: (base config, kernels, dtype).
VARIANTS = {
    "ptb_23_plain": ("ptb_23", "plain", "float32"),
    "ptb_40_plain": ("ptb_40", "plain", "float32"),
    "ptb_23_bf16": ("ptb_23", "cpu", "bfloat16"),
    "ptb_23_plain_bf16": ("ptb_23", "plain", "bfloat16"),
    "savae_size_23_bf16": ("savae_size_23", "cpu", "bfloat16"),
}
# The dialog CVAE at the paper's sizes: (vocab, topics, batch, response length, context, L).
CVAE_CONFIGS = {"cvae_swda": (10_002, 70, 30, 24, 9, 40)}
CVAE_CONFIGS["cvae_swda_bf16"] = CVAE_CONFIGS["cvae_swda"]  # bfloat16 matmul operands
# Populations (`vae_jax.run.population`) of K members at the PTB size, one vmapped step.
POPULATIONS = {f"ptb_23_pop{k}": k for k in (1, 2, 4, 8)}


def step_flops(
    emb: int, hidden: int, latent: int, vocab: int, batch: int, length: int, cnn: dict | None = None
) -> float:
    """Matmul FLOPs of one train step (see the module docstring); ``cnn``: a CNN encoder's
    fields (`CNN_ENCODERS`) in place of the LSTM encoder."""
    e, h, z, v = emb, hidden, latent, vocab
    if cnn:
        encoder, features = cnn_flops(batch, emb, cnn), cnn["cnn_filters"][-1]
    else:
        encoder, features = batch * length * (2 * e * 4 * h + 2 * h * 4 * h), h
    heads = batch * (2 * features * 2 * z + 2 * z * h + 2 * z * 4 * h)
    decoder = batch * (length - 1) * (2 * e * 4 * h + 2 * h * 4 * h + 2 * h * v)
    return 3.0 * (encoder + heads + decoder)


def cnn_flops(batch: int, emb: int, cnn: dict) -> float:
    """Forward FLOPs of a CNN encoder (`models.VAE._cnn_layers`): each layer B·L'·2·W·C·F,
    L' windows of W positions × C channels, the last layer spanning what is left."""
    width, stride = cnn["cnn_width"], cnn["cnn_stride"]
    positions, channels, flops = cnn["cnn_length"] + 2 * (width - 1), emb, 0
    for i, filters in enumerate(cnn["cnn_filters"]):
        w, s = (positions, 1) if i == len(cnn["cnn_filters"]) - 1 else (width, stride)
        positions = (positions - w) // s + 1
        flops += batch * positions * 2 * w * channels * filters
        channels = filters
    return flops


@functools.cache
def _peak_operands(n: int) -> tuple[jax.Array, jax.Array]:
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    return a, b


_dot = jax.jit(jnp.dot)


def matmul_peak(n: int = 2048, repeats: int = 20) -> float:
    """Median GFLOP/s of a jitted n×n fp32 matmul."""
    a, b = _peak_operands(n)
    _dot(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        _dot(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / float(np.median(times)) / 1e9


def model_config(
    emb: int, hidden: int, latent: int, kernels: str = "cpu", dtype: str = "float32"
) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(
        dict(
            enc_emb_dim=emb,
            enc_hidden_dim=hidden,
            dec_emb_dim=emb,
            dec_hidden_dim=hidden,
            latent_dim=latent,
            dec_dropout_in=0.5,
            dec_dropout_out=0.5,
            init_scale=0.1,
        )
    )
    if kernels != "cpu":  # older revisions (ab_step.py) have only the CPU float32 kernels
        config.model.kernels = kernels
    if dtype != "float32":
        config.model.dtype = dtype
    config.grad_clip_norm = 5.0
    config.loss_spike = ml_collections.ConfigDict({"factor": 0.0, "window": 50, "action": "skip"})
    return config


def random_batch(vocab: int, batch: int, length: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, vocab, size=(batch, length), dtype=np.int32)
    tokens[:, 0], tokens[:, -1] = 2, 3  # <s> … </s>
    return tokens


@dataclasses.dataclass
class Timing:
    times: list[float]  # seconds per call, all rounds
    rounds: list[tuple[float, float]]  # (matmul peak GFLOP/s, median seconds per call)
    compile_s: float
    faults_per_call: float


def timed(call: Callable[[], object], n: int) -> list[float]:
    """Wall seconds of each of ``n`` calls, each waited for (`jax.block_until_ready`)."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - t)
    return times


def alternate(
    runs: dict[str, Callable[[int], list[float]]], rounds: int, steps: int
) -> dict[str, list[list[float]]]:
    """Per-call seconds of each side's ``runs[side](steps)``, the sides taking turns for
    ``rounds`` rounds (who goes first alternates), so all see the same drift of the machine.
    Returns, per side, one list of times per round."""
    times: dict[str, list[list[float]]] = {side: [] for side in runs}
    for r in range(rounds):
        for side in runs if r % 2 == 0 else reversed(runs):
            times[side].append(runs[side](steps))
    return times


def round_ratios(base: list[list[float]], other: list[list[float]]) -> list[float]:
    """Per round, the median call of ``other`` over the median call of ``base``."""
    return [float(np.median(o) / np.median(b)) for b, o in zip(base, other, strict=True)]


def time_calls(fn, calls: int, warmup: int, rounds: int) -> Timing:
    """Times ``calls`` calls after compilation and ``warmup`` calls, in ``rounds`` rounds, each
    preceded by a matmul-peak measurement: a shared VM's speed drifts over seconds to minutes,
    and a round's calls are set against the peak measured next to them."""
    compile_s = timed(fn, 1)[0]
    timed(fn, warmup)
    times, per_round, faults = [], [], 0
    for r in range(rounds):
        peak = matmul_peak(repeats=5)
        faults -= resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        chunk = timed(fn, calls // rounds + (r < calls % rounds))
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        times += chunk
        per_round.append((peak, float(np.median(chunk))))
    return Timing(times, per_round, compile_s, faults / calls)


def _make_model(config: ml_collections.ConfigDict, vocab: int):
    return make_model(config, vocab)


def population_step_call(name: str) -> Callable[[], dict]:
    """`population.make_p_population_step` for ``POPULATIONS[name]`` members at the PTB size (β 1,
    learning rate 1e-3, member k seeded k), carried over like `train_step_call`'s."""
    emb, hidden, latent, vocab, batch, length = CONFIGS["ptb_23"]
    members = []
    for k in range(POPULATIONS[name]):
        config = model_config(emb, hidden, latent, kernels="auto")
        config.update(seed=k, schedule_unit="steps", objective="beta_elbo")
        config.beta_schedule = ml_collections.ConfigDict({"name": "constant", "value": 1.0})
        config.lr_schedule = ml_collections.ConfigDict({"name": "constant", "value": 1e-3})
        members.append(config)
    model = _make_model(members[0], vocab)
    states = []
    for config in members:
        lr_fn = steps.make_schedules(config, None)[1]
        key = jax.random.PRNGKey(config.seed)
        states.append(steps.create_train_state(config, model, lr_fn, key, length))
    devices = jax.local_devices()[:1]
    state = steps.replicate(population.stack_states(states), devices)
    p_step = population.make_p_population_step(model, members, None, devices=devices)
    return _carried(p_step, state, random_batch(vocab, batch, length))


def _carried(p_step: Callable, state, tokens: np.ndarray) -> Callable[[], dict]:
    """A call of ``p_step`` on the same batch, its (donated) state carried to the next call."""
    batch = steps.shard({"tokens": tokens}, 1)
    holder = {"state": state}

    def call():
        holder["state"], metrics = p_step(holder["state"], batch)
        return metrics

    return call


def train_step_call(name: str) -> Callable[[], dict]:
    """One config's pmapped `steps.train_step` on one device, state donated and carried over:
    each call runs one step on the same random batch and returns its metrics (not waited for)."""
    if name in POPULATIONS:
        return population_step_call(name)
    if name in CVAE_CONFIGS:
        return cvae_step_call(name)
    base, kernels, dtype = VARIANTS.get(name, (name, "cpu", "float32"))
    emb, hidden, latent, vocab, batch, length = CONFIGS[base]
    config = model_config(emb, hidden, latent, kernels, dtype)
    config.model.update(CNN_ENCODERS.get(base, {}))
    model = _make_model(config, vocab)
    beta_fn = lr_fn = lambda step: jnp.float32(1e-3)  # noqa: E731
    state = steps.create_train_state(config, model, lr_fn, jax.random.PRNGKey(0), length)
    devices = jax.local_devices()[:1]
    state = steps.replicate(state, devices)
    if hasattr(steps, "make_p_train_step"):
        p_step = steps.make_p_train_step(
            model, beta_fn, lr_fn, objectives.beta_elbo, devices=devices
        )
    else:  # an older revision (ab_step.py)
        p_step = jax.pmap(
            functools.partial(
                steps.train_step,
                model=model,
                beta_fn=beta_fn,
                lr_fn=lr_fn,
                objective=objectives.beta_elbo,
            ),
            axis_name=steps.AXIS,
            donate_argnums=(0,),
            devices=devices,
        )
    return _carried(p_step, state, random_batch(vocab, batch, length))


def bench_train_step(name: str, steps: int, warmup: int, profile_dir: str | None = None) -> dict:
    call = train_step_call(name)
    timing = time_calls(call, steps, warmup, rounds=min(steps, 5))
    if profile_dir:  # after the timed steps, so tracing costs them nothing
        with jax.profiler.trace(os.path.join(profile_dir, name), create_perfetto_trace=True):
            timed(call, PROFILED_STEPS)
    members = POPULATIONS.get(name, 1)
    base = "ptb_23" if name in POPULATIONS else VARIANTS.get(name, (name,))[0]
    sizes = CONFIGS[base]
    emb, hidden, latent, _, batch, length = sizes
    flops = members * step_flops(*sizes, cnn=CNN_ENCODERS.get(base))
    row = summarize(name, (emb, hidden, latent, batch, length), timing, flops)
    if name in POPULATIONS:
        row["members"] = members
        row["ms_per_member"] = row["ms_median"] / members
    return row


def cvae_step_flops(model, vocab: int, batch: int, length: int, context: int, utt: int) -> float:
    """Matmul FLOPs of one CVAE train step (see the module docstring)."""
    e, h, hc, hd, z = (
        model.emb_dim, model.utt_hidden_dim, model.ctx_hidden_dim, model.dec_hidden_dim,
        model.latent_dim,
    )  # fmt: skip
    c = model.topic_emb_dim + 8 + hc
    gru = lambda i, hidden: 2 * i * 3 * hidden + 2 * hidden * 3 * hidden  # noqa: E731
    # Context utterances at their padded length, the response at its bucket's (both ways).
    utterances = (batch * context * utt + batch * length) * 2 * gru(e, h)
    ctx = batch * context * gru(2 * h + 2, hc)
    prior_hidden, bow_hidden = max(2 * z, 100), model.bow_hidden_dim
    heads = batch * (
        2 * (c + 2 * h) * 2 * z + 2 * c * prior_hidden + 2 * prior_hidden * 2 * z
        + 2 * (c + z) * (bow_hidden + hd) + 2 * bow_hidden * vocab
    )  # fmt: skip
    decoder = batch * (length - 1) * (gru(e, hd) + 2 * hd * vocab)
    return 3.0 * (utterances + ctx + heads + decoder)


def random_dialog_batch(
    vocab: int, topics: int, batch: int, length: int, context: int, utt: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Responses of ``length`` tokens and full contexts of ``context`` utterances of random
    lengths up to ``utt`` (`vae_jax.dialog.cvae`'s layout)."""
    rng = np.random.default_rng(seed)
    contexts = np.zeros((batch, context, utt), np.int32)
    for i in range(batch):
        for j in range(context):
            n = int(rng.integers(3, utt + 1))
            contexts[i, j, :n] = rng.integers(4, vocab, n)
    return {
        "tokens": random_batch(vocab, batch, length, seed),
        "context": contexts,
        "context_lengths": np.full((batch,), context, np.int32),
        "floors": rng.integers(0, 2, (batch, context)).astype(np.int32),
        "topics": rng.integers(0, topics, batch).astype(np.int32),
        "my_profile": rng.random((batch, 4)).astype(np.float32),
        "other_profile": rng.random((batch, 4)).astype(np.float32),
    }


def _cvae(name: str):
    try:
        from vae_jax.dialog import cvae
    except ImportError:  # a revision from before the wings (ab_step.py)
        from vae_jax import cvae

    vocab, topics = CVAE_CONFIGS[name][:2]
    dtype = {"dtype": "bfloat16"} if name.endswith("_bf16") else {}  # older CVAEs: no field
    return cvae.CVAE(vocab_size=vocab, num_topics=topics, **dtype)


def cvae_step_call(name: str) -> Callable[[], dict]:
    """`steps.train_step` of the dialog CVAE (`vae_jax.dialog.cvae`, CVAE+BoW, the version's default
    layers) at ``CVAE_CONFIGS[name]``, state carried over, as `train_step_call`."""
    vocab, topics, batch, length, context, utt = CVAE_CONFIGS[name]
    model = _cvae(name)
    config = ml_collections.ConfigDict({"grad_clip_norm": 5.0, "loss_spike": {"window": 50}})
    beta_fn = lr_fn = lambda step: jnp.float32(1e-3)  # noqa: E731
    data = random_dialog_batch(vocab, topics, batch, length, context, utt)
    example = {k: v[:1] for k, v in data.items()}
    state = steps.create_train_state(config, model, lr_fn, jax.random.PRNGKey(0), example)
    devices = jax.local_devices()[:1]
    p_step = steps.make_p_train_step(model, beta_fn, lr_fn, objectives.beta_elbo, devices=devices)
    holder = {"state": steps.replicate(state, devices)}
    sharded = steps.shard(data, 1)

    def call():
        holder["state"], metrics = p_step(holder["state"], sharded)
        return metrics

    return call


def bench_cvae_step(name: str, steps: int, warmup: int) -> dict:
    """`cvae_step_call`'s step timed, its FLOPs counted (`cvae_step_flops`)."""
    vocab, _, batch, length, context, utt = CVAE_CONFIGS[name]
    model = _cvae(name)
    timing = time_calls(cvae_step_call(name), steps, warmup, rounds=min(steps, 5))
    flops = cvae_step_flops(model, vocab, batch, length, context, utt)
    sizes = (model.emb_dim, model.dec_hidden_dim, model.latent_dim, batch, length)
    return {**summarize(name, sizes, timing, flops), "context": context, "utterance_length": utt}


def bench_iwnll(repeats: int, num_samples: int = 500) -> dict:
    """Sentences/s of importance-weighted NLL (`metrics.iw_log_weights`) at the PTB size."""
    from vae_jax.core import metrics

    emb, hidden, latent, vocab, batch, length = CONFIGS["ptb_23"]
    model = _make_model(model_config(emb, hidden, latent), vocab)
    batches = [{"tokens": random_batch(vocab, batch, length, seed)} for seed in range(2)]
    params = model.init(
        jax.random.PRNGKey(0),
        jnp.asarray(batches[0]["tokens"][:1]),
        jax.random.split(jax.random.PRNGKey(1), 1),
        train=False,
    )["params"]

    def call():
        return metrics.iw_log_weights(
            model, params, batches, jax.random.PRNGKey(2), num_samples=num_samples
        )[0]

    timing = time_calls(call, repeats, warmup=0, rounds=repeats)
    sentences = batch * len(batches)
    per_token = 2 * emb * 4 * hidden + 2 * hidden * 4 * hidden + 2 * hidden * vocab
    flops = num_samples * sentences * (length - 1) * per_token
    sizes = (emb, hidden, latent, sentences, length)
    return summarize(f"iwnll_k{num_samples}", sizes, timing, flops)


def summarize(name: str, sizes: tuple[int, ...], timing: Timing, flops: float) -> dict:
    """One row of the table. The fraction of peak is the median over rounds of (GFLOP/s of the
    round's median call) / (the round's peak)."""
    emb, hidden, latent, batch, length = sizes
    median = float(np.median(timing.times))
    fractions = [flops / seconds / 1e9 / peak for peak, seconds in timing.rounds]
    return {
        "name": name,
        "emb": emb,
        "hidden": hidden,
        "latent": latent,
        "batch": batch,
        "length": length,
        "ms_median": 1e3 * median,
        "ms_min": 1e3 * float(np.min(timing.times)),
        "ms_max": 1e3 * float(np.max(timing.times)),
        "compile_s": timing.compile_s,
        "sentences_per_s": batch / median,
        "tokens_per_s": batch * length / median,
        "gflops": flops / median / 1e9,
        "peak_gflops": float(np.median([peak for peak, _ in timing.rounds])),
        "peak_gflops_rounds": [peak for peak, _ in timing.rounds],
        "fraction_of_peak": float(np.median(fractions)),
        "fraction_of_peak_rounds": fractions,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "page_faults_per_step": timing.faults_per_call,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="Write the results as JSON here.")
    parser.add_argument(
        "--steps",
        type=int,
        default=30,
        help="Timed steps per config (20 or more for a figure worth quoting).",
    )
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--only", default="", help="Comma-separated config names.")
    parser.add_argument("--no_malloc_tuning", action="store_true")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help=f"Also trace {PROFILED_STEPS} steps of each train-step config into DIR/<config> "
        "(TensorBoard profile plugin; *.trace.json.gz opens in ui.perfetto.dev).",
    )
    args = parser.parse_args()
    if not args.no_malloc_tuning:
        host.tune_cpu_host()
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps={args.steps} must be >= 1, --warmup={args.warmup} >= 0")
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)  # an unwritable folder fails here, not later
    known = [*CONFIGS, *VARIANTS, *POPULATIONS, *CVAE_CONFIGS, "iwnll_k500"]
    names = [n for n in args.only.split(",") if n] or known
    unknown = set(names) - set(known)
    if unknown:
        parser.error(f"--only: unknown {sorted(unknown)}; known {known}")

    peak = matmul_peak()
    rows = []
    for name in names:
        if name == "iwnll_k500":
            rows.append(bench_iwnll(repeats=3))
        elif name in CVAE_CONFIGS:
            rows.append(bench_cvae_step(name, args.steps, args.warmup))
        else:
            rows.append(bench_train_step(name, args.steps, args.warmup, args.profile))
    peaks = [peak] + [p for row in rows for p in row["peak_gflops_rounds"]]
    for row in rows:  # the conservative figure: against the fastest the machine was in the run
        row["fraction_of_best_peak"] = row["gflops"] / max(peaks)

    print(
        f"backend {jax.default_backend()}, matmul peak {peak:.1f} GFLOP/s at the start, "
        f"{min(peaks):.1f}–{max(peaks):.1f} over the run"
    )
    header = f"{'config':<15}{'ms/step':>9}{'min':>8}{'max':>8}{'compile s':>10}"
    header += f"{'sent/s':>9}{'GFLOP/s':>9}{'peak':>7}{'% peak':>8}{'% best':>8}{'faults/step':>12}"
    header += f"{'RSS MB':>8}"
    print(header)
    for r in rows:
        print(
            f"{r['name']:<15}{r['ms_median']:>9.1f}{r['ms_min']:>8.1f}{r['ms_max']:>8.1f}"
            f"{r['compile_s']:>10.1f}{r['sentences_per_s']:>9.1f}{r['gflops']:>9.1f}"
            f"{r['peak_gflops']:>7.0f}{100 * r['fraction_of_peak']:>7.1f}%"
            f"{100 * r['fraction_of_best_peak']:>7.1f}%"
            f"{r['page_faults_per_step']:>12.0f}"
            f"{r['peak_rss_mb']:>8.0f}"
        )
    if args.out:
        result = {
            "peak_gflops": peak,
            "peak_gflops_all": peaks,
            "backend": jax.default_backend(),
            "configs": rows,
        }
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
