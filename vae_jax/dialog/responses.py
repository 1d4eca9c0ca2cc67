"""Sampled responses of a dialog CVAE, scored as the official dialog code's test does.

For every row of a split (a response and its context) but the first of each dialog (whose
context is only the begin-of-dialog ``<d>``; the official ``test_mul_ref`` skips those too),
``num_samples`` responses are decoded greedily, each from its own z ~ p(z|c) (`cvae.CVAE.generate`,
the official ``use_prior`` test); each is scored against the reference response with
`vae_jax.dialog.metrics` (BLEU-1…4 precision/recall/F1, A-bow and E-bow with word vectors,
distinct-1/2). The official test used several references per context
(``test_multi_ref.json``, not available here): here the one true response is the reference,
a documented deviation that lowers recall-type figures.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vae_jax.core.tokens import BOS_ID, EOS_ID, PAD_ID
from vae_jax.dialog import cvae
from vae_jax.dialog import metrics as dialog_metrics


@functools.partial(jax.jit, static_argnames=("model", "max_length", "num_samples"))
def _generate(
    params: Any, batch: dict, keys: jnp.ndarray, *, model: cvae.CVAE, max_length: int,
    num_samples: int,
) -> jnp.ndarray:  # fmt: skip
    return model.apply(
        {"params": params}, batch, keys, max_length, None, num_samples, method=cvae.CVAE.generate
    )


def words(ids: Sequence[int], vocab) -> list[str]:
    """The words of ``w … </s>`` ids up to the first ``</s>``, specials left out."""
    out = []
    for i in np.asarray(ids).tolist():
        if i == EOS_ID:
            break
        if i not in (PAD_ID, BOS_ID):
            out.append(vocab.words[i])
    return out


def scored_rows(batcher) -> np.ndarray:
    """Indices of the batcher's rows whose context holds more than the begin-of-dialog."""
    return np.flatnonzero(batcher.rows[:, 1] > 1)


def sample(
    model: cvae.CVAE,
    params: Any,
    batcher,
    rows: np.ndarray,
    key: jax.Array,
    num_samples: int = 5,
    batch_rows: int = 60,
) -> Iterator[dict[str, Any]]:
    """For each row index in ``rows``: ``{"row", "context", "floors", "reference", "samples"}``
    (ids; context the utterances before the response, oldest first). Row r's sample s comes
    from ``fold_in(fold_in(key, r), s)``, whatever the batching."""
    max_length = batcher.max_utt_len - 1  # w … </s> of a response of max_utt_len tokens
    for lo in range(0, len(rows), batch_rows):
        chunk = rows[lo : lo + batch_rows]
        n = len(chunk)
        # A fixed number of rows per call (the last chunk padded): one compilation.
        batch = batcher.batch(chunk, size=batch_rows)
        inputs = {k: v for k, v in batch.items() if k != "acts"}
        keys = _sample_keys(key, np.pad(chunk, (0, batch_rows - n)), num_samples)
        out = _generate(
            params, inputs, keys, model=model, max_length=max_length, num_samples=num_samples
        )
        out = np.asarray(out)
        out = out.reshape(batch_rows, num_samples, -1)
        for j, r in enumerate(chunk):
            length = int(batch["context_lengths"][j])
            yield {
                "row": int(r),
                "context": batch["context"][j, :length],
                "floors": batch["floors"][j, :length],
                "reference": batch["tokens"][j, 1:],
                "samples": out[j],
            }


@functools.partial(jax.jit, static_argnames=("num_samples",))
def _sample_keys(key: jax.Array, rows: jnp.ndarray, num_samples: int) -> jnp.ndarray:
    """``fold_in(fold_in(key, r), s)`` for every row r and sample s, (R·S, 2)."""
    per_row = jax.vmap(jax.random.fold_in, (None, 0))(key, rows)
    keys = jax.vmap(lambda k: jax.vmap(jax.random.fold_in, (None, 0))(k, jnp.arange(num_samples)))
    return keys(per_row).reshape(-1, *per_row.shape[1:])


def score(
    results: Sequence[dict[str, Any]], vocab, vectors: dialog_metrics.WordVectors | None = None
) -> dict[str, float]:
    """`dialog_metrics.score_responses` of `sample`'s results, in words."""
    contexts = [
        ([words(r["reference"], vocab)], [words(s, vocab) for s in r["samples"]]) for r in results
    ]
    return dialog_metrics.score_responses(contexts, vectors)


def format_result(result: dict[str, Any], vocab, last: int = 5) -> str:
    """A context's last ``last`` utterances (``me:`` by the response's speaker, ``you:`` by
    the other), the reference and the samples, as the official test log shows them."""
    lines = []
    for utterance, floor in list(zip(result["context"], result["floors"], strict=True))[-last:]:
        lines.append(f"  {'me' if floor else 'you'}: {' '.join(words(utterance[1:], vocab))}")
    lines.append(f"  reference >> {' '.join(words(result['reference'], vocab))}")
    for s, ids in enumerate(result["samples"]):
        lines.append(f"  sample {s} >> {' '.join(words(ids, vocab))}")
    return "\n".join(lines)


def sample_run(fv, data, model: cvae.CVAE, params: Any, key: jax.Array) -> list[str]:
    """`vae_jax.generate --mode=responses`: ``fv.num_samples`` responses to each of ``fv.num``
    contexts drawn (by ``fv.seed``) from ``fv.split`` (default test), as printable lines."""
    split = fv.split or "test"
    batcher = data.info["eval_batchers"][split]
    candidates = scored_rows(batcher)
    pick = np.random.default_rng(fv.seed).choice(
        len(candidates), min(fv.num, len(candidates)), replace=False
    )
    rows = np.sort(candidates[pick])
    lines = []
    for r in sample(model, params, batcher, rows, key, fv.num_samples, len(rows)):
        lines += [f"{split} row {r['row']}:", format_result(r, data.info["vocab"]), ""]
    return lines
