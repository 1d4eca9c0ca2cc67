"""The same LSTM VAE train step written plainly in PyTorch, for scale against vae_jax's.

    pip install torch   # not a vae_jax dependency; the CPU build is enough
    python benchmarks/torch_baseline.py [--only ptb_23,...] [--steps 30] [--out torch.json]
        [--malloc_tuning] [--vs_vae_jax]

Model and step as `benchmarks/benchmark.py` times them (its ``CONFIGS``, same FLOP count):
embedding → ``nn.LSTM`` encoder → μ, log σ² from the state at ``</s>``; z = μ + σ·ε;
``nn.LSTM`` decoder on [embedding; z] with h₀ = Linear(z), dropout 0.5 on its input and output;
Linear to the vocabulary; summed cross-entropy + KL; Adam after clipping the global gradient norm
to 5. This is what a careful PyTorch user writes (cuDNN-style fused ``nn.LSTM``, one output
matmul for all steps, ``zero_grad(set_to_none=True)``, ``foreach`` Adam), with no hand-written
backward. Prints ms/step and GFLOP/s against ``torch.mm``'s own 2048² peak measured just before
and after each config. ``--malloc_tuning`` gives it `vae_jax.run.host`'s glibc settings too.
``--vs_vae_jax`` instead times it against vae_jax's step (`benchmark.train_step_call`) in the
same process, the two taking turns in rounds, and reports the ratio of their median steps.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable

import torch
from benchmark import (  # benchmarks/benchmark.py
    CONFIGS,
    alternate,
    random_batch,
    round_ratios,
    step_flops,
    timed,
    train_step_call,
)
from torch import nn


class TorchVAE(nn.Module):
    def __init__(self, emb: int, hidden: int, latent: int, vocab: int, dropout: float = 0.5):
        super().__init__()
        self.enc_embed = nn.Embedding(vocab, emb)
        self.encoder = nn.LSTM(emb, hidden, batch_first=True)
        self.mu_logvar = nn.Linear(hidden, 2 * latent)
        self.dec_embed = nn.Embedding(vocab, emb)
        self.decoder = nn.LSTM(emb + latent, hidden, batch_first=True)
        self.h0 = nn.Linear(latent, hidden)
        self.output = nn.Linear(hidden, vocab)
        self.drop = nn.Dropout(dropout)
        for p in self.parameters():
            nn.init.uniform_(p, -0.1, 0.1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hs, _ = self.encoder(self.enc_embed(tokens))
        last = (tokens != 0).sum(1) - 1
        mu, logvar = self.mu_logvar(hs[torch.arange(tokens.shape[0]), last]).chunk(2, -1)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        inputs = tokens[:, :-1]
        x = torch.cat(
            [self.drop(self.dec_embed(inputs)), z[:, None].expand(-1, inputs.shape[1], -1)], -1
        )
        h0 = self.h0(z)[None]
        out, _ = self.decoder(x, (h0, torch.zeros_like(h0)))
        logits = self.output(self.drop(out))
        rec = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), ignore_index=0,
            reduction="sum",
        )  # fmt: skip
        kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum()
        return (rec + kl) / tokens.shape[0]


def matmul_peak(n: int = 2048, repeats: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def torch_step(name: str) -> Callable[[], None]:
    """One config's PyTorch train step on a fixed random batch, as a call."""
    emb, hidden, latent, vocab, batch, length = CONFIGS[name]
    torch.manual_seed(0)
    model = TorchVAE(emb, hidden, latent, vocab)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    tokens = torch.from_numpy(random_batch(vocab, batch, length)).long()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(tokens)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()

    return step


def bench(name: str, steps: int, warmup: int) -> dict:
    step = torch_step(name)
    timed(step, warmup)
    times = timed(step, steps)
    median = statistics.median(times)
    flops = step_flops(*CONFIGS[name])
    return {"name": name, "ms_median": 1e3 * median, "ms_min": 1e3 * min(times),
            "gflops": flops / median / 1e9}  # fmt: skip


def bench_vs_vae_jax(name: str, steps: int, warmup: int, rounds: int = 10) -> dict:
    """PyTorch's and vae_jax's steps (`benchmark.train_step_call`) in one process, taking
    turns in ``rounds`` rounds (`benchmark.alternate`), so both see the same machine."""
    calls = {"torch": torch_step(name), "vae_jax": train_step_call(name)}
    for call in calls.values():
        timed(call, warmup + 1)  # + 1: vae_jax compiles
    runs = {side: functools.partial(timed, call) for side, call in calls.items()}
    times = alternate(runs, rounds, max(1, steps // rounds))
    ratios = round_ratios(times["vae_jax"], times["torch"])
    flops = step_flops(*CONFIGS[name])
    row = {"name": name, "rounds": rounds}
    for side, per_round in times.items():
        ts = [t for chunk in per_round for t in chunk]
        median = statistics.median(ts)
        row[side] = {"ms_median": 1e3 * median, "ms_min": 1e3 * min(ts),
                     "gflops": flops / median / 1e9}  # fmt: skip
    row["torch_over_vae_jax"] = statistics.median(ratios)
    row["torch_over_vae_jax_rounds"] = ratios
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="Comma-separated config names.")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", help="Write the results as JSON here.")
    parser.add_argument(
        "--malloc_tuning", action="store_true", help="Apply vae_jax.run.host's allocator settings."
    )
    parser.add_argument(
        "--vs_vae_jax",
        action="store_true",
        help="Alternate with vae_jax's step in this process and report both and their ratio.",
    )
    args = parser.parse_args()
    if args.malloc_tuning:
        from vae_jax.run import host

        host.tune_cpu_host()
    names = [n for n in args.only.split(",") if n] or list(CONFIGS)
    unknown = set(names) - set(CONFIGS)
    if unknown:
        parser.error(f"--only: unknown {sorted(unknown)}; known {list(CONFIGS)}")
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps={args.steps} must be >= 1, --warmup={args.warmup} >= 0")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for name in names:
        if args.vs_vae_jax:
            row = bench_vs_vae_jax(name, args.steps, args.warmup)
            rows.append(row)
            print(
                f"{name:<15} torch {row['torch']['ms_median']:>7.1f} ms, vae_jax "
                f"{row['vae_jax']['ms_median']:>7.1f} ms: torch / vae_jax "
                f"{row['torch_over_vae_jax']:.2f} (median of {row['rounds']} rounds' ratios)",
                flush=True,
            )
            continue
        before = matmul_peak()
        row = bench(name, args.steps, args.warmup)
        row["peak_gflops"] = (before + matmul_peak()) / 2
        row["fraction_of_peak"] = row["gflops"] / row["peak_gflops"]
        rows.append(row)
        print(
            f"{name:<15}{row['ms_median']:>9.1f} ms (min {row['ms_min']:.1f}) "
            f"{row['gflops']:>7.1f} GFLOP/s, {100 * row['fraction_of_peak']:.1f}% of "
            f"{row['peak_gflops']:.0f}",
            flush=True,
        )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            result = {"torch": torch.__version__, "malloc_tuning": args.malloc_tuning}
            result["vs_vae_jax"] = args.vs_vae_jax
            json.dump({**result, "configs": rows}, f, indent=2)


if __name__ == "__main__":
    main()
