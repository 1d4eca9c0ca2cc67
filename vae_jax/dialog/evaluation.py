"""The dialog code's test of a CVAE run (Zhao et al. 2017; Fu et al. 2019, Table 2).

Rec, KL(q ‖ p(z|c)), the bag-of-words loss, −ELBO, the PPL bound and the response perplexity;
then ``num_samples`` responses per context from the prior p(z|c), scored against the true
response (BLEU-1…4, A-bow/E-bow with word vectors, distinct-1/2: `vae_jax.dialog.responses`).
`vae_jax.evaluate` reaches it through `vae_jax.run.build.TASKS`.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import jax

from vae_jax.core import metrics
from vae_jax.data import batching
from vae_jax.dialog import cvae, responses
from vae_jax.dialog import metrics as dialog_metrics


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def evaluate_dialog(
    model: cvae.CVAE,
    params: Any,
    data: batching.Data,
    split: str,
    *,
    elbo_key: jax.Array,
    key: jax.Array,
    num_samples: int = 5,
    vectors: dialog_metrics.WordVectors | None = None,
    max_contexts: int = 0,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A dialog CVAE's figures on ``split`` (module docstring) and its sampled responses
    (`responses.sample`'s results; the first ``max_contexts`` scored contexts, 0: all)."""
    params = jax.device_put(params)
    seconds = {}
    start = time.perf_counter()
    figures = metrics.elbo_figures(model, params, data.eval_splits[split], elbo_key)
    seconds["elbo"] = time.perf_counter() - start
    batcher = data.info["eval_batchers"][split]
    rows = responses.scored_rows(batcher)[: max_contexts or None]
    start = time.perf_counter()
    sampled = list(responses.sample(model, params, batcher, rows, key, num_samples))
    seconds["sampling"] = time.perf_counter() - start
    start = time.perf_counter()
    scores = responses.score(sampled, data.info["vocab"], vectors)
    seconds["scoring"] = time.perf_counter() - start
    results = {
        **figures,
        "neg_elbo": -figures["elbo"],
        "responses": len(batcher.rows),
        **scores,
        "num_samples": num_samples,
        "max_contexts": max_contexts,  # 0: every context (a reader reuses only a match)
        "references": "one per context: the true response (test_multi_ref.json is not here)",
        "word_vectors": vectors.path if vectors is not None else None,
        "posterior": "recognition network q(z|x, c); KL to the prior network p(z|c)",
        "sampling": "z ~ p(z|c), greedy decoding, one z per sample",
        "seconds": seconds,
    }
    return results, sampled


def format_dialog_table(r: dict[str, Any]) -> str:
    """The ELBO figures and Table 2's metrics of `evaluate_dialog`, as Markdown."""
    lines = ["| Rec | KL | BOW | −ELBO | PPL bound | response PPL |", "|---|---|---|---|---|---|"]
    bow = f"{r['bow']:.3f}" if "bow" in r else "–"  # the plain CVAE has no BOW head
    lines.append(
        f"| {r['rec']:.3f} | {r['kl']:.3f} | {bow} | {r['neg_elbo']:.3f} | "
        f"{r['ppl_bound']:.2f} | {r['rec_ppl']:.2f} |"
    )
    return "\n".join(lines) + "\n\n" + dialog_metrics.format_table({"this run": r})


def evaluate_run(
    fv,
    config,
    data: batching.Data,
    model: cvae.CVAE,
    params: Any,
    info: dict,
    split: str,
    elbo_key: jax.Array,
) -> tuple[dict[str, Any], dict[str, str]]:
    """`vae_jax.evaluate`'s dialog test, as the parsed flags ``fv`` say: prints the tables and
    returns the results and the files to write beside them (``samples_<split>.txt``: every
    sampled response)."""
    del config
    vectors = None
    if fv.word_vectors:
        vectors = dialog_metrics.load_word_vectors(fv.word_vectors, set(data.info["vocab"].words))
    else:
        _log("No --word_vectors: A-bow and E-bow are skipped (no package ships GloVe offline).")
    results, sampled = evaluate_dialog(
        model, params, data, split, elbo_key=elbo_key, key=jax.random.PRNGKey(fv.seed),
        num_samples=fv.num_samples, vectors=vectors, max_contexts=fv.max_contexts,
    )  # fmt: skip
    run_dir = info["run_dir"]
    results = {
        "workdir": run_dir, "split": split, "checkpoint": info["checkpoint"],
        "checkpoint_info": info, "seed": fv.seed, **results,
    }  # fmt: skip
    print(
        f"{run_dir} · {split} · checkpoint {info['checkpoint']} · {results['responses']} "
        f"responses, {int(results['contexts'])} contexts scored × {fv.num_samples} samples"
    )
    print(format_dialog_table(results))
    vocab = data.info["vocab"]
    text = "".join(f"row {r['row']}\n{responses.format_result(r, vocab)}\n\n" for r in sampled)
    return results, {f"samples_{split}.txt": text}
