"""Sweeps (`vae_jax.run.sweep`; the command `vae_jax.sweep`): the helpers, the plan (packing
seeds into populations), a run."""

import json
import os
import textwrap

import pytest

from vae_jax import sweep as sweep_cli
from vae_jax.run import build, population, sweep, writers

TINY = {  # configs/synthetic.py shrunk as conftest.tiny_synthetic_config does
    "num_train_steps": 20, "log_every_steps": 10, "eval_every_steps": 20, "batch_size": 8,
    "eval_batch_size": 4, "data.vocab_size": 12, "data.length": 4, "model.enc_emb_dim": 4,
    "model.enc_hidden_dim": 8, "model.dec_emb_dim": 4, "model.dec_hidden_dim": 8,
}  # fmt: skip


def test_product_and_zip():
    runs = sweep.product([sweep.sweep("a", [1, 2]), sweep.sweep("b", ["x", "y"])])
    assert runs == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
    zipped = sweep.zip_([sweep.sweep("a", [1, 2]), sweep.sweep("b", [3, 4])])
    assert zipped == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
    with pytest.raises(ValueError, match="different lengths"):
        sweep.zip_([sweep.sweep("a", [1, 2]), sweep.sweep("b", [3])])
    with pytest.raises(ValueError, match="set by two sweeps"):
        sweep.product([sweep.sweep("a", [1]), sweep.sweep("a", [2])])


def test_plan_packs_consecutive_seeds_only():
    runs = sweep.product(
        [sweep.sweep("config", ["c.py:x", "c.py:y"]), sweep.sweep("seed", [0, 1, 2])]
    )
    runs.append({"config": "c.py:z", "seed": 0})
    runs += [{"config": "c.py:w", "seed": s} for s in (0, 2)]  # not consecutive
    jobs = sweep.plan(runs)
    assert [(j.name, len(j.members)) for j in jobs] == [
        ("c-x.seed-0-2", 3), ("c-y.seed-0-2", 3), ("c-z.seed-0", 1),
        ("c-w.seed-0", 1), ("c-w.seed-2", 1),
    ]  # fmt: skip
    assert jobs[0].overrides == {"seed": 0, "population_size": 3}
    assert jobs[0].members == ["c-x.seed-0", "c-x.seed-1", "c-x.seed-2"]
    # Unpacked, every run is a job, in the sweep's order (seed 0 of each config first here).
    seeds_first = sweep.product(
        [sweep.sweep("seed", [0, 1]), sweep.sweep("config", ["c.py:x", "c.py:y"])]
    )
    assert [j.name for j in sweep.plan(seeds_first, pack=False)] == [
        "c-x.seed-0", "c-y.seed-0", "c-x.seed-1", "c-y.seed-1",
    ]  # fmt: skip
    assert len(sweep.plan(runs, pack=False)) == 9
    # --only picks jobs of the same plan: a population whole, a run alone when unpacked.
    picked = sweep.plan(runs, only=["c-x.seed-2", "c-w.*"])
    assert [j.name for j in picked] == ["c-x.seed-0-2", "c-w.seed-0", "c-w.seed-2"]
    assert picked[0].members == jobs[0].members
    assert [j.name for j in sweep.plan(runs, pack=False, only=["*.seed-1"])] == [
        "c-x.seed-1", "c-y.seed-1",
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"--only=c-q\.\*: matches none of the runs \['c-w"):
        sweep.plan(runs, only=["c-q.*"])


def test_sweep_runs_resumes_and_skips(tmp_path, monkeypatch):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.chdir(repo)
    sweep_file = tmp_path / "tiny.py"
    sweep_file.write_text(
        textwrap.dedent(
            f"""
            from vae_jax.run.sweep import product, sweep
            TINY = {TINY!r}
            def get_sweep():
                runs = product([sweep("config", ["configs/synthetic.py:cyclical"]),
                                sweep("seed", [0, 1])])
                runs.append({{"config": "configs/synthetic.py:constant", "seed": 5}})
                return [{{**run, **TINY}} for run in runs]
            """
        )
    )
    workdir = str(tmp_path / "sweep")
    assert sweep_cli.main([f"--sweep={sweep_file}", f"--workdir={workdir}", "--dry_run"]) == {}
    assert not os.path.exists(workdir)
    status = sweep_cli.main([f"--sweep={sweep_file}", f"--workdir={workdir}"])
    assert sorted(status.values()) == [0, 0] and len(status) == 2
    names = sorted(n for n in os.listdir(workdir) if not n.endswith(".log"))
    pop = [n for n in names if n.endswith("seed-0-1")][0]
    for k, run in enumerate(n for n in names if ".seed-" in n and n != pop and "cyclical" in n):
        # Each run of a population reads as a run directory of its own.
        assert os.path.realpath(os.path.join(workdir, run)) == os.path.realpath(
            population.member_dir(os.path.join(workdir, pop), k)
        )
        with open(os.path.join(workdir, run, "config.json")) as f:
            assert json.load(f)["seed"] == k
        assert writers.read_metrics(os.path.join(workdir, run))[-1]["step"] == 20
    again = sweep_cli.main([f"--sweep={sweep_file}", f"--workdir={workdir}"])
    assert again == status  # skipped as done: nothing ran (no new records)
    assert writers.read_metrics(os.path.join(workdir, "synthetic-constant.seed-5"))

    # --evaluate scores every run of the finished sweep, a population's members each on their
    # own, and a rerun with the same flags scores none again.
    flags = "--num_importance_samples=2 --num_prior_samples=16 --checkpoint=last"
    scored = sweep_cli.main(
        [f"--sweep={sweep_file}", f"--workdir={workdir}", f"--evaluate={flags}"]
    )
    runs = [n for n in names if ".seed-" in n and n != pop]
    assert sorted(scored) == sorted([*status, *(f"{r}:evaluate" for r in runs)])
    assert not any(scored.values())

    def eval_file(run):
        (name,) = [p for p in os.listdir(os.path.join(workdir, run)) if p.startswith("eval_")]
        return os.path.join(workdir, run, name)

    for run in runs:
        with open(eval_file(run)) as f:
            assert json.load(f)["checkpoint_info"]["run_dir"].endswith(
                run if "constant" in run else os.path.join("members", run[-1])
            )
    stamps = {run: os.stat(eval_file(run)).st_mtime_ns for run in runs}
    assert sweep_cli.main([f"--sweep={sweep_file}", f"--workdir={workdir}", f"--evaluate={flags}"])
    assert {run: os.stat(eval_file(run)).st_mtime_ns for run in runs} == stamps


@pytest.mark.parametrize(
    "body, message",
    [
        (
            "def get_sweep():\n    runs = [{'config': 'c.py:x'}]\n",
            r"get_sweep\(\) returned NoneType",
        ),
        (
            "def get_sweep():\n    return [{'config': 'c.py:x'}][3]\n",
            r"s.py:2 raised IndexError in",
        ),
        ("import nowhere_to_be_found\n", r"s.py:1 raised ModuleNotFoundError loading it"),
        ("def get_sweep(:\n", r"s.py:1 raised SyntaxError loading it"),
    ],
)
def test_a_broken_sweep_file_is_one_line_naming_it(tmp_path, body, message):
    """A sweep file that does not load, whose get_sweep() returns None or raises, is refused
    with a ValueError: one line naming the file (and line) and what went wrong."""
    (tmp_path / "s.py").write_text(body)
    with pytest.raises(ValueError, match=message):
        sweep.load_sweep(str(tmp_path / "s.py"))


def test_a_run_name_too_long_for_a_file_name_is_refused_by_the_dry_run(tmp_path, capsys):
    """A run name too long for a file name is refused by --dry_run itself, with a ValueError
    naming the run and its length in bytes."""
    (tmp_path / "s.py").write_text(
        "def get_sweep():\n"
        "    return [{'config': 'c.py:x', 'init_from': f'runs/{c}' * 40} for c in 'ab']\n"
    )
    with pytest.raises(ValueError, match=r"run name c-x.init_from-runs_a.*is 2\d\d bytes"):
        sweep_cli.main([f"--sweep={tmp_path / 's.py'}", f"--workdir={tmp_path}", "--dry_run"])


class FakeTraining:
    """`subprocess.Popen` for `sweep.execute`: records each command and makes its workdir,
    as a training that finished at once would."""

    commands: list = []

    def __init__(self, command, **kwargs):
        FakeTraining.commands.append(command)
        workdir = next(a.split("=", 1)[1] for a in command if a.startswith("--workdir="))
        os.makedirs(workdir, exist_ok=True)
        self.returncode = 0

    def poll(self):
        return 0


def sweep_with(tmp_path, steps, seeds):
    path = tmp_path / "s.py"
    path.write_text(
        "def get_sweep():\n"
        f"    return [{{'config': 'c.py:x', 'num_train_steps': {steps}, 'seed': s}}\n"
        f"            for s in {list(seeds)!r}]\n"
    )
    return [f"--sweep={path}", f"--workdir={tmp_path / 'w'}"]


def test_a_finished_job_the_sweep_has_changed_since_is_reported_not_kept_silently(
    tmp_path, monkeypatch
):
    """A finished job whose settings in the sweep file have changed since (a longer
    num_train_steps) is reported as no longer matching and kept; --rerun_changed resumes it
    with the new settings (--allow_config_change), and it is done after that."""
    monkeypatch.setattr(sweep.subprocess, "Popen", FakeTraining)
    FakeTraining.commands = []
    sweep_cli.main(sweep_with(tmp_path, 20, [0]))
    assert len(FakeTraining.commands) == 1
    with pytest.raises(RuntimeError, match=r"no longer match the sweep: \['c-x.seed-0'\]"):
        sweep_cli.main(sweep_with(tmp_path, 40, [0]))
    assert len(FakeTraining.commands) == 1  # kept, not retrained
    sweep_cli.main([*sweep_with(tmp_path, 40, [0]), "--rerun_changed"])
    assert "--config.num_train_steps=40" in FakeTraining.commands[-1]
    assert "--allow_config_change" in FakeTraining.commands[-1]
    assert sweep_cli.main(sweep_with(tmp_path, 40, [0])) == {"c-x.seed-0": 0}  # done now


def test_a_population_that_grows_trains_only_its_new_members(tmp_path, monkeypatch):
    """Seed 2 added to a finished population of seeds 0-1 trains seed 2 alone (a single run);
    seeds 0 and 1 keep their population and their links into it."""
    monkeypatch.setattr(sweep.subprocess, "Popen", FakeTraining)
    FakeTraining.commands = []
    sweep_cli.main(sweep_with(tmp_path, 20, [0, 1]))
    assert os.readlink(tmp_path / "w" / "c-x.seed-0") == os.path.join(
        "c-x.seed-0-1", "members", "0"
    )
    status = sweep_cli.main(sweep_with(tmp_path, 20, [0, 1, 2]))
    (command,) = FakeTraining.commands[1:]
    assert f"--workdir={tmp_path / 'w' / 'c-x.seed-2'}" in command
    assert "--config.seed=2" in command and "--config.data_seed=0" in command
    assert not any(a.startswith("--config.population_size") for a in command)
    assert status == {"c-x.seed-0-1": 0, "c-x.seed-2": 0}
    assert os.readlink(tmp_path / "w" / "c-x.seed-1") == os.path.join(
        "c-x.seed-0-1", "members", "1"
    )


def test_an_orphaned_training_is_waited_for_and_its_job_recorded(tmp_path, monkeypatch, capsys):
    """A training left behind by a killed runner, still holding a job's workdir lock, is
    waited for (the rerun says so), then the job runs and is recorded as done."""
    import subprocess
    import sys

    job_dir = tmp_path / "w" / "c-x.seed-0"
    job_dir.mkdir(parents=True)
    orphan = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from vae_jax.run import workdirs\n"
         f"with workdirs.WorkdirLock({str(job_dir)!r}):\n"
         " print('held', flush=True); time.sleep(3)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert orphan.stdout.readline() == "held\n"
    monkeypatch.setattr(sweep.subprocess, "Popen", FakeTraining)
    FakeTraining.commands = []
    assert sweep_cli.main(sweep_with(tmp_path, 20, [0])) == {"c-x.seed-0": 0}
    out = capsys.readouterr().out
    assert f"waiting: c-x.seed-0: its workdir is held by pid {orphan.pid}" in out
    assert out.index("waiting:") < out.index("start: c-x.seed-0")
    assert os.path.exists(job_dir / sweep.DONE)
    assert orphan.wait(timeout=10) == 0


def test_a_runner_killed_takes_its_training_with_it(tmp_path):
    """kill -9 of the runner: its child gets SIGTERM (it saves a checkpoint and exits)."""
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import sys\nfrom vae_jax.run import sweep\n"
        "class Job(sweep.Job):\n"
        "    def command(self, workdir, allow_config_change=False):\n"
        "        return [sys.executable, '-c', 'import time; time.sleep(60)']\n"
        f"sweep.execute([Job('j', 'c.py', {{}}, ['j'])], {str(tmp_path)!r})\n"
    )
    runner = subprocess.Popen([sys.executable, "-c", script])
    children = f"/proc/{runner.pid}/task/{runner.pid}/children"
    deadline = time.time() + 60
    while time.time() < deadline and not (os.path.exists(children) and open(children).read()):
        time.sleep(0.05)
    (child,) = [int(p) for p in open(children).read().split()]
    while (
        time.time() < deadline and b"sleep(60)" not in open(f"/proc/{child}/cmdline", "rb").read()
    ):
        time.sleep(0.05)  # until it runs the training's program (after the fork's set-up)
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    deadline = time.time() + 10
    while time.time() < deadline and os.path.exists(f"/proc/{child}"):
        if open(f"/proc/{child}/stat").read().split()[2] == "Z":
            break  # ended, not yet reaped (its parent, init, will)
        time.sleep(0.05)
    alive = (
        os.path.exists(f"/proc/{child}") and open(f"/proc/{child}/stat").read().split()[2] != "Z"
    )
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive, "the training outlived its runner"


def _tiny_sweep_file(tmp_path):
    path = tmp_path / "tiny_tpu.py"
    path.write_text(
        "from vae_jax.run.sweep import product, sweep\n"
        "def get_sweep():\n"
        "    return product([sweep('config', ['configs/ptb.py:cyclical']),\n"
        "                    sweep('seed', [0, 1])])\n"
    )
    return path


def test_tpu_dry_run_installs_passes_data_and_names_zone_and_project(tmp_path, capsys):
    argv = [f"--sweep={_tiny_sweep_file(tmp_path)}", "--workdir=/mnt/shared/t", "--dry_run"]
    with pytest.raises(ValueError, match=r"--tpu=pod: pass --zone="):
        sweep_cli.main([*argv, "--tpu=pod"])
    with pytest.raises(ValueError, match=r"--workdir=rel: with --tpu, an absolute path"):
        sweep_cli.main([*argv[:1], "--workdir=rel", "--dry_run", "--tpu=pod", "--zone=z"])
    capsys.readouterr()
    sweep_cli.main([*argv, "--tpu=pod", "--zone=europe-west4-a", "--project=proj",
                "--tpu_data_dir=/data/corpora"])  # fmt: skip
    out = capsys.readouterr().out
    assert "us-central2-b" not in out
    lines = [line.strip() for line in out.splitlines()]
    gcloud = [line for line in lines if "gcloud compute tpus tpu-vm" in line]
    assert all("--zone=europe-west4-a" in g and "--project=proj" in g for g in gcloud)
    assert all("--worker=all" in g for g in gcloud)
    install = [g for g in gcloud if "pip install" in g]
    assert len(install) == 1 and "python3 -m venv .venv" in install[0]
    assert ".[tpu]" in install[0]
    assert any(" scp " in g and "--recurse" in g for g in gcloud)
    runs_ = [line for line in lines if line.startswith("on pod:")]
    assert len(runs_) == 1  # the two seeds packed into one population
    assert "VAE_JAX_DATA_DIR=/data/corpora" in runs_[0]
    assert ".venv/bin/python -m vae_jax.main" in runs_[0] and "--distributed=auto" in runs_[0]
    assert "--workdir=/mnt/shared/t/" in runs_[0]


def test_object_store_workdirs_are_refused_before_anything_runs(tmp_path, monkeypatch):
    from conftest import tiny_synthetic_config

    from vae_jax.run import loop

    monkeypatch.chdir(tmp_path)
    message = r"^--workdir=gs://b/run: object stores \(gs://\) are not supported .* gcsfuse"
    with pytest.raises(ValueError, match=message):
        sweep_cli.main([f"--sweep={_tiny_sweep_file(tmp_path)}", "--workdir=gs://b/run"])
    with pytest.raises(ValueError, match=message):
        loop.train_and_evaluate(tiny_synthetic_config(), "gs://b/run")
    with pytest.raises(ValueError, match=message):
        build.load_run("gs://b/run")
    assert not os.path.exists(tmp_path / "gs:")  # nothing was written


def test_status_says_where_each_run_is(tmp_path, capsys):
    from vae_jax.run import workdirs

    workdir = tmp_path / "sweep"
    run_dir = workdir / "ptb-cyclical.seed-0"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"num_epochs": 10, "num_train_steps": -1}))
    records = [{"step": 100, "epoch": 1.0, "valid_rec": 1.0}, {"step": 150, "rec": 1.0,
               "steps_per_second": 2.0}]  # fmt: skip
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    argv = [f"--sweep={_tiny_sweep_file(tmp_path)}", f"--workdir={workdir}", "--nopack", "--status"]

    def status() -> list[str]:
        capsys.readouterr()
        assert sweep_cli.main(argv) == {}
        return [line.strip() for line in capsys.readouterr().out.splitlines()[1:]]

    # 850 steps left of 10 epochs × 100 steps, at 2 steps/s: 425 s.
    left = "step 150 of 1,000 (epoch 1.5 of 10), 0.1 h left at 2.00 steps/s"
    assert status() == [f"ptb-cyclical.seed-0: stopped, {left}", "ptb-cyclical.seed-1: not started"]
    with workdirs.WorkdirLock(str(run_dir)):
        assert status()[0].startswith(f"ptb-cyclical.seed-0: training (pid {os.getpid()} on host")
    (run_dir / sweep.DONE).write_text("{}")
    assert status()[0] == "ptb-cyclical.seed-0: done, step 150 of 1,000 (epoch 1.5 of 10)"
    assert not (workdir / "ptb-cyclical.seed-1").exists()  # --status writes nothing
