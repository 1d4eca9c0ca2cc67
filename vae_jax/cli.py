"""What the absl command lines (`main`, `evaluate`, `generate`) share.

Each command defines its flags in a ``define_flags(fv)`` function: ``python -m`` defines them on
the global ``flags.FLAGS`` and hands over to ``app.run``; its ``main(argv)``, for notebooks and
tests, parses ``argv`` into a `flags.FlagValues` of its own (`parse`), so that commands imported
into one process never define a flag twice.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags


def parse(
    define_flags: Callable[[flags.FlagValues], None], prog: str, argv: Sequence[str]
) -> flags.FlagValues:
    """``argv`` (flags only, no program name) parsed with the flags ``define_flags`` defines.

    A bad or missing flag, or a positional argument, prints ``prog: <what is wrong>`` and
    exits with status 2, as a command line does.
    """
    fv = flags.FlagValues()
    define_flags(fv)
    try:
        rest = fv([prog, *argv])
        if len(rest) > 1:
            raise flags.Error(f"unexpected arguments {rest[1:]}")
    except flags.Error as e:
        print(f"{prog}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return fv


def absl_main(run: Callable[[flags.FlagValues], Any]) -> Callable[[list[str]], None]:
    """The ``main`` that ``app.run`` calls: ``run(flags.FLAGS)``, refusing positional args."""

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        run(flags.FLAGS)

    return main
