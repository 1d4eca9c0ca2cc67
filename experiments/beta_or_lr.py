"""β cycles or learning-rate restarts? The 2 × 2 of issue 43, read from finished runs.

    python experiments/beta_or_lr.py runs/ablation experiments/results/ptb/runs \
        --out experiments/results/beta_or_lr
    python experiments/beta_or_lr.py --synthetic runs/synth_2x2/summary.json \
        --out experiments/results/beta_or_lr

The official PTB code pairs a cyclical β with a cosine learning rate restarted every cycle and a
monotonic β with a constant one (`configs/ptb.py`), so Table 1 compares both at once. Here each
run is put in its cell, β (monotonic or cyclical) × learning rate (constant or restarted), from
its ``config.json`` (PTB workdirs, sweeps or archives, as `table1_ptb.py` reads them: the test
split at the best valid epoch, IW-NLL, MI and AU where `vae_jax.evaluate` scored it) or from the
synthetic experiment's ``summary.json`` (`fig3_synthetic.py --seeds N --schedules
monotonic,cyclical,monotonic_lr_restarts,cyclical_lr_restarts`; the last 1,000 iterations).

Each cell is a mean ± standard deviation over its seeds; each contrast a difference of two cells'
means with Welch's t = Δ / √(s₁²/n₁ + s₂²/n₂), its Welch–Satterthwaite degrees of freedom and
two-sided p. The question: how much of the official pairing's difference (cyclical & restarts −
monotonic & constant) remains with the learning rate held constant (``remains`` = (cyclical &
constant − monotonic & constant) / (cyclical & restarts − monotonic & constant)), and what
restarts alone do to a monotonic β. Writes ``<kind>_2x2.json`` and ``<kind>_2x2.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
import table1_ptb  # experiments/table1_ptb.py: the runs and their Table 1 figures

BETAS, LRS = ("monotonic", "cyclical"), ("constant", "restarts")
# (name, (β, lr) minus (β, lr)): what each contrast isolates.
CONTRASTS = (
    ("official pairing", ("cyclical", "restarts"), ("monotonic", "constant")),
    ("β at a constant lr", ("cyclical", "constant"), ("monotonic", "constant")),
    ("β at a restarted lr", ("cyclical", "restarts"), ("monotonic", "restarts")),
    ("restarts at a monotonic β", ("monotonic", "restarts"), ("monotonic", "constant")),
    ("restarts at a cyclical β", ("cyclical", "restarts"), ("cyclical", "constant")),
)
PTB_FIGURES = ("rec", "kl", "neg_elbo", "ppl", "iw_nll", "mi", "au")
SYNTHETIC_FIGURES = ("rec", "kl", "neg_elbo", "separation")
LATENT_USE = ("kl", "mi", "au", "separation")  # the figures `remains` is given for


def ptb_cell(config: dict) -> tuple[str, str]:
    """(β, lr) of a PTB run's config: the β schedule's name, and "restarts" for the cosine
    learning rate restarted each cycle, "constant" for a constant one."""
    beta = config["beta_schedule"]["name"]
    lr = config.get("lr_schedule", {}).get("name")
    if beta not in BETAS or lr not in ("constant", "cyclical_cosine_lr"):
        raise ValueError(f"β {beta!r} with lr {lr!r}: not a cell of the 2 × 2")
    return beta, "restarts" if lr == "cyclical_cosine_lr" else "constant"


def ptb_runs(paths: list[str], split: str = "test") -> dict[tuple[str, str], list[dict]]:
    """Each PTB VAE run under ``paths`` (at its best valid epoch) in its cell; SA-VAE runs and
    schedules outside the 2 × 2 are left out."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for path in paths:
        for workdir in table1_ptb.run_dirs(path):
            with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
                config = json.load(f)
            if table1_ptb.model_name(config) != "VAE":
                continue
            try:
                cell = ptb_cell(config)
            except ValueError:
                continue
            cells.setdefault(cell, []).append(table1_ptb.row(workdir, split, "best"))
    return cells


def synthetic_runs(path: str) -> dict[tuple[str, str], list[dict]]:
    """The seeds of each variant of a `fig3_synthetic.py` summary in its cell: ``<β>`` keeps a
    constant learning rate there, ``<β>_lr_restarts`` restarts it each cycle."""
    with open(path, encoding="utf-8") as f:
        summary = json.load(f)
    cells = {}
    for variant, result in summary.items():
        beta, _, rest = variant.partition("_")
        if beta not in BETAS or rest not in ("", "lr_restarts"):
            continue
        members = result.get("members") or [result]
        cells[(beta, "restarts" if rest else "constant")] = [
            {**m, "neg_elbo": -m["elbo"]} for m in members
        ]
    return cells


def welch(a: list[float], b: list[float]) -> dict:
    """Mean of ``a`` − mean of ``b``, Welch's t, its degrees of freedom and two-sided p (None
    where a side has fewer than two values or no spread)."""
    diff = float(np.mean(a) - np.mean(b))
    out = {"diff": diff, "t": None, "df": None, "p": None}
    if len(a) < 2 or len(b) < 2:
        return out
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    if va + vb == 0:
        return out
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    out.update(t=float(t), df=float(df), p=two_sided_p(t, df))
    return out


def two_sided_p(t: float, df: float) -> float:
    """P(|T| ≥ |t|) for Student's t with ``df`` degrees of freedom: I_{df/(df+t²)}(df/2, 1/2)."""
    from jax.scipy.special import betainc

    return float(betainc(df / 2.0, 0.5, df / (df + t * t)))


def analyse(cells: dict[tuple[str, str], list[dict]], figures: tuple[str, ...]) -> dict:
    """The cells' mean ± std per figure and the `CONTRASTS` with Welch's t, for the figures
    every run has; ``remains`` where both the constant-lr β contrast and the official one
    exist."""
    runs = [r for rs in cells.values() for r in rs]
    figures = tuple(f for f in figures if runs and all(f in r for r in runs))
    out = {"figures": list(figures), "cells": {}, "contrasts": {}}
    for (beta, lr), rs in sorted(cells.items()):
        cell = {"beta": beta, "lr": lr, "n": len(rs)}
        for f in figures:
            values = [r[f] for r in rs]
            cell[f] = float(np.mean(values))
            cell[f"{f}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
        out["cells"][f"{beta}/{lr}"] = cell
    for name, x, y in CONTRASTS:
        if x in cells and y in cells:
            out["contrasts"][name] = {
                f: welch([r[f] for r in cells[x]], [r[f] for r in cells[y]]) for f in figures
            }
    official = out["contrasts"].get("official pairing")
    kept = out["contrasts"].get("β at a constant lr")
    if official and kept:
        out["remains"] = {
            f: kept[f]["diff"] / official[f]["diff"] if official[f]["diff"] else None
            for f in figures
            if f in LATENT_USE
        }
    return out


def _cell(c: dict, f: str) -> str:
    std = c.get(f"{f}_std")
    return f"{c[f]:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def _contrast(w: dict) -> str:
    if w["t"] is None:
        return f"{w['diff']:+.2f}"
    return f"{w['diff']:+.2f} (t = {w['t']:.1f}, p = {w['p']:.3f})"


def markdown(result: dict, caption: str) -> str:
    figures = result["figures"]
    lines = [caption, "", "| β | lr | runs | " + " | ".join(figures) + " |"]
    lines.append("|---|---|---:|" + "---:|" * len(figures))
    for c in result["cells"].values():
        cells = " | ".join(_cell(c, f) for f in figures)
        lines.append(f"| {c['beta']} | {c['lr']} | {c['n']} | {cells} |")
    if result["contrasts"]:
        lines += ["", "| contrast | " + " | ".join(figures) + " |"]
        lines.append("|---|" + "---:|" * len(figures))
        for name, ws in result["contrasts"].items():
            lines.append(f"| {name} | " + " | ".join(_contrast(ws[f]) for f in figures) + " |")
    if "remains" in result:
        kept = ", ".join(
            f"{f} {v:.0%}" if v is not None else f"{f} –" for f, v in result["remains"].items()
        )
        lines += ["", f"Of the official pairing's difference, with the lr held constant: {kept}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", help="PTB workdirs, sweeps or archives.")
    parser.add_argument("--synthetic", help="A fig3_synthetic.py summary.json instead.")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if bool(args.paths) == bool(args.synthetic):
        parser.error("give PTB run paths or --synthetic SUMMARY, one of the two")
    if args.synthetic:
        kind, cells = "synthetic", synthetic_runs(args.synthetic)
        result = analyse(cells, SYNTHETIC_FIGURES)
        caption = (
            f"Synthetic 2 × 2 (`{args.synthetic}`): the last 1,000 iterations' Rec, KL, −ELBO "
            "(nats per sequence) and separation, mean ± std over seeds."
        )
    else:
        kind, cells = "ptb", ptb_runs(args.paths, args.split)
        result = analyse(cells, PTB_FIGURES)
        epochs = sorted({r["epochs_run"] for rs in cells.values() for r in rs})
        caption = (
            f"PTB 2 × 2, {args.split} split at each run's best valid epoch (runs of "
            f"{'/'.join(f'{e:g}' for e in epochs)} epochs); mean ± std over seeds."
        )
    if not result["cells"]:
        raise SystemExit("no run falls in a cell of the 2 × 2")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{kind}_2x2.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    text = markdown(result, caption)
    with open(os.path.join(args.out, f"{kind}_2x2.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
