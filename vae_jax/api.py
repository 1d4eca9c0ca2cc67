"""A trained LM VAE as a Python object: ``vae_jax.load(workdir)``.

    import vae_jax

    vae = vae_jax.load("runs/ptb_cyclical")           # best checkpoint where saved, else last
    vae.sample(3)                                      # sentences from z ~ N(0, I), greedy
    vae.reconstruct(["the company said it expects"])   # decoded from the posterior mean
    vae.interpolate("first sentence", "second one")    # z_t between two posterior means
    mu = vae.encode(["a sentence", "another"])         # (2, latent_dim)

It reads what `vae_jax.generate` reads (`build.load_run`): a text run's workdir holds its
vocabulary, so no corpus is needed. Sentences are words of that vocabulary (unknown ones become
``<unk>``); for the synthetic task, token ids separated by spaces.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from vae_jax import generate
from vae_jax.core import models
from vae_jax.run import backend, build


@dataclasses.dataclass(frozen=True)
class TrainedVAE:
    """A run's model and parameters, with its vocabulary's text conversion."""

    config: ml_collections.ConfigDict
    model: models.VAE
    params: Any
    text: generate.Text
    info: dict

    def _precision(self):
        return jax.default_matmul_precision(backend.matmul_precision(self.config))

    def encode(self, sentences: Sequence[str]) -> np.ndarray:
        """Posterior means μ(x), (N, latent_dim)."""
        rows = [self.text.row(s) for s in _as_list(sentences)]
        with self._precision():
            return generate.posterior_means(self.model, self.params, rows)

    def decode(
        self, z: np.ndarray, max_length: int = 50, temperature: float | None = None, seed: int = 0
    ) -> list[str]:
        """Sentences decoded from z (N, latent_dim): greedy, or sampled at ``temperature``."""
        key = None if temperature is None else jax.random.PRNGKey(seed)
        with self._precision():
            ids = generate.decode(
                self.model, self.params, np.asarray(z, np.float32), max_length, key,
                1.0 if temperature is None else temperature,
            )  # fmt: skip
        return [self.text.show(row) for row in ids]

    def sample(
        self, num: int = 5, temperature: float | None = None, seed: int = 0, max_length: int = 50
    ) -> list[str]:
        """``num`` sentences from z ~ N(0, I) (drawn with ``seed``): greedy, or sampled."""
        if num < 1:
            raise ValueError(f"sample: num={num} must be >= 1.")
        z = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (num, self.model.latent_dim)))
        return self.decode(z, max_length, temperature, seed + 1)

    def reconstruct(self, sentences: Sequence[str], max_length: int = 50) -> list[str]:
        """Each sentence decoded greedily from its posterior mean."""
        return self.decode(self.encode(sentences), max_length)

    def interpolate(self, a: str, b: str, steps: int = 10, max_length: int = 50) -> list[str]:
        """Greedy decodings of z_t = (1 − t) μ(a) + t μ(b), t = 0, 1/steps, …, 1."""
        if steps < 1:
            raise ValueError(f"interpolate: steps={steps} must be >= 1.")
        mu = self.encode([a, b])
        return self.decode(generate.interpolation_points(mu[0], mu[1], steps), max_length)


def load(
    workdir: str, checkpoint: str = "auto", data_dir: str | None = None, member: int | None = None
) -> TrainedVAE:
    """The run in ``workdir`` (``checkpoint``: auto, best, last or a step; ``member`` of a
    population) as a `TrainedVAE`. A dialog CVAE's run is refused: it samples responses to a
    context (``python -m vae_jax.generate --mode=responses``)."""
    config, data, model, params, info = build.load_run(workdir, checkpoint, data_dir, member)
    if not build.task(config).loadable:
        raise ValueError(
            f"vae_jax.load({workdir!r}): a dialog CVAE's run; use python -m vae_jax.generate "
            "--mode=responses."
        )
    return TrainedVAE(config, model, params, generate.Text(data.info.get("vocab")), info)


def _as_list(sentences: Sequence[str] | str) -> list[str]:
    return [sentences] if isinstance(sentences, str) else list(sentences)
