"""The dialog CVAE (`vae_jax.dialog.cvae`) and its objective terms, on hand-made batches
(no data)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vae_jax.core import forward, kernels, objectives
from vae_jax.core.tokens import BOS_ID, EOS_ID, PAD_ID
from vae_jax.dialog import cvae

V, TOPICS = 40, 5
SIZES = dict(
    emb_dim=8, topic_emb_dim=4, utt_hidden_dim=6, ctx_hidden_dim=7, dec_hidden_dim=9,
    latent_dim=3, bow_hidden_dim=5,
)  # fmt: skip


def make_batch(seed: int = 0, filler: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    b, c, length = 4, 3, 6
    tokens = np.zeros((b, 7), np.int32)
    context = np.zeros((b, c, length), np.int32)
    lengths = np.zeros((b,), np.int32)
    for i in range(b - filler):
        n = rng.integers(1, 5)
        tokens[i, : n + 2] = [BOS_ID, *rng.integers(4, V, n), EOS_ID]
        lengths[i] = rng.integers(1, c + 1)
        for j in range(lengths[i]):
            m = rng.integers(1, length - 1)
            context[i, j, : m + 2] = [BOS_ID, *rng.integers(4, V, m), EOS_ID][:length]
    return {
        "tokens": tokens,
        "context": context,
        "context_lengths": lengths,
        "floors": rng.integers(0, 2, (b, c)).astype(np.int32),
        "topics": rng.integers(0, TOPICS, b).astype(np.int32),
        "my_profile": rng.random((b, 4)).astype(np.float32),
        "other_profile": rng.random((b, 4)).astype(np.float32),
    }


@pytest.fixture(scope="module")
def model_and_params():
    model = cvae.CVAE(vocab_size=V, num_topics=TOPICS, **SIZES)
    return model, forward.init(model, jax.random.PRNGKey(0), forward.example_batch(model))


def test_kl_to_the_prior_is_the_gaussian_kl():
    rng = np.random.default_rng(1)
    mu, logvar, pmu, plogvar = (rng.normal(size=(3, 4)) for _ in range(4))
    got = objectives.kl_per_dim(
        {"mu": mu, "logvar": logvar, "prior_mu": pmu, "prior_logvar": plogvar}
    )
    # KL(N(m1, s1²) ‖ N(m2, s2²)) = log(s2/s1) + (s1² + (m1 − m2)²) / (2 s2²) − ½
    s1, s2 = np.exp(0.5 * logvar), np.exp(0.5 * plogvar)
    want = np.log(s2 / s1) + (s1**2 + (mu - pmu) ** 2) / (2 * s2**2) - 0.5
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    standard = objectives.kl_per_dim(
        {"mu": mu, "logvar": logvar, "prior_mu": 0 * mu, "prior_logvar": 0 * mu}
    )
    np.testing.assert_allclose(standard, objectives.gaussian_kl_per_dim(mu, logvar), rtol=1e-5)


@pytest.mark.parametrize("scan", [kernels.gru_scan, kernels.plain_gru_scan])
def test_gru_scan_matches_a_step_loop_and_holds_state_after_the_length(scan):
    rng = np.random.default_rng(2)
    b, t, d, h = 3, 5, 4, 6
    x = rng.normal(size=(b, t, d)).astype(np.float32)
    w_x, w_h = rng.normal(size=(d, 3 * h)) * 0.3, rng.normal(size=(h, 3 * h)) * 0.3
    b_x, b_h = rng.normal(size=3 * h) * 0.1, rng.normal(size=3 * h) * 0.1
    lengths = np.array([5, 2, 0])
    w_h, b_h = jnp.asarray(w_h, jnp.float32), jnp.asarray(b_h, jnp.float32)
    hs, last = scan(jnp.asarray(x @ w_x + b_x, jnp.float32), w_h, b_h, jnp.zeros((b, h)), lengths)

    def sigmoid(v):
        return 1 / (1 + np.exp(-v))

    for i in range(b):
        state = np.zeros(h)
        for step in range(lengths[i]):
            gx, gh = x[i, step] @ w_x + b_x, state @ w_h + b_h
            r, u = sigmoid(gx[:h] + gh[:h]), sigmoid(gx[h : 2 * h] + gh[h : 2 * h])
            n = np.tanh(gx[2 * h :] + r * gh[2 * h :])
            state = (1 - u) * n + u * state
        np.testing.assert_allclose(last[i], state, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(hs[i, -1], state, rtol=1e-4, atol=1e-5)


def test_gru_scan_backward_pass_matches_jax_grad():
    """The written-out backward pass (`kernels.gru_scan`) against JAX's of the same scan
    (`kernels.plain_gru_scan`): every input's gradient, with rows stopping early (held
    states), a row of length 0 and gradients reaching both the states and the last state."""
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    b, t, h = 5, 7, 6
    gates = jax.random.normal(keys[0], (b, t, 3 * h))
    w_h = 0.3 * jax.random.normal(keys[1], (h, 3 * h))
    b_h = 0.1 * jax.random.normal(keys[2], (3 * h,))
    h0 = jax.random.normal(keys[3], (b, h))
    lengths = jnp.array([7, 3, 1, 0, 5])
    weights_hs, weights_last = (
        jax.random.normal(keys[4], (b, t, h)),
        jax.random.normal(keys[5], (b, h)),
    )

    def loss(scan):
        def f(*args):
            hs, last = scan(*args, lengths)
            return jnp.sum(hs * weights_hs) + jnp.sum(jnp.sin(last) * weights_last)

        return f

    args = (gates, w_h, b_h, h0)
    np.testing.assert_allclose(
        loss(kernels.gru_scan)(*args), loss(kernels.plain_gru_scan)(*args), rtol=1e-6
    )
    got = jax.grad(loss(kernels.gru_scan), argnums=(0, 1, 2, 3))(*args)
    want = jax.grad(loss(kernels.plain_gru_scan), argnums=(0, 1, 2, 3))(*args)
    for name, g, w in zip(("gates", "w_h", "b_h", "h0"), got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)
    # Row 3 (length 0) holds h0 throughout: its gradient is every state's weight, passed on.
    held = weights_hs[3].sum(0) + weights_last[3] * jnp.cos(h0[3])
    np.testing.assert_allclose(got[3][3], held, rtol=1e-5, atol=1e-6)


def test_reverse_within_reverses_only_the_true_steps():
    x = jnp.arange(10).reshape(2, 5)[..., None]
    out = cvae.reverse_within(x, jnp.array([3, 5]))[..., 0]
    np.testing.assert_array_equal(out, [[2, 1, 0, 3, 4], [9, 8, 7, 6, 5]])


def test_utterance_encoding_ignores_padding(model_and_params):
    model, params = model_and_params
    short = jnp.array([[BOS_ID, 7, 9, EOS_ID]])
    padded = jnp.array([[BOS_ID, 7, 9, EOS_ID, PAD_ID, PAD_ID]])
    enc = [
        model.apply({"params": params}, t, method=cvae.CVAE.encode_utterances)
        for t in (short, padded)
    ]
    np.testing.assert_allclose(enc[0], enc[1], rtol=1e-6)


def test_objective_adds_the_bow_loss_and_filler_rows_count_nothing(model_and_params):
    model, params = model_and_params
    batch = make_batch(3, filler=1)
    keys = jax.random.split(jax.random.PRNGKey(4), 4)
    total, sums, outputs = forward.apply(model, params, batch, keys, beta=0.3, train=True)
    real = np.arange(4) < 3
    rec = np.asarray(objectives.reconstruction(outputs["logits"], batch["tokens"]))
    kl = np.asarray(jnp.sum(objectives.kl_per_dim(outputs), -1))
    bow = np.asarray(outputs["bow_nll"])
    np.testing.assert_allclose(sums["bow"], bow[real].sum(), rtol=1e-5)
    np.testing.assert_allclose(total, (rec + 0.3 * kl + bow)[real].sum(), rtol=1e-5)
    assert float(sums["sequences"]) == 3
    # The same rows without the filler row: the same sums.
    trimmed = {k: v[:3] for k, v in batch.items()}
    total3, sums3, _ = forward.apply(model, params, trimmed, keys[:3], beta=0.3, train=True)
    np.testing.assert_allclose(total3, total, rtol=1e-5)
    np.testing.assert_allclose(sums3["kl"], sums["kl"], rtol=1e-5)


def test_bfloat16_matmuls_stay_close_to_float32(model_and_params):
    """``dtype="bfloat16"``: the same parameters, a float32 loss near float32's, gradients
    along float32's, and bfloat16 really used (the values differ); greedy samples run."""
    model32, params = model_and_params
    model16 = cvae.CVAE(vocab_size=V, num_topics=TOPICS, dtype="bfloat16", **SIZES)
    batch = make_batch(5)
    keys = jax.random.split(jax.random.PRNGKey(2), 4)

    def loss_and_grads(model):
        def loss(p):
            return forward.apply(model, p, batch, keys, beta=0.5, train=True)[0]

        return jax.value_and_grad(loss)(params)

    loss32, grads32 = loss_and_grads(model32)
    loss16, grads16 = loss_and_grads(model16)
    assert loss16.dtype == jnp.float32
    np.testing.assert_allclose(loss16, loss32, rtol=2e-2)
    flat32 = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads32)])
    flat16 = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads16)])
    assert float(flat16 @ flat32 / (jnp.linalg.norm(flat16) * jnp.linalg.norm(flat32))) > 0.99
    assert not np.array_equal(flat16, flat32)
    tokens = model16.apply(
        {"params": params},
        batch,
        jax.random.split(jax.random.PRNGKey(3), 4),
        5,
        method=cvae.CVAE.generate,
    )
    assert tokens.shape == (4, 5) and tokens.dtype == jnp.int32
    # The plain layers (GPU/TPU) round the same products: the same loss and gradients.
    plain16 = cvae.CVAE(vocab_size=V, num_topics=TOPICS, dtype="bfloat16", kernels="plain", **SIZES)
    loss_plain, grads_plain = loss_and_grads(plain16)
    np.testing.assert_allclose(loss_plain, loss16, rtol=1e-3)
    for a, b in zip(jax.tree.leaves(grads_plain), jax.tree.leaves(grads16), strict=True):
        np.testing.assert_allclose(a, b, rtol=5e-2, atol=5e-3)


def test_bow_nll_is_the_sum_over_targets_of_one_softmax(model_and_params):
    model, params = model_and_params
    batch = make_batch(5, filler=0)
    keys = jax.random.split(jax.random.PRNGKey(6), 4)
    out = model.apply({"params": params}, batch, keys, train=False)
    bound = model.bind({"params": params})
    c = bound.condition(batch)
    logits = bound.bow_out(jnp.tanh(bound.bow_hidden(jnp.concatenate([c, out["z"]], -1))))
    log_p = np.asarray(jax.nn.log_softmax(logits))
    for i, row in enumerate(batch["tokens"]):
        targets = [t for t in row[1:] if t != PAD_ID]
        np.testing.assert_allclose(out["bow_nll"][i], -log_p[i, targets].sum(), rtol=1e-5)


def test_generate_is_greedy_under_teacher_forcing(model_and_params):
    model, params = model_and_params
    batch = make_batch(7, filler=0)
    keys = jax.random.split(jax.random.PRNGKey(8), 4)
    z = jax.random.normal(jax.random.PRNGKey(9), (4, SIZES["latent_dim"]))
    out = np.asarray(model.apply({"params": params}, batch, keys, 6, z, method=cvae.CVAE.generate))
    bound = model.bind({"params": params})
    c = bound.condition(batch)
    prefix = np.concatenate([np.full((4, 1), BOS_ID), out], 1).astype(np.int32)
    logits = np.array(bound.decode(jnp.asarray(prefix), c, z))
    logits[..., [PAD_ID, BOS_ID]] = -np.inf
    for i in range(4):
        for t in range(6):
            assert out[i, t] == np.argmax(logits[i, t])
            if out[i, t] == EOS_ID:
                assert (out[i, t + 1 :] == PAD_ID).all()
                break


def test_generate_samples_from_the_prior_by_key(model_and_params):
    model, params = model_and_params
    batch = make_batch(10, filler=0)
    keys = jax.random.split(jax.random.PRNGKey(11), 4)
    bound = model.bind({"params": params})
    mu, logvar = bound.prior(bound.condition(batch))
    z = cvae.sample(mu, logvar, keys)
    a = model.apply({"params": params}, batch, keys, 6, method=cvae.CVAE.generate)
    b = model.apply({"params": params}, batch, keys, 6, z, method=cvae.CVAE.generate)
    np.testing.assert_array_equal(a, b)


def test_generate_encodes_a_context_once_for_its_samples(model_and_params):
    model, params = model_and_params
    batch = make_batch(12, filler=0)
    keys = jax.random.split(jax.random.PRNGKey(13), 4 * 3)
    once = model.apply({"params": params}, batch, keys, 6, None, 3, method=cvae.CVAE.generate)
    tiled = {k: np.repeat(v, 3, axis=0) for k, v in batch.items()}
    each = model.apply({"params": params}, tiled, keys, 6, method=cvae.CVAE.generate)
    np.testing.assert_array_equal(once, each)
    assert once.shape == (12, 6)
