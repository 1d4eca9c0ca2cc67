"""Evaluation metrics against known answers, and `python -m vae_jax.evaluate` on a short run."""

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_synthetic_config

from vae_jax import evaluate
from vae_jax.core import metrics, models, objectives
from vae_jax.core.tokens import BOS_ID, EOS_ID
from vae_jax.run import build, checkpoints, loop, writers


def tiny_vae(vocab=12, latent=2):
    return models.VAE(
        vocab_size=vocab,
        enc_emb_dim=4,
        enc_hidden_dim=8,
        dec_emb_dim=4,
        dec_hidden_dim=8,
        latent_dim=latent,
        dec_dropout_in=0.0,
        dec_dropout_out=0.0,
    )


def random_rows(rng, lengths, width, vocab=12):
    """Token rows <s> w… </s> of the given total lengths, padded to ``width``; 0 = filler."""
    tokens = np.zeros((len(lengths), width), np.int32)
    for i, n in enumerate(lengths):
        if n:
            tokens[i, :n] = np.r_[BOS_ID, rng.integers(4, vocab, n - 2), EOS_ID]
    return tokens


def init_params(model, seed=0):
    """Parameters drawn like the model's U(−0.1, 0.1) initialisation, as numpy arrays.

    Shapes come from tracing ``model.init``, values from numpy: compiling the initialisation
    would cost more than some tests.
    """
    key = jax.random.PRNGKey(0)
    shapes = jax.eval_shape(
        lambda: model.init(key, jnp.zeros((1, 4), jnp.int32), key[None], train=False)
    )["params"]
    rng = np.random.default_rng(seed)
    scale = model.init_scale
    return jax.tree.map(lambda x: rng.uniform(-scale, scale, x.shape).astype(x.dtype), shapes)


# --- The decoder log-likelihood used by IW-NLL -----------------------------------------------


def test_log_likelihood_equals_teacher_forced_reconstruction():
    """Many z per sentence, rows of several lengths, bucket padding and a filler row."""
    model = tiny_vae(latent=3)
    params = init_params(model)
    tokens = random_rows(np.random.default_rng(0), [3, 9, 0, 6], width=11)
    z = jax.random.normal(jax.random.PRNGKey(1), (4, 5, 3))
    apply = functools.partial(jax.jit, static_argnames="method")(model.apply)
    got = apply({"params": params}, tokens, z, method=models.VAE.log_likelihood)
    repeated = np.repeat(tokens, 5, axis=0)  # row n, sample k -> row 5n + k
    logits = apply({"params": params}, repeated, z.reshape(20, 3), method=models.VAE.decode)
    want = -objectives.reconstruction(logits, repeated).reshape(4, 5)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert float(got[2, 0]) == 0.0  # filler row: nothing predicted


# --- IW-NLL on a model with a closed-form log p(x) -------------------------------------------


def linear_gaussian(rng, num_x=300):
    """p(z) = N(0, I₂), p(x|z) = N(Wz + b, s²I₃), W with orthogonal columns.

    Then log p(x) = log N(x; b, WWᵀ + s²I) and p(z|x) = N(Σ Wᵀ(x − b)/s², Σ) with the diagonal
    Σ = (I + WᵀW/s²)⁻¹: exact answers for every estimator.
    """
    w = np.linalg.qr(rng.normal(size=(3, 2)))[0] * np.array([1.5, 0.7])
    b, s2 = rng.normal(size=3), 0.25
    x = rng.multivariate_normal(b, w @ w.T + s2 * np.eye(3), size=num_x)
    cov = w @ w.T + s2 * np.eye(3)
    diff = x - b
    log_px = -0.5 * (
        np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff)
        + np.linalg.slogdet(cov)[1]
        + 3 * math.log(2 * math.pi)
    )
    post_var = 1.0 / (1.0 + np.diag(w.T @ w) / s2)
    post_mu = diff @ w * post_var / s2

    def log_likelihood(z):  # (S, k, 2) -> (S, k)
        mean = jnp.einsum("skd,id->ski", z, w) + b
        resid = jnp.asarray(x)[:, None, :] - mean
        return -0.5 * jnp.sum(resid**2 / s2 + math.log(2 * math.pi * s2), axis=-1)

    return log_likelihood, log_px, post_mu, post_var, (x, w, b, s2)


def test_iw_nll_is_exact_when_q_is_the_true_posterior():
    log_lik, log_px, mu, var, _ = linear_gaussian(np.random.default_rng(0))
    eps = jax.random.normal(jax.random.PRNGKey(0), (len(log_px), 7, 2))
    log_w = metrics.log_importance_weights(log_lik, jnp.asarray(mu), jnp.log(var) + 0 * mu, eps)
    # Every weight is p(x, z)/p(z|x) = p(x): the estimate has no variance, for any K.
    for k in (1, 7):
        nll = metrics.iw_nll_from_log_weights(log_w[:, :k])
        np.testing.assert_allclose(nll, -log_px, atol=2e-4)


def test_iw_nll_bounds_and_converges_to_exact_nll():
    """A mismatched q (shifted, too wide): E[IW-NLL_K] ≥ −log p(x), decreasing in K, → exact;
    −ELBO (closed form) ≥ IW-NLL and equals IW-NLL₁ in expectation."""
    log_lik, log_px, post_mu, post_var, (x, w, b, s2) = linear_gaussian(np.random.default_rng(1))
    mu, logvar = post_mu + 0.4, np.log(post_var * 2.0) + 0 * post_mu
    eps = jax.random.normal(jax.random.PRNGKey(0), (len(log_px), 4000, 2))
    log_w = metrics.log_importance_weights(log_lik, jnp.asarray(mu), jnp.asarray(logvar), eps)
    exact = float(np.mean(-log_px))

    def expected_iw_nll(k):  # averaged over 4000 / k disjoint groups of k draws
        groups = np.asarray(log_w).reshape(len(log_px), -1, k)
        return float(np.mean(metrics.iw_nll_from_log_weights(groups)))

    iw = {k: expected_iw_nll(k) for k in (1, 10, 100, 4000)}
    assert iw[1] > iw[10] > iw[100] > iw[4000] >= exact - 2e-3, (iw, exact)
    assert iw[4000] - exact < 5e-3, (iw, exact)

    var = np.exp(logvar)
    resid = x - mu @ w.T - b
    expected_rec = 0.5 * (
        np.sum(resid**2, -1) / s2 + np.sum(var * np.diag(w.T @ w), -1) / s2
    ) + 1.5 * math.log(2 * math.pi * s2)
    neg_elbo = float(np.mean(expected_rec + objectives.gaussian_kl(mu, logvar)))
    assert neg_elbo == pytest.approx(iw[1], abs=0.01)


def decoder_ignoring_z(params, mu_bias, logvar_bias):
    """The same VAE with p(x|z) independent of z and q(z|x) = N(mu_bias, exp(logvar_bias))."""
    params = jax.tree.map(np.array, params)
    emb_dim = params["dec_embed"]["embedding"].shape[1]
    params["dec_w_in"][emb_dim:] = 0.0
    params["dec_h0"]["kernel"][:] = 0.0
    for name, bias in (("enc_mu", mu_bias), ("enc_logvar", logvar_bias)):
        params[name]["kernel"][:] = 0.0
        params[name]["bias"][:] = bias
    return params


def test_iw_nll_of_lstm_vae_with_known_marginal():
    """When p(x|z) ignores z, log p(x) = log p(x|z) = −Rec exactly. With q = p every weight is
    p(x); with q ≠ p, IW-NLL_K − Rec = −log mean_k p(z_k)/q(z_k|x) → 0, and averages KL at
    K = 1."""
    model = tiny_vae()
    rng = np.random.default_rng(0)
    batches = [{"tokens": random_rows(rng, n, 8)} for n in ([5, 7, 0], [4, 0, 0])]
    key = jax.random.PRNGKey(3)

    params = decoder_ignoring_z(init_params(model), 0.0, 0.0)
    elbo = metrics.elbo_figures(model, params, batches, key)
    log_w, tokens = metrics.iw_log_weights(model, params, batches, key, num_samples=3000)
    rec = -log_w[:, 0]
    np.testing.assert_allclose(log_w, np.repeat(log_w[:, :1], 3000, 1), atol=1e-5)
    np.testing.assert_allclose(metrics.iw_nll_from_log_weights(log_w), rec, rtol=1e-5)
    np.testing.assert_allclose(np.mean(rec), elbo["rec"], rtol=1e-5)
    assert elbo["kl"] == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_array_equal(tokens, [4, 6, 3])

    params = decoder_ignoring_z(params, np.array([0.3, -0.2]), np.log([0.8, 0.9]) * 2)
    log_w, _ = metrics.iw_log_weights(model, params, batches, key, num_samples=3000)
    kl = float(objectives.gaussian_kl(jnp.array([0.3, -0.2]), jnp.log(jnp.array([0.64, 0.81]))))
    gap_k1 = np.mean(-log_w - rec[:, None])  # the K = 1 estimates, averaged over all draws
    assert gap_k1 == pytest.approx(kl, abs=0.02)
    gap = metrics.iw_nll_from_log_weights(log_w) - rec
    assert np.all(np.abs(gap) < 0.05) and np.all(gap < kl), (gap, kl)


def test_iw_weights_do_not_depend_on_chunking_or_k():
    model = tiny_vae()
    params = init_params(model)
    rng = np.random.default_rng(1)
    batches = [{"tokens": random_rows(rng, [5, 9, 3, 0], 10)}, {"tokens": random_rows(rng, [6], 6)}]
    key = jax.random.PRNGKey(0)
    # 3 passes of 3 samples (2 dropped) for one sentence at a time, or all at once: the same.
    base, _ = metrics.iw_log_weights(model, params, batches, key, num_samples=7, max_rows=3)
    wide, _ = metrics.iw_log_weights(model, params, batches, key, num_samples=7, max_rows=64)
    np.testing.assert_allclose(base, wide, rtol=1e-5, atol=1e-5)
    # Jensen, draw by draw: IW-NLL never exceeds the mean of its K one-sample estimates.
    assert np.all(metrics.iw_nll_from_log_weights(base) <= -base.mean(1) + 1e-6)
    assert metrics.iw_plan(500, 512) == (1, 500)
    assert metrics.iw_plan(500, 128) == (1, 125)
    assert metrics.iw_plan(10, 512) == (51, 10)


# --- MI, AU, holes on hand-built posteriors --------------------------------------------------


def batched(mu, logvar, batch_size):
    """(num_batches, B, D) with filler rows at the end, like evaluation batches."""
    n, d = mu.shape
    nb = -(-n // batch_size)
    real = np.arange(nb * batch_size).reshape(nb, batch_size) < n
    pad = ((0, nb * batch_size - n), (0, 0))
    return (
        np.pad(mu, pad).reshape(nb, batch_size, d),
        np.pad(logvar, pad).reshape(nb, batch_size, d),
        real,
    )


def test_mi_of_posteriors_independent_of_x_is_zero():
    rng = np.random.default_rng(0)
    mu = np.repeat(rng.normal(size=(1, 3)), 500, 0)
    logvar = np.repeat(rng.normal(size=(1, 3)) * 0.3, 500, 0)
    key = jax.random.PRNGKey(0)
    whole = metrics.mutual_info(mu, logvar, key)
    mini = metrics.mutual_info_minibatch(*batched(mu, logvar, 32), key)
    for value, err in (
        (whole["mi"], whole["mi_stderr"]),
        (mini["mi_batch"], mini["mi_batch_stderr"]),
    ):
        assert abs(value) < max(4 * err, 0.02), (value, err)
        assert err < 0.1
    assert whole["mi_ceiling"] == pytest.approx(math.log(500))


def test_mi_of_separated_posteriors_reaches_its_ceilings():
    n = 60
    rng = np.random.default_rng(1)
    mu = np.c_[np.arange(n) * 10.0, rng.normal(size=n)]
    logvar = np.full((n, 2), math.log(0.05))
    key = jax.random.PRNGKey(1)
    whole = metrics.mutual_info(mu, logvar, key)
    assert whole["mi"] == pytest.approx(math.log(n), abs=4 * whole["mi_stderr"] + 1e-3)
    mini = metrics.mutual_info_minibatch(*batched(mu, logvar, 16), key)  # 16, 16, 16, 12
    ceiling = (3 * 16 * math.log(16) + 12 * math.log(12)) / n
    assert mini["mi_batch_ceiling"] == pytest.approx(ceiling)
    assert mini["mi_batch"] == pytest.approx(ceiling, abs=4 * mini["mi_batch_stderr"] + 1e-3)
    assert mini["mi_batch_size"] == 16


def test_active_units_count_variance_with_n_minus_1():
    # Per dimension: constant; ±1; ±√0.009 (variance 0.012 with N − 1, 0.009 with N);
    # ±√0.0072 (0.0096 with N − 1).
    signs = np.array([1.0, -1.0, 1.0, -1.0])
    mu = np.c_[np.zeros(4), signs, signs * math.sqrt(0.009), signs * math.sqrt(0.0072)]
    count, variances = metrics.active_units(mu)
    np.testing.assert_allclose(variances, [0.0, 4 / 3, 0.012, 0.0096])
    assert count == 2
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.active_units(mu[:1])


def test_hole_metrics_known_answers():
    key, n, samples = jax.random.PRNGKey(0), 3000, 8000  # one shape: one compilation
    # Posteriors equal to the prior: q_agg = p, every term is exactly 0.
    holes = metrics.hole_metrics(np.zeros((n, 2)), np.zeros((n, 2)), key, samples)
    assert holes["kl_prior_agg"] == pytest.approx(0.0, abs=1e-5)
    assert holes["cu@0.01"] == 2 and np.allclose(holes["marginal_kl"], 0.0, atol=1e-5)

    # Posteriors that tile the prior: μ_j ~ N(0, 1 − s²), σ² = s², many of them.
    mu = np.random.default_rng(0).normal(size=(n, 2)) * math.sqrt(0.5)
    holes = metrics.hole_metrics(mu, np.full_like(mu, math.log(0.5)), key, samples)
    assert 0.0 <= holes["kl_prior_agg"] < 0.02 and holes["cu@0.01"] == 2, holes

    # All posteriors N(m, s²): KL(N(0,1) ‖ N(m, s²)) = log s + (1 + m²)/(2s²) − ½ per dimension.
    m, s = np.array([1.0, 0.0]), np.array([0.8, 1.0])
    holes = metrics.hole_metrics(np.tile(m, (n, 1)), np.tile(2 * np.log(s), (n, 1)), key, samples)
    want = np.log(s) + (1 + m**2) / (2 * s**2) - 0.5
    np.testing.assert_allclose(holes["marginal_kl"], want, atol=0.03)
    assert holes["kl_prior_agg"] == pytest.approx(want.sum(), abs=4 * holes["kl_prior_agg_stderr"])
    assert [holes[f"cu@{t:g}"] for t in metrics.CU_THRESHOLDS] == [1, 1, 1, 1]


# --- python -m vae_jax.evaluate on a short synthetic run -------------------------------------


def test_evaluate_command_on_a_short_synthetic_run(tmp_path, capsys):
    workdir = str(tmp_path)
    config = tiny_synthetic_config(steps=40, log_every=20)
    loop.train_and_evaluate(config, workdir)
    # The synthetic task has no 'valid' split, hence no best checkpoint: the last one.
    argv = [f"--workdir={workdir}", "--checkpoint=last", "--num_importance_samples", "30"]
    results = evaluate.main([*argv, "--num_prior_samples=500"])
    assert "| IW-NLL (K=30) |" in capsys.readouterr().out
    with open(os.path.join(workdir, "eval_eval.json"), encoding="utf-8") as f:
        assert json.load(f) == json.loads(json.dumps(results))

    assert results["split"] == "eval" and results["sentences"] == 10
    assert results["predicted_tokens"] == 10 * 5
    numbers = [v for v in results.values() if isinstance(v, float)]
    assert all(math.isfinite(v) for v in numbers)
    # AU from the posterior means of the split's 10 sequences, computed here independently.
    _, data, model, params, _ = build.load_run(workdir, "last")
    mu, _ = model.apply({"params": params}, data.info["sequences"], method=models.VAE.encode)
    variances = np.var(np.asarray(mu, np.float64), axis=0, ddof=1)
    np.testing.assert_allclose(results["au_variances"], variances, rtol=1e-4)
    assert results["au"] == int(np.sum(variances > 0.01))
    assert results["cu@0.1"] == sum(k < 0.1 for k in results["marginal_kl"])
    assert [results[f"cu@{t:g}"] for t in metrics.CU_THRESHOLDS] == sorted(
        results[f"cu@{t:g}"] for t in metrics.CU_THRESHOLDS
    )  # CU@τ grows with τ
    for mi, ceiling in (("mi", "mi_ceiling"), ("mi_batch", "mi_batch_ceiling")):
        err = 4 * results[f"{mi}_stderr"] + 1e-3
        assert -err <= results[mi] <= results[ceiling] + err, (mi, results[mi], results[ceiling])
    assert results["mi_ceiling"] == pytest.approx(math.log(10))
    assert results["kl_prior_agg"] >= -4 * results["kl_prior_agg_stderr"]
    assert results["iw_nll"] <= results["neg_elbo"] + 0.05
    assert results["iw_ppl"] == pytest.approx(math.exp(results["iw_nll"] * 10 / 50))
    # The ELBO figures are training's evaluation of the same parameters.
    logged = [r for r in writers.read_metrics(workdir) if "eval_rec" in r][-1]
    assert results["rec"] == pytest.approx(logged["eval_rec"], rel=1e-4)
    assert results["kl"] == pytest.approx(logged["eval_kl"], rel=1e-4, abs=1e-6)


def test_evaluate_command_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        evaluate.main([f"--workdir={tmp_path}"])
    config = tiny_synthetic_config(steps=40)
    with open(tmp_path / "config.json", "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort())
    with pytest.raises(FileNotFoundError, match="no best checkpoint"):
        evaluate.main([f"--workdir={tmp_path}", "--checkpoint=best"])
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):
        evaluate.main([f"--workdir={tmp_path}"])  # auto: no best, so the last, and none
    model = build.make_model(config, config.data.vocab_size)
    params = init_params(model.clone(latent_dim=3))
    checkpoints.save(str(tmp_path / "best"), jax.device_get(params), {"step": 1})
    with pytest.raises(ValueError, match="do not match the model of config.model"):
        evaluate.main([f"--workdir={tmp_path}"])
    checkpoints.save(str(tmp_path / "best"), jax.device_get(init_params(model)), {"step": 1})
    with pytest.raises(ValueError, match="--split=test: this run's data has splits"):
        evaluate.main([f"--workdir={tmp_path}", "--split", "test"])
    with pytest.raises(SystemExit):
        evaluate.main([f"--workdir={tmp_path}", "--num_importance_samples=0"])
