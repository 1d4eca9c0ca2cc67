"""Evaluates a trained run on one split and writes ``WORKDIR/eval_<split>.json``.

    python -m vae_jax.evaluate --workdir=runs/ptb_cyclical [--split test]
        [--checkpoint auto|best|last|STEP] [--num_importance_samples 500]
    python -m vae_jax.evaluate --workdir=runs/population --member=2    # a population's member

Loads ``WORKDIR/config.json`` and a checkpoint (`checkpoints.restore_params`), reads the split
with `build.get_data` and reports, per sentence unless said otherwise (definitions in
`vae_jax.core.metrics`):

- Rec, KL, −ELBO and the PPL bound as training reports them (one z, no dropout);
- IW-NLL with K importance samples (He et al. 2019: K = 500) and IW-PPL;
- MI, mini-batch (ceiling Σ_b B_b ln B_b / N) and whole-split (ceiling ln N) estimators;
- AU, and DG-VAE's posterior-hole metrics KL(p ‖ q_agg) and CU@τ.

Every figure uses the posterior the model is trained at (`vae_jax.core.forward`). An SA-VAE is
scored at its SVI-refined λ_K, as Kim et al. (2018) and Fu et al. (2019) report it: the ELBO at λ_K,
IW-NLL with q(z|x; λ_K) as the proposal, MI, AU and holes of the λ_K posteriors; the refinement
runs under the evaluation key at β = 1, so the ELBO figures are training's logged ones. The
same metrics at the encoder's amortized λ₀ follow as ``amortized_*`` (the gap is what the
refinement buys); ``posterior`` and ``amortized_posterior`` in the JSON say which is which.
``elbo_mc_stderr`` is the Monte Carlo standard error of the one-sample ELBO (from the spread
of the importance log-weights, whose KL is sampled: an upper estimate).

A dialog CVAE's run (`vae_jax.dialog.cvae`) gets the dialog code's test instead
(`vae_jax.dialog.evaluation`): Rec, KL(q ‖ p(z|c)), the bag-of-words loss, −ELBO, the PPL
bound, the response perplexity, and sampled responses scored against the true one, every
sample written to ``WORKDIR/samples_<split>.txt``.

IW-NLL dominates the time: on PTB's test split (3,761 sentences, 10k words) each of the K
samples needs the full softmax at every token. ``--num_importance_samples 50`` is a quick run.
"""

from vae_jax.run import host

if __name__ == "__main__":
    host.tune_cpu_host("vae_jax.evaluate")  # before jax loads: see vae_jax.run.host

import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from vae_jax.core import metrics, models, savae  # noqa: E402
from vae_jax.data import batching  # noqa: E402
from vae_jax.run import backend, build, cli, files, workdirs  # noqa: E402

PROG = "python -m vae_jax.evaluate"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def evaluate_split(
    model: models.VAE,
    params: Any,
    batches: Sequence[batching.Batch],
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

    Every figure uses the posterior ``model`` is trained at (`vae_jax.core.forward`): for an
    SA-VAE the refined λ_K (its SVI run under ``elbo_key`` at β = 1, no dropout), which is
    then also the IW-NLL's proposal and the posterior of MI, AU and the hole metrics.
    ``elbo_key`` is the key training evaluates with (`build.eval_key`), so the ELBO figures
    repeat the logged ones; IW samples, MI's z and the prior samples of the hole metrics come
    from ``key`` (folded with 0, 1, 2).
    """
    params = jax.device_put(params)
    seconds = {}
    start = time.perf_counter()
    figures, mu, logvar, real = metrics.elbo_and_posteriors(model, params, batches, elbo_key)
    results: dict[str, Any] = {**figures, "neg_elbo": -figures["elbo"]}
    seconds["elbo"] = time.perf_counter() - start

    # The cheap metrics first: a problem shows before the long IW-NLL run.
    start = time.perf_counter()
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
        proposal=(mu[real], logvar[real]),
    )
    nll = metrics.iw_nll_from_log_weights(log_w)
    seconds["iw_nll"] = time.perf_counter() - start
    # Each log w is a one-sample ELBO estimate (its KL sampled); their spread bounds the Monte
    # Carlo error of the split's one-sample ELBO, whose KL is analytic.
    spread = np.var(np.asarray(log_w, np.float64), axis=1, ddof=1) if log_w.shape[1] > 1 else 0
    results.update(
        sentences=len(nll),
        predicted_tokens=int(tokens.sum()),
        iw_nll=float(nll.mean()),
        iw_ppl=metrics.exp_or_inf(float(nll.sum()) / float(tokens.sum())),
        num_importance_samples=num_importance_samples,
        iw_sentences_per_second=len(nll) / seconds["iw_nll"],
        elbo_mc_stderr=float(np.sqrt(np.sum(spread)) / len(nll)),
    )
    results["seconds"] = seconds
    return results


def _column(r: dict[str, Any], p: str) -> list[str]:
    """The table's values of the figures named ``p + key`` (``p`` = "" or "amortized_")."""
    cu = "/".join(str(r[k]) for k in r if k.startswith(f"{p}cu@"))
    d = r[f"{p}latent_dim"]
    return [
        f"{r[p + 'rec']:.3f}",
        f"{r[p + 'kl']:.3f}",
        f"{r[p + 'neg_elbo']:.3f}",
        f"{r[p + 'ppl_bound']:.2f}",
        f"{r[p + 'iw_nll']:.3f}",
        f"{r[p + 'iw_ppl']:.2f}",
        f"{r[p + 'mi_batch']:.3f} ± {r[p + 'mi_batch_stderr']:.3f}",
        f"{r[p + 'mi']:.3f} ± {r[p + 'mi_stderr']:.3f}",
        f"{r[p + 'au']} / {d}",
        f"{r[p + 'kl_prior_agg']:.3f} ± {r[p + 'kl_prior_agg_stderr']:.3f}",
        f"{cu} / {d}",
    ]


def format_table(r: dict[str, Any]) -> str:
    """The results as a Markdown table, each figure with its definition; an SA-VAE's with a
    column at its refined λ_K and one at the encoder's amortized λ₀."""
    taus = "/".join(k[3:] for k in r if k.startswith("cu@"))
    names = [
        ("Rec", "−log p(x|z), one z ~ q(z|x)"),
        ("KL", "KL(q(z|x) ‖ p(z))"),
        ("−ELBO", "Rec + KL"),
        ("PPL bound", "exp((ΣRec + ΣKL) / #predicted tokens)"),
        (f"IW-NLL (K={r['num_importance_samples']})", "−log (1/K) Σ_k p(x, z_k) / q(z_k|x)"),
        ("IW-PPL", "exp(Σ IW-NLL / #predicted tokens)"),
        (
            f"MI, mini-batch (B ≤ {r['mi_batch_size']})",
            f"He et al. 2019; ceiling Σ B ln B / N = {r['mi_batch_ceiling']:.3f}",
        ),
        ("MI, whole split", f"Li et al. 2019; ceiling ln N = {r['mi_ceiling']:.3f}"),
        ("AU", f"Var_x E_q[z_d] > {r['au_threshold']:g} (N − 1)"),
        ("KL(p ‖ q_agg)", f"DG-VAE holes, {r['num_prior_samples']} prior samples"),
        (f"CU@{taus}", "#dims with KL(p_d ‖ q_agg,d) < τ"),
    ]
    columns = [_column(r, "")]
    if "amortized_rec" in r:
        columns.append(_column(r, "amortized_"))
        lines = [
            "| metric | at λ_K (refined) | at λ₀ (amortized) | definition |",
            "|---|---:|---:|---|",
        ]
    else:
        lines = ["| metric | value | definition |", "|---|---:|---|"]
    for (name, definition), *values in zip(names, *columns, strict=True):
        lines.append(f"| {name} | {' | '.join(values)} | {definition} |")
    return "\n".join(lines)


def define_flags(fv: flags.FlagValues) -> None:
    """This command's flags, on ``fv``."""
    cli.define_run_flags(fv)
    flags.DEFINE_string("split", "", "Default: test if present, else the first.", flag_values=fv)
    flags.DEFINE_integer(
        "num_importance_samples", 500, "K of IW-NLL.", lower_bound=1, flag_values=fv
    )
    flags.DEFINE_integer(
        "num_prior_samples", 16_384, "Hole metrics.", lower_bound=2, flag_values=fv
    )
    flags.DEFINE_integer(
        "max_rows",
        512,
        "Decoder rows (sentences x samples) at once.",
        lower_bound=1,
        flag_values=fv,
    )
    flags.DEFINE_integer("seed", 0, "Seed of IW, MI and prior samples.", flag_values=fv)
    flags.DEFINE_integer(
        "num_samples", 5, "Dialog: responses sampled per context.", lower_bound=1, flag_values=fv
    )
    flags.DEFINE_integer(
        "max_contexts", 0, "Dialog: score the first N contexts (0: all).", lower_bound=0,
        flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_string(
        "out", "", "Directory for eval_<split>.json (and a dialog run's samples_<split>.txt); "
        "default: the run's directory. Checked for writing before anything is computed.",
        flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_string(
        "word_vectors", "", "Dialog: GloVe-format word vectors for A-bow/E-bow (the official "
        "code used glove.twitter.27B.200d.txt); '': skipped.", flag_values=fv,
    )  # fmt: skip


def run(fv: flags.FlagValues) -> dict[str, Any]:
    """Evaluates as the parsed flags ``fv`` say; returns the results it writes."""
    config, data, model, params, info = build.load_run(
        fv.workdir, fv.checkpoint, fv.data_dir, fv.member
    )
    # The run's matmul precision, so that its figures are training's on any backend.
    with jax.default_matmul_precision(backend.matmul_precision(config)):
        return _run(fv, config, data, model, params, info)


def _run(fv, config, data, model, params, info) -> dict[str, Any]:
    run_dir = info["run_dir"]  # a population's member: WORKDIR/members/<k>
    split = build.choose_split(data, fv.split)
    # Before the evaluation (minutes to hours), not after it: where its results will go.
    out = fv.out or run_dir
    what = f"--out={fv.out}" if fv.out else f"--workdir={fv.workdir} (pass --out=<a directory>)"
    files.check_writable(out, what)
    _log(f"Evaluating {run_dir} (checkpoint {info['checkpoint']}: {info}) on {split}.")
    task = build.task(config)
    if task.evaluate is not None:  # a task with a test of its own (the dialog CVAE's)
        results, extra = task.evaluate(
            fv, config, data, model, params, info, split, build.eval_key(config)
        )
        for name, text in extra.items():
            files.write_atomic(os.path.join(out, name), text)
        path = workdirs.eval_results_path(out, split)
        files.write_atomic(path, json.dumps(results, indent=1))
        _log(f"Wrote {path} and {', '.join(extra)}")
        return results
    evaluate = functools.partial(
        evaluate_split,
        params=params,
        batches=data.eval_splits[split],
        elbo_key=build.eval_key(config),
        key=jax.random.PRNGKey(fv.seed),
        num_importance_samples=fv.num_importance_samples,
        num_prior_samples=fv.num_prior_samples,
        max_rows=fv.max_rows,
        verbose=True,
    )
    results = evaluate(model)
    if isinstance(model, savae.SAVAE):
        results["posterior"] = (
            f"svi_refined: λ_K after {model.svi_steps} SVI steps at β = 1 under the evaluation "
            "key (training's evaluation key), no dropout"
        )
        _log("SA-VAE: the same metrics at the encoder's amortized posterior λ₀ (amortized_*).")
        amortized = evaluate(savae.amortized(model))
        results.update({f"amortized_{k}": v for k, v in amortized.items() if k != "seconds"})
        results["amortized_posterior"] = "encoder: the amortized q(z|x) = λ₀"
    else:
        results["posterior"] = "encoder: the amortized q(z|x)"
    results = {
        "workdir": run_dir,
        "split": split,
        "checkpoint": info["checkpoint"],
        "checkpoint_info": info,
        "seed": fv.seed,
        "platform": backend.describe(config),
        **results,
    }
    print(
        f"{run_dir} · {split} · checkpoint {info['checkpoint']} · {results['sentences']} "
        f"sentences, {results['predicted_tokens']} predicted tokens; per sentence, in nats"
    )
    print(format_table(results))
    path = workdirs.eval_results_path(out, split)
    files.write_atomic(path, json.dumps(results, indent=1))  # replaces a link, never follows
    _log(f"Wrote {path}")
    return results


def main(argv: Sequence[str]) -> dict[str, Any]:
    """Runs the command with the flags in ``argv`` (no program name), as from a notebook or a
    test; a bad flag exits with status 2 and a one-line message, as on the command line."""
    return run(cli.parse(define_flags, PROG, argv))


if __name__ == "__main__":
    cli.run_command(define_flags, run, PROG)
