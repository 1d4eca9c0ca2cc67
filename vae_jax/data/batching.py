"""Input pipelines: global batches of ``{"tokens": int32 (B, L)}`` as numpy arrays (labelled
corpora add ``"labels"``: int32 (B,), −1 on filler rows).

A token row is ``<s> w₁ … w_n </s>`` then ``<pad>``. Rows that are all padding fill a batch to
its fixed size and count for nothing in any objective or metric.

Dialog corpora are batched by the dialog wing (`vae_jax.dialog.batcher`) on these classes.

Text corpora are batched like the reference code (Kim et al. 2018; Fu et al. 2019): sentences
are grouped by length and every batch holds ``batch_size`` sentences of one length (the last
batch of a length may hold fewer, the rest filled with padding rows). The batch order is
reshuffled every epoch, and so is the assignment of sentences to the batches of their length,
from ``default_rng([data_seed, epoch])`` (`data_seed`: ``config.data_seed``, else
``config.seed``); every sentence is used once per epoch. Rows are padded to the next of a few
bucket lengths so XLA compiles once per bucket, not once per sentence length; the model masks
padding, so buckets change no metric (tested).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Callable, Iterator, Sequence

import ml_collections
import numpy as np
from absl import logging

from vae_jax.core.tokens import BOS_ID, EOS_ID
from vae_jax.data import synthetic, text

Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class Data:
    """What the training loop needs from a dataset."""

    vocab_size: int
    # train(step): the infinite stream of global training batches from batch ``step`` on. The
    # batch of a step depends only on the config and the step, so a run resumes exactly.
    train: Callable[[int], Iterator[Batch]]
    eval_splits: dict[str, list[Batch]]  # each split once, in fixed-size batches
    steps_per_epoch: int | None  # None for a stream without epochs
    # "fingerprint": sha256 of what the data was made from (a text build's sources and
    # settings, the synthetic sequences); "vocab" for text corpora; corpus statistics.
    info: dict
    num_topics: int = 0  # a dialog corpus's topic vocabulary (the CVAE's topic embedding)


def pad_rows(tokens: np.ndarray, batch_size: int) -> list[Batch]:
    """Cuts rows into batches of exactly ``batch_size``, the last one filled with padding rows."""
    batches = []
    for lo in range(0, len(tokens), batch_size):
        chunk = tokens[lo : lo + batch_size]
        filler = np.zeros((batch_size - len(chunk), tokens.shape[1]), tokens.dtype)
        batches.append({"tokens": np.concatenate([chunk, filler])})
    return batches


def synthetic_stream(
    sequences: np.ndarray, batch_size: int, seed: int, start: int = 0
) -> Iterator[Batch]:
    """Batches of sequences drawn uniformly with replacement, from a seeded RNG, from batch
    ``start`` on (the draws before it are replayed: cheap, and the stream stays one RNG)."""
    rng = np.random.default_rng(seed)
    for _ in range(start):
        rng.integers(0, len(sequences), size=batch_size)
    while True:
        yield {"tokens": sequences[rng.integers(0, len(sequences), size=batch_size)]}


def with_boundaries(sentence: np.ndarray) -> np.ndarray:
    """``w₁ … w_n`` -> ``<s> w₁ … w_n </s>`` (int32)."""
    return np.concatenate([[BOS_ID], sentence, [EOS_ID]]).astype(np.int32)


def check_buckets(bucket_lengths: Sequence[int], longest_row: int) -> tuple[int, ...]:
    """Validated, increasing bucket lengths; one is added for rows longer than the last."""
    buckets = tuple(int(b) for b in bucket_lengths)
    if any(b < 2 for b in buckets) or list(buckets) != sorted(set(buckets)):
        raise ValueError(
            f"config.data.bucket_lengths={tuple(bucket_lengths)}: must be strictly increasing "
            "integers >= 2 (a row holds at least <s> and </s>)."
        )
    if not buckets or buckets[-1] < longest_row:
        buckets += (longest_row,)
    return buckets


COMPOSITIONS = ("per_epoch", "fixed")  # LengthBatcher: new batches every epoch, or once


def check_composition(composition: str) -> str:
    """``composition`` if it is one of `COMPOSITIONS`; else a ``ValueError`` naming the field."""
    if composition not in COMPOSITIONS:
        raise ValueError(
            f"config.data.batch_composition={composition!r}: must be one of {COMPOSITIONS}."
        )
    return composition


def batch_composition(d: ml_collections.ConfigDict) -> str:
    """``config.data.batch_composition``, checked; workdirs written before the field existed
    drew their batches every epoch."""
    return check_composition(d.get("batch_composition", "per_epoch"))


class EpochBatcher:
    """A batcher whose epoch ``e`` is ``batch(i)`` for every ``i`` of ``plan(e)``: the stream
    of a run from any (epoch, position) on, for exact resume."""

    def plan(self, epoch: int | None = None) -> list[np.ndarray]:
        raise NotImplementedError

    def batch(self, indices: np.ndarray) -> Batch:
        raise NotImplementedError

    def epochs(self, start_epoch: int = 0, position: int = 0) -> Iterator[Batch]:
        """Every batch of epoch ``start_epoch`` from ``position`` on, then the next epochs."""
        epoch = start_epoch
        while True:
            for indices in self.plan(epoch)[position:]:
                yield self.batch(indices)
            epoch, position = epoch + 1, 0


class LengthBatcher(EpochBatcher):
    """Batches of same-length sentences, padded to a bucket length, in a per-epoch order.

    ``rows[i]`` is sentence i with its ``<s>``/``</s>``. The plan of an epoch (which sentences
    form each batch, in which order) depends only on ``(seed, epoch)``, so a run can be
    resumed at any (epoch, position) by recomputing it.

    ``composition``: ``"per_epoch"`` draws new batches within each length every epoch;
    ``"fixed"`` keeps epoch 0's batches for the whole run and only shuffles their order, as
    Kim et al.'s ``preprocess_text.py`` (the PTB code of Fu et al. and SA-VAE) does: it cuts
    the length-sorted sentences into batches once, and training permutes the batch order per
    epoch. Epoch 0 is the same under both.
    """

    def __init__(
        self,
        rows: Sequence[np.ndarray],
        batch_size: int,
        bucket_lengths: Sequence[int],
        seed: int = 0,
        labels: np.ndarray | None = None,
        composition: str = "per_epoch",
    ):
        if not rows:
            raise ValueError("LengthBatcher: no sentences to batch.")
        self.composition = check_composition(composition)
        self.rows = list(rows)
        self.labels = None if labels is None else np.asarray(labels, np.int32)
        self.batch_size = batch_size
        self.seed = seed
        lengths = np.array([len(r) for r in self.rows])
        self.buckets = check_buckets(bucket_lengths, int(lengths.max()))
        self.groups = {int(n): np.flatnonzero(lengths == n) for n in np.unique(lengths)}
        self.steps_per_epoch = sum(-(-len(g) // batch_size) for g in self.groups.values())

    def bucket(self, row_length: int) -> int:
        return self.buckets[int(np.searchsorted(self.buckets, row_length))]

    def plan(self, epoch: int | None = None) -> list[np.ndarray]:
        """Sentence indices of every batch of an epoch; the file's length order if ``None``."""
        drawn = 0 if self.composition == "fixed" else epoch
        rng = None if epoch is None else np.random.default_rng([self.seed, drawn])
        batches = []
        for group in self.groups.values():
            group = group if rng is None else rng.permutation(group)
            batches.extend(np.split(group, range(self.batch_size, len(group), self.batch_size)))
        if rng is not None:
            if drawn != epoch:  # fixed batches: only the order is drawn anew
                rng = np.random.default_rng([self.seed, epoch])
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def batch(self, indices: np.ndarray) -> Batch:
        """The rows ``indices`` (one length) padded to their bucket, plus filler rows; for a
        labelled corpus also ``labels`` (B,), −1 on filler rows."""
        length = self.bucket(len(self.rows[indices[0]]))
        tokens = np.zeros((self.batch_size, length), np.int32)
        for i, index in enumerate(indices):
            row = self.rows[index]
            tokens[i, : len(row)] = row
        if self.labels is None:
            return {"tokens": tokens}
        labels = np.full((self.batch_size,), -1, np.int32)
        labels[: len(indices)] = self.labels[indices]
        return {"tokens": tokens, "labels": labels}


def data_seed(config: ml_collections.ConfigDict) -> int:
    """The seed of the data order: ``config.data_seed``, or ``config.seed`` where it is −1."""
    seed = config.get("data_seed", -1)
    return config.seed if seed < 0 else seed


def data_root(config: ml_collections.ConfigDict) -> str:
    """``config.data.data_dir``, else ``$VAE_JAX_DATA_DIR/<corpus folder>``."""
    if config.data.data_dir:
        return config.data.data_dir
    if not os.environ.get(text.DATA_DIR_ENV):
        raise ValueError(
            f"config.data.data_dir is empty and ${text.DATA_DIR_ENV} is unset: set one to "
            f"the directory holding the {config.data.name} files "
            f"{text.get_spec(config.data.name).expected_files()}."
        )
    return os.fspath(text.source_dir_for(config.data.name))


def tfds_dir(config: ml_collections.ConfigDict) -> str:
    """Where built datasets go: ``config.data.tfds_dir``, ``$VAE_JAX_TFDS_DIR`` or a cache."""
    return (
        config.data.tfds_dir
        or os.environ.get("VAE_JAX_TFDS_DIR")
        or os.path.join(os.path.expanduser("~"), ".cache", "vae_jax", "tfds")
    )


def get_text_data(config: ml_collections.ConfigDict) -> Data:
    """A plain-text corpus (``config.data.name`` in `text.CORPORA`), built with TFDS."""
    d = config.data
    dataset = text.load(d.name, data_root(config), tfds_dir(config), max_length=d.max_length)
    for split, stats in dataset.stats.items():
        logging.info(
            "%s/%s: %d sentences, %d words, %d predicted tokens, %d longer than "
            "max_length=%d dropped.",
            d.name,
            split,
            stats.sentences,
            stats.words,
            stats.predicted_tokens,
            stats.dropped_too_long,
            d.max_length,
        )
    splits, labels = {}, {}
    labelled = text.get_spec(d.name).labelled
    for name in (d.train_split, *d.eval_splits):
        split = dataset.splits[name]
        if len(split) == 0:
            raise ValueError(f"{d.name}: split {name!r} has no sentences to use.")
        splits[name] = [with_boundaries(s) for s in split.__getitems__(range(len(split)))]
        labels[name] = split.labels() if labelled else None
    train = LengthBatcher(
        splits[d.train_split], config.batch_size, d.bucket_lengths, data_seed(config),
        labels=labels[d.train_split], composition=batch_composition(d),
    )  # fmt: skip
    eval_splits = {}
    for name in d.eval_splits:
        batcher = LengthBatcher(
            splits[name], config.eval_batch_size, d.bucket_lengths, labels=labels[name]
        )
        eval_splits[name] = [batcher.batch(b) for b in batcher.plan()]
    return Data(
        vocab_size=len(dataset.vocab),
        train=lambda step: train.epochs(*divmod(step, train.steps_per_epoch)),
        eval_splits=eval_splits,
        steps_per_epoch=train.steps_per_epoch,
        info={
            "vocab": dataset.vocab,
            "stats": dataset.stats,
            "batcher": train,
            "fingerprint": dataset.fingerprint,
        },
    )


def get_synthetic_data(config: ml_collections.ConfigDict) -> Data:
    """The synthetic task's ``num_sequences`` sequences (`vae_jax.data.synthetic`), which are
    also its one evaluation split."""
    d = config.data
    seqs = synthetic.make_sequences(d.num_sequences, d.length, d.vocab_size, d.seed)
    return Data(
        vocab_size=d.vocab_size,
        train=functools.partial(synthetic_stream, seqs, config.batch_size, data_seed(config)),
        eval_splits={"eval": pad_rows(seqs, config.eval_batch_size)},
        steps_per_epoch=None,
        info={"sequences": seqs, "fingerprint": hashlib.sha256(seqs.tobytes()).hexdigest()},
    )
