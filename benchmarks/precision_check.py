"""Does a run in another precision end where its float32 twin does? Valid figures side by side.

    python benchmarks/precision_check.py REFERENCE CANDIDATE [--noise RUN ...] [--out check.json]
        [--ignore FIELD ...]

REFERENCE and CANDIDATE are workdirs of one config that differ in ``model.dtype`` alone (for
example float32 and ``--config.model.dtype=bfloat16``, same seed); anything else that differs
in their ``config.json`` ends the script with the fields named, before anything is compared
(``--ignore`` names fields to pass over, such as one a later version added that changes
nothing on this backend; the result lists them).
At every validation step both have reached it prints each ``valid_*`` figure of the two and
their difference. ``--noise`` adds runs of the config with other seeds, in either precision
(``seed`` and ``model.dtype`` may differ): the largest distance of one from the run of its
precision (REFERENCE or CANDIDATE) at the step is the seed spread the difference is read
against; a figure is "within" when its precision difference is below that spread. The
candidate may be cut short: the figures compared are those of the steps all runs have (the
records a resumed run wrote again count once).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

from vae_jax.run import workdirs, writers


def config_of(workdir: str) -> dict[str, object]:
    return workdirs.flat_config(workdirs.load_config(workdir))


def differing(a: dict, b: dict, allowed: Sequence[str]) -> list[str]:
    """The fields that differ between two flat configs, other than ``allowed``."""
    keys = (set(a) | set(b)) - set(allowed)
    return sorted(k for k in keys if a.get(k, "<absent>") != b.get(k, "<absent>"))


def validations(workdir: str) -> dict[int, dict[str, float]]:
    """{step: {figure: value}} of the run's ``valid_*`` records (the last one of a step)."""
    if not os.path.exists(os.path.join(workdir, workdirs.METRICS)):
        raise FileNotFoundError(f"{workdir}: no {workdirs.METRICS}; is it a vae_jax workdir?")
    out: dict[int, dict[str, float]] = {}
    for record in writers.read_metrics(workdir):
        figures = {k: v for k, v in record.items() if k.startswith("valid_")}
        if figures:
            out[int(record["step"])] = figures
    return out


def compare(
    reference: str, candidate: str, noise: Sequence[str] = (), ignore: Sequence[str] = ()
) -> dict:
    """The check's record: per common step, each figure's two values, their difference, the
    seed spread (with ``noise``) and whether the difference is within it."""
    ref_config, cand_config = config_of(reference), config_of(candidate)
    allowed = {candidate: ("model.dtype",), **{n: ("seed", "model.dtype") for n in noise}}
    for other, fields in allowed.items():
        bad = differing(ref_config, config_of(other), (*fields, *ignore))
        if bad:
            raise ValueError(
                f"{other}: its config differs from {reference}'s in {bad}, beyond {list(fields)}"
            )
    ref, cand = validations(reference), validations(candidate)
    # Each other seed against the run of its own precision.
    twin = {cand_config.get("model.dtype", "float32"): cand}
    twin[ref_config.get("model.dtype", "float32")] = ref
    others = [(validations(n), twin.get(config_of(n).get("model.dtype", "float32"))) for n in noise]
    for n, (_, base) in zip(noise, others, strict=True):
        if base is None:
            raise ValueError(f"{n}: in neither precision of the two runs compared")
    steps = set(ref) & set(cand)
    for other, _ in others:
        steps &= set(other)
    rows = []
    for step in sorted(steps):
        for figure in sorted(set(ref[step]) & set(cand[step])):
            row = {
                "step": step,
                "figure": figure,
                "reference": ref[step][figure],
                "candidate": cand[step][figure],
                "difference": cand[step][figure] - ref[step][figure],
            }
            if others:
                row["seed_spread"] = max(abs(o[step][figure] - b[step][figure]) for o, b in others)
                row["within_seed_spread"] = abs(row["difference"]) < row["seed_spread"]
            rows.append(row)
    return {
        "reference": os.path.abspath(reference),
        "candidate": os.path.abspath(candidate),
        "dtypes": [config.get("model.dtype", "float32") for config in (ref_config, cand_config)],
        "noise": [os.path.abspath(n) for n in noise],
        "ignored_fields": list(ignore),
        "rows": rows,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference")
    parser.add_argument("candidate")
    parser.add_argument("--noise", nargs="*", default=[], help="Other seeds of REFERENCE.")
    parser.add_argument("--out", help="Also write the comparison as JSON here.")
    parser.add_argument("--ignore", nargs="*", default=[], help="Config fields not compared.")
    args = parser.parse_args(argv)
    try:
        result = compare(args.reference, args.candidate, args.noise, args.ignore)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"precision_check.py: {e}\n")
    if not result["rows"]:
        parser.exit(2, "precision_check.py: the runs have no validation step in common yet.\n")
    a, b = result["dtypes"]
    spread = "  seed spread" if args.noise else ""
    print(f"{'step':>7}  {'figure':<18}{a:>12}{b:>12}  difference{spread}")
    for r in result["rows"]:
        line = f"{r['step']:>7}  {r['figure']:<18}{r['reference']:>12.4f}{r['candidate']:>12.4f}"
        line += f"  {r['difference']:>+10.4f}"
        if "seed_spread" in r:
            line += (
                f"  {r['seed_spread']:>11.4f} {'within' if r['within_seed_spread'] else 'BEYOND'}"
            )
        print(line)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
