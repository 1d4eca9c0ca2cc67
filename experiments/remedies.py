"""KL-vanishing remedies side by side: PTB figures of each, and their latent spaces.

    python experiments/remedies.py --workdir=runs/remedies [--num_epochs 1]
        [--num_steps N] [--num_importance_samples 50] [--rows cyclical,free_bits,...]
        [--out experiments/results/remedies]
    python experiments/remedies.py --synthetic --workdir=runs/remedies_synthetic
        [--steps 40000] [--out experiments/results/remedies]

PTB (``configs/ptb.py``, the paper's model and setup): every row trains for the same number of
epochs (``--num_epochs``) or steps (``--num_steps``: the schedules stay defined in epochs, so a
short run sees only their start), each in ``WORKDIR/<variant>`` (re-running the command resumes
what is unfinished), then is evaluated on the test split by `vae_jax.evaluate` at its best
checkpoint (an SA-VAE at its refined posterior): Rec, KL, −ELBO, PPL bound, IW-NLL (K from
``--num_importance_samples``), MI (both estimators), AU, KL(p ‖ q_agg) and CU@0.03. Writes
``OUT/ptb_<variant>.json`` per row and ``OUT/ptb_table.md``.

``--synthetic``: each remedy on the synthetic 10-sequence task (``configs/synthetic.py``, 2-D
latent space) for ``--steps`` iterations, its posterior samples plotted in the layout of
``experiments/fig3_synthetic.py``'s ``latents.png``: ``OUT/latents.png`` and
``OUT/synthetic.json``. DG-VAE's claim is that it closes the posterior holes the others leave.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import fig3_synthetic  # experiments/fig3_synthetic.py: the synthetic runs, the latent plot
import jax
import numpy as np
from absl import logging

from configs import ptb  # noqa: E402
from vae_jax import evaluate  # noqa: E402
from vae_jax.core import metrics, models  # noqa: E402
from vae_jax.run import build, host, loop, writers  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = {  # variant: row label
    "constant": "VAE, constant β = 1",
    "monotonic": "VAE, monotonic",
    "cyclical": "VAE, cyclical",
    "free_bits": "free bits + cyclical",
    "bn_vae": "BN-VAE + cyclical",
    "dg_vae": "DG-VAE + cyclical",
    "dg_vae_constant": "DG-VAE + constant",
    "savae_cyclical": "SA-VAE + cyclical",
}
SYNTHETIC_ROWS = ("constant", "cyclical", "free_bits", "bn_vae", "dg_vae", "dg_vae_constant")


def run_ptb_row(variant: str, args) -> dict:
    config = ptb.get_config(variant)
    if args.num_steps:
        config.num_epochs = -1
        config.num_train_steps = args.num_steps
        config.eval_every_epochs = -1
        config.eval_every_steps = args.num_steps
    else:
        config.num_epochs = args.num_epochs
    workdir = os.path.join(args.workdir, variant)
    loop.train_and_evaluate(config, workdir)
    config, data, model, params, info = build.load_run(workdir, "auto")
    out = os.path.join(args.out, f"ptb_{variant}.json")
    key = (info["checkpoint"], info.get("step"), args.num_importance_samples)
    if os.path.exists(out):
        with open(out, encoding="utf-8") as f:
            done = json.load(f)
        if tuple(done.get("evaluated_at", ())) == key:
            return done  # this row's evaluation is already there
    results = evaluate.evaluate_split(
        model,
        params,
        data.eval_splits["test"],
        elbo_key=build.eval_key(config),
        key=jax.random.PRNGKey(0),
        num_importance_samples=args.num_importance_samples,
        num_prior_samples=16_384,
    )
    steps = [r["step"] for r in writers.read_metrics(workdir) if "rec" in r]
    results = {
        "variant": variant,
        "row": ROWS[variant],
        "evaluated_at": list(key),
        "train_steps": max(steps) if steps else 0,
        "steps_per_epoch": data.steps_per_epoch,
        "split": "test",
        **results,
    }
    with open(out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    return results


def ptb_table(rows: list[dict]) -> str:
    head = (
        "| remedy | Rec | KL | −ELBO | PPL bound | IW-NLL | MI (batch) | MI (split) | AU | "
        "KL(p ‖ q_agg) | CU@0.03 |"
    )
    lines = [head, "|---|" + "---:|" * 10]
    for r in rows:
        lines.append(
            f"| {r['row']} | {r['rec']:.2f} | {r['kl']:.2f} | {r['neg_elbo']:.2f} | "
            f"{r['ppl_bound']:.1f} | {r['iw_nll']:.2f} | {r['mi_batch']:.2f} | {r['mi']:.2f} | "
            f"{r['au']} | {r['kl_prior_agg']:.2f} | {r['cu@0.03']} |"
        )
    return "\n".join(lines)


def run_synthetic(args, rows: list[str]) -> None:
    snapshot_steps = tuple(
        int(round(s * args.steps / 40_000)) for s in fig3_synthetic.SNAPSHOTS_AT_40K
    )
    latents, summary = {}, {}
    for variant in rows:
        run_args = argparse.Namespace(steps=args.steps, seed=0, out=args.workdir)
        config, model, state, snapshots, sequences, seconds = fig3_synthetic.run_schedule(
            variant, run_args, snapshot_steps
        )
        latents[variant] = {}
        for step, params in snapshots.items():
            z, _ = fig3_synthetic.posterior_samples(model, params, sequences, 100, seed=step)
            latents[variant][step] = z
        z, mu = fig3_synthetic.posterior_samples(model, state.params, sequences, 100, seed=0)
        flat_mu, flat_logvar = (
            np.asarray(x)
            for x in model.apply(
                {"params": jax.device_get(state.params)}, sequences, method=models.VAE.encode
            )
        )
        holes = metrics.hole_metrics(flat_mu, flat_logvar, jax.random.PRNGKey(0), 16_384)
        records = writers.read_metrics(os.path.join(args.workdir, variant))
        summary[variant] = {
            **fig3_synthetic.last_window_means(records, args.steps, min(1_000, args.steps)),
            "separation": fig3_synthetic.separation(z, mu),
            "kl_prior_agg": holes["kl_prior_agg"],
            "cu@0.03": holes["cu@0.03"],
            "train_seconds": seconds,
            "steps": args.steps,
        }
        print(variant, json.dumps(summary[variant]), flush=True)
    fig3_synthetic.plot_latents(latents, snapshot_steps, os.path.join(args.out, "latents.png"))
    with open(os.path.join(args.out, "synthetic.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {args.out}/latents.png, synthetic.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="Runs go to WORKDIR/<variant>.")
    parser.add_argument("--out", default=os.path.join(REPO, "experiments/results/remedies"))
    parser.add_argument("--num_epochs", type=int, default=1)
    parser.add_argument("--num_steps", type=int, default=0, help="Instead of --num_epochs.")
    parser.add_argument("--num_importance_samples", type=int, default=50)
    parser.add_argument("--rows", default="", help="Comma-separated variants (default: all).")
    parser.add_argument("--synthetic", action="store_true", help="The latent-space study.")
    parser.add_argument("--steps", type=int, default=40_000, help="Synthetic iterations.")
    args = parser.parse_args()
    known = SYNTHETIC_ROWS if args.synthetic else tuple(ROWS)
    rows = [r for r in args.rows.split(",") if r] or list(known)
    unknown = sorted(set(rows) - set(known))
    if unknown:
        parser.error(f"--rows: unknown {unknown}; known {list(known)}")
    if args.num_epochs < 1 or args.num_steps < 0 or args.num_importance_samples < 1:
        parser.error("--num_epochs and --num_importance_samples must be >= 1, --num_steps >= 0")
    if args.synthetic and args.steps < 40:
        parser.error(f"--steps={args.steps}: must be >= 40 (4 cycles of at least 10 steps).")
    host.tune_cpu_host()
    logging.set_verbosity(logging.INFO)
    os.makedirs(args.out, exist_ok=True)
    if args.synthetic:
        run_synthetic(args, rows)
        return
    if len(rows) == 1:
        results = [run_ptb_row(rows[0], args)]
    else:  # each row in a process of its own: one long process compiling every row's step
        # for every length bucket ran out of LLVM code mappings here (vm.max_map_count).
        for variant in rows:
            command = [sys.executable, os.path.abspath(__file__), f"--rows={variant}"]
            command += [f"--workdir={args.workdir}", f"--out={args.out}"]
            command += [f"--num_epochs={args.num_epochs}", f"--num_steps={args.num_steps}"]
            command += [f"--num_importance_samples={args.num_importance_samples}"]
            subprocess.run(command, check=True)
        results = []
        for variant in rows:
            with open(os.path.join(args.out, f"ptb_{variant}.json"), encoding="utf-8") as f:
                results.append(json.load(f))
    length = f"{args.num_steps} steps" if args.num_steps else f"{args.num_epochs} epoch(s)"
    table = ptb_table(results)
    note = (
        f"PTB test split, each row trained for {length} "
        f"({results[0]['steps_per_epoch']} steps per epoch), evaluated at its best checkpoint; "
        f"IW-NLL with K = {args.num_importance_samples}; per sentence, in nats.\n\n"
    )
    with open(os.path.join(args.out, "ptb_table.md"), "w", encoding="utf-8") as f:
        f.write(note + table + "\n")
    print(note + table)


if __name__ == "__main__":
    main()
