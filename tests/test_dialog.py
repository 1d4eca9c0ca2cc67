"""The dialog task end to end (`configs/swda.py`): batches, training, resume, evaluation."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import swda as swda_config  # configs/swda.py
from conftest import run_python

from vae_jax.core.tokens import BOS_ID, EOS_ID, PAD_ID
from vae_jax.data import text
from vae_jax.dialog import batcher as dialog_batcher
from vae_jax.dialog import swda
from vae_jax.run import config_checks, early_stopping, loop, workdirs

ROOT = os.environ.get(text.DATA_DIR_ENV, "")
needs_swda = pytest.mark.skipif(
    not os.path.isdir(os.path.join(ROOT, "swda_raw"))
    or not os.path.isdir(os.path.join(ROOT, "swda")),
    reason=f"the SwitchBoard data is absent (set ${text.DATA_DIR_ENV} to ../shared/data)",
)


def tiny_config(tmp_path, steps: int = 12):
    config = swda_config.get_config("tiny")
    config.data.tfds_dir = str(tmp_path / "tfds")
    config.num_train_steps = steps
    return config


def make_dialog(utterances, speakers, topic=1):
    return swda.Dialog(
        topic=topic,
        profiles=np.array([[0.5, 0.3, 1, 0], [0.4, 0.6, 0, 1]], np.float32),
        speakers=np.array(speakers, np.int32),
        utterances=tuple(np.array(u, np.int32) for u in utterances),
        acts=np.arange(len(utterances), dtype=np.int32) - 1,
        source="test",
    )


def test_dialog_batcher_windows_floors_profiles_and_truncation():
    d = make_dialog([[4], [5, 6], [7], [8, 9, 10, 11, 12, 13], [14]], [0, 1, 0, 1, 1])
    batcher = dialog_batcher.DialogBatcher([d], 3, window=3, max_utt_len=5, bucket_lengths=(4, 5))
    assert batcher.rows.tolist() == [[0, 1], [0, 2], [0, 3], [0, 4]]
    assert batcher.steps_per_epoch == 2
    b = batcher.batch(np.array([3, 1]))
    # Row 3 (response 14, speaker B): context utterances 2 and 3, the long one cut to 5 tokens
    # ending in </s>; floors 1 where the speaker is the response's.
    assert b["tokens"][0].tolist() == [BOS_ID, 14, EOS_ID, PAD_ID]
    assert b["context"][0, 0].tolist() == [BOS_ID, 7, EOS_ID, PAD_ID, PAD_ID]
    assert b["context"][0, 1].tolist() == [BOS_ID, 8, 9, 10, EOS_ID]
    assert b["context_lengths"][:2].tolist() == [2, 2]
    assert b["floors"][0].tolist() == [0, 1]
    # Row 1 (response 7, speaker A): the begin-of-dialog utterance and utterance 1.
    assert b["context"][1, 0, :3].tolist() == [BOS_ID, 4, EOS_ID]
    assert b["floors"][1].tolist() == [1, 0]
    np.testing.assert_array_equal(b["my_profile"][0], d.profiles[1])
    np.testing.assert_array_equal(b["other_profile"][0], d.profiles[0])
    assert b["acts"][:2].tolist() == [3, 1] and b["acts"][2] == -1
    # The filler row counts for nothing.
    assert (b["tokens"][2] == PAD_ID).all() and b["context_lengths"][2] == 0


def test_dialog_batcher_epochs_use_every_row_once_in_a_seeded_order():
    dialogs = [
        make_dialog([[4]] + [[5 + k]] * n, [0, 1] * (n // 2) + [0] * (n % 2 + 1))
        for n, k in ((4, 0), (6, 1))
    ]
    batcher = dialog_batcher.DialogBatcher(dialogs, 4, 3, 6, (6,), seed=3)
    plans = [np.concatenate(batcher.plan(e)) for e in (0, 1)]
    for plan in plans:
        assert sorted(plan.tolist()) == list(range(len(batcher.rows)))
    assert plans[0].tolist() != plans[1].tolist()
    again = dialog_batcher.DialogBatcher(dialogs, 4, 3, 6, (6,), seed=3)
    assert np.concatenate(again.plan(0)).tolist() == plans[0].tolist()
    # Resuming at (epoch 1, batch 1) gives the batches a run from the start gives there.
    stream = batcher.epochs()
    batches = [next(stream) for _ in range(batcher.steps_per_epoch + 2)]
    resumed = next(batcher.epochs(1, 1))
    for k in resumed:
        np.testing.assert_array_equal(resumed[k], batches[batcher.steps_per_epoch + 1][k])


def test_config_checks_name_dialog_fields(tmp_path):
    config = tiny_config(tmp_path)
    config.objective = "dg_vae"
    with pytest.raises(ValueError, match="objective.*p\\(z\\|c\\)"):
        config_checks.check_config(config, 1)
    config = tiny_config(tmp_path)
    config.data.window = 0
    with pytest.raises(ValueError, match="data.window"):
        config_checks.check_config(config, 1)
    config = tiny_config(tmp_path)
    config.model.dtype = "float16"
    with pytest.raises(ValueError, match="model.dtype.*bfloat16"):
        config_checks.check_config(config, 1)
    config = tiny_config(tmp_path)
    config.data.data_dir = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        config_checks.check_config(config, 1)
    with pytest.raises(ValueError, match="variant"):
        swda_config.get_config("cyclical:0")


def test_shortened_variant_scales_both_schedules():
    short, full = swda_config.get_config("monotonic:2:1716"), swda_config.get_config("monotonic")
    assert (
        short.num_train_steps
        == 2 * 1716
        == swda_config.get_config("cyclical:2:1716").num_train_steps
    )
    assert short.beta_schedule.warmup_steps == round(10_000 / 3)
    assert full.beta_schedule.warmup_steps == 10_000 and full.eval_every_steps == 1716
    cyc = swda_config.get_config("cyclical")
    # At most 60 validations of 1,716 steps (the official max_epoch): 20 cycles.
    assert cyc.beta_schedule.total_steps == 20 * 5148 == 60 * cyc.eval_every_steps
    assert cyc.beta_schedule.ratio == 2 / 3


def test_four_variants_of_table_2():
    for name, bow, beta in (
        ("cvae_monotonic", False, "monotonic"), ("cvae_cyclical", False, "cyclical"),
        ("cvae_bow_monotonic", True, "monotonic"), ("cvae_bow_cyclical", True, "cyclical"),
        ("cyclical", True, "cyclical"),  # the older name of cvae_bow_cyclical
    ):  # fmt: skip
        config = swda_config.get_config(name)
        assert config.model.use_bow is bow and config.beta_schedule.name == beta, name
        assert config.early_stopping.patience == 10
    with pytest.raises(ValueError, match="variant must be one of"):
        swda_config.get_config("cvae_bow")


def test_early_stopping_rule_by_hand():
    """The official rule: patience 3, a new best must beat the threshold by 0.4% to raise the
    patience to 2·v; a small improvement is a new best but leaves the patience."""
    config = swda_config.get_config("tiny")
    config.early_stopping.patience = 3
    state = early_stopping.init(config)
    trace = []
    for loss in (100.0, 90.0, 89.9, 89.8, 95.0, 89.0, 91.0, 92.0, 93.0):
        state = early_stopping.update(state, loss, config)
        trace.append((state.patience, state.best, state.stopped))
    # v=1: 100 (patience max(3, 2)); v=2: 90 ≤ 99.6 → 4; v=3, 4: new bests within 0.4% of 90;
    # v=5: worse; v=6: 89 ≤ 89.64 → 12; then no improvement: stop at v = 12 (not reached).
    assert [t[0] for t in trace] == [3, 4, 4, 4, 4, 12, 12, 12, 12]
    assert trace[3][1] == 89.8 and trace[-1][1] == 89.0 and not trace[-1][2]
    state = early_stopping.init(config)
    for v, loss in enumerate((100.0, 99.9, 99.8), start=1):
        state = early_stopping.update(state, loss, config)
        assert state.stopped == (v == 3)  # patience 3, never raised past 2
    records = [{"valid_elbo": -x, "step": i} for i, x in enumerate((100.0, 99.9, 99.8))]
    assert early_stopping.replay(records + [{"loss": 1.0}], config) == state


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    if not os.path.isdir(os.path.join(ROOT, "swda_raw")):
        pytest.skip("the SwitchBoard data is absent")
    tmp = tmp_path_factory.mktemp("dialog")
    config = tiny_config(tmp)
    workdir = str(tmp / "run")
    state = loop.train_and_evaluate(config, workdir)
    return config, workdir, state, tmp


@needs_swda
def test_training_logs_the_dialog_figures_and_resumes_exactly(trained):
    config, workdir, state, tmp = trained
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    logged = [r for r in records if "bow" in r]
    evals = [r for r in records if "valid_rec_ppl" in r]
    assert logged and evals
    assert all(np.isfinite(r["loss"]) and r["bow"] > 0 for r in logged)
    for r in logged:  # the objective is Rec + β·KL + BOW
        assert r["loss"] == pytest.approx(r["rec"] + r["beta"] * r["kl"] + r["bow"], rel=1e-4)
    # Half the run, then the same command again: the parameters of the straight run.
    half = tiny_config(tmp)
    half.num_train_steps = 6
    split = str(tmp / "split")
    loop.train_and_evaluate(half, split)
    resumed = loop.train_and_evaluate(tiny_config(tmp), split, allow_config_change=True)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def plain(trained):
    """A tiny plain CVAE (no bag-of-words head), 4 steps on the module's TFDS build."""
    config = tiny_config(trained[3], steps=4)
    config.model.use_bow = False
    workdir = str(trained[3] / "plain")
    return config, workdir, loop.train_and_evaluate(config, workdir)


@needs_swda
def test_plain_cvae_has_no_bag_of_words_head_or_loss(plain):
    _, workdir, state = plain
    assert not any(name.startswith("bow_") for name in state.params)
    assert {"dec_out", "recog", "prior_out"} <= set(state.params)
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    logged = [r for r in records if "loss" in r]
    assert logged and not any("bow" in r or "valid_bow" in r for r in records)
    for r in logged:  # the objective is Rec + β·KL alone (means over the logged steps)
        assert r["loss"] == pytest.approx(r["rec"] + r["beta"] * r["kl"], rel=1e-3)
    assert any("valid_rec_ppl" in r for r in records)


@needs_swda
def test_early_stopping_stops_resumes_exactly_and_stays_stopped(trained, tmp_path):
    """Patience 2 and a threshold of half the loss: the second validation (step 4, every 2
    steps) cannot raise the patience, so the run stops there, checkpointed, and a rerun has
    nothing to train; a run cut after its first validation resumes to the same end."""

    def config(steps=12):
        c = tiny_config(trained[3], steps)  # the module's TFDS build
        c.early_stopping.update(patience=2, improve_threshold=0.5)
        return c

    straight = loop.train_and_evaluate(config(), str(tmp_path / "straight"))
    records = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl")]
    assert [r["step"] for r in records if "early_stopped" in r] == [4]
    assert max(r["step"] for r in records) == 4
    assert int(straight.step) == 4
    again = loop.train_and_evaluate(config(), str(tmp_path / "straight"))
    assert int(again.step) == 4
    assert len(open(tmp_path / "straight" / "metrics.jsonl").readlines()) == len(records)
    loop.train_and_evaluate(config(steps=2), str(tmp_path / "cut"))
    resumed = loop.train_and_evaluate(config(), str(tmp_path / "cut"), allow_config_change=True)
    assert int(resumed.step) == 4
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(a, b)


@needs_swda
def test_evaluate_and_generate_on_a_dialog_run(trained):
    _, workdir, _, tmp = trained
    out = run_python(
        ["-m", "vae_jax.evaluate", f"--workdir={workdir}", "--max_contexts=12", "--num_samples=3"]
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.load(open(os.path.join(workdir, "eval_test.json")))
    assert result["contexts"] == 12 and result["num_samples"] == 3
    for key in ("rec", "kl", "bow", "rec_ppl", "bleu4_f1", "distinct2"):
        assert np.isfinite(result[key]), key
    assert "a_bow_f1" not in result and result["word_vectors"] is None
    # The ELBO figures are training's logged ones for the same checkpoint.
    best = json.load(open(os.path.join(workdir, workdirs.BEST, "info.json")))
    for key in ("rec", "kl", "bow"):
        assert result[key] == pytest.approx(best["test"][key], rel=1e-5)
    samples = open(os.path.join(workdir, "samples_test.txt")).read()
    assert samples.count("sample 2 >>") == 12
    gen = run_python(
        ["-m", "vae_jax.generate", f"--workdir={workdir}", "--mode=responses", "--num=2"]
    )
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.count("reference >>") == 2 and gen.stdout.count("sample 4 >>") == 2
    bad = run_python(["-m", "vae_jax.generate", f"--workdir={workdir}", "--mode=prior"])
    assert bad.returncode != 0 and "--mode=responses" in bad.stderr


@needs_swda
def test_dialog_table_archive_round_trip_with_both_kinds_of_rows(
    trained, plain, tmp_path, monkeypatch, capsys
):
    """Table 2 from a CVAE+BoW and a plain-CVAE run, each evaluated once, archived and rebuilt
    from the archive alone; a second seed gives mean ± std; bad input ends in one line."""
    import table2_dialog  # experiments/table2_dialog.py

    bow_run, plain_run = trained[1], plain[1]
    archive = tmp_path / "archive"
    flags = ["--max_contexts=4", "--num_samples=2", "--show=2"]
    # Without --archive the test evaluation goes to the workdir, as vae_jax.evaluate's does…
    table2_dialog.main([bow_run, plain_run, f"--out={tmp_path / 'first'}", *flags])
    for run in (bow_run, plain_run):
        assert json.load(open(os.path.join(run, "eval_test.json")))["max_contexts"] == 4
        assert os.path.exists(os.path.join(run, "samples_test.txt"))

    def no_evaluation(*args):
        raise AssertionError("evaluated again")

    # …and is reused from there (same best step and settings) when archiving.
    with monkeypatch.context() as patch:
        patch.setattr(table2_dialog, "evaluate_run", no_evaluation)
        cols = table2_dialog.main(
            [bow_run, plain_run, f"--archive={archive}", f"--out={tmp_path / 'first'}", *flags]
        )
    assert [c["label"] for c in cols] == ["CVAE C", "CVAE+BoW C"]
    table = (tmp_path / "first" / "table.md").read_text()
    assert "| | CVAE C (n=1) | CVAE+BoW C (n=1) |" in table
    bow_cells = next(x for x in table.splitlines() if x.startswith("| BOW loss |")).split("|")
    assert bow_cells[2].strip() == "—" and bow_cells[3].strip() != "—"
    for label in ("Rec-P ↓", "−ELBO", "BLEU-4 F", "distinct-2"):
        assert f"| {label} |" in table
    assert "stand-in" in table and "best at step" in table and "no early stop" in table
    for run in (bow_run, plain_run):
        record = archive / os.path.basename(run)
        assert sorted(os.listdir(record)) == [
            "config.json", "eval_test.json", "evaluations.json", "samples_test.txt.gz"
        ]  # fmt: skip
        # β and lr at each validation are those training logged at that step.
        logged = {r["step"]: r for r in table2_dialog.writers.read_metrics(run) if "beta" in r}
        records = json.loads((record / "evaluations.json").read_text())
        evals = [r for r in records if "valid_elbo" in r]
        assert evals and all("valid_rec_ppl" in r and "test_kl" in r for r in evals)
        for r in evals:
            assert r["beta"] == pytest.approx(logged[r["step"]]["beta"], abs=1e-6)
            assert r["lr"] == pytest.approx(logged[r["step"]]["lr"], rel=1e-5)
    samples = (tmp_path / "first" / "samples.md").read_text()
    assert samples.count("## test row") == 2 and samples.count("sample 1 >>") == 4
    assert (tmp_path / "first" / "curves.png").stat().st_size > 0

    monkeypatch.setattr(table2_dialog, "evaluate_run", no_evaluation)
    table2_dialog.main([str(archive), f"--out={tmp_path / 'again'}", *flags])
    for name in ("table.md", "samples.md"):
        assert (tmp_path / "again" / name).read_text() == (tmp_path / "first" / name).read_text()

    # A second seed of CVAE+BoW (a copy of the record with seed 1 and its KL one nat higher).
    seed1 = tmp_path / "more" / "run.seed-1"
    shutil.copytree(archive / os.path.basename(bow_run), seed1)
    for name, key, delta in (("config.json", "seed", 1), ("eval_test.json", "kl", 1.0)):
        record = json.loads((seed1 / name).read_text())
        record[key] += delta
        (seed1 / name).write_text(json.dumps(record))
    cols = table2_dialog.main(
        [str(archive), str(tmp_path / "more"), f"--out={tmp_path / 'seeds'}", *flags]
    )
    assert [c["n"] for c in cols] == [1, 2] and cols[1]["kl_std"] == pytest.approx(2**-0.5)
    kl = cols[1]["kl"]
    assert f"{kl:.3f} ± 0.707" in (tmp_path / "seeds" / "table.md").read_text()

    plain_copy = tmp_path / "bad" / "plain"
    shutil.copytree(archive / os.path.basename(plain_run), plain_copy)
    result = json.loads((plain_copy / "eval_test.json").read_text())
    (plain_copy / "eval_test.json").write_text(json.dumps({**result, "bow": 1.0}))
    capsys.readouterr()
    for argv, expected in (
        ([str(tmp_path / "nowhere")], "nowhere: not a run"),
        ([str(archive), "--variants=cvae_bow"], "--variants: unknown ['cvae_bow']"),
        ([str(plain_copy)], "eval_test.json: has 'bow' but config.model.use_bow=False"),
    ):
        with pytest.raises(SystemExit) as stop:
            table2_dialog.main([*argv, f"--out={tmp_path / 'never'}", *flags])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "never").exists()


def test_dialog_table_reads_a_workdirs_stop_best_validation_and_length(tmp_path):
    """A workdir as training leaves it (hand-written): the early stop, the best checkpoint's
    validation, β per validation from the schedule, and steps trained past the last one."""
    import table2_dialog  # experiments/table2_dialog.py

    config = swda_config.get_config("cvae_monotonic:1:6")  # β warm-up of round(10,000 · 6/5,148)
    workdir = tmp_path / "swda-cvae_monotonic.seed-0"
    (workdir / "best").mkdir(parents=True)
    workdirs.save_config(config, str(workdir))
    (workdir / "best" / "info.json").write_text(json.dumps({"step": 2}))
    figures = {"elbo": -9.0, "kl": 1.0, "rec_ppl": 50.0}
    records = [{"step": 1, "loss": 3.0, "beta": 0.0, "lr": 1e-3}]
    for step in (2, 4):
        records += [{"step": step, **{f"{s}_{k}": v for k, v in figures.items()}}
                    for s in ("valid", "test")]  # fmt: skip
    records += [{"step": 4, "early_stopped": 2}, {"step": 5, "loss": 2.0, "beta": 0.5, "lr": 1e-3}]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run = table2_dialog.read_run(str(workdir))
    assert (run.variant, run.best_step, run.trained_steps) == ("cvae_monotonic", 2, 5)
    assert run.early_stopped == 2 and table2_dialog.validation_index(run) == 1
    warmup = config.beta_schedule.warmup_steps
    betas = [r.get("beta") for r in run.evaluations]
    assert betas == pytest.approx([1 / warmup, 3 / warmup, 0.5])  # float32 schedules
    assert "test_kl" in run.evaluations[0] and run.evaluations[-1]["step"] == 5
    result = {"rec_ppl": 50.0, "kl": 1.0, "neg_elbo": 9.0, "contexts": 3, "num_samples": 5}
    cols = table2_dialog.columns([run], [result], list(table2_dialog.VARIANTS))
    note = table2_dialog.caption(cols, [result], "")
    assert "best at step 2 (validation 1 of 2), 5 of 6 steps trained" in note
    assert "stopped early at validation 2" in note
    assert "| BOW loss | — |" in table2_dialog.markdown(cols)


def test_dialog_table_states_the_claim_whichever_way_it_falls():
    import table2_dialog  # experiments/table2_dialog.py

    def col(variant, n, **figures):
        stds = {f"{k}_std": (0.5 if n > 1 else None) for k in figures}
        return {"variant": variant, "n": n, **figures, **stds}

    base = {"rec_ppl": 40.0, "distinct1": 0.1, "distinct2": 0.2, "bleu4_f1": 0.1}
    cols = [
        col("cvae_monotonic", 2, kl=1.0, **base),
        col("cvae_cyclical", 2, kl=1.2, **{**base, "rec_ppl": 45.0}),
        col("cvae_bow_cyclical", 1, kl=9.0, **base),  # no monotonic partner: no line
    ]
    (line,) = table2_dialog.claim(cols).splitlines()
    assert line.startswith("- CVAE, C vs M (n = 2, 2):")
    assert "KL(q ‖ p(z|c)) ↑ 1.2 vs 1: as claimed (higher) (within one std)" in line
    assert "Rec-P ↓ 45 vs 40: not as claimed (lower);" in line
    assert "BLEU-4 F 0.1 vs 0.1: as claimed (no worse)" in line
