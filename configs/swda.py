"""Dialog response generation of Fu et al. (2019), Sec. 5.2 / Table 2: Zhao et al.'s (2017) CVAE
on SwitchBoard, plain and with the bag-of-words loss, each with a monotonic and a cyclical β
(the official ``dialog/`` code's setup).

    python -m vae_jax.main --config=configs/swda.py:cvae_cyclical --workdir=runs/swda_cvae_cyc
    python -m vae_jax.main --config=configs/swda.py:cvae_monotonic --workdir=runs/swda_cvae_mono
    python -m vae_jax.main --config=configs/swda.py:cvae_bow_cyclical --workdir=...
    python -m vae_jax.main --config=configs/swda.py:cvae_bow_monotonic --workdir=...
    python -m vae_jax.main --config=configs/swda.py:cvae_cyclical:5 --workdir=...  # ≤ 5 cycles
    python -m vae_jax.main --config=configs/swda.py:tiny --workdir=/tmp/swda_tiny  # tests
    python -m vae_jax.evaluate --workdir=runs/swda_cvae_cyc --checkpoint=best   # Table 2
    python experiments/table2_dialog.py runs/swda_*

**Stand-in training data (a documented deviation).** The NeuralDialog-CVAE training split
(2,316 dialogs of all of Switchboard) is not available here. Training uses a stand-in: the
~1,100 conversations of the 1997 SwDA release that are not among the real valid/test dialogs
(`vae_jax.dialog.swda`, checked disjoint); valid and test are the real ones (60 and 62
dialogs). The vocabulary (10,000 words) and topics come from the stand-in's train split.

As the official code (``dialog/config_utils_{bl,cyc}.py``, ``models/cvae_{bl,cyc}.py``, with
``use_hcf = False``: the plain CVAE without dialog-act features):
- ``cvae_*``: the plain CVAE (``model.use_bow = False``: no bag-of-words head, no BOW loss);
  ``cvae_bow_*``: CVAE+BoW (the bag-of-words loss added to the objective); ``monotonic`` and
  ``cyclical`` are the older names of ``cvae_bow_monotonic`` and ``cvae_bow_cyclical``;
- word embeddings 200, a bidirectional GRU utterance encoder of 300 units per direction, a
  600-unit context GRU over the 9 utterances before the response (a window of 10 with it),
  each with its floor; the topic (embedding 30) and both callers' profiles as conditions;
  latent 200 with a recognition network q(z|x,c) and a prior network p(z|c); a 400-unit GRU
  decoder from h₀ = W[c; z]; responses of at most 40 tokens;
- parameters U(−0.08, 0.08), Adam 1e-3, gradients clipped at global norm 5 (the official
  ``grad_clip = 5.0`` is a global-norm clip), batches of 30 (valid/test 60), no dropout;
- ``:monotonic``: β = min(t / 10,000, 1), a constant learning rate;
- ``:cyclical``: cycles of 5,148 iterations (3/4 of the official 6,864 batches an epoch), β
  rising linearly over the first 2/3 of each (3,432 steps, R = 2/3) then 1, and the learning
  rate restarted each cycle on a cosine, lr = ½·10⁻³·(1 + cos(π·τ)), τ the position in the
  cycle (``lr_schedule``, a field of its own: set ``--config.lr_schedule.name=constant
  --config.lr_schedule.value=1e-3`` to keep the β cycles alone);
- validation every 1,716 steps (a third of a cycle), at most 60 validations (20 cycles'
  steps), and the official early stopping (`vae_jax.run.early_stopping`: patience 10
  validations, raised to 2 v at the v-th validation that improves the valid −ELBO by 0.4%);
  ``best/`` keeps the parameters of the lowest valid −ELBO (by the PPL bound, its ranking on
  one split), the checkpoint the official code tests;
- ``:<variant>:<n>``: at most n cycles' steps (n × 5,148; default 20, the 60 validations);
  the same length for both schedules, so the two are compared at equal cost;
- ``:<variant>:<n>:<c>``: a shortened run, n cycles of c steps (instead of 5,148), every
  step count of both schedules (the monotonic warm-up of 10,000 steps, the evaluation
  interval) scaled by c / 5,148, so that a CPU-sized run keeps the paper's proportions: a
  documented deviation in length, not in shape;
- ``:tiny``: ``:cvae_bow_cyclical`` shrunk for tests (small layers, 2 cycles of 6 steps).

The official monotonic script validates every 3,000 steps; here both schedules validate every
1,716, so their early stopping and selection see the same points.
"""

import ml_collections

from configs import common

VARIANTS = (
    "cvae_monotonic", "cvae_cyclical", "cvae_bow_monotonic", "cvae_bow_cyclical",
    "monotonic", "cyclical", "tiny",
)  # fmt: skip
CYCLE_STEPS = 5_148  # the official cycle: 6,864 batches an epoch × 3/4
DEFAULT_CYCLES = 20  # 60 validations of 1,716 steps, the official max_epoch


def get_config(variant: str = "cyclical") -> ml_collections.ConfigDict:
    name, *counts = variant.split(":")
    if (
        name not in VARIANTS
        or len(counts) > 2
        or not all(c.isdigit() and int(c) > 0 for c in counts)
    ):
        raise ValueError(
            f"configs/swda.py:{variant}: variant must be one of {VARIANTS}, optionally "
            "followed by :<number of cycles> and :<steps per cycle> (positive integers)."
        )
    tiny = name == "tiny"
    use_bow = not name.startswith("cvae_") or name.startswith("cvae_bow_")
    schedule = "monotonic" if name.endswith("monotonic") else "cyclical"
    num_cycles = int(counts[0]) if counts else (2 if tiny else DEFAULT_CYCLES)
    cycle = int(counts[1]) if len(counts) > 1 else (6 if tiny else CYCLE_STEPS)
    scale = cycle / CYCLE_STEPS  # of every step count: 1 but for shortened runs
    config = common.new_config()
    config.num_epochs = -1  # a fixed number of steps: cycles × CYCLE_STEPS
    config.num_train_steps = num_cycles * cycle
    config.batch_size = 4 if tiny else 30
    config.eval_batch_size = 64 if tiny else 60
    config.log_every_steps = 2 if tiny else 100
    config.eval_every_epochs = -1
    config.eval_every_steps = max(cycle // 3, 1)  # the official 1,716 for 5,148
    common.checkpointing(config, every_steps=1_000, keep_period=0)
    # Zhao et al.'s early stopping (`vae_jax.run.early_stopping`); patience 0: off.
    config.early_stopping = ml_collections.ConfigDict(
        {"patience": 10, "improve_threshold": 0.996, "patience_increase": 2.0}
    )
    common.guards(config)

    config.data = ml_collections.ConfigDict()
    config.data.name = "swda"
    config.data.data_dir = ""  # "" -> $VAE_JAX_DATA_DIR (holding swda/ and swda_raw/)
    config.data.tfds_dir = ""
    config.data.max_vocab = 10_000
    config.data.window = 10  # utterances, the response included (official backward_size)
    config.data.max_utt_len = 40  # tokens, <s> and </s> included
    config.data.train_split = "train"
    config.data.eval_splits = ("valid", "test")
    config.data.bucket_lengths = (12, 24, 40)  # responses; contexts are padded to 40

    config.model = ml_collections.ConfigDict()
    config.model.kind = "cvae"
    config.model.emb_dim = 200
    config.model.topic_emb_dim = 30
    config.model.utt_hidden_dim = 300
    config.model.ctx_hidden_dim = 600
    config.model.dec_hidden_dim = 400
    config.model.latent_dim = 200
    config.model.bow_hidden_dim = 400
    config.model.init_scale = 0.08
    config.model.use_bow = use_bow
    config.model.kernels = "auto"  # CPU-tuned GRUs on the CPU, plain JAX elsewhere
    # The matmuls' operands: "bfloat16" rounds them (float32 accumulation, parameters and
    # loss), about 1.2x faster on a CPU with AVX-512 BF16 (benchmarks/results/cvae_bf16_cpu.json).
    config.model.dtype = "float32"
    if tiny:
        config.model.update(
            emb_dim=8, topic_emb_dim=4, utt_hidden_dim=8, ctx_hidden_dim=8,
            dec_hidden_dim=8, latent_dim=4, bow_hidden_dim=8,
        )  # fmt: skip
        config.data.max_vocab = 200

    common.objective(config)
    common.init_and_precision(config)
    config.grad_clip_norm = 5.0
    config.best_metric = "ppl_bound"  # best/ by the valid PPL bound (runs.BEST_METRICS)
    config.schedule_unit = "steps"
    total = config.num_train_steps
    if schedule == "monotonic":
        config.beta_schedule = ml_collections.ConfigDict(
            {"name": "monotonic", "warmup_steps": round(10_000 * scale), "start": 0.0, "stop": 1.0}
        )
        config.lr_schedule = ml_collections.ConfigDict({"name": "constant", "value": 1e-3})
    else:
        config.beta_schedule = ml_collections.ConfigDict(
            {
                "name": "cyclical", "total_steps": total, "num_cycles": num_cycles,
                "ratio": 2 / 3, "start": 0.0, "stop": 1.0, "shape": "linear",
            }
        )  # fmt: skip
        config.lr_schedule = ml_collections.ConfigDict(
            {
                "name": "cyclical_cosine_lr", "init_value": 1e-3, "total_steps": total,
                "num_cycles": num_cycles, "steps_per_update": 1,
            }
        )  # fmt: skip
    return config
