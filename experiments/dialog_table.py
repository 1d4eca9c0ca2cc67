"""Fu et al. (2019) Table 2 layout: the dialog CVAE with a monotonic and a cyclical β.

    python experiments/dialog_table.py runs/swda_monotonic runs/swda_cyclical \
        --out experiments/results/dialog [--checkpoint best|last|STEP] [--split test]
        [--num_samples 5] [--max_contexts 0] [--word_vectors glove.twitter.27B.200d.txt]

Each argument is a dialog run's workdir (`configs/swda.py`). For each, `vae_jax.evaluate`'s
dialog test (`evaluate.evaluate_dialog`: the ELBO figures, then ``--num_samples`` responses per
test context from p(z|c), scored against the true response) at ``--checkpoint``; writes to
``--out``: ``<run>.json`` per run, ``table.md`` (rows: the paper's metrics, Rec-P the response
perplexity and the KL to p(z|c), then BLEU-1…4, A-bow/E-bow where word vectors are given, and
distinct-1/2; columns: the runs), ``curves.png`` (valid KL and response perplexity over
training, from ``metrics.jsonl``) and ``samples.md`` (the same few test contexts, each with
the reference and every run's samples).

Training data is the SwDA stand-in, not the original split (`vae_jax.datasets.swda`): the
table says so.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np

from vae_jax import dialog_metrics, evaluate, responses, runs, writers

ROWS = (
    ("Rec-P ↓", "rec_ppl", "{:.2f}"),
    ("KL(q ‖ p(z|c)) ↑", "kl", "{:.3f}"),
    ("BOW loss", "bow", "{:.2f}"),
    ("−ELBO", "neg_elbo", "{:.2f}"),
    *[
        (f"BLEU-{n} {part[0].upper()}", f"bleu{n}_{part}", "{:.3f}")
        for n in (1, 2, 3, 4)
        for part in ("precision", "recall", "f1")
    ],
    *[
        (f"{name} {part[0].upper()}", f"{key}_{part}", "{:.3f}")
        for name, key in (("A-bow", "a_bow"), ("E-bow", "e_bow"))
        for part in ("precision", "recall", "f1")
    ],
    ("distinct-1", "distinct1", "{:.3f}"),
    ("distinct-2", "distinct2", "{:.3f}"),
)


def run_name(config) -> str:
    return f"CVAE ({config.beta_schedule.name})"


def table(names: list[str], results: list[dict], note: str) -> str:
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, key, fmt in ROWS:
        if not any(key in r for r in results):
            continue
        cells = [fmt.format(r[key]) if key in r else "—" for r in results]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + note + "\n"


def plot_curves(workdirs: list[str], names: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for workdir, name in zip(workdirs, names, strict=True):
        records = [r for r in writers.read_metrics(workdir) if "valid_kl" in r]
        steps = [r["step"] for r in records]
        axes[0].plot(steps, [r["valid_kl"] for r in records], label=name)
        axes[1].plot(steps, [r["valid_rec_ppl"] for r in records], label=name)
        train = [r for r in writers.read_metrics(workdir) if "beta" in r]
        axes[2].plot([r["step"] for r in train], [r["beta"] for r in train], label=name)
    for ax, title in zip(axes, ("valid KL(q ‖ p(z|c))", "valid Rec-P", "β"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+")
    parser.add_argument("--out", default="experiments/results/dialog")
    parser.add_argument("--checkpoint", default="best")
    parser.add_argument("--split", default="test")
    parser.add_argument("--num_samples", type=int, default=5)
    parser.add_argument("--max_contexts", type=int, default=0, help="0: every test context.")
    parser.add_argument("--word_vectors", default="", help="GloVe-format file for A/E-bow.")
    parser.add_argument("--show", type=int, default=8, help="Contexts in samples.md.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for workdir in args.workdirs:  # every argument is checked before anything long runs
        if not os.path.exists(os.path.join(workdir, "config.json")):
            parser.error(f"{workdir}: not a run's workdir (no config.json).")
    os.makedirs(args.out, exist_ok=True)

    vectors = None
    names, results, sampled_all, steps = [], [], [], []
    for workdir in args.workdirs:
        config, data, model, params, info = runs.load_run(workdir, args.checkpoint)
        if vectors is None and args.word_vectors:
            words = set(data.info["vocab"].words)
            vectors = dialog_metrics.load_word_vectors(args.word_vectors, words)
        result, sampled = evaluate.evaluate_dialog(
            model, params, data, args.split, elbo_key=runs.eval_key(config),
            key=jax.random.PRNGKey(args.seed), num_samples=args.num_samples, vectors=vectors,
            max_contexts=args.max_contexts,
        )  # fmt: skip
        name = run_name(config)
        result = {"workdir": workdir, "name": name, "checkpoint_info": info, **result}
        step = info.get("step")
        result["trained_steps"] = max(
            (r["step"] for r in writers.read_metrics(workdir) if "beta" in r), default=0
        )
        names.append(name)
        results.append(result)
        sampled_all.append(sampled)
        steps.append(step)
        slug = name.lower().replace(" ", "_").replace("(", "").replace(")", "")
        with open(os.path.join(args.out, f"{slug}.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, default=str)
        contexts = int(result["contexts"])
        print(f"{workdir}: checkpoint {args.checkpoint} (step {step}), {contexts} contexts")
    vocab = data.info["vocab"]
    trained = ", ".join(
        f"{n}: {r['trained_steps']} steps" for n, r in zip(names, results, strict=True)
    )
    note = (
        f"{args.split} split, checkpoint `{args.checkpoint}` (steps {steps}); trained {trained}. "
        f"{int(results[0]['contexts'])} contexts × {args.num_samples} samples from p(z|c), greedy "
        "decoding, one reference per context (the true response). Training data: the SwDA "
        "stand-in (~1,100 dialogs instead of the original 2,316; `vae_jax.datasets.swda`). "
        + ("" if vectors else "A-bow/E-bow not computed: no word vectors were given. ")
    )
    markdown = table(names, results, note)
    with open(os.path.join(args.out, "table.md"), "w", encoding="utf-8") as f:
        f.write(markdown)
    print(markdown)
    plot_curves(args.workdirs, names, os.path.join(args.out, "curves.png"))

    rng = np.random.default_rng(args.seed)
    show = sorted(rng.choice(len(sampled_all[0]), min(args.show, len(sampled_all[0])), False))
    lines = [f"# Sampled responses ({args.split}, {args.num_samples} per context)", ""]
    for i in show:
        base = sampled_all[0][i]
        lines.append(f"## {args.split} row {base['row']}")
        lines.append("```")
        context = responses.format_result({**base, "samples": []}, vocab)
        lines.append(context)
        for name, sampled in zip(names, sampled_all, strict=True):
            lines.append(f"  -- {name}")
            for s, ids in enumerate(sampled[i]["samples"]):
                lines.append(f"  sample {s} >> {' '.join(responses.words(ids, vocab))}")
        lines += ["```", ""]
    with open(os.path.join(args.out, "samples.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    print(f"Wrote {args.out}/table.md, curves.png, samples.md and one JSON per run.")


if __name__ == "__main__":
    main()
