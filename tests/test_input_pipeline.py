"""Text batching: length buckets, epoch plans, bad input, PTB-config training on a tiny corpus."""

import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import ptb  # configs/ptb.py, on the path by conftest
import pytest
import table1_ptb  # experiments/table1_ptb.py

from vae_jax import evaluate
from vae_jax.core import models, objectives
from vae_jax.core.tokens import sequence_lengths
from vae_jax.data import batching
from vae_jax.run import build, loop, steps, writers

WORDS = [f"w{i}" for i in range(20)]


def random_rows(n: int, seed: int = 0, max_words: int = 15) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        batching.with_boundaries(rng.integers(4, 24, size=rng.integers(1, max_words + 1)))
        for _ in range(n)
    ]


def write_corpus(directory, seed=0, sizes=(150, 40, 30), max_words=15, long_line=False):
    """A PTB-format corpus of random sentences over 20 words."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in zip(("train", "valid", "test"), sizes, strict=True):
        lines = [" ".join(rng.choice(WORDS, size=rng.integers(1, max_words + 1))) for _ in range(n)]
        if long_line and split == "train":
            lines.append(" ".join(["w1"] * 30))
        (directory / f"ptb.{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def tiny_ptb_config(tmp_path, variant="cyclical"):
    config = ptb.get_config(variant)
    config.data.data_dir = str(write_corpus(tmp_path / "ptb"))
    config.data.tfds_dir = str(tmp_path / "tfds")
    config.data.bucket_lengths = (8, 12)
    config.num_epochs = 2
    config.batch_size = 8
    config.eval_batch_size = 8
    config.log_every_steps = 5
    config.model.update(enc_emb_dim=8, enc_hidden_dim=16, dec_emb_dim=8, dec_hidden_dim=16)
    config.model.latent_dim = 4
    config.beta_schedule.total_steps = 4  # four cycles of one epoch: β moves within the run
    config.lr_schedule.total_steps = 4
    return config


# ----------------------------------------------------------------------------- epoch plans


def test_every_sentence_once_per_epoch_in_batches_of_one_length():
    rows = random_rows(300)
    batcher = batching.LengthBatcher(rows, 8, (8, 12, 16))
    plans = [batcher.plan(epoch) for epoch in range(3)]
    for plan in plans:
        assert len(plan) == batcher.steps_per_epoch
        assert sorted(np.concatenate(plan).tolist()) == list(range(len(rows)))
        for indices in plan:
            assert 1 <= len(indices) <= 8
            assert len({len(rows[i]) for i in indices}) == 1
    # Reshuffled every epoch, reproducibly from the seed.
    assert [b.tolist() for b in plans[0]] != [b.tolist() for b in plans[1]]
    again = batching.LengthBatcher(rows, 8, (8, 12, 16)).plan(1)
    assert [b.tolist() for b in again] == [b.tolist() for b in plans[1]]
    other_seed = batching.LengthBatcher(rows, 8, (8, 12, 16), seed=1).plan(1)
    assert [b.tolist() for b in other_seed] != [b.tolist() for b in plans[1]]


def test_fixed_composition_keeps_the_batches_and_reshuffles_their_order():
    """The official PTB data: batches cut once, their order permuted every epoch."""
    rows = random_rows(300)
    fixed = batching.LengthBatcher(rows, 8, (8, 12, 16), composition="fixed")
    drawn = batching.LengthBatcher(rows, 8, (8, 12, 16))
    assert [b.tolist() for b in fixed.plan(0)] == [b.tolist() for b in drawn.plan(0)]
    batches = {tuple(b) for b in fixed.plan(0)}
    for epoch in (1, 2):
        plan = fixed.plan(epoch)
        assert {tuple(b) for b in plan} == batches
        assert [tuple(b) for b in plan] != [tuple(b) for b in fixed.plan(epoch - 1)]
        assert {tuple(b) for b in drawn.plan(epoch)} != batches
    with pytest.raises(ValueError, match="config.data.batch_composition='once'"):
        batching.LengthBatcher(rows, 8, (8, 12, 16), composition="once")


def test_batches_are_padded_to_buckets_and_resume_mid_epoch():
    rows = random_rows(100)
    batcher = batching.LengthBatcher(rows, 8, (6, 10))
    assert batcher.buckets == (6, 10, 17)  # a last bucket for the longest rows (15 words + 2)
    stream = batcher.epochs()
    first_two_epochs = [next(stream) for _ in range(2 * batcher.steps_per_epoch)]
    for batch, indices in zip(first_two_epochs, batcher.plan(0) + batcher.plan(1), strict=True):
        tokens = batch["tokens"]
        row_len = len(rows[indices[0]])
        assert tokens.shape == (8, batcher.bucket(row_len))
        assert tokens.shape[1] in (6, 10, 17) and tokens.shape[1] >= row_len
        assert (sequence_lengths(tokens[: len(indices)]) == row_len).all()
        assert (tokens[len(indices) :] == 0).all()  # filler rows
    # Restarting at (epoch 1, position 3) yields exactly the rest of the stream.
    resumed = batcher.epochs(start_epoch=1, position=3)
    for expected in first_two_epochs[batcher.steps_per_epoch + 3 :]:
        np.testing.assert_array_equal(next(resumed)["tokens"], expected["tokens"])


def test_bucket_padding_changes_no_metric_or_gradient():
    """Bucketed batches give the sums and gradients of exact-length batches, dropout included."""
    # Few distinct lengths (each exact shape compiles): rows of 3-6 tokens, buckets 4 and 8.
    rows = random_rows(40, seed=1, max_words=4)
    exact = batching.LengthBatcher(rows, 8, range(2, 7))  # a bucket per length
    bucketed = batching.LengthBatcher(rows, 8, (4, 8))
    model = models.VAE(
        vocab_size=24, enc_emb_dim=8, enc_hidden_dim=16, dec_emb_dim=8, dec_hidden_dim=16,
        latent_dim=4, dec_dropout_in=0.5, dec_dropout_out=0.5,
    )  # fmt: skip
    keys = jax.random.split(jax.random.PRNGKey(3), 8)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5), jnp.int32), keys[:1], train=False)[
        "params"
    ]

    def loss(params, tokens, training):
        outputs = model.apply({"params": params}, tokens, keys, train=training)
        objective, sums = objectives.beta_elbo(outputs, tokens, jnp.float32(0.7))
        return objective, sums

    grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=2)
    padded_somewhere = False
    for indices in exact.plan(0):
        a, b = exact.batch(indices)["tokens"], bucketed.batch(indices)["tokens"]
        padded_somewhere |= b.shape[1] > a.shape[1]
        for training in (False, True):
            ga, sa = grad(params, a, training)
            gb, sb = grad(params, b, training)
            for k in sa:
                np.testing.assert_allclose(sa[k], sb[k], rtol=1e-5, atol=1e-5)
            for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
                np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    assert padded_somewhere


# ----------------------------------------------------------------------------- bad input


def test_missing_directory_names_path_and_expected_files(tmp_path):
    config = tiny_ptb_config(tmp_path)
    config.data.data_dir = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere") as err:
        build.get_data(config)
    assert "ptb.train.txt" in str(err.value)


def test_missing_file_is_named(tmp_path):
    config = tiny_ptb_config(tmp_path)
    os.remove(os.path.join(config.data.data_dir, "ptb.valid.txt"))
    with pytest.raises(FileNotFoundError, match="ptb.valid.txt"):
        build.get_data(config)


def test_no_data_dir_and_no_environment_variable(tmp_path, monkeypatch):
    config = tiny_ptb_config(tmp_path)
    config.data.data_dir = ""
    monkeypatch.delenv("VAE_JAX_DATA_DIR", raising=False)
    with pytest.raises(ValueError, match="config.data.data_dir.*VAE_JAX_DATA_DIR"):
        build.get_data(config)


def test_empty_split_and_bad_utf8_are_errors(tmp_path):
    config = tiny_ptb_config(tmp_path)
    (tmp_path / "ptb" / "ptb.test.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="ptb.test.txt"):
        build.get_data(config)
    (tmp_path / "ptb" / "ptb.test.txt").write_bytes(b"w1 w2\nw3 \xff\xfe\n")
    with pytest.raises(ValueError, match=r"ptb.test.txt.*line 2"):
        build.get_data(config)


def test_overlong_sentences_are_dropped_and_counted(tmp_path, caplog):
    config = tiny_ptb_config(tmp_path)
    write_corpus(tmp_path / "ptb", long_line=True)
    config.data.max_length = 20
    with caplog.at_level("INFO"):
        data = build.get_data(config)
    assert data.info["stats"]["train"].dropped_too_long == 1
    assert "1 longer than max_length=20 dropped" in caplog.text
    assert max(len(r) for r in data.info["batcher"].rows) <= 22


@pytest.mark.parametrize("buckets", [(12, 8), (1, 8), (8, 8)])
def test_bad_bucket_lengths_name_the_field(buckets):
    with pytest.raises(ValueError, match="config.data.bucket_lengths"):
        batching.LengthBatcher(random_rows(10), 4, buckets)


# ----------------------------------------------------------------------------- training


def test_ptb_config_trains_on_a_tiny_corpus(tmp_path):
    config = tiny_ptb_config(tmp_path)
    workdir = str(tmp_path / "run")
    state = loop.train_and_evaluate(config, workdir)
    steps_per_epoch = 150 // 8 + 10  # at most: one partial batch per length
    records = writers.read_metrics(workdir)
    evals = [r for r in records if "valid_ppl_bound" in r]
    assert [r["epoch"] for r in evals] == [1.0, 2.0]
    assert [r["epoch"] for r in records if "test_ppl_bound" in r] == [1.0, 2.0]
    final_step = evals[-1]["step"]
    assert int(state.step) == final_step <= 2 * steps_per_epoch
    betas = [r["beta"] for r in records if "beta" in r]
    assert min(betas) < 0.5 and max(betas) == pytest.approx(1.0)  # epoch-unit cycles ran
    with open(os.path.join(workdir, "best", "info.json")) as f:
        best = json.load(f)
    assert best["valid"]["ppl_bound"] == min(r["valid_ppl_bound"] for r in evals)
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["data"]["name"] == "ptb"

    # One compilation per batch shape (length bucket) over the whole run, not per length.
    data = build.get_data(config)
    train_shapes = {
        b["tokens"].shape for b in itertools.islice(data.train(0), data.steps_per_epoch)
    }
    eval_shapes = {b["tokens"].shape for bs in data.eval_splits.values() for b in bs}
    counts = next(r for r in records if "train_step_compilations" in r)
    assert (
        counts["train_step_compilations"]
        == len(train_shapes)
        <= len(config.data.bucket_lengths) + 1
    )
    assert counts["eval_step_compilations"] == len(eval_shapes)

    # The Table 1 report reads the workdir back: the best epoch by valid PPL, its test figures.
    table_row = table1_ptb.row(workdir, "test", "best")
    best_test = next(r for r in records if r["step"] == best["step"] and "test_rec" in r)
    assert table_row["epoch"] == best["epoch"] and table_row["epochs_run"] == 2.0
    assert table_row["neg_elbo"] == pytest.approx(-best_test["test_elbo"])
    assert (table_row["model"], table_row["schedule"]) == ("VAE", "Cyclical")
    assert "| VAE | Cyclical | 1 |" in table1_ptb.markdown(table1_ptb.grouped([table_row]), "test")
    assert "iw_nll" not in table_row  # not scored by vae_jax.evaluate yet
    note = table1_ptb.caption(table1_ptb.grouped([table_row]), "test", "best", None)
    assert note.startswith(f"test split; epochs run: 2 of {config.num_epochs};")
    assert "lowest valid PPL bound" in note
    assert f"seeds [{config.seed}]" in note

    # Once `vae_jax.evaluate` has scored that checkpoint, the row has its IW-NLL, MI and AU;
    # a score of another step is not taken for it.
    argv = [f"--workdir={workdir}", "--split=test", "--checkpoint=best"]
    scored = evaluate.main([*argv, "--num_importance_samples=5", "--num_prior_samples=100"])
    table_row = table1_ptb.row(workdir, "test", "best")
    assert [table_row[k] for k in ("iw_nll", "mi", "au")] == [
        pytest.approx(scored[k]) for k in ("iw_nll", "mi", "au")
    ]
    assert "IW-NLL (K = 5)" in table1_ptb.markdown(table1_ptb.grouped([table_row]), "test")
    scored["checkpoint_info"]["step"] += 1
    with open(os.path.join(workdir, "eval_test.json"), "w", encoding="utf-8") as f:
        json.dump(scored, f)
    assert "iw_nll" not in table1_ptb.row(workdir, "test", "best")


@pytest.mark.parametrize("variant", ptb.VARIANTS)
def test_ptb_variants_build_their_schedules(variant):
    config = ptb.get_config(variant)
    beta_fn, lr_fn = steps.make_schedules(config, steps_per_epoch=100)
    epochs = np.array([0, 100, 450, 900, 1000, 1450, 3999])
    beta, lr = np.asarray(beta_fn(epochs)), np.asarray(lr_fn(epochs))
    _, variant = objectives.split_variant(variant)  # a remedy's variant: its schedule's
    # lr restarts every 10 epochs and is held within an epoch: epoch 9.99 uses epoch 9's.
    restarts = 1e-3 * 0.5 * (1 + np.cos(np.pi * np.array([0, 1, 4, 9, 0, 4, 9]) / 10))
    if variant in ("cyclical", "savae_size", "savae_cyclical", "cyclical_lr_constant"):
        np.testing.assert_allclose(beta, [0.1, 0.3, 1.0, 1.0, 0.1, 1.0, 1.0], atol=1e-6)
        if variant == "cyclical_lr_constant":  # the β cycles alone
            np.testing.assert_allclose(lr, 1e-3)
        else:
            np.testing.assert_allclose(lr, restarts, rtol=1e-5)
    elif variant in ("monotonic", "savae_monotonic", "monotonic_lr_restarts"):
        np.testing.assert_allclose(beta, [0.1, 0.2, 0.55, 1.0, 1.0, 1.0, 1.0], atol=1e-6)
        if variant == "monotonic_lr_restarts":  # the lr restarts alone
            np.testing.assert_allclose(lr, restarts, rtol=1e-5)
        else:
            np.testing.assert_allclose(lr, 1e-3)
    else:
        np.testing.assert_allclose(beta, 1.0)
