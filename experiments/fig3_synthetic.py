"""The synthetic 10-sequence experiment of Fu et al. (2019), Sec. 3, Figs. 3 and 4.

    python experiments/fig3_synthetic.py --out runs/synthetic [--steps 40000] [--seed 0]
        [--seeds N]

Trains the LSTM VAE of `configs/synthetic.py` with constant β = 1, monotonic and cyclical
schedules from the same seed, one workdir each under ``--out``, then writes (with
``meta.json``: steps, seed, window, backend):
- ``curves.png``: ELBO, Rec and KL against iteration for the three schedules (as Fig. 4);
- ``latents.png``: samples z ~ q(z|x_n) coloured by sequence n; rows are schedules, columns the
  iterations 1K, 10K, 11K, 20K, 31K, 40K (as Fig. 3; scaled when ``--steps`` is not 40K);
- ``summary.json``: per schedule, rec, kl and elbo averaged over the last 1,000 iterations and
  ``separation``, the fraction of posterior samples nearer to their own sequence's posterior
  mean than to any other sequence's, at the end of training.

``--seeds N`` trains each schedule's seeds ``seed … seed+N−1`` as one population
(`vae_jax.run.population`: one vmapped program, the same batches for every member) and reports the
mean and standard deviation over them (``<figure>_std``, and ``members``: each seed's figures);
the figures show the first seed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from absl import logging
from flax import jax_utils

from configs import synthetic
from vae_jax.core import models
from vae_jax.run import host, loop, population, writers

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vae_jax.run import build

SCHEDULES = ("constant", "monotonic", "cyclical")
SNAPSHOTS_AT_40K = (1_000, 10_000, 11_000, 20_000, 31_000, 40_000)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(variant: str):
    return synthetic.get_config(variant)


def posterior_samples(model, params, sequences, num_samples: int, seed: int):
    """z ~ q(z|x_n), (N, num_samples, latent), and the posterior means (N, latent)."""
    mu, logvar = model.apply({"params": params}, jnp.asarray(sequences), method=models.VAE.encode)
    eps = jax.random.normal(jax.random.PRNGKey(seed), (len(sequences), num_samples, mu.shape[1]))
    z = mu[:, None] + jnp.exp(0.5 * logvar)[:, None] * eps
    return np.asarray(z), np.asarray(mu)


def separation(z: np.ndarray, mu: np.ndarray) -> float:
    """Fraction of samples whose nearest posterior mean is their own sequence's."""
    dist = np.linalg.norm(z[:, :, None, :] - mu[None, None, :, :], axis=-1)  # (N, S, N)
    nearest = dist.argmin(-1)
    return float(np.mean(nearest == np.arange(len(mu))[:, None]))


def run_schedule(variant: str, args, snapshot_steps):
    config = load_config(variant)
    config.num_train_steps = args.steps
    config.seed = args.seed
    config.data.seed = args.seed
    seeds = getattr(args, "seeds", 1)  # remedies.py passes its own arguments
    config.population_size = seeds
    workdir = os.path.join(args.out, variant)
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, not a resumed one
    snapshots = {}

    def keep_params(step, state):
        if step in snapshot_steps:  # the first seed's
            params = jax.device_get(jax_utils.unreplicate(state.params))
            snapshots[step] = jax.tree.map(lambda x: x[0], params) if seeds > 1 else params

    start = time.time()
    state = loop.train_and_evaluate(config, workdir, callbacks=[keep_params])
    seconds = time.time() - start
    data = build.get_data(config)
    model = build.make_model(config, data.vocab_size)
    return config, model, state, snapshots, data.info["sequences"], seconds


def last_window_means(records, steps: int, window: int) -> dict[str, float]:
    """Means of the training records logged in the last ``window`` steps."""
    train_records = [r for r in records if "rec" in r and r["step"] > steps - window]
    return {k: float(np.mean([r[k] for r in train_records])) for k in ("rec", "kl", "elbo")}


def plot_curves(histories, path: str) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for variant, records in histories.items():
        recs = [r for r in records if "rec" in r]
        steps = [r["step"] for r in recs]
        for ax, key in zip(axes, ("elbo", "rec", "kl"), strict=True):
            ax.plot(steps, [r[key] for r in recs], label=variant, lw=1)
    for ax, title in zip(axes, ("ELBO", "Reconstruction (Rec)", "KL"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("iteration")
    axes[0].set_ylim(-6, 0)
    axes[0].axhline(-np.log(10), color="gray", ls=":", lw=1, label="−ln 10")
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_latents(latents, snapshot_steps, path: str) -> None:
    rows, cols = len(latents), len(snapshot_steps)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows), squeeze=False)
    colors = plt.get_cmap("tab10")(np.arange(10) % 10)
    for r, (variant, per_step) in enumerate(latents.items()):
        for c, step in enumerate(snapshot_steps):
            ax = axes[r, c]
            z = per_step[step]
            for n in range(z.shape[0]):
                ax.scatter(z[n, :, 0], z[n, :, 1], s=2, color=colors[n % 10], alpha=0.6)
            ax.set_xlim(-3.5, 3.5)
            ax.set_ylim(-3.5, 3.5)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"iter {step:,}", fontsize="small")
            if c == 0:
                ax.set_ylabel(variant)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="Directory for workdirs and results.")
    parser.add_argument("--steps", type=int, default=40_000, help="Iterations per schedule.")
    parser.add_argument(
        "--schedules",
        default=",".join(SCHEDULES),
        help="Comma-separated variants of configs/synthetic.py, e.g. the β × lr 2 × 2: "
        "monotonic,cyclical,monotonic_lr_restarts,cyclical_lr_restarts.",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=100, help="z samples per sequence.")
    parser.add_argument(
        "--seeds", type=int, default=1, help="Seeds per schedule, trained as one population."
    )
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds={args.seeds}: must be >= 1.")
    if args.steps < 40:
        parser.error(f"--steps={args.steps}: must be >= 40 (4 cycles of at least 10 steps).")
    schedules = [v for v in args.schedules.split(",") if v]
    for variant in schedules:  # every variant checked before the first run trains
        try:
            load_config(variant)
        except ValueError as e:
            parser.error(f"--schedules: {e}")
    host.tune_cpu_host()  # as `vae_jax.main` does: see vae_jax.run.host
    logging.set_verbosity(logging.INFO)  # the training loop's progress lines
    os.makedirs(args.out, exist_ok=True)

    snapshot_steps = sorted({max(1, round(s * args.steps / 40_000)) for s in SNAPSHOTS_AT_40K})
    window = max(1, round(1_000 * args.steps / 40_000))
    summary, histories, latents = {}, {}, {}
    for variant in schedules:
        config, model, state, snapshots, sequences, seconds = run_schedule(
            variant, args, set(snapshot_steps)
        )
        latents[variant] = {
            step: posterior_samples(model, params, sequences, args.samples, args.seed)[0]
            for step, params in snapshots.items()
        }
        workdir = os.path.join(args.out, variant)
        per_seed = []
        for k in range(args.seeds):
            params = state.params
            member_dir = workdir
            if args.seeds > 1:
                params = jax.tree.map(lambda x, k=k: x[k], state.params)
                member_dir = population.member_dir(workdir, k)
            z, mu = posterior_samples(model, params, sequences, args.samples, args.seed)
            records = writers.read_metrics(member_dir)
            if k == 0:
                histories[variant] = records
            per_seed.append(
                {**last_window_means(records, args.steps, window), "separation": separation(z, mu)}
            )
        summary[variant] = dict(per_seed[0])
        if args.seeds > 1:
            for key in per_seed[0]:
                values = [m[key] for m in per_seed]
                summary[variant].update(
                    {key: float(np.mean(values)), f"{key}_std": float(np.std(values))}
                )
            summary[variant]["members"] = per_seed
        summary[variant]["train_seconds"] = seconds
        shown = {k: v for k, v in summary[variant].items() if k != "members"}
        print(f"{variant:>9}: " + "  ".join(f"{k}={v:.3f}" for k, v in shown.items()))

    plot_curves(histories, os.path.join(args.out, "curves.png"))
    plot_latents(latents, snapshot_steps, os.path.join(args.out, "latents.png"))
    meta = {
        "steps": args.steps,
        "seed": args.seed,
        "seeds": args.seeds,
        "window": window,
        "ideal_neg_elbo": float(np.log(10)),
        "devices": jax.local_device_count(),
        "backend": jax.default_backend(),
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    print(f"wrote {args.out}/curves.png, latents.png, summary.json")


if __name__ == "__main__":
    main()
