"""benchmarks/accelerator_check.py at a tiny size on the CPU: rows, projection, PTB run."""

import json
import math

import accelerator_check  # benchmarks/accelerator_check.py
import benchmark
import pytest
from test_input_pipeline import write_corpus


@pytest.fixture
def tiny_data(tmp_path, monkeypatch):
    write_corpus(tmp_path / "data" / "ptb")
    monkeypatch.setenv("VAE_JAX_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("VAE_JAX_TFDS_DIR", str(tmp_path / "tfds"))
    # --size tiny changes benchmark's row sizes for this process: put them back afterwards.
    monkeypatch.setitem(benchmark.CONFIGS, "ptb_23", benchmark.CONFIGS["ptb_23"])
    return tmp_path


def test_tiny_check_measures_projects_and_runs_ptb(tiny_data):
    out = tiny_data / "accel.json"
    args = ["--out", str(out), "--size=tiny", "--steps=3", "--savae_rounds=0"]
    result = accelerator_check.main([*args, "--iwnll_samples=4", "--budget_s=1200"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    names = [r["name"] for r in result["rows"]]
    assert names == [*accelerator_check.ROWS, "iwnll_k4"]
    assert all(r["ms_median"] > 0 and r["compile_s"] > 0 for r in result["rows"])
    assert result["matmul_precision"] == "highest" and result["backend"] == "cpu"
    ptb = result["ptb_40_epochs"]
    plan = ptb["plan"]
    assert plan["from_data"] and 8 <= plan["mean_length"] <= 20  # buckets of 1-15 words
    parts = ("train_s", "eval_s", "compile_s", "checkpoint_s")
    assert ptb["projected_s"] == pytest.approx(sum(ptb[p] for p in parts))
    assert ptb["compile_s"] > 0 and ptb["checkpoint_s"] > 0
    assert ptb["ran"] and ptb["finished"] and ptb["steps"] == plan["steps_per_epoch"]
    assert math.isfinite(ptb["best"]["valid_ppl_bound"])
    assert math.isfinite(ptb["best"]["test_ppl_bound"])  # a record of its own, merged


def test_rows_are_written_as_they_finish(tiny_data, monkeypatch):
    out = tiny_data / "accel.json"
    real = benchmark.bench_train_step

    def third_row_dies(name, *args, **kwargs):
        if name == accelerator_check.ROWS[2]:
            raise KeyboardInterrupt  # the call killed mid-row
        return real(name, *args, **kwargs)

    monkeypatch.setattr(benchmark, "bench_train_step", third_row_dies)
    with pytest.raises(KeyboardInterrupt):
        accelerator_check.main(["--out", str(out), "--size=tiny", "--steps=2", "--budget_s=600"])
    kept = json.loads(out.read_text())
    assert [r["name"] for r in kept["rows"]] == list(accelerator_check.ROWS[:2])


def test_no_row_starts_past_the_budget(tiny_data):
    out = tiny_data / "accel.json"
    result = accelerator_check.main(["--out", str(out), "--size=tiny", "--quick", "--budget_s=1"])
    assert [r["name"] for r in result["rows"]] == list(accelerator_check.QUICK_ROWS)
    assert all("skipped" in r for r in result["rows"])
    assert result["ptb_40_epochs"]["ran"] is False
