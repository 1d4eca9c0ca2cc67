"""Training objectives. Each returns ``(objective_sum, sums)`` for a batch.

``objective_sum`` is summed over the batch's sequences; the train step divides it by the global
number of sequences, so the loss is the batch mean of the per-sequence objective however the
batch is split over devices. ``sums`` are the additive statistics metrics are made of
(``rec``, ``kl``, ``tokens``, ``sequences``): summing them over batches and devices and dividing
at the end gives exact averages.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import optax

from vae_jax.tokens import PAD_ID, sequence_lengths

# objective(outputs, tokens, beta) -> (objective_sum, sums)
Objective = Callable[
    [dict[str, jnp.ndarray], jnp.ndarray, jnp.ndarray], tuple[jnp.ndarray, dict[str, jnp.ndarray]]
]


def gaussian_kl(mu: jnp.ndarray, logvar: jnp.ndarray) -> jnp.ndarray:
    """KL(N(μ, diag σ²) ‖ N(0, I)) = ½ Σ_d (μ_d² + σ_d² − 1 − log σ_d²), per example."""
    return 0.5 * jnp.sum(jnp.square(mu) + jnp.exp(logvar) - 1.0 - logvar, axis=-1)


def reconstruction(logits: jnp.ndarray, tokens: jnp.ndarray) -> jnp.ndarray:
    """Rec = −Σ_t log p(x_t | x_<t, z) over the targets ``tokens[:, 1:]`` that are not padding.

    The targets include ``</s>``, so Rec is the code length of the whole sentence.
    """
    targets = tokens[:, 1:]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(jnp.where(targets != PAD_ID, nll, 0.0), axis=-1)


def batch_sums(rec: jnp.ndarray, kl: jnp.ndarray, tokens: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """Sums over the real sequences of a batch; all-padding rows (batch filler) count nothing."""
    real = sequence_lengths(tokens) > 0
    return {
        "rec": jnp.sum(jnp.where(real, rec, 0.0)),
        "kl": jnp.sum(jnp.where(real, kl, 0.0)),
        # Predicted tokens: every non-pad token after <s>, </s> included.
        "tokens": jnp.sum(tokens[:, 1:] != PAD_ID).astype(jnp.float32),
        "sequences": jnp.sum(real).astype(jnp.float32),
    }


def beta_elbo(
    outputs: dict[str, jnp.ndarray], tokens: jnp.ndarray, beta: jnp.ndarray
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """Σ_n Rec_n + β·KL_n: the negative β-weighted ELBO (Fu et al. 2019, Eq. 4) summed over
    the batch, with Rec estimated from one z sample and KL analytic."""
    rec = reconstruction(outputs["logits"], tokens)
    kl = gaussian_kl(outputs["mu"], outputs["logvar"])
    sums = batch_sums(rec, kl, tokens)
    return sums["rec"] + beta * sums["kl"], sums


OBJECTIVES = {"beta_elbo": beta_elbo}
