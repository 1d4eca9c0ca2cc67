"""Time per training step of the PTB models: VAE and SA-VAE (Fu et al. 2019, Table 1).

    python experiments/step_time.py [--variants cyclical savae_cyclical] [--steps 10]
        [--length 23] [--set svi_remat=false] [--out step_time.json]

Builds each ``configs/ptb.py`` variant's model (embeddings 256, hidden 256, latent 32, vocab
10,002, batch 32) and runs the jitted, pmapped `train.train_step` on random sentences of
``--length`` tokens (<s> and </s> included; PTB averages 23) on the local devices. Reports the
compile time and the median wall time of ``--steps`` steps after it, waiting for each step's
result. ``--set field=value`` overrides a ``config.model`` field of every variant.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time

import jax
import numpy as np

from vae_jax import host, objectives, runs, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTB_VOCAB = 10_002  # 10,000 words, <unk> among them, and the specials of vae_jax.models


def ptb_config(variant: str):
    spec = importlib.util.spec_from_file_location("ptb_config", f"{REPO}/configs/ptb.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


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


def time_variant(variant: str, overrides: dict, steps: int, length: int) -> dict:
    config = ptb_config(variant)
    config.model.update(overrides)
    num_devices = jax.local_device_count()
    beta_fn, lr_fn = train.make_schedules(config, steps_per_epoch=1_000)
    model = runs.make_model(config, PTB_VOCAB)
    state = train.create_train_state(config, model, lr_fn, jax.random.PRNGKey(0), length)
    state = train.replicate(state)
    objective = objectives.make(config)
    p_step = train.make_p_train_step(model, beta_fn, lr_fn, objective)
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, PTB_VOCAB, size=(config.batch_size, length), dtype=np.int32)
    tokens[:, 0], tokens[:, -1] = 2, 3  # <s> … </s>
    batch = train.shard({"tokens": tokens}, num_devices)

    start = time.perf_counter()
    state, metrics = p_step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = p_step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return {
        "variant": variant,
        "svi_steps": int(config.model.svi_steps),
        "overrides": overrides,
        "compile_s": compile_s,
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "max_ms": 1e3 * max(times),
        "steps": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["cyclical", "savae_cyclical"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--length", type=int, default=23)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--out", help="Also write the results as JSON here.")
    args = parser.parse_args()
    host.tune_cpu_host()  # as in training: see vae_jax.host
    overrides = dict(kv.split("=", 1) for kv in args.set)
    overrides = {k: parse_value(v) for k, v in overrides.items()}
    device = f"{jax.local_device_count()} x {jax.devices()[0].device_kind}"
    results = []
    for variant in args.variants:
        r = time_variant(variant, overrides, args.steps, args.length)
        results.append(r)
        print(
            f"{variant:>16} (K={r['svi_steps']}): {r['median_ms']:.1f} ms/step "
            f"[{r['min_ms']:.1f}, {r['max_ms']:.1f}], compile {r['compile_s']:.1f} s, {device}",
            flush=True,
        )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"device": device, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
