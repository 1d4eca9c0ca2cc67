"""vae_jax.run.backend: matmul precision in the compiled steps, the platform record, the cache."""

import json
import os
import subprocess
import sys

import jax
import pytest
from conftest import REPO, run_python, tiny_synthetic_config

from vae_jax.core import objectives
from vae_jax.run import backend, build, config_checks, loop, steps


def _lowered_steps(config, precision):
    """StableHLO text of the pmapped train and eval steps of ``config`` under ``precision``."""
    data = build.get_data(config)
    model = build.make_model(config, data.vocab_size)
    beta_fn, lr_fn = steps.make_schedules(config, None)
    batch = next(data.train(0))
    state = steps.create_train_state(config, model, lr_fn, jax.random.PRNGKey(0), batch)
    state = steps.replicate(state)
    sharded = steps.shard(batch, 1)
    objective = objectives.make(config)
    p_train = steps.make_p_train_step(
        model, beta_fn, lr_fn, objective, donate=False, precision=precision
    )
    p_eval = steps.make_p_eval_step(model, objective, precision=precision)
    keys = steps.replicate(jax.random.PRNGKey(1))
    return (
        p_train.lower(state, sharded).as_text(),
        p_eval.lower(state.params, sharded, keys).as_text(),
    )


@pytest.mark.parametrize("kernels", ["cpu", "plain"])
def test_matmul_precision_reaches_the_compiled_steps(kernels):
    config = tiny_synthetic_config()
    config.model.kernels = kernels
    for text in _lowered_steps(config, "highest"):
        dots = text.count("stablehlo.dot_general")
        assert dots > 0
        # Every dot of the step, forward and backward (custom VJPs included), carries it.
        assert text.count("precision = [HIGHEST, HIGHEST]") == dots
    for text in _lowered_steps(config, None):
        assert "HIGHEST" not in text


def test_bfloat16_layers_keep_one_pass_under_highest():
    config = tiny_synthetic_config()
    config.model.update(kernels="plain", dtype="bfloat16")
    train_text, _ = _lowered_steps(config, "highest")
    assert "precision = [DEFAULT, DEFAULT]" in train_text  # the bfloat16 products
    assert "precision = [HIGHEST, HIGHEST]" in train_text  # the float32 latent heads


def test_unknown_precision_is_one_line_naming_the_field():
    config = tiny_synthetic_config(matmul_precision="fp32")
    with pytest.raises(ValueError, match=r"^config\.matmul_precision='fp32': must be one of"):
        config_checks.check_config(config, 1)


def test_configs_written_before_the_field_read_as_highest():
    config = tiny_synthetic_config()
    del config["matmul_precision"]
    assert backend.matmul_precision(config) == "highest"


def test_describe_names_backend_layers_dtype_and_precision():
    info = backend.describe(tiny_synthetic_config())
    assert info["backend"] == "cpu"
    assert info["kernels"] == "auto->cpu"
    assert info["device_count"] >= 1 and info["process_count"] == 1
    assert (info["dtype"], info["matmul_precision"]) == ("float32", "highest")


def test_a_run_records_its_platform_at_each_start(tmp_path):
    config = tiny_synthetic_config(steps=4, log_every=2)
    loop.train_and_evaluate(config, str(tmp_path))
    config.num_train_steps = 6  # resumed: a second entry
    loop.train_and_evaluate(config, str(tmp_path), allow_config_change=True)
    entries = backend.read_platform(str(tmp_path))
    assert len(entries) == 2
    assert entries[0]["backend"] == "cpu" and entries[0]["kernels"] == "auto->cpu"


def test_command_line_fills_the_compilation_cache_and_filters_orbax(tmp_path):
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    args = [
        "-m", "vae_jax.main", "--config=configs/synthetic.py:constant",
        f"--workdir={tmp_path / 'run'}", f"--compilation_cache={cache}",
        "--config.num_train_steps=2", "--config.log_every_steps=1",
        "--config.eval_every_steps=2", "--config.batch_size=8", "--config.eval_batch_size=4",
        "--config.model.enc_hidden_dim=8", "--config.model.dec_hidden_dim=8",
    ]  # fmt: skip
    out = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert any(cache.iterdir()), "nothing was written to the compilation cache"
    assert "Platform: backend=cpu" in out.stderr
    # The run saves checkpoints, and orbax's INFO lines about them are filtered out.
    assert (tmp_path / "run" / "checkpoints").is_dir()
    assert "CheckpointManager created" not in out.stderr
    entries = json.loads((tmp_path / "run" / backend.PLATFORM).read_text())
    assert entries[0]["matmul_precision"] == "highest"


def test_jax_flags_show_in_helpfull():
    out = run_python(["-m", "vae_jax.main", "--helpfull"], timeout=120)
    assert "--jax_compilation_cache_dir" in out.stdout + out.stderr
    assert "--compilation_cache" in out.stdout + out.stderr
