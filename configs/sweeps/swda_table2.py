"""Table 2 of Fu et al. (2019): {CVAE, CVAE+BoW} × {monotonic, cyclical} on SwitchBoard.

    python -m vae_jax.sweep --sweep=configs/sweeps/swda_table2.py --workdir=runs/table2 \
        --nopack --parallel=1
    python -m vae_jax.sweep --sweep=configs/sweeps/swda_table2.py --workdir=runs/table2 \
        --nopack --only=swda-cvae_cyclical_5.seed-0,swda-cvae_monotonic_5.seed-0
    python experiments/table2_dialog.py runs/table2 --archive experiments/results/dialog/runs \
        --out experiments/results/dialog

Runs are named ``swda-<variant>_<cycles>.seed-<s>``. The plain-CVAE pair comes first
(without the bag-of-words loss the KL is free to vanish: the column where the schedule is
tested), then CVAE+BoW; seed 0 of every row before seed 1.
Each run validates every 1,716 steps, stops early by the official rule and keeps its best
valid −ELBO in ``best/``, the checkpoint the table tests (`configs/swda.py`).
``:<cycles>`` caps every run at that many cycles of 5,148 steps (default 5, 15 validations;
``:20`` is the official cap of 60 validations). ``:<cycles>:bfloat16`` runs every matmul with
bfloat16 operands (``model.dtype``; about 1.2× faster on a CPU with AVX-512 BF16,
`benchmarks/results/cvae_bf16_cpu.json`), the run names unchanged.
"""

from vae_jax.run.sweep import product, sweep

VARIANTS = ("cvae_cyclical", "cvae_monotonic", "cvae_bow_cyclical", "cvae_bow_monotonic")


def get_sweep(spec: str = "5"):
    cycles, dtype = (spec.split(":") + ["float32"])[:2]  # "<cycles>[:<dtype>]"
    fields = [
        sweep("seed", [0, 1]),
        sweep("config", [f"configs/swda.py:{v}:{int(cycles)}" for v in VARIANTS]),
    ]
    if dtype != "float32":  # float32 runs keep the commands they always had
        fields.append(sweep("model.dtype", [dtype]))
    return product(fields)
