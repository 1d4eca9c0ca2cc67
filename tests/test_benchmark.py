"""The speed benchmark runs on this machine and writes the fields the README and issues quote."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO


def test_benchmark_runs_and_writes_its_table(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(REPO / "experiments" / "benchmark.py")]
    command += ["--only", "ptb_23,cvae_swda", "--steps", "2", "--warmup", "1", "--out", str(out)]
    command += ["--profile", str(tmp_path / "profile")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list((tmp_path / "profile" / "ptb_23").rglob("*.trace.json.gz"))
    assert "ptb_23" in proc.stdout and "% peak" in proc.stdout
    result = json.loads(out.read_text())
    assert result["backend"] == "cpu" and len(result["peak_gflops_all"]) == 1 + 2 + 2  # rounds
    row, dialog = result["configs"]
    # The dialog CVAE at the paper's sizes: 30 responses, 9 context utterances of 40 tokens.
    assert dialog["name"] == "cvae_swda" and (dialog["batch"], dialog["context"]) == (30, 9)
    assert (dialog["emb"], dialog["hidden"], dialog["latent"]) == (200, 400, 200)
    assert dialog["utterance_length"] == 40 and 0 < dialog["fraction_of_peak"] < 1
    assert (row["emb"], row["hidden"], row["latent"], row["batch"], row["length"]) == (
        256, 256, 32, 32, 23,
    )  # fmt: skip
    assert row["ms_min"] <= row["ms_median"] <= row["ms_max"]
    assert len(row["fraction_of_peak_rounds"]) == len(row["peak_gflops_rounds"]) == 2
    assert 0 < row["fraction_of_peak"] == pytest.approx(np.median(row["fraction_of_peak_rounds"]))
    best = max(result["peak_gflops_all"])
    assert row["fraction_of_best_peak"] == pytest.approx(row["gflops"] / best)
    assert row["sentences_per_s"] * row["ms_median"] / 1e3 == pytest.approx(32)


def test_benchmark_rejects_bad_arguments(tmp_path):
    command = [sys.executable, str(REPO / "experiments" / "benchmark.py"), "--only", "ptb_99"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "--only: unknown ['ptb_99']" in proc.stderr


def git_checkout() -> bool:
    proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True)
    return proc.returncode == 0


@pytest.mark.skipif(not git_checkout(), reason="ab_step.py exports git revisions: no git checkout")
def test_ab_step_alternates_two_versions(tmp_path):
    out = tmp_path / "ab.json"
    command = [sys.executable, str(REPO / "experiments" / "ab_step.py"), "HEAD", "."]
    command += ["--rounds", "2", "--steps", "1", "--warmup", "0", "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "variant / base" in proc.stdout
    result = json.loads(out.read_text())
    base, variant = result["sides"]["base"], result["sides"]["variant"]
    assert len(base["commit"]) == 40 and variant["commit"] is None  # HEAD exported; "." as is
    assert [len(r) for r in base["times_s"]] == [len(r) for r in variant["times_s"]] == [1, 1]
    ratios = [v[0] / b[0] for b, v in zip(base["times_s"], variant["times_s"], strict=True)]
    assert result["ratios"] == pytest.approx(ratios)


def test_ab_step_rejects_an_unknown_revision(tmp_path):
    command = [sys.executable, str(REPO / "experiments" / "ab_step.py"), "no-such-revision"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0 and "'no-such-revision' is not a git revision" in proc.stderr


def test_torch_baseline_against_vae_jax(tmp_path):
    pytest.importorskip("torch", reason="torch is not a vae_jax dependency; the baseline needs it")
    out = tmp_path / "torch.json"
    command = [sys.executable, str(REPO / "experiments" / "torch_baseline.py"), "--only", "ptb_23"]
    command += ["--steps", "2", "--warmup", "0", "--vs_vae_jax", "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())["configs"]
    ratios = row["torch_over_vae_jax_rounds"]
    assert len(ratios) == row["rounds"]
    assert row["torch_over_vae_jax"] == pytest.approx(np.median(ratios))
    assert row["torch"]["ms_min"] <= row["torch"]["ms_median"]
    assert row["vae_jax"]["ms_min"] <= row["vae_jax"]["ms_median"]
