"""Training objectives. Each returns ``(objective_sum, sums)`` for a batch.

- `beta_elbo`: Rec + β·KL (Fu et al. 2019, Eq. 4; β = 1 is the negative ELBO);
- `free_bits`: Rec + β·Σ_d max(λ, KL̄_d) (Kingma et al. 2016, in Li et al.'s 2019 form);
- `dg_vae`: Rec + β·L_DG, DG-VAE's density gap in place of the per-example KL (Zhang et al.
  2022, `density_gap`).

Every objective works with every β schedule and model (chosen by ``config.objective``, its
hyperparameters in ``config.<objective>``: `make`). ``sums`` always hold the analytic KL, so the
ELBO figures of training, evaluation and metrics mean the same whatever the objective. The
batch-level terms (free bits' KL̄_d, the density gap's chunks) are over a device's shard: with
N devices and batch B they see B/N examples (documented deviation; one device is exact).

``objective_sum`` is summed over the batch's sequences; the train step divides it by the global
number of sequences, so the loss is the batch mean of the per-sequence objective however the
batch is split over devices. ``sums`` are the additive statistics metrics are made of
(``rec``, ``kl``, ``tokens``, ``sequences``): summing them over batches and devices and dividing
at the end gives exact averages.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from vae_jax.core import densities
from vae_jax.core.tokens import PAD_ID, sequence_lengths

# objective(outputs, tokens, beta) -> (objective_sum, sums)
Objective = Callable[
    [dict[str, jnp.ndarray], jnp.ndarray, jnp.ndarray], tuple[jnp.ndarray, dict[str, jnp.ndarray]]
]


def gaussian_kl_per_dim(mu: jnp.ndarray, logvar: jnp.ndarray) -> jnp.ndarray:
    """KL(N(μ_d, σ_d²) ‖ N(0, 1)) = ½ (μ_d² + σ_d² − 1 − log σ_d²), per example and dimension."""
    return 0.5 * (jnp.square(mu) + jnp.exp(logvar) - 1.0 - logvar)


def gaussian_kl(mu: jnp.ndarray, logvar: jnp.ndarray) -> jnp.ndarray:
    """KL(N(μ, diag σ²) ‖ N(0, I)) = Σ_d of `gaussian_kl_per_dim`, per example."""
    return jnp.sum(gaussian_kl_per_dim(mu, logvar), axis=-1)


def kl_per_dim(outputs: dict[str, jnp.ndarray]) -> jnp.ndarray:
    """KL(q(z|·) ‖ prior) per example and dimension: to N(0, I) (`gaussian_kl_per_dim`), or,
    where the outputs carry a prior of their own (a CVAE's p(z|c) = N(μ', diag σ'²)),

        ½ (log σ'² − log σ² + (σ² + (μ − μ')²) / σ'² − 1)    (Zhao et al. 2017, Eq. 2's KL).
    """
    mu, logvar = outputs["mu"], outputs["logvar"]
    if "prior_mu" not in outputs:
        return gaussian_kl_per_dim(mu, logvar)
    prior_mu, prior_logvar = outputs["prior_mu"], outputs["prior_logvar"]
    ratio = (jnp.exp(logvar) + jnp.square(mu - prior_mu)) * jnp.exp(-prior_logvar)
    return 0.5 * (prior_logvar - logvar + ratio - 1.0)


def with_bow(
    result: tuple[jnp.ndarray, dict[str, jnp.ndarray]],
    outputs: dict[str, jnp.ndarray],
    tokens: jnp.ndarray,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """An objective's ``(objective_sum, sums)`` plus Zhao et al.'s (2017) bag-of-words loss
    Σ_n BOW_n (``outputs["bow_nll"]``, real rows only), which it also reports as ``sums["bow"]``:
    the CVAE's objective is Rec + β·KL + BOW whatever the KL term's remedy."""
    objective_sum, sums = result
    bow = jnp.sum(jnp.where(_real(tokens), outputs["bow_nll"], 0.0))
    return objective_sum + bow, {**sums, "bow": bow}


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
    the batch, with Rec estimated from one z sample and KL analytic (to the model's prior:
    `kl_per_dim`)."""
    rec = reconstruction(outputs["logits"], tokens)
    kl = jnp.sum(kl_per_dim(outputs), axis=-1)
    sums = batch_sums(rec, kl, tokens)
    return sums["rec"] + beta * sums["kl"], sums


def _real(tokens: jnp.ndarray) -> jnp.ndarray:
    return sequence_lengths(tokens) > 0


def free_bits(
    outputs: dict[str, jnp.ndarray],
    tokens: jnp.ndarray,
    beta: jnp.ndarray,
    lambda_per_dim: float = 0.5,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """Σ_n Rec_n + β·N·Σ_d max(λ, KL̄_d), KL̄_d = (1/N) Σ_n KL_nd the batch mean of dimension
    d's KL: free bits (Kingma et al. 2016) in the per-dimension, batch-mean form of Li et al.
    (2019, Eq. 4). Below λ nats a dimension's KL costs nothing, so the encoder can use it;
    the gradient of a dimension's KL vanishes while its batch mean is under λ."""
    real = _real(tokens)
    rec = reconstruction(outputs["logits"], tokens)
    kl_dims = kl_per_dim(outputs)  # (B, D)
    sums = batch_sums(rec, jnp.sum(kl_dims, -1), tokens)
    n = jnp.maximum(sums["sequences"], 1.0)
    kl_mean = jnp.sum(jnp.where(real[:, None], kl_dims, 0.0), 0) / n
    kl_term = sums["sequences"] * jnp.sum(jnp.maximum(lambda_per_dim, kl_mean))
    return sums["rec"] + beta * kl_term, {**sums, "kl_objective": kl_term}


def density_gap(
    z: jnp.ndarray,
    mu: jnp.ndarray,
    logvar: jnp.ndarray,
    chunk_size: int,
    mask: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """DG-VAE's density gap (Zhang et al. 2022), the Monte Carlo Σ_j KL(q_agg,j ‖ N(0, 1)):

        L_c = Σ_j (1/|S_c|) Σ_{z∈S_c} [log((1/|b|) Σ_{k∈c} N(z_j; μ_kj, σ²_kj)) − log N(z_j; 0, 1)]

    for each chunk c of ``chunk_size`` consecutive examples (the last may be shorter), S_c the
    samples z_{k,m} of its examples, and L the mean of L_c over chunks. z: (B, M, D), M samples
    of each example's q(z|x); mu, logvar: (B, D); ``mask`` (B,) drops examples (batch filler)
    from both the samples and the mixture. Log densities go through logsumexp (the reference
    averages raw densities, which underflow in float32). Like the reference's Gaussian estimator
    (``DGBasedGaussianKLD``, the mode its docstring calls "narrow"), it matches each dimension's
    marginal only: an aggregate posterior with holes in the joint can have a gap of zero.
    """
    batch, samples, dims = z.shape
    if mask is None:
        mask = jnp.ones((batch,), bool)
    pad = -batch % chunk_size

    def chunked(x, fill):
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
        return x.reshape(-1, chunk_size, *x.shape[1:])

    z_c, mu_c, logvar_c = chunked(z, 0.0), chunked(mu, 0.0), chunked(logvar, 0.0)
    mask_c = chunked(mask, False)  # (C, b)
    count = jnp.sum(mask_c, axis=1)  # |b| of each chunk: its real examples
    # The chunk's mixture (1/|b|) Σ_k N(·; μ_k, σ²_k), filler components weighted 0, at each of
    # its b·M samples, per dimension: (C, bM, D).
    log_weights = jnp.where(mask_c, -jnp.log(jnp.maximum(count, 1))[:, None], -jnp.inf)
    zs = z_c.reshape(z_c.shape[0], -1, dims)
    log_q = jax.vmap(lambda *a: densities.log_mixture(*a)[1])(zs, mu_c, logvar_c, log_weights)
    log_p = -0.5 * (jnp.square(zs) + densities.LOG_2PI)
    sample_mask = jnp.repeat(mask_c, samples, axis=1)  # (C, bM)
    gap = jnp.where(sample_mask[..., None], log_q - log_p, 0.0)
    per_chunk = jnp.sum(gap, axis=(1, 2)) / jnp.maximum(count * samples, 1)  # L_c
    has_real = count > 0
    return jnp.sum(jnp.where(has_real, per_chunk, 0.0)) / jnp.maximum(jnp.sum(has_real), 1)


DG_STREAM = 0xD6  # folded into an example's key for its density-gap samples


def dg_vae(
    outputs: dict[str, jnp.ndarray],
    tokens: jnp.ndarray,
    beta: jnp.ndarray,
    num_samples: int = 32,
    chunk_size: int = 0,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """Σ_n Rec_n + β·N·L_DG: DG-VAE's objective (Zhang et al. 2022), the density gap
    `density_gap` of ``num_samples`` reparameterised samples per example in place of the
    per-example KL, over chunks of ``chunk_size`` examples (0: the whole batch, the
    reference's |b|). The samples come from each example's key (``outputs["keys"]``)."""
    real = _real(tokens)
    rec = reconstruction(outputs["logits"], tokens)
    mu, logvar = outputs["mu"], outputs["logvar"]
    sums = batch_sums(rec, gaussian_kl(mu, logvar), tokens)

    def draw(key):
        return jax.random.normal(jax.random.fold_in(key, DG_STREAM), (num_samples, mu.shape[-1]))

    eps = jax.vmap(draw)(outputs["keys"]).astype(mu.dtype)
    z = mu[:, None, :] + jnp.exp(0.5 * logvar)[:, None, :] * eps
    gap = density_gap(z, mu, logvar, chunk_size or mu.shape[0], real)
    gap_term = sums["sequences"] * gap
    return sums["rec"] + beta * gap_term, {**sums, "kl_objective": gap_term}


OBJECTIVES: dict[str, Objective] = {
    "beta_elbo": beta_elbo,
    "free_bits": free_bits,
    "dg_vae": dg_vae,
}


# The papers' defaults, one config section per objective with hyperparameters:
# free bits: λ = 0.5 nats per dimension, one of the targets Li et al. (2019) sweep for PTB;
# DG-VAE: M = 32 samples per example, chunks of the whole batch (Zhang et al. 2022).
DEFAULTS: dict[str, dict] = {
    "free_bits": {"lambda_per_dim": 0.5},
    "dg_vae": {"num_samples": 32, "chunk_size": 0},
}
# The remedies a config variant can name, "<remedy>[_<schedule>]": these objectives, and
# BN-VAE (Zhu et al. 2020), a model option (``config.model.bn_gamma``) trained on the β-ELBO.
REMEDIES = (*DEFAULTS, "bn_vae")
# BN-VAE's fixed scale of μ: γ = 0.5, within the range Zhu et al. (2020) report (0.3–1.2);
# it bounds E[KL] below by D·γ²/2 (4 nats for D = 32).
BN_VAE_GAMMA = 0.5


def split_variant(variant: str) -> tuple[str, str]:
    """A config variant ``<remedy>[_<schedule>]`` as (remedy, the rest of the variant):
    ``dg_vae_constant`` → ("dg_vae", "constant"), ``dg_vae`` → ("dg_vae", "cyclical"),
    ``monotonic`` → ("beta_elbo", "monotonic")."""
    for remedy in REMEDIES:
        if variant == remedy or variant.startswith(remedy + "_"):
            return remedy, variant[len(remedy) :].lstrip("_") or "cyclical"
    return "beta_elbo", variant


def make(config) -> Objective:
    """``config.objective`` with its hyperparameters from ``config.<objective>`` (if any)."""
    fn = OBJECTIVES[config.objective]
    params = config.get(config.objective)
    return functools.partial(fn, **params.to_dict()) if params is not None else fn
