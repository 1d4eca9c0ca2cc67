"""Sweeps: the runs of a sweep file, packed into populations where they can be.

    python -m vae_jax.sweep --sweep=configs/sweeps/ptb_table1.py[:arg] --workdir=runs/table1
        [--dry_run] [--status] [--parallel=N] [--nopack] [--only=GLOB,…] [--allow_config_change]
        [--evaluate='--split=test --num_importance_samples=50 --checkpoint=best']

A sweep file defines ``get_sweep()``, a list of runs, each a dict of overrides: ``"config"``
(what ``--config`` takes, ``file.py:variant``) and config fields by dotted name, built with
`vae_jax.run.sweep`'s `sweep`, `product` and `zip_` (as big_vision's and XManager's ``hyper``
sweeps)::

    from vae_jax.run.sweep import product, sweep

    def get_sweep():
        return product([
            sweep("config", ["configs/ptb.py:monotonic", "configs/ptb.py:cyclical"]),
            sweep("seed", [0, 1, 2]),
        ])

Runs that differ only in ``seed``, with consecutive seeds, are packed into one population
(`vae_jax.run.population`: one vmapped program), whose member k is the run with seed ``base + k``
and the data order of the base seed (``data_seed``; set it in the sweep to choose another);
``--nopack`` runs each alone, with its own data order. Every run lives in
``WORKDIR/<run name>/`` (a population's members are links into its ``members/<k>/``), so a
reader sees one run directory per entry. Jobs run as ``python -m vae_jax.main`` processes, one
after another or ``--parallel=N`` at once, their output in ``WORKDIR/<job>.log``. Running the
same command again resumes what is unfinished (training resumes exactly) and skips what is
done (``WORKDIR/<job>/sweep_done.json``); ``--only=ptb-cyclical.seed-1`` (glob patterns)
takes just the jobs of the runs so named; ``--dry_run`` prints the plan and each command
(``--tpu=NAME --zone=ZONE [--project=P]``: also the ``gcloud`` commands that install this
checkout in a venv on every worker of a TPU VM pod slice and run each job there with
``VAE_JAX_DATA_DIR`` set, ``--tpu_data_dir``). A ``gs://`` workdir is refused: use a file
system every host mounts.
``--status`` prints, for each run, whether it is done, training (and who holds its workdir),
stopped or not started, the step and epoch it reached and the time left at its last speed.
``--evaluate=FLAGS`` then scores each trained run with ``python -m vae_jax.evaluate FLAGS``
(output in ``WORKDIR/<run>.evaluate.log``, results in the run's ``eval_<split>.json``, which
``experiments/table1_ptb.py`` reads); a rerun with the same flags skips runs already scored.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence

from absl import app, flags

from vae_jax.run import cli, files
from vae_jax.run.sweep import CHANGED, TpuPod, execute, load_sweep, plan, run_status


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("sweep", None, "A sweep file defining get_sweep().", flag_values=fv)
    flags.DEFINE_string("workdir", None, "The sweep's directory: one per run.", flag_values=fv)
    flags.DEFINE_bool("dry_run", False, "Print the plan and commands only.", flag_values=fv)
    flags.DEFINE_bool(
        "status", False, "Print each run's progress (done, training, stopped; step, epoch, "
        "time left at its last speed) and exit.", flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_integer("parallel", 1, "Jobs at once.", lower_bound=1, flag_values=fv)
    flags.DEFINE_bool("pack", True, "Pack runs differing in seed into populations.", flag_values=fv)
    flags.DEFINE_list(
        "only", [], "Only the jobs with a run whose name matches one of these glob patterns, "
        "e.g. 'ptb-cyclical.seed-1' or '*.seed-1' (a population trains all its members). "
        "[]: all.", flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_string(
        "tpu", "", "With --dry_run: also print each job's command for every worker of this TPU "
        "VM pod slice.", flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_string("zone", "", "The --tpu's zone (required with --tpu).", flag_values=fv)
    flags.DEFINE_string("project", "", "The --tpu's project ('': gcloud's).", flag_values=fv)
    flags.DEFINE_string(
        "tpu_data_dir", os.environ.get("VAE_JAX_DATA_DIR", ""),
        "VAE_JAX_DATA_DIR on the --tpu workers: a directory each of them has (default: this "
        "machine's $VAE_JAX_DATA_DIR).", flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_bool(
        "allow_config_change", False, "Passed to each run (resume after a config change).",
        flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_bool(
        "rerun_changed", False, "Continue (with --allow_config_change) the finished jobs whose "
        "config the sweep file has changed since; without it they are reported and kept.",
        flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_string(
        "evaluate", "", "After a job trains, run `python -m vae_jax.evaluate` on each of its "
        "runs with these flags, e.g. '--split=test --num_importance_samples=50 "
        "--checkpoint=best'; a run scored with the same flags is skipped. '': none.",
        flag_values=fv,
    )  # fmt: skip
    flags.mark_flags_as_required(["sweep", "workdir"], flag_values=fv)


def run(fv: flags.FlagValues) -> dict[str, int]:
    files.check_local_path(fv.workdir)
    pod = None
    if fv.tpu:
        if not fv.dry_run:
            raise ValueError("--tpu: prints the TPU commands; pass --dry_run with it.")
        if not fv.zone:
            raise ValueError(f"--tpu={fv.tpu}: pass --zone=<its zone> (and --project=).")
        if not os.path.isabs(fv.workdir):
            raise ValueError(
                f"--workdir={fv.workdir}: with --tpu, an absolute path on the file system "
                "every worker mounts."
            )
        pod = TpuPod(fv.tpu, fv.zone, fv.project, fv.tpu_data_dir)
    runs = load_sweep(fv.sweep)
    jobs = plan(runs, pack=fv.pack, only=fv.only)
    chosen = f" (--only={','.join(fv.only)})" if fv.only else ""
    print(f"{fv.sweep}: {len(runs)} runs, {len(jobs)} jobs{chosen} under {fv.workdir}", flush=True)
    if fv.status:
        lines = [run_status(fv.workdir, job, name) for job in jobs for name in job.members]
        print("\n".join(f"  {line}" for line in lines), flush=True)
        return {}
    evaluate = shlex.split(fv.evaluate)
    if pod is not None:
        source = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        print(f"  install on {pod.name} (once, a fresh slice):")
        for command in pod.install_commands(source):
            print(f"    {shlex.join(command)}")
        print(
            f"  {fv.workdir} must be a file system every worker of {pod.name} mounts (NFS, "
            "Filestore, gcsfuse); a run stops if a worker does not see process 0's files."
        )
    for job in jobs:
        kind = f"population of {len(job.members)}" if len(job.members) > 1 else "single run"
        print(f"  {job.name} ({kind}): {', '.join(job.members)}")
        print(f"    {shlex.join(job.command(fv.workdir))}")
        if pod is not None:
            print(f"    on {pod.name}: {shlex.join(job.pod_command(fv.workdir, pod))}")
        for k in range(len(job.members) if evaluate else 0):
            print(f"    then {shlex.join(job.evaluate_command(fv.workdir, k, evaluate))}")
    if fv.dry_run:
        return {}
    status = execute(
        jobs, fv.workdir, fv.parallel, fv.allow_config_change, evaluate, fv.rerun_changed
    )
    changed = sorted(name for name, code in status.items() if code == CHANGED)
    failed = sorted(name for name, code in status.items() if code and code != CHANGED)
    if failed:
        raise RuntimeError(f"{len(failed)} job(s) failed: {failed}; rerun the command to resume.")
    if changed:
        raise RuntimeError(
            f"{len(changed)} finished job(s) no longer match the sweep: {changed}; pass "
            "--rerun_changed to continue them under the sweep's config."
        )
    return status


def main(argv: Sequence[str]) -> dict[str, int]:
    """The command with the flags in ``argv`` (no program name), for notebooks and tests."""
    return run(cli.parse(define_flags, "python -m vae_jax.sweep", argv))


if __name__ == "__main__":
    define_flags(flags.FLAGS)
    prog = "python -m vae_jax.sweep"
    app.run(cli.absl_main(run, prog), flags_parser=cli.flags_parser(prog))
