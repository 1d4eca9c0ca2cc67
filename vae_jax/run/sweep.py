"""Sweeps as data, and their execution: a sweep file's runs (`sweep`, `product`, `zip_`), the
plan that packs runs differing only in seed into populations (`plan`), and the runner that trains
each job as a ``python -m vae_jax.main`` process, resumes what is unfinished and records what is
done (`execute`, `run_status`). The command line is `vae_jax.sweep`; a sweep file reads::

    from vae_jax.run.sweep import product, sweep

    def get_sweep():
        return product([
            sweep("config", ["configs/ptb.py:monotonic", "configs/ptb.py:cyclical"]),
            sweep("seed", [0, 1, 2]),
        ])
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import fnmatch
import functools
import importlib.util
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from vae_jax.run import files, writers

Run = dict[str, Any]
DONE = "sweep_done.json"  # in a job's directory: its training finished
EVALUATED = "sweep_evaluated.json"  # in a run's directory: the evaluate flags it was scored with


def sweep(name: str, values: Sequence[Any]) -> list[Run]:
    """One field over ``values``: ``[{name: v} for v in values]``."""
    return [{name: v} for v in values]


def _merge(parts: Sequence[Run], where: str) -> Run:
    merged = {}
    for part in parts:
        clash = merged.keys() & part.keys()
        if clash:
            raise ValueError(f"sweep.{where}: {sorted(clash)} set by two sweeps.")
        merged.update(part)
    return merged


def product(sweeps: Sequence[Sequence[Run]]) -> list[Run]:
    """Every combination of one run from each sweep, merged (later sweeps vary fastest)."""
    return [_merge(parts, "product") for parts in itertools.product(*sweeps)]


def zip_(sweeps: Sequence[Sequence[Run]]) -> list[Run]:
    """The i-th runs of every sweep merged; the sweeps must be equally long."""
    lengths = {len(s) for s in sweeps}
    if len(lengths) > 1:
        raise ValueError(f"sweep.zip_: sweeps of different lengths {sorted(lengths)}.")
    return [_merge(parts, "zip_") for parts in zip(*sweeps, strict=True)]


def run_name(run: Run, keys: Sequence[str] | None = None) -> str:
    """A directory name for a run, ``ptb-cyclical.seed-1``: its config, then its value of
    each of ``keys`` (default: all its overrides; `run_names` passes those that vary)."""
    path, _, variant = run["config"].partition(":")
    name = os.path.splitext(os.path.basename(path))[0] + (f"-{variant}" if variant else "")
    for key in sorted(k for k in (run if keys is None else keys) if k != "config"):
        if key in run:
            value = run[key]
            name += f".{key}-{value if isinstance(value, str) else json.dumps(value)}"
    return "".join(c if c.isalnum() or c in "-._=" else "_" for c in name)


def varying_keys(runs: Sequence[Run]) -> list[str]:
    """The override keys whose values are not the same in every run."""
    keys = sorted({k for run in runs for k in run})
    return [k for k in keys if len({json.dumps(r.get(k), default=repr) for r in runs}) > 1]


def run_names(runs: Sequence[Run]) -> list[str]:
    """Each run's `run_name` from the keys that vary over the sweep (``seed`` always)."""
    keys = sorted({*varying_keys(runs), "seed"})
    return [run_name(run, keys) for run in runs]


TPU_CHECKOUT = "vae_jax"  # where the install step puts this checkout: ~/vae_jax on each worker


@dataclasses.dataclass(frozen=True)
class TpuPod:
    """A TPU VM (pod slice) to launch on: its name, zone, project, and the data directory the
    workers read (``VAE_JAX_DATA_DIR`` on them)."""

    name: str
    zone: str
    project: str = ""
    data_dir: str = ""

    def gcloud(self, verb: str, *args: str) -> list[str]:
        project = [f"--project={self.project}"] if self.project else []
        return ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, f"--zone={self.zone}",
                *project, "--worker=all"]  # fmt: skip

    def ssh(self, command: str) -> list[str]:
        return self.gcloud("ssh", self.name, f"--command={command}")

    def install_commands(self, source: str) -> list[list[str]]:
        """A fresh slice: this checkout copied to every worker, a venv with ``.[tpu]``."""
        install = (
            f"cd {TPU_CHECKOUT} && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
        )
        return [
            self.ssh(f"rm -rf {TPU_CHECKOUT} && mkdir -p {TPU_CHECKOUT}"),
            self.gcloud("scp", "--recurse", f"{source}/.", f"{self.name}:{TPU_CHECKOUT}"),
            self.ssh(install),
        ]


@dataclasses.dataclass
class Job:
    """One training process: a single run, or a population of several runs."""

    name: str
    config: str  # --config
    overrides: dict[str, Any]  # --config.<field>
    members: list[str]  # the run names it trains, member k first

    def pod_command(self, workdir: str, pod: TpuPod) -> list[str]:
        """The command that runs this job on every worker of a TPU VM pod slice, from the
        checkout and venv `TpuPod.install_commands` make (the workdir on a file system all
        workers mount; `vae_jax.run.distributed` finds the processes, and the run stops if a worker
        does not see the files process 0 wrote)."""
        run = [".venv/bin/python", *self.command(workdir)[1:]]  # after cd: ~ unquoted
        command = shlex.join([*run, "--distributed=auto"])
        env = f"VAE_JAX_DATA_DIR={shlex.quote(pod.data_dir)} " if pod.data_dir else ""
        return pod.ssh(f"cd {TPU_CHECKOUT} && {env}{command}")

    def evaluate_command(self, workdir: str, k: int, flags_: Sequence[str]) -> list[str]:
        """``python -m vae_jax.evaluate`` of this job's run ``k`` with ``flags_``."""
        command = [sys.executable, "-m", "vae_jax.evaluate"]
        command.append(f"--workdir={os.path.join(workdir, self.name)}")
        if len(self.members) > 1:
            command.append(f"--member={k}")
        return command + list(flags_)

    def command(self, workdir: str, allow_config_change: bool = False) -> list[str]:
        command = [sys.executable, "-m", "vae_jax.main", f"--config={self.config}"]
        command.append(f"--workdir={os.path.join(workdir, self.name)}")
        if allow_config_change:
            command.append("--allow_config_change")
        for key, value in self.overrides.items():
            text = value if isinstance(value, str) else repr(value)
            command.append(f"--config.{key}={text}")
        return command


def load_sweep(spec_string: str) -> list[Run]:
    """``get_sweep()`` (``get_sweep(arg)`` for ``file.py:arg``, as config files take a variant)
    of a sweep file, checked: a non-empty list of dicts, each with a ``config`` and distinct
    from the others."""
    path, _, arg = spec_string.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--sweep={spec_string}: no such file {path}.")
    spec = importlib.util.spec_from_file_location("vae_jax_sweep_file", path)
    module = importlib.util.module_from_spec(spec)
    with _named_errors(spec_string, path, "loading it"):
        spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"--sweep={spec_string}: {path} defines no get_sweep().")
    with _named_errors(spec_string, path, "in get_sweep()"):
        runs = module.get_sweep(arg) if arg else module.get_sweep()
    if not isinstance(runs, (list, tuple)):
        raise ValueError(
            f"--sweep={spec_string}: get_sweep() returned {type(runs).__name__}, not a list of "
            "runs (a missing return?)."
        )
    runs = list(runs)
    if not runs or not all(isinstance(r, dict) and "config" in r for r in runs):
        raise ValueError(
            f"--sweep={spec_string}: get_sweep() must return dicts, each with 'config'."
        )
    names = run_names(runs)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"--sweep={spec_string}: runs repeated: {repeated}.")
    return runs


@contextlib.contextmanager
def _named_errors(spec_string: str, path: str, when: str) -> Iterator[None]:
    """Turns an exception raised by a sweep file into one line naming it and its line."""
    try:
        yield
    except Exception as e:  # noqa: BLE001  (any error of user code)
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == path]
        line = getattr(e, "lineno", None) if isinstance(e, SyntaxError) else None
        line = line or (frames[-1].lineno if frames else None)
        where = f"{path}:{line}" if line else path
        raise ValueError(
            f"--sweep={spec_string}: {where} raised {type(e).__name__} {when}: {e}"
        ) from e


# A run's directory and its logs (``<name>.evaluate.log``, the longest) are one path component.
NAME_MAX = 255
_LONGEST_SUFFIX = ".evaluate.log"


def _check_names(jobs: Sequence[Job]) -> None:
    for name in sorted({n for j in jobs for n in (j.name, *j.members)}):
        size = len((name + _LONGEST_SUFFIX).encode())
        if size > NAME_MAX:
            raise ValueError(
                f"run name {name[:60]}… is {len(name.encode())} bytes; with its log's suffix "
                f"{_LONGEST_SUFFIX!r} a file name takes at most {NAME_MAX}: shorten the "
                "sweep's values (string values go into the name)."
            )


def plan(runs: Sequence[Run], pack: bool = True, only: Sequence[str] = ()) -> list[Job]:
    """The jobs that train ``runs``: runs equal but for consecutive seeds become one population
    when ``pack``; every other run is a job of its own. Order follows the sweep's; when
    packing, runs that differ only in their seed stay together, at their first run's place.
    ``only``: glob patterns; just the jobs with a run whose name matches one (the plan is the
    whole sweep's, so every job keeps its directory and its members whatever is selected)."""
    jobs = _plan(runs, pack)
    _check_names(jobs)  # before --dry_run says all is well
    if not only:
        return jobs
    chosen = [j for j in jobs if any(fnmatch.fnmatchcase(m, p) for m in j.members for p in only)]
    if not chosen:
        names = sorted(m for j in jobs for m in j.members)
        raise ValueError(f"--only={','.join(only)}: matches none of the runs {names}.")
    return chosen


def _plan(runs: Sequence[Run], pack: bool) -> list[Job]:
    names = dict(zip((id(r) for r in runs), run_names(runs), strict=True))

    def single(run: Run) -> Job:
        return Job(names[id(run)], run["config"], _overrides(run), [names[id(run)]])

    if not pack:
        return [single(r) for r in runs]
    keys = sorted({*varying_keys(runs), "seed"})
    groups: dict[str, list[Run]] = {}
    for run in runs:
        rest = {k: v for k, v in run.items() if k != "seed"}
        groups.setdefault(json.dumps(rest, sort_keys=True, default=repr), []).append(run)
    jobs = []
    for group in groups.values():
        seeds = sorted(r.get("seed", 0) for r in group)
        consecutive = seeds == list(range(seeds[0], seeds[0] + len(seeds)))
        if len(group) > 1 and consecutive and "population_size" not in group[0]:
            group = sorted(group, key=lambda r: r.get("seed", 0))
            base = {**_overrides(group[0]), "seed": seeds[0], "population_size": len(group)}
            name = run_name({**group[0], "seed": f"{seeds[0]}-{seeds[-1]}"}, keys)
            jobs.append(Job(name, group[0]["config"], base, [names[id(r)] for r in group]))
            continue
        jobs += [single(r) for r in group]
    return jobs


def _overrides(run: Run) -> dict:
    return {k: v for k, v in run.items() if k != "config"}


def _link_members(job: Job, workdir: str) -> None:
    """``WORKDIR/<run name>`` for each run of ``job`` (a population's: a link to its member)."""
    if len(job.members) == 1:
        return
    for k, name in enumerate(job.members):
        link = os.path.join(workdir, name)
        if not os.path.lexists(link):
            os.symlink(os.path.join(job.name, "members", str(k)), link)


@dataclasses.dataclass
class _Task:
    """A process to run: a job's training or one run's evaluation."""

    name: str  # its key in the returned status
    command: list[str]
    log: str
    finish: Callable[[], None]  # on exit status 0


def execute(
    jobs: Sequence[Job],
    workdir: str,
    parallel: int = 1,
    allow_config_change: bool = False,
    evaluate: Sequence[str] = (),
    rerun_changed: bool = False,
) -> dict[str, int]:
    """Runs the jobs not yet done, ``parallel`` processes at a time, and, where ``evaluate``
    gives `vae_jax.evaluate` flags, evaluates each run of a trained job not yet evaluated with
    those flags; returns the exit status of each job and each evaluation (``<run>:evaluate``),
    0 for those skipped as done, `CHANGED` for a finished job whose command the sweep has
    changed since (trained on, with ``--allow_config_change``, where ``rerun_changed``). A
    population that has grown trains only its new members (`_without_trained_members`)."""
    os.makedirs(workdir, exist_ok=True)
    status, queue, running = {}, [], {}

    def evaluations(job: Job) -> list[_Task]:
        tasks = []
        for k, name in enumerate(job.members if evaluate else ()):
            done = os.path.join(workdir, name, EVALUATED)
            if _read_json(done) == list(evaluate):
                status[f"{name}:evaluate"] = 0
                continue
            tasks.append(
                _Task(
                    f"{name}:evaluate",
                    job.evaluate_command(workdir, k, evaluate),
                    os.path.join(workdir, f"{name}.evaluate.log"),
                    functools.partial(_write_json, done, list(evaluate)),
                )
            )
        return tasks

    def trained(job: Job) -> None:
        _write_json(
            os.path.join(workdir, job.name, DONE),
            {"members": job.members, "command": job.command(workdir)},
        )
        _link_members(job, workdir)
        queue[:0] = evaluations(job)  # a finished job's scores before the next training

    planned, jobs = jobs, []
    for job in planned:
        remaining, owners = _without_trained_members(job, workdir)
        jobs += remaining
        for owner in owners:  # the finished population that trained some of its runs
            if owner.name not in status:
                print(f"done already (by an earlier population): {owner.name}", flush=True)
                status[owner.name] = 0
                queue += evaluations(owner)
    for job in jobs:
        done = _read_json(os.path.join(workdir, job.name, DONE))
        if done is None:
            continue
        changed = _changed(done.get("command", []), job.command(workdir))
        if changed and rerun_changed:
            print(f"changed since it finished, training it again: {job.name}: {changed}")
            for name in job.members:  # its scores are of the old config's model
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(workdir, name, EVALUATED))
            continue
        if changed:
            print(
                f"CHANGED since it finished: {job.name}: {changed}; kept as it is (pass "
                "--rerun_changed to continue it under the sweep's config)",
                flush=True,
            )
            status[job.name] = CHANGED
            continue
        print(f"done already: {job.name}", flush=True)
        status[job.name] = 0
        _link_members(job, workdir)
        queue += evaluations(job)
    for job in jobs:
        if job.name not in status:
            rerun = os.path.exists(os.path.join(workdir, job.name, DONE))
            command = job.command(workdir, allow_config_change or rerun)
            log = os.path.join(workdir, f"{job.name}.log")
            queue.append(_Task(job.name, command, log, functools.partial(trained, job)))
    waiting: set[str] = set()
    while queue or running:
        for task in list(queue):
            if len(running) >= parallel:
                break
            holder = _lock_holder(task.command)
            if holder is not None:  # an orphan of an earlier runner killed with -9
                if task.name not in waiting:
                    print(f"waiting: {task.name}: its workdir is held by {holder}", flush=True)
                    waiting.add(task.name)
                continue
            queue.remove(task)
            log = open(task.log, "a", encoding="utf-8")  # noqa: SIM115
            print(f"start: {task.name}: {shlex.join(task.command)}", flush=True)
            process = subprocess.Popen(
                task.command,
                stdout=log,
                stderr=log,
                preexec_fn=functools.partial(_end_with_parent, os.getpid()),
            )
            running[task.name] = (task, process, log)
        time.sleep(0.2)
        for name, (task, process, log) in list(running.items()):
            if process.poll() is None:
                continue
            log.close()
            del running[name]
            status[name] = process.returncode
            if process.returncode == 0:
                task.finish()
                print(f"done: {name}", flush=True)
            else:
                print(f"FAILED ({process.returncode}): {name}; see {task.log}", flush=True)
    return status


def _end_with_parent(parent: int) -> None:
    """In a child, before it runs: SIGTERM when the runner (pid ``parent``) dies, even of
    kill -9 (Linux), so no orphan keeps training a job (it saves a checkpoint; a rerun
    resumes it)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the lock wait in `execute` still holds
        return
    if os.getppid() != parent:  # the runner died between the fork and the prctl
        os.kill(os.getpid(), signal.SIGTERM)


def _lock_holder(command: Sequence[str]) -> str | None:
    """Who holds the workdir lock (`vae_jax.run.workdirs.WorkdirLock`) of a training ``command``,
    if another process does: the runner then waits for it and trains the job after it
    (resuming at its last checkpoint), so the job's completion is recorded either way."""
    if "vae_jax.main" not in command:
        return None
    workdir = next((a.split("=", 1)[1] for a in command if a.startswith("--workdir=")), None)
    path = os.path.join(workdir or "", "lock")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        with open(fd, encoding="utf-8", closefd=False) as f:
            return f.read().strip() or "another process"
    finally:
        os.close(fd)


# The status of a finished job whose config the sweep has changed since: no exit status (those
# are 0..255, and minus a signal's number) can be mistaken for it.
CHANGED = 256


def _changed(before: Sequence[str], now: Sequence[str]) -> str:
    """The ``--config`` flags that differ between a finished job's command and today's ('' if
    none): the interpreter's path or the workdir's spelling are no change."""
    old = {a.partition("=")[0]: a for a in before if a.startswith("--config")}
    new = {a.partition("=")[0]: a for a in now if a.startswith("--config")}
    if not old:  # a marker without its command: nothing to compare
        return ""
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return ", ".join(f"{old.get(k, k + ' unset')} -> {new.get(k, 'unset')}" for k in keys)


def _without_trained_members(job: Job, workdir: str) -> tuple[list[Job], list[Job]]:
    """(jobs, owners): ``job``, or, for a population some of whose runs an earlier finished
    population trained (the sweep added seeds), its other runs as single jobs with the
    population's data order (so each still computes what member k with seed base + k does),
    and those earlier populations (as jobs, for their runs' links and evaluations)."""
    if len(job.members) == 1 or os.path.exists(os.path.join(workdir, job.name, DONE)):
        return [job], []
    owners: dict[str, Job] = {}
    for name in job.members:
        link = os.path.join(workdir, name)
        if not os.path.islink(link):
            continue
        owner = os.readlink(link).split(os.sep)[0]
        done = _read_json(os.path.join(workdir, owner, DONE))
        if owner != job.name and done is not None:
            owners[owner] = Job(owner, job.config, job.overrides, list(done["members"]))
    trained = {name for owner in owners.values() for name in owner.members}
    if not trained:
        return [job], []
    base = job.overrides["seed"]
    data_seed = job.overrides.get("data_seed", -1)
    data_seed = base if data_seed < 0 else data_seed
    rest = {k: v for k, v in job.overrides.items() if k != "population_size"}
    singles = [
        Job(name, job.config, {**rest, "seed": base + k, "data_seed": data_seed}, [name])
        for k, name in enumerate(job.members)
        if name not in trained
    ]
    return singles, list(owners.values())


def run_status(workdir: str, job: Job, name: str) -> str:
    """One line on run ``name`` of ``job``: done, training (the workdir lock's holder), stopped
    or not started; the step and epoch it reached of its length, and, while unfinished, the
    time left at its last logged speed."""
    job_dir, run_dir = os.path.join(workdir, job.name), os.path.join(workdir, name)
    config = _read_json(os.path.join(run_dir, "config.json"))
    records = writers.read_metrics(run_dir) if config is not None else []
    if not records:
        return f"{name}: not started"
    step = max(r["step"] for r in records)
    speeds = [r["steps_per_second"] for r in records if "steps_per_second" in r]
    epochs = [r for r in records if r.get("epoch")]
    per_epoch = round(epochs[-1]["step"] / epochs[-1]["epoch"]) if epochs else None
    total = config.get("num_train_steps", -1)
    if config.get("num_epochs", -1) > 0 and per_epoch:
        total = config["num_epochs"] * per_epoch
    where = f"step {step:,}" + (f" of {total:,}" if total > 0 else "")
    if per_epoch:
        where += f" (epoch {step / per_epoch:.1f}" + (
            f" of {config['num_epochs']})" if config.get("num_epochs", -1) > 0 else ")"
        )
    if os.path.exists(os.path.join(job_dir, DONE)):
        return f"{name}: done, {where}"
    stopped_early = any("early_stopped" in r for r in records)
    holder = _lock_holder(["vae_jax.main", f"--workdir={job_dir}"])
    state = "stopped early" if stopped_early else f"training ({holder})" if holder else "stopped"
    left = ""
    if total > step and speeds and not stopped_early:
        left = f", {(total - step) / speeds[-1] / 3600:.1f} h left at {speeds[-1]:.2f} steps/s"
    return f"{name}: {state}, {where}{left}"


def _read_json(path: str) -> Any:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path: str, value: Any) -> None:
    files.write_atomic(path, json.dumps(value))
