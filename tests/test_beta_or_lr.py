"""experiments/beta_or_lr.py: the β × lr 2 × 2, its cells, contrasts and Welch tests."""

import json
import os
import subprocess
import sys

import beta_or_lr  # experiments/beta_or_lr.py
import numpy as np
import pytest
from conftest import REPO

LR = {"constant": {"name": "constant", "value": 1e-3}, "restarts": {"name": "cyclical_cosine_lr"}}


def fake_ptb_run(path, seed: int, beta: str, lr: str, kl: float) -> None:
    """A PTB workdir with two evaluated epochs, the second the best."""
    os.makedirs(path)
    config = {"seed": seed, "num_epochs": 2, "beta_schedule": {"name": beta},
              "lr_schedule": LR[lr], "model": {"svi_steps": 0}}  # fmt: skip
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    with open(os.path.join(path, "metrics.jsonl"), "w", encoding="utf-8") as f:
        for epoch in (1, 2):
            for split in ("valid", "test"):
                rec = 100.0 - kl + 0.1 * seed
                record = {"step": 10 * epoch, "epoch": float(epoch), f"{split}_rec": rec,
                          f"{split}_kl": kl * epoch / 2, f"{split}_elbo": -(rec + kl),
                          f"{split}_ppl_bound": 110.0 - epoch}  # fmt: skip
                f.write(json.dumps(record) + "\n")


def test_the_cells_contrasts_and_what_remains(tmp_path):
    # KL: +1.0 from cyclical β, +0.5 more from restarts; seeds spread it by ±0.05.
    for seed in (0, 1, 2):
        for beta in ("monotonic", "cyclical"):
            for lr in ("constant", "restarts"):
                kl = 1.0 + (beta == "cyclical") + 0.5 * (lr == "restarts") + 0.05 * (seed - 1)
                fake_ptb_run(tmp_path / "runs" / f"{beta}-{lr}.seed-{seed}", seed, beta, lr, kl)
    fake_ptb_run(tmp_path / "runs" / "constant.seed-0", 0, "constant", "constant", 0.1)
    cells = beta_or_lr.ptb_runs([str(tmp_path / "runs")])
    assert sorted(cells) == [(b, lr) for b in ("cyclical", "monotonic") for lr in beta_or_lr.LRS]
    result = beta_or_lr.analyse(cells, beta_or_lr.PTB_FIGURES)
    assert result["figures"] == ["rec", "kl", "neg_elbo", "ppl"]  # no eval_test.json: no IW-NLL
    cell = result["cells"]["cyclical/restarts"]
    assert cell["n"] == 3 and cell["kl"] == pytest.approx(2.5) and cell["kl_std"] > 0
    contrasts = result["contrasts"]
    assert contrasts["official pairing"]["kl"]["diff"] == pytest.approx(1.5)
    assert contrasts["β at a constant lr"]["kl"]["diff"] == pytest.approx(1.0)
    assert contrasts["restarts at a monotonic β"]["kl"]["diff"] == pytest.approx(0.5)
    assert result["remains"]["kl"] == pytest.approx(1.0 / 1.5)
    big = contrasts["β at a constant lr"]["kl"]
    assert big["t"] > 10 and big["p"] < 1e-3 and big["df"] == pytest.approx(4.0)

    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "experiments" / "beta_or_lr.py"), str(tmp_path / "runs")]
    proc = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| cyclical | constant | 3 |" in (out / "ptb_2x2.md").read_text()
    assert "kl 67%" in proc.stdout


def test_welch_matches_a_known_case():
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0]
    w = beta_or_lr.welch(a, b)
    va, vb = np.var(a, ddof=1) / 4, np.var(b, ddof=1) / 3
    assert w["t"] == pytest.approx(-1.5 / np.sqrt(va + vb))
    # scipy.stats.ttest_ind(a, b, equal_var=False): t = -1.13389, df = 3.23472, p = 0.333824.
    assert w["t"] == pytest.approx(-1.13389, abs=1e-4)
    assert w["df"] == pytest.approx(3.23472, abs=1e-4) and w["p"] == pytest.approx(
        0.333824, abs=1e-4
    )
    assert beta_or_lr.welch([1.0], [2.0, 3.0])["t"] is None  # one seed: no test


def test_synthetic_summary_cells(tmp_path):
    members = lambda kl: [{"rec": 2.0, "kl": kl + d, "elbo": -2.0 - kl, "separation": 0.5}  # noqa: E731
                          for d in (-0.1, 0.0, 0.1)]  # fmt: skip
    summary = {"constant": {"members": members(0.0)}, "monotonic": {"members": members(0.5)},
               "cyclical": {"members": members(1.0)},
               "monotonic_lr_restarts": {"members": members(0.6)},
               "cyclical_lr_restarts": {"members": members(1.2)}}  # fmt: skip
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    cells = beta_or_lr.synthetic_runs(str(path))
    assert sorted(cells) == [(b, lr) for b in ("cyclical", "monotonic") for lr in beta_or_lr.LRS]
    result = beta_or_lr.analyse(cells, beta_or_lr.SYNTHETIC_FIGURES)
    assert result["remains"]["kl"] == pytest.approx(0.5 / 0.7)
    assert result["cells"]["monotonic/restarts"]["neg_elbo"] == pytest.approx(2.6)
