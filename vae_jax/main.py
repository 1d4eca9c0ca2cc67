"""Trains a vae_jax model.

    python -m vae_jax.main --config=configs/synthetic.py:cyclical --workdir=runs/synth
    python -m vae_jax.main --config=configs/synthetic.py:monotonic --workdir=runs/m \
        --config.num_train_steps=2000

Several processes (`vae_jax.run.distributed`): the same command on each, plus
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``, or ``--distributed=auto``
where JAX finds them itself (TPU pod slices, SLURM).
"""

from vae_jax.run import host

if __name__ == "__main__":
    host.tune_cpu_host("vae_jax.main")  # before jax loads: see vae_jax.run.host

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vae_jax.run import cli, config_checks, distributed, loop  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for metrics, TensorBoard events and checkpoints.")
config_flags.DEFINE_config_file(
    "config",
    None,
    "A config file, optionally with a variant: configs/x.py:variant.",
    lock_config=True,
)
flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Continue a workdir whose saved config differs from --config (the keys are listed).",
)
flags.DEFINE_bool(
    "start_over",
    False,
    "Start again from step 0 in a workdir that has no usable checkpoint but holds an earlier "
    "run's history (best/, metrics), which is moved to superseded-<time>/.",
)
flags.DEFINE_string("coordinator_address", "", "Multi-process: process 0's host:port.")
flags.DEFINE_integer("num_processes", 1, "Multi-process: how many processes.", lower_bound=1)
flags.DEFINE_integer("process_id", 0, "Multi-process: this process's index.", lower_bound=0)
flags.DEFINE_enum(
    "distributed", "off", ["off", "auto"],
    "auto: jax.distributed.initialize() finds the processes (TPU pod slices, SLURM).",
)  # fmt: skip
flags.mark_flags_as_required(["config", "workdir"])


def run(fv: flags.FlagValues) -> None:
    distributed.initialize(
        fv.coordinator_address, fv.num_processes, fv.process_id, auto=fv.distributed == "auto"
    )
    config_checks.check_reference_overrides(
        fv.config, config_flags.get_override_values(fv["config"])
    )
    logging.info("Config:\n%s", fv.config)
    followers = config_checks.references(fv.config)
    if followers:  # an override of a follower detaches it; of its owner, carries it along
        logging.info(
            "Fields that follow another (unless set themselves): %s",
            ", ".join(f"{k} <- {v}" for k, v in sorted(followers.items())),
        )
    loop.train_and_evaluate(
        fv.config,
        fv.workdir,
        allow_config_change=fv.allow_config_change,
        start_over=fv.start_over,
    )


if __name__ == "__main__":
    cli.define_command_flags(FLAGS)
    jax.config.config_with_absl()  # jax's own flags in --helpfull, as flax's lm1b
    prog = "python -m vae_jax.main"
    app.run(cli.absl_main(run, prog), flags_parser=cli.flags_parser(prog))
