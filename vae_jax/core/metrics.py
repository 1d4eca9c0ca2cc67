"""Metrics of a text VAE, each defined exactly, with the paper whose definition it follows.

Notation: q(z|x) = N(μ(x), diag σ²(x)) over D latent dimensions, p(z) = N(0, I), x_1 … x_N the
real (non-filler) sentences of a split, q_N(z) = (1/N) Σ_j q(z|x_j) its aggregated posterior.
All logs are natural (nats).

- ELBO figures from additive sums (`add_sums`, `summarize`, `elbo_figures`): Rec, KL, −ELBO and
  the PPL bound, exact over batches and devices; training reports these.
- IW-NLL and IW-PPL (`iw_log_weights`, `iw_nll_from_log_weights`): Burda et al. (2016), with
  He et al.'s (2019) protocol of K = 500 samples.
- Mutual information I_q(x; z), two estimators in use: per mini-batch (He et al. 2019, ceiling
  ln B) and over the whole split (Li et al. 2019, BN-VAE, DG-VAE; ceiling ln N).
- Active units (`active_units`): Burda et al. (2016), threshold 0.01.
- Posterior-hole metrics (`hole_metrics`): DG-VAE (Zhang et al. 2022), KL(p(z) ‖ q_N(z)) and
  CU@τ.
"""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vae_jax.core import forward, models, objectives
from vae_jax.core.densities import LOG_2PI, log_mixture, standard_normal_log_density
from vae_jax.core.tokens import sequence_lengths


def add_sums(a: Mapping[str, float] | None, b: Mapping[str, float]) -> dict[str, float]:
    """Element-wise sum of two sums dicts (``a`` may be None: the empty sum)."""
    return {k: (0.0 if a is None else a[k]) + float(v) for k, v in b.items()}


def exp_or_inf(x: float) -> float:
    """exp(x), inf where it overflows (a diverged model), NaN for NaN."""
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


def summarize(sums: Mapping[str, float]) -> dict[str, float]:
    """Per-sequence and per-token figures from summed statistics.

    rec = ΣRec / N, kl = ΣKL / N, elbo = −(rec + kl) (a lower bound on log p(x) per sequence),
    ppl_bound = exp((ΣRec + ΣKL) / #predicted tokens), ``</s>`` included: an upper bound on the
    perplexity when Rec is estimated with one sample; ``rec_ppl`` = exp(ΣRec / #tokens), the
    response perplexity (Rec-P) of the official dialog code (one z from q(z|x, c)). A
    CVAE+BoW's sums add ``bow``, its bag-of-words loss per sequence; a CVAE's KL is to p(z|c).
    """
    n, tokens = float(sums["sequences"]), float(sums["tokens"])
    if n <= 0:
        raise ValueError("summarize: no sequences were summed (sums['sequences'] == 0).")
    rec, kl = float(sums["rec"]) / n, float(sums["kl"]) / n
    figures = {
        "rec": rec,
        "kl": kl,
        "elbo": -(rec + kl),
        "ppl_bound": exp_or_inf((rec + kl) * n / tokens) if tokens > 0 else float("nan"),
    }
    figures["rec_ppl"] = exp_or_inf(rec * n / tokens) if tokens > 0 else float("nan")
    if "bow" in sums:  # a CVAE+BoW's bag-of-words loss
        figures["bow"] = float(sums["bow"]) / n
    return figures


Batches = Sequence[Mapping[str, np.ndarray]]


# --- ELBO, as during training ----------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("model", "objective"))
def _split_batch(
    params: Any,
    batch: dict[str, jnp.ndarray],
    key: jax.Array,
    *,
    model: models.VAE,
    objective: objectives.Objective,
) -> tuple[dict, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    tokens = batch["tokens"]
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(tokens.shape[0]))
    _, sums, outputs = forward.apply(
        model, params, batch, keys, beta=1.0, objective=objective, train=False
    )
    return sums, outputs["mu"], outputs["logvar"], sequence_lengths(tokens) > 0


def elbo_and_posteriors(
    model: models.VAE,
    params: Any,
    batches: Batches,
    key: jax.Array,
    objective: objectives.Objective = objectives.beta_elbo,
) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """ELBO figures and posteriors of a split, from one `forward.apply` pass per batch at the
    posterior the model is trained at (an SA-VAE's refined λ_K, its SVI steps at β = 1).

    Returns `summarize` of the split (no dropout, Rec from one z per sentence, KL analytic);
    μ and log σ² of every row, (num_batches, B, D); and which rows are real, (num_batches, B).
    Batches keep their shape (fixed-size batches, filler rows marked not real), which is what
    the mini-batch MI needs; ``mu[real]`` are the split's N posteriors in order. The noise of
    row n of batch i comes from ``fold_in(fold_in(key, i), n)``, as in training's evaluation
    on one device: with the run's evaluation key (`vae_jax.run.build.eval_key`) the figures are
    the logged ones, and an SA-VAE's λ_K are those its logged figures were computed at.
    """
    if not batches:
        raise ValueError("elbo_and_posteriors: no batches.")
    total, out = None, []
    for i, batch in enumerate(batches):
        sums, *posterior = _split_batch(
            params, dict(batch), jax.random.fold_in(key, i), model=model, objective=objective
        )
        total = add_sums(total, jax.device_get(sums))
        out.append(jax.device_get(posterior))
    if len({o[0].shape for o in out}) > 1:
        raise ValueError(
            "posteriors: batches of different sizes "
            f"{sorted({o[0].shape[0] for o in out})}; evaluation batches have one fixed size."
        )
    mu, logvar, real = (np.stack(x) for x in zip(*out, strict=True))
    return summarize(total), mu, logvar, real


def elbo_figures(
    model: models.VAE,
    params: Any,
    batches: Batches,
    key: jax.Array,
    objective: objectives.Objective = objectives.beta_elbo,
) -> dict:
    """The ELBO figures of `elbo_and_posteriors`."""
    return elbo_and_posteriors(model, params, batches, key, objective)[0]


# --- Densities -------------------------------------------------------------------------------


def neg_entropy(logvar: jnp.ndarray) -> jnp.ndarray:
    """E_{q(z|x)}[log q(z|x)] = −½ Σ_d (log 2π + 1 + log σ_d²), the closed form, per row."""
    return -0.5 * jnp.sum(LOG_2PI + 1.0 + logvar, axis=-1)


@functools.partial(jax.jit, static_argnames="chunk")
def _log_aggregate_posterior(
    z: jnp.ndarray, mu: jnp.ndarray, logvar: jnp.ndarray, chunk: int
) -> tuple[jnp.ndarray, jnp.ndarray]:
    queries = z.shape[0]
    blocks = jnp.pad(z, ((0, -queries % chunk), (0, 0))).reshape(-1, chunk, z.shape[1])
    log_weights = jnp.full(mu.shape[:1], -math.log(mu.shape[0]), mu.dtype)
    joint, marginal = jax.lax.map(lambda b: log_mixture(b, mu, logvar, log_weights), blocks)
    return joint.reshape(-1)[:queries], marginal.reshape(-1, z.shape[1])[:queries]


def log_aggregate_posterior(
    z: np.ndarray, mu: np.ndarray, logvar: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """log q_N(z) (Q,) and the marginals log q_N(z_d) = log (1/N) Σ_j N(z_d; μ_jd, σ_jd²) (Q, D).

    q_N is the mixture of the N posteriors (mu, logvar: (N, D)) with weights 1/N, evaluated at
    the Q rows of z. Queries go in blocks of about 4M (query, component, dimension) terms.
    """
    mu, logvar = np.asarray(mu, np.float32), np.asarray(logvar, np.float32)
    chunk = max(1, 2**22 // (mu.shape[0] * mu.shape[1]))
    joint, marginal = _log_aggregate_posterior(np.asarray(z, np.float32), mu, logvar, chunk)
    return np.asarray(joint), np.asarray(marginal)


# --- Posteriors of a split -------------------------------------------------------------------


def _posterior_samples(mu: np.ndarray, logvar: np.ndarray, key: jax.Array) -> np.ndarray:
    """z_i = μ_i + σ_i ⊙ ε_i with ε_i from ``fold_in(key, i)``, one per row of (N, D)."""
    eps = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), mu.shape[1:]))(
        jnp.arange(mu.shape[0])
    )
    return mu + np.exp(0.5 * logvar) * np.asarray(eps, np.float64)


# --- Mutual information ----------------------------------------------------------------------


def mutual_info(mu: np.ndarray, logvar: np.ndarray, key: jax.Array) -> dict[str, float]:
    """Whole-split I_q(x; z) (Li et al. 2019 ``calc_mi``, also BN-VAE and DG-VAE).

        I_q(x; z) = E_x E_{q(z|x)}[log q(z|x)] − E_{q(z)}[log q(z)]
                  ≈ (1/N) Σ_i [−H(q(z|x_i)) − log q_N(z_i)],   z_i ~ q(z|x_i), one per sentence

    with the entropy in closed form and q_N the aggregated posterior of all N sentences.
    ``mi_ceiling`` = ln N: as x is uniform over N sentences, I ≤ H(x) = ln N (the estimate
    meets it in expectation; one draw can pass it, or 0, by its Monte Carlo error
    ``mi_stderr`` = std_i(term_i)/√N).
    """
    mu, logvar = np.asarray(mu, np.float64), np.asarray(logvar, np.float64)
    z = _posterior_samples(mu, logvar, key)
    log_q, _ = log_aggregate_posterior(z, mu, logvar)
    terms = np.asarray(neg_entropy(logvar)) - log_q
    return {
        "mi": float(np.mean(terms)),
        "mi_stderr": float(np.std(terms) / math.sqrt(len(terms))),
        "mi_ceiling": math.log(len(terms)),
    }


@jax.jit
def _minibatch_log_q(z: jnp.ndarray, mu: jnp.ndarray, logvar: jnp.ndarray, real: jnp.ndarray):
    """log q_B(z_i) of every row of every batch, the mixture over that batch's real rows."""

    def one(z_b, mu_b, logvar_b, real_b):
        log_w = jnp.where(real_b, -jnp.log(jnp.maximum(jnp.sum(real_b), 1)), -jnp.inf)
        return log_mixture(z_b, mu_b, logvar_b, log_w)[0]

    return jax.vmap(one)(z, mu, logvar, real)


def mutual_info_minibatch(
    mu: np.ndarray, logvar: np.ndarray, real: np.ndarray, key: jax.Array
) -> dict[str, float]:
    """Mini-batch I_q(x; z) (He et al. 2019 ``calc_mi``, averaged over batches by size).

    For a batch b of B_b sentences, with q_B(z) = (1/B_b) Σ_{j∈b} q(z|x_j):

        I_b = (1/B_b) Σ_{i∈b} [−H(q(z|x_i)) − log q_B(z_i)],   z_i ~ q(z|x_i)
        MI  = Σ_b B_b I_b / N

    mu, logvar: (num_batches, B, D); real: (num_batches, B) (filler rows are ignored). Each I_b
    is at most ln B_b in expectation, so ``mi_batch_ceiling`` = Σ_b B_b ln B_b / N; with the
    length-grouped evaluation batches many batches are small and the ceiling is below ln B of
    a full batch (reported too, ``mi_batch_size``).
    """
    mu, logvar, real = np.asarray(mu), np.asarray(logvar), np.asarray(real, bool)
    flat_z = _posterior_samples(mu[real], logvar[real], key)  # same ε_i as `mutual_info`
    z = np.zeros(mu.shape, np.float32)
    z[real] = flat_z
    log_q = np.asarray(_minibatch_log_q(z, mu, logvar, real))[real]
    terms = np.asarray(neg_entropy(logvar[real].astype(np.float64))) - log_q
    sizes = real.sum(axis=1)
    sizes = sizes[sizes > 0]
    return {
        "mi_batch": float(np.mean(terms)),
        "mi_batch_stderr": float(np.std(terms) / math.sqrt(len(terms))),
        "mi_batch_ceiling": float(np.sum(sizes * np.log(sizes)) / np.sum(sizes)),
        "mi_batch_size": int(real.shape[1]),
    }


# --- Active units ----------------------------------------------------------------------------


def active_units(mu: np.ndarray, threshold: float = 0.01) -> tuple[int, np.ndarray]:
    """Number of active units and the variances A_d (Burda et al. 2016; He et al. 2019).

        A_d = Cov_x(E_{q(z|x)}[z_d]) = Σ_i (μ_id − μ̄_d)² / (N − 1),   active if A_d > threshold

    mu: (N, D), the posterior means of the split. (He et al.'s code tests A_d ≥ 0.01; the two
    differ only at equality.)
    """
    mu = np.asarray(mu, np.float64)
    if mu.ndim != 2 or mu.shape[0] < 2:
        raise ValueError(f"active_units: mu must be (N >= 2, D), got shape {mu.shape}.")
    variances = np.var(mu, axis=0, ddof=1)
    return int(np.sum(variances > threshold)), variances


# --- Posterior holes -------------------------------------------------------------------------

CU_THRESHOLDS = (0.01, 0.03, 0.05, 0.1)


def hole_metrics(
    mu: np.ndarray,
    logvar: np.ndarray,
    key: jax.Array,
    num_samples: int = 16_384,
    thresholds: Sequence[float] = CU_THRESHOLDS,
) -> dict[str, Any]:
    """Posterior holes, as DG-VAE (Zhang et al. 2022) measures them, from prior samples.

        KL(p ‖ q_N)         = E_{z~p(z)}[log p(z) − log q_N(z)]            ≈ mean over z_m ~ p(z)
        KL(p_d ‖ q_N,d)     = E_{z_d~N(0,1)}[log N(z_d; 0, 1) − log q_N,d(z_d)]  per dimension
        CU@τ                = #{d : KL(p_d ‖ q_N,d) < τ}

    q_N,d is q_N's marginal on dimension d. A large joint KL means regions the prior samples
    but no posterior covers (holes); CU@τ counts dimensions whose aggregated posterior matches
    the prior (DG-VAE reports τ = 0.03). ``num_samples`` prior draws (DG-VAE: 128,000);
    ``kl_prior_agg_stderr`` is the Monte Carlo standard error of the joint KL.
    """
    if num_samples < 2:
        raise ValueError(f"num_prior_samples={num_samples}: must be >= 2.")
    mu, logvar = np.asarray(mu, np.float32), np.asarray(logvar, np.float32)
    z = np.asarray(jax.random.normal(key, (num_samples, mu.shape[1])), np.float64)
    log_q, log_q_marginal = log_aggregate_posterior(z, mu, logvar)
    joint = np.asarray(standard_normal_log_density(z)) - log_q
    marginal = -0.5 * (np.square(z) + LOG_2PI) - log_q_marginal
    marginal_kl = np.mean(marginal, axis=0)
    return {
        "kl_prior_agg": float(np.mean(joint)),
        "kl_prior_agg_stderr": float(np.std(joint) / math.sqrt(num_samples)),
        "marginal_kl": [float(k) for k in marginal_kl],
        **{f"cu@{t:g}": int(np.sum(marginal_kl < t)) for t in thresholds},
    }


# --- Importance-weighted NLL -----------------------------------------------------------------


def log_importance_weights(
    log_likelihood: Callable[[jnp.ndarray], jnp.ndarray],
    mu: jnp.ndarray,
    logvar: jnp.ndarray,
    eps: jnp.ndarray,
) -> jnp.ndarray:
    """log w_k = log p(x|z_k) + log p(z_k) − log q(z_k|x),  z_k = μ + σ ⊙ ε_k.

    mu, logvar: (S, D); eps: (S, k, D) standard normal; ``log_likelihood`` maps z (S, k, D)
    to log p(x|z) (S, k). log q(z_k|x) = −½ Σ_d (ε_kd² + log σ_d² + log 2π) is computed from
    ε, exact where (z − μ)/σ would lose digits for small σ.
    """
    z = mu[:, None, :] + jnp.exp(0.5 * logvar)[:, None, :] * eps
    log_q = -0.5 * jnp.sum(jnp.square(eps) + logvar[:, None, :] + LOG_2PI, axis=-1)
    return log_likelihood(z) + standard_normal_log_density(z) - log_q


def iw_nll_from_log_weights(log_weights: np.ndarray) -> np.ndarray:
    """IW-NLL_K(x) = −log (1/K) Σ_k w_k = −(logsumexp_k log w_k − log K), over the last axis.

    Burda et al. (2016): E[IW-NLL_K] ≥ −log p(x), non-increasing in K, → −log p(x) as K → ∞;
    K = 1 is the one-sample −ELBO. Float64, with the largest weight factored out.
    """
    log_w = np.asarray(log_weights, np.float64)
    top = np.max(log_w, axis=-1, keepdims=True)
    lse = np.log(np.sum(np.exp(log_w - top), axis=-1)) + top[..., 0]
    return -(lse - math.log(log_w.shape[-1]))


@functools.partial(jax.jit, static_argnames=("model", "num_samples", "samples_per_pass"))
def _iw_chunk(
    params: Any,
    tokens: jnp.ndarray,
    keys: jnp.ndarray,
    proposal: tuple[jnp.ndarray, jnp.ndarray] | None,
    *,
    model: models.VAE,
    num_samples: int,
    samples_per_pass: int,
) -> jnp.ndarray:
    """(S, num_samples) log weights of the rows of ``tokens``; row n's sample s draws its ε
    from ``fold_in(keys[n], s)``, whatever the chunking of rows and samples. The proposal is
    ``proposal`` = (μ, log σ²) of the rows where given, else the encoder's q(z|x)."""
    variables = {"params": params}
    if proposal is None:
        mu, logvar = model.apply(variables, tokens, method=models.VAE.encode)
    else:
        mu, logvar = proposal

    def log_likelihood(z):
        return model.apply(variables, tokens, z, method=models.VAE.log_likelihood)

    def one_pass(p):
        ids = p * samples_per_pass + jnp.arange(samples_per_pass)

        def draws(key):
            return jax.vmap(lambda s: jax.random.normal(jax.random.fold_in(key, s), mu.shape[1:]))(
                ids
            )

        eps = jax.vmap(draws)(keys)
        return log_importance_weights(log_likelihood, mu, logvar, eps.astype(mu.dtype))

    passes = -(-num_samples // samples_per_pass)
    log_w = jax.lax.map(one_pass, jnp.arange(passes))  # (passes, S, k)
    log_w = jnp.moveaxis(log_w, 0, 1).reshape(tokens.shape[0], -1)
    return log_w[:, :num_samples]  # the last pass may overshoot num_samples


def split_rows(batches: Batches) -> list[np.ndarray]:
    """The real rows of a split's batches, in order, cut after their last non-pad token."""
    rows = []
    for batch in batches:
        tokens = np.asarray(batch["tokens"])
        for row, length in zip(tokens, np.asarray(sequence_lengths(tokens)), strict=True):
            if length > 0:
                rows.append(row[:length])
    return rows


def iw_plan(num_samples: int, max_rows: int) -> tuple[int, int]:
    """(sentences per chunk S, samples per pass k): k = ⌈K / ⌈K / max_rows⌉⌉, S·k ≤ max_rows."""
    if num_samples < 1:
        raise ValueError(f"num_importance_samples={num_samples}: must be >= 1.")
    if max_rows < 1:
        raise ValueError(f"max_rows={max_rows}: must be >= 1.")
    per_pass = -(-num_samples // -(-num_samples // max_rows))
    return max(1, max_rows // per_pass), per_pass


def iw_log_weights(
    model: models.VAE,
    params: Any,
    batches: Batches,
    key: jax.Array,
    num_samples: int = 500,
    max_rows: int = 512,
    progress: Callable[[int, int], None] | None = None,
    proposal: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Log importance weights (N, K) and predicted-token counts (N,) of a split's sentences.

    The proposal is q(z|x) = N(μ, σ²) of ``proposal`` = (μ, log σ²), each (N, D) in split
    order (an SA-VAE's refined λ_K, `elbo_and_posteriors`' ``mu[real]``), else the encoder's.

    Sentence n (split order) draws its K samples from ``fold_in(key, n)``. Sentences are sorted
    by length into chunks of S rows, S·k ≤ ``max_rows`` decoder rows at once (`iw_plan`):
    memory stays near ``max_rows`` × vocabulary floats, rows are padded to the split's longest
    so the jit compiles once, and a chunk's decoder loop stops at its longest sentence, which
    sorting keeps close to the others. ``progress(done, total)`` is called as chunks finish, in
    predicted tokens (the work grows with them; sentences come shortest first).
    `iw_nll_from_log_weights` turns the weights into IW-NLL.
    """
    chunk, per_pass = iw_plan(num_samples, max_rows)
    rows = split_rows(batches)
    if not rows:
        raise ValueError("iw_log_weights: the batches hold no real (non-filler) rows.")
    lengths = np.array([len(r) for r in rows])
    # One width for the whole split, so one compilation: padding costs only encoder steps,
    # as the decoder loop stops at each chunk's longest sentence.
    width = int(lengths.max())
    keys = np.asarray(jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(len(rows))))
    if proposal is not None:
        proposal = tuple(np.asarray(x, np.float32) for x in proposal)
        if any(x.shape[0] != len(rows) for x in proposal):
            raise ValueError(
                f"iw_log_weights: proposal has {[x.shape for x in proposal]} rows, the split "
                f"{len(rows)} sentences."
            )
    order = np.argsort(lengths, kind="stable")
    chunks = [order[lo : lo + chunk] for lo in range(0, len(order), chunk)]

    log_w = np.empty((len(rows), num_samples), np.float32)
    in_flight: collections.deque = collections.deque()
    done, total = 0, int(np.sum(lengths - 1))

    def collect():
        nonlocal done
        index, result = in_flight.popleft()
        log_w[index] = np.asarray(result)[: len(index)]
        done += int(np.sum(lengths[index] - 1))
        if progress is not None:
            progress(done, total)

    kwargs = dict(model=model, num_samples=num_samples, samples_per_pass=per_pass)
    for index in chunks:
        tokens = np.zeros((chunk, width), np.int32)  # zero rows are filler
        for slot, i in enumerate(index):
            tokens[slot, : lengths[i]] = rows[i]
        rows_in = np.resize(index, chunk)  # filler rows reuse real rows' keys; discarded
        chunk_proposal = None if proposal is None else tuple(x[rows_in] for x in proposal)
        in_flight.append(
            (index, _iw_chunk(params, tokens, keys[rows_in], chunk_proposal, **kwargs))
        )
        # Dispatch is asynchronous: the next chunk is queued before the oldest is waited for.
        if len(in_flight) > 2:
            collect()
    while in_flight:
        collect()
    return log_w, lengths - 1
