"""SA-VAE: the SVI refinement's gradients, its end-to-end gradient, and its train/eval steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import ptb  # configs/ptb.py, on the path by conftest
import pytest
import synthetic  # configs/synthetic.py
from conftest import tiny_synthetic_config
from flax import jax_utils

from vae_jax import evaluate
from vae_jax.core import models, objectives, savae
from vae_jax.core.tokens import BOS_ID, EOS_ID, PAD_ID, sequence_lengths
from vae_jax.run import build, loop, steps, writers

V = 11
SIZES = dict(enc_emb_dim=5, enc_hidden_dim=6, dec_emb_dim=4, dec_hidden_dim=7, latent_dim=3)


def tokens_of(*sentences, length=7):
    rows = [[BOS_ID, *s, EOS_ID] for s in sentences]
    return jnp.array([r + [PAD_ID] * (length - len(r)) for r in rows], jnp.int32)


# Three sentences and a filler row of padding only (it must get a zero gradient, not a NaN).
TOKENS = jnp.concatenate([tokens_of([5, 6, 7], [8, 9], [10, 4, 5, 6, 7]), jnp.zeros((1, 7), int)])
KEYS = jax.random.split(jax.random.PRNGKey(1), 4)


def init(model):
    return model.init(jax.random.PRNGKey(0), TOKENS, KEYS, train=False)["params"]


def per_example_f(model, params, lam, keys, beta, train):
    """f_n = Rec_n + β·KL_n of each row, written out independently of `objectives.beta_elbo`."""
    out = savae.outputs_at(model, params, TOKENS, lam, keys, train=train)
    rec = objectives.reconstruction(out["logits"], TOKENS)
    real = sequence_lengths(TOKENS) > 0  # filler rows count nothing
    return jnp.where(real, rec + beta * objectives.gaussian_kl(*lam), 0.0)


def test_per_example_svi_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        model = savae.SAVAE(vocab_size=V, **SIZES, dec_dropout_in=0.3, dec_dropout_out=0.3)
        params = jax.tree.map(lambda x: x.astype(jnp.float64), init(model))
        rng = np.random.default_rng(0)
        lam = tuple(jnp.asarray(rng.normal(0, 0.5, (4, 3))) for _ in range(2))
        beta = 0.7
        _, grads = jax.jit(
            lambda lam: savae.svi_gradients(
                model, params, TOKENS, lam, KEYS, beta=jnp.float64(beta), train=True
            )
        )(lam)
        # Perturb one coordinate of one example at a time; every row's f_n is watched, so a
        # coupling between examples would show as a non-zero off-diagonal difference.
        h = 1e-5
        bumps = []
        for part in range(2):
            for n in range(4):
                for d in range(3):
                    e = np.zeros((2, 4, 3))
                    e[part, n, d] = h
                    bumps.append(e)
        bumps = jnp.asarray(np.stack(bumps))
        f = jax.jit(
            jax.vmap(
                lambda e: per_example_f(
                    model, params, (lam[0] + e[0], lam[1] + e[1]), KEYS, beta, True
                )
            )  # fmt: skip
        )
        fd = (f(bumps) - f(-bumps)) / (2 * h)  # (2·4·3, 4): d f_m / d λ[part, n, d]
        fd = np.asarray(fd).reshape(2, 4, 3, 4)
        for part in range(2):
            want = np.einsum("ndn->nd", fd[part])  # own example's derivative
            np.testing.assert_allclose(grads[part], want, rtol=1e-6, atol=1e-9)
            off_diagonal = fd[part] * (1 - np.eye(4))[:, None, :]
            assert np.max(np.abs(off_diagonal)) < 1e-9
        assert np.all(np.asarray(grads[0][3]) == 0) and np.all(np.asarray(grads[1][3]) == 0)


def test_clip_rows_clips_each_example_and_keeps_zero_rows_differentiable():
    g = jnp.array([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    clipped = savae.clip_rows(g, 1.0)
    np.testing.assert_allclose(jnp.linalg.norm(clipped, axis=-1), [1.0, 0.5, 0.0], rtol=1e-5)
    jac = jax.jacobian(lambda x: savae.clip_rows(x, 1.0))(g)
    assert np.all(np.isfinite(jac))


@pytest.mark.parametrize("end_to_end", [True, False])
def test_encoder_and_decoder_gradients_through_two_svi_steps_match_finite_differences(end_to_end):
    with jax.enable_x64(True):
        # A large SVI step and no dropout, so that λ_K depends strongly on λ₀ and θ; clipping
        # off (a kink): this checks the gradient of the unrolled refinement itself.
        model = savae.SAVAE(
            vocab_size=V, **SIZES, dec_dropout_in=0.0, dec_dropout_out=0.0, svi_steps=2,
            svi_lr=0.5, svi_max_grad_norm=1e6, svi_end_to_end=end_to_end,
        )  # fmt: skip
        params = jax.tree.map(lambda x: x.astype(jnp.float64), init(model))
        beta = jnp.float64(0.6)

        @jax.jit
        def loss(p):
            return savae.loss(model, p, TOKENS, KEYS, beta=beta, train=True)[0]

        grads = jax.jit(jax.grad(loss))(params)
        rng = np.random.default_rng(1)

        def direction(prefix):
            """A random direction in the parameters whose names start with ``prefix``."""
            d = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), params)
            return {k: jax.tree.map(lambda x: x * k.startswith(prefix), v) for k, v in d.items()}  # noqa: B023

        def fd(d, h=1e-5):
            step = lambda s: jax.tree.map(lambda p, u: p + s * h * u, params, d)  # noqa: E731
            return float((loss(step(1)) - loss(step(-1))) / (2 * h))

        def dot(a, b):
            pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
            return float(sum(jnp.vdot(x, y) for x, y in pairs))

        # What the encoder would get without any refinement: the plain VAE's gradient.
        vae = models.VAE(vocab_size=V, **SIZES, dec_dropout_in=0.0, dec_dropout_out=0.0)
        plain = jax.jit(
            jax.grad(
                lambda p: objectives.beta_elbo(
                    vae.apply({"params": p}, TOKENS, KEYS, train=True), TOKENS, beta
                )[0]
            )
        )(params)

        enc, dec = direction("enc_"), direction("dec_")
        if end_to_end:
            for d in (enc, dec):
                np.testing.assert_allclose(dot(grads, d), fd(d), rtol=1e-6)
            # The check can tell: the encoder gradient through the refinement is not λ₀'s.
            assert abs(dot(grads, enc) - dot(plain, enc)) > 1e-3 * abs(fd(enc))
        else:
            # The encoder is trained on its own f(λ₀); the decoder on f at a constant λ_K.
            np.testing.assert_allclose(dot(grads, enc), dot(plain, enc), rtol=1e-9)

            @jax.jit
            def f_at_lam_k(p):
                lam0 = model.apply({"params": params}, TOKENS, method=models.VAE.encode)
                lam_k = savae.refine(model, params, TOKENS, lam0, KEYS, beta=beta, train=True)
                out = savae.outputs_at(model, p, TOKENS, lam_k, KEYS, train=True)
                return objectives.beta_elbo(out, TOKENS, beta)[0]

            want = dot(jax.jit(jax.grad(f_at_lam_k))(params), dec)
            np.testing.assert_allclose(dot(grads, dec), want, rtol=1e-9)
            # The reported value is f(λ_K) in both modes.
            np.testing.assert_allclose(loss(params), f_at_lam_k(params), rtol=1e-12)


def tiny_config(svi_steps, dropout=0.5):
    config = synthetic.get_config("savae_cyclical")
    config.data.vocab_size = V
    config.model.update(SIZES, dec_dropout_in=dropout, dec_dropout_out=dropout)
    config.model.svi_steps = svi_steps
    return config


def steps_for(model, config):
    beta_fn, lr_fn = steps.make_schedules(config, None)
    p_train = steps.make_p_train_step(model, beta_fn, lr_fn, objectives.beta_elbo, donate=False)
    p_eval = steps.make_p_eval_step(model, objectives.beta_elbo)
    return p_train, p_eval


def test_k0_train_step_equals_the_plain_vae_step_exactly():
    config = tiny_config(svi_steps=2)
    vae = build.make_model(tiny_config(svi_steps=0), V)
    assert type(vae) is models.VAE  # svi_* fields are kept away from the plain VAE
    sa_k2 = build.make_model(config, V)
    assert isinstance(sa_k2, savae.SAVAE) and sa_k2.svi_steps == 2
    sa_k0 = sa_k2.clone(svi_steps=0)
    _, lr_fn = steps.make_schedules(config, None)
    state = steps.create_train_state(config, vae, lr_fn, jax.random.PRNGKey(3), TOKENS.shape[1])
    state = jax_utils.replicate(state)
    batch = steps.shard({"tokens": np.asarray(TOKENS)}, 1)
    results = {}
    for name, model in (("vae", vae), ("k0", sa_k0)):
        p_train, _ = steps_for(model, config)
        new_state, metrics = p_train(state, batch)
        results[name] = (jax.tree.leaves(new_state.params), metrics)
    for a, b in zip(results["vae"][0], results["k0"][0], strict=True):
        np.testing.assert_array_equal(a, b)
    for k in results["vae"][1]:
        np.testing.assert_array_equal(results["vae"][1][k], results["k0"][1][k])


def test_eval_step_reports_the_refined_posterior_under_the_eval_key():
    config = tiny_config(svi_steps=2)
    model = build.make_model(config, V)
    params = init(model)
    key = jax.random.PRNGKey(5)
    _, p_eval = steps_for(model, config)
    sums = p_eval(
        jax_utils.replicate(params),
        steps.shard({"tokens": np.asarray(TOKENS)}, 1),
        jax_utils.replicate(key),
    )
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(4))  # steps.example_keys
    out = savae.apply(model, params, TOKENS, keys, beta=jnp.float32(1.0), train=False)
    _, want = objectives.beta_elbo(out, TOKENS, jnp.float32(1.0))
    for k in want:
        np.testing.assert_allclose(sums[k][0], want[k], rtol=1e-5)
    lam0 = model.apply({"params": params}, TOKENS, method=models.VAE.encode)
    assert not np.allclose(out["mu"], lam0[0])  # refined, not the encoder's


def test_refinement_raises_the_elbo_of_a_trained_model():
    # Four sequences that only the latent tells apart from the first token on, a model trained
    # with β = 0.2 so that it uses its latent (sharp posteriors, the case refinement is for),
    # then K = 10 steps with the configs' settings on the ELBO (β = 1).
    rng = np.random.default_rng(0)
    body = rng.integers(4, V, size=(4, 6))
    tokens = jnp.asarray(np.concatenate([np.full((4, 1), 2), body, np.full((4, 1), 3)], 1))
    sizes = dict(SIZES, latent_dim=2, dec_dropout_in=0.0, dec_dropout_out=0.0)
    vae = models.VAE(vocab_size=V, **sizes)
    params = vae.init(jax.random.PRNGKey(0), tokens, KEYS, train=False)["params"]
    tx = optax.adam(1e-2)

    @jax.jit
    def fit(params):
        def step(carry, key):
            p, opt = carry
            g = jax.grad(
                lambda p: objectives.beta_elbo(
                    vae.apply({"params": p}, tokens, jax.random.split(key, 4), train=True),
                    tokens,
                    0.2,
                )[0]
            )(p)
            updates, opt = tx.update(g, opt)
            return (optax.apply_updates(p, updates), opt), None

        keys = jax.random.split(jax.random.PRNGKey(1), 600)
        return jax.lax.scan(step, (params, tx.init(params)), keys)[0][0]

    params = fit(params)
    config = ptb.get_config("savae_cyclical").model
    model = savae.SAVAE(vocab_size=V, **sizes, **{k: config[k] for k in savae.SVI_FIELDS})
    assert model.svi_steps == 10 and model.svi_lr == 1 / 32

    @jax.jit
    def elbos(seed):
        lam0 = vae.apply({"params": params}, tokens, method=models.VAE.encode)
        keys = jax.random.split(jax.random.PRNGKey(seed), 4)
        lam_k = savae.refine(model, params, tokens, lam0, keys, beta=1.0, train=False)
        # Mean ELBO per sequence over 256 z samples, the same samples at λ₀ and λ_K.
        sample_keys = jax.random.split(jax.random.PRNGKey(99), 256 * 4).reshape(256, 4, 2)

        def elbo(lam):
            f = lambda k: objectives.beta_elbo(  # noqa: E731
                savae.outputs_at(model, params, tokens, lam, k, train=False), tokens, 1.0
            )[0]
            return -jnp.mean(jax.vmap(f)(sample_keys)) / 4

        return elbo(lam0), elbo(lam_k), jnp.min(jnp.mean(jnp.exp(lam0[1]), axis=0))

    for seed in range(3):  # three draws of the SVI noise
        before, after, var0 = elbos(seed)
        assert var0 < 0.2  # the trained model does use its latent
        assert after > before + 0.02, (seed, before, after)


def test_configs_build_sa_vaes():
    for variant in ("savae_cyclical", "savae_monotonic"):
        config = ptb.get_config(variant)
        model = build.make_model(config, 100)
        assert isinstance(model, savae.SAVAE) and model.svi_steps == 10
        assert config.beta_schedule.name == variant.removeprefix("savae_")
    assert type(build.make_model(ptb.get_config("cyclical"), 100)) is models.VAE
    assert isinstance(build.make_model(synthetic.get_config("savae_monotonic"), 100), savae.SAVAE)
    with pytest.raises(ValueError, match="config.model.svi_momentum=1.5"):
        savae.SAVAE(vocab_size=10, svi_momentum=1.5)


def test_evaluate_scores_an_sa_vae_at_its_refined_posterior(tmp_path):
    """`vae_jax.evaluate` of an SA-VAE: its ELBO figures are training's logged evaluation
    (both at λ_K), MI/AU/holes use λ_K, IW-NLL with q(z|x; λ_K) bounds the ELBO, and the
    amortized λ₀ figures come beside them."""
    workdir = str(tmp_path)
    config = tiny_synthetic_config("savae_cyclical", steps=60, log_every=20)
    config.model.svi_steps = 5
    loop.train_and_evaluate(config, workdir)
    argv = [f"--workdir={workdir}", "--checkpoint=last", "--num_importance_samples=200"]
    results = evaluate.main([*argv, "--num_prior_samples=500"])

    logged = [r for r in writers.read_metrics(workdir) if "eval_rec" in r][-1]
    assert results["rec"] == pytest.approx(logged["eval_rec"], rel=1e-4)
    assert results["kl"] == pytest.approx(logged["eval_kl"], rel=1e-4, abs=1e-6)
    assert results["posterior"].startswith("svi_refined")
    assert results["amortized_posterior"].startswith("encoder")
    # Refinement does not lower the ELBO beyond Monte Carlo error.
    err = 4 * results["elbo_mc_stderr"]
    assert results["neg_elbo"] <= results["amortized_neg_elbo"] + err
    assert results["iw_nll"] <= results["neg_elbo"] + err
    assert results["amortized_iw_nll"] <= results["amortized_neg_elbo"] + err

    # AU's variances are those of λ_K's means, refined here by savae.apply under the same keys.
    _, data, model, params, _ = build.load_run(workdir, "last")
    key, mus = build.eval_key(config), []
    for i, batch in enumerate(data.eval_splits["eval"]):
        tokens = jnp.asarray(batch["tokens"])
        keys = jax.vmap(jax.random.fold_in, (None, 0))(
            jax.random.fold_in(key, i), jnp.arange(tokens.shape[0])
        )
        out = savae.apply(model, params, tokens, keys, beta=jnp.float32(1.0), train=False)
        mus.append(np.asarray(out["mu"])[np.asarray(sequence_lengths(tokens)) > 0])
    variances = np.var(np.concatenate(mus).astype(np.float64), axis=0, ddof=1)
    np.testing.assert_allclose(results["au_variances"], variances, rtol=1e-4, atol=1e-9)
    lam0 = model.apply({"params": params}, data.info["sequences"], method=models.VAE.encode)
    assert not np.allclose(np.concatenate(mus), lam0[0], rtol=0, atol=1e-6)  # λ_K ≠ λ₀
    amortized = np.var(np.asarray(lam0[0], np.float64), axis=0, ddof=1)
    np.testing.assert_allclose(results["amortized_au_variances"], amortized, rtol=1e-4, atol=1e-9)


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("end_to_end", [True, False])
def test_finite_difference_backward_pass_matches_the_exact_gradient(end_to_end):
    # float32 at init_scale 1 (the decoder listens to z) and a large SVI step, so that 90 % of
    # the gradient's norm comes through the refinement; clipping at 2 clips some rows (their
    # μ-gradients are 2.4 and 1.4), dropout on: the clip's Jacobian and step k's noise count.
    exact = savae.SAVAE(
        vocab_size=V, **SIZES, dec_dropout_in=0.3, dec_dropout_out=0.3, init_scale=1.0,
        svi_steps=4, svi_lr=0.5, svi_max_grad_norm=2.0, svi_remat=False,
        svi_end_to_end=end_to_end,
    )  # fmt: skip
    fd = exact.clone(svi_hvp="finite_difference")
    assert fd.svi_fd_eps == 1e-3
    params = init(exact)
    beta = jnp.float32(0.7)

    def loss(model):
        return lambda p: savae.loss(model, p, TOKENS, KEYS, beta=beta, train=True)[0]

    (value_exact, grad_exact), (value_fd, grad_fd) = (
        jax.jit(jax.value_and_grad(loss(m)))(params) for m in (exact, fd)
    )
    assert float(value_fd) == float(value_exact)
    a, b = flat(grad_exact), flat(grad_fd)
    if not end_to_end:  # nothing is differentiated through the refinement
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-9)
        return
    # The forward pass is the same computation: same λ_K, same loss, bit for bit (differentiated
    # or not; the two contexts may round differently, XLA fusing them apart).
    assert float(jax.jit(loss(fd))(params)) == float(jax.jit(loss(exact))(params))

    @jax.jit
    def lam_k(p):
        lam0 = exact.apply({"params": p}, TOKENS, method=models.VAE.encode)
        return [savae.refine(m, p, TOKENS, lam0, KEYS, beta=beta, train=True) for m in (exact, fd)]

    for x, y in zip(*lam_k(params), strict=True):
        np.testing.assert_array_equal(x, y)

    @jax.jit
    def at_constant_lam_k(p):  # the gradient without the refinement's share
        lam0 = exact.apply({"params": p}, TOKENS, method=models.VAE.encode)
        lam = jax.lax.stop_gradient(
            savae.refine(exact, p, TOKENS, lam0, KEYS, beta=beta, train=True)
        )
        out = savae.outputs_at(exact, p, TOKENS, lam, KEYS, train=True)
        return objectives.beta_elbo(out, TOKENS, beta)[0]

    through = a - flat(jax.jit(jax.grad(at_constant_lam_k))(params))
    assert np.linalg.norm(through) > 0.8 * np.linalg.norm(a)
    # Measured 6e-5 (of the whole gradient and of its share through the refinement alike).
    error = np.linalg.norm(b - a)
    assert error < 1e-3 * np.linalg.norm(a) and error < 1e-3 * np.linalg.norm(through)


def test_invalid_svi_hvp_raises_a_clear_error():
    with pytest.raises(ValueError, match=r"config.model.svi_hvp='fd': must be one of \('exact'"):
        savae.SAVAE(vocab_size=10, svi_hvp="fd")
    with pytest.raises(ValueError, match=r"config.model.svi_fd_eps=0.0: must be in \(0, 1\)"):
        savae.SAVAE(vocab_size=10, svi_fd_eps=0.0)
    with pytest.raises(ValueError, match=r"svi_hvp='finite_difference': must be 'exact' with"):
        savae.SAVAE(vocab_size=10, svi_hvp="finite_difference", dtype="bfloat16")
    config = ptb.get_config("savae_cyclical")
    assert config.model.svi_hvp == "exact"  # every config gets the field, from svi_defaults
    config.model.svi_hvp = "finite_differences"
    with pytest.raises(ValueError, match="config.model.svi_hvp='finite_differences'"):
        build.make_model(config, 100)


def test_training_with_finite_difference_hvps_tracks_the_exact_loss_curve():
    # A large SVI step and Adam at 1e-2, so that the refinement's share of the gradient moves
    # the curve: without it (svi_end_to_end=False) the losses depart by 4.5 % within 10 steps.
    config = tiny_config(svi_steps=3)
    config.model.update(init_scale=1.0, svi_lr=0.5)
    config.lr_schedule.value = 1e-2
    exact = build.make_model(config, V)
    _, lr_fn = steps.make_schedules(config, None)
    state = steps.create_train_state(config, exact, lr_fn, jax.random.PRNGKey(3), TOKENS.shape[1])
    batch = steps.shard({"tokens": np.asarray(TOKENS)}, 1)
    curves = {}
    for model in (exact, exact.clone(svi_hvp="finite_difference")):
        p_train, _ = steps_for(model, config)
        replicated, losses = jax_utils.replicate(state), []
        for _ in range(10):
            replicated, metrics = p_train(replicated, batch)
            losses.append(float(metrics["loss"][0]))
        curves[model.svi_hvp] = np.array(losses)
    assert curves["exact"][-1] < curves["exact"][0] - 0.1  # it does train
    # Measured: at most 1.6e-4 apart, relative (Adam's first steps move every coordinate by
    # about the learning rate whatever its gradient's size, so the finite differences' error
    # in near-zero coordinates shows).
    np.testing.assert_allclose(curves["finite_difference"], curves["exact"], rtol=2e-3)
