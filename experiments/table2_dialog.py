"""Fu et al. (2019) Table 2 from dialog runs: {CVAE, CVAE+BoW} × {monotonic, cyclical} on SwDA.

    python experiments/table2_dialog.py runs/table2 --archive experiments/results/dialog/runs \
        --out experiments/results/dialog [--variants cvae_monotonic,cvae_cyclical]
        [--num_samples 5] [--max_contexts 0] [--word_vectors glove.twitter.27B.200d.txt]
    python experiments/table2_dialog.py experiments/results/dialog/runs \
        --out experiments/results/dialog                  # rebuilt from the archive alone

Each argument is a dialog run's workdir (`configs/swda.py`), a sweep's directory
(`configs/sweeps/swda_table2.py`: every run in it) or an archive written by ``--archive``.
Runs are grouped by variant, the paper's columns CVAE M, CVAE C, CVAE+BoW M, CVAE+BoW C
(``config.model.use_bow``, True for configs older than the switch, and
``config.beta_schedule.name``); a column of several seeds is mean ± std (ddof 1).

Each run is tested at its ``best/`` checkpoint, the lowest valid −ELBO kept by the run (not
recomputed here), with `evaluation.evaluate_dialog` on the test split: the ELBO figures, then
``--num_samples`` responses per test context from p(z|c), scored against the true response.
That evaluation runs once per run: an ``eval_test.json`` (and its ``samples_test.txt[.gz]``)
of the same checkpoint step and settings, in the archive or in the workdir (where
``python -m vae_jax.evaluate`` writes them), is reused; a new one is written to the archive
(``--archive``), else to the workdir.

``--archive DIR`` writes each run's record to ``DIR/<run>/``: ``config.json``,
``evaluations.json`` (its validation records, each with the β and learning rate of the step
that produced the validated parameters, the early-stopping record where it stopped, the last
training record where it is later: the steps trained),
``eval_test.json`` and ``samples_test.txt.gz``; no checkpoint. ``table2_dialog.py DIR``
rebuilds everything from it once the workdirs are gone.

Writes to ``--out``: ``table.md`` (the table, its caption and, for each model with both
schedules, the paper's claim checked figure by figure) and ``table.json`` (per column and per
run), ``curves.png``
(valid KL, valid Rec-P and β per validation, mean and a ±std band over seeds) and
``samples.md`` (``--show`` test contexts drawn with ``--seed``, the same for every column,
each column's seed-0 samples). Training data is the SwDA stand-in (`vae_jax.dialog.swda`):
the caption says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import table1_ptb  # experiments/table1_ptb.py: run_dirs and archive names, shared with Table 1

from vae_jax.dialog import evaluation
from vae_jax.run import build, files, workdirs, writers

SPLIT = "test"  # the split the paper's Table 2 reports
EVALUATIONS = table1_ptb.EVALUATIONS
EVAL_JSON = os.path.basename(workdirs.eval_results_path("", SPLIT))  # what vae_jax.evaluate writes
SAMPLES_TXT = f"samples_{SPLIT}.txt"  # vae_jax.evaluate's samples; archived gzipped
SAMPLES_GZ = f"{SAMPLES_TXT}.gz"
SCHEDULES = ("monotonic", "cyclical")
# The paper's column order.
VARIANTS = ("cvae_monotonic", "cvae_cyclical", "cvae_bow_monotonic", "cvae_bow_cyclical")
LABELS = dict(zip(VARIANTS, ("CVAE M", "CVAE C", "CVAE+BoW M", "CVAE+BoW C"), strict=True))

ROWS = (
    ("Rec-P ↓", "rec_ppl", 2),
    ("KL(q ‖ p(z|c)) ↑", "kl", 3),
    ("BOW loss", "bow", 2),
    ("−ELBO", "neg_elbo", 2),
    *[
        (f"BLEU-{n} {part[0].upper()}", f"bleu{n}_{part}", 3)
        for n in (1, 2, 3, 4)
        for part in ("precision", "recall", "f1")
    ],
    *[
        (f"{name} {part[0].upper()}", f"{key}_{part}", 3)
        for name, key in (("A-bow", "a_bow"), ("E-bow", "e_bow"))
        for part in ("precision", "recall", "f1")
    ],
    ("distinct-1", "distinct1", 4),
    ("distinct-2", "distinct2", 4),
)
OPTIONAL = {"a_bow", "e_bow"}  # rows only where word vectors were given


@dataclasses.dataclass
class Run:
    """One run's record, from its workdir or an archive, checked before anything is computed."""

    path: str  # the workdir, or the archived record's directory
    name: str  # its name in an archive
    config: dict
    variant: str
    evaluations: list[dict]  # validation records in order, with beta and lr
    best_step: int
    trained_steps: int
    has_checkpoints: bool  # a workdir (can be evaluated), not an archived record

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def early_stopped(self) -> int | None:
        """The validation the run stopped at, None if it did not stop early."""
        return next((r["early_stopped"] for r in self.evaluations if "early_stopped" in r), None)


def variant(config: dict, where: str) -> str:
    """The run's column, from ``config.model.use_bow`` and ``config.beta_schedule.name``."""
    model = config.get("model", {})
    if model.get("kind") != "cvae":
        raise ValueError(
            f"{where}: model.kind={model.get('kind')!r}: expected 'cvae' (a configs/swda.py run)."
        )
    schedule = config.get("beta_schedule", {}).get("name")
    if schedule not in SCHEDULES:
        raise ValueError(
            f"{where}: beta_schedule.name={schedule!r}: expected one of {list(SCHEDULES)}."
        )
    use_bow = model.get("use_bow", True)  # configs from before the plain CVAE had the head
    if not isinstance(use_bow, bool):
        raise ValueError(f"{where}: model.use_bow={use_bow!r}: expected true or false.")
    return f"cvae_{'bow_' if use_bow else ''}{schedule}"


def parse_variants(text: str) -> list[str]:
    """``--variants``: comma-separated names of `VARIANTS` (empty: all)."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise ValueError(f"--variants: unknown {unknown}; expected names from {list(VARIANTS)}.")
    return names or list(VARIANTS)


def schedule_values(config: dict, at: Sequence[int]) -> tuple[list[float], list[float]]:
    """β and learning rate of the training step that produced the parameters at each step of
    ``at`` (schedule step s − 1), as training logs them."""
    import ml_collections

    from vae_jax.run import steps

    beta_fn, lr_fn = steps.make_schedules(ml_collections.ConfigDict(config), None)
    return [float(beta_fn(s - 1)) for s in at], [float(lr_fn(s - 1)) for s in at]


def workdir_evaluations(workdir: str, config: dict) -> tuple[list[dict], int]:
    """The validation records of ``metrics.jsonl`` (valid and test of a step merged, the
    early-stop record joined to its step) with β and lr, then the last training record if
    later; and the steps trained."""
    records = writers.read_metrics(workdir)
    by_step: dict[int, dict] = {}
    for r in records:
        if "valid_elbo" in r or "test_elbo" in r or "early_stopped" in r:
            by_step.setdefault(r["step"], {}).update(r)
    steps = sorted(s for s, r in by_step.items() if "valid_elbo" in r)
    betas, lrs = schedule_values(config, steps)
    for s, beta, lr in zip(steps, betas, lrs, strict=True):
        by_step[s].update(beta=beta, lr=lr)
    out = [by_step[s] for s in sorted(by_step)]
    last = records[-1] if records else None
    if last is not None and out and last["step"] > out[-1]["step"]:
        out.append(last)  # the last training record: the steps trained, kept in the archive
    return out, max((r["step"] for r in records), default=0)


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def started(path: str) -> bool:
    """Whether a run has a record to read: a best checkpoint, or an archived record."""
    return os.path.exists(os.path.join(path, workdirs.BEST, "info.json")) or os.path.exists(
        os.path.join(path, EVALUATIONS)
    )


def read_run(path: str) -> Run:
    """A run's record from its workdir or its archived copy; raises naming the file that
    is missing or malformed."""
    config = read_json(os.path.join(path, workdirs.CONFIG))
    where = os.path.join(path, workdirs.CONFIG)
    var = variant(config, where)
    best_info = os.path.join(path, workdirs.BEST, "info.json")
    archived = os.path.join(path, EVALUATIONS)
    if os.path.exists(best_info):
        evaluations, trained = workdir_evaluations(path, config)
        best_step = int(read_json(best_info)["step"])
        has_checkpoints = True
    elif os.path.exists(archived):
        evaluations = read_json(archived)
        trained = max((r["step"] for r in evaluations), default=0)
        evaluation = os.path.join(path, EVAL_JSON)
        if not os.path.exists(evaluation):
            raise ValueError(f"{path}: an archived run without {EVAL_JSON} (its test evaluation).")
        best_step = read_json(evaluation).get("checkpoint_info", {}).get("step")
        if not isinstance(best_step, int):
            raise ValueError(f"{evaluation}: no checkpoint_info.step: expected an evaluation.")
        has_checkpoints = False
    else:
        raise ValueError(
            f"{path}: no {workdirs.BEST}/info.json (the run has not validated yet) and no "
            f"{EVALUATIONS} (not an archived run): expected a run with a best checkpoint."
        )
    if not any("valid_rec_ppl" in r for r in evaluations):
        raise ValueError(f"{path}: no validation record with valid_rec_ppl: expected a dialog run.")
    name = table1_ptb.archive_name(path)
    return Run(path, name, config, var, evaluations, best_step, trained, has_checkpoints)


# --- The test evaluation, once per run ---------------------------------------------------


def settings(args: argparse.Namespace) -> dict:
    """What a test evaluation depends on besides the checkpoint: a cached one must match."""
    return {
        "split": SPLIT,
        "num_samples": args.num_samples,
        "max_contexts": args.max_contexts,
        "seed": args.seed,
        "word_vectors": args.word_vectors or None,
    }


def mismatches(directory: str, step: int, wanted: dict) -> list[str] | None:
    """How ``directory``'s eval JSON differs from a test evaluation of ``step`` with the
    ``wanted`` settings (``[]``: reusable); None where it has none, or no samples beside it."""
    path = os.path.join(directory, EVAL_JSON)
    if not os.path.exists(path) or samples_path(directory) is None:
        return None
    result = read_json(path)
    have = {"step": result.get("checkpoint_info", {}).get("step")}
    have.update({k: result.get(k) for k in wanted})
    want = {"step": step, **wanted}
    for d in (have, want):  # the vectors file by name: an archive is read on another machine
        d["word_vectors"] = d["word_vectors"] and os.path.basename(d["word_vectors"])
    return [f"{k}={have[k]!r} (wanted {want[k]!r})" for k in want if have[k] != want[k]]


def samples_path(directory: str) -> str | None:
    """The samples beside an eval JSON: the newer of the text and the gzipped file."""
    found = [os.path.join(directory, n) for n in (SAMPLES_TXT, SAMPLES_GZ)]
    found = [p for p in found if os.path.exists(p)]
    return max(found, key=os.path.getmtime) if found else None


def check_bow(run: Run, result: dict, where: str) -> None:
    """A plain CVAE has no BOW figures and CVAE+BoW has them: anything else is a mix-up of files."""
    use_bow = "bow" in run.variant
    if ("bow" in result) != use_bow:
        have = "has" if "bow" in result else "lacks"
        raise ValueError(
            f"{where}: {have} 'bow' but config.model.use_bow={use_bow}; expected "
            f"{'a BOW loss (CVAE+BoW)' if use_bow else 'no BOW figures (a plain CVAE)'}."
        )


def plan(run: Run, archive_dir: str | None, wanted: dict) -> tuple[str | None, str]:
    """Where this run's test evaluation comes from (a cached eval JSON, or None: compute it)
    and where a new one goes; raises for an archived run that would need its checkpoint."""
    target = os.path.join(archive_dir, run.name) if archive_dir else run.path
    for directory in (target, run.path):
        if mismatches(directory, run.best_step, wanted) == []:
            path = os.path.join(directory, EVAL_JSON)
            check_bow(run, read_json(path), path)
            return path, target
    if not run.has_checkpoints:
        diff = mismatches(run.path, run.best_step, wanted)
        what = "its samples are missing" if diff is None else ", ".join(diff)
        raise ValueError(
            f"{os.path.join(run.path, EVAL_JSON)}: {what}; an archived run cannot be evaluated "
            "again (no checkpoint): expected the flags it was archived with."
        )
    return None, target


def evaluate_run(run: Run, wanted: dict, target: str, vectors: Any) -> str:
    """Scores ``run``'s best checkpoint on the test split; writes the eval JSON and samples
    to ``target``; returns the JSON's path."""
    import jax

    from vae_jax.dialog import responses

    config, data, model, params, info = build.load_run(run.path, "best")
    if info["step"] != run.best_step:  # best/ moved on since the run was read: use the newer
        run.best_step = int(info["step"])
    result, sampled = evaluation.evaluate_dialog(
        model, params, data, SPLIT, elbo_key=build.eval_key(config),
        key=jax.random.PRNGKey(wanted["seed"]), num_samples=wanted["num_samples"],
        vectors=vectors, max_contexts=wanted["max_contexts"],
    )  # fmt: skip
    result = {
        "workdir": run.path, "split": SPLIT, "checkpoint": "best", "checkpoint_info": info,
        "seed": wanted["seed"], **result,
    }  # fmt: skip
    check_bow(run, result, f"{run.path} evaluation")
    os.makedirs(target, exist_ok=True)
    vocab = data.info["vocab"]
    text = "".join(f"row {r['row']}\n{responses.format_result(r, vocab)}\n\n" for r in sampled)
    if target == run.path:  # a workdir: the file `python -m vae_jax.evaluate` writes there
        files.write_atomic(os.path.join(target, SAMPLES_TXT), text)
    else:  # an archive: 5 samples × ~5,500 contexts are a few MB as text
        files.write_atomic(os.path.join(target, SAMPLES_GZ), gzip.compress(text.encode(), mtime=0))
    path = os.path.join(target, EVAL_JSON)
    files.write_atomic(path, json.dumps(result, indent=1, default=str))
    return path


def read_samples(directory: str) -> dict[int, dict]:
    """The samples file beside an eval JSON (`responses.format_result` blocks), by row."""
    path = samples_path(directory)
    if path is None:
        raise ValueError(f"{directory}: no {SAMPLES_TXT} or {SAMPLES_GZ}.")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    out = {}
    for block in text.split("\n\n"):
        lines = block.strip("\n").split("\n")
        if not lines or not lines[0].startswith("row "):
            continue
        entry = {"context": [], "reference": "", "samples": []}
        for line in lines[1:]:
            body = line[2:]  # format_result indents by two spaces
            if body.startswith("reference >>"):
                entry["reference"] = body[len("reference >>") :].strip()
            elif body.startswith("sample "):
                entry["samples"].append(body.split(">>", 1)[1].strip())
            else:
                entry["context"].append(body)
        out[int(lines[0].split()[1])] = entry
    return out


def write_archive(run: Run, eval_path: str, archive_dir: str) -> None:
    """``archive_dir/<run>/``: config, evaluations, test evaluation and samples (no checkpoint)."""
    target = os.path.join(archive_dir, run.name)
    os.makedirs(target, exist_ok=True)
    if os.path.realpath(target) != os.path.realpath(run.path):
        shutil.copyfile(
            os.path.join(run.path, workdirs.CONFIG), os.path.join(target, workdirs.CONFIG)
        )
    lines = ",\n".join(json.dumps(r) for r in run.evaluations)
    files.write_atomic(os.path.join(target, EVALUATIONS), f"[\n{lines}\n]\n")
    source = os.path.dirname(eval_path)
    if os.path.realpath(source) == os.path.realpath(target):
        return
    shutil.copyfile(eval_path, os.path.join(target, EVAL_JSON))
    samples = samples_path(source)
    with open(samples, "rb") as f:
        data = f.read()
    if not samples.endswith(".gz"):  # 5 samples × ~5,500 contexts: a few MB as text
        data = gzip.compress(data, mtime=0)
    files.write_atomic(os.path.join(target, SAMPLES_GZ), data)


# --- Table, curves, samples ----------------------------------------------------------------


def columns(runs_: list[Run], results: list[dict], variants: list[str]) -> list[dict]:
    """One column per variant present, in ``variants``' order: the mean of each figure over its
    runs, ``<key>_std`` (ddof 1, None for one run), ``n`` and the workdirs."""
    out = []
    for v in variants:
        members = [(r, x) for r, x in zip(runs_, results, strict=True) if r.variant == v]
        if not members:
            continue
        members.sort(key=lambda m: m[0].seed)
        col = {"variant": v, "label": LABELS[v], "n": len(members), "runs": []}
        for _, key, _ in ROWS:
            values = [x[key] for _, x in members if key in x]
            if len(values) != len(members):
                continue  # absent (a plain CVAE's BOW) or not computed for every seed
            col[key] = float(np.mean(values))
            col[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
        for run, x in members:
            v_index = validation_index(run)
            col["runs"].append({
                "run": run.name, "seed": run.seed, "best_step": run.best_step,
                "best_validation": v_index, "validations": len(valid_records(run)),
                "trained_steps": run.trained_steps, "early_stopped": run.early_stopped,
                "num_train_steps": run.config.get("num_train_steps"),
                **{key: x[key] for _, key, _ in ROWS if key in x},
            })  # fmt: skip
        out.append(col)
    return out


def valid_records(run: Run) -> list[dict]:
    return [r for r in run.evaluations if "valid_elbo" in r]


def validation_index(run: Run) -> int | None:
    """The best checkpoint's validation, counted from 1."""
    at = [r["step"] for r in valid_records(run)]
    return at.index(run.best_step) + 1 if run.best_step in at else None


def cell(col: dict, key: str, digits: int) -> str:
    if key not in col:
        return "—"
    std = col[f"{key}_std"]
    return f"{col[key]:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def markdown(cols: list[dict]) -> str:
    header = "| | " + " | ".join(f"{c['label']} (n={c['n']})" for c in cols) + " |"
    lines = [header, "|---" + "|---:" * len(cols) + "|"]
    for label, key, digits in ROWS:
        if key.rsplit("_", 1)[0] in OPTIONAL and not any(key in c for c in cols):
            continue  # A-bow/E-bow need word vectors
        if not any(key in c for c in cols) and key != "bow":
            continue
        lines.append(f"| {label} | " + " | ".join(cell(c, key, digits) for c in cols) + " |")
    return "\n".join(lines)


def caption(cols: list[dict], results: list[dict], word_vectors: str) -> str:
    """The checkpoint, length and stopping of every run, the test settings and the data."""
    parts = []
    for c in cols:
        per_run = []
        for r in c["runs"]:
            stop = (
                f"stopped early at validation {r['early_stopped']}"
                if r["early_stopped"] is not None
                else "no early stop"
            )
            per_run.append(
                f"seed {r['seed']}: best at step {r['best_step']} (validation "
                f"{r['best_validation']} of {r['validations']}), {r['trained_steps']} of "
                f"{r['num_train_steps']} steps trained, {stop}"
            )
        parts.append(f"{c['label']}: " + "; ".join(per_run))
    contexts = sorted({int(x["contexts"]) for x in results})
    samples = sorted({int(x["num_samples"]) for x in results})
    vectors = (
        f"A-bow/E-bow with {os.path.basename(word_vectors)}"
        if word_vectors
        else "A-bow/E-bow not computed (no word vectors given)"
    )
    return (
        f"Test split, each run at its best checkpoint: the lowest valid −ELBO, kept by the run "
        f"during training (`best/`). A column of several seeds is mean ± std (ddof 1); n = "
        f"seeds. {'. '.join(parts)}. Rec-P = exp(Rec / #tokens) with z ~ q(z|x, c); KL to "
        f"p(z|c); −ELBO = Rec + KL per response (BOW not included); BOW loss only for CVAE+BoW "
        f"(— for the plain CVAE, which has no BOW head). BLEU (NLTK, smoothing 7) and distinct "
        f"of {'/'.join(map(str, samples))} responses per context sampled from p(z|c), greedy "
        f"decoding, on {'/'.join(map(str, contexts))} contexts, one reference per context "
        f"(the true response); {vectors}. Training data: the SwDA stand-in (~1,100 "
        f"conversations of the 1997 SwDA release instead of the original 2,316; "
        f"`vae_jax.dialog.swda`); valid and test are the original dialogs."
    )


# The paper's claim, per model: cyclical has a higher KL, a lower Rec-P and more diverse
# responses at a BLEU no worse. Each figure with the direction the claim expects.
CLAIM = (("kl", "higher"), ("rec_ppl", "lower"), ("distinct1", "higher"),
         ("distinct2", "higher"), ("bleu4_f1", "no worse"))  # fmt: skip


def claim(cols: list[dict]) -> str:
    """Cyclical against monotonic for each model where both ran, figure by figure: the means,
    whether the claim's direction holds, and whether the gap is within one std (ddof 1)."""
    by_variant = {c["variant"]: c for c in cols}
    labels = {key: label for label, key, _ in ROWS}
    lines = []
    for model, prefix in (("CVAE", "cvae_"), ("CVAE+BoW", "cvae_bow_")):
        m, c = by_variant.get(f"{prefix}monotonic"), by_variant.get(f"{prefix}cyclical")
        if m is None or c is None:
            continue
        parts = []
        for key, expected in CLAIM:
            gap = c[key] - m[key]
            holds = (
                gap < 0 if expected == "lower" else gap > 0 if expected == "higher" else gap >= 0
            )
            spread = max(x for x in (m[f"{key}_std"], c[f"{key}_std"], 0.0) if x is not None)
            noise = " (within one std)" if spread and abs(gap) <= spread else ""
            parts.append(
                f"{labels[key]} {c[key]:.4g} vs {m[key]:.4g}: "
                f"{'as claimed' if holds else 'not as claimed'} ({expected}){noise}"
            )
        lines.append(f"- {model}, C vs M (n = {c['n']}, {m['n']}): " + "; ".join(parts) + ".")
    return "\n".join(lines)


def plot_curves(cols: list[dict], by_name: dict[str, Run], path: str) -> None:
    """Valid KL, valid Rec-P and β per validation of each column: mean, ±std band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = (("valid_kl", "valid KL(q ‖ p(z|c))"), ("valid_rec_ppl", "valid Rec-P"), ("beta", "β"))
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 3.8))
    for c in cols:
        curves = [{r["step"]: r for r in valid_records(by_name[m["run"]])} for m in c["runs"]]
        steps = sorted(set.intersection(*(set(x) for x in curves)))  # a stopped seed ends early
        if not steps:
            continue
        for ax, (key, _) in zip(axes, panels, strict=True):
            values = np.array([[x[s][key] for s in steps] for x in curves])
            mean = values.mean(0)
            style = "-" if "bow" in c["variant"] else "--"  # equal β curves stay visible
            label = f"{c['label']} (n={len(curves)})"
            line = ax.plot(steps, mean, style, marker=".", label=label)
            if len(curves) > 1:
                std = values.std(0, ddof=1)
                ax.fill_between(
                    steps, mean - std, mean + std, alpha=0.25, color=line[0].get_color()
                )
    for ax, (key, title) in zip(axes, panels, strict=True):
        ax.set_title(title)
        ax.set_xlabel("step (validations)")
        if key == "valid_rec_ppl":
            ax.set_yscale("log")
            plain = matplotlib.ticker.FormatStrFormatter("%g")  # 120, not 1.2 × 10²
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def samples_markdown(cols: list[dict], directories: dict[str, str], show: int, seed: int) -> str:
    """``show`` test contexts, drawn with ``seed`` among those every column's seed-0 run (its
    lowest seed) sampled, each with the reference and every column's samples."""
    sampled = {c["label"]: read_samples(directories[c["runs"][0]["run"]]) for c in cols}
    common = sorted(set.intersection(*(set(s) for s in sampled.values())))
    rng = np.random.default_rng(seed)
    rows = sorted(rng.choice(common, min(show, len(common)), replace=False).tolist())
    seeds = ", ".join(f"{c['label']}: seed {c['runs'][0]['seed']}" for c in cols)
    lines = [f"# Sampled responses (test; z ~ p(z|c), greedy; {seeds})", ""]
    for row in rows:
        first = next(iter(sampled.values()))[row]
        lines += [
            f"## test row {row}",
            "```",
            *first["context"],
            f"reference >> {first['reference']}",
        ]
        for label, by_row in sampled.items():
            lines.append(f"-- {label}")
            lines += [f"  sample {k} >> {s}" for k, s in enumerate(by_row[row]["samples"])]
        lines += ["```", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="Runs, sweeps or archives.")
    parser.add_argument("--out", default="experiments/results/dialog")
    parser.add_argument("--archive", help="Also write each run's record (no checkpoint) here.")
    parser.add_argument("--variants", default="", help=f"Columns, of {', '.join(VARIANTS)}.")
    parser.add_argument("--num_samples", type=int, default=5)
    parser.add_argument("--max_contexts", type=int, default=0, help="0: every test context.")
    parser.add_argument("--word_vectors", default="", help="GloVe-format file for A/E-bow.")
    parser.add_argument("--show", type=int, default=5, help="Contexts in samples.md.")
    parser.add_argument("--seed", type=int, default=0, help="Of the samples and the contexts.")
    args = parser.parse_args(argv)
    # Every input is checked before anything is evaluated: a bad one ends in one line.
    try:
        variants = parse_variants(args.variants)
        runs_ = []
        for path in args.paths:
            try:
                dirs = table1_ptb.run_dirs(path)
            except FileNotFoundError as e:
                raise ValueError(f"{e} Expected a dialog run, a sweep or an archive.") from None
            for d in dirs:
                if d != path and not started(d):  # a sweep's run still before its first validation
                    print(f"{d}: not validated yet, left out", file=sys.stderr)
                    continue
                run = read_run(d)
                if run.variant in variants:
                    runs_.append(run)
        if not runs_:
            raise ValueError(f"{args.paths}: no run of the variants {variants}.")
        names = [r.name for r in runs_]
        clash = sorted({n for n in names if names.count(n) > 1})
        if clash:
            raise ValueError(f"two runs share the name(s) {clash}; pass each once.")
        if args.word_vectors and not os.path.exists(args.word_vectors):
            raise ValueError(f"--word_vectors={args.word_vectors}: no such file.")
        wanted = settings(args)
        plans = [plan(r, args.archive, wanted) for r in runs_]
    except ValueError as e:
        parser.exit(2, f"table2_dialog.py: {e}\n")

    vectors = None
    eval_paths = []
    for run, (path, target) in zip(runs_, plans, strict=True):
        if path is None:
            if vectors is None and args.word_vectors:
                from vae_jax.dialog import metrics as dialog_metrics

                data = build.get_data(workdirs.load_config(run.path))
                words = set(data.info["vocab"].words)
                vectors = dialog_metrics.load_word_vectors(args.word_vectors, words)
            print(f"{run.path}: evaluating best (step {run.best_step}) on {SPLIT} …", flush=True)
            path = evaluate_run(run, wanted, target, vectors)
        else:
            print(f"{run.path}: reusing {path} (step {run.best_step})")
        eval_paths.append(path)
        if args.archive:
            write_archive(run, path, args.archive)
    results = [read_json(p) for p in eval_paths]

    cols = columns(runs_, results, variants)
    os.makedirs(args.out, exist_ok=True)
    table = markdown(cols)
    note = caption(cols, results, args.word_vectors)
    check = claim(cols)
    if check:
        claimed = "cyclical: higher KL, lower Rec-P, more diverse responses, BLEU no worse"
        note += f"\n\nThe paper's claim ({claimed}):\n{check}"
    with open(os.path.join(args.out, "table.md"), "w", encoding="utf-8") as f:
        f.write(f"{table}\n\n{note}\n")
    with open(os.path.join(args.out, "table.json"), "w", encoding="utf-8") as f:
        json.dump(cols, f, indent=1, allow_nan=True)
    print(f"{table}\n\n{note}")
    by_name = {r.name: r for r in runs_}
    plot_curves(cols, by_name, os.path.join(args.out, "curves.png"))
    directories = {r.name: os.path.dirname(p) for r, p in zip(runs_, eval_paths, strict=True)}
    with open(os.path.join(args.out, "samples.md"), "w", encoding="utf-8") as f:
        f.write(samples_markdown(cols, directories, args.show, args.seed))
    print(f"Wrote {args.out}/table.md, table.json, curves.png and samples.md.", file=sys.stderr)
    return cols


if __name__ == "__main__":
    main()
