"""Self-contained workdirs (vocabulary and evaluation splits stored) and ``vae_jax.load``."""

import shutil

import numpy as np
import pytest
from test_input_pipeline import tiny_ptb_config

import vae_jax
from vae_jax import evaluate, generate
from vae_jax.run import build, loop, workdirs, writers


@pytest.fixture(scope="module")
def ptb_run(tmp_path_factory):
    """A one-epoch tiny-PTB run whose corpus and TFDS build are then removed."""
    root = tmp_path_factory.mktemp("api")
    config = tiny_ptb_config(root)
    config.update(num_epochs=1, log_every_steps=10)
    workdir = root / "run"
    loop.train_and_evaluate(config, str(workdir))
    corpus = root / "ptb_moved"
    shutil.move(config.data.data_dir, corpus)
    shutil.rmtree(config.data.tfds_dir)
    return workdir, corpus


def test_a_run_stores_its_vocabulary_and_evaluation_splits(ptb_run):
    workdir, _ = ptb_run
    assert (workdir / workdirs.VOCAB).is_file() and (workdir / workdirs.SPLITS).is_file()


def test_evaluate_and_generate_without_the_corpus(ptb_run, capsys):
    workdir, _ = ptb_run
    results = evaluate.main(
        [f"--workdir={workdir}", "--split=test", "--num_importance_samples=3",
         "--num_prior_samples=64"]
    )  # fmt: skip
    # The stored split is the one training evaluated: the same figures.
    logged = [r for r in writers.read_metrics(str(workdir)) if "test_rec" in r][-1]
    assert results["rec"] == pytest.approx(logged["test_rec"], rel=1e-4)
    assert results["sentences"] == 30
    lines = generate.main([f"--workdir={workdir}", "--mode=reconstruct", "--num=2"])
    assert sum(line.startswith("recon: ") for line in lines) == 2


def test_load_gives_encode_sample_reconstruct_interpolate(ptb_run):
    workdir, _ = ptb_run
    vae = vae_jax.load(str(workdir))
    words = set(vae.text.vocab.words)
    mu = vae.encode(["w1 w2 w3", "w4"])
    assert mu.shape == (2, 4) and np.all(np.isfinite(mu))
    assert not np.allclose(mu[0], mu[1])  # the encoder reads its input
    samples = vae.sample(3, max_length=8)
    assert len(samples) == 3 and all(set(s.split()) <= words for s in samples)
    assert vae.sample(3, max_length=8) == samples  # seeded
    assert len(vae.sample(2, temperature=1.0, max_length=8)) == 2
    assert len(vae.reconstruct(["w1 w2", "w3"], max_length=8)) == 2
    path = vae.interpolate("w1 w2", "w5 w6 w7", steps=4, max_length=8)
    assert len(path) == 5
    assert path[0] == vae.reconstruct(["w1 w2"], max_length=8)[0]
    with pytest.raises(ValueError, match="steps=0"):
        vae.interpolate("w1", "w2", steps=0)


def test_an_older_workdir_without_its_vocabulary_names_the_file(ptb_run):
    workdir, corpus = ptb_run
    old = workdir.parent / "old"
    shutil.copytree(workdir, old)
    (old / workdirs.VOCAB).unlink()
    (old / workdirs.SPLITS).unlink()
    with pytest.raises(FileNotFoundError) as err:
        build.load_run(str(old))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(str(old / workdirs.VOCAB)) and "--data_dir=" in message
    # Read once from the corpus, it stores them, and the next reader needs no corpus.
    build.load_run(str(old), data_dir=str(corpus))
    assert (old / workdirs.VOCAB).is_file() and (old / workdirs.SPLITS).is_file()
    assert build.load_run(str(old))[1].info["stored_in"] == str(old)
