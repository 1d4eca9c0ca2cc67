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

from absl import app, flags, logging

from vae_jax.run import backend


def define_run_flags(fv: flags.FlagValues) -> None:
    """The flags of a command that reads a run: ``--workdir`` (required), ``--checkpoint``,
    ``--data_dir``, ``--member`` (a population's)."""
    flags.DEFINE_string("workdir", None, "A run's directory (config.json).", flag_values=fv)
    flags.DEFINE_string(
        "checkpoint", "auto", "auto (best if saved, else last), best, last or a step.",
        flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_string("data_dir", "", "Overrides config.data.data_dir.", flag_values=fv)
    flags.DEFINE_integer(
        "member", None, "Which member of a population workdir (vae_jax.run.population).",
        flag_values=fv,
    )  # fmt: skip
    flags.mark_flag_as_required("workdir", flag_values=fv)


def define_command_flags(fv: flags.FlagValues) -> None:
    """The flags only a command line has (``python -m``, not ``main(argv)``), applied by
    `absl_main`: ``--compilation_cache``."""
    flags.DEFINE_string(
        "compilation_cache", backend.DEFAULT_CACHE,
        "JAX's persistent compilation cache: compiled steps are kept here and reused by the "
        "next run of the same shapes. '': off. JAX_COMPILATION_CACHE_DIR or "
        "--jax_compilation_cache_dir, where given, win.", flag_values=fv,
    )  # fmt: skip


def setup_command(fv: flags.FlagValues) -> None:
    """What a command line's ``main`` sets for its process, never an import: the compilation
    cache (`define_command_flags`) and orbax's INFO lines filtered out of the log."""
    if "compilation_cache" in fv:
        where = backend.enable_compilation_cache(fv.compilation_cache)
        logging.info("Compilation cache: %s", where or "off")
    backend.quiet_orbax_logging()


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
        _exit_with(prog, str(e))
    return fv


def _exit_with(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# What a user can fix (a config value, a path, a workdir in use or bound to other data): one
# line and exit status 2, not a traceback. Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, RuntimeError)


def absl_main(
    run: Callable[[flags.FlagValues], Any], prog: str, user_errors=USER_ERRORS
) -> Callable[[list[str]], None]:
    """The ``main`` that ``app.run`` calls: ``run(flags.FLAGS)``, refusing positional args.

    An error a user can fix (``user_errors``) prints ``prog: error: <message>`` and exits
    with status 2; ``--verbosity=1`` shows its traceback instead.
    """

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        setup_command(flags.FLAGS)
        try:
            run(flags.FLAGS)
        except user_errors as e:
            if flags.FLAGS.verbosity >= 1:
                raise
            _exit_with(prog, f"{e}\n{prog}: (--verbosity=1 shows the traceback)")

    return main


def flags_parser(prog: str) -> Callable[[list[str]], list[str]]:
    """``app.run``'s ``flags_parser``: a bad flag or ``--config.<field>`` (unknown, or a value
    of the wrong type) prints one line naming it and exits with status 2."""

    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
            message = str(e)
            if isinstance(e, (AttributeError, KeyError)):  # ml_collections' unknown key
                message = f"a --config.<field> override names no field of the config: {e}"
            _exit_with(prog, f"{message}\n{prog}: see --helpfull for the flags")

    return parse


def run_command(define_flags: Callable[[flags.FlagValues], None], run: Callable, prog: str) -> None:
    """``python -m <prog>``: ``define_flags`` and the command-line flags (jax's own too, in
    --helpfull, as flax's lm1b) on the global ``flags.FLAGS``, then ``run(FLAGS)`` under
    `absl_main`'s one-line errors."""
    import jax

    define_flags(flags.FLAGS)
    define_command_flags(flags.FLAGS)
    jax.config.config_with_absl()
    app.run(absl_main(run, prog), flags_parser=flags_parser(prog))
