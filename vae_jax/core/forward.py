"""The one forward pass: a model's outputs and its objective's sums for a batch.

    objective_sum, sums, outputs = forward.apply(model, params, batch, keys,
                                                 beta=β, objective=objectives.beta_elbo,
                                                 train=True)

Every consumer goes through `apply`: the train step (``train=True``, differentiated), the eval
step and the metrics (``train=False``, β = 1). It is where a model kind says how it is run:

- `models.VAE`: ``model.apply`` at the encoder's posterior λ₀ = (μ, log σ²);
- `savae.SAVAE`: at the SVI-refined posterior λ_K (Kim et al. 2018), the refinement descending
  each example's β-ELBO at the same β, the model trained on ``objective`` at λ_K, its gradient
  the SA-VAE's (`savae.loss`);
- a model that reads more than ``tokens`` (the dialog CVAE: its context) defines
  ``example_batch(length)`` and is applied to the whole batch; outputs with a bag-of-words
  term (``bow_nll``, CVAE+BoW) add it to the objective (`objectives.with_bow`).

So an SA-VAE is always scored where it is trained, and a new model kind plugs in here.
``outputs`` holds at least ``logits``, ``mu``, ``logvar`` and ``z`` (the posterior used) and
``keys`` (each example's key, for objectives that draw samples of their own);
``objective_sum`` is summed over the batch's sequences, ``sums`` are the additive statistics of
`objectives.batch_sums`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from vae_jax.core import objectives, savae


class Forward(NamedTuple):
    objective_sum: jax.Array
    sums: dict[str, jax.Array]
    outputs: dict[str, jax.Array]


def apply(
    model: nn.Module,
    params: Any,
    batch: dict[str, jnp.ndarray],
    keys: jnp.ndarray,
    *,
    beta: jnp.ndarray | float,
    objective: objectives.Objective = objectives.beta_elbo,
    train: bool,
) -> Forward:
    """The objective (Σ over sequences), its sums and the model's outputs for one batch.

    ``batch``: ``tokens`` (B, T) and, for a CVAE, its context (`vae_jax.dialog.cvae`);
    ``keys``: one PRNG key per row (its z sample and, when ``train``, its dropout masks);
    ``train`` switches dropout on (and, for an SA-VAE, in its SVI steps too).
    """
    beta = jnp.asarray(beta, jnp.float32)
    tokens = batch["tokens"]
    if isinstance(model, savae.SAVAE):
        return Forward(
            *savae.loss(model, params, tokens, keys, beta=beta, objective=objective, train=train)
        )
    inputs = batch if reads_batch(model) else tokens
    outputs = {**model.apply({"params": params}, inputs, keys, train=train), "keys": keys}
    objective_sum, sums = objective(outputs, tokens, beta)
    if "bow_nll" in outputs:  # CVAE+BoW; the plain CVAE has no bag-of-words head
        objective_sum, sums = objectives.with_bow((objective_sum, sums), outputs, tokens)
    return Forward(objective_sum, sums, outputs)


def reads_batch(model: Any) -> bool:
    """Whether ``model`` takes the whole batch (it defines ``example_batch``), not ``tokens``."""
    return hasattr(model, "example_batch")


def example_batch(model: nn.Module, length: int = 2) -> dict[str, jnp.ndarray]:
    """A one-row batch of the model's input layout (zeros), rows ``length`` tokens long."""
    if reads_batch(model):
        return model.example_batch(length=length)
    return {"tokens": jnp.zeros((1, length), jnp.int32)}


def init(model: nn.Module, rng: jax.Array, batch: dict[str, jnp.ndarray]) -> Any:
    """Fresh parameters of ``model`` for batches shaped like ``batch``, as one compiled
    program (run eagerly, initialisation compiles each of its ~90 small ops apart)."""
    return _init(model, rng, batch)


@functools.partial(jax.jit, static_argnums=0)
def _init(model: nn.Module, rng: jax.Array, batch: dict[str, jnp.ndarray]) -> Any:
    keys = jax.random.split(rng, batch["tokens"].shape[0])
    inputs = batch if reads_batch(model) else batch["tokens"]
    return model.init(rng, inputs, keys, train=False)["params"]
