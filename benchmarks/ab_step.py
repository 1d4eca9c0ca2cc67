"""Two versions of vae_jax's train step timed in alternation: the A/B behind a speed change.

    python benchmarks/ab_step.py BASE [VARIANT] [--config ptb_23] [--rounds 10] [--steps 4]
        [--warmup 8] [--out ab.json]

BASE and VARIANT are versions of the package: a git revision of this repository (its
``vae_jax/`` exported with ``git archive``) or ``.``, the working tree (VARIANT's default).
Each runs in a worker process of its own that imports its own copy; both build the step the
same way (`benchmark.train_step_call`, with that version's `vae_jax.run.host.keep_freed_memory`).
After compilation and warm-up the workers take turns, ``--steps`` steps each, ``--rounds``
times (who goes first alternates), so both see the same drift of a shared machine: runs of
`benchmark.py` minutes apart differ by more than most single changes. Prints each side's
median and quartiles of ms per step and the median over rounds of the ratio VARIANT / BASE
(of the rounds' medians). ``ab_step.py . .`` shows the noise floor.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPLY = "ab_step:"  # marks a worker's answers: anything else it prints on stdout is passed on


def worker(config: str, warmup: int) -> None:
    """Builds ``config``'s step, then runs as many steps as each line of stdin asks for and
    answers each line with the JSON list of their wall times in seconds."""
    import benchmark

    try:
        from vae_jax.run import host
    except ImportError:  # a revision from before the wings
        from vae_jax import host

    if hasattr(host, "keep_freed_memory"):
        host.keep_freed_memory()
    call = benchmark.train_step_call(config)
    compile_s = benchmark.timed(call, 1)[0]
    benchmark.timed(call, warmup)
    print(REPLY, json.dumps({"compile_s": compile_s, "vae_jax": os.path.dirname(host.__file__)}))
    sys.stdout.flush()
    for line in sys.stdin:
        print(REPLY, json.dumps(benchmark.timed(call, int(line))))
        sys.stdout.flush()


def resolve(revision: str) -> str | None:
    """The full commit of a git revision, None for the working tree ``.``; exits on error."""
    if revision == ".":
        return None
    proc = subprocess.run(
        ["git", "-C", REPO, "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        sys.exit(f"ab_step.py: {revision!r} is not a git revision of {REPO} (or '.')")
    return proc.stdout.strip()


def export(commit: str, into: str) -> str:
    """Writes the commit's ``vae_jax/`` under ``into``; returns the folder to import it from."""
    folder = os.path.join(into, commit[:12])
    archive = subprocess.run(
        ["git", "-C", REPO, "archive", "--format=tar", commit, "vae_jax"],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def _joined(separator: str, *parts: str) -> str:
    return separator.join(p for p in parts if p)


class Worker:
    def __init__(self, label: str, import_root: str, config: str, warmup: int):
        from vae_jax.run import host

        env = dict(os.environ)
        env["PYTHONPATH"] = _joined(os.pathsep, import_root, env.get("PYTHONPATH", ""))
        # vae_jax.run.host's malloc tunable, set here: the workers never re-exec themselves.
        env["GLIBC_TUNABLES"] = _joined(":", env.get("GLIBC_TUNABLES", ""), host.TUNABLE)
        command = [sys.executable, os.path.abspath(__file__), "--worker", config]
        command += ["--warmup", str(warmup)]
        self.label = label
        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.info = json.loads(self._read())

    def _read(self) -> str:
        while line := self.proc.stdout.readline():
            if line.startswith(REPLY):
                return line[len(REPLY) :]
            print(line, end="", file=sys.stderr)
        self.proc.wait()
        code = self.proc.returncode
        sys.exit(f"ab_step.py: the worker for {self.label} failed (exit {code})")

    def steps(self, n: int) -> list[float]:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return json.loads(self._read())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", nargs="?")
    parser.add_argument("variant", nargs="?", default=".")
    parser.add_argument("--config", default="ptb_23", help="A train-step config of benchmark.py.")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=4, help="Steps per worker per round.")
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--out", help="Write the per-step times and the summary as JSON here.")
    parser.add_argument("--worker", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.warmup)

    from benchmark import CONFIGS, CVAE_CONFIGS, alternate, round_ratios  # a worker: own vae_jax

    if args.base is None:
        parser.error("BASE (a git revision, or '.') is required")
    if args.config not in {**CONFIGS, **CVAE_CONFIGS}:
        known = [*CONFIGS, *CVAE_CONFIGS]
        parser.error(f"--config: unknown {args.config!r}; known {known}")
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--rounds and --steps must be >= 1, --warmup >= 0")
    sides = {"base": args.base, "variant": args.variant}
    commits = {side: resolve(revision) for side, revision in sides.items()}

    with tempfile.TemporaryDirectory(prefix="vae_jax_ab_") as tmp:
        roots = {side: REPO if c is None else export(c, tmp) for side, c in commits.items()}
        workers = {
            side: Worker(f"{side} {sides[side]}", roots[side], args.config, args.warmup)
            for side in sides
        }
        try:
            runs = {side: w.steps for side, w in workers.items()}
            times = alternate(runs, args.rounds, args.steps)
        finally:
            for w in workers.values():
                w.close()

    ratios = round_ratios(times["base"], times["variant"])
    summary = {"config": args.config, "rounds": args.rounds, "steps": args.steps, "sides": {}}
    print(f"{args.config}: {args.rounds} rounds of {args.steps} steps each side, alternating")
    for side in sides:
        ms = 1e3 * np.concatenate(times[side])
        p25, median, p75 = np.percentile(ms, [25, 50, 75])
        revision = sides[side] if commits[side] is None else commits[side][:10]
        compile_s = workers[side].info["compile_s"]
        summary["sides"][side] = {
            "revision": sides[side],
            "commit": commits[side],
            "ms_median": float(median),
            "ms_p25": float(p25),
            "ms_p75": float(p75),
            "compile_s": compile_s,
            "times_s": times[side],
        }
        print(
            f"{side:<8}{revision:<12} median {median:7.1f} ms/step  (p25 {p25:.1f}, "
            f"p75 {p75:.1f}; compile {compile_s:.1f} s)"
        )
    summary["ratio_median"] = float(np.median(ratios))
    summary["ratios"] = ratios
    print(
        f"variant / base: {np.median(ratios):.3f} (median of the rounds' ratios; "
        f"{min(ratios):.3f}–{max(ratios):.3f})"
    )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
