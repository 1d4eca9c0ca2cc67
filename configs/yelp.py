"""Yelp pre-training of Fu et al. (2019), Sec. 5.3 / Table 3 (the official ``semi`` code's setup).

    python -m vae_jax.main --config=configs/yelp.py:cyclical --workdir=runs/yelp_cyclical
    python -m vae_jax.main --config=configs/yelp.py:monotonic --workdir=runs/yelp_monotonic
    python -m vae_jax.main --config=configs/yelp.py:ae --workdir=runs/yelp_ae
    python -m vae_jax.main --config=configs/yelp.py:free_bits --workdir=runs/yelp_ae_fb \
        --config.init_from=runs/yelp_ae --config.init_reset='("dec",)'   # Li et al. (2019)
    python -m vae_jax.main --config=configs/yelp.py:tiny --workdir=/tmp/yelp_tiny   # tests

Reads the ``yelp_10pct`` corpus from ``config.data.data_dir`` (default
``$VAE_JAX_DATA_DIR/yelp_shen_sentiment/first10pct``): the first 10% of each file of Shen et
al.'s Yelp corpus as the official code preprocessed it (44,409 / 6,347 / 12,666 sentences,
rare words already ``<unk>``, its 3,641-entry vocabulary in its own order), labels kept in the
batches (``labels``: 0 negative, 1 positive) for the classifier; no label is used here.

As the official code (``semi/semi_yelp_{ae,vae,cyc}_pre.py``, ``model_new.py``):
- CNN encoder (``model.encoder = "cnn"``): the sentence in a window of 25 positions, three
  VALID convolutions of width 5 (300 and 600 filters with stride 2 and ReLU, then 900 over
  what is left, tanh), μ and log σ² by linear maps to a 256-dimensional z;
- one row-normalised 256-dimensional embedding shared by the encoder, the decoder's input and
  its output layer, logits = h·(W Êᵀ) + b (``model.embedding = "shared_normalized"``);
- LSTM decoder: 256 units, [embedding; z] at every step, h₀ = Dense(z), dropout 0.5 on the
  input embeddings and the LSTM outputs;
- Adam 1e-4, no gradient clipping, batches of 32, 100 epochs, sentences of at most 15 words
  (the official maxlen 17 counts </s> and drops the rest: none here);
- ``:ae``: an autoencoder, z = μ deterministic and β = 0; lr × 0.99 every 2 epochs;
- ``:monotonic``: β from 0 to 1 over the first 10 epochs; lr × 0.99 every 2 epochs;
- ``:cyclical``: 10 cycles of 10 epochs, β rising linearly from 0 to 1 over the first half of
  each (R = 0.5), then 1; the lr restarts at 1e-4 with each cycle and decays on a cosine
  (updated every step);
- ``:free_bits``: ``:monotonic`` with free bits (Li et al. 2019), Σ_d max(λ, KL̄_d) with
  λ = 16 nats / 256 dimensions (``FREE_BITS_TOTAL``); from the autoencoder's encoder
  (``init_from``, the decoder reset; the shared embedding is kept) it is Li et al.'s "AE + FB";
- ``:tiny``: ``:cyclical`` shrunk for tests (two epochs, small layers).

Deviations from the official code, documented: parameters are initialised U(−0.1, 0.1) like
the PTB model (the official code uses Xavier, a constant 0.001 for the first convolution and
U(±0.001) for the embedding, whose rows are normalised anyway, and TF's LSTMCell adds 1 to
the forget gate's pre-activation);
Rec is summed over the sentence's own tokens and ``</s>`` (the official loss also counts the
predictions of the padding after ``</s>`` up to 24 positions); batches hold sentences of one
length (the official ones are random, padded to 25).
"""

import ml_collections

from configs import common

VARIANTS = ("ae", "monotonic", "cyclical", "free_bits", "tiny")
# Free bits' floor in all, shared out over z's dimensions: 16 nats, the total that Li et al.'s
# λ = 0.5 gives their 32-dimensional z (0.5 on each of 256 would floor the KL at 128 nats).
FREE_BITS_TOTAL = 16.0
EPOCHS = 100


def get_config(variant: str = "cyclical") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"configs/yelp.py:{variant}: variant must be one of {VARIANTS}.")
    config = common.new_config()
    config.num_epochs = EPOCHS
    config.num_train_steps = -1
    config.batch_size = 32
    config.eval_batch_size = 32
    config.log_every_steps = 100
    config.eval_every_epochs = 1
    config.eval_every_steps = -1
    common.checkpointing(config, every_steps=2_000, keep_period=0)
    # Each cycle's end (epochs 10, 20, …, 100) is kept besides the last and the best, so the
    # classifier can read the features of every cycle (`experiments/table3_classify.py`).
    config.checkpoint_keep_every_epochs = 10
    common.guards(config)

    config.data = ml_collections.ConfigDict()
    config.data.name = "yelp_10pct"
    config.data.data_dir = ""  # "" -> $VAE_JAX_DATA_DIR/yelp_shen_sentiment/first10pct
    config.data.tfds_dir = ""
    config.data.max_length = 15  # words; the official maxlen 17 counts <s>... </s>
    config.data.train_split = "train"
    config.data.eval_splits = ("valid", "test")
    config.data.bucket_lengths = (8, 12, 17)
    # New batches within each length every epoch (the official Yelp batches are random
    # sentences padded to 25, neither "fixed" nor length-sorted).
    config.data.batch_composition = "per_epoch"

    config.model = ml_collections.ConfigDict()
    config.model.enc_emb_dim = 256
    config.model.enc_hidden_dim = 256  # unused by the CNN encoder
    config.model.dec_emb_dim = 256
    config.model.dec_hidden_dim = 256
    config.model.latent_dim = 256
    config.model.dec_dropout_in = 0.5
    config.model.dec_dropout_out = 0.5
    config.model.init_scale = 0.1
    # The CNN encoder's window holds the longest row after <s> (15 words and </s>) and more,
    # as the official window of 25 = 17 + 2·4 does; an autoencoder's z is μ.
    common.vae_layers(
        config, remedy="beta_elbo", svi_steps=0,
        encoder="cnn", cnn_filters=(300, 600, 900), cnn_width=5, cnn_stride=2,
        cnn_length=17, deterministic=variant == "ae", embedding="shared_normalized",
    )  # fmt: skip

    common.objective(config)
    common.init_and_precision(config)
    config.grad_clip_norm = float("inf")  # the official code does not clip
    # best/ by the valid PPL bound; the autoencoder's by Rec, its KL being no objective (z = μ).
    config.best_metric = "rec" if variant == "ae" else "ppl_bound"
    config.schedule_unit = "epochs"
    decay = {"name": "exponential", "init_value": 1e-4, "transition_steps": 2, "decay_rate": 0.99}
    if variant == "ae":
        config.beta_schedule = ml_collections.ConfigDict({"name": "constant", "value": 0.0})
        config.lr_schedule = ml_collections.ConfigDict(decay)
    elif variant in ("monotonic", "free_bits"):
        config.beta_schedule = ml_collections.ConfigDict(
            {"name": "monotonic", "warmup_steps": 10, "start": 0.0, "stop": 1.0}
        )
        config.lr_schedule = ml_collections.ConfigDict(decay)
    else:
        epochs = 2 if variant == "tiny" else EPOCHS
        cycles = 2 if variant == "tiny" else EPOCHS // 10
        config.beta_schedule = ml_collections.ConfigDict(
            {
                "name": "cyclical", "total_steps": epochs, "num_cycles": cycles,
                "ratio": 0.5, "start": 0.0, "stop": 1.0, "shape": "linear",
            }
        )  # fmt: skip
        config.lr_schedule = ml_collections.ConfigDict(
            {
                "name": "cyclical_cosine_lr", "init_value": 1e-4, "total_steps": epochs,
                "num_cycles": cycles, "steps_per_update": 1e-6,  # every step
            }
        )  # fmt: skip
    if variant == "free_bits":
        config.objective = "free_bits"
        config.free_bits.lambda_per_dim = FREE_BITS_TOTAL / config.model.latent_dim
    if variant == "tiny":
        config.num_epochs = 2
        config.log_every_steps = 20
        config.model.update(
            enc_emb_dim=16, dec_emb_dim=16, dec_hidden_dim=16, latent_dim=8,
            cnn_filters=(8, 8, 16),
        )  # fmt: skip
    return config
