"""Fu et al. (2019) Table 1 layout from finished (or running) PTB workdirs.

    python experiments/ptb_table.py runs/ptb_cyclical runs/ptb_monotonic [--split test]
        [--select best|last] [--out table.json]

One row per workdir (model × β schedule, read from its ``config.json``), columns Rec, KL, −ELBO
and PPL of ``--split`` at the chosen epoch: ``best`` (default) is the epoch with the lowest
valid PPL bound, the one saved under ``workdir/best``; ``last`` the latest evaluated epoch.
PPL is the bound exp((ΣRec + ΣKL)/#predicted tokens) with one z sample, as in training logs.
"""

from __future__ import annotations

import argparse
import json
import os

from vae_jax import writers


def model_name(config: dict) -> str:
    return "SA-VAE" if config.get("model", {}).get("svi_steps", 0) > 0 else "VAE"


def schedule_name(config: dict) -> str:
    return config["beta_schedule"]["name"].replace("_", " ").capitalize()


def row(workdir: str, split: str, select: str) -> dict:
    """The figures of one workdir at the selected evaluation."""
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    records = writers.read_metrics(workdir)
    evals = {r["step"]: r for r in records if f"{split}_ppl_bound" in r}
    valid = {r["step"]: r for r in records if "valid_ppl_bound" in r}
    if not evals:
        raise ValueError(f"{workdir}: metrics.jsonl has no {split} evaluation yet.")
    if select == "best":
        if not valid:
            raise ValueError(f"{workdir}: no valid evaluation to select the best epoch by.")
        step = min((s for s in valid if s in evals), key=lambda s: valid[s]["valid_ppl_bound"])
    else:
        step = max(evals)
    r = evals[step]
    return {
        "workdir": workdir,
        "model": model_name(config),
        "schedule": schedule_name(config),
        "epoch": r.get("epoch"),
        "epochs_run": max(x.get("epoch", 0) for x in evals.values()),
        "rec": r[f"{split}_rec"],
        "kl": r[f"{split}_kl"],
        "neg_elbo": -r[f"{split}_elbo"],
        "ppl": r[f"{split}_ppl_bound"],
    }


def markdown(rows: list[dict], split: str) -> str:
    lines = [
        f"| Model | Schedule | Rec ↓ | KL | −ELBO ↓ | PPL ↓ | epoch ({split}) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["model"], r["schedule"])):
        epoch = f"{r['epoch']:.3g} of {r['epochs_run']:.3g}" if r["epoch"] is not None else "-"
        lines.append(
            f"| {r['model']} | {r['schedule']} | {r['rec']:.2f} | {r['kl']:.2f} | "
            f"{r['neg_elbo']:.2f} | {r['ppl']:.2f} | {epoch} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+")
    parser.add_argument("--split", default="test")
    parser.add_argument("--select", choices=("best", "last"), default="best")
    parser.add_argument("--out", help="Also write the rows as JSON here.")
    args = parser.parse_args()
    rows = [row(w, args.split, args.select) for w in args.workdirs]
    print(markdown(rows, args.split))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
