"""Populations (`vae_jax.run.population`): K members as one vmapped program equal K single
workdirs."""

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from conftest import tiny_synthetic_config

from vae_jax.run import config_checks, guards, loop, population, writers

RATIOS = (0.25, 0.5, 0.75)


def _config(**top):
    config = tiny_synthetic_config("cyclical", steps=30, eval_every=15, **top)
    config.model.update(dec_dropout_in=0.5, dec_dropout_out=0.5)  # noise per member too
    return config


def _max_rel(a: dict, b: dict) -> float:
    keys = [k for k in b if k != "steps_per_second" and k in a]
    return max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-8) for k in keys)


def test_each_member_computes_its_single_run(tmp_path):
    fields = (("beta_schedule.ratio", RATIOS),)
    pop = _config(seed=3, population_size=3, population_fields=fields)
    state = loop.train_and_evaluate(pop, str(tmp_path / "pop"))
    assert np.asarray(state.step).tolist() == [30, 30, 30]
    for k, ratio in enumerate(RATIOS):
        single = _config(seed=3 + k, data_seed=3)
        single.beta_schedule.ratio = ratio
        alone = loop.train_and_evaluate(single, str(tmp_path / f"single{k}"))
        member_dir = population.member_dir(str(tmp_path / "pop"), k)
        got, want = writers.read_metrics(member_dir), writers.read_metrics(tmp_path / f"single{k}")
        assert [r["step"] for r in got] == [r["step"] for r in want]
        # vmap may sum in another order: observed ≤ 1e-6 relative on every logged figure.
        assert max(_max_rel(a, b) for a, b in zip(got, want, strict=True)) < 1e-5
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(alone.params), strict=True):
            np.testing.assert_allclose(np.asarray(a)[k], b, rtol=1e-5, atol=1e-6)
        with open(os.path.join(member_dir, "config.json")) as f:
            saved = json.load(f)
        assert (saved["seed"], saved["data_seed"]) == (3 + k, 3)
        assert saved["beta_schedule"]["ratio"] == ratio
        assert os.path.exists(os.path.join(member_dir, "metrics.jsonl"))
    # Members differ: their own seeds and ratios give different parameters.
    leaf = np.asarray(jax.tree.leaves(state.params)[0])
    assert not np.allclose(leaf[0], leaf[1])


def test_population_resumes_exactly(tmp_path):
    config = _config(population_size=2)
    straight = loop.train_and_evaluate(config, str(tmp_path / "whole"))

    def interrupt(step, state):
        if step == 17:
            raise KeyboardInterrupt

    workdir = str(tmp_path / "split")
    with pytest.raises(guards.TrainingInterrupted, match="step 17"):
        loop.train_and_evaluate(config, workdir, callbacks=[interrupt])
    resumed = loop.train_and_evaluate(config, workdir)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for k in range(2):
        got, want = (
            [r for r in writers.read_metrics(population.member_dir(d, k)) if "kl" in r or
             "eval_kl" in r]
            for d in (workdir, str(tmp_path / "whole"))
        )  # fmt: skip
        assert [r["step"] for r in got] == [r["step"] for r in want]
        assert [r.get("eval_elbo") for r in got] == [r.get("eval_elbo") for r in want]


@pytest.mark.parametrize(
    "fields, message",
    [
        ((("model.latent_dim", (2, 3)),), "cannot vary within a population"),
        ((("beta_schedule.ratio", (0.5,)),), "one value per member"),
        ((("beta_schedule.nope", (0.5, 0.6)),), "names no field"),
        ((("beta_schedule.num_cycles", (2, 2.5)),), "beta_schedule.num_cycles"),
        ((("lr_schedule.value", (1e-3, -1.0)),), "lr_schedule.value"),
    ],
)
def test_bad_population_fields_are_named(fields, message):
    config = _config(population_size=2, population_fields=fields)
    if message == "lr_schedule.value":
        config = tiny_synthetic_config("constant", population_size=2, population_fields=fields)
    with pytest.raises(ValueError, match=message):
        config_checks.check_config(config, 1)


def test_evaluate_and_generate_take_a_member(tmp_path):
    from vae_jax import evaluate, generate

    workdir = str(tmp_path / "pop")
    loop.train_and_evaluate(_config(population_size=2), workdir)
    with pytest.raises(ValueError, match="--member=<k>"):
        evaluate.main([f"--workdir={workdir}", "--num_importance_samples=2"])
    for k in range(2):
        for checkpoint in ("last", "30"):
            results = evaluate.main(
                [f"--workdir={workdir}", f"--member={k}", f"--checkpoint={checkpoint}",
                 "--num_importance_samples=2", "--num_prior_samples=4"]
            )  # fmt: skip
            # The member's figures are the ones training logged for it (the same eval key).
            logged = writers.read_metrics(population.member_dir(workdir, k))
            last_eval = [r for r in logged if "eval_elbo" in r][-1]
            assert results["elbo"] == pytest.approx(last_eval["eval_elbo"], rel=1e-6)
        assert os.path.exists(os.path.join(population.member_dir(workdir, k), "eval_eval.json"))
    lines = generate.main([f"--workdir={workdir}", "--member=1", "--mode=prior", "--num=2"])
    assert len(lines) >= 2


def test_text_population_keeps_each_members_best(tmp_path):
    from test_input_pipeline import tiny_ptb_config

    from vae_jax.run import workdirs

    config = tiny_ptb_config(tmp_path)
    config.update(population_size=2, population_fields=(("lr_schedule.init_value", (1e-3, 3e-3)),))
    workdir = str(tmp_path / "pop")
    loop.train_and_evaluate(config, workdir)
    for k in range(2):
        member_dir = population.member_dir(workdir, k)
        records = writers.read_metrics(member_dir)
        valid = [r["valid_ppl_bound"] for r in records if "valid_ppl_bound" in r]
        assert len(valid) == config.num_epochs
        assert workdirs.best_value(member_dir) == min(valid)
        lrs = {r["lr"] for r in records if "lr" in r}
        assert max(lrs) == pytest.approx((1e-3, 3e-3)[k])
    # The Table 1 report reads a population as its members: one row, mean ± std over them.
    import table1_ptb  # experiments/table1_ptb.py (on sys.path via conftest)

    dirs = table1_ptb.run_dirs(workdir)
    assert dirs == [population.member_dir(workdir, k) for k in range(2)]
    (group,) = table1_ptb.grouped([table1_ptb.row(d, "test", "best") for d in dirs])
    assert group["n"] == 2 and group["kl_std"] is not None
    tests = [table1_ptb.row(d, "test", "best")["kl"] for d in dirs]
    assert group["kl"] == pytest.approx(np.mean(tests))
    assert "± " in table1_ptb.markdown([group], "test")
    table1_ptb.plot_curves([group], str(tmp_path / "curves.png"))
    assert os.path.getsize(tmp_path / "curves.png") > 0
    # The archive (no checkpoints) rebuilds the same rows once the workdir is gone.
    from vae_jax import evaluate

    evaluate.main([f"--workdir={workdir}", "--member=1", "--split=test", "--checkpoint=best",
                   "--num_importance_samples=2"])  # fmt: skip
    archived = str(tmp_path / "archive")
    table1_ptb.archive(dirs, archived)
    assert sorted(os.listdir(archived)) == ["pop.member-0", "pop.member-1"]
    assert not any(os.path.isdir(os.path.join(archived, "pop.member-1", f)) for f in
                   os.listdir(os.path.join(archived, "pop.member-1")))  # fmt: skip
    kept = sorted(os.listdir(os.path.join(archived, "pop.member-1")))
    assert kept == ["config.json", "eval_test.json", "evaluations.json"]  # no training rows
    before = [table1_ptb.row(d, "test", "best") for d in dirs]
    assert "iw_nll" in before[1]
    shutil.rmtree(workdir)
    after = [table1_ptb.row(d, "test", "best") for d in table1_ptb.run_dirs(archived)]
    for a, b in zip(after, before, strict=True):
        assert a["workdir"] != b["workdir"] and {**a, "workdir": 0} == {**b, "workdir": 0}
    table1_ptb.plot_curves(table1_ptb.grouped(after), str(tmp_path / "again.png"))
    with pytest.raises(ValueError, match="share the name"):
        table1_ptb.archive([dirs[0], dirs[0]], str(tmp_path / "clash"))


def test_an_autoencoder_keeps_its_best_by_rec(tmp_path):
    """β = 0: the KL grows unpenalised, so the PPL bound is no measure of the run; best/ holds
    the parameters of the lowest valid Rec (``config.best_metric="rec"``)."""
    from test_input_pipeline import tiny_ptb_config

    from vae_jax.run import workdirs

    config = tiny_ptb_config(tmp_path)
    config.update(num_epochs=3, best_metric="rec")
    config.beta_schedule = ml_collections.ConfigDict({"name": "constant", "value": 0.0})
    workdir = str(tmp_path / "ae")
    loop.train_and_evaluate(config, workdir)
    valid = {r["step"]: r for r in writers.read_metrics(workdir) if "valid_rec" in r}
    best_step = min(valid, key=lambda s: valid[s]["valid_rec"])
    with open(os.path.join(workdir, workdirs.BEST, "info.json"), encoding="utf-8") as f:
        assert json.load(f)["step"] == best_step
    assert workdirs.best_value(workdir, "rec") == valid[best_step]["valid_rec"]
    config.best_metric = "kl"
    with pytest.raises(ValueError, match="config.best_metric='kl'"):
        config_checks.check_config(config, 1)
