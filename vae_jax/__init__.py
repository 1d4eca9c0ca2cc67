"""vae_jax: text VAEs without KL vanishing (Fu et al., NAACL 2019), in JAX/Flax.

``vae_jax.load(workdir)``: a trained run as a Python object (`vae_jax.api`). Importing the
package loads nothing else (no JAX), so the command lines can tune the host before JAX starts.
"""

from __future__ import annotations

from typing import Any


def load(workdir: str, *args: Any, **kwargs: Any):
    """`vae_jax.api.load`: the run in ``workdir`` with encode, sample, reconstruct and
    interpolate."""
    from vae_jax import api

    return api.load(workdir, *args, **kwargs)
