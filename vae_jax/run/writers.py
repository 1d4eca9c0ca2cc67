"""Run logging: ``metrics.jsonl`` (the machine-readable record), TensorBoard, progress output."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping

from absl import logging

from vae_jax.run import files


class MetricWriter:
    """Appends one JSON object per logged step to ``workdir/metrics.jsonl`` and mirrors the
    scalars to TensorBoard event files (tensorboardX, no TensorFlow needed)."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "metrics.jsonl")
        # Line-buffered: every record reaches the OS when written, so a killed run loses none
        # of the records its last checkpoint covers.
        self._file = files.open_nofollow(self.path, "a", buffering=1)  # never through a link
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=workdir, flush_secs=30)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, float(value), int(step))

    def flush(self) -> None:
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class NullWriter:
    """`MetricWriter`'s interface, writing nothing: the non-primary processes of a multi-process
    run (`vae_jax.run.distributed`)."""

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        del step, scalars

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(workdir: str) -> list[dict]:
    """The records of ``workdir/metrics.jsonl``, in order."""
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """A progress bar with ETA, β and loss on a terminal; plain log lines otherwise."""

    def __init__(self, total: int, initial: int = 0, enabled: bool | None = None):
        self.total = total
        self.interactive = sys.stderr.isatty() if enabled is None else enabled
        self._bar = None
        self._start, self._initial = time.time(), initial
        if self.interactive:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, dynamic_ncols=True, unit="step")

    def update(self, step: int, scalars: Mapping[str, float]) -> None:
        shown = {k: f"{scalars[k]:.4g}" for k in ("beta", "loss", "rec", "kl") if k in scalars}
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(shown, refresh=True)
            return
        elapsed = time.time() - self._start
        rate = (step - self._initial) / max(elapsed, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        logging.info(
            "step %d/%d  %s  %.1f steps/s  ETA %.0fs",
            step,
            self.total,
            "  ".join(f"{k}={v}" for k, v in shown.items()),
            rate,
            eta,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
