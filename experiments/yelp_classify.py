"""Table 3 of Fu et al. (2019): sentiment accuracy of a linear classifier on pre-trained features.

    python experiments/yelp_classify.py runs/yelp_ae runs/yelp_monotonic runs/yelp_cyclical \
        --out experiments/results/yelp [--sizes 100,500,1000,2000,10000,all] [--seeds 5]
        [--steps 100000] [--checkpoint auto] [--finetune_encoder --steps 3000 --eval_every 500]

For each pre-trained run (`configs/yelp.py`; any workdir of a labelled corpus): the encoder's
posterior mean μ(x) of every sentence (the encoder frozen, as in the official ``semi/*_ft.py``),
then for each labelled-set size n and seed s a class-balanced draw of n training sentences
(n/2 per class; ``all``: the whole training split) and a linear classifier p(y=1|x) =
σ(wᵀμ(x) + b) trained on them with sigmoid cross-entropy, Adam 1e-4, minibatches of 32 drawn
with replacement, for ``--steps`` steps; the dev accuracy is checked every ``--eval_every``
steps and the test accuracy reported is the one at the best dev accuracy (the first such
check). Every seed's classifier trains at once (`jax.vmap`). Writes ``<run name>.json`` per run,
``table.md`` (mean ± std over seeds, with the test split's majority-class baseline) and
``accuracy.png`` (test accuracy against n) under ``--out``.

``--finetune_encoder`` trains the encoder with the classifier (the paper's blog speaks of
fine-tuning): the same loss, minibatches and model selection, the gradient reaching every
encoder parameter (each seed its own copy, from the pre-trained values; the decoder is unused),
μ(x) standardised with the labelled set's statistics under the pre-trained encoder. The run's
JSON and the table say which protocol was used.

Deviations from the official protocol: its labelled set is one random (not class-balanced)
draw of 10% of the training split with one seed, it trains 1,000–3,000 epochs, and it feeds μ
as it is; here each feature is standardised with the labelled set's mean and standard
deviation (a fixed-step optimiser then behaves the same whatever the features' scale).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vae_jax import host, models, runs

SIZES = (100, 500, 1000, 2000, 10000, "all")


def features(model, params, batches, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """μ(x) and the labels of every real row of ``batches`` (dicts with tokens and labels)."""
    encode = jax.jit(lambda t: model.apply({"params": params}, t, method=models.VAE.encode)[0])
    mus, labels = [], []
    for batch in batches:
        real = batch["labels"] >= 0
        mus.append(np.asarray(encode(batch["tokens"]))[real])
        labels.append(batch["labels"][real])
    return np.concatenate(mus), np.concatenate(labels)


def train_batches(data) -> list[dict]:
    """The training split once, in the file's length order, with labels."""
    batcher = data.info["batcher"]
    if batcher.labels is None:
        raise ValueError("yelp_classify: the run's corpus has no labels.")
    return [batcher.batch(b) for b in batcher.plan()]


def balanced_subset(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n indices, n/2 of each class (without replacement)."""
    per_class = n // 2
    picks = []
    for c in (0, 1):
        pool = np.flatnonzero(labels == c)
        if per_class > len(pool):
            raise ValueError(f"--sizes: {n} needs {per_class} of class {c}, has {len(pool)}.")
        picks.append(rng.choice(pool, per_class, replace=False))
    return np.concatenate(picks)


def select_by_dev(
    subsets: np.ndarray, setup, *, steps: int, eval_every: int, lr: float, seed: int
) -> list[dict]:
    """Trains one classifier per row of ``subsets`` (S, n), all at once (`jax.vmap`), and
    selects each by dev accuracy. ``setup(subset)`` gives the initial parameters, the loss
    ``loss(p, idx)`` of the rows ``idx`` and ``checks(p)`` = (dev, test accuracy); Adam at
    ``lr`` on minibatches of 32 drawn with replacement from the subset, checked every
    ``eval_every`` steps. Returns each one's best dev accuracy (the first such check), that
    check's step and its test accuracy."""
    tx = optax.adam(lr)

    def run(subset, key):
        params, loss, checks = setup(subset)

        def chunk(carry, k):
            def step(carry, key):
                params, opt_state = carry
                idx = subset[jax.random.randint(key, (32,), 0, subset.shape[0])]
                updates, opt_state = tx.update(jax.grad(loss)(params, idx), opt_state)
                return (optax.apply_updates(params, updates), opt_state), None

            keys = jax.random.split(jax.random.fold_in(key, k), eval_every)
            carry, _ = jax.lax.scan(step, carry, keys)
            return carry, checks(carry[0])

        init = (params, tx.init(params))
        _, (dev_acc, test_acc) = jax.lax.scan(chunk, init, jnp.arange(steps // eval_every))
        best = jnp.argmax(dev_acc)  # the first of the best
        return dev_acc[best], test_acc[best], (best + 1) * eval_every

    keys = jax.random.split(jax.random.PRNGKey(seed), subsets.shape[0])
    dev_best, test_at_best, step = jax.jit(jax.vmap(run))(jnp.asarray(subsets), keys)
    return [
        {"dev_acc": float(d), "test_acc": float(t), "step": int(s)}
        for d, t, s in zip(dev_best, test_at_best, step, strict=True)
    ]


def fit_probes(
    train_x: np.ndarray,
    train_y: np.ndarray,
    subsets: np.ndarray,
    dev: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    **fit,
) -> list[dict]:
    """One linear probe on the frozen features per row of ``subsets`` (`select_by_dev`)."""
    x = jnp.asarray(train_x)
    y = jnp.asarray(train_y, jnp.float32)
    dev_x, dev_y = jnp.asarray(dev[0]), jnp.asarray(dev[1])
    test_x, test_y = jnp.asarray(test[0]), jnp.asarray(test[1])

    def setup(subset):
        # Standardised with the labelled set's own statistics: Adam's fixed step then means
        # the same for every feature scale (posterior means can be tiny).
        mean = jnp.mean(x[subset], axis=0)
        scale = jnp.std(x[subset], axis=0) + 1e-6

        def logits(p, xs):
            return ((xs - mean) / scale) @ p["w"] + p["b"]

        def accuracy(p, xs, ys):
            return jnp.mean((logits(p, xs) > 0).astype(jnp.int32) == ys)

        def loss(p, idx):
            return jnp.mean(optax.sigmoid_binary_cross_entropy(logits(p, x[idx]), y[idx]))

        params = {"w": jnp.zeros((x.shape[1],)), "b": jnp.zeros(())}
        return params, loss, lambda p: (accuracy(p, dev_x, dev_y), accuracy(p, test_x, test_y))

    return select_by_dev(subsets, setup, **fit)


def rows(batches) -> tuple[np.ndarray, np.ndarray]:
    """The token rows (padded to one length) and labels of every real row of ``batches``."""
    length = max(b["tokens"].shape[1] for b in batches)
    tokens, labels = [], []
    for b in batches:
        real = b["labels"] >= 0
        tokens.append(np.pad(b["tokens"][real], ((0, 0), (0, length - b["tokens"].shape[1]))))
        labels.append(b["labels"][real])
    return np.concatenate(tokens), np.concatenate(labels)


def fit_finetuned(
    model,
    params,
    train: tuple[np.ndarray, np.ndarray],
    subsets: np.ndarray,
    dev: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    eval_batch: int = 1024,
    **fit,
) -> list[dict]:
    """`fit_probes` with the encoder trained too: p(y=1|x) = σ(wᵀ(μ_θ(x) − m)/s + b), θ
    starting at the pre-trained encoder (one copy per row of ``subsets``), (m, s) the labelled
    set's feature statistics under it."""
    x, y = jnp.asarray(train[0]), jnp.asarray(train[1], jnp.float32)
    dev_x, dev_y = jnp.asarray(dev[0]), jnp.asarray(dev[1])
    test_x, test_y = jnp.asarray(test[0]), jnp.asarray(test[1])

    def mu(theta, tokens):
        return model.apply({"params": theta}, tokens, method=models.VAE.encode)[0]

    def setup(subset):
        initial = mu(params, x[subset])
        mean, scale = jnp.mean(initial, axis=0), jnp.std(initial, axis=0) + 1e-6

        def logits(p, tokens):
            return ((mu(p["encoder"], tokens) - mean) / scale) @ p["w"] + p["b"]

        def accuracy(p, xs, ys):
            hits = 0
            for lo in range(0, xs.shape[0], eval_batch):  # static chunks: bounded memory
                hit = (logits(p, xs[lo : lo + eval_batch]) > 0).astype(jnp.int32)
                hits += jnp.sum(hit == ys[lo : lo + eval_batch])
            return hits / xs.shape[0]

        def loss(p, idx):
            return jnp.mean(optax.sigmoid_binary_cross_entropy(logits(p, x[idx]), y[idx]))

        p = {"encoder": params, "w": jnp.zeros((initial.shape[1],)), "b": jnp.zeros(())}
        return p, loss, lambda p: (accuracy(p, dev_x, dev_y), accuracy(p, test_x, test_y))

    return select_by_dev(subsets, setup, **fit)


def classify_run(workdir: str, args) -> dict:
    config, data, model, params, info = runs.load_run(workdir, args.checkpoint)
    if args.finetune_encoder:
        train_xy = rows(train_batches(data))
        dev, test = rows(data.eval_splits["valid"]), rows(data.eval_splits["test"])
        train_x, train_y = train_xy
    else:
        train_x, train_y = features(model, params, train_batches(data))
        dev = features(model, params, data.eval_splits["valid"])
        test = features(model, params, data.eval_splits["test"])
    majority = float(max(np.mean(test[1]), 1 - np.mean(test[1])))
    result = {
        "workdir": workdir,
        "checkpoint": info["checkpoint"],
        "checkpoint_step": info.get("step"),
        "beta_schedule": config.beta_schedule.name,
        "deterministic": bool(config.model.get("deterministic", False)),
        "objective": config.get("objective", "beta_elbo"),
        "init_from": config.get("init_from", ""),
        "test_majority_baseline": majority,
        "protocol": "encoder fine-tuned" if args.finetune_encoder else "encoder frozen",
        "sizes": {},
    }
    for size in args.sizes:
        rng = np.random.default_rng(args.seed)
        if size == "all":
            subsets = np.tile(np.arange(len(train_y)), (args.seeds, 1))
        else:
            subsets = np.stack([balanced_subset(train_y, size, rng) for _ in range(args.seeds)])
        fit = dict(steps=args.steps, eval_every=args.eval_every, lr=args.lr, seed=args.seed)
        if args.finetune_encoder:
            probes = fit_finetuned(model, params, (train_x, train_y), subsets, dev, test, **fit)
        else:
            probes = fit_probes(train_x, train_y, subsets, dev, test, **fit)
        accs = [p["test_acc"] for p in probes]
        result["sizes"][str(size)] = {
            "n": int(subsets.shape[1]),
            "test_acc_mean": float(np.mean(accs)),
            "test_acc_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else None,
            "probes": probes,
        }
        print(f"{workdir} n={size}: test acc {np.mean(accs):.4f} ± {np.std(accs):.4f}", flush=True)
    return result


def run_label(result: dict) -> str:
    name = "AE" if result["deterministic"] else f"VAE, {result['beta_schedule']}"
    if result.get("objective", "beta_elbo") != "beta_elbo":
        name += " + " + result["objective"].replace("_", " ")
    if result.get("init_from"):
        name += f" (from {os.path.basename(os.path.normpath(result['init_from']))})"
    if result.get("protocol") == "encoder fine-tuned":
        name += " (fine-tuned)"
    return name


def table(results: list[dict]) -> str:
    sizes = list(results[0]["sizes"])
    lines = [
        "| features | " + " | ".join(f"n = {s}" for s in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
    ]
    for r in results:
        cells = []
        for s in sizes:
            mean, std = r["sizes"][s]["test_acc_mean"], r["sizes"][s]["test_acc_std"]
            cells.append(f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else ""))
        lines.append(f"| {run_label(r)} | " + " | ".join(cells) + " |")
    majority = results[0]["test_majority_baseline"]
    lines.append(
        f"\nTest accuracy (%) at the best dev accuracy; majority class {100 * majority:.1f}%."
    )
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for r in results:
        ns = [v["n"] for v in r["sizes"].values()]
        means = np.array([v["test_acc_mean"] for v in r["sizes"].values()])
        stds = np.array([v["test_acc_std"] or 0.0 for v in r["sizes"].values()])
        ax.errorbar(ns, 100 * means, yerr=100 * stds, label=run_label(r), capsize=3, marker="o")
    ax.axhline(100 * results[0]["test_majority_baseline"], color="gray", ls=":", label="majority")
    ax.set_xscale("log")
    ax.set_xlabel("labelled training sentences")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_sizes(text: str) -> list:
    sizes = []
    for part in text.split(","):
        if part == "all":
            sizes.append("all")
            continue
        if not part.isdigit() or int(part) < 2 or int(part) % 2:
            raise argparse.ArgumentTypeError(f"--sizes: {part!r} is not 'all' or an even n >= 2")
        sizes.append(int(part))
    return sizes


def recorded_args(args) -> dict:
    return {k: str(v) for k, v in vars(args).items()}


def _settings(recorded: dict) -> dict:
    """What decides a run's result: every argument but the list of runs and --out."""
    return {k: v for k, v in recorded.items() if k not in ("workdirs", "out")}


def previous_result(path: str, workdir: str, args) -> dict | None:
    """The result at ``path`` if it was computed for ``workdir`` with the same arguments (the
    list of workdirs and --out aside), so that re-running a table with one run added only
    classifies that run."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        previous = json.load(f)
    same = _settings(previous.get("args", {})) == _settings(recorded_args(args))
    if previous.get("workdir") != workdir or not same:
        return None
    return previous


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", help="Pre-trained runs (configs/yelp.py).")
    parser.add_argument("--out", required=True)
    parser.add_argument("--sizes", type=parse_sizes, default=list(SIZES))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--eval_every", type=int, default=1_000)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--checkpoint", default="auto")
    parser.add_argument(
        "--finetune_encoder", action="store_true", help="Train the encoder with the classifier."
    )
    args = parser.parse_args()
    if args.seeds < 1 or args.steps < args.eval_every or args.eval_every < 1:
        parser.error("need --seeds >= 1 and --steps >= --eval_every >= 1")
    host.tune_cpu_host()
    os.makedirs(args.out, exist_ok=True)
    results = []
    for workdir in args.workdirs:
        name = os.path.basename(os.path.normpath(workdir))
        path = os.path.join(args.out, f"{name}.json")
        result = previous_result(path, workdir, args)
        if result is None:
            result = classify_run(workdir, args)
            with open(path, "w", encoding="utf-8") as f:
                json.dump({**result, "args": recorded_args(args)}, f, indent=1)
        else:
            print(f"{workdir}: reusing {path} (same arguments)", file=sys.stderr)
        results.append(result)
    text = table(results)
    print(text)
    with open(os.path.join(args.out, "table.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    plot(results, os.path.join(args.out, "accuracy.png"))
    print(f"wrote {args.out}/table.md, accuracy.png", file=sys.stderr)


if __name__ == "__main__":
    main()
