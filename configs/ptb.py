"""Penn Treebank language modelling, Fu et al. (2019) Table 1, with the official code's setup.

    python -m vae_jax.main --config=configs/ptb.py:cyclical --workdir=runs/ptb_cyclical
    python -m vae_jax.main --config=configs/ptb.py:monotonic --workdir=runs/ptb_monotonic
    python -m vae_jax.main --config=configs/ptb.py:constant --workdir=runs/ptb_constant
    python -m vae_jax.main --config=configs/ptb.py:savae_cyclical --workdir=runs/ptb_savae_cyclical
    python -m vae_jax.main --config=configs/ptb.py:savae_monotonic --workdir=runs/ptb_savae_mono
    python -m vae_jax.main --config=configs/ptb.py:savae_size --workdir=runs/ptb_big
    python -m vae_jax.main --config=configs/ptb.py:free_bits --workdir=runs/ptb_free_bits
    python -m vae_jax.main --config=configs/ptb.py:dg_vae --workdir=runs/ptb_dg_vae
    python -m vae_jax.main --config=configs/ptb.py:bn_vae --workdir=runs/ptb_bn_vae
    python -m vae_jax.main --config=configs/ptb.py:cyclical_lr_constant --workdir=runs/ptb_cyc_lr1
    python -m vae_jax.main --config=configs/ptb.py:monotonic_lr_restarts --workdir=runs/ptb_mono_lr
    python experiments/table1_ptb.py runs/ptb_*                       # the Table 1 layout

Reads Mikolov's ``ptb.{train,valid,test}.txt`` from ``config.data.data_dir`` (default
``$VAE_JAX_DATA_DIR/ptb``); the TFDS build goes to ``config.data.tfds_dir`` (default
``$VAE_JAX_TFDS_DIR`` or ``~/.cache/vae_jax/tfds``). ``--config.num_epochs=N`` shortens a run;
the schedules stay defined in epochs (``schedule_unit = "epochs"``, converted with the steps
per epoch the data gives: 1,359 batches of up to 32 same-length sentences for PTB).

As the official PTB code (Fu et al.'s ``language_model``, from Kim et al.'s SA-VAE code):
- LSTM VAE: embeddings 256, LSTM hidden 256, latent 32, decoder input and output dropout 0.5,
  every parameter initialised from U(−0.1, 0.1).
- Adam, learning rate 1e-3, gradient-norm clipping 5, batches of 32 sentences of one length,
  40 epochs, sentences longer than 200 words dropped (none in PTB). The batches are drawn
  once and only their order changes between epochs (``data.batch_composition = "fixed"``):
  the official data fixes them at preprocessing.
- ``:cyclical``: β in cycles of 10 epochs; each cycle β restarts at 0.1 and rises by 1/5 per
  epoch (start 0.1, ratio 0.45: β = 1 after 4.5 epochs), then holds 1. The learning rate
  restarts with each cycle, updated per epoch: 1e-3 · 0.5 · (1 + cos(π ((epoch − 1) mod 10)/10)).
- ``:monotonic``: β from 0.1 rising by 1/10 per epoch to 1 (after 9 epochs), then 1; lr 1e-3.
- ``:constant``: β = 1 throughout; lr 1e-3.
- ``:cyclical_lr_constant``, ``:monotonic_lr_restarts``: the other two cells of β schedule ×
  learning rate (the official scripts tie cyclical β to the restarted cosine lr and monotonic
  β to a constant one): cyclical β with lr 1e-3 throughout, and monotonic β with the cosine lr
  restarted every 10 epochs (`configs/sweeps/ptb_ablation.py`).
- ``:savae_cyclical``, ``:savae_monotonic``: SA-VAE (Kim et al. 2018; `vae_jax.core.savae`) with
  that schedule, the same sizes: K = 10 SVI steps of SGD with momentum 0.5 on each sentence's
  β-ELBO (β from the schedule), end-to-end training through them. The reference descends the
  mean over its 32-sentence batch with lr 1 and clips the batch's gradient at 5: per sentence,
  lr 1/32 and a clip of 5·32 (``svi_lr``, ``svi_max_grad_norm`` are per sentence). Any variant
  becomes an SA-VAE with ``--config.model.svi_steps=10``.
- ``:savae_size``: ``:cyclical`` (a plain VAE) with SA-VAE's Yahoo sizes (embeddings 512,
  hidden 1024).
- ``:free_bits[_<schedule>]`` (cyclical by default): the KL term replaced by free bits, Σ_d
  max(λ, KL̄_d) with λ = 0.5 nats per dimension (Li et al. 2019's form; ``config.free_bits``).
- ``:bn_vae[_<schedule>]``: BN-VAE (Zhu et al. 2020): μ batch-normalised with a fixed scale
  γ = 0.5 and a learned shift, so E[KL] ≥ D·γ²/2 = 4 nats (``config.model.bn_gamma``).
- ``:dg_vae[_<schedule>]``: DG-VAE (Zhang et al. 2022): the density gap of 32 posterior
  samples per sentence over chunks of the whole batch in place of the KL (``config.dg_vae``);
  ``:dg_vae_constant`` is the paper's own setting (β = 1).
- Any variant: ``--config.objective=free_bits|dg_vae`` (SA-VAE included: SVI refines the
  β-ELBO, the model trains on the remedy at λ_K); ``--config.init_from=WORKDIR
  --config.init_reset='("dec",)'`` starts from another run's encoder with a new decoder (Li et
  al. 2019: pre-train an autoencoder with ``--config.beta_schedule.value=0
  --config.best_metric=rec`` on ``:constant``, then ``:free_bits`` from it).

Each epoch evaluates valid and test without dropout, one z sample: Rec, KL, −ELBO and the PPL
bound exp((ΣRec + ΣKL)/#predicted tokens). The best epoch by valid PPL bound is saved under
``workdir/best``.
"""

import ml_collections

from configs import common
from vae_jax.core import objectives

CNN_LENGTH = 201  # the longest row after <s>: max_length words and </s>
BASE = (
    "cyclical", "monotonic", "constant", "savae_size", "savae_cyclical", "savae_monotonic",
    "cyclical_lr_constant", "monotonic_lr_restarts",
)  # fmt: skip
VARIANTS = BASE + tuple(
    f"{remedy}{suffix}"
    for remedy in objectives.REMEDIES
    for suffix in ("", "_cyclical", "_monotonic", "_constant")
)


def get_config(variant: str = "cyclical") -> ml_collections.ConfigDict:
    remedy, variant = common.split_variant("configs/ptb.py", variant, VARIANTS)
    config = common.new_config()
    config.num_epochs = 40
    config.num_train_steps = -1  # derived: num_epochs × steps per epoch
    config.batch_size = 32
    config.eval_batch_size = 32
    config.log_every_steps = 100
    config.eval_every_epochs = 1
    config.eval_every_steps = -1  # unused while eval_every_epochs is set

    common.checkpointing(config, every_steps=1_000, keep_period=20_000)
    common.guards(config)

    config.data = ml_collections.ConfigDict()
    config.data.name = "ptb"
    config.data.data_dir = ""  # "" -> $VAE_JAX_DATA_DIR/ptb
    config.data.tfds_dir = ""  # "" -> $VAE_JAX_TFDS_DIR or ~/.cache/vae_jax/tfds
    config.data.max_length = 200  # words; longer sentences are dropped and counted
    config.data.train_split = "train"
    config.data.eval_splits = ("valid", "test")
    # Rows (<s> words </s>) are padded to the next of these; one more bucket is added for
    # longer rows. PTB rows average 23 tokens, so short buckets are fine-grained.
    config.data.bucket_lengths = (12, 16, 20, 24, 28, 32, 40, 48, 64, 96)
    # "fixed": the batches drawn for epoch 1 are kept and only their order is reshuffled each
    # epoch, as the official data (Kim et al.'s preprocess_text.py) fixes them once;
    # "per_epoch" draws new batches every epoch (vae_jax.data.batching.LengthBatcher).
    config.data.batch_composition = "fixed"

    config.model = ml_collections.ConfigDict()
    big = variant == "savae_size"
    config.model.enc_emb_dim = 512 if big else 256
    config.model.enc_hidden_dim = 1024 if big else 256
    config.model.dec_emb_dim = 512 if big else 256
    config.model.dec_hidden_dim = 1024 if big else 256
    config.model.latent_dim = 32
    config.model.dec_dropout_in = 0.5
    config.model.dec_dropout_out = 0.5
    config.model.init_scale = 0.1
    sa_vae = variant in ("savae_cyclical", "savae_monotonic")
    common.vae_layers(config, remedy=remedy, svi_steps=10 if sa_vae else 0, cnn_length=CNN_LENGTH)

    common.objective(config, remedy)
    common.init_and_precision(config)
    config.grad_clip_norm = 5.0
    # best/ keeps the parameters of the lowest valid PPL bound; "rec" for an autoencoder (β = 0,
    # e.g. the pre-training of Li et al.'s recipe), whose KL is not part of its objective.
    config.best_metric = "ppl_bound"
    # Schedule fields are in epochs, converted to steps with the data's steps per epoch.
    config.schedule_unit = "epochs"
    if variant in ("cyclical", "savae_size", "savae_cyclical", "cyclical_lr_constant"):
        config.beta_schedule = ml_collections.ConfigDict(
            {
                "name": "cyclical",
                "total_steps": 40,
                "num_cycles": 4,
                "ratio": 0.45,
                "start": 0.1,
                "stop": 1.0,
                "shape": "linear",
            }
        )
        config.lr_schedule = ml_collections.ConfigDict(
            {
                "name": "cyclical_cosine_lr",
                "init_value": 1e-3,
                "total_steps": 40,
                "num_cycles": 4,
                "steps_per_update": 1,  # one epoch: the reference updates lr per epoch
            }
        )
    elif variant in ("monotonic", "savae_monotonic", "monotonic_lr_restarts"):
        config.beta_schedule = ml_collections.ConfigDict(
            {"name": "monotonic", "warmup_steps": 9, "start": 0.1, "stop": 1.0}
        )
        config.lr_schedule = ml_collections.ConfigDict({"name": "constant", "value": 1e-3})
    else:
        config.beta_schedule = ml_collections.ConfigDict({"name": "constant", "value": 1.0})
        config.lr_schedule = ml_collections.ConfigDict({"name": "constant", "value": 1e-3})
    # The β schedule and the learning rate's restarts apart (module docstring).
    if variant == "cyclical_lr_constant":
        config.lr_schedule = ml_collections.ConfigDict({"name": "constant", "value": 1e-3})
    if variant == "monotonic_lr_restarts":
        config.lr_schedule = get_config("cyclical").lr_schedule
    return config
