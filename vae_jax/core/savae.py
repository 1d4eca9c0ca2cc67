"""Semi-amortized VAE (SA-VAE, Kim et al., ICML 2018): SVI refinement of the encoder's posterior.

The encoder gives λ₀ = (μ, log σ²) of q(z|x); K steps of stochastic variational inference then
refine it on each example's own objective f_n(λ) = Rec_n + β·KL_n (the negative β-ELBO, Fu et
al. 2019 Eq. 4), by SGD with momentum and per-example gradient-norm clipping (Kim et al., Sec. 3,
Algorithm 1):

    v₀ = 0,   v_{k+1} = γ v_k − clip_c(∇_λ f(λ_k)),   λ_{k+1} = λ_k + α v_{k+1}

and the model is trained on f(λ_K). End to end, the gradient of f(λ_K) reaches the encoder
through λ₀ and the decoder both directly and through every refinement step, by the
Hessian-vector products of the algorithm's backward loop. How they are computed is
``svi_hvp``: ``"exact"``, by `jax.grad` through the `lax.scan` (reverse over reverse);
``"finite_difference"``, the backward loop run by hand with finite-difference products
(`_refine_finite_difference`), as the reference code does. With ``svi_end_to_end=False`` the
decoder is trained on f at a constant λ_K and the encoder on its own objective f(λ₀) (nothing
is differentiated through the refinement, so ``svi_hvp`` does not matter).

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

from vae_jax.core import models, objectives

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
    "svi_hvp",
    "svi_fd_eps",
)
SVI_HVP = ("exact", "finite_difference")


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
    # single step whatever K is. Only for svi_hvp="exact" (the finite-difference backward
    # pass stores no step's activations).
    svi_remat: bool = True
    # How the backward pass through the refinement gets its Hessian-vector products: "exact"
    # (jax.grad through the scan) or "finite_difference" (Kim et al.'s Algorithm 2 with
    # central differences, `_refine_finite_difference`; same forward pass, same values).
    svi_hvp: str = "exact"
    # Finite differences' step: example n's λ_n moves by ±svi_fd_eps·(1 + ‖λ_n‖_∞) in its
    # largest coordinate (`fd_hvp`). The error is O(ε²) truncation plus float rounding
    # O(u/ε). In float32 the gradient is then within 7e-5 (relative) of the exact one on the
    # tiny model of tests/test_savae.py (1e-4 gives 5e-4, 1e-2 gives 1.4e-3), 1.2e-5 on the
    # PTB-size model at init (1e-4: 9e-5, 1e-2: 1.5e-6). Refused with dtype="bfloat16": its
    # rounding (~4e-3) makes the products' error O(1) at this ε (50 % measured on the tiny
    # model; 3.6 % at its best, ε = 3e-2, where "exact" is within 1 % of float32).
    svi_fd_eps: float = 1e-3

    def __post_init__(self):
        checks = (
            ("svi_steps", isinstance(self.svi_steps, int) and self.svi_steps >= 0, ">= 0 (int)"),
            ("svi_lr", self.svi_lr > 0, "> 0"),
            ("svi_momentum", 0 <= self.svi_momentum < 1, "in [0, 1)"),
            ("svi_max_grad_norm", self.svi_max_grad_norm > 0, "> 0"),
            ("svi_hvp", self.svi_hvp in SVI_HVP, f"one of {SVI_HVP}"),
            ("svi_fd_eps", 0 < self.svi_fd_eps < 1, "in (0, 1)"),
            (
                "svi_hvp",
                not (self.svi_hvp == "finite_difference" and self.dtype == "bfloat16"),
                "'exact' with model.dtype='bfloat16' (the finite differences' rounding error "
                "is O(1) in bfloat16)",
            ),
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


def _clipped(model: SAVAE, grads: Lambda) -> Lambda:
    """The gradient an SVI step descends: μ's and log σ²'s rows clipped apart (`clip_rows`)."""
    return tuple(clip_rows(g, model.svi_max_grad_norm) for g in grads)


def _svi_step(model, params, tokens, carry, step_keys, *, beta, objective, train):
    """One step of Algorithm 1 from (λ_k, v_k): returns ((λ_{k+1}, v_{k+1}), ∇_λ f(λ_k)), the
    gradient before clipping."""
    lam_k, velocity = carry
    _, grads = svi_gradients(
        model, params, tokens, lam_k, step_keys, beta=beta, objective=objective, train=train
    )
    clipped = _clipped(model, grads)
    velocity = tuple(model.svi_momentum * v - g for v, g in zip(velocity, clipped, strict=True))
    lam_k = tuple(x + model.svi_lr * v for x, v in zip(lam_k, velocity, strict=True))
    return (lam_k, velocity), grads


def _svi_scan(model: SAVAE, params, tokens, lam: Lambda, keys, kwargs: dict, *, trace: bool):
    """Algorithm 1's K steps from λ₀ = ``lam``, v₀ = 0: λ_K, and with ``trace`` every step's
    (λ_k, ∇_λ f(λ_k)) stacked over k (what the finite-difference backward pass needs)."""

    def step(carry, step_keys):
        new, grads = _svi_step(model, params, tokens, carry, step_keys, **kwargs)
        return new, (carry[0], grads) if trace else None

    if model.svi_remat and not trace:
        step = jax.checkpoint(step, prevent_cse=False)  # inside scan CSE cannot hurt
    velocity = tuple(jnp.zeros_like(x) for x in lam)
    (lam_k, _), steps = jax.lax.scan(step, (tuple(lam), velocity), svi_keys(keys, model.svi_steps))
    return lam_k, steps


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

    Differentiable: the gradient of a function of λ_K flows back to ``lam`` and ``params``,
    by autodiff through the scan (``svi_hvp="exact"``) or by `_refine_finite_difference`'s
    backward pass; both compute the same λ_K.
    """
    kwargs = {"beta": beta, "objective": objective, "train": train}
    if model.svi_hvp == "finite_difference" and model.svi_steps > 0:
        return _refine_finite_difference(model, params, tokens, lam, keys, kwargs)
    return _svi_scan(model, params, tokens, lam, keys, kwargs, trace=False)[0]


@jax.custom_vjp
def _weight_rows(x: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
    """x itself, its cotangent's row n multiplied by ``weights[n]`` (not differentiated)."""
    return x


def _weight_rows_fwd(x, weights):
    return x, weights


def _weight_rows_bwd(weights, g):
    return g * weights.reshape(-1, *([1] * (g.ndim - 1))).astype(g.dtype), None


_weight_rows.defvjp(_weight_rows_fwd, _weight_rows_bwd)


def fd_hvp(
    model: SAVAE,
    params,
    tokens: jnp.ndarray,
    lam: Lambda,
    direction: Lambda,
    keys: jnp.ndarray,
    *,
    beta: jnp.ndarray,
    objective: Objective,
    train: bool,
) -> tuple[Lambda, object]:
    """(H_λλ w, H_θλ w) of f = Σ_n f_n at λ, w = ``direction``, by central differences:

        H_λλ w ≈ (∇_λ f(λ + εw) − ∇_λ f(λ − εw)) / 2ε,
        H_θλ w ≈ (∇_θ f(λ + εw) − ∇_θ f(λ − εw)) / 2ε    (= ∇_θ (wᵀ ∇_λ f) + O(ε²)),

    both O(ε²) from the exact products plus float rounding of order u·‖∇f‖/ε. H is block
    diagonal over examples, so each example gets its own ε_n = eps·(1 + ‖λ_n‖_∞) / ‖w_n‖_∞
    (eps = ``model.svi_fd_eps``; ‖·‖_∞ over μ's and log σ²'s coordinates together): every
    example moves by the same relative amount whatever the size of its w_n, and its products
    are then scaled by its own 1/2ε_n.

    One gradient evaluation of a batch of 2B rows (λ + εw above λ − εw, same tokens, same
    noise keys) whose per-example terms are weighted ±1/2ε_n: its θ-gradient is H_θλ w, and
    the sum of its two halves' λ-gradients is H_λλ w. The weights act on the cotangents of the
    objective's inputs (`_weight_rows`), which is why ``objective`` must be a sum of
    per-example terms each depending only on its own row (as for `svi_gradients`).
    """
    batch = lam[0].shape[0]
    row_max = lambda xs: jnp.max(jnp.stack([jnp.max(jnp.abs(x), -1) for x in xs]), 0)  # noqa: E731
    scale = row_max(direction)
    size = row_max(lam)
    # An example with w_n = 0 (a filler row, or one the adjoint does not reach) does not move.
    h = model.svi_fd_eps * (1.0 + size) / jnp.where(scale > 0, scale, 1.0)
    both = tuple(
        jnp.concatenate([x + h[:, None] * d, x - h[:, None] * d])
        for x, d in zip(lam, direction, strict=True)
    )
    weights = jnp.concatenate([0.5 / h, -0.5 / h])
    tokens2 = jnp.concatenate([tokens, tokens])
    keys2 = jnp.concatenate([keys, keys])

    def weighted(params_, lam2):
        out = outputs_at(model, params_, tokens2, lam2, keys2, train=train)
        out = {
            k: _weight_rows(v, weights)
            if jnp.issubdtype(v.dtype, jnp.floating) and v.shape[:1] == (2 * batch,)
            else v
            for k, v in out.items()
        }
        return objective(out, tokens2, beta)[0]

    d_params, d_lam = jax.grad(weighted, argnums=(0, 1))(params, both)
    return tuple(g[:batch] + g[batch:] for g in d_lam), d_params


def _refine_finite_difference(
    model: SAVAE, params, tokens: jnp.ndarray, lam: Lambda, keys: jnp.ndarray, kwargs: dict
) -> Lambda:
    """`refine`'s λ_K (the same scan, the same values and noise), differentiated by Kim et
    al.'s (2018) Algorithm 2 with finite-difference Hessian-vector products (a `custom_vjp`).

    Forward: Algorithm 1, keeping only λ_k and g_k = ∇_λ f(λ_k) of each step (K × B × 4·latent
    numbers). Backward, from λ̄_K = ∂L/∂λ_K and v̄ = 0, θ̄ = 0, for k = K − 1, …, 0:

        v̄ ← v̄ + α λ̄                      (λ_{k+1} = λ_k + α v_{k+1}; v̄ is now v̄_{k+1})
        w  = −J_clip(g_k)ᵀ v̄              (v_{k+1} = γ v_k − clip(g_k))
        λ̄ ← λ̄ + H_λλ(λ_k) w,   θ̄ ← θ̄ + H_θλ(λ_k) w     (`fd_hvp`, step k's noise keys)
        v̄ ← γ v̄

    and λ̄ is then λ̄₀ (to the encoder through λ₀) and θ̄ the refinement's share of the
    decoder's gradient (the direct ∂L/∂θ at λ_K is added by whoever differentiates). Each
    product is (∇f(λ_k + εw) − ∇f(λ_k − εw)) / 2ε, O(ε²) (`fd_hvp`): two more gradient
    evaluations per step, run as one of a batch of 2B.

    Against ``"exact"``: no second-order graph (a step's backward pass is one first-order
    gradient of 2B rows; reverse over reverse differentiates the gradient computation itself,
    the custom VJPs' backward passes included) and no per-step activations stored (memory:
    one gradient evaluation of 2B rows, whatever K is). In arithmetic it is no cheaper: in
    passes P of the decoder's big matmuls over B rows, an SVI step's forward costs 2P (values,
    input gradients); its backward here 6P (values, input and weight gradients over 2B rows);
    reverse over reverse 4P, plus 2P to recompute the step with ``svi_remat``. So it matches
    exact-with-remat (8P a step), and exact without remat (6P) is cheapest but stores every
    step's activations (measured: benchmarks/results/savae_hvp_cpu.json). A
    one-sided difference reusing each forward step's θ-gradient, as the reference does, would
    cost 6P (weight gradients in the forward pass, one B-row gradient back) at O(ε) error and
    K stored copies of ∇_θ f.

    Clipping: the reference (``optim_n2n.py``) takes the difference of *clipped* batch
    gradients and also clips its backward messages (λ̄, and the θ product) at the clipping
    norm, which is not the derivative of its forward pass. Here w goes through the exact
    transpose of the clipping's Jacobian at g_k (a VJP of `clip_rows` on B × 2·latent
    numbers) and nothing in the backward pass is clipped: that is what autodiff through the
    scan computes, so the two paths differ only by the finite-difference error. The
    reference's products are one-sided, (∇f(λ + εv) − ∇f(λ)) / ε with a fixed ε = 1e-5, which
    reuses the forward pass's gradients (also the θ-gradients of every step, K copies of θ)
    at O(ε) error; its loss is a batch mean where f here is a batch sum, so a fixed ε would
    not carry over, hence the per-example relative ε_n of `fd_hvp`.

    With ``svi_end_to_end=False`` nothing is differentiated through the refinement and this
    is only its forward pass.
    """

    def forward(params_, lam_, tokens_, keys_, beta_):
        kw = {**kwargs, "beta": beta_}
        return _svi_scan(model, params_, tokens_, lam_, keys_, kw, trace=True)

    @jax.custom_vjp
    def run(params_, lam_, tokens_, keys_, beta_):
        return forward(params_, lam_, tokens_, keys_, beta_)[0]

    def run_fwd(params_, lam_, tokens_, keys_, beta_):
        lam_k, (lams, grads) = forward(params_, lam_, tokens_, keys_, beta_)
        return lam_k, (params_, lams, grads, tokens_, keys_, beta_)

    def run_bwd(residuals, lam_bar):
        params_, lams, grads, tokens_, keys_, beta_ = residuals
        kw = {**kwargs, "beta": beta_}

        def back(carry, xs):
            lam_bar_, v_bar, params_bar = carry
            lam_k, g_k, step_keys = xs
            v_bar = tuple(v + model.svi_lr * x for v, x in zip(v_bar, lam_bar_, strict=True))
            _, clip_vjp = jax.vjp(lambda g: _clipped(model, g), g_k)
            (w,) = clip_vjp(tuple(-v for v in v_bar))
            h_lam, h_params = fd_hvp(model, params_, tokens_, lam_k, w, step_keys, **kw)
            lam_bar_ = tuple(x + h for x, h in zip(lam_bar_, h_lam, strict=True))
            params_bar = jax.tree.map(jnp.add, params_bar, h_params)
            v_bar = tuple(model.svi_momentum * v for v in v_bar)
            return (lam_bar_, v_bar, params_bar), None

        lam_bar = tuple(lam_bar)
        init = (
            lam_bar,
            tuple(jnp.zeros_like(x) for x in lam_bar),
            jax.tree.map(jnp.zeros_like, params_),
        )
        xs = (lams, grads, svi_keys(keys_, model.svi_steps))
        (lam0_bar, _, params_bar), _ = jax.lax.scan(back, init, xs, reverse=True)
        return params_bar, lam0_bar, None, None, None

    run.defvjp(run_fwd, run_bwd)
    return run(params, tuple(lam), tokens, keys, kwargs["beta"])


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
    returns, at λ_K); its gradient is the SA-VAE's. `vae_jax.core.forward.apply` calls it. The
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
