"""β cycles or learning-rate restarts? The 2 × 2 on PTB (β monotonic or cyclical × lr constant or
cosine-restarted every 10 epochs), 40 epochs, 3 seeds a cell.

    python -m vae_jax.sweep --sweep=configs/sweeps/ptb_ablation.py --workdir=runs/ablation \
        --nopack --parallel=2 \
        --evaluate='--split=test --num_importance_samples=50 --checkpoint=best'
    python experiments/table1_ptb.py runs/ablation --plot curves.png \
        --archive experiments/results/beta_or_lr/runs
    python experiments/beta_or_lr.py experiments/results/beta_or_lr/runs \
        --out experiments/results/beta_or_lr          # the cells, contrasts and Welch tests

``:new`` gives only the two cells the official code has no script for (cyclical β with a
constant lr, monotonic β with restarts); the other two are Table 1's rows
(`configs/sweeps/ptb_table1.py`), seed 0 of every cell first.
"""

from vae_jax.run.sweep import product, sweep

CELLS = ("cyclical", "monotonic", "cyclical_lr_constant", "monotonic_lr_restarts")


def get_sweep(cells: str = "all"):
    if cells not in ("all", "new"):
        raise ValueError(f"ptb_ablation.py:{cells}: must be 'all' or 'new'")
    chosen = CELLS if cells == "all" else CELLS[2:]
    return product(
        [
            sweep("seed", [0, 1, 2]),
            sweep("config", [f"configs/ptb.py:{c}" for c in chosen]),
        ]
    )
