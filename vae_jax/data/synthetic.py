"""The synthetic task of Fu et al. (2019, Sec. 3): a handful of fixed random sequences.

The paper does not publish its generator; this one draws ``num_sequences`` sequences of
``length`` word tokens uniformly (with replacement) from the non-special ids of a vocabulary of
``vocab_size``, from a seeded RNG, and wraps each in ``<s> … </s>``. Training draws them
uniformly, so the data distribution is uniform over the sequences and the ideal −ELBO is
ln(num_sequences) nats per sequence.
"""

from __future__ import annotations

import numpy as np

from vae_jax.core.tokens import BOS_ID, EOS_ID, NUM_SPECIALS


def make_sequences(num_sequences: int, length: int, vocab_size: int, seed: int) -> np.ndarray:
    """(num_sequences, length + 2) int32 token ids: ``<s> w₁ … w_length </s>``.

    Sequences are redrawn until all are distinct, so that each is its own class.
    """
    if vocab_size <= NUM_SPECIALS:
        raise ValueError(f"vocab_size={vocab_size}: must exceed the {NUM_SPECIALS} special ids.")
    if num_sequences < 1 or length < 1:
        raise ValueError(f"num_sequences={num_sequences}, length={length}: both must be >= 1.")
    if (vocab_size - NUM_SPECIALS) ** length < num_sequences:
        raise ValueError(
            f"vocab_size={vocab_size}, length={length} cannot give {num_sequences} distinct "
            "sequences."
        )
    rng = np.random.default_rng(seed)
    while True:
        words = rng.integers(NUM_SPECIALS, vocab_size, size=(num_sequences, length))
        if len(np.unique(words, axis=0)) == num_sequences:
            break
    bos = np.full((num_sequences, 1), BOS_ID)
    eos = np.full((num_sequences, 1), EOS_ID)
    return np.concatenate([bos, words, eos], axis=1).astype(np.int32)
