"""The Yelp task (`configs/yelp.py`): the corpus with labels, the CNN encoder, the classifier."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_python, tiny_synthetic_config

from vae_jax import input_pipeline, models, train
from vae_jax.datasets import text

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
        state = train.train_and_evaluate(config, str(tmp_path / str(deterministic)))
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
    train.train_and_evaluate(config, workdir)
    data = input_pipeline.get_data(config)
    batch = next(data.train(0))
    assert set(batch) == {"tokens", "labels"} and set(np.unique(batch["labels"])) <= {-1, 0, 1}
    out = run_python(
        ["experiments/yelp_classify.py", workdir, f"--out={tmp_path / 'out'}",
         "--sizes=100,all", "--seeds=2", "--steps=400", "--eval_every=100"],
        env={"VAE_JAX_TFDS_DIR": str(tmp_path / "tfds")},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "out" / "run.json") as f:
        result = json.load(f)
    assert result["test_majority_baseline"] == pytest.approx(7639 / 12666)
    assert result["sizes"]["100"]["n"] == 100 and result["sizes"]["all"]["n"] == 44409
    for size in result["sizes"].values():
        assert 0.3 < size["test_acc_mean"] < 1.0 and len(size["probes"]) == 2
    assert (tmp_path / "out" / "accuracy.png").exists()
    assert "| VAE, cyclical |" in (tmp_path / "out" / "table.md").read_text()
    assert result["protocol"] == "encoder frozen"
    # The same command again reuses the run's result instead of classifying it anew.
    stamp = os.path.getmtime(tmp_path / "out" / "run.json")
    out = run_python(
        ["experiments/yelp_classify.py", workdir, f"--out={tmp_path / 'out'}",
         "--sizes=100,all", "--seeds=2", "--steps=400", "--eval_every=100"],
        env={"VAE_JAX_TFDS_DIR": str(tmp_path / "tfds")},
    )  # fmt: skip
    assert out.returncode == 0 and "reusing" in out.stderr, out.stderr[-3000:]
    assert os.path.getmtime(tmp_path / "out" / "run.json") == stamp
    # The encoder trained with the classifier: the same protocol otherwise.
    out = run_python(
        ["experiments/yelp_classify.py", workdir, f"--out={tmp_path / 'ft'}", "--sizes=100",
         "--seeds=2", "--steps=20", "--eval_every=10", "--finetune_encoder"],
        env={"VAE_JAX_TFDS_DIR": str(tmp_path / "tfds")},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "ft" / "run.json") as f:
        tuned = json.load(f)
    assert tuned["protocol"] == "encoder fine-tuned"
    probes = tuned["sizes"]["100"]["probes"]
    assert len(probes) == 2 and all(
        0.3 < p["test_acc"] < 1.0 and p["step"] in (10, 20) for p in probes
    )
    assert "| VAE, cyclical (fine-tuned) |" in (tmp_path / "ft" / "table.md").read_text()


def test_yelp_variants_check():
    import yelp

    from vae_jax import config_checks

    config = yelp.get_config("free_bits")  # Li et al.'s free bits: 16 nats over z's 256 dims
    assert config.objective == "free_bits" and config.beta_schedule.name == "monotonic"
    assert config.free_bits.lambda_per_dim * config.model.latent_dim == 16
    config = yelp.get_config("ae")
    assert config.model.deterministic and config.beta_schedule.value == 0.0
    config.data.max_length = 20  # longer than the CNN's window holds
    with pytest.raises(ValueError, match="model.cnn_length"):
        config_checks.check_config(config, 1)
