"""SwitchBoard batches for the dialog CVAE: one row per response, its context beside it.

A batch is the `vae_jax.dialog.cvae` layout: ``tokens`` the response, ``context``,
``context_lengths``, ``floors``, ``topics``, the two speakers' profiles and the response's act.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
import numpy as np
from absl import logging

from vae_jax.core.tokens import EOS_ID
from vae_jax.data.batching import (
    Batch,
    Data,
    EpochBatcher,
    check_buckets,
    data_seed,
    tfds_dir,
    with_boundaries,
)
from vae_jax.dialog import swda


class DialogBatcher(EpochBatcher):
    """Rows (dialog, response position) of a dialog split, batched in a per-epoch order.

    Every utterance but a dialog's first (the begin-of-dialog ``<d>``) is a response once per
    epoch, its context the ``window − 1`` utterances before it (the official code's
    ``backward_size`` window holds the response too). Utterances are ``<s> w … </s>`` cut to
    ``max_utt_len`` tokens (the last kept being ``</s>``, as the official ``pad_to``). An
    epoch's order is a permutation of all rows from ``default_rng([seed, epoch])``. The
    official loader batches dialogs of similar length and drops the responses beyond the
    shortest dialog of a batch; here every response is used (a documented deviation).
    Responses are padded to a bucket length (``bucket_lengths``), contexts to
    ``(window − 1, max_utt_len)``, so XLA compiles once per response bucket.
    """

    def __init__(
        self,
        dialogs: Sequence[swda.Dialog],
        batch_size: int,
        window: int,
        max_utt_len: int,
        bucket_lengths: Sequence[int],
        seed: int = 0,
    ):
        if window < 2:
            raise ValueError(f"config.data.window={window}: must be >= 2 (context + response).")
        if max_utt_len < 3:
            raise ValueError(f"config.data.max_utt_len={max_utt_len}: must be >= 3.")
        self.batch_size, self.window, self.max_utt_len, self.seed = (
            batch_size, window, max_utt_len, seed,
        )  # fmt: skip
        self.dialogs = list(dialogs)
        self.utterances = [[self._row(u) for u in d.utterances] for d in self.dialogs]
        self.rows = np.array(
            [(i, t) for i, d in enumerate(self.dialogs) for t in range(1, len(d.utterances))],
            np.int64,
        ).reshape(-1, 2)
        if not len(self.rows):
            raise ValueError("DialogBatcher: no responses to batch (dialogs of one utterance).")
        self.buckets = check_buckets(bucket_lengths, max_utt_len)
        self.steps_per_epoch = -(-len(self.rows) // batch_size)

    def _row(self, utterance: np.ndarray) -> np.ndarray:
        row = with_boundaries(utterance)
        return (
            row if len(row) <= self.max_utt_len else np.append(row[: self.max_utt_len - 1], EOS_ID)
        )

    def plan(self, epoch: int | None = None) -> list[np.ndarray]:
        """Row indices of every batch of an epoch; the corpus order if ``None``."""
        order = np.arange(len(self.rows))
        if epoch is not None:
            order = np.random.default_rng([self.seed, epoch]).permutation(order)
        return np.split(order, range(self.batch_size, len(order), self.batch_size))

    def batch(self, indices: np.ndarray, size: int | None = None) -> Batch:
        """Rows ``indices`` in the `vae_jax.dialog.cvae` layout, filled to ``size`` (default
        ``batch_size``) with all-padding rows (context length 0); ``acts`` the response's act
        id (−1: unknown)."""
        b, c = size or self.batch_size, self.window - 1
        responses = [self.utterances[i][t] for i, t in self.rows[indices]]
        length = self.buckets[int(np.searchsorted(self.buckets, max(map(len, responses))))]
        out = {
            "tokens": np.zeros((b, length), np.int32),
            "context": np.zeros((b, c, self.max_utt_len), np.int32),
            "context_lengths": np.zeros((b,), np.int32),
            "floors": np.zeros((b, c), np.int32),
            "topics": np.zeros((b,), np.int32),
            "my_profile": np.zeros((b, swda.PROFILE_DIM), np.float32),
            "other_profile": np.zeros((b, swda.PROFILE_DIM), np.float32),
            "acts": np.full((b,), -1, np.int32),
        }
        for row, ((i, t), response) in enumerate(zip(self.rows[indices], responses, strict=True)):
            dialog = self.dialogs[i]
            speaker = int(dialog.speakers[t])
            first = max(0, t - c)
            out["tokens"][row, : len(response)] = response
            for j, u in enumerate(range(first, t)):
                utterance = self.utterances[i][u]
                out["context"][row, j, : len(utterance)] = utterance
                out["floors"][row, j] = int(dialog.speakers[u] == speaker)
            out["context_lengths"][row] = t - first
            out["topics"][row] = dialog.topic
            out["my_profile"][row] = dialog.profiles[speaker]
            out["other_profile"][row] = dialog.profiles[1 - speaker]
            out["acts"][row] = dialog.acts[t]
        return out


def get_dialog_data(config: ml_collections.ConfigDict) -> Data:
    """A dialog corpus (``config.data.name`` = "swda"): the SwitchBoard dialogs of
    `vae_jax.dialog.swda`, read from ``config.data.data_dir`` (the folder holding ``swda/``
    and ``swda_raw/``) or ``$VAE_JAX_DATA_DIR``."""
    d = config.data
    swda_dir, raw_dir = swda.source_dirs(d.data_dir or None)
    dataset = swda.load(swda_dir, raw_dir, tfds_dir(config), max_vocab=d.max_vocab)
    for deviation in dataset.deviations:
        logging.warning("swda: %s", deviation)

    def batcher(split: str, batch_size: int, seed: int = 0) -> DialogBatcher:
        return DialogBatcher(
            dataset.splits[split], batch_size, d.window, d.max_utt_len, d.bucket_lengths, seed
        )

    train = batcher(d.train_split, config.batch_size, data_seed(config))
    eval_batchers = {name: batcher(name, config.eval_batch_size) for name in d.eval_splits}
    return Data(
        vocab_size=len(dataset.vocab),
        train=lambda step: train.epochs(*divmod(step, train.steps_per_epoch)),
        eval_splits={n: [b.batch(i) for i in b.plan()] for n, b in eval_batchers.items()},
        steps_per_epoch=train.steps_per_epoch,
        info={
            "vocab": dataset.vocab,
            "stats": dataset.stats,
            "batcher": train,
            "eval_batchers": eval_batchers,
            "dataset": dataset,
            "fingerprint": dataset.fingerprint,
        },
        num_topics=len(dataset.topics),
    )
