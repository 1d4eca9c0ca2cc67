"""The synthetic 10-sequence experiment of Fu et al. (2019), Sec. 3, Figs. 3–4.

    python -m vae_jax.main --config=configs/synthetic.py:cyclical --workdir=runs/synth_cyclical
    python -m vae_jax.main --config=configs/synthetic.py:monotonic --workdir=runs/synth_monotonic
    python -m vae_jax.main --config=configs/synthetic.py:constant --workdir=runs/synth_constant
    python experiments/fig3_synthetic.py --out runs/synthetic     # all three + figures
    python -m vae_jax.main --config=configs/synthetic.py:savae_cyclical --workdir=runs/synth_sa

Reproduces the comparison of constant β = 1, monotonic (linear ramp 0 → 1 over the first quarter
of training, 10K of 40K iterations) and cyclical (M = 4 cycles, ramp ratio R = 0.5) schedules.
The schedules are FieldReferences to ``num_train_steps``: ``--config.num_train_steps=N`` shortens
the run and the schedules shrink with it; ``--config.beta_schedule.total_steps=M`` (or
``warmup_steps``) sets the schedule alone, whatever the flags' order. ``vae_jax.main`` logs
which fields follow which.

The paper does not publish its generator; the choices made here:
- Data: 10 distinct sequences of 10 word tokens, drawn uniformly from a 100-word vocabulary (plus
  the 4 special ids) by a seeded RNG, each wrapped in ``<s> … </s>``; training batches draw them
  uniformly with replacement. The ideal −ELBO is ln 10 ≈ 2.303 nats per sequence.
- Model: the same LSTM VAE as the language-model experiments, small: embeddings 32, LSTM hidden 64,
  latent dimension 2 so posteriors can be plotted directly (``--config.model.latent_dim=3`` is the
  other option), no dropout, uniform(±0.1) initialisation.
- Optimisation: Adam, learning rate 1e-3, global-norm clipping 5, batch 32, 40K iterations.

``:free_bits[_<schedule>]`` and ``:dg_vae[_<schedule>]`` (cyclical by default) train the same
model with a KL-vanishing remedy in place of the KL term (``vae_jax.core.objectives``; free
bits with λ = 0.5 nats per dimension, DG-VAE's density gap of 32 samples per sequence over the
batch);
``:bn_vae[_<schedule>]`` batch-normalises μ with a fixed γ = 0.5 (BN-VAE, Zhu et al. 2020).

``:monotonic_lr_restarts`` and ``:cyclical_lr_restarts`` restart the learning rate on a cosine
with each of 4 cycles (lr = ½·10⁻³·(1 + cos(π τ)), τ the position in the cycle), so that with
``:monotonic`` and ``:cyclical`` (constant lr) they make the 2 × 2 of β schedule × learning
rate (``python experiments/fig3_synthetic.py
--schedules=monotonic,cyclical,monotonic_lr_restarts,cyclical_lr_restarts``).

``:savae_<schedule>`` (or ``--config.model.svi_steps=K`` on any variant) trains the same model as
an SA-VAE (Kim et al. 2018, `vae_jax.core.savae`): 10 SVI steps on each sequence's β-ELBO refine the
encoder's posterior, with the PTB reference's settings (``configs/ptb.py``). Fixed-step SVI is
stable only while the posterior variance σ² exceeds about α/(2(1 + γ)) ≈ 0.01 here, and these
posteriors can get sharper (it is then held back by the clipping): check ``svi_lr`` against
them.
"""

import ml_collections

from configs import common
from vae_jax.core import objectives

SCHEDULES = ("constant", "monotonic", "cyclical")
# β cycles or learning-rate restarts (the PTB ablation's 2 × 2 on this task): the learning rate
# restarted on a cosine with each of the 4 cycles, beside either β schedule.
LR_RESTARTS = ("monotonic_lr_restarts", "cyclical_lr_restarts")
CNN_LENGTH = 11  # the longest row after <s>: data.length words and </s>
VARIANTS = (
    SCHEDULES
    + LR_RESTARTS
    + tuple(f"savae_{s}" for s in SCHEDULES)
    + tuple(f"{r}{x}" for r in objectives.REMEDIES for x in ("", *(f"_{s}" for s in SCHEDULES)))
)


def get_config(variant: str = "cyclical") -> ml_collections.ConfigDict:
    remedy, variant = common.split_variant("configs/synthetic.py", variant, VARIANTS)
    config = common.new_config()
    config.num_train_steps = 40_000
    config.batch_size = 32
    config.eval_batch_size = 16
    config.log_every_steps = 50
    config.eval_every_steps = 1_000
    config.steps_per_epoch = -1  # synthetic data is a stream without epochs

    common.checkpointing(config, every_steps=5_000, keep_period=10_000)
    common.guards(config)

    config.data = ml_collections.ConfigDict()
    config.data.name = "synthetic"
    config.data.num_sequences = 10
    config.data.length = 10
    config.data.vocab_size = 104
    config.data.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.enc_emb_dim = 32
    config.model.enc_hidden_dim = 64
    config.model.dec_emb_dim = 32
    config.model.dec_hidden_dim = 64
    config.model.latent_dim = 2
    config.model.dec_dropout_in = 0.0
    config.model.dec_dropout_out = 0.0
    config.model.init_scale = 0.1
    svi_steps = 10 if variant.startswith("savae_") else 0
    common.vae_layers(config, remedy=remedy, svi_steps=svi_steps, cnn_length=CNN_LENGTH)

    common.objective(config, remedy)
    common.init_and_precision(config)
    config.grad_clip_norm = 5.0
    config.best_metric = "ppl_bound"  # best/ by the valid PPL bound (runs.BEST_METRICS)
    # Schedule fields are in steps (schedule_unit "epochs" multiplies them by steps per epoch).
    config.schedule_unit = "steps"
    config.lr_schedule = ml_collections.ConfigDict({"name": "constant", "value": 1e-3})

    steps = config.get_ref("num_train_steps")
    schedule = variant.removeprefix("savae_").removesuffix("_lr_restarts")
    if variant in LR_RESTARTS:
        config.lr_schedule = ml_collections.ConfigDict(
            {
                "name": "cyclical_cosine_lr", "init_value": 1e-3, "total_steps": steps * 1,
                "num_cycles": 4, "steps_per_update": 1,
            }
        )  # fmt: skip
    if schedule == "constant":
        config.beta_schedule = ml_collections.ConfigDict({"name": "constant", "value": 1.0})
    elif schedule == "monotonic":
        config.beta_schedule = ml_collections.ConfigDict(
            {"name": "monotonic", "warmup_steps": steps // 4, "start": 0.0, "stop": 1.0}
        )
    else:
        config.beta_schedule = ml_collections.ConfigDict(
            {
                "name": "cyclical",
                # A derived reference (steps * 1), not `steps` itself: an override of
                # total_steps alone then leaves num_train_steps (one shared reference would
                # set both), and num_train_steps still carries the cycle along.
                "total_steps": steps * 1,
                "num_cycles": 4,
                "ratio": 0.5,
                "start": 0.0,
                "stop": 1.0,
                "shape": "linear",
            }
        )
    return config
