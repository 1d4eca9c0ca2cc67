"""Remedies against KL vanishing (vae_jax.core.objectives): known answers and an independent check
of the density gap, every remedy with every schedule and with SA-VAE, encoder pre-training."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_synthetic_config

from vae_jax.core import objectives
from vae_jax.core.tokens import BOS_ID, EOS_ID
from vae_jax.run import build, loop, steps, writers


def outputs_of(rng, batch=5, length=6, vocab=9, latent=3):
    tokens = np.zeros((batch, length), np.int32)
    for i in range(batch - 1):  # the last row is batch filler
        n = rng.integers(3, length + 1)
        tokens[i, :n] = np.r_[BOS_ID, rng.integers(4, vocab, n - 2), EOS_ID]
    outputs = {
        "logits": jnp.asarray(rng.normal(size=(batch, length - 1, vocab)), jnp.float32),
        "mu": jnp.asarray(rng.normal(size=(batch, latent)), jnp.float32),
        "logvar": jnp.asarray(rng.normal(size=(batch, latent)) * 0.5, jnp.float32),
        "keys": jax.random.split(jax.random.PRNGKey(0), batch),
    }
    return outputs, jnp.asarray(tokens)


@pytest.mark.parametrize("lam", [0.0, 0.3, 5.0])
def test_free_bits_known_answer(lam):
    outputs, tokens = outputs_of(np.random.default_rng(0))
    beta = jnp.float32(0.7)
    total, sums = objectives.free_bits(outputs, tokens, beta, lambda_per_dim=lam)
    mu, logvar = np.asarray(outputs["mu"], np.float64), np.asarray(outputs["logvar"], np.float64)
    kl_nd = 0.5 * (mu**2 + np.exp(logvar) - 1 - logvar)[:4]  # the 4 real rows
    want_kl = 4 * np.sum(np.maximum(lam, kl_nd.mean(0)))
    _, elbo_sums = objectives.beta_elbo(outputs, tokens, beta)
    np.testing.assert_allclose(sums["kl_objective"], want_kl, rtol=1e-5)
    np.testing.assert_allclose(total, elbo_sums["rec"] + 0.7 * want_kl, rtol=1e-5)
    np.testing.assert_allclose(sums["kl"], elbo_sums["kl"], rtol=1e-6)  # the analytic KL kept
    if lam == 0.0:  # nothing is free: the β-ELBO itself
        np.testing.assert_allclose(total, objectives.beta_elbo(outputs, tokens, beta)[0], 1e-5)
    if lam == 5.0:  # every dimension under λ: no gradient reaches μ or σ from the KL term
        grad = jax.grad(lambda m: objectives.free_bits({**outputs, "mu": m}, tokens, beta, 5.0)[1][
            "kl_objective"])(outputs["mu"])  # fmt: skip
        assert float(jnp.abs(grad).max()) == 0.0


def density_gap_reference(z, mu, logvar, chunk_size, mask):
    """The density gap written out with loops, in float64, from its definition."""
    z, mu, logvar = (np.asarray(x, np.float64) for x in (z, mu, logvar))
    var = np.exp(logvar)
    values = []
    for start in range(0, len(mu), chunk_size):
        members = [k for k in range(start, min(start + chunk_size, len(mu))) if mask[k]]
        if not members:
            continue
        terms = []
        for k in members:
            for sample in z[k]:
                dens = np.mean(
                    [np.exp(-0.5 * (sample - mu[c]) ** 2 / var[c]) / np.sqrt(2 * np.pi * var[c])
                     for c in members], axis=0)  # fmt: skip
                prior = np.exp(-0.5 * sample**2) / np.sqrt(2 * np.pi)
                terms.append(np.log(dens) - np.log(prior))  # (D,)
        values.append(np.sum(np.mean(terms, axis=0)))
    return float(np.mean(values))


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 7])
def test_density_gap_matches_an_independent_implementation(chunk_size):
    rng = np.random.default_rng(chunk_size)
    mu = rng.normal(size=(7, 3))
    logvar = rng.normal(size=(7, 3)) * 0.3
    z = mu[:, None] + np.exp(0.5 * logvar)[:, None] * rng.normal(size=(7, 5, 3))
    mask = np.array([1, 1, 0, 1, 1, 1, 0], bool)
    got = objectives.density_gap(
        jnp.asarray(z, jnp.float32), jnp.asarray(mu, jnp.float32),
        jnp.asarray(logvar, jnp.float32), chunk_size, jnp.asarray(mask),
    )  # fmt: skip
    np.testing.assert_allclose(got, density_gap_reference(z, mu, logvar, chunk_size, mask), 1e-4)


def test_density_gap_known_answers():
    rng = np.random.default_rng(1)
    z = jnp.asarray(rng.normal(size=(8, 4, 2)), jnp.float32)
    zeros = jnp.zeros((8, 2))
    # Every posterior is the prior: the aggregate is the prior at every sample, the gap 0.
    assert float(objectives.density_gap(z, zeros, zeros, 4)) == pytest.approx(0.0, abs=1e-6)
    # All posteriors N(m, 1): the Monte Carlo KL(N(m, 1) ‖ N(0, 1)) = Σ_j m_j² / 2.
    m = jnp.array([1.0, -2.0])
    samples = m + jnp.asarray(rng.normal(size=(16, 4000, 2)), jnp.float32)
    gap = objectives.density_gap(samples, jnp.tile(m, (16, 1)), jnp.zeros((16, 2)), 16)
    assert float(gap) == pytest.approx(2.5, abs=0.05)
    # Far-apart, sharp posteriors: raw densities underflow in float32, the log-domain does not.
    sharp = jnp.array([[0.0, 0.0], [30.0, -30.0]])
    logvar = jnp.full((2, 2), -20.0)
    z = sharp[:, None, :] + jnp.exp(-10.0) * jnp.asarray(rng.normal(size=(2, 3, 2)), jnp.float32)
    assert np.isfinite(float(objectives.density_gap(z, sharp, logvar, 2)))


def test_dg_vae_objective_is_rec_plus_beta_times_the_gap():
    outputs, tokens = outputs_of(np.random.default_rng(2))
    total, sums = objectives.dg_vae(outputs, tokens, jnp.float32(0.5), num_samples=6)
    _, elbo_sums = objectives.beta_elbo(outputs, tokens, jnp.float32(1.0))
    eps = jax.vmap(
        lambda k: jax.random.normal(jax.random.fold_in(k, objectives.DG_STREAM), (6, 3))
    )(outputs["keys"])
    z = outputs["mu"][:, None] + jnp.exp(0.5 * outputs["logvar"])[:, None] * eps
    real = np.array([True] * 4 + [False])
    gap = density_gap_reference(z, outputs["mu"], outputs["logvar"], 5, real)
    np.testing.assert_allclose(sums["kl_objective"], 4 * gap, rtol=1e-4)
    np.testing.assert_allclose(total, elbo_sums["rec"] + 0.5 * 4 * gap, rtol=1e-4)
    np.testing.assert_allclose(sums["kl"], elbo_sums["kl"], rtol=1e-6)


@pytest.mark.parametrize(
    "variant", ["free_bits", "free_bits_constant", "free_bits_monotonic", "dg_vae",
                "dg_vae_constant", "dg_vae_monotonic", "savae_cyclical"],
)  # fmt: skip
def test_every_remedy_trains_with_every_schedule_and_with_sa_vae(tmp_path, variant):
    config = tiny_synthetic_config(variant, steps=10, log_every=5)
    if variant.startswith("savae"):
        config.objective = "dg_vae"  # SA-VAE refines the β-ELBO, then trains on the remedy
        config.model.svi_steps = 2
    config.dg_vae.num_samples = 4
    loop.train_and_evaluate(config, str(tmp_path))
    records = [r for r in writers.read_metrics(str(tmp_path)) if "loss" in r]
    assert [r["step"] for r in records] == [5, 10]
    assert all(math.isfinite(r["loss"]) and r["nonfinite_steps"] == 0 for r in records)
    if config.beta_schedule.name == "constant":  # β = 1: the remedy's KL term, not the KL
        assert all(abs(r["loss"] - (r["rec"] + r["kl"])) > 1e-6 for r in records)


def test_encoder_pretraining_keeps_the_encoder_and_resets_the_decoder(tmp_path):
    pretrained = tiny_synthetic_config("constant", steps=20)
    pretrained.beta_schedule.value = 0.0
    ae = loop.train_and_evaluate(pretrained, str(tmp_path / "ae"))  # β = 0: an autoencoder
    config = tiny_synthetic_config("free_bits", steps=10, seed=7)
    config.init_from, config.init_reset = str(tmp_path / "ae"), ("dec",)
    model = build.make_model(config, config.data.vocab_size)
    _, lr_fn = steps.make_schedules(config, None)
    fresh = steps.create_train_state(config, model, lr_fn, jax.random.PRNGKey(7), 6).params
    params = build.init_params_from(config, model, fresh)
    for name in params:
        want = fresh[name] if name.startswith("dec") else ae.params[name]
        for a, b in zip(jax.tree.leaves(params[name]), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)
    assert {n for n in params if n.startswith("enc")} and {n for n in params if n.startswith("dec")}
    state = loop.train_and_evaluate(config, str(tmp_path / "fb"))  # the third command
    assert int(state.step) == 10
    config.init_reset = ("decoder",)
    with pytest.raises(ValueError, match=r"config.init_reset=\('decoder',\): \['decoder'\] match"):
        build.init_params_from(config, model, fresh)


def test_bn_vae_bounds_the_kl_and_evaluates_with_running_statistics(tmp_path):
    config = tiny_synthetic_config("bn_vae", steps=12, log_every=4)
    assert config.model.bn_gamma == 0.5 and config.objective == "beta_elbo"
    config.model.init_scale = 1.0  # μ̂ that varies over the batch far beyond BN's ε
    model = build.make_model(config, config.data.vocab_size)
    _, lr_fn = steps.make_schedules(config, None)
    params = steps.create_train_state(config, model, lr_fn, jax.random.PRNGKey(0), 6).params
    rng = np.random.default_rng(0)
    tokens = np.zeros((8, 6), np.int32)
    tokens[:6] = np.c_[np.full(6, BOS_ID), rng.integers(4, 12, (6, 4)), np.full(6, EOS_ID)]
    mu, logvar, stats = model.apply(
        {"params": params}, tokens, True, method=model.encode_with_stats
    )
    mu, logvar = np.asarray(mu[:6], np.float64), np.asarray(logvar[:6], np.float64)  # real rows
    # Batch-normalised μ: over the real rows, mean = the shift (0) and variance ≈ γ².
    np.testing.assert_allclose(mu.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(mu.var(0), 0.25 * stats["var"] / (stats["var"] + 1e-5), rtol=1e-4)
    kl = 0.5 * np.sum(mu**2 + np.exp(logvar) - 1 - logvar, -1)
    assert kl.mean() >= config.model.latent_dim * 0.25 / 2 - 1e-3  # E[KL] ≥ D·γ²/2
    state = loop.train_and_evaluate(config, str(tmp_path))
    p = state.params
    assert float(jnp.abs(p["enc_mu_bn_mean"]).max()) > 0  # running statistics moved
    # Evaluation uses them: μ = γ (μ̂ − r_mean) / √(r_var + ε) + shift, whatever the batch.
    one = model.apply({"params": p}, tokens[:1], method=model.encode)[0]
    plain = {k: v for k, v in p.items() if not k.startswith("enc_mu_")}
    plain["enc_mu"] = {"kernel": p["enc_mu_kernel"], "bias": jnp.zeros(config.model.latent_dim)}
    raw = model.clone(bn_gamma=0.0).apply({"params": plain}, tokens[:1], method=model.encode)[0]
    want = 0.5 * (raw - p["enc_mu_bn_mean"]) / jnp.sqrt(p["enc_mu_bn_var"] + 1e-5)
    np.testing.assert_allclose(one, want + p["enc_mu_bn_shift"], rtol=1e-5, atol=1e-6)


def test_bn_vae_with_sa_vae_trains(tmp_path):
    config = tiny_synthetic_config("savae_cyclical", steps=6, log_every=3)
    config.model.update(svi_steps=2, bn_gamma=0.5)
    state = loop.train_and_evaluate(config, str(tmp_path))
    records = [r for r in writers.read_metrics(str(tmp_path)) if "loss" in r]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert float(jnp.abs(state.params["enc_mu_bn_mean"]).max()) > 0


def test_remedies_script_plots_the_latent_spaces(tmp_path):
    from conftest import run_python

    cmd = ["experiments/remedies.py", "--synthetic", f"--workdir={tmp_path / 'runs'}"]
    out = run_python([*cmd, "--steps=40", "--rows=cyclical,dg_vae", f"--out={tmp_path}"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "latents.png").stat().st_size > 0
    summary = __import__("json").loads((tmp_path / "synthetic.json").read_text())
    assert set(summary) == {"cyclical", "dg_vae"}
    for figures in summary.values():
        assert {"rec", "kl", "separation", "kl_prior_agg", "cu@0.03"} <= set(figures)
        assert figures["steps"] == 40
        assert figures["elbo"] == pytest.approx(-(figures["rec"] + figures["kl"]), rel=1e-5)
    bad = run_python([*cmd, "--rows=savae_cyclical"])
    assert bad.returncode == 2 and "unknown ['savae_cyclical']" in bad.stderr
