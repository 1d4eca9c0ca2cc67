"""experiments/table1_ptb.py on hand-written run records (no training): the rows of an earlier
table join those of live runs in the mean ± std, stay out of the curves, and count once."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import table1_ptb  # experiments/table1_ptb.py
from conftest import REPO


def fake_run(path, seed: int, schedule: str, kls: list[float]) -> str:
    """A workdir as training leaves it, for the table: config.json and per-epoch evaluations."""
    os.makedirs(path)
    config = {"seed": seed, "num_epochs": len(kls), "beta_schedule": {"name": schedule},
              "model": {"svi_steps": 0}, "data": {"eval_splits": ["valid", "test"]}}  # fmt: skip
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    with open(os.path.join(path, "metrics.jsonl"), "w", encoding="utf-8") as f:
        for epoch, kl in enumerate(kls, start=1):
            for split in ("valid", "test"):
                ppl = 120.0 - epoch + seed  # the last epoch is the best
                record = {"step": 10 * epoch, "epoch": float(epoch), f"{split}_rec": 100.0 + seed,
                          f"{split}_kl": kl, f"{split}_elbo": -(100.0 + seed + kl),
                          f"{split}_ppl_bound": ppl}  # fmt: skip
                f.write(json.dumps(record) + "\n")
    return str(path)


def table(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "experiments" / "table1_ptb.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def test_recorded_rows_join_the_table_not_the_curves(tmp_path):
    earlier = fake_run(tmp_path / "sweep0" / "ptb-cyclical.seed-0", 0, "cyclical", [1.0, 2.0])
    out0 = str(tmp_path / "table0.json")
    assert table(earlier, "--out", out0).returncode == 0
    os.rename(earlier, str(tmp_path / "gone"))  # its workdir is lost; the table JSON remains

    live = fake_run(tmp_path / "sweep1" / "ptb-cyclical.seed-1", 1, "cyclical", [1.5, 3.0])
    recorded = table1_ptb.recorded_rows(out0)
    assert [(r["seed"], r["recorded_in"]) for r in recorded] == [(0, out0)]
    (group,) = table1_ptb.grouped(
        table1_ptb.merged([table1_ptb.row(live, "test", "best")], recorded)
    )
    assert group["n"] == 2
    assert group["kl"] == pytest.approx(2.5)
    assert group["kl_std"] == pytest.approx(np.std([2.0, 3.0], ddof=1))
    assert "2.50 ± 0.71" in table1_ptb.markdown([group], "test")
    note = table1_ptb.caption([group], "test", "best", None)
    assert "seeds [0, 1]" in note and "seeds [0] as recorded in table0.json" in note
    table1_ptb.plot_curves([group], str(tmp_path / "curves.png"))  # draws seed 1's curve only
    assert os.path.getsize(tmp_path / "curves.png") > 0

    out = str(tmp_path / "both.json")
    md, png = str(tmp_path / "both.md"), str(tmp_path / "both.png")
    done = table(str(tmp_path / "sweep1"), "--rows_from", out0, "--out", out, "--markdown", md,
                 "--plot", png)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "| VAE | Cyclical | 2 |" in done.stdout
    # The merged table's JSON keeps each row's source, so it cannot bring seed 1 in twice.
    with pytest.raises(ValueError, match=r"\('VAE', 'Cyclical', 1\)"):
        table1_ptb.merged([table1_ptb.row(live, "test", "best")], table1_ptb.recorded_rows(out))
    assert "--select=last" in table(live, "--rows_from", out0, "--select", "last").stderr


def test_rows_from_refuses_a_file_that_is_not_a_table(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"rec": 1.0}))
    with pytest.raises(
        ValueError, match="metrics.json: expected the JSON of `table1_ptb.py --out`"
    ):
        table1_ptb.recorded_rows(str(path))
    path.write_text(json.dumps([{"model": "VAE", "schedule": "Cyclical", "runs": [{"rec": 1.0}]}]))
    with pytest.raises(ValueError, match="VAE Cyclical lacks"):
        table1_ptb.recorded_rows(str(path))


def test_ablation_cells_pair_beta_and_lr_apart_and_name_their_rows():
    """The 2 × 2 of β schedule × lr (`configs/sweeps/ptb_ablation.py`): the two new cells
    differ from Table 1's rows in the learning rate alone, and their rows say so."""
    import ptb  # configs/ptb.py
    from sweeps import ptb_ablation  # configs/sweeps/ptb_ablation.py

    cells = {v: ptb.get_config(v) for v in ptb_ablation.CELLS}
    assert cells["cyclical_lr_constant"].beta_schedule == cells["cyclical"].beta_schedule
    assert cells["cyclical_lr_constant"].lr_schedule == cells["monotonic"].lr_schedule
    assert cells["monotonic_lr_restarts"].beta_schedule == cells["monotonic"].beta_schedule
    assert cells["monotonic_lr_restarts"].lr_schedule == cells["cyclical"].lr_schedule
    names = {v: table1_ptb.schedule_name(c.to_dict()) for v, c in cells.items()}
    assert names == {
        "cyclical": "Cyclical", "monotonic": "Monotonic",
        "cyclical_lr_constant": "Cyclical, lr constant",
        "monotonic_lr_restarts": "Monotonic, lr restarts",
    }  # fmt: skip
    assert len(ptb_ablation.get_sweep()) == 12 and len(ptb_ablation.get_sweep("new")) == 6
