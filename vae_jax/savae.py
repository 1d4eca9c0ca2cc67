"""Semi-amortized VAE (SA-VAE, Kim et al., ICML 2018): SVI refinement of the encoder's posterior.

The encoder gives λ₀ = (μ, log σ²) of q(z|x); K steps of stochastic variational inference then
refine it on each example's own objective f_n(λ) = Rec_n + β·KL_n (the negative β-ELBO, Fu et
al. 2019 Eq. 4), by SGD with momentum and per-example gradient-norm clipping (Kim et al., Sec. 3,
Algorithm 1):

    v₀ = 0,   v_{k+1} = γ v_k − clip_c(∇_λ f(λ_k)),   λ_{k+1} = λ_k + α v_{k+1}

and the model is trained on f(λ_K). End to end (Algorithm 1), the gradient of f(λ_K) reaches the
encoder through λ₀ and the decoder both directly and through every refinement step (the
Hessian-vector products of Algorithm 1's backward loop, here computed exactly by `jax.grad`
through the `lax.scan`). With ``svi_end_to_end=False`` the decoder is trained on f at a
constant λ_K and the encoder on its own objective f(λ₀).

Noise is per example as in `models.VAE`: example n's key gives the final z sample and dropout
masks exactly as ``VAE.__call__`` splits it, so with K = 0 everything here computes what the
plain VAE computes; SVI step k draws its own from ``fold_in(fold_in(key_n, SVI_STREAM), k)``.

Everything is a pure function of ``params`` built on ``model.apply(..., method=...)``, so that
``jax.grad`` with respect to λ inside the scan and the outer gradient through it compose.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from vae_jax import models, objectives

Objective = objectives.Objective
Lambda = tuple[jnp.ndarray, jnp.ndarray]  # (μ, log σ²), each (B, latent_dim)

# Folded into an example's key to derive its SVI noise; any constant that differs from what the
# plain VAE uses. Changing it changes every SA-VAE run's noise.
SVI_STREAM = 0x5A5E

SVI_FIELDS = (
    "svi_steps",
    "svi_lr",
    "svi_momentum",
    "svi_max_grad_norm",
    "svi_end_to_end",
    "svi_remat",
)


class SAVAE(models.VAE):
    """`models.VAE` plus the settings of its SVI refinement (same parameters, same ``apply``).

    The model's own methods are the plain VAE's; refinement lives in this module's functions
    (`apply`, `loss`), which the train and eval steps call for an SAVAE.

    Learning rate and clipping act on the gradient of one example's f_n, so an example's
    refinement does not depend on its batch. The reference code (Kim et al.'s ``optim_n2n.py``,
    reused by Fu et al.) descends the *mean* of f_n over a batch of (up to) 32 with lr 1 and
    clips the whole batch's gradient at 5: per example, lr 1/32 and a clip of 5·32 on ∇f_n, the
    defaults. The two agree whenever the reference does not clip; when it does, it scales the
    whole batch where this scales only the examples over the bound. μ and log σ² are clipped
    separately, as in the reference. (A per-example lr of 1 is 32 times the reference's step and
    diverges once posteriors are sharper than σ² ≈ 1/3.)
    """

    svi_steps: int = 10
    svi_lr: float = 1.0 / 32
    svi_momentum: float = 0.5
    svi_max_grad_norm: float = 5.0 * 32
    svi_end_to_end: bool = True
    # Recompute each SVI step in the backward pass instead of storing its activations (one
    # decoder forward and backward per step, with (B, T, V) logits): memory stays that of a
    # single step whatever K is.
    svi_remat: bool = True

    def __post_init__(self):
        checks = (
            ("svi_steps", isinstance(self.svi_steps, int) and self.svi_steps >= 0, ">= 0 (int)"),
            ("svi_lr", self.svi_lr > 0, "> 0"),
            ("svi_momentum", 0 <= self.svi_momentum < 1, "in [0, 1)"),
            ("svi_max_grad_norm", self.svi_max_grad_norm > 0, "> 0"),
        )
        for field, ok, allowed in checks:
            if not ok:
                raise ValueError(
                    f"config.model.{field}={getattr(self, field)!r}: must be {allowed}."
                )
        super().__post_init__()


def svi_defaults(svi_steps: int = 0) -> dict:
    """The ``config.model`` fields of the SVI refinement, at `SAVAE`'s defaults (the PTB
    reference's settings), with ``svi_steps`` steps (0: the plain VAE). Configs take them from
    here, so the defaults have one home."""
    defaults = {f.name: f.default for f in dataclasses.fields(SAVAE) if f.name in SVI_FIELDS}
    return {**defaults, "svi_steps": svi_steps}


def amortized(model: SAVAE) -> models.VAE:
    """The same network without refinement: its posterior is the encoder's λ₀ (same params)."""
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(models.VAE)}
    return models.VAE(**{k: v for k, v in fields.items() if k not in ("parent", "name")})


def split_keys(keys: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(z keys, dropout keys), one each per example, split as ``VAE.__call__`` splits them."""
    z_keys, dropout_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
    return z_keys, dropout_keys


def svi_keys(keys: jnp.ndarray, num_steps: int) -> jnp.ndarray:
    """(K, B, …) keys: step k of example n gets ``fold_in(fold_in(keys[n], SVI_STREAM), k)``."""
    steps = jnp.arange(num_steps)

    def per_example(key):
        stream = jax.random.fold_in(key, SVI_STREAM)
        return jax.vmap(jax.random.fold_in, (None, 0))(stream, steps)

    return jnp.moveaxis(jax.vmap(per_example)(keys), 1, 0)


def outputs_at(
    model: models.VAE,
    params,
    tokens: jnp.ndarray,
    lam: Lambda,
    keys: jnp.ndarray,
    *,
    train: bool,
) -> dict[str, jnp.ndarray]:
    """What ``VAE.__call__`` returns had the encoder output ``lam``: z ~ N(μ, σ²) from each
    example's key, the decoder's logits (dropout only when ``train``), μ, log σ² and z."""
    mu, logvar = lam
    z_keys, dropout_keys = split_keys(keys)
    variables = {"params": params}
    z = model.apply(variables, mu, logvar, z_keys, method=models.VAE.sample)
    logits = model.apply(
        variables, tokens, z, dropout_keys if train else None, method=models.VAE.decode
    )
    return {"logits": logits, "mu": mu, "logvar": logvar, "z": z, "keys": keys}


def svi_gradients(
    model: models.VAE,
    params,
    tokens: jnp.ndarray,
    lam: Lambda,
    keys: jnp.ndarray,
    *,
    beta: jnp.ndarray,
    objective: Objective = objectives.beta_elbo,
    train: bool,
) -> tuple[jnp.ndarray, Lambda]:
    """Σ_n f_n(λ_n) and its gradient with respect to λ, whose row n is ∇_{λ_n} f_n(λ_n).

    ``objective`` must be a sum of per-example terms (as `objectives.beta_elbo` is, filler rows
    contributing 0), so the gradient of the batch sum holds every example's own gradient at the
    cost of one backward pass. One z sample (and, when ``train``, one dropout mask) per example.
    """

    def total(lam_):
        return objective(outputs_at(model, params, tokens, lam_, keys, train=train), tokens, beta)[
            0
        ]

    return jax.value_and_grad(total)(lam)


def clip_rows(g: jnp.ndarray, max_norm: float) -> jnp.ndarray:
    """g_n · min(1, c / (‖g_n‖ + 10⁻⁶)) for each row n, the reference's clipping per example."""
    sq = jnp.sum(jnp.square(g), axis=-1, keepdims=True)
    # √ has an infinite derivative at 0 and filler rows have zero gradient: keep the backward
    # pass through the refinement finite there.
    norm = jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)
    return g * jnp.minimum(1.0, max_norm / (norm + 1e-6))


def refine(
    model: SAVAE,
    params,
    tokens: jnp.ndarray,
    lam: Lambda,
    keys: jnp.ndarray,
    *,
    beta: jnp.ndarray,
    objective: Objective = objectives.beta_elbo,
    train: bool,
) -> Lambda:
    """λ_K after ``model.svi_steps`` steps of SGD with momentum on each f_n (Algorithm 1):
    v_{k+1} = γ v_k − clip(∇_λ f(λ_k)), λ_{k+1} = λ_k + α v_{k+1}, v₀ = 0.

    Differentiable: the gradient of a function of λ_K flows back to ``lam`` and ``params``.
    """

    def step(carry, step_keys):
        lam_k, velocity = carry
        _, grads = svi_gradients(
            model, params, tokens, lam_k, step_keys, beta=beta, objective=objective, train=train
        )
        grads = tuple(clip_rows(g, model.svi_max_grad_norm) for g in grads)
        velocity = tuple(model.svi_momentum * v - g for v, g in zip(velocity, grads, strict=True))
        lam_k = tuple(x + model.svi_lr * v for x, v in zip(lam_k, velocity, strict=True))
        return (lam_k, velocity), None

    if model.svi_remat:
        step = jax.checkpoint(step, prevent_cse=False)  # inside scan CSE cannot hurt
    velocity = tuple(jnp.zeros_like(x) for x in lam)
    (lam_k, _), _ = jax.lax.scan(step, (tuple(lam), velocity), svi_keys(keys, model.svi_steps))
    return lam_k


def apply(
    model: SAVAE,
    params,
    tokens: jnp.ndarray,
    keys: jnp.ndarray,
    *,
    beta: jnp.ndarray,
    train: bool,
) -> dict[str, jnp.ndarray]:
    """``model.apply``'s outputs (logits, μ, log σ², z) at the refined λ_K instead of λ₀, the
    refinement descending each example's β-ELBO, as in `loss`.

    With β = 1 the refinement maximises the ELBO being reported, and ``train=False`` means no
    dropout (in the SVI steps either).
    """
    lam0 = model.apply({"params": params}, tokens, method=models.VAE.encode)
    lam = refine(model, params, tokens, lam0, keys, beta=beta, train=train)
    return outputs_at(model, params, tokens, lam, keys, train=train)


def loss(
    model: SAVAE,
    params,
    tokens: jnp.ndarray,
    keys: jnp.ndarray,
    *,
    beta: jnp.ndarray,
    objective: Objective = objectives.beta_elbo,
    train: bool = True,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray], dict[str, jnp.ndarray]]:
    """``objective`` at λ_K: its value, its sums and the outputs there (what ``model.apply``
    returns, at λ_K); its gradient is the SA-VAE's. `vae_jax.forward.apply` calls it. The
    refinement itself always descends the per-example β-ELBO at ``beta``.

    End to end (Algorithm 1): d f(λ_K(φ, θ), θ) / d(φ, θ), through the refinement. Otherwise the
    decoder gets ∂f(λ_K, θ)/∂θ at a constant λ_K and the encoder ∂f(λ₀(φ), θ)/∂φ at a constant
    θ (the reference's ``train_n2n=0, train_kl=0``); that term is added as f(λ₀) − f(λ₀) held
    constant, so it moves the gradient and not the value (and is dead code, removed by XLA,
    where nobody differentiates).
    """
    *lam0, bn_stats = model.apply(
        {"params": params}, tokens, train, method=models.VAE.encode_with_stats
    )
    lam0 = tuple(lam0)
    # SVI refines each example's own β-ELBO (its per-example gradients need a sum of
    # per-example terms); a batch-level remedy (free bits, the density gap) is the objective
    # the model is then trained on at λ_K.
    kwargs = {"beta": beta, "objective": objectives.beta_elbo, "train": train}
    if model.svi_end_to_end:
        lam = refine(model, params, tokens, lam0, keys, **kwargs)
        outputs = {
            **outputs_at(model, params, tokens, lam, keys, train=train),
            "bn_stats": bn_stats,
        }
        return (*objective(outputs, tokens, beta), outputs)
    frozen = jax.lax.stop_gradient(params)
    lam = refine(model, frozen, tokens, jax.lax.stop_gradient(lam0), keys, **kwargs)
    outputs = {**outputs_at(model, params, tokens, lam, keys, train=train), "bn_stats": bn_stats}
    total, sums = objective(outputs, tokens, beta)
    encoder_total, _ = objective(
        outputs_at(model, frozen, tokens, lam0, keys, train=train), tokens, beta
    )
    return total + (encoder_total - jax.lax.stop_gradient(encoder_total)), sums, outputs
