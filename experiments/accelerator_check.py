"""One check of vae_jax on an accelerator (GPU/TPU), in under 10 minutes, into one JSON.

    python experiments/accelerator_check.py --out experiments/results/benchmark/accel.json \
        [--budget_s 540] [--steps 50]

Measures, with `experiments/benchmark.py`'s timing (rounds, each against the matmul peak next
to it): the train step at the PTB size (256/256/32, batch 32, length 23) for both layer
implementations (``model.kernels`` cpu and plain) in float32 and bfloat16; populations of 1 and
8 members (vmapped); IW-NLL throughput (K = 500); the SA-VAE step (K = 10 SVI steps) as a
multiple of the VAE step of the same size, timed in turns in this process
(`experiments/step_time.py`'s alternation; exact reverse-over-reverse with and without remat,
and the finite-difference backward pass). Then it projects a 40-epoch PTB VAE run (54,360
steps at the fastest float32 step, plus evaluation) and runs it when it fits in what is
left of ``--budget_s`` and the PTB files are found (``$VAE_JAX_DATA_DIR/ptb``), writing its
final valid figures. Installs nothing and reads nothing from the network; CI does not run it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402  (experiments/benchmark.py)
import step_time  # noqa: E402  (experiments/step_time.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ("ptb_23", "ptb_23_plain", "ptb_23_bf16", "ptb_23_plain_bf16", "ptb_23_pop1", "ptb_23_pop8")
PTB_STEPS = 40 * 1_359  # 40 epochs of 1,359 batches
EVAL_SECONDS_GUESS = 2.0  # per epoch's valid + test evaluation, before it is measured
# `configs/ptb.py` variants and config.model overrides; the VAE first, as the ratios' base.
SAVAE_SETTINGS = (
    ("cyclical", {}),
    ("savae_cyclical", {}),
    ("savae_cyclical", {"svi_remat": False}),
    ("savae_cyclical", {"svi_hvp": "finite_difference"}),
)


def ptb_run(seconds_left: float, ms_per_step: float) -> dict:
    """A 40-epoch `configs/ptb.py:cyclical` run if it fits in ``seconds_left``."""
    projected = PTB_STEPS * ms_per_step / 1e3 + 40 * EVAL_SECONDS_GUESS
    result = {"projected_s": projected, "seconds_left": seconds_left}
    data_dir = os.environ.get("VAE_JAX_DATA_DIR", "")
    if not os.path.exists(os.path.join(data_dir, "ptb", "ptb.train.txt")):
        return {**result, "ran": False, "why": f"no PTB under $VAE_JAX_DATA_DIR={data_dir!r}"}
    if projected > seconds_left:
        return {**result, "ran": False, "why": "projected time exceeds the budget left"}
    import importlib.util

    from vae_jax import train, writers

    spec = importlib.util.spec_from_file_location("ptb", os.path.join(REPO, "configs", "ptb.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("cyclical")
    workdir = tempfile.mkdtemp(prefix="accel_ptb_")
    start = time.time()
    train.train_and_evaluate(config, workdir)
    records = [r for r in writers.read_metrics(workdir) if "valid_ppl_bound" in r]
    best = min(records, key=lambda r: r["valid_ppl_bound"])
    keys = ("epoch", "valid_rec", "valid_kl", "valid_ppl_bound", "test_ppl_bound")
    return {
        **result,
        "ran": True,
        "wall_s": time.time() - start,
        "best": {k: best[k] for k in keys},
        "last": {k: records[-1][k] for k in keys},
    }


def savae_ratios(settings, rounds: int, steps: int = 5) -> list[dict]:
    """`step_time.time_alternating`'s rows for ``settings`` at length 23, the first the base."""
    rows = step_time.time_alternating(list(settings), rounds, steps, 23)
    for r in rows[1:]:
        print(f"{r['variant']} {r['overrides']}: x{r['ratio_to_first']:.2f} the first", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=50, help="Timed steps per row.")
    parser.add_argument("--budget_s", type=float, default=540.0)
    parser.add_argument(
        "--savae_rounds", type=int, default=3, help="Rounds of SA-VAE/VAE turns (0: skip)."
    )
    args = parser.parse_args()
    start = time.time()
    result = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "peak_gflops": benchmark.matmul_peak(),
        "rows": [],
    }
    for name in ROWS:
        row = benchmark.bench_train_step(name, args.steps, warmup=10)
        result["rows"].append(row)
        print(f"{name:<20} {row['ms_median']:8.2f} ms/step", flush=True)
    iw = benchmark.bench_iwnll(repeats=3)
    result["rows"].append(iw)
    print(f"iwnll_k500: {iw['sentences_per_s']:.1f} sentences/s", flush=True)
    if args.savae_rounds > 0:
        result["savae_step"] = savae_ratios(SAVAE_SETTINGS, args.savae_rounds)
    float32 = [r["ms_median"] for r in result["rows"] if r["name"] in ("ptb_23", "ptb_23_plain")]
    result["ptb_40_epochs"] = ptb_run(args.budget_s - (time.time() - start), min(float32))
    result["wall_s"] = time.time() - start
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result["ptb_40_epochs"]), f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
