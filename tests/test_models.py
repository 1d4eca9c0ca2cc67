"""The LSTM VAE and the β-ELBO objective on tiny cases with known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vae_jax.core import kernels, models, objectives
from vae_jax.core.tokens import BOS_ID, EOS_ID, PAD_ID

V, E, H, Z = 13, 6, 8, 3


def tiny_model(**kwargs):
    sizes = dict(
        enc_emb_dim=E,
        enc_hidden_dim=H,
        dec_emb_dim=E + 1,
        dec_hidden_dim=H + 2,
        latent_dim=Z,
        dec_dropout_in=0.0,
        dec_dropout_out=0.0,
    )
    return models.VAE(vocab_size=V, **{**sizes, **kwargs})


def tokens_of(*sentences, length=None):
    rows = [[BOS_ID, *s, EOS_ID] for s in sentences]
    length = length or max(map(len, rows))
    return jnp.array([r + [PAD_ID] * (length - len(r)) for r in rows], jnp.int32)


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    tokens = tokens_of([5, 6, 7], [8, 9], [10, 11, 12, 4, 5])
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    params = model.init(jax.random.PRNGKey(0), tokens, keys, train=False)["params"]
    return model, params, tokens, keys


def test_shapes_and_parameter_tree(setup):
    model, params, tokens, keys = setup
    out = model.apply({"params": params}, tokens, keys, train=False)
    assert out["logits"].shape == (3, tokens.shape[1] - 1, V)
    for name in ("mu", "logvar", "z"):
        assert out[name].shape == (3, Z)
    shapes = jax.tree.map(jnp.shape, params)
    assert shapes["enc_embed"]["embedding"] == (V, E)
    assert shapes["enc_input"]["kernel"] == (E, 4 * H)
    assert shapes["enc_w_hh"] == (H, 4 * H)
    assert shapes["enc_mu"]["kernel"] == (H, Z) and shapes["enc_logvar"]["kernel"] == (H, Z)
    assert shapes["dec_embed"]["embedding"] == (V, E + 1)
    assert shapes["dec_w_in"] == (E + 1 + Z, 4 * (H + 2))  # input is [embedding; z]
    assert shapes["dec_w_hh"] == (H + 2, 4 * (H + 2))
    assert shapes["dec_h0"]["kernel"] == (Z, H + 2)
    assert shapes["dec_output"]["kernel"] == (H + 2, V)


def test_uniform_init_bounds(setup):
    _, params, _, _ = setup
    leaves = jax.tree.leaves(params)
    assert all(float(jnp.max(jnp.abs(x))) <= 0.1 for x in leaves)
    assert max(float(jnp.max(jnp.abs(x))) for x in leaves) > 0.09  # not a narrower init


def test_padding_changes_no_loss(setup):
    model, params, tokens, keys = setup
    padded = jnp.pad(tokens, ((0, 0), (0, 6)))
    losses = []
    for t in (tokens, padded):
        out = model.apply({"params": params}, t, keys, train=False)
        total, sums = objectives.beta_elbo(out, t, jnp.float32(0.7))
        losses.append((total, sums["rec"], sums["kl"], sums["tokens"], sums["sequences"]))
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    # A filler row of padding only counts nothing.
    filler = jnp.concatenate([tokens, jnp.zeros((1, tokens.shape[1]), jnp.int32)])
    out = model.apply({"params": params}, filler, jnp.concatenate([keys, keys[:1]]), train=False)
    total, sums = objectives.beta_elbo(out, filler, jnp.float32(0.7))
    np.testing.assert_allclose((total, sums["sequences"]), losses[0][0::4], rtol=1e-5)


def test_kl_matches_closed_form():
    mu = jnp.array([[0.0, 0.0], [1.0, -2.0]])
    logvar = jnp.log(jnp.array([[1.0, 1.0], [0.5, 4.0]]))
    want = [0.0, 0.5 * ((1 + 0.5 - 1 - np.log(0.5)) + (4 + 4 - 1 - np.log(4.0)))]
    np.testing.assert_allclose(objectives.gaussian_kl(mu, logvar), want, rtol=1e-6)
    # Against a Monte-Carlo estimate of E_q[log q − log p] for one posterior.
    eps = jax.random.normal(jax.random.PRNGKey(0), (200_000, 2))
    z = mu[1] + jnp.exp(0.5 * logvar[1]) * eps
    log_q = -0.5 * jnp.sum(eps**2 + logvar[1] + jnp.log(2 * jnp.pi), -1)
    log_p = -0.5 * jnp.sum(z**2 + jnp.log(2 * jnp.pi), -1)
    assert float(jnp.mean(log_q - log_p)) == pytest.approx(want[1], rel=2e-2)


def test_reconstruction_is_hand_computed_cross_entropy():
    tokens = tokens_of([5, 6], length=6)  # <s> 5 6 </s> pad pad: targets 5 6 </s> pad pad
    logits = jax.random.normal(jax.random.PRNGKey(3), (1, 5, V))
    logp = np.asarray(jax.nn.log_softmax(logits[0]))
    want = -(logp[0, 5] + logp[1, 6] + logp[2, EOS_ID])
    np.testing.assert_allclose(objectives.reconstruction(logits, tokens), [want], rtol=1e-6)
    sums = objectives.batch_sums(jnp.array([want]), jnp.array([0.0]), tokens)
    assert float(sums["tokens"]) == 3.0 and float(sums["sequences"]) == 1.0


def test_loss_is_rec_plus_beta_kl(setup):
    model, params, tokens, keys = setup
    out = model.apply({"params": params}, tokens, keys, train=False)
    rec = objectives.reconstruction(out["logits"], tokens)
    kl = objectives.gaussian_kl(out["mu"], out["logvar"])
    total, _ = objectives.beta_elbo(out, tokens, jnp.float32(0.25))
    np.testing.assert_allclose(total, jnp.sum(rec + 0.25 * kl), rtol=1e-6)


def test_reparameterisation_uses_each_examples_key(setup):
    model, params, tokens, keys = setup
    out = model.apply({"params": params}, tokens, keys, train=False)
    eps = (out["z"] - out["mu"]) / jnp.exp(0.5 * out["logvar"])
    for n in range(3):
        z_key = jax.random.split(keys[n])[0]  # the other half seeds dropout
        np.testing.assert_allclose(eps[n], jax.random.normal(z_key, (Z,)), rtol=1e-4, atol=1e-5)


def test_noise_of_an_example_does_not_depend_on_its_batch():
    model = tiny_model(dec_dropout_in=0.5, dec_dropout_out=0.5)
    tokens = tokens_of([5, 6, 7], [8, 9], [10, 11, 12, 4, 5])
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    params = model.init(jax.random.PRNGKey(0), tokens, keys, train=False)["params"]
    full = model.apply({"params": params}, tokens, keys, train=True)["logits"]
    alone = model.apply({"params": params}, tokens[1:2], keys[1:2], train=True)["logits"]
    np.testing.assert_allclose(full[1:2], alone, rtol=1e-5, atol=1e-6)
    eval_logits = model.apply({"params": params}, tokens, keys, train=False)["logits"]
    assert not np.allclose(full, eval_logits)  # dropout is on in training only


def test_threefry_is_jax_random_cipher():
    from jax.extend.random import threefry_2x32

    rng = np.random.default_rng(0)
    for _ in range(3):
        key = jnp.asarray(rng.integers(0, 2**32, 2, dtype=np.uint32))
        words = jnp.asarray(rng.integers(0, 2**32, 2 * 50, dtype=np.uint32))
        x0, x1 = kernels.threefry2x32(key, words[:50], words[50:])
        np.testing.assert_array_equal(jnp.concatenate([x0, x1]), threefry_2x32(key, words))


@pytest.mark.parametrize("rate", [0.5, 0.3, 0.9])
def test_dropout_masks_are_jax_random_bernoulli_of_each_step(rate):
    keys = jax.random.split(jax.random.PRNGKey(4), 5)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 7, 11)), jnp.float32) + 3.0

    def reference(key, row):  # the masks as jax.random draws them, one fold_in per step
        steps = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(row.shape[0]))
        keep = jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - rate, row.shape[1:]))(steps)
        return jnp.where(keep, row / (1.0 - rate), 0.0)

    out = jax.jit(kernels.dropout, static_argnums=1)(x, rate, keys)
    np.testing.assert_array_equal(out, jax.vmap(reference)(keys, x))
    assert abs(float(jnp.mean(out == 0.0)) - rate) < 0.1  # 385 draws
    # Typed keys give the same masks; a padded row keeps its first steps' masks.
    typed = jax.random.wrap_key_data(keys)
    np.testing.assert_array_equal(kernels.dropout(x, rate, typed), out)
    padded = kernels.dropout(jnp.pad(x, ((0, 0), (0, 4), (0, 0)), constant_values=1.0), rate, keys)
    np.testing.assert_array_equal(padded[:, :7], out)


def test_dropout_takes_keys_of_another_prng():
    keys = jax.random.split(jax.random.key(0, impl="rbg"), 3)
    out = kernels.dropout(jnp.ones((3, 20, 40)), 0.5, keys)  # the plain path
    assert set(np.unique(np.asarray(out)).tolist()) == {0.0, 2.0}
    assert 0.4 < float(jnp.mean(out == 0)) < 0.6
