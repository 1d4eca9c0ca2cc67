"""Checkpoints and exact resumption, SIGTERM, the NaN guard, and config validation."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import ptb  # configs/ptb.py, on the path by conftest
import pytest
import synthetic  # configs/synthetic.py
from conftest import REPO, run_python
from conftest import tiny_synthetic_config as shared_tiny_config
from test_input_pipeline import tiny_ptb_config

from vae_jax.core import objectives
from vae_jax.run import build, checkpoints, config_checks, guards, loop, workdirs, writers

# A tiny synthetic run through the real command line: ~2 ms a step on CPU.
TINY_FLAGS = [
    "--config.num_train_steps=1500",
    "--config.checkpoint_every_steps=100",
    "--config.log_every_steps=50",
    "--config.eval_every_steps=500",
    "--config.batch_size=8",
    "--config.eval_batch_size=4",
    "--config.data.vocab_size=12",
    "--config.data.length=4",
    "--config.model.enc_emb_dim=4",
    "--config.model.enc_hidden_dim=8",
    "--config.model.dec_emb_dim=4",
    "--config.model.dec_hidden_dim=8",
]


class Run:
    """A training subprocess whose output goes to a file (a pipe could fill up and block it)."""

    def __init__(self, workdir, *extra):
        cmd = [sys.executable, "-m", "vae_jax.main", "--config=configs/synthetic.py:cyclical"]
        cmd += [f"--workdir={workdir}", *TINY_FLAGS, *extra]
        self.log = f"{workdir}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        with open(self.log) as f:
            return f.read()

    def wait(self, timeout=300) -> int:
        return self.proc.wait(timeout=timeout)


def wait_for_checkpoint(workdir, run, timeout=120.0):
    ckpt_dir = os.path.join(workdir, "checkpoints")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir)):
            return
        assert run.proc.poll() is None, run.output()[-3000:]
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


def assert_same_params(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(x, y)  # bit for bit


def logged_steps(workdir):
    return [r["step"] for r in writers.read_metrics(workdir) if "rec" in r]


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    reference = Run(tmp_path / "ref")
    assert reference.wait() == 0, reference.output()[-3000:]

    rng = np.random.default_rng()
    for _ in range(5):  # a random kill point after the first checkpoint; retry if too late
        workdir = tmp_path / f"killed{_}"
        run = Run(workdir)
        wait_for_checkpoint(workdir, run)
        time.sleep(rng.uniform(0.0, 1.5))
        run.proc.send_signal(signal.SIGKILL)
        if run.wait() == -signal.SIGKILL:
            break
    else:
        pytest.fail("the run always finished before the kill")
    killed_at = checkpoints.Checkpointer(str(workdir), read_only=True).latest_step()
    assert killed_at < 1500

    resumed = Run(workdir)
    assert resumed.wait() == 0, resumed.output()[-3000:]
    assert f"Resuming {workdir} from step {killed_at}" in resumed.output()

    final, info = checkpoints.restore_params(str(workdir), "last")
    expected, _ = checkpoints.restore_params(str(tmp_path / "ref"), "last")
    assert info["step"] == 1500
    assert_same_params(final, expected)
    assert logged_steps(workdir) == list(range(50, 1501, 50))  # none missing, none twice


def test_sigterm_saves_and_exits_nonzero(tmp_path):
    workdir = tmp_path / "run"
    run = Run(workdir)
    wait_for_checkpoint(workdir, run)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() != 0
    err = run.output()
    assert "SIGTERM at step" in err and "run the same command to resume" in err
    saved = checkpoints.Checkpointer(str(workdir), read_only=True).latest_step()
    _, meta = checkpoints.restore_params(str(workdir), "last")
    assert meta["step"] == saved and f"SIGTERM at step {saved}:" in err


def test_interrupted_ptb_run_resumes_the_same_epoch_order(tmp_path):
    """Ctrl-C mid-epoch on a tiny corpus, then resume: the same parameters as one whole run."""
    config = tiny_ptb_config(tmp_path)
    config.data.bucket_lengths = (17,)  # one shape: fewer compilations
    whole = loop.train_and_evaluate(config, str(tmp_path / "whole"))
    steps_per_epoch = int(whole.step) // config.num_epochs
    stop_at = steps_per_epoch + 3  # inside the second epoch

    def interrupt(step, state):
        if step == stop_at:
            raise KeyboardInterrupt

    workdir = str(tmp_path / "split")
    with pytest.raises(guards.TrainingInterrupted, match=f"step {stop_at}"):
        loop.train_and_evaluate(config, workdir, callbacks=[interrupt])
    _, meta = checkpoints.restore_params(workdir, "last")
    assert (meta["epoch"], meta["position"]) == (1, 3)
    resumed = loop.train_and_evaluate(config, workdir)
    assert_same_params(resumed.params, whole.params)
    assert_same_params(resumed.opt_state, whole.opt_state)
    evals = [r["step"] for r in writers.read_metrics(workdir) if "valid_rec" in r]
    assert evals == [steps_per_epoch, 2 * steps_per_epoch]


def test_a_different_config_is_refused_unless_allowed(tmp_path):
    config = tiny_synthetic_config()
    loop.train_and_evaluate(config, str(tmp_path / "run"))
    config.model.latent_dim = 8
    config.batch_size = 4
    with pytest.raises(ValueError, match=r"model.latent_dim: 2 -> 8") as err:
        loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert "batch_size: 8 -> 4" in str(err.value) and "--allow_config_change" in str(err.value)


def test_a_field_added_since_the_run_started_is_no_change(tmp_path):
    """New code resumes an old run: a key its config.json lacks takes the current value,
    but a key the current config lacks (a renamed or dropped field) is still refused."""
    config = tiny_synthetic_config()
    workdirs.save_config(config, str(tmp_path))
    path = tmp_path / workdirs.CONFIG
    saved = json.loads(path.read_text())
    del saved["data_seed"], saved["model"]["latent_dim"]
    path.write_text(json.dumps(saved))
    workdirs.check_workdir_config(config, str(tmp_path), allow_config_change=False)

    saved["retired_field"] = 3
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"retired_field: 3 -> '<absent>'") as err:
        workdirs.check_workdir_config(config, str(tmp_path), allow_config_change=False)
    assert "latent_dim" not in str(err.value)


# ----------------------------------------------------------------------------- NaN guard


def poisoned(threshold):
    """β-ELBO, but NaN whenever β > threshold: non-finite loss and gradients on demand."""

    def objective(outputs, tokens, beta):
        total, sums = objectives.beta_elbo(outputs, tokens, beta)
        return jnp.where(beta > threshold, jnp.nan, total), sums

    return objective


def tiny_synthetic_config(variant="cyclical", steps=40):
    return shared_tiny_config(variant, steps, log_every=5, checkpoint_every_steps=5)


def guard_config(steps=40):
    config = tiny_synthetic_config("monotonic", steps)  # β rises 0 → 1 over the first 10 steps
    config.objective = "poisoned"
    return config


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path, monkeypatch):
    monkeypatch.setitem(objectives.OBJECTIVES, "poisoned", poisoned(0.45))
    config = guard_config()
    with pytest.raises(guards.NonFiniteError) as err:
        loop.train_and_evaluate(config, str(tmp_path))
    # β(t) = t/10 > 0.45 from step index 5 (the 6th step); 10 skipped steps end the run.
    message = str(err.value)
    assert "10 consecutive steps" in message and "at step 15" in message
    assert "beta=1" in message and "lr=0.001" in message
    # Step 10 was saved inside the run of skipped steps (its parameters are step 5's, but a
    # diverged run saves the diverged ones there): the last good one is step 5.
    assert "being skipped, is step 5 in" in message
    params5, _ = checkpoints.restore_params(str(tmp_path), "5")
    params10, meta = checkpoints.restore_params(str(tmp_path), "last")
    assert meta["step"] == 10
    assert_same_params(params5, params10)  # nothing non-finite was ever applied
    records = [r for r in writers.read_metrics(str(tmp_path)) if "nonfinite_steps" in r]
    assert [r["nonfinite_steps"] for r in records] == [0.0, 5.0, 5.0]


def test_isolated_nonfinite_steps_are_skipped_and_training_goes_on(tmp_path, monkeypatch):
    def objective(outputs, tokens, beta):  # β(t) = t/5 here: NaN at β = 0.2, 0.4 (steps 2, 3)
        total, sums = objectives.beta_elbo(outputs, tokens, beta)
        return jnp.where((beta > 0.15) & (beta < 0.45), jnp.nan, total), sums

    monkeypatch.setitem(objectives.OBJECTIVES, "poisoned", objective)
    state = loop.train_and_evaluate(guard_config(steps=20), str(tmp_path))
    assert int(state.step) == 20
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
    records = [r for r in writers.read_metrics(str(tmp_path)) if "nonfinite_steps" in r]
    assert [r["nonfinite_steps"] for r in records] == [2.0, 0.0, 0.0, 0.0]
    assert all(np.isfinite(r["rec"]) for r in records)  # skipped steps are not averaged in


# ----------------------------------------------------------------------------- config checks


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("batch_size", 0, r"config.batch_size=0: must be a positive integer"),
        ("model.latent_dim", -2, r"config.model.latent_dim=-2: must be a positive integer"),
        ("model.dec_dropout_in", 1.0, r"config.model.dec_dropout_in=1.0: must be in \[0, 1\)"),
        ("grad_clip_norm", 0.0, r"config.grad_clip_norm=0.0: must be > 0"),
        ("objective", "elbo2", r"config.objective='elbo2': must be one of \['beta_elbo'"),
        ("schedule_unit", "hours", r"config.schedule_unit='hours'"),
        ("beta_schedule.ratio", 1.5, r"config.beta_schedule: .*ratio=1.5"),
        ("beta_schedule.num_cycles", 0, r"config.beta_schedule: .*num_cycles=0"),
        ("data.eval_splits", ("valid", "dev"), r"config.data.eval_splits='dev'"),
        ("data.bucket_lengths", (16, 8), r"config.data.bucket_lengths"),
        ("data.name", "wiki", r"config.data.name='wiki'"),
        ("lr_schedule.init_value", -1e-3, r"config.lr_schedule: init_value=-0.001: must be"),
        ("lr_schedule.init_value", float("nan"), r"config.lr_schedule.init_value=nan: must be"),
        ("beta_schedule.start", -0.5, r"config.beta_schedule.start=-0.5: must be a finite KL"),
        ("loss_spike.factor", 0.5, r"config.loss_spike.factor=0.5: must be 0 \(off\) or"),
        ("loss_spike.action", "ignore", r"config.loss_spike.action='ignore'"),
        ("loss_spike.window", 0, r"config.loss_spike.window=0: must be a positive integer"),
        ("checkpoint_keep_period", -1, r"config.checkpoint_keep_period=-1"),
    ],
)
def test_bad_values_are_named_before_anything_runs(field, value, message, tmp_path):
    config = tiny_ptb_config(tmp_path)
    *parents, leaf = field.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError, match=message):
        config_checks.check_config(config, num_devices=1)


def test_batch_must_divide_over_devices_and_data_must_exist(tmp_path):
    config = tiny_ptb_config(tmp_path)
    with pytest.raises(ValueError, match=r"config.batch_size=8: must be a multiple of the 3"):
        config_checks.check_config(config, num_devices=3)
    config.data.data_dir = str(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"absent.*ptb.train.txt"):
        config_checks.check_config(config, num_devices=1)


def test_every_shipped_config_variant_passes(tmp_path):
    for variant in synthetic.VARIANTS:
        config_checks.check_config(synthetic.get_config(variant), num_devices=1)
    for variant in ptb.VARIANTS:
        config = ptb.get_config(variant)
        config.data.data_dir = tiny_ptb_config(tmp_path).data.data_dir
        config_checks.check_config(config, num_devices=1)


def test_unknown_keys_fail_on_the_command_line(tmp_path):
    out = run_python(
        ["-m", "vae_jax.main", "--config=configs/synthetic.py", f"--workdir={tmp_path}",
         "--config.modle.latent_dim=3"],
        timeout=120,
    )  # fmt: skip
    assert out.returncode != 0 and "modle" in out.stderr
    assert not os.path.exists(tmp_path / "metrics.jsonl")


# ----------------------------------------------------------------------------- divergence


def healthy_then(tmp_path, lr, callbacks=(), **loss_spike):
    """20 healthy steps (checkpoints every 2, the last 3 kept plus every 10th), then the same
    run continued to step 40 at learning rate ``lr`` (``callbacks`` called after each of its
    steps); returns (config, error or None)."""
    config = tiny_synthetic_config("cyclical", steps=20)
    config.update(checkpoint_every_steps=2, checkpoints_to_keep=3, checkpoint_keep_period=10)
    config.loss_spike.window = 10
    loop.train_and_evaluate(config, str(tmp_path))
    config.num_train_steps = 40
    config.lr_schedule.value = lr
    config.loss_spike.update(loss_spike)
    try:
        loop.train_and_evaluate(
            config, str(tmp_path), callbacks=callbacks, allow_config_change=True
        )
    except (guards.NonFiniteError, guards.LossSpikeError) as e:
        return config, e
    return config, None


def test_divergence_keeps_the_checkpoint_before_it_and_ends_with_an_inf_bound(tmp_path):
    # lr = 10: step 21 blows the parameters up; later steps are NaN (skipped) or finite with a
    # diverged model. The healthy checkpoints survive the rotation, and the final evaluation
    # reports an infinite perplexity bound.
    _, error = healthy_then(tmp_path, lr=10.0)
    assert error is None
    checkpointer = checkpoints.Checkpointer(str(tmp_path), read_only=True)
    steps = checkpointer.steps()
    assert 20 in steps and 10 in steps and steps[-1] == 40  # kept by the keep period
    good = {s: checkpointer.meta(s)["good"] for s in steps}
    assert good[10] and good[20] and not any(good[s] for s in steps if s > 20), good
    assert checkpointer.last_good_step() == 20
    params20, _ = checkpoints.restore_params(str(tmp_path), "20")
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(params20)) < 1.0
    final = [r for r in writers.read_metrics(str(tmp_path)) if "eval_ppl_bound" in r][-1]
    assert final["step"] == 40 and final["eval_ppl_bound"] == float("inf")


def test_a_nan_streak_names_the_last_good_checkpoint(tmp_path):
    _, error = healthy_then(tmp_path, lr=1e6)  # NaN from step 22 on
    assert isinstance(error, guards.NonFiniteError)
    assert "saved while no step was being skipped, is step 20 in" in str(error)


def test_loss_spike_guard_stop(tmp_path):
    # lr = 1: the loss of step 22 is 2.5 times the median of the healthy steps before it.
    _, error = healthy_then(tmp_path, lr=1.0, factor=1.5, action="stop")
    assert isinstance(error, guards.LossSpikeError), error
    message = str(error)
    assert "Loss spike at step 22" in message and "(1 such steps in a row" in message
    assert "config.loss_spike.factor=1.5" in message and "is step 20 in" in message


def test_loss_spike_guard_skip(tmp_path):
    # The same spike, skipped: training goes on to the end, the skipped steps counted.
    _, error = healthy_then(tmp_path, lr=1.0, factor=1.5, action="skip")
    assert error is None
    records = [r for r in writers.read_metrics(str(tmp_path)) if "spike_steps" in r]
    assert sum(r["spike_steps"] for r in records) >= 1 and records[-1]["step"] == 40


def kept_steps(kept):
    """A callback keeping each step's parameters and loss history in ``kept[step]``."""

    def keep(step, state):
        kept[step] = jax.device_get(
            jax.tree.map(lambda x: x[0], (state.params, state.loss_history))
        )

    return keep


def test_spike_guard_off_is_the_plain_step(tmp_path):
    """With loss_spike.factor = 0 every finite step is applied as computed: steps 21-40 at
    lr = 1 give, bit for bit, the parameters of a guard that is on but never fires (factor
    1e30), and the spike of step 22, which the guard at factor 1.5 skips, is applied."""
    off, never, guarded = {}, {}, {}
    for name, kept, loss_spike in [
        ("off", off, {}),
        ("never", never, {"factor": 1e30}),
        ("guarded", guarded, {"factor": 1.5, "action": "skip"}),
    ]:
        _, error = healthy_then(tmp_path / name, lr=1.0, callbacks=[kept_steps(kept)], **loss_spike)
        assert error is None
    assert sorted(off) == sorted(never) == sorted(guarded) == list(range(21, 41))
    for step in range(21, 41):
        assert_same_params(off[step], never[step])
    # Step 22 is the spike: the guarded run skips it, its parameters stay step 21's ...
    assert_same_params(off[21], guarded[21])
    assert_same_params(guarded[22][0], guarded[21][0])
    # ... and the run without the guard applies it: the step's loss, over 1.5 x the median of
    # the losses before it, enters the history (slot 21 % 10), and the parameters move.
    (params21, history21), (params22, history22) = off[21], off[22]
    slot = 21 % len(history21)
    assert history22[slot] > 1.5 * np.median(history21)
    np.testing.assert_array_equal(np.delete(history22, slot), np.delete(history21, slot))
    for other in (params21, guarded[22][0]):
        leaves = zip(jax.tree.leaves(params22), jax.tree.leaves(other), strict=True)
        assert any(not np.array_equal(a, b) for a, b in leaves)
    records = [r for r in writers.read_metrics(str(tmp_path / "off")) if "spike_steps" in r]
    assert sum(r["spike_steps"] for r in records) == 0 and records[-1]["step"] == 40


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("lr_schedule", -1e-3, r"config.lr_schedule.value=-0.001: must be a finite learning rate"),
        ("lr_schedule", 0.0, r"config.lr_schedule.value=0.0: must be a finite learning rate > 0"),
        ("beta_schedule", -1.0, r"config.beta_schedule.value=-1.0: must be a finite KL weight"),
    ],
)
def test_constant_schedules_refuse_values_that_turn_training_around(field, value, message):
    config = tiny_synthetic_config("constant")
    config[field].value = value
    with pytest.raises(ValueError, match=message):
        config_checks.check_config(config, num_devices=1)


def test_overflowing_bound_is_inf():
    from vae_jax.core import metrics

    figures = metrics.summarize({"rec": 1e6, "kl": 1.0, "tokens": 10.0, "sequences": 1.0})
    assert figures["ppl_bound"] == float("inf") and figures["rec"] == 1e6


def test_warmup_longer_than_the_run_warns(tmp_path, caplog):
    config = tiny_synthetic_config("monotonic", steps=20)
    config.beta_schedule.warmup_steps = 50
    with caplog.at_level("WARNING"):
        loop.train_and_evaluate(config, str(tmp_path))
    assert "warmup_steps (50 steps) is longer than the run (20 steps)" in caplog.text


# ----------------------------------------------------------------------------- damaged files


def interrupted_at(workdir, config, stop_at):
    def interrupt(step, state):
        if step == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(guards.TrainingInterrupted, match=f"step {stop_at}"):
        loop.train_and_evaluate(config, str(workdir), callbacks=[interrupt])


def largest_file(directory):
    files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
    return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_metadata"])
def test_a_corrupt_checkpoint_is_never_trusted(tmp_path, damage, caplog):
    """A checkpoint with 64 flipped bytes, a truncated file or no _METADATA is moved aside with
    a warning, the one before it is used, and the run still ends bit-identical."""
    config = shared_tiny_config("constant", steps=30, checkpoint_every_steps=5)
    whole = loop.train_and_evaluate(config, str(tmp_path / "whole"))
    workdir = tmp_path / "damaged"
    interrupted_at(workdir, config, stop_at=20)
    state_dir = workdir / "checkpoints" / "20" / "state"
    if damage == "flip":
        path = largest_file(state_dir)
        data = bytearray(open(path, "rb").read())
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
        open(path, "wb").write(bytes(data))
    elif damage == "truncate":
        path = largest_file(state_dir)
        os.truncate(path, os.path.getsize(path) // 2)
    else:
        os.remove(state_dir / "_METADATA")
    with caplog.at_level("WARNING"):
        resumed = loop.train_and_evaluate(config, str(workdir))
    assert "checkpoint 20 in" in caplog.text and "trying the one before" in caplog.text
    assert any(name.startswith("20-") for name in os.listdir(workdir / "checkpoints_corrupt"))
    assert_same_params(resumed.params, whole.params)
    assert_same_params(resumed.opt_state, whole.opt_state)
    assert logged_steps(str(workdir)) == logged_steps(str(tmp_path / "whole"))


def test_evaluation_never_reads_a_corrupt_checkpoint(tmp_path):
    config = shared_tiny_config("constant", steps=20, checkpoint_every_steps=5)
    loop.train_and_evaluate(config, str(tmp_path))
    os.remove(tmp_path / "checkpoints" / "20" / "state" / "_METADATA")
    with pytest.raises(checkpoints.CorruptCheckpointError, match="checkpoint 20 in .* cannot be"):
        checkpoints.restore_params(str(tmp_path), "20")
    _, info = checkpoints.restore_params(str(tmp_path), "last")  # the latest whole one
    assert info["step"] == 15


def test_a_second_process_on_a_workdir_is_refused_and_a_dead_ones_lock_taken_over(tmp_path):
    config = shared_tiny_config("constant", steps=10)
    with workdirs.WorkdirLock(str(tmp_path)):  # another training process holds the workdir
        with pytest.raises(workdirs.WorkdirLockedError, match=rf"in use by .*pid {os.getpid()} on"):
            loop.train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "metrics.jsonl").exists()
    # A lock file left by a process that died (kill -9 leaves its content, not its flock).
    (tmp_path / "lock").write_text("pid 999999 on host elsewhere\n")
    state = loop.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 10


def test_a_second_training_process_is_refused_at_once(tmp_path):
    workdir = tmp_path / "run"
    # Long enough never to finish while the second one starts, however loaded the machine.
    first = Run(workdir, "--config.num_train_steps=1000000")
    wait_for_checkpoint(workdir, first)
    second = run_python(["-m", "vae_jax.main", "--config=configs/synthetic.py:cyclical",
                         f"--workdir={workdir}", *TINY_FLAGS], timeout=120)  # fmt: skip
    first.proc.send_signal(signal.SIGTERM)
    first.wait()
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"in use by another training process (pid {first.proc.pid} on host" in second.stderr


def test_a_torn_last_metrics_record_is_dropped_on_resume(tmp_path, caplog):
    config = shared_tiny_config("constant", steps=30, log_every=5)
    interrupted_at(tmp_path, config, stop_at=22)
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 23, "rec": 3.1')  # the disk filled up mid-record
    with caplog.at_level("WARNING"):
        loop.train_and_evaluate(config, str(tmp_path))
    assert "metrics.jsonl:" in caplog.text and "dropping an incomplete last record" in caplog.text
    assert logged_steps(str(tmp_path)) == [5, 10, 15, 20, 25, 30]


def test_a_damaged_metrics_record_before_others_is_named(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 5}\n{"step": 1\n{"step": 10}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        workdirs.truncate_metrics(str(tmp_path), 10)


def test_a_workdir_is_bound_to_its_data(tmp_path):
    """A run is bound to its data: once the corpus changes (the same vocabulary size, other
    words behind the ids), resuming and `build.load_run` (what evaluate and generate read)
    raise DataMismatchError naming the fingerprints; the corpus restored, the run is read."""
    config = tiny_ptb_config(tmp_path)
    config.num_epochs = 1
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(config, workdir)
    bound = workdirs.load_config(workdir)
    record = json.loads((tmp_path / "run" / "data.json").read_text())
    assert record["vocab_size"] == 24 and len(record["fingerprint"]) == 64
    # The same corpus again, its words reordered: the same vocabulary size, other ids.
    source = tmp_path / "ptb" / "ptb.train.txt"
    lines = source.read_text().splitlines()
    source.write_text("\n".join(reversed(lines)) + "\n")
    message = r"trained on other data than config.data gives now .*run fingerprint [0-9a-f]{64}"
    with pytest.raises(workdirs.DataMismatchError, match=message):
        loop.train_and_evaluate(config, workdir)  # resume
    with pytest.raises(workdirs.DataMismatchError, match="fingerprint"):
        build.load_run(workdir, "last")  # what evaluate and generate read
    # The old build is still in the cache (another fingerprint, another directory).
    assert len([d for d in os.listdir(tmp_path / "tfds" / "vae_text") if d.startswith("ptb")]) == 2
    source.write_text("\n".join(lines) + "\n")  # the run's own data back: accepted again
    config_back, *_ = build.load_run(workdir, "last")
    assert config_back.to_dict() == bound.to_dict()


def test_a_checkpoint_without_a_digest_is_refused_not_moved(tmp_path):
    """A checkpoint from before digests is not damaged: resuming refuses it (naming it)
    instead of moving it aside and silently starting again from step 0."""
    config = shared_tiny_config("constant", steps=5, checkpoint_every_steps=5)
    loop.train_and_evaluate(config, str(tmp_path))
    checkpointer = checkpoints.Checkpointer(str(tmp_path))
    state, meta = checkpointer.restore(5)
    meta = {k: v for k, v in meta.items() if k != checkpoints.STATE_DIGEST}
    checkpointer._manager.delete(5)
    checkpointer._manager.save(  # as an older vae_jax wrote it: no digest in the meta
        5,
        args=checkpoints.ocp.args.Composite(
            state=checkpoints.ocp.args.StandardSave(state),
            meta=checkpoints.ocp.args.JsonSave(meta),
        ),
    )
    checkpointer.wait()
    checkpointer.close()
    with pytest.raises(checkpoints.UnverifiedCheckpointError, match="checkpoint 5 in .* older"):
        loop.train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "checkpoints_corrupt").exists()


def test_an_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    """`files.write_atomic` (config.json, data.json, metrics truncation, checkpoint info, the
    sweep's markers): a write that fails before its rename keeps the old contents, no temporary."""
    from vae_jax.run import files

    path = str(tmp_path / "config.json")
    files.write_atomic(path, '{"seed": 0}')
    files.write_atomic(path, b'{"seed": 1}')

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        files.write_atomic(path, '{"seed": 2}')
    with open(path, encoding="utf-8") as f:
        assert f.read() == '{"seed": 1}'
    assert os.listdir(tmp_path) == ["config.json"]


# ----------------------------------------------------------------------------- second round


def damage_every_checkpoint(workdir):
    for step in os.listdir(workdir / "checkpoints"):
        os.remove(workdir / "checkpoints" / step / "state" / "_METADATA")


def test_a_rerun_over_damaged_checkpoints_refuses_to_overwrite_the_history(tmp_path):
    """Every checkpoint damaged: a rerun moves them aside and refuses with HistoryAtRiskError
    (naming the damaged and the intact files) rather than start again over metrics.jsonl;
    --start_over moves the history into superseded-*/ and trains from step 0."""
    config = shared_tiny_config("constant", steps=20, log_every=5, checkpoint_every_steps=5)
    loop.train_and_evaluate(config, str(tmp_path))
    damage_every_checkpoint(tmp_path)
    message = r"no usable checkpoint .*damaged: .*checkpoints_corrupt/20-.*intact: .*metrics.jsonl"
    with pytest.raises(workdirs.HistoryAtRiskError, match=message) as err:
        loop.train_and_evaluate(config, str(tmp_path))
    assert "--start_over" in str(err.value)
    assert logged_steps(str(tmp_path)) == [5, 10, 15, 20]  # the history is untouched
    with pytest.raises(workdirs.HistoryAtRiskError, match=r"intact: .*metrics.jsonl"):
        loop.train_and_evaluate(config, str(tmp_path))  # and again, the damaged moved aside
    state = loop.train_and_evaluate(config, str(tmp_path), start_over=True)
    assert int(state.step) == 20 and logged_steps(str(tmp_path)) == [5, 10, 15, 20]
    (superseded,) = [n for n in os.listdir(tmp_path) if n.startswith("superseded-")]
    assert (tmp_path / superseded / "metrics.jsonl").exists()


def test_a_run_killed_before_its_first_checkpoint_starts_again_unasked(tmp_path):
    config = shared_tiny_config("constant", steps=20, log_every=5, checkpoint_every_steps=10)
    (tmp_path / "metrics.jsonl").write_text('{"step": 5, "rec": 1.0}\n')
    state = loop.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 20


def flip_bytes(path, count=8):
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    open(path, "wb").write(bytes(data))


def test_best_carries_a_digest_checked_on_read(tmp_path, caplog):
    """best/ carries a digest: flipped bytes in best/params.msgpack, or a damaged
    best/info.json, are a CorruptCheckpointError from `restore_params` (what evaluate,
    generate and init_from read), `load` and `best_value`; a best/ without a digest is read
    with a warning."""
    params = {"dec": {"w": np.arange(64, dtype=np.float32)}, "enc": {"b": np.ones(3, np.float32)}}
    checkpoints.save(str(tmp_path / "best"), params, {"step": 3, "valid": {"ppl_bound": 9.0}})
    read, info = checkpoints.restore_params(str(tmp_path), "best")
    assert_same_params(read, params) and info["step"] == 3
    assert workdirs.best_value(str(tmp_path)) == 9.0
    flip_bytes(tmp_path / "best" / "params.msgpack")
    with pytest.raises(checkpoints.CorruptCheckpointError, match=r"best/params.msgpack does not"):
        checkpoints.restore_params(str(tmp_path), "best")
    with pytest.raises(checkpoints.CorruptCheckpointError, match=r"best/params.msgpack does not"):
        checkpoints.load(str(tmp_path / "best"), params)
    (tmp_path / "best" / "info.json").write_text('{"step": 3, "valid": {"ppl_bo')
    with pytest.raises(checkpoints.CorruptCheckpointError, match=r"best/info.json cannot be read"):
        workdirs.best_value(str(tmp_path))
    # A best/ from before digests is still read, with a warning.
    (tmp_path / "best" / "params.msgpack").write_bytes(checkpoints.serialization.to_bytes(params))
    (tmp_path / "best" / "info.json").write_text('{"step": 3}')
    with caplog.at_level("WARNING"):
        read, _ = checkpoints.restore_params(str(tmp_path), "best")
    assert_same_params(read, params) and "unverified" in caplog.text


def test_a_diverging_population_member_is_frozen_and_the_others_go_on(tmp_path):
    """Member 1 at lr=1e30 diverges and is frozen (recorded, its parameters finite, frozen
    still after a resume) while member 0 trains to the end as its single run does."""
    from vae_jax.run import population

    config = shared_tiny_config("constant", steps=30, log_every=5, checkpoint_every_steps=10)
    config.update(population_size=2, population_fields=(("lr_schedule.value", (1e-3, 1e30)),))
    state = loop.train_and_evaluate(config, str(tmp_path / "pop"))  # ends normally
    marker = json.loads((tmp_path / "pop" / "members" / "1" / "diverged.json").read_text())
    assert marker["diverged_at_step"] < marker["frozen_at_step"] <= 30
    assert "Population member 1:" in marker["reason"]
    assert not (tmp_path / "pop" / "members" / "0" / "diverged.json").exists()
    records = writers.read_metrics(population.member_dir(str(tmp_path / "pop"), 1))
    assert [r for r in records if "beta" in r][-1].get("diverged") == 1.0
    frozen_params = jax.tree.map(lambda x: np.asarray(x)[1], state.params)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(frozen_params))
    meta = checkpoints.Checkpointer(str(tmp_path / "pop"), read_only=True).meta(30)
    assert meta["diverged"] == {"1": [marker["diverged_at_step"], marker["frozen_at_step"]]}
    assert meta["good"]  # the frozen member does not taint the others' checkpoints
    # Member 0 trained on as its single run does.
    single = shared_tiny_config("constant", steps=30, log_every=5, seed=0, data_seed=0)
    alone = loop.train_and_evaluate(single, str(tmp_path / "single"))
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(alone.params), strict=True):
        np.testing.assert_allclose(np.asarray(a)[0], b, rtol=1e-5, atol=1e-6)
    got = [r for r in writers.read_metrics(population.member_dir(str(tmp_path / "pop"), 0))]
    last = [r for r in got if "beta" in r][-1]
    assert "diverged" not in last and np.isfinite(last["rec"]) and last["step"] == 30
    # A resume keeps the member frozen (its step is not applied again).
    config.num_train_steps = 40
    resumed = loop.train_and_evaluate(config, str(tmp_path / "pop"), allow_config_change=True)
    meta = checkpoints.Checkpointer(str(tmp_path / "pop"), read_only=True).meta(40)
    assert meta["diverged"] == {"1": [marker["diverged_at_step"], marker["frozen_at_step"]]}
    assert_same_params(jax.tree.map(lambda x: np.asarray(x)[1], resumed.params), frozen_params)


def parsed_config(*overrides, variant="cyclical"):
    """configs/synthetic.py:<variant> with ``--config.<field>=…`` overrides, as main parses
    them (config_flags reads the overrides from the argv it is given)."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["main", f"--config=configs/synthetic.py:{variant}", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        fv(argv)
    finally:
        os.chdir(cwd)
    config_checks.check_reference_overrides(
        fv.config, config_flags.get_override_values(fv["config"])
    )
    return fv.config


@pytest.mark.parametrize(
    "overrides, steps, cycle",
    [
        # The cycle's override sets the cycle's length only, not the run's.
        (
            ["--config.num_train_steps=200", "--config.beta_schedule.total_steps=100000"],
            200,
            100000,
        ),
        # Either order: the cycle keeps its own override after the run's length is set.
        (["--config.beta_schedule.total_steps=100", "--config.num_train_steps=200"], 200, 100),
        (["--config.beta_schedule.total_steps=100"], 40000, 100),
        (["--config.num_train_steps=200"], 200, 200),  # the cycle follows the run's length
    ],
)
def test_a_reference_field_overridden_alone_does_what_the_flags_say(overrides, steps, cycle):
    config = parsed_config(*overrides)
    assert (config.num_train_steps, config.beta_schedule.total_steps) == (steps, cycle)


def test_reference_fields_are_named():
    followers = config_checks.references(parsed_config())
    assert followers["beta_schedule.total_steps"].startswith("num_train_steps")
    followers = config_checks.references(parsed_config(variant="monotonic"))
    assert followers == {"beta_schedule.warmup_steps": "num_train_steps (floordiv [4])"}


def test_fields_sharing_one_reference_cannot_be_set_apart():
    import ml_collections

    config = ml_collections.ConfigDict({"steps": 10, "schedule": {"total": 0}})
    config.schedule.total = config.get_ref("steps")
    assert config_checks.references(config) == {"schedule.total": "steps"}
    with pytest.raises(ValueError, match=r"--config.schedule.total: config.schedule.total and"):
        config_checks.check_reference_overrides(config, {"schedule.total": 5})
    config_checks.check_reference_overrides(config, {"schedule.total": 5, "steps": 5})
    with pytest.raises(ValueError, match=r"one reference in the config file"):
        config_checks.check_reference_overrides(config, {"schedule.total": 5, "steps": 6})


@contextlib.contextmanager
def read_only(directory):
    """``directory`` made read-only for this process: its modes where that binds (not root),
    else a read-only bind mount of it over itself (root, as in some CI containers)."""
    directory = str(directory)
    if os.geteuid() != 0:
        modes = {}
        for root, _, names in os.walk(directory):
            for path in [root] + [os.path.join(root, n) for n in names]:
                modes[path] = os.stat(path).st_mode
                os.chmod(path, modes[path] & ~0o222)
        try:
            yield
        finally:
            for path, mode in modes.items():
                os.chmod(path, mode)
        return
    bind = ["mount", "--bind", directory, directory]
    if subprocess.run(bind, capture_output=True).returncode != 0:
        pytest.skip("root, and no bind mount here to make a directory read-only")
    try:
        remount = ["mount", "-o", "remount,ro,bind", directory]
        if subprocess.run(remount, capture_output=True).returncode != 0:
            pytest.skip("root, and no read-only remount here")
        yield
    finally:
        subprocess.run(["umount", directory], check=True)


def test_evaluate_checks_where_it_writes_before_computing(tmp_path, monkeypatch):
    """evaluate checks where it writes before computing: an --out it cannot write in, or a
    read-only workdir without --out, is a NotWritableError naming the flag; with a writable
    --out, a read-only workdir is evaluated."""
    from vae_jax import evaluate
    from vae_jax.run import files

    workdir = tmp_path / "run"
    loop.train_and_evaluate(shared_tiny_config("constant", steps=10), str(workdir))

    def computed(*args, **kwargs):
        raise AssertionError("evaluated before checking where the results go")

    monkeypatch.setattr(evaluate, "evaluate_split", computed)
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "results"
    with pytest.raises(files.NotWritableError, match=rf"--out={out}: cannot write in"):
        evaluate.main([f"--workdir={workdir}", f"--out={out}"])
    with read_only(workdir):
        with pytest.raises(files.NotWritableError, match=r"--workdir=.*pass --out=.*Read-only"):
            evaluate.main([f"--workdir={workdir}"])
    monkeypatch.undo()
    flags = ["--num_importance_samples=2", "--num_prior_samples=50"]
    with read_only(workdir):
        evaluate.main([f"--workdir={workdir}", f"--out={tmp_path / 'out'}", *flags])
    assert json.loads((tmp_path / "out" / "eval_eval.json").read_text())["split"] == "eval"


def test_a_read_only_tfds_cache_holding_a_complete_build_is_read(tmp_path):
    """A read-only TFDS cache holding a complete build is read; a corpus that needs another
    build there is a ValueError saying the cache is read-only."""

    config = tiny_ptb_config(tmp_path)
    built = build.get_data(config)
    with read_only(tmp_path / "tfds"):
        again = build.get_data(config)
        assert again.info["fingerprint"] == built.info["fingerprint"]
        source = tmp_path / "ptb" / "ptb.train.txt"
        source.write_text(source.read_text() + "a new sentence\n")  # another build needed
        with pytest.raises(ValueError, match=r"ptb: no complete build .* cache is read-only"):
            build.get_data(config)


def test_files_a_run_writes_are_never_written_through_a_link(tmp_path):
    """No file a run writes goes through a symbolic link: a `lock` link is refused, a
    `metrics.jsonl` or `eval_*.json` link is replaced by the file itself, a planted temporary
    fails the write; the links' target is never changed."""
    from vae_jax.run import files

    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    workdir = tmp_path / "run"
    workdir.mkdir()
    os.symlink(target, workdir / "lock")
    with pytest.raises(ValueError, match=r"run/lock is a symbolic link"):
        loop.train_and_evaluate(shared_tiny_config("constant", steps=5), str(workdir))
    os.remove(workdir / "lock")
    os.symlink(target, workdir / "metrics.jsonl")  # replaced by the run's own file
    loop.train_and_evaluate(shared_tiny_config("constant", steps=5), str(workdir))
    assert target.read_text() == "keep me\n" and not os.path.islink(workdir / "metrics.jsonl")
    with pytest.raises(ValueError, match=r"metrics.jsonl is a symbolic link"):
        os.remove(workdir / "metrics.jsonl")
        os.symlink(target, workdir / "metrics.jsonl")
        writers.MetricWriter(str(workdir), tensorboard=False)
    assert target.read_text() == "keep me\n"
    os.symlink(target, workdir / "eval_test.json")
    files.write_atomic(str(workdir / "eval_test.json"), "{}")  # how eval_*.json is written
    assert target.read_text() == "keep me\n" and not os.path.islink(workdir / "eval_test.json")
    os.symlink(target, f"{workdir / 'config.json'}.tmp-{os.getpid()}")  # a planted temporary
    with pytest.raises(OSError):
        files.write_atomic(str(workdir / "config.json"), "{}")
    assert target.read_text() == "keep me\n"


def test_an_unusable_workdir_is_one_line_naming_it(tmp_path):
    """A run name over 255 bytes, or a read-only workdir (its lock), is a NotWritableError
    whose one line names the workdir or its lock file."""
    from vae_jax.run import files

    config = shared_tiny_config("constant", steps=5)
    long_name = tmp_path / ("x" * 256)
    with pytest.raises(files.NotWritableError, match=r"--workdir=.*xxx: cannot create it"):
        loop.train_and_evaluate(config, str(long_name))
    workdir = tmp_path / "run"
    workdir.mkdir()
    with read_only(workdir):
        with pytest.raises(files.NotWritableError, match=r"run/lock: cannot open the workdir's"):
            loop.train_and_evaluate(config, str(workdir))


def test_a_silent_divergence_keeps_the_checkpoint_before_it(tmp_path):
    """At lr=3 every loss stays finite and no step is skipped, but the loss jumps past
    `steps.SUSPECT_FACTOR` x the recent median: the checkpoint before it, step 20, is kept
    through the rotation (no keep period here), and still after a resume."""
    config = tiny_synthetic_config("cyclical", steps=20)
    config.update(checkpoint_every_steps=2, checkpoints_to_keep=3, checkpoint_keep_period=0)
    config.loss_spike.window = 10
    loop.train_and_evaluate(config, str(tmp_path))
    config.num_train_steps, config.lr_schedule.value = 40, 3.0
    loop.train_and_evaluate(config, str(tmp_path), allow_config_change=True)
    checkpointer = checkpoints.Checkpointer(str(tmp_path), read_only=True)
    assert checkpointer.steps() == [20, 36, 38, 40]
    assert checkpointer.meta(40)["protected"] == [20]
    records = [r for r in writers.read_metrics(str(tmp_path)) if "nonfinite_steps" in r]
    assert sum(r["nonfinite_steps"] + r["spike_steps"] for r in records) == 0  # all applied
    config.num_train_steps = 50  # a resume keeps it protected (the meta names it)
    loop.train_and_evaluate(config, str(tmp_path), allow_config_change=True)
    assert checkpoints.Checkpointer(str(tmp_path), read_only=True).steps() == [20, 46, 48, 50]
