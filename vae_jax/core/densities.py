"""Diagonal-Gaussian log densities shared by the objectives and the metrics.

Imports nothing of the package (ground floor).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LOG_2PI = math.log(2.0 * math.pi)


def standard_normal_log_density(z: jnp.ndarray) -> jnp.ndarray:
    """log p(z) = log N(z; 0, I) = −½ Σ_d (z_d² + log 2π), over the last axis."""
    return -0.5 * jnp.sum(jnp.square(z) + LOG_2PI, axis=-1)


def log_mixture(
    z: jnp.ndarray, mu: jnp.ndarray, logvar: jnp.ndarray, log_weights: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """log Σ_j π_j N(z; μ_j, diag σ_j²) for queries z (Q, D) and components (N, D).

    Returns the joint, (Q,), and each dimension's marginal log Σ_j π_j N(z_d; μ_jd, σ_jd²),
    (Q, D). ``log_weights`` = log π_j; −inf drops a component (batch filler). In logsumexp
    form: the densities themselves underflow float32 for sharp, distant components.
    """
    comp = -0.5 * (
        jnp.square(z[:, None, :] - mu[None]) * jnp.exp(-logvar)[None] + logvar[None] + LOG_2PI
    )  # (Q, N, D): differences taken directly, not expanded, to keep float32 digits
    joint = jax.nn.logsumexp(jnp.sum(comp, -1) + log_weights[None], axis=1)
    marginal = jax.nn.logsumexp(comp + log_weights[None, :, None], axis=1)
    return joint, marginal
