"""Table 3 of Fu et al. (2019) from finished Yelp runs and their classifier results.

    python experiments/table3_yelp.py runs/yelp/yelp-*.seed-*/ --classified CLASSIFIED \
        --archive experiments/results/yelp/runs          # record each finished run
    python experiments/table3_yelp.py experiments/results/yelp/runs \
        --out experiments/results/yelp [--checkpoint best]   # tables and plots from the record

Each argument is a run's workdir, an archived run (``<archive>/<run>/``) or a directory of
either. A run's classifier results are the ``<protocol>.<checkpoint>.json`` files
`table3_classify.py` wrote under ``CLASSIFIED/<run>/`` (its ``--out``), or, for an archived run,
those under ``<run>/classify/``.

``--archive DIR`` copies what the tables and plots read of each finished run (epochs run =
``config.num_epochs``): ``config.json``, the evaluation records of ``metrics.jsonl`` as
``evaluations.json`` and its classifier results as ``classify/*.json``; no checkpoint, no
training row. Unfinished runs are left out, each named on stderr.

``--out DIR`` writes
- ``table3.md`` and ``table3.json``: for each protocol (``official``, ``balanced``) the test
  accuracy of each variant (AE, VAE monotonic, VAE cyclical, …) at ``--checkpoint`` (``best``,
  the official selection), mean ± std (ddof 1) over every (pre-training seed, label draw) pair,
  and each variant's test Rec and KL at that checkpoint (mean ± std over seeds);
- ``trajectory.png``: the balanced protocol's accuracy at n = 100 and n = 1,000 against the
  epoch of each cycle end scored (``table3_classify.py --cycle_ends``), a line per variant with a
  ± std band over seeds and draws;
- ``pretraining.png``: valid Rec and KL per epoch (mean, ± std band over seeds) and β and the
  learning rate of each variant's schedules (`vae_jax.run.steps.make_schedules`), against epochs.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys

import ml_collections
import numpy as np

from vae_jax.run import files, steps, workdirs, writers

CLASSIFY = "classify"  # an archived run's classifier results
EVALUATIONS = "evaluations.json"  # an archived run's evaluation records, in order
PROTOCOLS = ("official", "balanced")
TRAJECTORY_SIZES = ("100", "1000")


def run_dirs(paths: list[str]) -> list[str]:
    """The runs named by ``paths``: each a run (it has ``config.json``) or a folder of workdirs."""
    found = []
    for path in paths:
        if os.path.exists(os.path.join(path, workdirs.CONFIG)):
            found.append(path)
            continue
        inner = sorted(
            os.path.dirname(p) for p in glob.glob(os.path.join(path, "*", workdirs.CONFIG))
        )
        if not inner:
            raise FileNotFoundError(f"{path}: holds no run (no config.json in it or one below).")
        found += inner
    return found


def load_config(run: str) -> dict:
    with open(os.path.join(run, workdirs.CONFIG), encoding="utf-8") as f:
        return json.load(f)


def evaluations(run: str) -> list[dict]:
    """A run's per-epoch evaluation records: its archive's, or those of its metrics.jsonl."""
    archived = os.path.join(run, EVALUATIONS)
    if os.path.exists(archived):
        with open(archived, encoding="utf-8") as f:
            return json.load(f)
    return [r for r in writers.read_metrics(run) if "epoch" in r]


def epochs_run(run: str) -> float:
    return max((r["epoch"] for r in evaluations(run) if "valid_rec" in r), default=0.0)


def classifier_results(run: str, classified: str | None) -> list[str]:
    """The paths of a run's classifier results: archived ones, else ``classified/<run>/``."""
    own = sorted(glob.glob(os.path.join(run, CLASSIFY, "*.json")))
    if own or not classified:
        return own
    name = os.path.basename(os.path.normpath(run))
    return sorted(glob.glob(os.path.join(classified, name, "*.json")))


def archive(dirs: list[str], out: str, classified: str | None) -> list[str]:
    """Copies each finished run's config, evaluation records and classifier results into
    ``out/<run>/``; returns the archived runs' directories."""
    done = []
    for run in dirs:
        config = load_config(run)
        ran, total = epochs_run(run), config.get("num_epochs", -1)
        if ran < total:
            print(f"table3_yelp: {run}: {ran:g} of {total} epochs, not archived.", file=sys.stderr)
            continue
        target = os.path.join(out, os.path.basename(os.path.normpath(run)))
        if os.path.realpath(target) != os.path.realpath(run):
            os.makedirs(os.path.join(target, CLASSIFY), exist_ok=True)
            shutil.copyfile(
                os.path.join(run, workdirs.CONFIG), os.path.join(target, workdirs.CONFIG)
            )
            lines = ",\n".join(json.dumps(r) for r in evaluations(run))
            files.write_atomic(os.path.join(target, EVALUATIONS), f"[\n{lines}\n]\n")
            for path in classifier_results(run, classified):
                shutil.copyfile(path, os.path.join(target, CLASSIFY, os.path.basename(path)))
        done.append(target)
    return done


def variant(config: dict) -> str:
    """The row a run belongs to: AE, VAE <schedule>, with its objective if not the ELBO."""
    name = (
        "AE" if config["model"].get("deterministic") else f"VAE {config['beta_schedule']['name']}"
    )
    if config.get("objective", "beta_elbo") != "beta_elbo":
        name += " + " + config["objective"].replace("_", " ")
    if config.get("init_from"):
        name += f" (from {os.path.basename(os.path.normpath(config['init_from']))})"
    return name


ORDER = ("AE", "VAE monotonic", "VAE cyclical")


def order_key(name: str) -> tuple:
    return (ORDER.index(name) if name in ORDER else len(ORDER), name)


def collect(dirs: list[str], classified: str | None) -> dict:
    """{variant: [{"run", "seed", "config", "results": {(protocol, checkpoint): result}}]}."""
    groups: dict[str, list[dict]] = {}
    for run in dirs:
        config = load_config(run)
        results = {}
        for path in classifier_results(run, classified):
            with open(path, encoding="utf-8") as f:
                result = json.load(f)
            protocol, label = os.path.basename(path)[: -len(".json")].split(".", 1)
            results[(protocol, label)] = result
        entry = {"run": run, "seed": config.get("seed"), "config": config, "results": results}
        groups.setdefault(variant(config), []).append(entry)
    return dict(sorted(groups.items(), key=lambda kv: order_key(kv[0])))


def pooled(members: list[dict], protocol: str, label: str, size: str) -> dict | None:
    """Test accuracy over every (seed, draw) of a variant: mean, std (ddof 1), the seeds and
    draws counted; None where no run of it has that result."""
    accs, seeds, draws = [], [], set()
    for m in members:
        result = m["results"].get((protocol, label))
        if result is None or size not in result["sizes"]:
            continue
        probes = result["sizes"][size]["probes"]
        accs += [p["test_acc"] for p in probes]
        seeds.append(m["seed"])
        draws.add(len(probes))
    if not accs:
        return None
    return {
        "mean": float(np.mean(accs)),
        "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else None,
        "seeds": sorted(seeds),
        "draws_per_seed": sorted(draws),
        "n": len(accs),
    }


def tables(groups: dict, label: str) -> dict:
    """{protocol: {variant: {size: pooled}}} at checkpoint ``label``, and each size's n."""
    out = {}
    for protocol in PROTOCOLS:
        rows, labelled = {}, {}
        for name, members in groups.items():
            for m in members:
                for size, entry in (
                    m["results"].get((protocol, label), {"sizes": {}})["sizes"].items()
                ):
                    labelled[size] = entry["n"]
            cells = {s: pooled(members, protocol, label, s) for s in labelled}
            if any(cells.values()):
                rows[name] = cells
        if rows:
            out[protocol] = {"rows": rows, "labelled": labelled}
    return out


def majority(groups: dict) -> float | None:
    for members in groups.values():
        for m in members:
            for result in m["results"].values():
                return result["test_majority_baseline"]
    return None


def settings(groups: dict, protocol: str, label: str, key: str) -> str:
    """The values of one `table3_classify.py` argument over the results of a table (from the
    results, so that the caption says what was run)."""
    values = {
        m["results"][(protocol, label)].get("args", {}).get(key, "?")
        for members in groups.values()
        for m in members
        if (protocol, label) in m["results"]
    }
    return "/".join(sorted(values))


def markdown(table: dict, groups: dict, label: str) -> str:
    blocks = []
    for protocol, t in table.items():
        lr = settings(groups, protocol, label, "lr")
        if protocol == "official":
            epochs = settings(groups, protocol, label, "epochs")
            described = (
                "official protocol: a random (not class-balanced) 10% of the training split per "
                f"draw, raw μ, Adam {lr} × 0.99 per 100 epochs, {epochs} epochs of minibatches "
                "of 32, test at the best dev epoch"
            )
        else:
            steps = settings(groups, protocol, label, "steps")
            described = (
                "balanced protocol: class-balanced draws of n, standardised μ, Adam "
                f"{lr}, {steps} minibatches of 32 drawn with replacement, test at the best dev "
                "check"
            )
        sizes = list(t["labelled"])
        head = [f"n = {t['labelled'][s]:,}" + (f" ({s})" if s.endswith("%") else "") for s in sizes]
        lines = [
            f"**{described}**\n",
            "| features | seeds × draws | " + " | ".join(head) + " |",
            "|---|---|" + "---:|" * len(sizes),
        ]
        for name, cells in t["rows"].items():
            first = next(c for c in cells.values() if c)
            count = f"{len(first['seeds'])} × {'/'.join(map(str, first['draws_per_seed']))}"
            text = []
            for s in sizes:
                c = cells.get(s)
                if c is None:
                    text.append("—")
                else:
                    spread = "" if c["std"] is None else f" ± {100 * c['std']:.1f}"
                    text.append(f"{100 * c['mean']:.1f}{spread}")
            lines.append(f"| {name} | {count} | " + " | ".join(text) + " |")
        blocks.append("\n".join(lines))
    described_runs = []
    for name, members in groups.items():
        lengths = "/".join(sorted({f"{epochs_run(m['run']):g}" for m in members}))
        seeds = sorted(m["seed"] for m in members)
        described_runs.append(f"{name}: seeds {seeds}, {lengths} epochs")
    runs_text = "; ".join(described_runs)
    base = majority(groups)
    return "\n\n".join(blocks) + (
        f"\n\nTest accuracy (%) at the best dev accuracy, features of each run's {label!r} "
        f"checkpoint, mean ± std (ddof 1) over every (pre-training seed, label draw) pair; "
        f"majority class {100 * base:.1f}%. Runs: {runs_text}.\n"
        if base is not None
        else "\n"
    )


def pretraining(groups: dict, label: str) -> dict:
    """{variant: {"epoch": [...], "test_rec"/"test_kl": mean, "<key>_std"}}: each run's test
    figures at the checkpoint its classifier results were computed on (``label``)."""
    out = {}
    for name, members in groups.items():
        figures = []
        for m in members:
            scored = {r["checkpoint_step"] for (_, c), r in m["results"].items() if c == label}
            records = {r["step"]: r for r in evaluations(m["run"]) if "test_rec" in r}
            if len(scored) == 1 and next(iter(scored)) in records:
                figures.append(records[scored.pop()])
        if not figures:
            continue
        row = {"epoch": [f["epoch"] for f in figures], "seeds": len(figures)}
        for key in ("test_rec", "test_kl"):
            values = [f[key] for f in figures]
            row[key] = float(np.mean(values))
            row[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
        out[name] = row
    return out


def pretraining_markdown(rows: dict, label: str) -> str:
    lines = [
        f"**pre-training, test split at the {label!r} checkpoint** (nats a sentence)\n",
        "| features | seeds | epoch | Rec | KL |",
        "|---|---:|---|---:|---:|",
    ]
    for name, row in rows.items():
        cells = []
        for key in ("test_rec", "test_kl"):
            std = row[f"{key}_std"]
            cells.append(f"{row[key]:.2f}" + ("" if std is None else f" ± {std:.2f}"))
        epochs = ", ".join(f"{e:g}" for e in row["epoch"])
        lines.append(f"| {name} | {row['seeds']} | {epochs} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def trajectory(groups: dict) -> dict:
    """{variant: {size: [(epoch, pooled)]}} of the balanced protocol at every cycle end."""
    out = {}
    for name, members in groups.items():
        keys = [key for m in members for key in m["results"]]
        epochs = sorted(
            {int(c[len("epoch-") :]) for p, c in keys if p == "balanced" and c.startswith("epoch-")}
        )
        curves = {}
        for size in TRAJECTORY_SIZES:
            points = [(e, pooled(members, "balanced", f"epoch-{e}", size)) for e in epochs]
            points = [(e, c) for e, c in points if c is not None]
            if points:
                curves[size] = points
        if curves:
            out[name] = curves
    return out


def plot_trajectory(curves: dict, path: str, base: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TRAJECTORY_SIZES), figsize=(10, 3.6), sharey=True)
    for ax, size in zip(axes, TRAJECTORY_SIZES, strict=True):
        for name, by_size in curves.items():
            points = by_size.get(size, [])
            if not points:
                continue
            epochs = [e for e, _ in points]
            mean = np.array([100 * c["mean"] for _, c in points])
            std = np.array([100 * (c["std"] or 0.0) for _, c in points])
            line = ax.plot(epochs, mean, marker="o", label=name)
            ax.fill_between(epochs, mean - std, mean + std, alpha=0.25, color=line[0].get_color())
        if base is not None:
            ax.axhline(100 * base, color="gray", ls=":", label="majority")
        ax.set_title(f"n = {int(size):,} labels (balanced protocol)")
        ax.set_xlabel("pre-training epoch (cycle end)")
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def schedules_per_epoch(config: dict, steps_per_epoch: int, epochs: float, points: int = 20):
    """(epochs, β, lr) of a run's schedules at ``points`` steps an epoch."""
    beta_fn, lr_fn = steps.make_schedules(ml_collections.ConfigDict(config), steps_per_epoch)
    at = np.linspace(0, epochs * steps_per_epoch, int(epochs * points) + 1)
    at = np.round(at).astype(np.int32)
    return at / steps_per_epoch, np.asarray(beta_fn(at)), np.asarray(lr_fn(at))


def plot_pretraining(groups: dict, path: str) -> None:
    """Valid Rec and KL per epoch (mean ± std band over seeds), β and lr of each variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for name, members in groups.items():
        curves = []
        for m in members:
            records = [r for r in evaluations(m["run"]) if "valid_rec" in r]
            curves.append({r["epoch"]: (r["valid_rec"], r["valid_kl"]) for r in records})
        epochs = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not epochs:
            continue
        values = np.array([[c[e] for e in epochs] for c in curves])  # (seeds, epochs, 2)
        color = None
        for i in range(2):
            mean = values[..., i].mean(0)
            label = f"{name} (n = {len(curves)})"
            line = axes[i].plot(epochs, mean, marker=".", label=label, color=color)
            color = line[0].get_color()
            if len(curves) > 1:
                std = values[..., i].std(0, ddof=1)
                axes[i].fill_between(epochs, mean - std, mean + std, alpha=0.25, color=color)
        first = next(r for r in evaluations(members[0]["run"]) if r.get("epoch"))
        per_epoch = round(first["step"] / first["epoch"])
        x, beta, lr = schedules_per_epoch(members[0]["config"], per_epoch, max(epochs))
        axes[2].plot(x, beta, color=color, label=name)
        axes[3].plot(x, lr, color=color, label=name)
    for ax, title in zip(axes, ("valid Rec (nats)", "valid KL (nats)", "β", "learning rate"),
                         strict=True):  # fmt: skip
        ax.set_title(title)
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_tables(groups: dict, out: str, label: str) -> str:
    """table3.md, table3.json, trajectory.png and pretraining.png under ``out``."""
    os.makedirs(out, exist_ok=True)
    table = tables(groups, label)
    figures = pretraining(groups, label)
    text = markdown(table, groups, label)
    if figures:
        text += "\n" + pretraining_markdown(figures, label) + "\n"
    curves = trajectory(groups)
    names = {
        n: [os.path.basename(os.path.normpath(m["run"])) for m in ms] for n, ms in groups.items()
    }
    record = {
        "checkpoint": label,
        "tables": table,
        "pretraining": figures,
        "trajectory": {
            n: {s: [list(p) for p in v] for s, v in c.items()} for n, c in curves.items()
        },
        "runs": names,
        "test_majority_baseline": majority(groups),
    }
    with open(os.path.join(out, "table3.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(out, "table3.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    if curves:
        plot_trajectory(curves, os.path.join(out, "trajectory.png"), majority(groups))
    plot_pretraining(groups, os.path.join(out, "pretraining.png"))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="Runs, archived runs, or folders of either.")
    parser.add_argument("--classified", help="table3_classify.py's --out for workdirs.")
    parser.add_argument("--archive", help="Copy each finished run's record (no checkpoint) here.")
    parser.add_argument("--out", help="Write table3.md/json, trajectory.png, pretraining.png.")
    parser.add_argument("--checkpoint", default="best", help="Whose features: best (official).")
    args = parser.parse_args()
    if not (args.archive or args.out):
        parser.error("nothing to do: give --archive and/or --out")
    try:
        dirs = run_dirs(args.paths)
    except FileNotFoundError as e:
        sys.exit(f"table3_yelp: {e}")
    if args.archive:
        dirs = archive(dirs, args.archive, args.classified)
        print(f"archived {len(dirs)} run(s) under {args.archive}", file=sys.stderr)
    if args.out:
        print(write_tables(collect(dirs, args.classified), args.out, args.checkpoint))


if __name__ == "__main__":
    main()
