"""The speed benchmark runs on this machine and writes the fields the README and issues quote."""

import json
import math
import subprocess
import sys

import benchmark  # benchmarks/benchmark.py, on the path by conftest
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from jax.extend import core as jax_core

from vae_jax.core import forward, objectives


def traced_matmul_flops(jaxpr) -> int:
    """FLOPs of every ``dot_general`` in ``jaxpr`` (2 per multiply-add), a scan's body counted
    once per iteration: what the traced step multiplies, forward and backward."""
    total = 0
    for eqn in jaxpr.eqns:
        assert eqn.primitive.name != "while", "a loop of unknown length: cannot count it"
        if eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            total += 2 * math.prod(out) * math.prod(lhs[d] for d in contracting)
        times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else [param]:
                if isinstance(sub, jax_core.ClosedJaxpr):
                    sub = sub.jaxpr
                if isinstance(sub, jax_core.Jaxpr):
                    total += times * traced_matmul_flops(sub)
    return total


def traced_step_flops(model, data: dict) -> tuple[int, int]:
    """Matmul FLOPs of ``model``'s traced loss on ``data`` (β = 1, training), and of the loss
    with its gradient: the forward pass, and the whole train step's."""
    params = forward.init(model, jax.random.PRNGKey(0), data)
    keys = jax.random.split(jax.random.PRNGKey(1), data["tokens"].shape[0])

    def loss(params):
        total, _, _ = forward.apply(
            model, params, data, keys, beta=1.0, objective=objectives.beta_elbo, train=True
        )
        return total

    forward_flops = traced_matmul_flops(jax.make_jaxpr(loss)(params).jaxpr)
    return forward_flops, traced_matmul_flops(
        jax.make_jaxpr(jax.value_and_grad(loss))(params).jaxpr
    )


@pytest.mark.parametrize("kernels", ["cpu", "plain"])
@pytest.mark.parametrize("length", [6, 11])
def test_step_flops_match_the_matmuls_of_the_traced_step(kernels, length):
    emb, hidden, latent, vocab, batch = 16, 32, 4, 64, 4
    model = benchmark.make_model(benchmark.model_config(emb, hidden, latent, kernels), vocab)
    data = {"tokens": jnp.asarray(benchmark.random_batch(vocab, batch, length))}
    forward_flops, step = traced_step_flops(model, data)
    counted = benchmark.step_flops(emb, hidden, latent, vocab, batch, length)
    assert forward_flops == counted / 3  # the forward pass: every matmul, counted exactly
    assert step == pytest.approx(counted, rel=0.02)  # backward ≈ 2 × forward


@pytest.mark.parametrize("kernels", ["cpu", "plain"])
def test_cvae_step_flops_match_the_matmuls_of_the_traced_step(kernels):
    """`benchmark.cvae_step_flops` counts what the dialog CVAE's traced step multiplies:
    contexts at their padded length, the response at its own."""
    from vae_jax.dialog import cvae

    vocab, topics, batch, length, context, utt = 64, 5, 3, 7, 4, 9
    model = cvae.CVAE(
        vocab_size=vocab, num_topics=topics, emb_dim=8, topic_emb_dim=4, utt_hidden_dim=8,
        ctx_hidden_dim=8, dec_hidden_dim=8, latent_dim=4, bow_hidden_dim=8, kernels=kernels,
    )  # fmt: skip
    dialog = benchmark.random_dialog_batch(vocab, topics, batch, length, context, utt)
    forward_flops, step = traced_step_flops(model, {k: jnp.asarray(v) for k, v in dialog.items()})
    counted = benchmark.cvae_step_flops(model, vocab, batch, length, context, utt)
    assert forward_flops == counted / 3
    assert step == pytest.approx(counted, rel=0.05)  # the GRU kernels recompute a little


def test_benchmark_runs_and_writes_its_table(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(REPO / "benchmarks" / "benchmark.py")]
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
    assert len(row["fraction_of_peak_rounds"]) == len(row["peak_gflops_rounds"]) == 2
    assert 0 < row["fraction_of_peak"] == pytest.approx(np.median(row["fraction_of_peak_rounds"]))
    # Each round's fraction is the step's FLOPs over its measured time and peak: the step time
    # it implies is one of the timed steps (one a round here), and the fraction is plausible.
    flops = benchmark.step_flops(*benchmark.CONFIGS["ptb_23"])
    rounds = zip(row["fraction_of_peak_rounds"], row["peak_gflops_rounds"], strict=True)
    for fraction, peak in rounds:
        assert 0 < fraction <= 1.5
        implied_ms = 1e3 * flops / (fraction * peak * 1e9)
        assert row["ms_min"] * (1 - 1e-9) <= implied_ms <= row["ms_max"] * (1 + 1e-9)
    best = max(result["peak_gflops_all"])
    assert row["gflops"] == pytest.approx(flops / row["ms_median"] / 1e6)
    assert row["fraction_of_best_peak"] == pytest.approx(row["gflops"] / best)
    assert 0 < row["fraction_of_best_peak"] <= 1.5


def test_benchmark_rejects_bad_arguments(tmp_path):
    command = [sys.executable, str(REPO / "benchmarks" / "benchmark.py"), "--only", "ptb_99"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "--only: unknown ['ptb_99']" in proc.stderr


def git_checkout() -> bool:
    proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True)
    return proc.returncode == 0


@pytest.mark.skipif(not git_checkout(), reason="ab_step.py exports git revisions: no git checkout")
def test_ab_step_alternates_two_versions(tmp_path):
    out = tmp_path / "ab.json"
    command = [sys.executable, str(REPO / "benchmarks" / "ab_step.py"), "HEAD", "."]
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
    command = [sys.executable, str(REPO / "benchmarks" / "ab_step.py"), "no-such-revision"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0 and "'no-such-revision' is not a git revision" in proc.stderr


def test_torch_baseline_against_vae_jax(tmp_path):
    pytest.importorskip("torch", reason="torch is not a vae_jax dependency; the baseline needs it")
    out = tmp_path / "torch.json"
    command = [sys.executable, str(REPO / "benchmarks" / "torch_baseline.py"), "--only", "ptb_23"]
    command += ["--steps", "2", "--warmup", "0", "--vs_vae_jax", "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())["configs"]
    ratios = row["torch_over_vae_jax_rounds"]
    assert len(ratios) == row["rounds"]
    assert row["torch_over_vae_jax"] == pytest.approx(np.median(ratios))
    # Each round's ratio is torch's step over vae_jax's, so the ratio of the two sides' medians
    # over all rounds lies between the rounds' smallest and largest ratio.
    overall = row["torch"]["ms_median"] / row["vae_jax"]["ms_median"]
    assert min(ratios) * (1 - 1e-9) <= overall <= max(ratios) * (1 + 1e-9)
    flops = benchmark.step_flops(*benchmark.CONFIGS["ptb_23"])
    for side in ("torch", "vae_jax"):
        assert row[side]["gflops"] == pytest.approx(flops / row[side]["ms_median"] / 1e6)
