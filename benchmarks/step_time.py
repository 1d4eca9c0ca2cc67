"""Time per training step of the PTB models: VAE and SA-VAE (Fu et al. 2019, Table 1).

    python benchmarks/step_time.py [--variants cyclical savae_cyclical] [--steps 10]
        [--length 23] [--set svi_remat=false] [--out step_time.json]
    python benchmarks/step_time.py --alternate 6 --steps 2 --variants cyclical \
        savae_cyclical savae_cyclical:svi_remat=false \
        savae_cyclical:svi_hvp=finite_difference --out savae_hvp_cpu.json

Builds each ``configs/ptb.py`` variant's model (embeddings 256, hidden 256, latent 32, vocab
10,002, batch 32) and runs the jitted, pmapped `steps.train_step` on random sentences of
``--length`` tokens (<s> and </s> included; PTB averages 23) on the local devices. Reports the
compile time, the step's temporary memory (XLA's ``memory_analysis``) and the median wall time
of ``--steps`` steps after a warm-up step, waiting for each step's result. ``--set
field=value`` overrides a ``config.model`` field of every variant;
``variant:field=value,field=value`` one variant's own (after ``--set``).

``--alternate R``: all variants are built first, then take turns, ``--steps`` steps each, for
R rounds (who goes first alternates: `benchmark.alternate`), so that all see the same drift of
a shared machine; each variant's row then also has ``ratio_to_first``, the median over rounds
of its round's median step over the first variant's (``ratio_to_first_rounds``: each round's).
The JSON holds the command line that made it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time

import jax
import numpy as np
from benchmark import alternate, round_ratios, timed  # benchmarks/benchmark.py

from configs import ptb
from vae_jax.core import objectives
from vae_jax.run import build, host, steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTB_VOCAB = 10_002  # 10,000 words, <unk> among them, and the specials of vae_jax.core.models


def ptb_config(variant: str):
    return ptb.get_config(variant)


def parse_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_setting(text: str) -> tuple[str, dict]:
    """``variant[:field=value,…]`` → (variant, its ``config.model`` overrides)."""
    variant, _, fields = text.partition(":")
    pairs = [kv.split("=", 1) for kv in fields.split(",") if kv]
    if any(len(kv) != 2 for kv in pairs):
        raise SystemExit(f"step_time.py: {text!r}: expected variant:field=value,field=value")
    return variant, {k: parse_value(v) for k, v in pairs}


def build_step(variant: str, overrides: dict, length: int) -> dict:
    """The variant's step compiled (ahead of time, timed: ``compile_s``; its temporary buffers'
    size, what XLA allocates per step beyond parameters and batch: ``temp_mb``) and ``call``,
    a call running one step on the same batch and returning its metrics, state carried over."""
    config = ptb_config(variant)
    config.model.update(overrides)
    num_devices = jax.local_device_count()
    beta_fn, lr_fn = steps.make_schedules(config, steps_per_epoch=1_000)
    model = build.make_model(config, PTB_VOCAB)
    state = steps.create_train_state(config, model, lr_fn, jax.random.PRNGKey(0), length)
    state = steps.replicate(state)
    objective = objectives.make(config)
    p_step = steps.make_p_train_step(model, beta_fn, lr_fn, objective)
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, PTB_VOCAB, size=(config.batch_size, length), dtype=np.int32)
    tokens[:, 0], tokens[:, -1] = 2, 3  # <s> … </s>
    batch = steps.shard({"tokens": tokens}, num_devices)
    start = time.perf_counter()
    compiled = p_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    holder = {"state": state}

    def call():
        holder["state"], metrics = compiled(holder["state"], batch)
        return metrics

    return {
        "config": config,
        "call": call,
        "compile_s": compile_s,
        "temp_mb": None if memory is None else memory.temp_size_in_bytes / 2**20,
    }


SVI_REPORTED = ("svi_steps", "svi_hvp", "svi_remat", "svi_fd_eps")


def row(variant: str, overrides: dict, built: dict, times: list[float]) -> dict:
    config = built["config"]
    return {
        "variant": variant,
        "svi_steps": int(config.model.svi_steps),
        "overrides": overrides,
        "model": {k: config.model[k] for k in SVI_REPORTED if k in config.model},
        "compile_s": built["compile_s"],
        "temp_mb": built["temp_mb"],
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "max_ms": 1e3 * max(times),
        "steps": len(times),
    }


def time_variant(variant: str, overrides: dict, steps: int, length: int) -> dict:
    built = build_step(variant, overrides, length)
    timed(built["call"], 1)  # warm-up
    return row(variant, overrides, built, timed(built["call"], steps))


def time_alternating(settings: list[tuple[str, dict]], rounds: int, steps: int, length: int):
    """Every setting's step built, compiled and warmed up, then timed in turns
    (`benchmark.alternate`); rows as `time_variant`'s plus the ratios to the first."""
    built = []
    for variant, overrides in settings:
        built.append(build_step(variant, overrides, length))
        timed(built[-1]["call"], 1)  # warm-up
        print(f"built {variant} {overrides}: compile {built[-1]['compile_s']:.1f} s", flush=True)
    per_round = alternate(
        {i: (lambda n, call=b["call"]: timed(call, n)) for i, b in enumerate(built)},
        rounds,
        steps,
    )
    rows = []
    for i, (variant, overrides) in enumerate(settings):
        times = [t for chunk in per_round[i] for t in chunk]
        r = row(variant, overrides, built[i], times)
        ratios = round_ratios(per_round[0], per_round[i])
        r.update(ratio_to_first=statistics.median(ratios), ratio_to_first_rounds=ratios)
        rows.append(r)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["cyclical", "savae_cyclical"],
        metavar="VARIANT[:FIELD=VALUE,…]",
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--length", type=int, default=23)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
    parser.add_argument(
        "--alternate", type=int, default=0, metavar="ROUNDS", help="Time in turns, R rounds."
    )
    parser.add_argument("--out", help="Also write the results as JSON here.")
    args = parser.parse_args(argv)
    host.tune_cpu_host()  # as in training: see vae_jax.run.host
    overrides = dict(kv.split("=", 1) for kv in args.set)
    overrides = {k: parse_value(v) for k, v in overrides.items()}
    settings = []
    for text in args.variants:
        variant, own = parse_setting(text)
        settings.append((variant, {**overrides, **own}))
    device = f"{jax.local_device_count()} x {jax.devices()[0].device_kind}"
    if args.alternate > 0:
        results = time_alternating(settings, args.alternate, args.steps, args.length)
    else:
        results = [time_variant(v, o, args.steps, args.length) for v, o in settings]
    for r in results:
        ratio = f", x{r['ratio_to_first']:.2f} the first" if "ratio_to_first" in r else ""
        print(
            f"{r['variant']:>16} {r['overrides']} (K={r['svi_steps']}): {r['median_ms']:.1f} "
            f"ms/step [{r['min_ms']:.1f}, {r['max_ms']:.1f}]{ratio}, compile "
            f"{r['compile_s']:.1f} s, temp {r['temp_mb']:.0f} MB, {device}",
            flush=True,
        )
    if args.out:
        command = ["python", "benchmarks/step_time.py", *(argv or sys.argv[1:])]
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(
                {"command": shlex.join(command), "device": device, "results": results}, f, indent=2
            )


if __name__ == "__main__":
    main()
