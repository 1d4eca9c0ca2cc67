"""Input pipelines: global batches of ``{"tokens": int32 (B, L)}`` as numpy arrays (labelled
corpora add ``"labels"``: int32 (B,), −1 on filler rows).

A token row is ``<s> w₁ … w_n </s>`` then ``<pad>``. Rows that are all padding fill a batch to
its fixed size and count for nothing in any objective or metric.

Dialog corpora (SwitchBoard, `DialogBatcher`) give one row per response: ``tokens`` the
response and its context's fields (the layout of `vae_jax.cvae`).

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

from vae_jax.datasets import swda, synthetic, text
from vae_jax.tokens import BOS_ID, EOS_ID

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
        """Rows ``indices`` in the `vae_jax.cvae` layout, filled to ``size`` (default
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
    `vae_jax.datasets.swda`, read from ``config.data.data_dir`` (the folder holding ``swda/``
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


def get_data(config: ml_collections.ConfigDict) -> Data:
    """Builds the dataset named by ``config.data.name``."""
    name = config.data.name
    if name in text.CORPORA:
        return get_text_data(config)
    if name == swda.NAME:
        return get_dialog_data(config)
    if name == "synthetic":
        d = config.data
        seqs = synthetic.make_sequences(d.num_sequences, d.length, d.vocab_size, d.seed)
        return Data(
            vocab_size=d.vocab_size,
            train=functools.partial(synthetic_stream, seqs, config.batch_size, data_seed(config)),
            eval_splits={"eval": pad_rows(seqs, config.eval_batch_size)},
            steps_per_epoch=None,
            info={"sequences": seqs, "fingerprint": hashlib.sha256(seqs.tobytes()).hexdigest()},
        )
    raise ValueError(
        f"config.data.name={name!r}: must be one of "
        f"{['synthetic', swda.NAME, *sorted(text.CORPORA)]}."
    )
