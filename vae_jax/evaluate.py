"""Evaluates a trained run on one split and writes ``WORKDIR/eval_<split>.json``.

    python -m vae_jax.evaluate --workdir=runs/ptb_cyclical [--split test]
        [--checkpoint best|last|STEP] [--num_importance_samples 500]

Loads ``WORKDIR/config.json`` and a checkpoint (`checkpoints.restore_params`), reads the split
with `input_pipeline.get_data` and reports, per sentence unless said otherwise (definitions in
`vae_jax.metrics`):

- Rec, KL, −ELBO and the PPL bound as training reports them (one z, no dropout);
- IW-NLL with K importance samples (He et al. 2019: K = 500) and IW-PPL;
- MI, mini-batch (ceiling Σ_b B_b ln B_b / N) and whole-split (ceiling ln N) estimators;
- AU, and DG-VAE's posterior-hole metrics KL(p ‖ q_agg) and CU@τ.

IW-NLL dominates the time: on PTB's test split (3,761 sentences, 10k words) each of the K
samples needs the full softmax at every token. ``--num_importance_samples 50`` is a quick run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vae_jax import checkpoints, host, input_pipeline, metrics, models, train


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The run's ``config.json`` as a ConfigDict."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--workdir={workdir}: no {path} (written when a run starts).")
    with open(path, encoding="utf-8") as f:
        return ml_collections.ConfigDict(json.load(f))


def check_params(model: models.VAE, params: Any, where: str) -> None:
    """Raises ``ValueError`` naming ``where`` unless ``params`` has the shapes ``model`` makes."""
    tokens, keys = jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2), jnp.uint32)
    expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, keys, train=False))
    want = {
        jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(expected)
    }
    have = {
        jax.tree_util.keystr(p): np.shape(x)
        for p, x in jax.tree_util.tree_leaves_with_path({"params": params})
    }
    if want != have:
        diff = sorted(
            f"{k}: checkpoint {have.get(k, 'missing')}, config {want.get(k, 'missing')}"
            for k in set(want) | set(have)
            if want.get(k) != have.get(k)
        )
        raise ValueError(
            f"{where}: parameters do not match the model of config.model: " + "; ".join(diff[:5])
        )


def load_run(
    workdir: str, checkpoint: str = "best", data_dir: str | None = None
) -> tuple[ml_collections.ConfigDict, input_pipeline.Data, models.VAE, Any, dict]:
    """Config, data, model, parameters and checkpoint info of a run's workdir.

    ``checkpoint``: ``best`` (lowest valid PPL bound), ``last`` or a step number.
    ``data_dir`` overrides ``config.data.data_dir`` (corpora moved since training).
    """
    config = load_config(workdir)
    if data_dir:
        config.data.data_dir = data_dir
    params, info = checkpoints.restore_params(workdir, checkpoint)
    data = input_pipeline.get_data(config)
    model = train.make_model(config, data.vocab_size)
    check_params(model, params, f"{workdir} checkpoint {checkpoint!r}")
    return config, data, model, params, info


def choose_split(data: input_pipeline.Data, split: str | None) -> str:
    """``split``, else ``test`` where the data has one, else its first evaluation split."""
    if not split:
        return "test" if "test" in data.eval_splits else next(iter(data.eval_splits))
    if split not in data.eval_splits:
        raise ValueError(f"--split={split}: this run's data has splits {sorted(data.eval_splits)}.")
    return split


def evaluate_split(
    model: models.VAE,
    params: Any,
    batches: Sequence[input_pipeline.Batch],
    *,
    elbo_key: jax.Array,
    key: jax.Array,
    num_importance_samples: int = 500,
    num_prior_samples: int = 16_384,
    max_rows: int = 512,
    au_threshold: float = 0.01,
    verbose: bool = False,
) -> dict[str, Any]:
    """Every metric of one split (see the module docstring); per sentence unless named so.

    ``elbo_key`` is the key training evaluates with (``PRNGKey(config.seed + 1)``), so the ELBO
    figures repeat the logged ones; IW samples, MI's z and the prior samples of the hole
    metrics come from ``key`` (folded with 0, 1, 2).
    """
    params = jax.device_put(params)
    seconds = {}
    start = time.perf_counter()
    results: dict[str, Any] = dict(metrics.elbo_figures(model, params, batches, elbo_key))
    results["neg_elbo"] = -results["elbo"]
    seconds["elbo"] = time.perf_counter() - start

    # The cheap metrics first: a problem shows before the long IW-NLL run.
    start = time.perf_counter()
    mu, logvar, real = metrics.posteriors(model, params, batches)
    mi_key = jax.random.fold_in(key, 1)
    results.update(metrics.mutual_info_minibatch(mu, logvar, real, mi_key))
    results.update(metrics.mutual_info(mu[real], logvar[real], mi_key))
    au, variances = metrics.active_units(mu[real], au_threshold)
    results.update(au=au, au_threshold=au_threshold, au_variances=[float(v) for v in variances])
    results["latent_dim"] = int(mu.shape[-1])
    holes = metrics.hole_metrics(
        mu[real], logvar[real], jax.random.fold_in(key, 2), num_prior_samples
    )
    results.update(holes, num_prior_samples=num_prior_samples)
    seconds["posterior_metrics"] = time.perf_counter() - start

    start = last = time.perf_counter()

    def progress(done: int, total: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if verbose and (now - last > 30 or done == total):
            eta = (now - start) * (total - done) / max(done, 1)
            _log(f"IW-NLL: {done}/{total} predicted tokens, ETA {eta:.0f}s")
            last = now

    log_w, tokens = metrics.iw_log_weights(
        model,
        params,
        batches,
        jax.random.fold_in(key, 0),
        num_importance_samples,
        max_rows,
        progress,
    )
    nll = metrics.iw_nll_from_log_weights(log_w)
    seconds["iw_nll"] = time.perf_counter() - start
    results.update(
        sentences=len(nll),
        predicted_tokens=int(tokens.sum()),
        iw_nll=float(nll.mean()),
        iw_ppl=math.exp(float(nll.sum()) / float(tokens.sum())),
        num_importance_samples=num_importance_samples,
        iw_sentences_per_second=len(nll) / seconds["iw_nll"],
    )
    results["seconds"] = seconds
    return results


def format_table(r: dict[str, Any]) -> str:
    """The results as a Markdown table, each figure with its definition."""
    d = r["latent_dim"]
    cu = "/".join(str(r[k]) for k in r if k.startswith("cu@"))
    taus = "/".join(k[3:] for k in r if k.startswith("cu@"))
    rows = [
        ("Rec", f"{r['rec']:.3f}", "−log p(x|z), one z ~ q(z|x)"),
        ("KL", f"{r['kl']:.3f}", "KL(q(z|x) ‖ p(z))"),
        ("−ELBO", f"{r['neg_elbo']:.3f}", "Rec + KL"),
        ("PPL bound", f"{r['ppl_bound']:.2f}", "exp((ΣRec + ΣKL) / #predicted tokens)"),
        (
            f"IW-NLL (K={r['num_importance_samples']})",
            f"{r['iw_nll']:.3f}",
            "−log (1/K) Σ_k p(x, z_k) / q(z_k|x)",
        ),
        ("IW-PPL", f"{r['iw_ppl']:.2f}", "exp(Σ IW-NLL / #predicted tokens)"),
        (
            f"MI, mini-batch (B ≤ {r['mi_batch_size']})",
            f"{r['mi_batch']:.3f} ± {r['mi_batch_stderr']:.3f}",
            f"He et al. 2019; ceiling Σ B ln B / N = {r['mi_batch_ceiling']:.3f}",
        ),
        (
            "MI, whole split",
            f"{r['mi']:.3f} ± {r['mi_stderr']:.3f}",
            f"Li et al. 2019; ceiling ln N = {r['mi_ceiling']:.3f}",
        ),
        ("AU", f"{r['au']} / {d}", f"Var_x E_q[z_d] > {r['au_threshold']:g} (N − 1)"),
        (
            "KL(p ‖ q_agg)",
            f"{r['kl_prior_agg']:.3f} ± {r['kl_prior_agg_stderr']:.3f}",
            f"DG-VAE holes, {r['num_prior_samples']} prior samples",
        ),
        (f"CU@{taus}", f"{cu} / {d}", "#dims with KL(p_d ‖ q_agg,d) < τ"),
    ]
    lines = ["| metric | value | definition |", "|---|---:|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m vae_jax.evaluate", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--workdir", required=True, help="A run's directory (config.json).")
    parser.add_argument("--split", default="", help="Default: test if present, else the first.")
    parser.add_argument("--checkpoint", default="best", help="best, last or a step number.")
    parser.add_argument("--num_importance_samples", type=int, default=500, help="K of IW-NLL.")
    parser.add_argument("--num_prior_samples", type=int, default=16_384, help="Hole metrics.")
    parser.add_argument(
        "--max_rows", type=int, default=512, help="Decoder rows (sentences × samples) at once."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of IW, MI and prior samples.")
    parser.add_argument("--data_dir", default="", help="Overrides config.data.data_dir.")
    args = parser.parse_args(argv)
    for name in ("num_importance_samples", "num_prior_samples", "max_rows"):
        if getattr(args, name) < (2 if name == "num_prior_samples" else 1):
            parser.error(f"--{name}={getattr(args, name)}: must be a positive integer.")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line entry point; returns the results it writes."""
    args = parse_args(argv)
    host.keep_freed_memory()  # the K-sample softmaxes reuse their memory: see vae_jax.host
    config, data, model, params, info = load_run(args.workdir, args.checkpoint, args.data_dir)
    split = choose_split(data, args.split)
    _log(f"Evaluating {args.workdir} (checkpoint {args.checkpoint}: {info}) on {split}.")
    results = evaluate_split(
        model,
        params,
        data.eval_splits[split],
        elbo_key=jax.random.PRNGKey(config.seed + 1),
        key=jax.random.PRNGKey(args.seed),
        num_importance_samples=args.num_importance_samples,
        num_prior_samples=args.num_prior_samples,
        max_rows=args.max_rows,
        verbose=True,
    )
    results = {
        "workdir": args.workdir,
        "split": split,
        "checkpoint": args.checkpoint,
        "checkpoint_info": info,
        "seed": args.seed,
        **results,
    }
    print(
        f"{args.workdir} · {split} · checkpoint {args.checkpoint} · {results['sentences']} "
        f"sentences, {results['predicted_tokens']} predicted tokens; per sentence, in nats"
    )
    print(format_table(results))
    path = os.path.join(args.workdir, f"eval_{split}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    _log(f"Wrote {path}")
    return results


if __name__ == "__main__":
    main()
