"""Trains a vae_jax model.

    python -m vae_jax.main --config=configs/synthetic.py:cyclical --workdir=runs/synth
    python -m vae_jax.main --config=configs/synthetic.py:monotonic --workdir=runs/m \
        --config.num_train_steps=2000
"""

from vae_jax import host

if __name__ == "__main__":
    host.tune_cpu_host("vae_jax.main")  # before jax loads: see vae_jax.host

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vae_jax import train  # noqa: E402

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
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.info("Config:\n%s", FLAGS.config)
    train.train_and_evaluate(
        FLAGS.config, FLAGS.workdir, allow_config_change=FLAGS.allow_config_change
    )


if __name__ == "__main__":
    app.run(main)
