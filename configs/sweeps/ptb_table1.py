"""Table 1 of Fu et al. (2019): {VAE, SA-VAE} × {monotonic, cyclical} × 3 seeds on PTB.

    python -m vae_jax.sweep --sweep=configs/sweeps/ptb_table1.py --workdir=runs/table1
    python -m vae_jax.sweep --sweep=configs/sweeps/ptb_table1.py:vae --workdir=runs/table1
    python experiments/table1_ptb.py runs/table1            # mean ± std over the seeds
    python experiments/table1_ptb.py runs/table1 --archive experiments/results/ptb/runs

``:vae`` and ``:savae`` give one model's two rows. Each row's three seeds train as one
population (the same batches: the data order of seed 0); ``--nopack`` trains them apart, each
with its own order, seed 0 of every row first (the sweep's order). The full length is the
paper's 40 epochs (``configs/ptb.py``). On a CPU a population costs about 1.2× its members
trained apart (``benchmarks/results/population_cpu.json``), so there

    python -m vae_jax.sweep --sweep=configs/sweeps/ptb_table1.py:vae --workdir=runs/table1 \
        --nopack --parallel=2 \
        --evaluate='--split=test --num_importance_samples=50 --checkpoint=best'

gives every row's first seed soonest and the others after it, and scores each run's best
checkpoint on the test split (IW-NLL, MI, AU: the table's last columns) once it has trained.
Where a machine lasts less than a pair of runs side by side, ``--parallel=1 --only=RUN`` (e.g.
``--only=ptb-cyclical.seed-1``) trains one run on all the cores, which finishes it sooner for
a slightly lower total throughput, and the archive keeps it once it is done.
``--archive`` copies each finished run's record (no checkpoint) to commit beside the table;
``table1_ptb.py … --rows_from TABLE.json`` adds the runs of an earlier table whose directories
are gone (in the mean ± std, not the curves).
"""

from vae_jax.run.sweep import product, sweep

MODELS = {"vae": "", "savae": "savae_"}


def get_sweep(models: str = "vae,savae"):
    names = models.split(",")
    unknown = set(names) - set(MODELS)
    if unknown:
        raise ValueError(f"configs/sweeps/ptb_table1.py:{models}: unknown {sorted(unknown)}.")
    variants = [f"{MODELS[m]}{s}" for m in names for s in ("monotonic", "cyclical")]
    return product(
        [sweep("seed", [0, 1, 2]), sweep("config", [f"configs/ptb.py:{v}" for v in variants])]
    )
