"""benchmarks/precision_check.py: two precisions of one run compared, against the seed spread."""

import json

import precision_check  # benchmarks/precision_check.py, on the path by conftest
import pytest
from conftest import tiny_synthetic_config

from vae_jax.run import workdirs


def make_run(path, valid_kl: dict[int, float], **config_fields):
    config = tiny_synthetic_config()
    for field, value in config_fields.items():
        section, name = field.split(".") if "." in field else (None, field)
        (config[section] if section else config)[name] = value
    path.mkdir()
    workdirs.save_config(config, str(path))
    with open(path / "metrics.jsonl", "w", encoding="utf-8") as f:
        for step, kl in valid_kl.items():
            f.write(json.dumps({"step": step, "rec": 1.0}) + "\n")  # a training record
            f.write(json.dumps({"step": step, "valid_kl": kl, "valid_rec": 2.0}) + "\n")
    return str(path)


def test_differences_are_read_against_the_seed_spread(tmp_path):
    ref = make_run(tmp_path / "f32", {10: 1.0, 20: 2.0, 30: 3.0})
    bf16 = make_run(tmp_path / "bf16", {10: 1.05, 20: 2.5}, **{"model.dtype": "bfloat16"})
    seed1 = make_run(tmp_path / "seed1", {10: 1.2, 20: 2.1, 30: 2.0}, seed=1)
    # Another seed in bfloat16 is measured against the bfloat16 run.
    seed2 = make_run(tmp_path / "seed2", {10: 1.0, 20: 2.4}, seed=2, **{"model.dtype": "bfloat16"})
    out = str(tmp_path / "c.json")
    result = precision_check.main([ref, bf16, "--noise", seed1, seed2, "--out", out])
    assert result["dtypes"] == ["float32", "bfloat16"]
    rows = {(r["step"], r["figure"]): r for r in result["rows"]}
    assert set(rows) == {(s, f) for s in (10, 20) for f in ("valid_kl", "valid_rec")}  # common
    assert rows[10, "valid_kl"]["difference"] == pytest.approx(0.05)
    assert rows[10, "valid_kl"]["seed_spread"] == pytest.approx(0.2)  # seed 1 against float32
    assert rows[10, "valid_kl"]["within_seed_spread"]
    assert rows[20, "valid_kl"]["seed_spread"] == pytest.approx(0.1)  # both seeds 0.1 away
    assert not rows[20, "valid_kl"]["within_seed_spread"]  # 0.5 against a spread of 0.1
    assert json.loads((tmp_path / "c.json").read_text())["rows"] == result["rows"]


def test_a_config_that_differs_beyond_the_dtype_is_refused(tmp_path, capsys):
    ref = make_run(tmp_path / "a", {10: 1.0})
    other = make_run(tmp_path / "b", {10: 1.0}, **{"model.dtype": "bfloat16", "seed": 3})
    with pytest.raises(SystemExit) as stop:
        precision_check.main([ref, other])
    assert stop.value.code == 2
    assert "['seed']" in capsys.readouterr().err
    longer = make_run(tmp_path / "c", {10: 1.0}, seed=1, num_train_steps=99)
    with pytest.raises(SystemExit):
        precision_check.main([ref, ref, "--noise", longer])
    assert "'num_train_steps']" in capsys.readouterr().err
    ignored = ["num_train_steps", "beta_schedule.total_steps"]
    result = precision_check.main([ref, ref, "--noise", longer, "--ignore", *ignored])
    assert result["ignored_fields"] == ignored
