"""Table 3 of Fu et al. (2019): Yelp pre-training with the three variants of `configs/yelp.py`.

    python -m vae_jax.sweep --sweep=configs/sweeps/yelp_table3.py --workdir=runs/yelp
    python -m vae_jax.sweep --sweep=configs/sweeps/yelp_table3.py:10 --workdir=runs/yelp
    python experiments/yelp_classify.py runs/yelp/yelp-ae.seed-0 runs/yelp/yelp-monotonic.seed-0 \
        runs/yelp/yelp-cyclical.seed-0 --out experiments/results/yelp

Li et al.'s (2019) "AE + FB" row starts from the autoencoder once it is done, then joins the
table (the other runs' results are reused):

    python -m vae_jax.main --config=configs/yelp.py:free_bits --config.num_epochs=10 \
        --config.init_from=runs/yelp/yelp-ae.seed-0 --config.init_reset='("dec",)' \
        --workdir=runs/yelp/yelp-ae_fb.seed-0
    python experiments/yelp_classify.py runs/yelp/yelp-{ae,monotonic,cyclical,ae_fb}.seed-0 \
        --out experiments/results/yelp

``:<epochs>`` shortens every variant to that many epochs (the schedules keep their 100-epoch
definition, so a short run is the start of the full one); the paper trains 100.
"""

from vae_jax.sweep import product, sweep


def get_sweep(epochs: str = "100"):
    return product(
        [
            sweep("config", [f"configs/yelp.py:{v}" for v in ("ae", "monotonic", "cyclical")]),
            sweep("seed", [0]),
            sweep("num_epochs", [int(epochs)]),
        ]
    )
