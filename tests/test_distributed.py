"""Two processes on 127.0.0.1 (two CPU devices each) compute what one process with four does."""

import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO

from vae_jax.run import checkpoints, distributed, writers

OVERRIDES = [  # configs/synthetic.py shrunk, with dropout: noise must follow global positions
    "--config.num_train_steps=12", "--config.log_every_steps=4", "--config.eval_every_steps=6",
    "--config.batch_size=8", "--config.eval_batch_size=4", "--config.data.vocab_size=12",
    "--config.data.length=4", "--config.model.enc_emb_dim=4", "--config.model.enc_hidden_dim=8",
    "--config.model.dec_emb_dim=4", "--config.model.dec_hidden_dim=8",
    "--config.model.dec_dropout_in=0.5", "--config.model.dec_dropout_out=0.5",
    "--config.checkpoint_every_steps=6",
]  # fmt: skip


def _command(workdir, *extra):
    return [
        sys.executable, "-m", "vae_jax.main", "--config=configs/synthetic.py:cyclical",
        f"--workdir={workdir}", *OVERRIDES, *extra,
    ]  # fmt: skip


def _env(devices: int) -> dict:
    import os

    # No persistent compilation cache: executables of a multi-process (gloo) topology must not
    # be shared with the suite's single-process ones.
    return {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_ENABLE_COMPILATION_CACHE": "false",
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_compute_what_one_process_computes(tmp_path):
    one = tmp_path / "one"
    single = subprocess.run(
        _command(one), cwd=REPO, env=_env(4), capture_output=True, text=True, timeout=300
    )
    assert single.returncode == 0, single.stderr[-3000:]
    two = tmp_path / "two"
    port = _free_port()
    procs = [
        subprocess.Popen(
            _command(
                two,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            cwd=REPO,
            env=_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    got, want = writers.read_metrics(two), writers.read_metrics(one)
    figures = [r for r in want if "kl" in r or "eval_kl" in r]
    got = [r for r in got if "kl" in r or "eval_kl" in r]
    assert [r["step"] for r in got] == [r["step"] for r in figures]
    for a, b in zip(got, figures, strict=True):
        for key, value in b.items():
            if key != "steps_per_second":
                assert a[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    params_two, meta = checkpoints.restore_params(str(two), "last")
    params_one, _ = checkpoints.restore_params(str(one), "last")
    assert meta["step"] == 12
    for a, b in zip(jax.tree.leaves(params_two), jax.tree.leaves(params_one), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # Only the primary process wrote the workdir's own files.
    assert "lock" in {p.name for p in two.iterdir()}


def test_process_rows_are_the_devices_rows():
    batch = {"tokens": np.arange(8)[:, None]}
    assert distributed.process_rows(batch) is batch  # one process: everything


def test_processes_that_disagree_are_refused_not_left_hanging(tmp_path):
    """Two processes given different configs (200 against 400 steps) both exit with status 2
    and a message naming the field they disagree on, instead of waiting for each other."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            _command(
                tmp_path / "run",
                f"--config.num_train_steps={steps}",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            cwd=REPO,
            env=_env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i, steps in enumerate((200, 400))
    ]
    try:
        outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:  # the hang this guards against: never leave them behind
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 2, err[-3000:]
        assert "disagree on its config (process 0 vs process 1): " in err
        assert "num_train_steps: 200 vs 400" in err


def test_the_watchdog_ends_a_process_that_waits_too_long():
    import threading
    import time

    fired = threading.Event()
    with distributed.Watchdog(0.2, on_timeout=lambda message: fired.set()) as dog:
        for _ in range(4):  # progress keeps it quiet
            time.sleep(0.1)
            dog.progress()
        assert not fired.is_set()
        assert fired.wait(timeout=5)  # then no progress: it fires
