"""Fu et al. (2019) Table 1 layout from finished (or running) PTB workdirs.

    python experiments/table1_ptb.py runs/ptb_cyclical runs/ptb_monotonic [--split test]
        [--select best|last] [--max_epoch E] [--out table.json] [--markdown table.md]
    python experiments/table1_ptb.py runs/table1 --plot curves.png      # a sweep directory

Each argument is a run's workdir, a population's (its members) or a sweep's (`vae_jax.sweep`:
every run in it). One row per model × β schedule (read from ``config.json``), columns Rec, KL,
−ELBO and PPL of ``--split`` at the chosen epoch: ``best`` (default) is the epoch with the
lowest valid PPL bound, the one saved under ``workdir/best``; ``last`` the latest evaluated
epoch; ``--max_epoch`` only looks at epochs up to E (to compare runs still in progress at the
same length). A row of several runs (seeds) gives mean ± standard deviation over them. PPL is
the bound exp((ΣRec + ΣKL)/#predicted tokens) with one z sample, as in training logs.
``--plot`` draws each row's per-epoch valid KL and PPL bound, mean ± std bands over its workdirs.
``--archive DIR`` copies what the table and plot read of each run (``config.json``, the
evaluation records of ``metrics.jsonl`` as ``evaluations.json``, ``eval_<split>.json``: a few kB,
no checkpoint, no training rows) into
``DIR/<run>/``, a record to commit beside the table: ``table1_ptb.py DIR`` rebuilds both from it
once the workdirs are gone. ``--rows_from TABLE.json`` adds the per-run rows of an earlier
``--out`` (runs whose workdirs were lost before there was an archive): they count in the table's
mean ± std as recorded there, and are left out of the curves, which need their evaluation records.

Where ``python -m vae_jax.evaluate`` has scored a run's selected checkpoint on ``--split``
(its ``eval_<split>.json`` in the workdir, from the same step), the row also has IW-NLL, MI
over the whole split and AU (for an SA-VAE at its refined posterior λ_K, as `evaluate` does).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np

from vae_jax.run import files, workdirs, writers

FIGURES = ("rec", "kl", "neg_elbo", "ppl")
SCORED = ("iw_nll", "mi", "au")  # from vae_jax.evaluate's eval_<split>.json, where present
EVALUATIONS = "evaluations.json"  # an archived run's evaluation records, in order


def run_dirs(path: str) -> list[str]:
    """The run directories under ``path``: itself, a population's members, or a sweep's workdirs."""
    config_path = os.path.join(path, "config.json")
    if os.path.exists(config_path):
        with open(config_path, encoding="utf-8") as f:
            size = json.load(f).get("population_size", 1)
        if size > 1:
            return [os.path.join(path, "members", str(k)) for k in range(size)]
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a run, population or sweep directory.")
    found = []
    for name in sorted(os.listdir(path)):
        sub = os.path.join(path, name)
        if os.path.exists(os.path.join(sub, "config.json")):
            found += run_dirs(sub)
    unique = {os.path.realpath(d): d for d in found}  # a sweep links to its populations' runs
    if not unique:
        raise FileNotFoundError(f"{path}: holds no run (no config.json in it or below it).")
    return sorted(unique.values())


def archive_name(workdir: str) -> str:
    """A run's name in an archive: its directory, ``<population>.member-<k>`` for a member."""
    parent, name = os.path.split(os.path.normpath(workdir))
    if os.path.basename(parent) == "members":
        return f"{os.path.basename(os.path.dirname(parent))}.member-{name}"
    return name


def archive(dirs: list[str], out: str) -> None:
    """Copies each run's config, evaluation records and scores into ``out/<archive_name>/``."""
    names = [archive_name(d) for d in dirs]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ValueError(f"--archive {out}: two runs would share the name(s) {clash}.")
    for workdir, name in zip(dirs, names, strict=True):
        target = os.path.join(out, name)
        if os.path.realpath(target) == os.path.realpath(workdir):
            continue  # already the archived copy
        os.makedirs(target, exist_ok=True)
        shutil.copyfile(
            os.path.join(workdir, workdirs.CONFIG), os.path.join(target, workdirs.CONFIG)
        )
        lines = ",\n".join(json.dumps(r) for r in evaluations(workdir))
        files.write_atomic(os.path.join(target, EVALUATIONS), f"[\n{lines}\n]\n")
        with open(os.path.join(workdir, workdirs.CONFIG), encoding="utf-8") as f:
            splits = json.load(f)["data"]["eval_splits"]
        for split in splits:
            scores = workdirs.eval_results_path(workdir, split)
            if os.path.exists(scores):
                shutil.copyfile(scores, workdirs.eval_results_path(target, split))


ROW_FIELDS = ("model", "schedule", "seed", "epoch", "epochs_run", "num_epochs", *FIGURES)


def recorded_rows(path: str) -> list[dict]:
    """The per-run rows of an earlier ``--out`` JSON, each marked ``recorded_in=path``."""
    with open(path, encoding="utf-8") as f:
        groups = json.load(f)
    expected = f"--rows_from {path}: expected the JSON of `table1_ptb.py --out` (rows with 'runs')"
    if not isinstance(groups, list) or not all(isinstance(g, dict) and "runs" in g for g in groups):
        raise ValueError(f"{expected}.")
    rows = []
    for g in groups:
        for r in g["runs"]:
            missing = [k for k in ROW_FIELDS if k not in r]
            if missing:
                raise ValueError(f"{expected}; a run of {g.get('model')} {g.get('schedule')} "
                                 f"lacks {missing}.")  # fmt: skip
            # An --out older than the split and select fields was made with the defaults.
            rows.append({"split": "test", "select": "best", "recorded_in": path, **r})
    return rows


def merged(rows: list[dict], recorded: list[dict]) -> list[dict]:
    """``rows`` and the ``recorded`` ones; a run in both (same model, schedule, seed) is refused."""
    key = lambda r: (r["model"], r["schedule"], r["seed"])  # noqa: E731
    twice = sorted({key(r) for r in recorded} & {key(r) for r in rows})
    if twice:
        raise ValueError(f"--rows_from: run(s) {twice} are also given as workdirs; drop one.")
    return rows + recorded


def evaluations(workdir: str) -> list[dict]:
    """A run's per-epoch evaluation records: its archive's, or those of its ``metrics.jsonl``."""
    archived = os.path.join(workdir, EVALUATIONS)
    if os.path.exists(archived):
        with open(archived, encoding="utf-8") as f:
            return json.load(f)
    return [r for r in writers.read_metrics(workdir) if any("_ppl_bound" in k for k in r)]


def model_name(config: dict) -> str:
    return "SA-VAE" if config.get("model", {}).get("svi_steps", 0) > 0 else "VAE"


def schedule_name(config: dict) -> str:
    """The β schedule's name, and the learning rate's where it is not the official pairing
    (cyclical β with the restarted cosine lr, any other β with a constant lr)."""
    beta = config["beta_schedule"]["name"]
    name = beta.replace("_", " ").capitalize()
    lr = config.get("lr_schedule", {}).get("name")  # None: a record without it (older runs)
    if lr is not None and lr != ("cyclical_cosine_lr" if beta == "cyclical" else "constant"):
        name += ", lr " + ("restarts" if lr == "cyclical_cosine_lr" else lr.replace("_", " "))
    return name


def row(workdir: str, split: str, select: str, max_epoch: float | None = None) -> dict:
    """The figures of one workdir at the selected evaluation."""
    with open(os.path.join(workdir, workdirs.CONFIG), encoding="utf-8") as f:
        config = json.load(f)
    records = evaluations(workdir)
    if max_epoch is not None:
        records = [r for r in records if r.get("epoch", 0) <= max_epoch + 1e-9]
    evals = {r["step"]: r for r in records if f"{split}_ppl_bound" in r}
    valid = {r["step"]: r for r in records if "valid_ppl_bound" in r}
    if not evals:
        raise ValueError(f"{workdir}: no {split} evaluation yet.")
    if select == "best":
        if not valid:
            raise ValueError(f"{workdir}: no valid evaluation to select the best epoch by.")
        step = min((s for s in valid if s in evals), key=lambda s: valid[s]["valid_ppl_bound"])
    else:
        step = max(evals)
    r = evals[step]
    return {
        **scored(workdir, split, step),
        "workdir": workdir,
        "split": split,
        "select": select,
        "model": model_name(config),
        "schedule": schedule_name(config),
        "epoch": r.get("epoch"),
        "epochs_run": max(x.get("epoch", 0) for x in evals.values()),
        "num_epochs": config.get("num_epochs"),
        "rec": r[f"{split}_rec"],
        "kl": r[f"{split}_kl"],
        "neg_elbo": -r[f"{split}_elbo"],
        "ppl": r[f"{split}_ppl_bound"],
        "seed": config.get("seed"),
    }


def scored(workdir: str, split: str, step: int) -> dict:
    """IW-NLL, MI and AU of ``vae_jax.evaluate``'s ``eval_<split>.json`` if it scored ``step``."""
    path = workdirs.eval_results_path(workdir, split)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        result = json.load(f)
    if result.get("checkpoint_info", {}).get("step") != step:
        return {}
    return {
        **{key: float(result[key]) for key in SCORED},
        "num_importance_samples": result["num_importance_samples"],
    }


def grouped(rows: list[dict]) -> list[dict]:
    """One row per model × schedule: the mean of each figure over its runs, its standard
    deviation (``<figure>_std``, ddof 1) and the number of runs ``n``."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["schedule"]), []).append(r)
    out = []
    for (model, schedule), members in sorted(groups.items()):
        g = {"model": model, "schedule": schedule, "n": len(members), "runs": members}
        figures = FIGURES + tuple(k for k in SCORED if all(k in m for m in members))
        for key in figures:
            values = [m[key] for m in members]
            g[key] = float(np.mean(values))
            g[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
        g["epoch"] = [m["epoch"] for m in members]
        g["epochs_run"] = min(m["epochs_run"] for m in members)
        out.append(g)
    return out


def markdown(groups: list[dict], split: str) -> str:
    extra = [k for k in SCORED if any(k in g for g in groups)]
    scored_runs = [r for g in groups for r in g["runs"] if "iw_nll" in r]
    samples = sorted({r["num_importance_samples"] for r in scored_runs})
    names = {"iw_nll": f"IW-NLL (K = {'/'.join(map(str, samples))}) ↓", "mi": "MI", "au": "AU"}
    lines = [
        "| Model | Schedule | runs | Rec ↓ | KL | −ELBO ↓ | PPL ↓ | "
        + "".join(f"{names[k]} | " for k in extra)
        + f"epoch ({split}) |",
        "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(extra) + "---|",
    ]
    for g in groups:
        cells = []
        for key in FIGURES + tuple(extra):
            if key not in g:
                cells.append("—")
                continue
            std, digits = g[f"{key}_std"], 1 if key == "au" else 2
            spread = "" if std is None else f" ± {std:.{digits}f}"
            cells.append(f"{g[key]:.{digits}f}{spread}")
        epochs = sorted({e for e in g["epoch"] if e is not None})
        epoch = ", ".join(f"{e:.3g}" for e in epochs) + f" of {g['epochs_run']:.3g}"
        lines.append(
            f"| {g['model']} | {g['schedule']} | {g['n']} | " + " | ".join(cells) + f" | {epoch} |"
        )
    return "\n".join(lines)


def caption(groups: list[dict], split: str, select: str, max_epoch: float | None) -> str:
    """What the table shows, for the Markdown file: split, epoch selection, runs and length."""
    chosen = "lowest valid PPL bound" if select == "best" else "latest evaluated"
    limit = "" if max_epoch is None else f", among epochs ≤ {max_epoch:g}"
    members = [r for g in groups for r in g["runs"]]
    seeds = sorted({r["seed"] for r in members})
    done = sorted({f"{r['epochs_run']:g} of {r['num_epochs']}" for r in members})
    recorded = {}
    for r in members:
        if "recorded_in" in r:
            recorded.setdefault(os.path.basename(r["recorded_in"]), set()).add(r["seed"])
    sources = "".join(
        f"; seeds {sorted(s)} as recorded in {name} (their workdirs are gone: not in the curves)"
        for name, s in sorted(recorded.items())
    )
    return (
        f"{split} split; epochs run: {', '.join(done)}; each run at its epoch of {chosen}{limit}; "
        f"seeds {seeds}{sources}; "
        "a row of several runs is mean ± std (ddof 1). Rec, KL, −ELBO and the PPL bound from "
        "one z sample; IW-NLL, MI (whole split) and AU from `python -m vae_jax.evaluate`, "
        "where it scored that checkpoint. Last column: the selected epoch of the epochs run."
    )


def plot_curves(groups: list[dict], path: str, max_epoch: float | None = None) -> None:
    """Per-epoch valid KL and PPL bound of each row, mean ± std (ddof 1, as in the table) over
    its workdirs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for g in groups:
        curves = []
        for run in (r for r in g["runs"] if "recorded_in" not in r):  # those have no records
            records = [r for r in evaluations(run["workdir"]) if "valid_kl" in r]
            curves.append({r["epoch"]: (r["valid_kl"], r["valid_ppl_bound"]) for r in records})
        if not curves:
            continue
        epochs = sorted(set.intersection(*(set(c) for c in curves)))
        if max_epoch is not None:
            epochs = [e for e in epochs if e <= max_epoch + 1e-9]
        if not epochs:
            continue
        values = np.array([[c[e] for e in epochs] for c in curves])  # (runs, epochs, 2)
        for i, ax in enumerate(axes):
            mean = values[..., i].mean(0)
            line = ax.plot(epochs, mean, label=f"{g['model']} {g['schedule']} (n={len(curves)})")
            if len(curves) > 1:  # the table's std (ddof 1); one run has no band
                std = values[..., i].std(0, ddof=1)
                color = line[0].get_color()
                ax.fill_between(epochs, mean - std, mean + std, alpha=0.25, color=color)
    axes[0].set_title("valid KL (nats)")
    axes[1].set_title("valid PPL bound")
    for ax in axes:
        ax.set_xlabel("epoch")
    axes[1].set_yscale("log")
    plain = matplotlib.ticker.FormatStrFormatter("%g")  # 120, not 1.2 × 10²
    axes[1].yaxis.set_major_formatter(plain)
    axes[1].yaxis.set_minor_formatter(plain)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", help="Runs, populations or sweeps.")
    parser.add_argument("--split", default="test")
    parser.add_argument("--select", choices=("best", "last"), default="best")
    parser.add_argument("--max_epoch", type=float, help="Only epochs up to this one.")
    parser.add_argument("--out", help="Also write the rows as JSON here.")
    parser.add_argument("--markdown", help="Also write the table as Markdown here.")
    parser.add_argument("--plot", help="Also draw the learning curves into this PNG.")
    parser.add_argument("--archive", help="Also copy each run's record (no checkpoint) here.")
    parser.add_argument("--rows_from", action="append", default=[],
                        help="An earlier --out JSON whose runs' workdirs are gone.")  # fmt: skip
    args = parser.parse_args()
    recorded = [r for path in args.rows_from for r in recorded_rows(path)]
    if any((r["split"], r["select"]) != (args.split, args.select) for r in recorded) or (
        recorded and args.max_epoch is not None
    ):
        parser.error(f"--rows_from: its rows are not of --split={args.split} --select="
                     f"{args.select} (they are taken as recorded; no --max_epoch).")  # fmt: skip
    dirs = [d for path in args.workdirs for d in run_dirs(path)]
    rows = [row(d, args.split, args.select, args.max_epoch) for d in dirs]
    groups = grouped(merged(rows, recorded))
    table = markdown(groups, args.split)
    print(table)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            note = caption(groups, args.split, args.select, args.max_epoch)
            f.write(f"{table}\n\n{note}\n")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(groups, f, indent=2)
    if args.plot:
        plot_curves(groups, args.plot, args.max_epoch)
    if args.archive:
        archive(dirs, args.archive)


if __name__ == "__main__":
    main()
