"""One check of vae_jax on an accelerator (GPU/TPU) within one 10-minute call, into one JSON.

    python benchmarks/accelerator_check.py --out benchmarks/results/accel.json \
        [--quick] [--budget_s 420] [--steps 50]

Measures, with `benchmarks/benchmark.py`'s timing (rounds, each against the matmul peak next
to it): the train step at the PTB size (256/256/32, batch 32, length 23) for both layer
implementations (``model.kernels`` cpu and plain) in float32 and bfloat16; populations of 1 and
8 members (vmapped); IW-NLL throughput (K = 500); the SA-VAE step (K = 10 SVI steps) as a
multiple of the VAE step of the same size, timed in turns in this process
(`benchmarks/step_time.py`'s alternation). Everything runs under ``--matmul_precision``
(default ``highest``, the paper configs' ``config.matmul_precision``).

Then it projects a 40-epoch `configs/ptb.py:cyclical` run and runs it when the projection fits
in what is left of ``--budget_s`` and the PTB files are found (``$VAE_JAX_DATA_DIR/ptb``). The
projection counts the steps at the bucket-weighted padded length of PTB's batches (from the
data: 26.6 tokens, not 23), one compilation per length bucket (train and eval) at the measured
compile time, each epoch's valid and test evaluation, and every checkpoint save at the measured
time of one. A run that reaches the deadline anyway stops there and reports how far it got.

Budget: ``--budget_s`` counts from the start of this process (imports and JAX's start-up
included) and no row starts without the time its estimate needs: the default 420 s leaves
3 minutes of a 10-minute call for the machine's start and the transfers; ``--quick`` (budget
240 s, fewer rows and steps, no SA-VAE turns) fits in 5 minutes. Each row is written to
``--out`` as it finishes (the file is whole after every row), so a killed call keeps what it
measured. ``--size tiny`` shrinks every model (for the CPU test). Installs nothing and reads
nothing from the network; CI does not run it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

START = time.time()  # the budget counts from here, imports included

import benchmark  # noqa: E402  (benchmarks/benchmark.py)
import jax  # noqa: E402
import numpy as np  # noqa: E402
import step_time  # noqa: E402  (benchmarks/step_time.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import ptb  # noqa: E402
from vae_jax.run import build, files, steps  # noqa: E402

ROWS = ("ptb_23", "ptb_23_plain", "ptb_23_bf16", "ptb_23_plain_bf16", "ptb_23_pop1", "ptb_23_pop8")
QUICK_ROWS = ("ptb_23", "ptb_23_plain", "ptb_23_plain_bf16")
PTB_EPOCHS = 40
PTB_STEPS_PER_EPOCH = 1_359  # batches of up to 32 same-length sentences
PTB_MEAN_LENGTH = 26.6  # padded tokens per batch, bucket-weighted; from the data where found
PTB_EVAL_SENTENCES = 3_370 + 3_761  # valid + test
TIMED_LENGTH = 23  # the rows' batch length
RESERVE_S = 20.0  # kept free at the end: writing the JSON, exiting
# `configs/ptb.py` variants and config.model overrides; the VAE first, as the ratios' base.
SAVAE_SETTINGS = (
    ("cyclical", {}),
    ("savae_cyclical", {}),
    ("savae_cyclical", {"svi_remat": False}),
    ("savae_cyclical", {"svi_hvp": "finite_difference"}),
)
# --size tiny: (emb, hidden, latent, vocab, batch, length) for every row, and the PTB run's
# model and batch.
TINY = (8, 16, 4, 50, 8, TIMED_LENGTH)


def elapsed() -> float:
    return time.time() - START


def write(path: str, result: dict) -> None:
    """The whole result so far, atomically: a killed process leaves the last complete one."""
    result["wall_s"] = elapsed()
    files.write_atomic(path, json.dumps(result, indent=2))


def ptb_config(size: str):
    config = ptb.get_config("cyclical")
    if size == "tiny":
        emb, hidden, latent, _, batch, _ = TINY
        config.model.update(enc_emb_dim=emb, enc_hidden_dim=hidden, dec_emb_dim=emb)
        config.model.update(dec_hidden_dim=hidden, latent_dim=latent)
        config.update(num_epochs=1, batch_size=batch, eval_batch_size=batch)
        config.beta_schedule.update(total_steps=4, num_cycles=4)
        config.lr_schedule.update(total_steps=4, num_cycles=4)
    return config


def ptb_plan(config) -> dict:
    """Steps per epoch, the bucket-weighted mean padded length of the training batches and the
    distinct lengths (train and eval) from the PTB data; constants where it is absent."""

    data = build.get_data(config)
    batcher = data.info["batcher"]
    lengths = [batcher.bucket(len(batcher.rows[b[0]])) for b in batcher.plan(0)]
    eval_lengths = {b["tokens"].shape[1] for s in data.eval_splits.values() for b in s}
    return {
        "steps_per_epoch": len(lengths),
        "mean_length": float(np.mean(lengths)),
        "train_buckets": len(set(lengths)),
        "eval_buckets": len(eval_lengths),
        "eval_batches": sum(len(s) for s in data.eval_splits.values()),
        "from_data": True,
    }


def checkpoint_save_s(size: str) -> float:
    """Seconds of one blocking orbax save of the PTB-size train state."""
    from vae_jax.run import checkpoints

    config = ptb_config(size)
    model = build.make_model(config, TINY[3] if size == "tiny" else 10_002)
    lr_fn = steps.make_schedules(config, 100)[1]
    state = steps.create_train_state(config, model, lr_fn, jax.random.PRNGKey(0), 8)
    state = jax.device_get(state)
    with tempfile.TemporaryDirectory(prefix="accel_ckpt_") as directory:
        saver = checkpoints.Checkpointer(directory, keep=2, keep_period=0)
        start = time.time()
        saver.save(1, state, {"step": 1})
        saver.wait()
        seconds = time.time() - start
        saver.close()
    return seconds


def project_ptb(
    ms_per_step: float, compile_s: float, save_s: float, plan: dict, epochs: int
) -> dict:
    """Seconds of an ``epochs``-epoch PTB run: steps at the mean padded length (step time taken as
    linear in length from the length-23 rows), compilations, evaluations, checkpoint saves."""
    steps = epochs * plan["steps_per_epoch"]
    ms = ms_per_step * plan["mean_length"] / TIMED_LENGTH
    # An eval batch is a forward pass: about a third of a train step at the same length.
    eval_s = epochs * plan["eval_batches"] * ms / 3 / 1e3
    # Checkpoints at every epoch end and every 1,000 steps (config.checkpoint_every_steps).
    saves = epochs + steps // 1_000
    # Forward-only eval programs compile in about half a train step's time.
    compiles = plan["train_buckets"] * compile_s + plan["eval_buckets"] * compile_s / 2
    parts = {
        "train_s": steps * ms / 1e3,
        "eval_s": eval_s,
        "compile_s": compiles,
        "checkpoint_s": saves * save_s,
    }
    return {
        "epochs": epochs,
        "steps": steps,
        "ms_per_step_at_mean_length": ms,
        "checkpoint_saves": saves,
        **parts,
        "projected_s": sum(parts.values()),
    }


class _Deadline(Exception):
    """The PTB run reached the budget's end."""


def ptb_run(config, deadline: float) -> dict:
    """Trains ``config`` in a fresh workdir until done or ``deadline`` (time.time())."""
    from vae_jax.run import loop, writers

    workdir = tempfile.mkdtemp(prefix="accel_ptb_")
    start = time.time()
    reached = {"step": 0}

    def stop_at_deadline(step: int, state) -> None:
        reached["step"] = step
        if time.time() > deadline:
            raise _Deadline

    try:
        loop.train_and_evaluate(config, workdir, callbacks=[stop_at_deadline])
        finished = True
    except _Deadline:
        finished = False
    # Each split's figures are a record of their own: merged by step.
    by_step: dict[int, dict] = {}
    for r in writers.read_metrics(workdir):
        if "valid_ppl_bound" in r or "test_ppl_bound" in r:
            by_step.setdefault(r["step"], {}).update(r)
    records = [r for _, r in sorted(by_step.items()) if "valid_ppl_bound" in r]
    keys = ("epoch", "valid_rec", "valid_kl", "valid_ppl_bound", "test_ppl_bound")
    out = {"ran": True, "finished": finished, "steps": reached["step"]}
    out["wall_s"] = time.time() - start
    if records:
        best = min(records, key=lambda r: r["valid_ppl_bound"])
        out["best"] = {k: best.get(k) for k in keys}
        out["last"] = {k: records[-1].get(k) for k in keys}
    return out


def ptb_decision(args, result: dict, seconds_left: float) -> dict:
    """The projection of the PTB run from the measured rows, and the run if it fits."""
    float32 = [
        r for r in result["rows"] if r["name"] in ("ptb_23", "ptb_23_plain") and "ms_median" in r
    ]
    if not float32:
        return {"ran": False, "why": "no float32 train-step row was measured"}
    fastest = min(float32, key=lambda r: r["ms_median"])
    config = ptb_config(args.size)
    config.model.kernels = "cpu" if fastest["name"] == "ptb_23" else "plain"
    config.matmul_precision = args.matmul_precision
    data_dir = os.environ.get("VAE_JAX_DATA_DIR", "")
    have_data = os.path.exists(os.path.join(data_dir, "ptb", "ptb.train.txt"))
    plan_start = time.time()
    if have_data:
        plan = ptb_plan(config)
    else:
        plan = {"steps_per_epoch": PTB_STEPS_PER_EPOCH, "mean_length": PTB_MEAN_LENGTH,
                "train_buckets": 11, "eval_buckets": 11,
                "eval_batches": -(-PTB_EVAL_SENTENCES // 32), "from_data": False}  # fmt: skip
    save_s = checkpoint_save_s(args.size)
    out = {
        "kernels": config.model.kernels,
        "plan": plan,
        "checkpoint_save_s": save_s,
        **project_ptb(fastest["ms_median"], fastest["compile_s"], save_s, plan, config.num_epochs),
    }
    seconds_left -= time.time() - plan_start
    out["seconds_left"] = seconds_left
    if not have_data:
        return {**out, "ran": False, "why": f"no PTB under $VAE_JAX_DATA_DIR={data_dir!r}"}
    if out["projected_s"] > seconds_left:
        return {**out, "ran": False, "why": "projected time exceeds the budget left"}
    return {**out, **ptb_run(config, time.time() + seconds_left)}


def row_estimate_s(name: str, steps: int, result: dict) -> float:
    """A row's expected seconds from the rows before it (compile + warm-up + steps + peaks)."""
    done = [r for r in result["rows"] if "compile_s" in r and "ms_median" in r]
    if not done:
        return 30.0
    compile_s = max(r["compile_s"] for r in done)
    ms = max(r["ms_median"] for r in done) * (8 if name.endswith("pop8") else 1)
    return compile_s + (steps + 10) * ms / 1e3 + 5.0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="At most 5 minutes.")
    parser.add_argument("--steps", type=int, default=None, help="Timed steps per row.")
    parser.add_argument("--budget_s", type=float, default=None)
    parser.add_argument(
        "--savae_rounds", type=int, default=None, help="Rounds of SA-VAE/VAE turns (0: skip)."
    )
    parser.add_argument("--iwnll_samples", type=int, default=500)
    parser.add_argument("--size", choices=("ptb", "tiny"), default="ptb")
    parser.add_argument("--matmul_precision", default="highest")
    args = parser.parse_args(argv)
    quick = args.quick
    args.steps = args.steps or (20 if quick else 50)
    args.budget_s = args.budget_s or (240.0 if quick else 420.0)
    args.savae_rounds = args.savae_rounds if args.savae_rounds is not None else (0 if quick else 3)
    if args.size == "tiny":  # every row's sizes (module globals benchmark's rows read)
        benchmark.CONFIGS["ptb_23"] = TINY
    deadline = START + args.budget_s - RESERVE_S
    result = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "matmul_precision": args.matmul_precision,
        "size": args.size,
        "quick": quick,
        "budget_s": args.budget_s,
        "startup_s": elapsed(),
        "rows": [],
    }
    with jax.default_matmul_precision(args.matmul_precision):
        result["peak_gflops"] = benchmark.matmul_peak(n=256 if args.size == "tiny" else 2048)
        write(args.out, result)
        for name in QUICK_ROWS if quick else ROWS:
            need = row_estimate_s(name, args.steps, result)
            if time.time() + need > deadline:
                result["rows"].append({"name": name, "skipped": f"needs ~{need:.0f} s"})
                write(args.out, result)
                continue
            row = benchmark.bench_train_step(name, args.steps, warmup=3 if quick else 10)
            result["rows"].append(row)
            write(args.out, result)
            print(f"{name:<20} {row['ms_median']:8.2f} ms/step  compile {row['compile_s']:.1f} s",
                  flush=True)  # fmt: skip
        if not quick and time.time() + 60 < deadline:
            iw = benchmark.bench_iwnll(repeats=3, num_samples=args.iwnll_samples)
            result["rows"].append(iw)
            write(args.out, result)
            print(f"iwnll_k{args.iwnll_samples}: {iw['sentences_per_s']:.1f} sentences/s")
        if args.savae_rounds > 0 and args.size == "ptb" and time.time() + 120 < deadline:
            rows = step_time.time_alternating(list(SAVAE_SETTINGS), args.savae_rounds, 5, 23)
            result["savae_step"] = rows
            write(args.out, result)
        result["ptb_40_epochs"] = ptb_decision(args, result, deadline - time.time())
    write(args.out, result)
    print(json.dumps(result["ptb_40_epochs"]), f"\nwrote {args.out}", flush=True)
    return result


if __name__ == "__main__":
    main()
