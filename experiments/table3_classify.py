"""Table 3 of Fu et al. (2019): sentiment accuracy of a linear classifier on pre-trained features.

    python experiments/table3_classify.py runs/yelp/yelp-*.seed-*/ --out runs/yelp_classified \
        [--protocol balanced|official] [--checkpoint best|last|<step>|epoch:<E>[,…]]
        [--cycle_ends [E1,E2,…]] [--draws 5] [--sizes 100,500,1000,2000,10000,all]
        [--steps 100000] [--epochs 3000] [--finetune_encoder --steps 3000 --eval_every 500]

For each pre-trained run (`configs/yelp.py`; any workdir of a labelled corpus) and each checkpoint
asked for: the encoder's posterior mean μ(x) of every sentence (the encoder frozen, as in the
official ``semi/*_ft.py``), then a linear classifier p(y=1|x) = σ(wᵀf(x) + b) trained with
sigmoid cross-entropy and Adam on ``--draws`` labelled sets at once (`jax.vmap`), the test
accuracy reported being the one at the best dev accuracy (the first such check).

``--protocol=balanced`` (default): for each size n in ``--sizes`` a class-balanced draw of n
training sentences (n/2 per class; ``all``: the whole training split), f(x) = (μ(x) − m)/s with
the labelled set's mean m and standard deviation s (a fixed-step optimiser then behaves the same
whatever the features' scale), w = b = 0, lr 1e-4 constant, minibatches of 32 drawn with
replacement for ``--steps`` steps, dev accuracy every ``--eval_every`` steps.

``--protocol=official`` (``semi/semi_yelp_*_ft.py``): one random, not class-balanced, draw of
⌊N/10⌋ of the N training sentences without replacement (4,440 of 44,409), f(x) = μ(x) raw,
w ~ U(±√(6/(d+1))) (Xavier), b = 0.001, lr_t = 1e-4 · 0.99^(t / (100 E)) with E = ⌊n/32⌋ steps
an epoch (TF's exponential decay, not staircase: × 0.99 per 100 epochs), ``--epochs`` (3,000)
epochs of the labelled set reshuffled into E minibatches of 32 (the remainder dropped), dev and
test accuracy after every epoch. Deviation: dev and test accuracy are over the whole splits (the
official loop scores shuffled full minibatches of 32, leaving out up to 31 sentences).

Checkpoints (``--checkpoint``, comma-separated): ``best`` (the run's ``best/``: lowest valid PPL
bound, Rec for the autoencoder; the official selection), ``last``, a step, ``epoch:<E>`` (step
E × steps an epoch, the runs keeping every ``config.checkpoint_keep_every_epochs``-th epoch);
``auto`` (default of the balanced protocol) is best where saved, else last; the official
protocol's default is best. ``--cycle_ends`` adds every kept epoch (10, 20, …, num_epochs) or
the epochs listed. Every run and checkpoint is checked before any feature is computed: an unknown
protocol, a missing checkpoint or an unlabelled corpus ends in one line naming what is missing
and what exists.

Writes ``<out>/<run>/<protocol>.<checkpoint>.json`` per run and checkpoint (reused when re-run
with the same arguments at the same step), ``<out>/table.md`` (mean ± std over draws) and, for
the balanced protocol, ``<out>/accuracy.png`` (test accuracy against n). `table3_yelp.py` archives
the runs beside these results and builds Table 3 over pre-training seeds.

``--finetune_encoder`` (balanced protocol only) trains the encoder with the classifier (the
paper's blog speaks of fine-tuning): the same loss, minibatches and model selection, the gradient
reaching every encoder parameter (each draw its own copy, from the pre-trained values; the
decoder is unused), μ(x) standardised with the labelled set's statistics under the pre-trained
encoder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vae_jax.core import models
from vae_jax.data import text
from vae_jax.run import build, checkpoints, host, workdirs, writers

PROTOCOLS = ("balanced", "official")
OFFICIAL_FRACTION = 10  # percent of the training split the official labelled set draws
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
        raise ValueError("table3_classify: the run's corpus has no labels.")
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


# --- The official protocol (semi/semi_yelp_*_ft.py) -----------------------------------------


def official_subsets(num_train: int, draws: int, seed: int) -> np.ndarray:
    """(draws, ⌊num_train · 10/100⌋) indices: each row one uniform draw without replacement,
    not class-balanced, as the official ``np.random.choice(N, N·10/100, replace=False)``."""
    rng = np.random.default_rng(seed)
    n = num_train * OFFICIAL_FRACTION // 100
    return np.stack([rng.choice(num_train, n, replace=False) for _ in range(draws)])


def official_lr(
    lr: float, steps_per_epoch: int, decay_rate: float = 0.99, decay_epochs: int = 100
) -> optax.Schedule:
    """lr_t = lr · rate^(t / (decay_epochs · E)): TF's ``exponential_decay`` without staircase,
    with the official ``decay_steps = int(epoch_t · decay_ep)``."""
    return optax.exponential_decay(lr, steps_per_epoch * decay_epochs, decay_rate)


def fit_official(
    train_x: np.ndarray,
    train_y: np.ndarray,
    subsets: np.ndarray,
    dev: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    epochs: int,
    lr: float = 1e-4,
    seed: int = 0,
    batch_size: int = 32,
) -> tuple[list[dict], dict[str, np.ndarray]]:
    """One classifier p(y=1|μ) = σ(wᵀμ + b) on the raw features per row of ``subsets``, all at
    once (`jax.vmap`): Adam with `official_lr`, each epoch the labelled set reshuffled into
    ⌊n/32⌋ minibatches, then dev and test accuracy. Returns per row the best dev accuracy (the
    first epoch reaching it: the official ``>``), that epoch (1-based), its test accuracy and the
    last epoch's; and the parameters of the best epochs, {"w": (rows, d), "b": (rows,)}."""
    x = jnp.asarray(train_x, jnp.float32)
    y = jnp.asarray(train_y, jnp.float32)
    dev_x, dev_y = jnp.asarray(dev[0], jnp.float32), jnp.asarray(dev[1])
    test_x, test_y = jnp.asarray(test[0], jnp.float32), jnp.asarray(test[1])
    n, d = subsets.shape[1], x.shape[1]
    per_epoch = n // batch_size
    if per_epoch < 1:
        raise ValueError(f"the official protocol needs at least {batch_size} labels, has {n}.")
    tx = optax.adam(official_lr(lr, per_epoch))

    def loss(p, xs, ys):
        return jnp.mean(optax.sigmoid_binary_cross_entropy(xs @ p["w"] + p["b"], ys))

    def accuracy(p, xs, ys):
        return jnp.mean(((xs @ p["w"] + p["b"]) > 0).astype(jnp.int32) == ys)

    def run(subset, key):
        xs, ys = x[subset], y[subset]
        init_key, key = jax.random.split(key)
        limit = np.sqrt(6.0 / (d + 1))  # Xavier uniform of a (d, 1) kernel
        params = {"w": jax.random.uniform(init_key, (d,), minval=-limit, maxval=limit),
                  "b": jnp.asarray(0.001)}  # fmt: skip

        def step(carry, idx):
            p, opt_state = carry
            updates, opt_state = tx.update(jax.grad(loss)(p, xs[idx], ys[idx]), opt_state)
            return (optax.apply_updates(p, updates), opt_state), None

        def epoch(carry, e):
            p, opt_state, best = carry
            order = jax.random.permutation(jax.random.fold_in(key, e), n)
            batches = order[: per_epoch * batch_size].reshape(per_epoch, batch_size)
            (p, opt_state), _ = jax.lax.scan(step, (p, opt_state), batches, unroll=2)
            dev_acc = accuracy(p, dev_x, dev_y)
            # Only the best epoch's test accuracy is reported: its parameters are kept and
            # scored once at the end (the official loop scores the test split every epoch).
            now = (dev_acc, e + 1, p)
            best = jax.tree.map(lambda a, b: jnp.where(dev_acc > best[0], a, b), now, best)
            return (p, opt_state, best), None

        best = (jnp.asarray(-1.0), jnp.asarray(0), params)
        (last, _, best), _ = jax.lax.scan(
            epoch, (params, tx.init(params), best), jnp.arange(epochs)
        )
        dev_acc, at, kept = best
        tests = accuracy(kept, test_x, test_y), accuracy(last, test_x, test_y)
        return (dev_acc, tests[0], at, kept), tests[1]

    keys = jax.random.split(jax.random.PRNGKey(seed), subsets.shape[0])
    (dev_best, test_at_best, at, params), last = jax.jit(jax.vmap(run))(jnp.asarray(subsets), keys)
    probes = [
        {"dev_acc": float(v), "test_acc": float(t), "epoch": int(e), "last_test_acc": float(z)}
        for v, t, e, z in zip(dev_best, test_at_best, at, last, strict=True)
    ]
    return probes, jax.tree.map(np.asarray, params)


# --- Which checkpoints, checked before any feature is computed ------------------------------


class BadInput(ValueError):
    """A protocol, run or checkpoint this script cannot score: one line says what and why."""


def run_steps_per_epoch(workdir: str) -> int | None:
    """Training steps an epoch, from the run's evaluation records (step / epoch)."""
    path = os.path.join(workdir, workdirs.METRICS)
    if not os.path.exists(path):
        return None
    for record in writers.read_metrics(workdir):
        if record.get("epoch"):
            return round(record["step"] / record["epoch"])
    return None


def saved_checkpoints(workdir: str) -> tuple[int | None, list[int], int | None]:
    """(step of ``best/`` or None, the periodic checkpoints' steps, steps an epoch or None)."""
    best = None
    info = os.path.join(workdir, workdirs.BEST, checkpoints.INFO)
    params = os.path.join(workdir, workdirs.BEST, checkpoints.PARAMS)
    if os.path.exists(info) and os.path.exists(params):
        with open(info, encoding="utf-8") as f:
            best = json.load(f).get("step")
    # orbax writes a checkpoint under a temporary name and renames it to its step once complete:
    # the directories named by a number are the finished ones (listed without orbax's manager,
    # whose read-only warnings would break the one-line errors below).
    folder = os.path.join(workdir, checkpoints.CHECKPOINTS)
    names = os.listdir(folder) if os.path.isdir(folder) else []
    steps = sorted(int(n) for n in names if n.isdigit())
    return best, steps, run_steps_per_epoch(workdir)


def describe_saved(best: int | None, steps: list[int], per_epoch: int | None) -> str:
    """What a run has, for an error: "best (step 88); epochs 1, 2; last step 88"."""
    parts = [] if best is None else [f"best (step {best})"]
    epochs = [s // per_epoch for s in steps if per_epoch and s % per_epoch == 0]
    others = [s for s in steps if not (per_epoch and s % per_epoch == 0)]
    if epochs:
        parts.append("epochs " + ", ".join(map(str, epochs)))
    if others:
        parts.append("steps " + ", ".join(map(str, others)))
    if steps:
        parts.append(f"last step {steps[-1]}")
    return "; ".join(parts) or "no checkpoint"


def parse_checkpoint(name: str) -> str:
    """``auto``, ``best``, ``last``, a step or ``epoch:<E>``, else `BadInput`."""
    if name in ("auto", "best", "last") or name.isdigit():
        return name
    if name.startswith("epoch:") and name[6:].isdigit() and int(name[6:]) > 0:
        return name
    raise BadInput(f"--checkpoint={name}: not best, last, auto, a step or epoch:<E>.")


def cycle_end_epochs(config, spec: str) -> list[int]:
    """The epochs ``--cycle_ends`` asks for: those listed, or (``all``) every kept one,
    k · checkpoint_keep_every_epochs ≤ num_epochs."""
    if spec != "all":
        epochs = spec.split(",")
        if not all(e.isdigit() and int(e) > 0 for e in epochs):
            raise BadInput(f"--cycle_ends={spec}: not a list of epochs such as 10,20,30.")
        return [int(e) for e in epochs]
    every = config.get("checkpoint_keep_every_epochs", 0)
    if every <= 0 or config.get("num_epochs", -1) <= 0:
        raise BadInput(
            f"--cycle_ends: the run keeps no epochs (checkpoint_keep_every_epochs={every}, "
            f"num_epochs={config.get('num_epochs')}); list them, e.g. --cycle_ends=10,20."
        )
    return list(range(every, config.num_epochs + 1, every))


def resolve(workdir: str, wanted: list[str], protocol: str) -> list[tuple[str, str, int]]:
    """(label, what `build.load_run` is given, step) of each checkpoint ``wanted`` of a run;
    `BadInput` naming what is missing and what exists, for a run of an unlabelled corpus or a
    checkpoint it does not have."""
    try:
        config = workdirs.load_config(workdir)
    except FileNotFoundError as e:
        raise BadInput(str(e)) from None
    spec = text.CORPORA.get(config.data.name)
    if spec is None or not spec.labelled:
        labelled = sorted(n for n, s in text.CORPORA.items() if s.labelled)
        raise BadInput(f"{workdir}: its corpus {config.data.name!r} has no labels to classify; "
                       f"labelled corpora: {', '.join(labelled)}.")  # fmt: skip
    best, steps, per_epoch = saved_checkpoints(workdir)
    have = describe_saved(best, steps, per_epoch)
    out = []
    for name in wanted:
        if name == "auto":
            name = "best" if best is not None else "last"
        if name == "best":
            if best is None:
                raise BadInput(f"{workdir}: no best checkpoint ({workdirs.BEST}/) for --protocol="
                               f"{protocol}; it has {have}.")  # fmt: skip
            out.append(("best", "best", best))
        elif name == "last":
            if not steps:
                raise BadInput(f"{workdir}: no periodic checkpoint for 'last'; it has {have}.")
            out.append(("last", str(steps[-1]), steps[-1]))
        elif name.startswith("epoch:"):
            epoch = int(name[6:])
            if per_epoch is None or epoch * per_epoch not in steps:
                where = f" (step {epoch * per_epoch})" if per_epoch else ""
                raise BadInput(f"{workdir}: no checkpoint at the end of epoch {epoch}{where} "
                               f"for --protocol={protocol}; it has {have}.")  # fmt: skip
            out.append((f"epoch-{epoch}", str(epoch * per_epoch), epoch * per_epoch))
        else:
            if int(name) not in steps:
                raise BadInput(f"{workdir}: no checkpoint at step {name}; it has {have}.")
            out.append((f"step-{int(name)}", str(int(name)), int(name)))
    return out


def wanted_checkpoints(workdir: str, args) -> list[str]:
    """The checkpoint names ``--checkpoint`` and ``--cycle_ends`` ask of a run."""
    names = [] if args.checkpoint is None else args.checkpoint.split(",")
    if args.cycle_ends:
        epochs = cycle_end_epochs(workdirs.load_config(workdir), args.cycle_ends)
        names += [f"epoch:{e}" for e in epochs]
    if not names:
        names = ["best" if args.protocol == "official" else "auto"]
    return [parse_checkpoint(n) for n in dict.fromkeys(names)]


def preflight(args) -> dict[str, list[tuple[str, str, int]]]:
    """Every run's checkpoints to score (`resolve`), all checked before any is scored."""
    if args.protocol not in PROTOCOLS:
        raise BadInput(f"--protocol={args.protocol}: unknown; protocols: {', '.join(PROTOCOLS)}.")
    if args.protocol == "official" and args.finetune_encoder:
        raise BadInput("--finetune_encoder: only with --protocol=balanced.")
    plan = {}
    for workdir in args.workdirs:
        if not os.path.exists(os.path.join(workdir, workdirs.CONFIG)):
            raise BadInput(f"{workdir}: not a run (no {workdirs.CONFIG}).")
        plan[workdir] = resolve(workdir, wanted_checkpoints(workdir, args), args.protocol)
    return plan


# --- One run at one checkpoint ------------------------------------------------------------------


def classify(workdir: str, load: str, label: str, args) -> dict:
    """The result of ``args.protocol`` on the features of one checkpoint of one run (``load``,
    for `build.load_run`; ``label``: its name in results, e.g. ``best`` or ``epoch-10``)."""
    start = time.time()
    config, data, model, params, info = build.load_run(workdir, load)
    print(f"{workdir}: features at checkpoint {load} (step {info.get('step')})", file=sys.stderr)
    if args.finetune_encoder:
        train_x, train_y = rows(train_batches(data))
        dev, test = rows(data.eval_splits["valid"]), rows(data.eval_splits["test"])
    else:
        train_x, train_y = features(model, params, train_batches(data))
        dev = features(model, params, data.eval_splits["valid"])
        test = features(model, params, data.eval_splits["test"])
    seconds = {"features": time.time() - start}
    majority = float(max(np.mean(test[1]), 1 - np.mean(test[1])))
    result = {
        "workdir": workdir,
        "checkpoint": label,
        "checkpoint_step": info.get("step"),
        "checkpoint_epoch": info.get("epoch"),
        "beta_schedule": config.beta_schedule.name,
        "deterministic": bool(config.model.get("deterministic", False)),
        "objective": config.get("objective", "beta_elbo"),
        "init_from": config.get("init_from", ""),
        "seed": config.get("seed"),
        "test_majority_baseline": majority,
        "train_size": len(train_y),
        "protocol": args.protocol,
        "encoder": "fine-tuned" if args.finetune_encoder else "frozen",
        "sizes": {},
    }
    if args.protocol == "official":
        start = time.time()
        subsets = official_subsets(len(train_y), args.seeds, args.seed)
        probes, _ = fit_official(
            train_x, train_y, subsets, dev, test, epochs=args.epochs, lr=args.lr, seed=args.seed
        )
        seconds["classifier"] = time.time() - start
        result["sizes"][f"{OFFICIAL_FRACTION}%"] = summary(subsets, probes)
        result["label_fraction"] = [float(np.mean(train_y[s])) for s in subsets]
        report(workdir, load, f"{OFFICIAL_FRACTION}%", probes)
    for size in args.sizes if args.protocol == "balanced" else ():
        start = time.time()
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
        seconds[f"classifier n={size}"] = time.time() - start
        result["sizes"][str(size)] = summary(subsets, probes)
        report(workdir, load, size, probes)
    result["seconds"] = seconds
    return result


def summary(subsets: np.ndarray, probes: list[dict]) -> dict:
    """Mean and standard deviation (ddof 1) of the test accuracy over the draws."""
    accs = [p["test_acc"] for p in probes]
    return {
        "n": int(subsets.shape[1]),
        "test_acc_mean": float(np.mean(accs)),
        "test_acc_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else None,
        "probes": probes,
    }


def report(workdir: str, load: str, size, probes: list[dict]) -> None:
    accs = [p["test_acc"] for p in probes]
    print(f"{workdir} @{load} n={size}: test acc {np.mean(accs):.4f} ± {np.std(accs):.4f}",
          flush=True)  # fmt: skip


# --- The invocation's table ---------------------------------------------------------------------


def run_label(result: dict) -> str:
    name = "AE" if result["deterministic"] else f"VAE, {result['beta_schedule']}"
    if result.get("objective", "beta_elbo") != "beta_elbo":
        name += " + " + result["objective"].replace("_", " ")
    if result.get("init_from"):
        name += f" (from {os.path.basename(os.path.normpath(result['init_from']))})"
    if result.get("encoder") == "fine-tuned" or result.get("protocol") == "encoder fine-tuned":
        name += " (fine-tuned)"
    return name


def protocol_of(result: dict) -> str:
    """``balanced`` or ``official``; results from before the official protocol are balanced."""
    return result.get("protocol") if result.get("protocol") in PROTOCOLS else "balanced"


def table(results: list[dict]) -> str:
    """One Markdown table per protocol: a row per run and checkpoint, mean ± std over draws."""
    blocks = []
    for protocol in PROTOCOLS:
        chosen = [r for r in results if protocol_of(r) == protocol]
        if not chosen:
            continue
        sizes = list(dict.fromkeys(s for r in chosen for s in r["sizes"]))
        lines = [
            f"{protocol} protocol\n",
            "| features | run | checkpoint | " + " | ".join(f"n = {s}" for s in sizes) + " |",
            "|---|---|---|" + "---:|" * len(sizes),
        ]
        for r in chosen:
            cells = []
            for s in sizes:
                if s not in r["sizes"]:
                    cells.append("—")
                    continue
                mean, std = r["sizes"][s]["test_acc_mean"], r["sizes"][s]["test_acc_std"]
                spread = "" if std is None else f" ± {100 * std:.1f}"
                cells.append(f"{100 * mean:.1f}{spread}")
            name = os.path.basename(os.path.normpath(r["workdir"]))
            where = f"{r['checkpoint']} (step {r['checkpoint_step']})"
            lines.append(f"| {run_label(r)} | {name} | {where} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    majority = results[0]["test_majority_baseline"]
    return "\n\n".join(blocks) + (
        f"\n\nTest accuracy (%) at the best dev accuracy, mean ± std over label draws; "
        f"majority class {100 * majority:.1f}%."
    )


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for r in results:
        ns = [v["n"] for v in r["sizes"].values()]
        means = np.array([v["test_acc_mean"] for v in r["sizes"].values()])
        stds = np.array([v["test_acc_std"] or 0.0 for v in r["sizes"].values()])
        label = f"{run_label(r)} @{r['checkpoint']}"
        ax.errorbar(ns, 100 * means, yerr=100 * stds, label=label, capsize=3, marker="o")
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


def result_path(out: str, workdir: str, protocol: str, label: str) -> str:
    """``<out>/<run>/<protocol>.<checkpoint label>.json``."""
    name = os.path.basename(os.path.normpath(workdir))
    return os.path.join(out, name, f"{protocol}.{label}.json")


def recorded_args(args) -> dict:
    return {k: str(v) for k, v in vars(args).items()}


def _settings(recorded: dict) -> dict:
    """What decides a result besides its run and checkpoint: every argument but the runs, the
    checkpoints asked for and --out."""
    skip = ("workdirs", "out", "checkpoint", "cycle_ends")
    return {k: v for k, v in recorded.items() if k not in skip}


def previous_result(path: str, workdir: str, step: int, args) -> dict | None:
    """The result at ``path`` if it was computed for ``workdir`` at ``step`` with the same
    arguments, so that re-running a table with a run or a cycle end added only scores that."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        previous = json.load(f)
    same = _settings(previous.get("args", {})) == _settings(recorded_args(args))
    if previous.get("workdir") != workdir or previous.get("checkpoint_step") != step or not same:
        return None
    return previous


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", help="Pre-trained runs (configs/yelp.py).")
    parser.add_argument("--out", required=True)
    # Checked by `preflight`, so that a bad name ends in one line like every other bad input.
    parser.add_argument("--protocol", default="balanced", help=" or ".join(PROTOCOLS))
    parser.add_argument("--sizes", type=parse_sizes, default=list(SIZES))
    parser.add_argument("--draws", "--seeds", dest="seeds", type=int, default=5,
                        help="Labelled sets drawn per size (and classifiers trained).")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=100_000, help="Balanced protocol.")
    parser.add_argument("--eval_every", type=int, default=1_000, help="Balanced protocol.")
    parser.add_argument("--epochs", type=int, default=3_000, help="Official protocol.")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--checkpoint", help="best, last, auto, <step>, epoch:<E>; comma-separated")
    parser.add_argument("--cycle_ends", nargs="?", const="all",
                        help="Also every kept epoch (no value), or the epochs listed.")  # fmt: skip
    parser.add_argument(
        "--finetune_encoder", action="store_true", help="Train the encoder with the classifier."
    )
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.steps < args.eval_every or args.eval_every < 1 or args.epochs < 1:
        parser.error("need --draws >= 1, --epochs >= 1 and --steps >= --eval_every >= 1")
    return args


def main() -> None:
    args = parse_args()
    try:
        plan = preflight(args)
    except BadInput as e:
        sys.exit(f"table3_classify: {e}")
    host.tune_cpu_host()
    results = []
    for workdir, chosen in plan.items():
        for label, load, step in chosen:
            path = result_path(args.out, workdir, args.protocol, label)
            result = previous_result(path, workdir, step, args)
            if result is None:
                result = classify(workdir, load, label, args)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w", encoding="utf-8") as f:
                    json.dump({**result, "args": recorded_args(args)}, f, indent=1)
            else:
                print(f"{workdir}: reusing {path} (same arguments and step)", file=sys.stderr)
            results.append(result)
    text_ = table(results)
    print(text_)
    with open(os.path.join(args.out, "table.md"), "w", encoding="utf-8") as f:
        f.write(text_ + "\n")
    if args.protocol == "balanced":
        plot(results, os.path.join(args.out, "accuracy.png"))
    print(f"wrote {args.out}/table.md", file=sys.stderr)


if __name__ == "__main__":
    main()
