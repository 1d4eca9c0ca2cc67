"""The Yelp task (`configs/yelp.py`): the corpus with labels, the CNN encoder, the classifier."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_python, tiny_synthetic_config
from flax import linen as nn

from vae_jax.core import kernels, models
from vae_jax.data import text
from vae_jax.run import build, loop

YELP = os.path.join(os.environ.get(text.DATA_DIR_ENV, ""), "yelp_shen_sentiment", "first10pct")
needs_yelp = pytest.mark.skipif(
    not os.path.exists(os.path.join(YELP, "vocab.txt")),
    reason=f"the Yelp 10% corpus is absent (set ${text.DATA_DIR_ENV} to ../shared/data)",
)


def test_cnn_encoder_window_and_shapes():
    model = models.VAE(
        vocab_size=20, enc_emb_dim=6, dec_emb_dim=6, dec_hidden_dim=8, latent_dim=3,
        encoder="cnn", cnn_filters=(5, 7, 9), cnn_width=3, cnn_stride=2, cnn_length=8,
    )  # fmt: skip
    assert model._cnn_layers() == [(5, 3, 2), (7, 3, 2), (9, 2, 1)]  # 12 → 5 → 2 → 1
    tokens = jnp.array([[2, 5, 6, 3, 0, 0, 0, 0, 0, 0], [2, 7, 3, 0, 0, 0, 0, 0, 0, 0]])
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    params = model.init(jax.random.PRNGKey(1), tokens, keys, train=False)["params"]
    mu, logvar = model.apply({"params": params}, tokens, method=models.VAE.encode)
    assert mu.shape == logvar.shape == (2, 3)
    # Bucket padding past the window changes nothing: the window holds <pad> there anyway.
    mu_short, _ = model.apply({"params": params}, tokens[:, :6], method=models.VAE.encode)
    np.testing.assert_allclose(mu, mu_short, rtol=1e-6)
    with pytest.raises(ValueError, match="too short"):
        models.VAE(vocab_size=20, encoder="cnn", cnn_length=2).init(
            jax.random.PRNGKey(1), tokens, keys, train=False
        )


@pytest.mark.parametrize("width,stride", [(3, 2), (5, 2), (4, 1), (12, 1)])
def test_patch_conv_is_nn_conv(width, stride):
    """`kernels.PatchConv` (the CNN encoder's layer) is ``nn.Conv`` (VALID, strided): the same
    parameters (names, shapes, initial values: runs saved with ``nn.Conv`` restore), outputs and
    gradients; its bfloat16 operands stay close."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 5))
    init = nn.initializers.normal(0.3)
    conv = nn.Conv(
        7, (width,), strides=(stride,), padding="VALID", kernel_init=init, bias_init=init
    )
    patch = kernels.PatchConv(7, width, stride, kernel_init=init, bias_init=init)
    params = conv.init(jax.random.PRNGKey(1), x)
    jax.tree.map(np.testing.assert_array_equal, patch.init(jax.random.PRNGKey(1), x), params)

    def loss(module, params, x):
        return jnp.sum(jnp.sin(module.apply(params, x)))

    np.testing.assert_allclose(patch.apply(params, x), conv.apply(params, x), rtol=1e-5, atol=1e-5)
    expected = jax.grad(loss, argnums=(1, 2))(conv, params, x)
    got = jax.grad(loss, argnums=(1, 2))(patch, params, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, expected)
    bf16 = kernels.PatchConv(7, width, stride, kernel_init=init, bias_init=init, dtype="bfloat16")
    y, y16 = conv.apply(params, x), bf16.apply(params, x)
    assert y16.dtype == jnp.float32 and not np.array_equal(y16, y)
    np.testing.assert_allclose(y16, y, atol=0.05 * float(jnp.max(jnp.abs(y))))


def test_shared_normalized_embedding_ties_input_and_output():
    model = models.VAE(
        vocab_size=20, enc_emb_dim=6, dec_emb_dim=6, dec_hidden_dim=8, latent_dim=3,
        encoder="cnn", cnn_filters=(5, 7), cnn_length=8, embedding="shared_normalized",
    )  # fmt: skip
    tokens = jnp.array([[2, 5, 6, 3, 0, 0, 0, 0, 0], [2, 7, 3, 0, 0, 0, 0, 0, 0]])
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    params = model.init(jax.random.PRNGKey(1), tokens, keys, train=False)["params"]
    assert "embed" in params and not {"enc_embed", "dec_embed", "dec_output"} & set(params)
    assert params["dec_output_map"].shape == (8, 6)
    out = model.apply({"params": params}, tokens, keys, train=True)
    assert out["logits"].shape == (2, 8, 20)
    # Scaling a row of the table changes nothing: it is used normalised.
    scaled = {**params, "embed": params["embed"].at[5].multiply(7.0)}
    again = model.apply({"params": scaled}, tokens, keys, train=True)
    np.testing.assert_allclose(out["logits"], again["logits"], rtol=1e-5, atol=1e-6)


def test_cnn_vae_and_autoencoder_train(tmp_path):
    for deterministic in (False, True):
        config = tiny_synthetic_config("cyclical", steps=20)
        config.model.update(encoder="cnn", cnn_filters=(8, 8, 8), cnn_length=5)
        config.model.deterministic = deterministic
        state = loop.train_and_evaluate(config, str(tmp_path / str(deterministic)))
        assert int(state.step) == 20
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


@needs_yelp
def test_yelp_corpus_keeps_its_vocabulary_order_and_labels(tmp_path):
    dataset = text.load("yelp_10pct", YELP, tmp_path / "tfds", max_length=15)
    assert {k: len(v) for k, v in dataset.splits.items()} == {
        "train": 44409, "valid": 6347, "test": 12666,
    }  # fmt: skip
    assert len(dataset.vocab) == 3641 and dataset.vocab.words[4] == "yellow"
    labels = dataset.splits["test"].labels()
    assert labels.mean() == pytest.approx(7639 / 12666)  # the majority baseline, 60.3%


@needs_yelp
def test_pretrain_then_classify(tmp_path):
    import yelp  # configs/yelp.py

    config = yelp.get_config("tiny")
    config.data.tfds_dir = str(tmp_path / "tfds")
    config.update(num_epochs=-1, num_train_steps=30, eval_every_epochs=-1, eval_every_steps=30)
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(config, workdir)
    data = build.get_data(config)
    batch = next(data.train(0))
    assert set(batch) == {"tokens", "labels"} and set(np.unique(batch["labels"])) <= {-1, 0, 1}
    out = run_python(
        ["experiments/table3_classify.py", workdir, f"--out={tmp_path / 'out'}",
         "--sizes=100,all", "--seeds=2", "--steps=400", "--eval_every=100"],
        env={"VAE_JAX_TFDS_DIR": str(tmp_path / "tfds")},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "out" / "run" / "balanced.best.json") as f:
        result = json.load(f)
    assert result["test_majority_baseline"] == pytest.approx(7639 / 12666)
    assert result["sizes"]["100"]["n"] == 100 and result["sizes"]["all"]["n"] == 44409
    for size in result["sizes"].values():
        assert 0.3 < size["test_acc_mean"] < 1.0 and len(size["probes"]) == 2
    assert (tmp_path / "out" / "accuracy.png").exists()
    assert "| VAE, cyclical | run | best (step 30) |" in (tmp_path / "out" / "table.md").read_text()
    assert (result["protocol"], result["encoder"]) == ("balanced", "frozen")
    # The same command again reuses the run's result instead of classifying it anew.
    stamp = os.path.getmtime(tmp_path / "out" / "run" / "balanced.best.json")
    out = run_python(
        ["experiments/table3_classify.py", workdir, f"--out={tmp_path / 'out'}",
         "--sizes=100,all", "--seeds=2", "--steps=400", "--eval_every=100"],
        env={"VAE_JAX_TFDS_DIR": str(tmp_path / "tfds")},
    )  # fmt: skip
    assert out.returncode == 0 and "reusing" in out.stderr, out.stderr[-3000:]
    assert os.path.getmtime(tmp_path / "out" / "run" / "balanced.best.json") == stamp
    # The encoder trained with the classifier: the same protocol otherwise.
    out = run_python(
        ["experiments/table3_classify.py", workdir, f"--out={tmp_path / 'ft'}", "--sizes=100",
         "--seeds=2", "--steps=20", "--eval_every=10", "--finetune_encoder"],
        env={"VAE_JAX_TFDS_DIR": str(tmp_path / "tfds")},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "ft" / "run" / "balanced.best.json") as f:
        tuned = json.load(f)
    assert tuned["encoder"] == "fine-tuned"
    probes = tuned["sizes"]["100"]["probes"]
    assert len(probes) == 2 and all(
        0.3 < p["test_acc"] < 1.0 and p["step"] in (10, 20) for p in probes
    )
    assert "| VAE, cyclical (fine-tuned) | run |" in (tmp_path / "ft" / "table.md").read_text()


def test_yelp_variants_check():
    import yelp

    from vae_jax.run import config_checks

    config = yelp.get_config("free_bits")  # Li et al.'s free bits: 16 nats over z's 256 dims
    assert config.objective == "free_bits" and config.beta_schedule.name == "monotonic"
    assert config.free_bits.lambda_per_dim * config.model.latent_dim == 16
    config = yelp.get_config("ae")
    assert config.model.deterministic and config.beta_schedule.value == 0.0
    config.data.max_length = 20  # longer than the CNN's window holds
    with pytest.raises(ValueError, match="model.cnn_length"):
        config_checks.check_config(config, 1)


# --- The official classifier protocol, checkpoints and Table 3's archive ------------------------


def test_official_draw_is_a_random_tenth():
    import table3_classify

    labels = np.r_[np.ones(900), np.zeros(100)]
    subsets = table3_classify.official_subsets(1000, 5, seed=0)
    assert subsets.shape == (5, 100)
    assert all(len(set(row)) == 100 and 0 <= row.min() and row.max() < 1000 for row in subsets)
    assert len({tuple(sorted(row)) for row in subsets}) == 5  # five different draws
    # Not class-balanced: the draws hold the population's 90% of positives, not 50%.
    assert 0.8 < labels[subsets].mean() < 1.0
    np.testing.assert_array_equal(subsets, table3_classify.official_subsets(1000, 5, seed=0))
    assert table3_classify.official_subsets(44409, 1, seed=0).shape == (1, 4440)  # the paper's


def test_official_learning_rate_decays_by_099_per_100_epochs():
    import table3_classify

    lr = table3_classify.official_lr(1e-4, steps_per_epoch=138)
    assert float(lr(0)) == pytest.approx(1e-4)
    assert float(lr(138 * 50)) == pytest.approx(1e-4 * 0.99**0.5)  # not a staircase
    assert float(lr(138 * 100)) == pytest.approx(0.99e-4)


def test_official_classifier_reads_raw_features():
    """Its best epoch's accuracies are those of σ(wᵀμ + b) on μ as given: no standardisation
    (these features have an offset and a scale that one would remove)."""
    import table3_classify

    rng = np.random.default_rng(0)

    def split(n):
        x = (rng.normal(size=(n, 6)) * 3 + 5).astype(np.float32)
        return x, (x[:, 0] - 5 + rng.normal(size=n) > 0).astype(np.int32)

    (x, y), dev, test = split(1000), split(300), split(300)
    subsets = table3_classify.official_subsets(len(y), 3, seed=0)
    probes, params = table3_classify.fit_official(x, y, subsets, dev, test, epochs=12, seed=1)
    for k, probe in enumerate(probes):
        w, b = params["w"][k].astype(np.float64), float(params["b"][k])
        for (xs, ys), key in ((dev, "dev_acc"), (test, "test_acc")):
            accuracy = np.mean(((xs @ w + b) > 0) == ys)
            assert accuracy == pytest.approx(probe[key], abs=1.5 / len(ys))  # float32 ties
        assert 1 <= probe["epoch"] <= 12
    assert len({p["test_acc"] for p in probes}) > 1  # each draw its own classifier


@pytest.fixture(scope="module")
def short_yelp_run(tmp_path_factory):
    """A tiny cyclical run on the sentences of at most 4 words (5,409 training sentences, 44
    steps an epoch at 128), 2 epochs, each epoch's end kept as the 100-epoch runs' cycle ends."""
    if not os.path.exists(os.path.join(YELP, "vocab.txt")):
        pytest.skip(f"the Yelp 10% corpus is absent (set ${text.DATA_DIR_ENV} to ../shared/data)")
    import yelp

    root = tmp_path_factory.mktemp("short_yelp")
    config = yelp.get_config("tiny")
    config.data.update(max_length=4, tfds_dir=str(root / "tfds"))
    config.update(batch_size=128, eval_batch_size=512, checkpoint_keep_every_epochs=1)
    loop.train_and_evaluate(config, str(root / "run"))
    return root


def classify(root, *args, run=None):
    return run_python(
        ["experiments/table3_classify.py", str(run or root / "run"), *args],
        env={"VAE_JAX_TFDS_DIR": str(root / "tfds")},
    )


def test_bad_input_ends_in_one_line_before_any_feature(short_yelp_run, tmp_path):
    from conftest import tiny_synthetic_config

    root = short_yelp_run
    unlabelled = str(tmp_path / "synthetic")
    loop.train_and_evaluate(tiny_synthetic_config(steps=4), unlabelled)
    no_best = tmp_path / "no_best"
    no_best.mkdir()
    for name in ("config.json", "metrics.jsonl", "checkpoints"):
        os.symlink(root / "run" / name, no_best / name)
    out = str(tmp_path / "out")
    cases = [
        (
            None,
            "--protocol=logistic",
            "--protocol=logistic: unknown; protocols: balanced, official",
        ),
        (None, "--checkpoint=epoch:5", "no checkpoint at the end of epoch 5 (step 220)"),
        (None, "--cycle_ends=2,3", "no checkpoint at the end of epoch 3"),
        (no_best, "--protocol=official", "no best checkpoint"),
        (unlabelled, "--protocol=official", "its corpus 'synthetic' has no labels"),
    ]
    for run, arg, message in cases:
        result = classify(root, f"--out={out}", arg, run=run)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1, result.stderr[-2000:]
        assert message in lines[0], lines[0]
        if "logistic" not in arg and run != unlabelled:  # what exists is named too
            assert "epochs 1, 2; last step 88" in lines[0], lines[0]
        assert not os.path.exists(out)  # nothing computed, nothing written


def test_official_protocol_cycle_ends_and_archive_round_trip(short_yelp_run, tmp_path):
    root, classified = short_yelp_run, tmp_path / "classified"
    result = classify(root, f"--out={classified}", "--protocol=official", "--epochs=4", "--draws=2")
    assert result.returncode == 0, result.stderr[-3000:]
    result = classify(
        root, f"--out={classified}", "--checkpoint=best", "--cycle_ends", "--sizes=100",
        "--steps=100", "--eval_every=50", "--draws=2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    found = sorted(os.listdir(classified / "run"))
    assert found == [f"balanced.{c}.json" for c in ("best", "epoch-1", "epoch-2")] + [
        "official.best.json"
    ]
    with open(classified / "run" / "official.best.json") as f:
        official = json.load(f)
    ten = official["sizes"]["10%"]
    assert ten["n"] == official["train_size"] * 10 // 100 and len(ten["probes"]) == 2
    assert all(1 <= p["epoch"] <= 4 for p in ten["probes"])
    # Random draws hold the corpus' share of positives (about 72% here), not half.
    assert all(abs(f - 0.72) < 0.08 for f in official["label_fraction"])
    with open(classified / "run" / "balanced.epoch-2.json") as f:
        assert json.load(f)["checkpoint_step"] == 88

    archive = tmp_path / "archive"
    out = run_python(
        ["experiments/table3_yelp.py", str(root / "run"), f"--classified={classified}",
         f"--archive={archive}", f"--out={tmp_path / 'from_runs'}"],
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(os.listdir(archive / "run")) == ["classify", "config.json", "evaluations.json"]
    assert len(os.listdir(archive / "run" / "classify")) == 4
    # The archive alone gives the same tables, the runs and classifier outputs gone.
    os.rename(classified, tmp_path / "moved")
    out = run_python(["experiments/table3_yelp.py", str(archive), f"--out={tmp_path / 'table'}"])
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "table" / "table3.json") as f:
        table = json.load(f)
    with open(tmp_path / "from_runs" / "table3.json") as f:
        assert json.load(f)["tables"] == table["tables"]
    cell = table["tables"]["official"]["rows"]["VAE cyclical"]["10%"]
    assert cell["mean"] == pytest.approx(np.mean([p["test_acc"] for p in ten["probes"]]))
    assert cell["seeds"] == [0] and cell["draws_per_seed"] == [2]
    assert "100" in table["tables"]["balanced"]["rows"]["VAE cyclical"]
    assert [e for e, _ in table["trajectory"]["VAE cyclical"]["100"]] == [1, 2]
    figures = table["pretraining"]["VAE cyclical"]  # the test split at the best checkpoint
    assert figures["epoch"] in ([1.0], [2.0]) and figures["test_rec"] > 0
    text_ = (tmp_path / "table" / "table3.md").read_text()
    assert "| VAE cyclical | 1 × 2 |" in text_ and "4 epochs" in text_
    for png in ("trajectory.png", "pretraining.png"):
        assert (tmp_path / "table" / png).stat().st_size > 0
