"""Table 3 of Fu et al. (2019): Yelp pre-training with the three variants of `configs/yelp.py`.

    python -m vae_jax.sweep --sweep=configs/sweeps/yelp_table3.py --workdir=runs/yelp \
        --nopack --parallel=2
    python -m vae_jax.sweep --sweep=configs/sweeps/yelp_table3.py --workdir=runs/yelp \
        --nopack --only='yelp-*.seed-0'          # one seed of the three variants
    python experiments/table3_classify.py runs/yelp/yelp-*.seed-*/ --out runs/yelp_classified \
        --protocol=official                       # and the balanced protocol, cycle ends: README
    python experiments/table3_yelp.py runs/yelp/yelp-*.seed-*/ --classified runs/yelp_classified \
        --archive experiments/results/yelp/runs --out experiments/results/yelp

Seeds 0–2 of each variant, seed by seed (cyclical, monotonic, then the autoencoder), 100
epochs each as the paper; every run keeps its cycle ends (epochs 10, 20, …) and its best
checkpoint by valid −ELBO (the PPL bound's ranking; by Rec for the autoencoder) besides the
last. Li et al.'s (2019) "AE + FB" row starts from the autoencoder once it is done:

    python -m vae_jax.main --config=configs/yelp.py:free_bits \
        --config.init_from=runs/yelp/yelp-ae.seed-0 --config.init_reset='("dec",)' \
        --workdir=runs/yelp/yelp-ae_fb.seed-0

``:<epochs>`` shortens every variant to that many epochs (the schedules keep their 100-epoch
definition, so a short run is the start of the full one).
"""

from vae_jax.run.sweep import product, sweep


def get_sweep(epochs: str = "100"):
    return product(
        [
            sweep("seed", [0, 1, 2]),
            sweep("config", [f"configs/yelp.py:{v}" for v in ("cyclical", "monotonic", "ae")]),
            sweep("num_epochs", [int(epochs)]),
        ]
    )
