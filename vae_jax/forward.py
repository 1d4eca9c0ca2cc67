"""The one forward pass: a model's outputs and its objective's sums for a batch.

    objective_sum, sums, outputs = forward.apply(model, params, tokens, keys,
                                                 beta=β, objective=objectives.beta_elbo,
                                                 train=True)

Every consumer goes through `apply`: the train step (``train=True``, differentiated), the eval
step and the metrics (``train=False``, β = 1). It is where a model kind says how it is run:

- `models.VAE`: ``model.apply`` at the encoder's posterior λ₀ = (μ, log σ²);
- `savae.SAVAE`: at the SVI-refined posterior λ_K (Kim et al. 2018), the refinement descending
  each example's β-ELBO at the same β, the model trained on ``objective`` at λ_K, its gradient
  the SA-VAE's (`savae.loss`).

So an SA-VAE is always scored where it is trained, and a new model kind plugs in here.
``outputs`` holds at least ``logits``, ``mu``, ``logvar`` and ``z`` (the posterior used) and
``keys`` (each example's key, for objectives that draw samples of their own);
``objective_sum`` is summed over the batch's sequences, ``sums`` are the additive statistics of
`objectives.batch_sums`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from vae_jax import models, objectives, savae


class Forward(NamedTuple):
    objective_sum: jax.Array
    sums: dict[str, jax.Array]
    outputs: dict[str, jax.Array]


def apply(
    model: models.VAE,
    params: Any,
    tokens: jnp.ndarray,
    keys: jnp.ndarray,
    *,
    beta: jnp.ndarray | float,
    objective: objectives.Objective = objectives.beta_elbo,
    train: bool,
) -> Forward:
    """The objective (Σ over sequences), its sums and the model's outputs for one batch.

    ``keys``: one PRNG key per row (its z sample and, when ``train``, its dropout masks);
    ``train`` switches dropout on (and, for an SA-VAE, in its SVI steps too).
    """
    beta = jnp.asarray(beta, jnp.float32)
    if isinstance(model, savae.SAVAE):
        return Forward(
            *savae.loss(model, params, tokens, keys, beta=beta, objective=objective, train=train)
        )
    outputs = {**model.apply({"params": params}, tokens, keys, train=train), "keys": keys}
    objective_sum, sums = objective(outputs, tokens, beta)
    return Forward(objective_sum, sums, outputs)
