"""The dialog task end to end (`configs/swda.py`): batches, training, resume, evaluation."""

import json
import os

import jax
import numpy as np
import pytest
import swda as swda_config  # configs/swda.py
from conftest import run_python

from vae_jax import config_checks, input_pipeline, runs, train
from vae_jax.datasets import swda, text
from vae_jax.tokens import BOS_ID, EOS_ID, PAD_ID

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
    batcher = input_pipeline.DialogBatcher([d], 3, window=3, max_utt_len=5, bucket_lengths=(4, 5))
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
    batcher = input_pipeline.DialogBatcher(dialogs, 4, 3, 6, (6,), seed=3)
    plans = [np.concatenate(batcher.plan(e)) for e in (0, 1)]
    for plan in plans:
        assert sorted(plan.tolist()) == list(range(len(batcher.rows)))
    assert plans[0].tolist() != plans[1].tolist()
    again = input_pipeline.DialogBatcher(dialogs, 4, 3, 6, (6,), seed=3)
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
    assert cyc.beta_schedule.total_steps == 10 * 5148 and cyc.beta_schedule.ratio == 2 / 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    if not os.path.isdir(os.path.join(ROOT, "swda_raw")):
        pytest.skip("the SwitchBoard data is absent")
    tmp = tmp_path_factory.mktemp("dialog")
    config = tiny_config(tmp)
    workdir = str(tmp / "run")
    state = train.train_and_evaluate(config, workdir)
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
    train.train_and_evaluate(half, split)
    resumed = train.train_and_evaluate(tiny_config(tmp), split, allow_config_change=True)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(resumed.params), strict=True):
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
    best = json.load(open(os.path.join(workdir, runs.BEST, "info.json")))
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
def test_dialog_table_writes_table_2s_layout(trained):
    _, workdir, _, tmp = trained
    out_dir = tmp / "table"
    out = run_python(
        ["experiments/dialog_table.py", workdir, f"--out={out_dir}", "--checkpoint=last",
         "--max_contexts=6", "--num_samples=2", "--show=2"]
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    table = (out_dir / "table.md").read_text()
    assert "| Rec-P ↓ |" in table and "| BLEU-4 F |" in table and "stand-in" in table
    assert "A-bow" not in table.split("\n\n")[0]  # no word vectors: no such rows
    result = json.loads((out_dir / "cvae_cyclical.json").read_text())
    assert result["contexts"] == 6 and result["trained_steps"] == 12
    assert (out_dir / "curves.png").exists()
    assert (out_dir / "samples.md").read_text().count("sample 1 >>") == 2
