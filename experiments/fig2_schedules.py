"""Plots β schedules like Fig. 2 of Fu et al. (2019): monotonic vs cyclical (M=4, R=0.5).

    python experiments/fig2_schedules.py --out experiments/results/schedules.png

Top panel: the paper's Figure 2 over 40K iterations (monotonic ramp over the first 10K steps,
cyclical linear with M = 4, R = 0.5). Bottom panel: the three cyclical ramp shapes, and the
cosine learning rate that restarts with every β cycle.
"""

import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from vae_jax.core import schedules  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="experiments/results/schedules.png")
    parser.add_argument("--total_steps", type=int, default=40_000)
    args = parser.parse_args()

    t = np.arange(args.total_steps)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(t, schedules.monotonic(args.total_steps // 4)(t), label="monotonic")
    top.plot(t, schedules.cyclical(args.total_steps, 4, 0.5)(t), label="cyclical (M=4, R=0.5)")
    top.set_ylabel("β")
    top.legend(loc="lower right")
    top.set_title("KL weight schedules (Fu et al. 2019, Fig. 2)")
    for shape in schedules.SHAPES:
        bottom.plot(t, schedules.cyclical(args.total_steps, 4, 0.5, shape=shape)(t), label=shape)
    lr = schedules.cyclical_cosine_lr(1.0, args.total_steps, 4)
    bottom.plot(t, lr(t), "k--", lw=1, label="lr / lr₀ (cosine restarts)")
    bottom.set_xlabel("iteration")
    bottom.set_ylabel("β")
    bottom.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
