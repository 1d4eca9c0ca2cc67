"""The train step across devices, the training loop, the command line and the experiment."""

import json
import os
import textwrap

import numpy as np
import pytest
from conftest import run_python, tiny_synthetic_config

from vae_jax.run import loop, steps, writers

# Runs in a subprocess: XLA reads the fake device count once, before jax initialises.
MULTI_DEVICE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import jax_utils
    sys.path.insert(0, "configs")
    import synthetic
    from vae_jax.core import objectives
    from vae_jax.run import build, steps

    assert jax.local_device_count() == 4, jax.devices()
    config = synthetic.get_config("cyclical")
    config.num_train_steps = 8
    config.model.update(enc_emb_dim=8, enc_hidden_dim=16, dec_emb_dim=8, dec_hidden_dim=16,
                        dec_dropout_in=DROPOUT, dec_dropout_out=DROPOUT, bn_gamma=BN_GAMMA)
    data = build.get_data(config)
    beta_fn, lr_fn = steps.make_schedules(config, None)
    model = build.make_model(config, data.vocab_size)
    state0 = steps.create_train_state(config, model, lr_fn, jax.random.PRNGKey(0), 12)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(3):
        tokens = data.info["sequences"][rng.integers(0, 10, size=8)]
        tokens[5:] = 0  # filler rows: the last two shards hold fewer real rows than the first
        batches.append({"tokens": tokens})
    results = {}
    for n in (1, 4):
        devices = jax.local_devices()[:n]
        p_step = steps.make_p_train_step(model, beta_fn, lr_fn, objectives.beta_elbo,
                                         devices=devices, donate=False)
        state, losses = jax_utils.replicate(state0, devices), []
        for batch in batches:
            state, metrics = p_step(state, steps.shard(batch, n))
            m = jax.tree.map(lambda x: float(x[0]), metrics)
            losses.append((m["rec"] + m["beta"] * m["kl"]) / m["sequences"])
        leaves = [np.asarray(x[0]) for x in jax.tree.leaves(state.params)]
        results[n] = (losses, leaves)
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(
        results[1][1], jax.tree.leaves(state0.params)))
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(results[1][1], results[4][1]))
    print(json.dumps({"losses_1": results[1][0], "losses_4": results[4][0],
                      "max_param_diff": diff, "max_param_update": moved}))
    """
)


@pytest.mark.parametrize("dropout, bn_gamma", [(0.0, 0.0), (0.5, 0.0), (0.5, 0.5)])
def test_four_devices_compute_what_one_device_computes(dropout, bn_gamma):
    # bn_gamma > 0: BN-VAE, whose batch statistics are over the global batch.
    script = MULTI_DEVICE_SCRIPT.replace("DROPOUT", str(dropout)).replace("BN_GAMMA", str(bn_gamma))
    out = run_python(["-c", script], env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(result["losses_1"], result["losses_4"], rtol=1e-5)
    assert result["max_param_update"] > 1e-4  # the steps did move the parameters
    # Summation order differs across shards; Adam divides by √v, so a float-rounding difference
    # in a near-zero gradient entry can move that parameter by a fraction of lr = 1e-3. 1e-5 is
    # 1% of one step, while any per-device mismatch of noise or normalisation moves them ~lr.
    assert result["max_param_diff"] < 1e-5


def test_train_and_evaluate_writes_metrics(tmp_path):
    config = tiny_synthetic_config("monotonic", steps=30, eval_every=15)
    config.beta_schedule.warmup_steps = 40  # longer than the run: every logged β is on the ramp
    state = loop.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 30
    records = writers.read_metrics(str(tmp_path))
    train_records = [r for r in records if "rec" in r]
    assert [r["step"] for r in train_records] == [10, 20, 30]
    for r in train_records:
        assert {"beta", "lr", "rec", "kl", "elbo", "loss", "grad_norm"} <= set(r)
        assert np.isfinite([r["rec"], r["kl"], r["elbo"]]).all()
        assert r["elbo"] == pytest.approx(-(r["rec"] + r["kl"]), rel=1e-5)
    # A record's β is the schedule's at its last step: step 10 trains at schedule step 9.
    assert [r["beta"] for r in train_records] == pytest.approx([9 / 40, 19 / 40, 29 / 40])
    assert [r["lr"] for r in train_records] == pytest.approx([1e-3] * 3)
    eval_records = [r for r in records if "eval_rec" in r]
    assert [r["step"] for r in eval_records] == [15, 30]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))


def test_schedules_follow_num_train_steps():
    config = tiny_synthetic_config("cyclical", steps=400)
    assert config.beta_schedule.total_steps == 400
    beta_fn, _ = steps.make_schedules(config, None)
    assert float(beta_fn(100)) == 0.0 and float(beta_fn(50)) == 1.0  # 4 cycles of 100 steps
    mono = tiny_synthetic_config("monotonic", steps=400)
    assert mono.beta_schedule.warmup_steps == 100


def test_epoch_unit_needs_epochs():
    config = tiny_synthetic_config()
    config.schedule_unit = "epochs"
    with pytest.raises(ValueError, match="schedule_unit='epochs'"):
        steps.make_schedules(config, None)
    beta_fn, _ = steps.make_schedules(config, steps_per_epoch=2)  # total_steps 30 epochs → 60
    assert float(beta_fn(15)) == 0.0  # second cycle of 15 steps starts at step 15


def test_batch_size_must_divide_over_devices(tmp_path, monkeypatch):
    config = tiny_synthetic_config()
    config.batch_size = 0
    with pytest.raises(ValueError, match=r"config.batch_size=0: must be a positive integer"):
        loop.train_and_evaluate(config, str(tmp_path))
    # Three devices cannot split batches of 8; checked before any data is read or compiled.
    monkeypatch.setattr(loop.jax, "device_count", lambda: 3)  # all processes' devices
    with pytest.raises(ValueError, match=r"config.batch_size=8: must be a multiple of the 3"):
        loop.train_and_evaluate(tiny_synthetic_config(), str(tmp_path))
    assert not os.path.exists(tmp_path / "config.json")
    monkeypatch.setattr(loop.jax, "device_count", lambda: 2)
    config = tiny_synthetic_config(eval_batch_size=3)
    with pytest.raises(ValueError, match=r"config.eval_batch_size=3: must be a multiple of the 2"):
        loop.train_and_evaluate(config, str(tmp_path))


def test_main_command_line_overrides(tmp_path):
    cmd = [
        "-m",
        "vae_jax.main",
        "--config=configs/synthetic.py:monotonic",
        f"--workdir={tmp_path}",
        "--config.num_train_steps=20",
        "--config.log_every_steps=10",
        "--config.model.enc_hidden_dim=8",
        "--config.model.dec_hidden_dim=8",
    ]
    out = run_python(cmd)
    assert out.returncode == 0, out.stderr[-3000:]
    steps = [r["step"] for r in writers.read_metrics(str(tmp_path)) if "rec" in r]
    assert steps == [10, 20]
    bad = run_python(cmd + ["--config.no_such_field=1"])
    assert bad.returncode != 0 and "no_such_field" in bad.stderr


def test_experiment_script_writes_its_files_and_cyclical_beats_constant(tmp_path):
    # 4,000 steps a schedule (a tenth of the paper's; about a minute here): long enough for the
    # paper's pattern, cyclical β keeping information in z where constant β = 1 collapses.
    cmd = ["experiments/fig3_synthetic.py", "--out", str(tmp_path), "--steps", "4000"]
    out = run_python([*cmd, "--samples", "20"], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("curves.png", "latents.png", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"constant", "monotonic", "cyclical"}
    for figures in summary.values():
        assert {"rec", "kl", "elbo", "separation"} <= set(figures)
        assert 0.0 <= figures["separation"] <= 1.0
        assert figures["elbo"] == pytest.approx(-(figures["rec"] + figures["kl"]), rel=1e-4)
    cyclical, constant = summary["cyclical"], summary["constant"]
    # Constant β collapses the posterior (a KL near 0); cyclical β keeps information in z.
    assert constant["kl"] < 0.05 < 0.3 < cyclical["kl"]
    # Chance is 1/10 (a collapsed posterior): cyclical β's latents separate the sequences
    # clearly better than that collapse does.
    assert cyclical["separation"] > constant["separation"] + 0.15


@pytest.mark.parametrize("max_norm", [0.5, 100.0])  # clipping, and not clipping
def test_clip_by_global_norm_matches_optax(max_norm):
    import jax
    import optax

    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    grads = {"a": jax.random.normal(keys[0], (3, 4)), "b": jax.random.normal(keys[1], (5,))}
    norm = float(optax.tree.norm(grads))
    ours, reference = steps.clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
    want, _ = reference.update(grads, reference.init(grads))
    state = ours.init(grads)
    assert jax.tree.structure(state) == jax.tree.structure(reference.init(grads))  # checkpoints
    for passed in (None, norm):
        got, _ = ours.update(grads, state, global_norm=passed)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-6)
        assert float(optax.tree.norm(got)) == pytest.approx(min(max_norm, norm), rel=1e-6)
    # A norm passed in is the one used (the train step passes the one it has computed).
    got, _ = ours.update(grads, state, global_norm=2 * max(max_norm, norm))
    np.testing.assert_allclose(
        got["a"], grads["a"] * max_norm / (2 * max(max_norm, norm)), rtol=1e-6
    )


def test_command_line_errors_are_one_line_and_exit_2(tmp_path):
    main = ["-m", "vae_jax.main", "--config=configs/synthetic.py", f"--workdir={tmp_path}"]
    for flags, message in (
        (["--config.batch_size=0"], "error: config.batch_size=0: must be a positive integer"),
        (["--config.modle.latent_dim=3"], "names no field of the config"),
        (["--config.batch_size=abc"], "--config.batch_size=abc"),
    ):
        out = run_python([*main, *flags], timeout=120)
        assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
        assert "Traceback" not in out.stderr
    verbose = run_python([*main, "--config.batch_size=0", "--verbosity=1"], timeout=120)
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr
    evaluate = run_python(["-m", "vae_jax.evaluate", f"--workdir={tmp_path}/none"], timeout=120)
    assert evaluate.returncode == 2 and "error: --workdir=" in evaluate.stderr
    assert "Traceback" not in evaluate.stderr


def test_keep_period_counts_epochs_where_given():
    config = tiny_synthetic_config("cyclical", checkpoint_keep_period=5)
    assert loop.keep_period(config, steps_per_epoch=7) == 5  # steps, as before
    config.checkpoint_keep_every_epochs = 10  # Yelp's cycle ends: epochs 10, 20, …
    assert loop.keep_period(config, steps_per_epoch=7) == 70
    with pytest.raises(ValueError, match="checkpoint_keep_every_epochs=10: .* has no epochs"):
        loop.keep_period(config, steps_per_epoch=None)


def test_synthetic_lr_restart_variants_make_the_two_by_two():
    """configs/synthetic.py's β × lr 2 × 2: the restart variants keep their β schedule and
    restart a cosine lr with each of the 4 cycles; the plain ones keep lr 1e-3."""
    import numpy as np
    import synthetic  # configs/synthetic.py

    for beta in ("monotonic", "cyclical"):
        plain, restarts = synthetic.get_config(beta), synthetic.get_config(f"{beta}_lr_restarts")
        plain.num_train_steps = restarts.num_train_steps = 400  # cycles of 100 steps
        assert restarts.beta_schedule.to_dict() == plain.beta_schedule.to_dict()
        _, lr_plain = steps.make_schedules(plain, None)
        _, lr = steps.make_schedules(restarts, None)
        at = np.array([0, 50, 99, 100, 150, 300])
        np.testing.assert_allclose(np.asarray(lr_plain(at)), 1e-3)
        want = 0.5e-3 * (1 + np.cos(np.pi * (at % 100) / 100))
        np.testing.assert_allclose(np.asarray(lr(at)), want, rtol=1e-4, atol=1e-9)
    out = run_python(["experiments/fig3_synthetic.py", "--out", "/nonexistent", "--schedules=x"])
    assert out.returncode == 2 and "--schedules: configs/synthetic.py:x" in out.stderr
