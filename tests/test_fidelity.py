"""experiments/table1_fidelity.py and table1_official.py: the comparison with the official PTB
code."""

import json

import pytest
import table1_fidelity
import table1_official  # experiments/table1_official.py, on the path by conftest
from conftest import run_python

EVAL = (
    "[t] AR NLL: 0.0000, AR PPL: 1.0000, VAE NLL: {nll}, VAE REC: {rec}, VAE KL: {kl}, "
    "VAE PPL: {ppl}, SVI NLL: 0.0000, SVI REC: 0.0000, SVI KL: 0.0000, SVI PPL: 1.0000\n"
)


def official_log(path, epochs):
    """A log in the official code's format: per epoch a valid and a test evaluation."""
    text = ""
    for epoch, (valid, test) in enumerate(epochs, start=1):
        text += f"[t] Starting epoch {epoch}\n[t] Iters: 0, Epoch: {epoch}, VAE KL: 9.0\n"
        for split, (rec, kl, ppl) in (("validation", valid), ("test", test)):
            text += f"[t] Checking {split} perf...\n"
            text += EVAL.format(nll=rec + kl, rec=rec, kl=kl, ppl=ppl)
    path.write_text(text)
    return path


def our_run(workdir, seed, evals):
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps({"seed": seed, "population_size": 1}))
    rows = [{"step": 50, "epoch": 0.5, "rec": 1.0}]
    for epoch, (rec, kl, ppl) in enumerate(evals, start=1):
        rows.append({"step": 100 * epoch, "epoch": float(epoch), "valid_rec": rec,
                     "valid_kl": kl, "valid_ppl_bound": ppl, "test_rec": 0.0})  # fmt: skip
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return workdir


def test_official_log_gives_each_epochs_validation_figures(tmp_path):
    log = official_log(tmp_path / "a.log", [((120.0, 3.0, 260.0), (1.0, 1.0, 1.0)),
                                            ((112.0, 5.0, 210.0), (2.0, 2.0, 2.0))])  # fmt: skip
    assert table1_fidelity.official_evals(str(log)) == {
        1: {"rec": 120.0, "kl": 3.0, "ppl": 260.0},
        2: {"rec": 112.0, "kl": 5.0, "ppl": 210.0},
    }


def test_table_gives_means_spreads_and_ratios(tmp_path):
    sweep = tmp_path / "ours"
    our_run(sweep / "a", 0, [(119.0, 3.5, 267.0), (112.0, 5.0, 210.0)])
    our_run(sweep / "b", 1, [(119.0, 2.5, 259.0)])  # stopped after epoch 1
    official_log(tmp_path / "s1.log", [((118.0, 3.0, 264.0), (0, 0, 0))])
    official_log(tmp_path / "s2.log", [((120.0, 2.0, 254.0), (0, 0, 0))])
    out = tmp_path / "out"
    result = run_python([
        "experiments/table1_fidelity.py", "--ours", f"monotonic={sweep}",
        "--official", f"monotonic={tmp_path}/s*.log", "--epochs", "1", "2", "--out", str(out),
    ])  # fmt: skip
    assert result.returncode == 0, result.stderr
    table = json.loads((out / "fidelity.json").read_text())["table"]["monotonic"]
    one = table["1"]
    assert one["vae_jax"]["n"] == 2 and one["official"]["n"] == 2
    assert one["vae_jax"]["kl"] == pytest.approx(3.0)
    assert one["vae_jax"]["kl_std"] == pytest.approx(0.5**0.5)
    assert one["ratio"]["kl"] == pytest.approx(3.0 / 2.5)
    assert one["ratio"]["ppl"] == pytest.approx(263.0 / 259.0)
    # Welch: (3.0 − 2.5) / √(0.5/2 + 0.5/2), both KL variances 0.5
    assert one["z"]["kl"] == pytest.approx(0.5 / 0.5**0.5)
    two = table["2"]  # only one of ours reached it, none of the official runs
    assert two["vae_jax"]["n"] == 1 and two["vae_jax"]["kl_std"] is None
    assert two["official"]["n"] == 0 and two["ratio"] is None and two["z"] is None
    assert "| monotonic | 1 | ours / official (means) | | 1.000 | 1.200 | 1.015 |" in result.stdout
    assert (out / "fidelity.md").read_text().strip() == result.stdout.strip()


def test_official_code_substitutions_make_it_run_on_todays_pytorch(tmp_path):
    source = tmp_path / "x.py"
    source.write_text(
        "a = loss.data[0]*b\n"
        "torch.nn.utils.clip_grad_norm(model.parameters(), 5)\n"
        "layer = nn.LogSoftmax()\n"
        "z = Variable(torch.cuda.FloatTensor(std.size()).normal_(0, 1))\n"
    )
    assert table1_official.patched_source(source) == (
        "a = loss.item()*b\n"
        "torch.nn.utils.clip_grad_norm_(model.parameters(), 5)\n"
        "layer = nn.LogSoftmax(dim=-1)\n"
        "z = Variable(torch.randn(std.size()))\n"
    )


def test_official_ptb_refuses_a_folder_without_the_code(tmp_path):
    result = run_python([
        "experiments/table1_official.py", "train", "--code_dir", str(tmp_path),
        "--work_dir", str(tmp_path / "w"),
    ])  # fmt: skip
    assert result.returncode != 0
    assert "not the official language_model/" in result.stderr
