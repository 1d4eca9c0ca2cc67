"""vae_jax's PTB validation figures after each early epoch against the official code's, per seed.

    python experiments/table1_fidelity.py \
        --ours monotonic=runs/fid/monotonic-pop3 --ours cyclical=runs/fid/cyclical-pop3 \
        --official 'monotonic=/tmp/official/monotonic.seed-*.log' \
        --official 'cyclical=/tmp/official/cyclical.seed-*.log' \
        --epochs 1 2 --out experiments/results/ptb/fidelity

``--ours SCHEDULE=DIR``: a vae_jax run, population or sweep directory (`table1_ptb.run_dirs`;
one run per seed). ``--official SCHEDULE=GLOB``: stdout logs of the official code
(`table1_official.py train`), one per seed; its evaluation lines ("VAE REC: …, VAE KL: …, VAE
PPL: …") after "Checking validation perf" of each epoch. For every schedule and epoch: each
seed's valid Rec, KL and PPL bound, their mean ± standard deviation (ddof 1) for both codes,
the ratio of the means (ours / official) and, where both sides have two seeds or more, the
difference of the means over its standard error (Welch's statistic: |·| ≲ 2 is what seeds
alone give). A figure's spread over seeds is the scale its differences must be read against.
Writes ``fidelity.json`` and ``fidelity.md`` under ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

import numpy as np
from table1_ptb import run_dirs  # experiments/table1_ptb.py

from vae_jax.run import writers  # noqa: E402

FIGURES = ("rec", "kl", "ppl")
EVAL_LINE = re.compile(r"VAE REC: ([-\d.]+), VAE KL: ([-\d.]+), VAE PPL: ([-\d.]+)")


def official_evals(path: str) -> dict[int, dict[str, float]]:
    """{epoch: valid {rec, kl, ppl}} from one official log."""
    evals, epoch, split = {}, None, None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if m := re.search(r"Starting epoch (\d+)", line):
                epoch, split = int(m[1]), None
            elif "Checking validation perf" in line:
                split = "valid"
            elif "Checking test perf" in line:
                split = "test"
            elif (m := EVAL_LINE.search(line)) and split == "valid" and epoch is not None:
                evals[epoch] = dict(zip(FIGURES, map(float, m.groups()), strict=True))
    return evals


def our_evals(workdir: str) -> dict[int, dict[str, float]]:
    """{epoch: valid {rec, kl, ppl}} from a vae_jax run's metrics, at whole epochs."""
    evals = {}
    for r in writers.read_metrics(workdir):
        epoch = r.get("epoch")
        if "valid_ppl_bound" in r and epoch is not None and abs(epoch - round(epoch)) < 1e-9:
            evals[round(epoch)] = {
                "rec": r["valid_rec"], "kl": r["valid_kl"], "ppl": r["valid_ppl_bound"]
            }  # fmt: skip
    return evals


def summary(runs: dict[str, dict[int, dict]], epoch: int) -> dict:
    """Per-run figures at ``epoch`` and their mean and std over the runs that reached it."""
    per_run = {name: evals[epoch] for name, evals in runs.items() if epoch in evals}
    out = {"runs": per_run, "n": len(per_run)}
    for key in FIGURES:
        values = [v[key] for v in per_run.values()]
        out[key] = float(np.mean(values)) if values else None
        out[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return out


def z_scores(ours: dict, official: dict) -> dict | None:
    """(mean ours − mean official) / √(s²_ours/n_ours + s²_official/n_official) per figure
    (Welch's statistic), or None unless both sides have a spread (two runs or more)."""
    if ours["n"] < 2 or official["n"] < 2:
        return None
    out = {}
    for key in FIGURES:
        se = ours[f"{key}_std"] ** 2 / ours["n"] + official[f"{key}_std"] ** 2 / official["n"]
        out[key] = (ours[key] - official[key]) / se**0.5 if se > 0 else float("nan")
    return out


def cell(s: dict, key: str) -> str:
    if s[key] is None:
        return "–"
    std = s[f"{key}_std"]
    return f"{s[key]:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def parse_pairs(pairs: list[str], flag: str) -> dict[str, str]:
    out = {}
    for pair in pairs:
        schedule, sep, value = pair.partition("=")
        if not sep or not value:
            raise SystemExit(f"{flag} {pair!r}: expected SCHEDULE=PATH")
        out[schedule] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ours", action="append", default=[], help="SCHEDULE=workdir")
    parser.add_argument("--official", action="append", default=[], help="SCHEDULE=log glob")
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    ours = parse_pairs(args.ours, "--ours")
    official = parse_pairs(args.official, "--official")
    table = {}
    lines = [
        "| schedule | epoch | code | seeds | Rec | KL | PPL bound |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for schedule in sorted(set(ours) | set(official)):
        runs = {"vae_jax": {}, "official": {}}
        if schedule in ours:
            for d in run_dirs(ours[schedule]):
                with open(os.path.join(d, "config.json"), encoding="utf-8") as f:
                    runs["vae_jax"][f"seed {json.load(f)['seed']}"] = our_evals(d)
        if schedule in official:
            paths = sorted(glob.glob(official[schedule]))
            if not paths:
                raise SystemExit(f"--official {schedule}={official[schedule]}: no such file")
            for p in paths:
                runs["official"][os.path.basename(p)] = official_evals(p)
        for epoch in args.epochs:
            row = {code: summary(r, epoch) for code, r in runs.items()}
            both = all(row[c]["n"] for c in row)
            row["ratio"] = (
                {k: row["vae_jax"][k] / row["official"][k] for k in FIGURES} if both else None
            )
            row["z"] = z_scores(row["vae_jax"], row["official"]) if both else None
            table.setdefault(schedule, {})[epoch] = row
            for code in ("vae_jax", "official"):
                s = row[code]
                lines.append(
                    f"| {schedule} | {epoch} | {code} | {s['n']} | "
                    + " | ".join(cell(s, k) for k in FIGURES) + " |"
                )  # fmt: skip
            if row["ratio"]:
                ratio = " | ".join(f"{row['ratio'][k]:.3f}" for k in FIGURES)
                lines.append(f"| {schedule} | {epoch} | ours / official (means) | | {ratio} |")
            if row["z"]:
                z = " | ".join(f"{row['z'][k]:+.2f}" for k in FIGURES)
                lines.append(f"| {schedule} | {epoch} | difference / its std. error | | {z} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "fidelity.json"), "w", encoding="utf-8") as f:
            json.dump({"command": " ".join(sys.argv), "table": table}, f, indent=1)
        with open(os.path.join(args.out, "fidelity.md"), "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
