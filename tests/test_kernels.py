"""The layer implementations (`vae_jax.core.kernels`): CPU-tuned and plain give the same model."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_python

from vae_jax.core import forward, kernels, models, objectives


def _loss_and_grads(kernel_name: str, dropout: float, dtype: str = "float32"):
    model = models.VAE(
        vocab_size=30, enc_emb_dim=8, enc_hidden_dim=16, dec_emb_dim=8, dec_hidden_dim=16,
        latent_dim=4, dec_dropout_in=dropout, dec_dropout_out=dropout, kernels=kernel_name,
        dtype=dtype,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 30, size=(6, 9)).astype(np.int32)
    tokens[:, 0], tokens[:, -1], tokens[4:, 6:] = 2, 3, 0  # <s> … </s>, two shorter rows
    tokens[4:, 5] = 3
    keys = jax.random.split(jax.random.PRNGKey(1), 6)
    params = model.init(jax.random.PRNGKey(0), tokens, keys, train=False)["params"]

    def loss(p):
        total, _, _ = forward.apply(
            model, p, {"tokens": tokens}, keys, beta=0.7, objective=objectives.beta_elbo, train=True
        )
        return total

    return params, jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_plain_kernels_give_the_cpu_kernels_values_and_gradients(dropout):
    params_cpu, (loss_cpu, grads_cpu) = _loss_and_grads("cpu", dropout)
    params_plain, (loss_plain, grads_plain) = _loss_and_grads("plain", dropout)
    # The same parameters (names, shapes, values): a checkpoint moves between them.
    for a, b in zip(jax.tree.leaves(params_cpu), jax.tree.leaves(params_plain), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(loss_cpu, loss_plain, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_cpu), jax.tree.leaves(grads_plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_cpu)) > 1e-3


def test_plain_dropout_masks_are_the_fused_ones():
    x = jnp.ones((3, 5, 7))
    keys = jax.random.split(jax.random.PRNGKey(4), 3)
    fused = kernels.dropout(x, 0.5, keys)
    np.testing.assert_array_equal(fused, kernels.plain_dropout(x, 0.5, keys))
    assert 0.2 < float(jnp.mean(fused == 0)) < 0.8


def test_unknown_kernels_are_named():
    with pytest.raises(ValueError, match="config.model.kernels='gpu'"):
        kernels.implementation("gpu")


RBG_SCRIPT = """
import json, sys
sys.path.insert(0, "tests")
import jax
from conftest import tiny_synthetic_config
from vae_jax.run import loop
config = tiny_synthetic_config("cyclical", steps=6, log_every=3)
config.model.update(dec_dropout_in=0.5, dec_dropout_out=0.5)
state = loop.train_and_evaluate(config, sys.argv[1])
print(json.dumps({"impl": str(jax.random.key_impl(jax.random.key(0))),
                  "step": int(state.step)}))
"""


def test_training_runs_with_the_rbg_prng(tmp_path):
    out = run_python(
        ["-c", RBG_SCRIPT, str(tmp_path / "run")],
        # Not through the suite's compilation cache: other PRNG, other executables.
        env={"JAX_DEFAULT_PRNG_IMPL": "rbg", "JAX_ENABLE_COMPILATION_CACHE": "false"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "rbg" in result["impl"] and result["step"] == 6


@pytest.mark.parametrize("kernel_name", ["cpu", "plain"])
def test_bfloat16_matmuls_stay_close_to_float32(kernel_name):
    _, (loss32, grads32) = _loss_and_grads(kernel_name, 0.5)
    _, (loss16, grads16) = _loss_and_grads(kernel_name, 0.5, dtype="bfloat16")
    assert loss16.dtype == jnp.float32  # parameters, accumulation and the loss stay float32
    np.testing.assert_allclose(loss16, loss32, rtol=2e-2)
    flat32 = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads32)])
    flat16 = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads16)])
    cosine = flat16 @ flat32 / (jnp.linalg.norm(flat16) * jnp.linalg.norm(flat32))
    assert cosine > 0.99
    assert not np.array_equal(flat16, flat32)  # bfloat16 was used


def test_both_kernels_agree_in_bfloat16():
    _, (loss_cpu, grads_cpu) = _loss_and_grads("cpu", 0.5, dtype="bfloat16")
    _, (loss_plain, grads_plain) = _loss_and_grads("plain", 0.5, dtype="bfloat16")
    np.testing.assert_allclose(loss_cpu, loss_plain, rtol=1e-3)
    for a, b in zip(jax.tree.leaves(grads_cpu), jax.tree.leaves(grads_plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=5e-2, atol=5e-3)
