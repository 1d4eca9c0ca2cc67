"""The run's guards: non-finite steps, loss spikes, and stop signals.

The train step skips a step whose loss or gradient is not finite, or (``config.loss_spike``) a
loss spike (`vae_jax.run.steps.train_step`); here the loop's verdicts on the counters it
returns: `check_nonfinite` stops a run after ``max_nonfinite_steps`` such steps in a row (a
population freezes the member instead), and `StopSignals` turns SIGTERM and Ctrl-C into a
checkpoint and `TrainingInterrupted`.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from vae_jax.run import checkpoints, files, steps

# A population's diverged members: in the checkpoints' meta, and a file in members/<k>/.
DIVERGED, DIVERGED_FILE = "diverged", "diverged.json"
# The checkpoints kept whatever the rotation (the last one before trouble), in the meta.
PROTECTED = "protected"


class TrainingInterrupted(SystemExit):
    """SIGTERM or Ctrl-C: a checkpoint of the current step was saved; exits non-zero."""


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class LossSpikeError(RuntimeError):
    """The loss-spike guard stopped the run (``config.loss_spike``)."""


class StopSignals:
    """Turns SIGTERM and SIGINT into a flag the loop checks between steps."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def check_nonfinite(
    step_metrics, step: int, config, checkpointer, label: bool = False, skip=()
) -> list[tuple[int, int, RuntimeError]]:
    """The guards' verdicts: ``max_nonfinite_steps`` skipped steps in a row (non-finite, or
    loss spikes), or a spike under ``loss_spike.action = "stop"``, as (member, first bad
    step, error to raise) for each member (leaves (devices, K) in a population, whose
    messages name it: ``label``) not in ``skip``. One host transfer of the guard counters."""
    guards = jax.device_get({n: step_metrics[n] for n in ("nonfinite_run", "spike_run", "spike")})
    runs_, spike_runs, spikes = (np.atleast_1d(guards[n][0]) for n in guards)
    stop_at_spike = config.loss_spike.action == "stop"
    failures = []
    for k, (run, spike_run, spike) in enumerate(zip(runs_, spike_runs, spikes, strict=True)):
        if k in skip:
            continue
        if run < config.max_nonfinite_steps and spike_run < config.max_nonfinite_steps:
            if not (stop_at_spike and spike):
                continue
        who = f"Population member {k}: " if label else ""
        detail = jax.device_get({n: step_metrics[n] for n in ("beta", "lr", "loss")})
        beta, lr, loss = (float(np.atleast_1d(detail[n][0])[k]) for n in ("beta", "lr", "loss"))
        if run >= config.max_nonfinite_steps:
            last = checkpointer.last_good_step()
            error = NonFiniteError(
                f"{who}{run} consecutive steps with a non-finite loss or gradient, the last at "
                f"step {step} (beta={beta:.4g}, lr={lr:.4g}); none was applied. "
                + _last_good(last, checkpointer)
            )
            failures.append((k, step - int(run) + 1, error))
            continue
        # The spike shows the damage of the step before it: that state is suspect too.
        last = checkpointer.last_good_step(before=step - 1)
        error = LossSpikeError(
            f"{who}Loss spike at step {step}: loss {loss:.4g} > "
            f"config.loss_spike.factor={config.loss_spike.factor:g} x the median of the last "
            f"{config.loss_spike.window} applied steps ({spike_run} such steps in a row, not "
            "applied). " + _last_good(last, checkpointer)
        )
        failures.append((k, step - int(spike_run) + 1, error))
    return failures


def _last_good(step: int | None, checkpointer) -> str:
    if step is None:
        return f"No checkpoint in {checkpointer.directory} is known to be good."
    return (
        f"The last checkpoint with finite parameters, saved while no step was being skipped, "
        f"is step {step} in {checkpointer.directory} (kept)."
    )


class Watch:
    """What the guards know of a run across its steps, and what they do at each.

    ``diverged``: a population's members frozen after failing, k -> (first bad step, step
    frozen at), kept in the checkpoints' meta so a resume keeps them; ``saved_steps``: the
    checkpoints this process saved (or resumed from); the first troubled step (skipped,
    spiking, or a loss over `steps.SUSPECT_FACTOR` × the recent median) protects the newest
    checkpoint before it from the rotation.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        checkpointer: checkpoints.Checkpointer,
        dirs: Sequence[str],
        is_population: bool,
        primary: bool,
        saved: dict | None,
        start: int,
    ):
        self.config, self.checkpointer, self.dirs = config, checkpointer, list(dirs)
        self.is_population, self.primary = is_population, primary
        self.diverged: dict[int, tuple[int, int]] = {}
        self.saved_steps: list[int] = []
        self.trouble: list[int] = []
        if saved is not None:  # resumed at ``start``: the checkpoint's meta
            self.saved_steps.append(start)
            self.diverged = {int(k): tuple(v) for k, v in saved.get(DIVERGED, {}).items()}
            for kept in saved.get(PROTECTED, []):
                checkpointer.protect(kept)
        self.frozen = [self.frozen_mask()] if is_population else []  # the step's extra argument

    def live(self, x) -> np.ndarray:
        """``x`` without the frozen members' rows: they say nothing of the others' health."""
        x = np.asarray(x)
        return np.delete(x, sorted(self.diverged), axis=0) if self.is_population else x

    def frozen_mask(self) -> jax.Array:
        mask = np.zeros(len(self.dirs), bool)
        mask[sorted(self.diverged)] = True
        return steps.replicate(jnp.asarray(mask))

    def health(self, host_state: steps.TrainState) -> dict:
        """A checkpoint's meta on the live members: finite parameters, and ``good`` where no
        step is being skipped; the diverged and protected records."""
        params = jax.tree.leaves(host_state.params)
        params_finite = all(np.isfinite(self.live(x)).all() for x in params)
        skipping = np.any(self.live(host_state.nonfinite_run) > 0) or np.any(
            self.live(host_state.spike_run) > 0
        )
        info = {"params_finite": params_finite, "good": bool(params_finite and not skipping)}
        if self.diverged:
            info[DIVERGED] = {str(k): list(v) for k, v in sorted(self.diverged.items())}
        if self.checkpointer.protected:
            info[PROTECTED] = self.checkpointer.protected
        return info

    def _keep_checkpoint_before_trouble(self, step_metrics, at: int) -> None:
        """At the first skipped, spiking or suspect step: keeps the newest checkpoint saved
        before it, so a divergence never rotates the last healthy one out."""
        flags = jax.device_get({n: step_metrics[n] for n in ("nonfinite", "spike", "suspect")})
        if not any(self.live(np.atleast_1d(np.asarray(v)[0])).any() for v in flags.values()):
            return
        self.trouble.append(at)
        before = [s for s in self.saved_steps if s < at]
        if before:
            self.checkpointer.protect(before[-1])
            logging.warning(
                "Step %d was skipped, a loss spike, or a loss over %g x the recent median: "
                "checkpoint %d, the last before it, is kept whatever the rotation.",
                at, steps.SUSPECT_FACTOR, before[-1],
            )  # fmt: skip

    def check(self, step_metrics, at: int) -> None:
        """Applies the guards (`check_nonfinite`): a single run, or a population's last
        healthy members, stop; a population's other failing members are frozen."""
        if not self.trouble:
            self._keep_checkpoint_before_trouble(step_metrics, at)
        failures = check_nonfinite(
            step_metrics, at, self.config, self.checkpointer, self.is_population,
            skip=self.diverged,
        )  # fmt: skip
        if not failures:
            return
        if not self.is_population or len(self.diverged) + len(failures) >= len(self.dirs):
            raise failures[0][2]
        for k, first, error in failures:
            self.diverged[k] = (first, at)
            logging.warning("%s Member %d is frozen from step %d on; the others go on.",
                            error, k, at)  # fmt: skip
            if self.primary:
                record = {"diverged_at_step": first, "frozen_at_step": at, "reason": str(error)}
                path = os.path.join(self.dirs[k], DIVERGED_FILE)
                files.write_atomic(path, json.dumps(record, indent=1))
        self.frozen[0] = self.frozen_mask()
