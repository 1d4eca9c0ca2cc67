"""The optimised model (hoisted input projections, split decoder kernel, one output matmul)
against a plain step-by-step formulation of the same LSTM VAE: same loss, same gradients."""

import jax
import jax.numpy as jnp
import numpy as np

from vae_jax.core import models, objectives


def plain_lstm(xs, h, c, w_x, w_h, b):
    """The textbook cell, one step at a time: gates = x·W_x + h·W_h + b."""
    hs = []
    for t in range(xs.shape[1]):
        gates = xs[:, t] @ w_x + h @ w_h + b
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        hs.append(h)
    return jnp.stack(hs, axis=1)


def plain_loss(p, tokens, eps, beta):
    """Rec + β·KL of the same model written without any of the optimisations."""
    batch = tokens.shape[0]
    hidden = p["enc_w_hh"].shape[0]
    zeros = jnp.zeros((batch, hidden))
    emb = p["enc_embed"]["embedding"][tokens]
    hs = plain_lstm(
        emb, zeros, zeros, p["enc_input"]["kernel"], p["enc_w_hh"], p["enc_input"]["bias"]
    )
    lengths = jnp.sum(tokens != 0, axis=1)
    h_last = hs[jnp.arange(batch), lengths - 1]
    mu = h_last @ p["enc_mu"]["kernel"] + p["enc_mu"]["bias"]
    logvar = h_last @ p["enc_logvar"]["kernel"] + p["enc_logvar"]["bias"]
    z = mu + jnp.exp(0.5 * logvar) * eps
    dec_in = p["dec_embed"]["embedding"][tokens[:, :-1]]
    steps = dec_in.shape[1]
    x = jnp.concatenate([dec_in, jnp.repeat(z[:, None], steps, axis=1)], axis=-1)
    h0 = z @ p["dec_h0"]["kernel"] + p["dec_h0"]["bias"]
    hd = plain_lstm(x, h0, jnp.zeros_like(h0), p["dec_w_in"], p["dec_w_hh"], p["dec_b_in"])
    total = 0.0
    for t in range(steps):  # the output layer and softmax one step at a time
        logits = hd[:, t] @ p["dec_output"]["kernel"] + p["dec_output"]["bias"]
        logp = jax.nn.log_softmax(logits)
        target = tokens[:, t + 1]
        total -= jnp.sum(jnp.where(target != 0, logp[jnp.arange(batch), target], 0.0))
    kl = 0.5 * jnp.sum(mu**2 + jnp.exp(logvar) - 1.0 - logvar)
    return (total + beta * kl) / batch


def test_optimised_model_matches_plain_formulation():
    model = models.VAE(
        vocab_size=30, enc_emb_dim=8, enc_hidden_dim=12, dec_emb_dim=6, dec_hidden_dim=10,
        latent_dim=4, dec_dropout_in=0.0, dec_dropout_out=0.0,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    tokens = np.zeros((5, 9), np.int32)
    for row, n in enumerate([9, 7, 4, 9, 3]):  # different lengths: padding is masked
        tokens[row, :n] = [2, *rng.integers(4, 30, size=n - 2), 3]
    keys = jax.random.split(jax.random.PRNGKey(1), 5)
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(tokens), keys, train=False)["params"]
    beta = jnp.float32(0.3)

    def fast_loss(params):
        outputs = model.apply({"params": params}, jnp.asarray(tokens), keys, train=True)
        total, _ = objectives.beta_elbo(outputs, jnp.asarray(tokens), beta)
        return total / tokens.shape[0], outputs

    (fast, outputs), fast_grads = jax.value_and_grad(fast_loss, has_aux=True)(params)
    # The same noise: ε recovered from the model's own z, μ and log σ².
    eps = (outputs["z"] - outputs["mu"]) / jnp.exp(0.5 * outputs["logvar"])
    eps = jax.lax.stop_gradient(eps)
    slow, slow_grads = jax.value_and_grad(plain_loss)(params, jnp.asarray(tokens), eps, beta)
    np.testing.assert_allclose(fast, slow, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(fast_grads), jax.tree.leaves(slow_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
