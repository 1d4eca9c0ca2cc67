"""The run-control fields every task's config shares, set in one place.

Each task's config (`configs.ptb`, `configs.synthetic`, `configs.yelp`, `configs.swda`) calls
these with the values that are its own; the field names and meanings are the same everywhere.
"""

from __future__ import annotations

import ml_collections

from vae_jax.core import models, objectives, savae


def split_variant(path: str, variant: str, variants: tuple[str, ...]) -> tuple[str, str]:
    """(remedy, schedule variant) of ``<remedy>_<schedule>`` (`objectives.split_variant`),
    after checking ``variant`` is one of ``variants`` of the config file ``path``."""
    if variant not in variants:
        raise ValueError(f"{path}:{variant}: variant must be one of {variants}.")
    return objectives.split_variant(variant)


def new_config() -> ml_collections.ConfigDict:
    """A task's config, holding what every run starts from: its seeds and population
    (`vae_jax.run.population`)."""
    config = ml_collections.ConfigDict()
    config.seed = 0  # parameters and noise
    config.data_seed = -1  # the data order; -1: config.seed
    # A population: this many members, seeds seed … seed+K−1, trained as one vmapped program
    # on the same batches; population_fields gives per-member values of named fields, e.g.
    # (("beta_schedule.ratio", (0.25, 0.5, 0.75)),).
    config.population_size = 1
    config.population_fields = ()
    return config


def checkpointing(
    config: ml_collections.ConfigDict, *, every_steps: int, keep_period: int, to_keep: int = 3
) -> None:
    """Checkpoints every ``every_steps``, also at every epoch end and at the end; the last
    ``to_keep`` are kept, and every one at a multiple of ``keep_period`` steps (0: none), so
    the last one written before a divergence is not rotated out by the diverged ones after
    it."""
    config.checkpoint_every_steps = every_steps
    config.checkpoints_to_keep = to_keep
    config.checkpoint_keep_period = keep_period


def guards(config: ml_collections.ConfigDict) -> None:
    """The run's guards (`vae_jax.run.guards`, docs/reliability.md)."""
    # Consecutive steps with a non-finite loss or gradient (skipped) before giving up.
    config.max_nonfinite_steps = 10
    # Several processes: seconds without progress (a step or an evaluation batch) before a
    # process ends the run rather than wait forever in a collective for another (0: never).
    config.collective_timeout_s = 1800.0
    # Loss-spike guard (off at factor 0): a step whose loss exceeds factor x the median of the
    # last `window` applied steps' losses is not applied; action "skip" goes on (and stops
    # after max_nonfinite_steps such steps in a row), "stop" ends the run at once.
    config.loss_spike = ml_collections.ConfigDict({"factor": 0.0, "window": 50, "action": "skip"})


def init_and_precision(config: ml_collections.ConfigDict) -> None:
    """Where the parameters start, and the precision of the steps' matmuls."""
    # Start from another run's parameters (a workdir), re-initialising the top-level
    # parameters whose names start with one of init_reset (e.g. ("dec",): the decoder).
    config.init_from = ""
    config.init_reset = ()
    # Matmul precision of the train and eval steps (jax.default_matmul_precision's names).
    # "highest": float32 products are float32 on every backend (GPUs default to TF32, TPUs to
    # one bfloat16 pass), so the paper figures and the layer-set agreement hold there too; the
    # CPU computes float32 exactly either way, so it costs nothing here. "default" trades that
    # for speed on an accelerator; bfloat16 layers (model.dtype) keep their one pass.
    config.matmul_precision = "highest"


def vae_layers(
    config: ml_collections.ConfigDict, *, remedy: str, svi_steps: int, **options
) -> None:
    """The VAE's layers and encoder (`models.options`: kernels "auto", "cpu" or "plain"; dtype
    "float32" or "bfloat16"; encoder "lstm" or "cnn", deterministic for an autoencoder), BN-VAE
    (`models.VAE.bn_gamma`: batch-normalised μ with a fixed scale γ for the "bn_vae" remedy, 0
    is off) and SA-VAE's SVI refinement at the reference's settings (`savae.SAVAE`; svi_steps
    = 0 is the plain VAE)."""
    config.model.update(models.options(**options))
    config.model.bn_gamma = objectives.BN_VAE_GAMMA if remedy == "bn_vae" else 0.0
    config.model.bn_momentum = 0.9
    config.model.update(savae.svi_defaults(svi_steps=svi_steps))


def objective(config: ml_collections.ConfigDict, remedy: str = "beta_elbo") -> None:
    """Rec + β·KL, or a KL-vanishing remedy in its place (`vae_jax.core.objectives`; any variant
    takes --config.objective=free_bits|dg_vae); each remedy's hyperparameters in its own
    section. BN-VAE trains on Rec + β·KL (its remedy is in the model)."""
    config.objective = "beta_elbo" if remedy == "bn_vae" else remedy
    for name, fields in objectives.DEFAULTS.items():
        config[name] = ml_collections.ConfigDict(fields)
