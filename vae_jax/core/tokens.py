"""The token layout every dataset and model shares: special ids and sequence lengths.

A sequence is ``<s> w₁ … w_n </s>`` followed by ``<pad>``; ids 0–3 are the specials in every
vocabulary (text corpora put their words after them, the synthetic task its word ids).
"""

from __future__ import annotations

import jax.numpy as jnp

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIALS: tuple[str, ...] = (PAD, UNK, BOS, EOS)
NUM_SPECIALS = len(SPECIALS)


def sequence_lengths(tokens: jnp.ndarray) -> jnp.ndarray:
    """Number of non-pad tokens in each row (``<s>`` and ``</s>`` included)."""
    return jnp.sum(tokens != PAD_ID, axis=-1)
