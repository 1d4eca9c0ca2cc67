"""Decoding from z (`VAE.generate`) and `python -m vae_jax.generate`."""

import functools

import jax
import numpy as np
import pytest
from conftest import tiny_synthetic_config
from test_evaluate import init_params, tiny_vae

from vae_jax import generate
from vae_jax.core import models
from vae_jax.core.tokens import BOS_ID, EOS_ID, PAD_ID
from vae_jax.run import build, checkpoints


def test_greedy_tokens_are_the_argmax_of_their_own_teacher_forced_logits():
    model = tiny_vae(vocab=9, latent=3)
    params = init_params(model, seed=1)
    z = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (6, 3))) * 3
    out = generate.decode(model, params, z, max_length=7)
    tokens = np.concatenate([np.full((6, 1), BOS_ID), out], axis=1).astype(np.int32)
    decode = jax.jit(functools.partial(model.apply, method=models.VAE.decode))
    logits = np.array(decode({"params": params}, tokens, z))
    logits[..., [PAD_ID, BOS_ID]] = -np.inf  # never generated
    for row, row_logits in zip(out, logits, strict=True):
        ends = np.flatnonzero(row == EOS_ID)
        n = ends[0] + 1 if len(ends) else len(row)
        np.testing.assert_array_equal(row[:n], row_logits[:n].argmax(-1))
        assert np.all(row[n:] == PAD_ID)

    key = jax.random.PRNGKey(1)
    sampled = generate.decode(model, params, z, 7, key, temperature=1.0)
    np.testing.assert_array_equal(sampled, generate.decode(model, params, z, 7, key, 1.0))
    assert not np.isin(sampled[:, 0], [PAD_ID, BOS_ID]).any()
    np.testing.assert_array_equal(generate.decode(model, params, z, 7, key, 1e-4), out)


def test_interpolation_points_run_from_a_to_b():
    points = generate.interpolation_points(np.zeros(2), np.array([1.0, -2.0]), steps=10)
    assert points.shape == (11, 2)
    np.testing.assert_allclose(points[[0, 5, 10]], [[0, 0], [0.5, -1.0], [1.0, -2.0]])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A synthetic-task workdir: config.json and a best checkpoint of initial parameters."""
    path = tmp_path_factory.mktemp("run")
    config = tiny_synthetic_config()
    (path / "config.json").write_text(config.to_json_best_effort(), encoding="utf-8")
    model = build.make_model(config, config.data.vocab_size)
    checkpoints.save(str(path / "best"), init_params(model), {"step": 0})
    return str(path)


def test_generate_command_modes(workdir, capsys):
    common = [f"--workdir={workdir}", "--max_length=8"]
    lines = generate.main([*common, "--mode=prior", "--num=3", "--temperature=0.5"])
    assert len(lines) == 6 and lines[0].startswith("z0 greedy: ") and "T=0.5: " in lines[1]
    assert capsys.readouterr().out.strip() == "\n".join(lines).strip()

    lines = generate.main([*common, "--mode=reconstruct", "--num=2"])  # from the eval split
    assert [line.split(":")[0] for line in lines] == ["input", "recon", "", "input", "recon", ""]
    lines = generate.main([*common, "--mode=reconstruct", "--sentence", "5 6 7"])
    assert lines[0] == "input: 5 6 7"

    args = [*common, "--mode=interpolate", "--sentence=4 5", "--sentence", "9 10 11"]
    lines = generate.main(args)
    assert len(lines) == 13 and lines[0] == "a: 4 5" and lines[-1] == "b: 9 10 11"
    assert lines[1].startswith("0.00: ") and lines[-2].startswith("1.00: ")


def test_generate_command_errors_name_the_problem(workdir):
    with pytest.raises(ValueError, match="--sentence='a b'.*token ids"):
        generate.main([f"--workdir={workdir}", "--mode=reconstruct", "--sentence", "a b"])
    with pytest.raises(SystemExit):
        generate.main([f"--workdir={workdir}", "--mode=interpolate", "--sentence", "4"])
    with pytest.raises(SystemExit):
        generate.main([f"--workdir={workdir}", "--mode=prior", "--temperature=0"])
