"""Plain-text corpora (PTB, Yahoo, Short Yelp, Yelp sentiment) as TFDS ``array_record`` datasets.

One TFDS builder, :class:`VaeText` (registered as ``vae_text``), handles every corpus. A small
:class:`CorpusSpec` per corpus (see ``CORPORA``) says which files hold which split, how a line
carries its label, what the corpus's own unknown-word token is and where the vocabulary comes
from. The corpus is read from a caller-supplied source directory, which is only ever read; the
dataset is written as ``array_record`` into a caller-supplied TFDS data dir, so it can be read
with random access (``tfds.data_source``) without TensorFlow.

Public API
----------
``load(corpus, source_dir, tfds_dir, max_length=200) -> TextDataset``
    Builds ``vae_text/<corpus>_max<max_length>_<fingerprint>`` under ``tfds_dir`` if needed
    (and again if its files were damaged) and opens it.
``TextDataset``
    ``.vocab`` (:class:`Vocab`), ``.splits`` (``dict[str, TextSplit]``), ``.stats``
    (``dict[str, SplitStats]``), ``.missing_splits``, ``.vocab_source``, ``.data_dir``.
``Vocab``
    ``.words`` (tuple, index = id), ``.word_to_id``, ``len()``, ``encode(text) -> int32 array``,
    ``decode(ids) -> str``.
``TextSplit``
    ``len()``; ``split[i]`` -> the sentence's word ids (``np.int32``, WITHOUT ``<s>``/``</s>``,
    which the input pipeline adds); ``split.__getitems__(indices)`` (batched, much faster);
    ``split.example(i)`` -> ``{"ids", "index", ["label"]}`` where ``index`` is the 0-based
    position of the sentence's line in the split's source file(s) (files read in spec order).
``SplitStats``
    ``sentences``, ``words``, ``unks``, ``dropped_too_long``, ``dropped_empty`` and
    ``predicted_tokens`` (= words + sentences: every word plus one ``</s>`` per sentence).
``source_dir_for(corpus, data_root=None)``
    ``<data_root or $VAE_JAX_DATA_DIR>/<spec.folder>``, the conventional source location.

Vocabulary
----------
Ids 0..3 are ``<pad>``, ``<unk>``, ``<s>``, ``</s>``. The remaining words come from the first
available source in ``CorpusSpec.vocab_from``: either a split (normally ``train``), ordered by
descending frequency with ties broken by first appearance, counted over all its non-empty lines
(including overlong ones, so the vocabulary does not depend on ``max_length``); or a vocabulary
file shipped with the corpus (one word per line, optionally followed by an id), kept in file
order. The corpus's own unknown token (``<unk>`` in PTB, ``_UNK`` in Yahoo) maps to id 1 and
gets no id of its own. The vocabulary is stored in the built dataset's ``metadata.json`` and
always reloaded from there.

Stale builds
------------
The config name encodes ``max_length`` and 12 hex digits of the build's fingerprint (sha256 of
every source file it read, the corpus spec, ``max_length`` and a format version; the whole is
recorded in its metadata and is ``TextDataset.fingerprint``): changed sources are built beside
the old build, never over it, so a run trained on the old data still finds it. After a build
the sha256 of its array_record files is written beside them; :func:`load` checks them and the
record counts, and rebuilds (with a warning naming the directory) a build that was damaged.
"""

import collections
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from vae_jax.core.tokens import BOS, BOS_ID, EOS, EOS_ID, PAD, PAD_ID, SPECIALS, UNK, UNK_ID

logger = logging.getLogger(__name__)


# Bump when the meaning of a built dataset changes (parsing, features, vocabulary order): it
# is part of the fingerprint, so older builds are rebuilt rather than misread.
_FORMAT_VERSION = 1
_LABEL_FORMATS = ("none", "tab", "suffix")
DATA_DIR_ENV = "VAE_JAX_DATA_DIR"


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """How one corpus is laid out on disk.

    Attributes:
      name: corpus name, also the prefix of the TFDS config name.
      folder: conventional folder name under the data root (see :func:`source_dir_for`).
      splits: split name -> file names, read and concatenated in this order.
      optional_splits: splits whose files may all be absent (they are skipped with a warning
        and listed in ``missing_splits``); any other missing file is an error.
      unk_token: the corpus's own unknown-word token, mapped to ``<unk>`` (id 1).
      label_format: ``"none"``; ``"tab"`` (``label<TAB>sentence`` lines); or ``"suffix"``
        (every file name ends in ``.<label>``).
      vocab_from: where the vocabulary comes from, first available wins: a split name or
        ``"file:<name>"`` for a vocabulary file in the source directory.
      file_specials: the vocabulary file's own special tokens besides ours and ``unk_token``
        (e.g. ``<go>``, ``<eos>``), skipped: ids 0–3 are ours, the file's words follow in its
        order.
    """

    name: str
    folder: str
    splits: Mapping[str, tuple[str, ...]]
    optional_splits: tuple[str, ...] = ()
    unk_token: str = UNK
    label_format: str = "none"
    vocab_from: tuple[str, ...] = ("train",)
    file_specials: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.label_format not in _LABEL_FORMATS:
            raise ValueError(f"{self.name}: label_format must be one of {_LABEL_FORMATS}")
        unknown = set(self.optional_splits) - set(self.splits)
        if unknown:
            raise ValueError(f"{self.name}: optional_splits {sorted(unknown)} are not splits")
        for source in self.vocab_from:
            if not source.startswith("file:") and source not in self.splits:
                raise ValueError(f"{self.name}: vocab_from names unknown split {source!r}")
        if self.label_format == "suffix":
            for name in self.all_split_files():
                _suffix_label(name)  # fail at definition time, not half-way through a build

    @property
    def labelled(self) -> bool:
        return self.label_format != "none"

    def all_split_files(self) -> list[str]:
        return [name for files in self.splits.values() for name in files]

    def expected_files(self) -> list[str]:
        """Every file the spec can use: split files and vocabulary files."""
        vocab_files = [s[len("file:") :] for s in self.vocab_from if s.startswith("file:")]
        return self.all_split_files() + vocab_files

    def signature(self) -> dict[str, Any]:
        """JSON-normal description of the spec, recorded in the build's fingerprint (fields
        added since at their defaults left out, so older builds keep their fingerprints)."""
        fields = dataclasses.asdict(self)
        if not fields["file_specials"]:
            del fields["file_specials"]
        return json.loads(json.dumps(fields))


def _suffix_label(file_name: str) -> int:
    suffix = file_name.rsplit(".", 1)[-1]
    try:
        return int(suffix)
    except ValueError:
        msg = f"{file_name}: label_format 'suffix' needs a file name ending in .<int>"
        raise ValueError(msg) from None


_SHORT_YELP_SUBSETS = (100, 500, 1000, 2000, 10000)

CORPORA: dict[str, CorpusSpec] = {
    spec.name: spec
    for spec in (
        CorpusSpec(
            name="ptb",
            folder="ptb",
            splits={
                "train": ("ptb.train.txt",),
                "valid": ("ptb.valid.txt",),
                "test": ("ptb.test.txt",),
            },
        ),
        # The 100k training documents of Yang et al. are not distributed with this copy; the
        # vocabulary they were numbered with (yahoo.dict) is, so that is preferred.
        CorpusSpec(
            name="yahoo",
            folder="yahoo",
            splits={
                "train": ("yahoo.train.txt",),
                "valid": ("yahoo.valid.txt",),
                "test": ("yahoo.test.txt",),
            },
            optional_splits=("train",),
            unk_token="_UNK",
            vocab_from=("file:yahoo.dict", "train"),
        ),
        # Only labelled subsets of the training data exist here; vocab.txt was built on the
        # full training set, which a 100-sentence subset could never reproduce.
        CorpusSpec(
            name="short_yelp",
            folder="short_yelp",
            splits={
                "train": ("short_yelp.train.txt",),
                **{f"train_{n}": (f"short_yelp.train.{n}.txt",) for n in _SHORT_YELP_SUBSETS},
                "valid": ("short_yelp.valid.txt",),
                "test": ("short_yelp.test.txt",),
            },
            optional_splits=("train",),
            label_format="tab",
            vocab_from=("file:vocab.txt", "train"),
        ),
        # Shen et al.'s "dev" is called "valid" here, like the other corpora. Without the
        # training files the vocabulary falls back to valid, with a warning.
        CorpusSpec(
            name="yelp_sentiment",
            folder="yelp_shen_sentiment",
            splits={
                "train": ("sentiment.train.0", "sentiment.train.1"),
                "valid": ("sentiment.dev.0", "sentiment.dev.1"),
                "test": ("sentiment.test.0", "sentiment.test.1"),
            },
            optional_splits=("train",),
            label_format="suffix",
            vocab_from=("train", "valid"),
        ),
        # The first 10% of each Shen et al. file, as the cyclical-annealing paper's Yelp
        # experiment preprocessed it (rare words already <unk>), with its vocabulary in its
        # own id order: <pad> <go> <eos> <unk> then words, so that the words keep their ids.
        CorpusSpec(
            name="yelp_10pct",
            folder=os.path.join("yelp_shen_sentiment", "first10pct"),
            splits={
                "train": ("sentiment.train.0", "sentiment.train.1"),
                "valid": ("sentiment.dev.0", "sentiment.dev.1"),
                "test": ("sentiment.test.0", "sentiment.test.1"),
            },
            label_format="suffix",
            vocab_from=("file:vocab.txt",),
            file_specials=("<go>", "<eos>"),
        ),
    )
}


def get_spec(corpus: str) -> CorpusSpec:
    """Returns the spec of a known corpus."""
    try:
        return CORPORA[corpus]
    except KeyError:
        raise ValueError(f"unknown corpus {corpus!r}; known: {sorted(CORPORA)}") from None


def source_dir_for(corpus: str, data_root: str | os.PathLike | None = None) -> Path:
    """Conventional source directory: ``<data_root or $VAE_JAX_DATA_DIR>/<spec.folder>``."""
    root = data_root if data_root is not None else os.environ.get(DATA_DIR_ENV)
    if not root:
        raise ValueError(f"no data root given and ${DATA_DIR_ENV} is not set")
    return Path(root) / get_spec(corpus).folder


# ----------------------------------------------------------------------------- vocabulary


class Vocab:
    """Word <-> id mapping; ids 0..3 are the specials, ``unk_token`` is an alias of ``<unk>``."""

    def __init__(self, words: Sequence[str], unk_token: str = UNK) -> None:
        words = tuple(words)
        if words[: len(SPECIALS)] != SPECIALS:
            raise ValueError(f"vocabulary must start with {SPECIALS}, got {words[:4]}")
        if len(set(words)) != len(words):
            raise ValueError("vocabulary has duplicate words")
        self.words: tuple[str, ...] = words
        self.unk_token = unk_token
        self.word_to_id: dict[str, int] = {w: i for i, w in enumerate(words)}
        self.word_to_id.setdefault(unk_token, UNK_ID)

    def __len__(self) -> int:
        return len(self.words)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Vocab)
            and self.words == other.words
            and self.unk_token == other.unk_token
        )

    def __repr__(self) -> str:
        return f"Vocab({len(self)} words, unk_token={self.unk_token!r})"

    def encode(self, text: str | Iterable[str]) -> np.ndarray:
        """Ids of a whitespace-tokenised sentence (or token list); unknown words -> ``<unk>``.

        No ``<s>``/``</s>`` are added.
        """
        tokens = text.split() if isinstance(text, str) else list(text)
        lookup = self.word_to_id.get
        return np.fromiter((lookup(t, UNK_ID) for t in tokens), dtype=np.int32, count=len(tokens))

    def decode(self, ids: Iterable[int], *, strip_special: bool = True) -> str:
        """Space-joined words of ``ids``.

        With ``strip_special`` (default) ``<pad>`` and ``<s>`` are skipped and decoding stops at
        the first ``</s>``, which is what one wants for model samples.
        """
        words = []
        for i in np.asarray(ids).reshape(-1).tolist():
            if strip_special:
                if i == EOS_ID:
                    break
                if i in (PAD_ID, BOS_ID):
                    continue
            if not 0 <= i < len(self.words):
                raise ValueError(f"id {i} is outside the vocabulary of {len(self.words)} words")
            words.append(self.words[i])
        return " ".join(words)


# ----------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class SplitStats:
    """Counts for one split, after dropping overlong and empty lines."""

    sentences: int
    words: int
    unks: int
    dropped_too_long: int
    dropped_empty: int

    @property
    def predicted_tokens(self) -> int:
        """Tokens a language model predicts: every word plus one ``</s>`` per sentence."""
        return self.words + self.sentences


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Which of the spec's files exist: the result of :func:`_check_sources`."""

    source_dir: Path
    splits: dict[str, tuple[Path, ...]]
    missing_splits: tuple[str, ...]
    vocab_source: str  # a split name or "file:<name>"

    def files(self) -> list[Path]:
        paths = [p for ps in self.splits.values() for p in ps]
        if self.vocab_source.startswith("file:"):
            paths.append(self.source_dir / self.vocab_source[len("file:") :])
        return paths


def _check_sources(spec: CorpusSpec, source_dir: str | os.PathLike) -> _Layout:
    """Finds the spec's files in ``source_dir``; raises ``FileNotFoundError`` before any work."""
    source_dir = Path(source_dir)
    expected = ", ".join(spec.expected_files())
    if not source_dir.is_dir():
        raise FileNotFoundError(
            f"{spec.name}: source directory {source_dir} does not exist (or is not a directory);"
            f" expected it to contain: {expected}"
        )
    splits: dict[str, tuple[Path, ...]] = {}
    missing_splits = []
    for split, names in spec.splits.items():
        paths = tuple(source_dir / n for n in names)
        absent = [p for p in paths if not p.is_file()]
        if not absent:
            splits[split] = paths
        elif split in spec.optional_splits and len(absent) == len(paths):
            missing_splits.append(split)
        else:
            raise FileNotFoundError(
                f"{spec.name}: missing {', '.join(str(p) for p in absent)} (split {split!r});"
                f" {source_dir} should contain: {expected}"
            )
    for source in spec.vocab_from:
        if source in splits or (
            source.startswith("file:") and (source_dir / source[len("file:") :]).is_file()
        ):
            vocab_source = source
            break
    else:
        raise FileNotFoundError(
            f"{spec.name}: no vocabulary source {list(spec.vocab_from)} found in {source_dir};"
            f" expected files: {expected}"
        )
    return _Layout(source_dir, splits, tuple(missing_splits), vocab_source)


def _log_deviations(
    spec: CorpusSpec,
    missing_splits: Sequence[str],
    vocab_source: str,
    stats: Mapping[str, SplitStats],
    max_length: int,
) -> None:
    """Says, on every build and every reuse, where the dataset departs from the full corpus."""
    if missing_splits:
        logger.warning(
            "%s: split(s) %s absent from the source directory (files %s); built without them",
            spec.name,
            list(missing_splits),
            [n for s in missing_splits for n in spec.splits[s]],
        )
    if vocab_source != spec.vocab_from[0]:
        logger.warning(
            "%s: vocabulary taken from %r because %r is unavailable (a deviation from the"
            " corpus's usual vocabulary)",
            spec.name,
            vocab_source,
            spec.vocab_from[0],
        )
    for split, st in stats.items():
        if st.dropped_too_long:
            logger.warning(
                "%s/%s: dropped %d sentence(s) longer than max_length=%d words",
                spec.name,
                split,
                st.dropped_too_long,
                max_length,
            )
        if st.dropped_empty:
            logger.warning("%s/%s: dropped %d empty line(s)", spec.name, split, st.dropped_empty)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fingerprint(spec: CorpusSpec, max_length: int, digests: Mapping[str, str]) -> dict:
    """What a build depends on, JSON-normal so it compares equal after a metadata round trip."""
    return json.loads(
        json.dumps(
            {
                "format_version": _FORMAT_VERSION,
                "max_length": max_length,
                "spec": spec.signature(),
                "files": dict(sorted(digests.items())),
            }
        )
    )


def _decode_lines(path: Path, data: bytes) -> list[str]:
    """UTF-8 lines of a file, split on ``\\n`` only (``str.splitlines`` would also split on
    form feeds and Unicode separators and shift line numbers)."""
    pieces = data.split(b"\n")
    if pieces[-1] == b"":
        pieces.pop()  # the final newline ends the last line; it does not start a new one
    lines = []
    for lineno, raw in enumerate(pieces, start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{path}: line {lineno} is not valid UTF-8 ({e.reason} at byte {e.start})"
            ) from None
    if lines and lines[0].startswith("\ufeff"):
        lines[0] = lines[0][1:]  # a byte-order mark is not part of the first word
    return lines


# One parsed line: (tokens, label), or None for a blank line.
_Line = tuple[list[str], int] | None


def _parse_lines(spec: CorpusSpec, path: Path, lines: list[str]) -> list[_Line]:
    file_label = _suffix_label(path.name) if spec.label_format == "suffix" else -1
    reserved = {PAD, BOS, EOS}
    parsed: list[_Line] = []
    for lineno, line in enumerate(lines, start=1):
        label = file_label
        text = line
        if spec.label_format == "tab" and line.strip():
            head, tab, text = line.partition("\t")
            try:
                if not tab:
                    raise ValueError
                label = int(head)
            except ValueError:
                raise ValueError(
                    f"{path}: line {lineno} is not 'label<TAB>sentence' with an integer label"
                ) from None
        tokens = text.split()
        if not tokens:
            parsed.append(None)
            continue
        clash = reserved.intersection(tokens)
        if clash:
            # They would silently collide with the ids the pipeline adds.
            raise ValueError(f"{path}: line {lineno} contains reserved token(s) {sorted(clash)}")
        parsed.append((tokens, label))
    if not any(p is not None for p in parsed):
        raise ValueError(f"{path}: file is empty (no sentences); every split needs at least one")
    return parsed


def _vocab_from_file(spec: CorpusSpec, path: Path, lines: list[str]) -> Vocab:
    words = list(SPECIALS)
    seen = set(words)
    for lineno, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields or fields[0] in (*SPECIALS, spec.unk_token, *spec.file_specials):
            continue  # the file's own specials map onto ours
        if fields[0] in seen:
            raise ValueError(f"{path}: line {lineno} repeats vocabulary word {fields[0]!r}")
        seen.add(fields[0])
        words.append(fields[0])
    return Vocab(words, unk_token=spec.unk_token)


def _vocab_from_lines(spec: CorpusSpec, lines: Iterable[_Line]) -> Vocab:
    counts: collections.Counter[str] = collections.Counter()
    for parsed in lines:
        if parsed is not None:
            counts.update(parsed[0])
    for special in (*SPECIALS, spec.unk_token):
        counts.pop(special, None)
    # Counter keeps first-appearance order and sorted() is stable, so ties keep that order.
    ordered = sorted(counts, key=lambda w: -counts[w])
    return Vocab(SPECIALS + tuple(ordered), unk_token=spec.unk_token)


@dataclasses.dataclass
class _Prepared:
    vocab: Vocab
    examples: dict[str, list[dict[str, Any]]]
    stats: dict[str, SplitStats]
    metadata: dict[str, Any]


def _prepare(spec: CorpusSpec, source_dir: str | os.PathLike, max_length: int) -> _Prepared:
    """Reads, checks, numbers and counts a corpus: everything a build needs, in plain Python."""
    layout = _check_sources(spec, source_dir)
    digests: dict[str, str] = {}
    parsed: dict[str, list[_Line]] = {}
    for split, paths in layout.splits.items():
        parsed[split] = []
        for path in paths:
            data = path.read_bytes()
            digests[path.name] = _digest(data)
            parsed[split].extend(_parse_lines(spec, path, _decode_lines(path, data)))

    if layout.vocab_source.startswith("file:"):
        path = layout.source_dir / layout.vocab_source[len("file:") :]
        data = path.read_bytes()
        digests[path.name] = _digest(data)
        vocab = _vocab_from_file(spec, path, _decode_lines(path, data))
    else:
        vocab = _vocab_from_lines(spec, parsed[layout.vocab_source])

    examples: dict[str, list[dict[str, Any]]] = {}
    stats: dict[str, SplitStats] = {}
    for split, lines in parsed.items():
        kept = []
        words = unks = too_long = empty = 0
        for index, line in enumerate(lines):
            if line is None:
                empty += 1
                continue
            tokens, label = line
            if len(tokens) > max_length:
                too_long += 1
                continue
            ids = vocab.encode(tokens)
            words += len(ids)
            unks += int(np.count_nonzero(ids == UNK_ID))
            example = {"ids": ids, "index": index}
            if spec.labelled:
                example["label"] = label
            kept.append(example)
        if not kept:
            raise ValueError(
                f"{spec.name}: every sentence of split {split!r}"
                f" ({', '.join(str(p) for p in layout.splits[split])}) is longer than"
                f" max_length={max_length}"
            )
        examples[split] = kept
        stats[split] = SplitStats(len(kept), words, unks, too_long, empty)

    _log_deviations(spec, layout.missing_splits, layout.vocab_source, stats, max_length)
    metadata = {
        "corpus": spec.name,
        "vocab": list(vocab.words),
        "unk_token": spec.unk_token,
        "vocab_source": layout.vocab_source,
        "missing_splits": list(layout.missing_splits),
        "stats": {s: dataclasses.asdict(st) for s, st in stats.items()},
        "fingerprint": _fingerprint(spec, max_length, digests),
    }
    return _Prepared(vocab, examples, stats, metadata)


# ----------------------------------------------------------------------------- TFDS builder


@dataclasses.dataclass(eq=False)
class VaeTextConfig(tfds.core.BuilderConfig):
    """A corpus spec plus the sentence-length limit; the name is ``<corpus>_max<max_length>``."""

    spec: CorpusSpec | None = None
    max_length: int = 200


def fingerprint_id(fingerprint: Mapping[str, Any]) -> str:
    """sha256 of a build's fingerprint (sources, settings, format): the data's identity."""
    return _digest(json.dumps(fingerprint, sort_keys=True).encode())


def _make_config(corpus: str, max_length: int, fingerprint: str | None = None) -> VaeTextConfig:
    """``<corpus>_max<max_length>``, plus ``_<12 hex digits of the fingerprint>`` for a build:
    builds of different sources live side by side and never overwrite each other."""
    spec = get_spec(corpus)
    suffix = f"_{fingerprint[:12]}" if fingerprint else ""
    return VaeTextConfig(
        name=f"{corpus}_max{max_length}{suffix}",
        description=f"{corpus} from {spec.folder}/, sentences of at most {max_length} words",
        spec=spec,
        max_length=max_length,
    )


class _LocalDatasetInfo(tfds.core.DatasetInfo):
    """DatasetInfo that never looks for a pre-computed copy on the public TFDS bucket."""

    def initialize_from_bucket(self) -> None:
        # These datasets are never published there, and TFDS's lookup leaves an empty temporary
        # directory behind on every construction of an unbuilt builder.
        return None


class VaeText(tfds.core.GeneratorBasedBuilder):
    """Plain-text corpora for text VAEs; source files come from ``DownloadConfig.manual_dir``."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Pass the corpus directory (e.g. $VAE_JAX_DATA_DIR/ptb) as manual_dir, or use"
        " vae_jax.data.text.load()."
    )
    BUILDER_CONFIGS = [_make_config(corpus, 200) for corpus in CORPORA]

    def _info(self) -> tfds.core.DatasetInfo:
        spec = self.builder_config.spec
        features: dict[str, Any] = {
            # Raw bytes: decodes to one int32 ndarray (a Sequence decodes to a list of scalars
            # without TensorFlow) and reads faster.
            "ids": tfds.features.Tensor(
                shape=(None,), dtype=np.int32, encoding=tfds.features.Encoding.BYTES
            ),
            "index": np.int64,
        }
        if spec.labelled:
            features["label"] = np.int32
        # DatasetInfo directly, not dataset_info_from_configs(), which would scan this
        # package's directory for TFDS metadata files.
        return _LocalDatasetInfo(
            builder=self,
            description=self.builder_config.description,
            features=tfds.features.FeaturesDict(features),
            disable_shuffling=True,  # keep the file's line order
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        config = self.builder_config
        prepared = _prepare(config.spec, Path(dl_manager.manual_dir), config.max_length)
        self.info.metadata.update(prepared.metadata)
        return {
            split: self._generate_examples(examples)
            for split, examples in prepared.examples.items()
        }

    def _generate_examples(
        self, examples: list[dict[str, Any]]
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        yield from enumerate(examples)


# ----------------------------------------------------------------------------- loading


class TextSplit:
    """Random access to one split; ``split[i]`` is the int32 ids of sentence ``i``.

    The arrays are read-only views of the stored bytes; copy one before writing into it.
    """

    def __init__(self, name: str, source: Any) -> None:
        self.name = name
        self.source = source  # the underlying tfds ArrayRecordDataSource
        self._len = len(source)

    def __len__(self) -> int:
        return self._len

    def _check(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"index out of range for split {self.name!r} of {self._len}")
        return i

    def example(self, i: int) -> dict[str, Any]:
        """The full record: ``ids``, ``index`` (source line position) and ``label`` if any."""
        return self.source[self._check(i)]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.example(i)["ids"]

    def labels(self) -> np.ndarray:
        """Every sentence's label (int32, in split order); a ``ValueError`` for an unlabelled
        corpus."""
        out = []
        for start in range(0, self._len, 1024):
            indices = range(start, min(start + 1024, self._len))
            chunk = self.source.__getitems__(list(indices))
            if chunk and "label" not in chunk[0]:
                raise ValueError(f"split {self.name!r} has no labels (an unlabelled corpus).")
            out.extend(int(r["label"]) for r in chunk)
        return np.asarray(out, np.int32)

    def __getitems__(self, indices: Sequence[int]) -> list[np.ndarray]:
        # One array_record read for the batch is several times faster than per-item reads.
        records = self.source.__getitems__([self._check(i) for i in indices])
        return [r["ids"] for r in records]

    def __iter__(self) -> Iterator[np.ndarray]:
        for start in range(0, self._len, 1024):
            yield from self.__getitems__(range(start, min(start + 1024, self._len)))

    def __repr__(self) -> str:
        return f"TextSplit({self.name!r}, {self._len} sentences)"


class _Splits(dict):
    """A dict of splits whose KeyError explains absent or unknown splits."""

    def __init__(self, splits: Mapping[str, TextSplit], spec: CorpusSpec, missing: Sequence[str]):
        super().__init__(splits)
        self._spec = spec
        self._missing = tuple(missing)

    def __missing__(self, key: str) -> TextSplit:
        if key in self._missing:
            raise KeyError(
                f"split {key!r} of {self._spec.name} was not built: its files"
                f" {list(self._spec.splits[key])} are absent from the source directory"
            )
        raise KeyError(f"{self._spec.name} has no split {key!r}; it has {sorted(self)}")


@dataclasses.dataclass(frozen=True)
class TextDataset:
    """A built corpus: vocabulary, random-access splits and their statistics."""

    corpus: str
    vocab: Vocab
    splits: dict[str, TextSplit]
    stats: dict[str, SplitStats]
    missing_splits: tuple[str, ...]
    vocab_source: str
    max_length: int
    data_dir: Path  # the built dataset's directory, .../vae_text/<config>/<version>
    fingerprint: str = ""  # `fingerprint_id` of the sources and settings it was built from


_FILES = "vae_jax_files.json"  # sha256 of each file of a build, written after it


def _build_files(data_dir: Path) -> dict[str, str]:
    return {
        p.name: _digest(p.read_bytes())
        for p in sorted(data_dir.iterdir())
        if p.is_file() and ".array_record" in p.name
    }


def _damage(builder: tfds.core.DatasetBuilder, count_key: str = "sentences") -> str | None:
    """What is wrong with a prepared build's files (None if nothing): missing or changed
    array_record files against the digests written after the build, or record counts that
    differ from its statistics (``metadata["stats"][split][count_key]``)."""
    data_dir = Path(builder.data_dir)
    sidecar = data_dir / _FILES
    if not sidecar.exists():
        return f"no {_FILES} (an interrupted build, or one from before vae_jax recorded it)"
    want = json.loads(sidecar.read_text(encoding="utf-8"))
    have = _build_files(data_dir)
    missing = sorted(set(want) - set(have))
    changed = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or changed:
        return f"missing files {missing}, changed files {changed}"
    try:
        sources = builder.as_data_source()
        stats = builder.info.metadata["stats"]
        counts = {s: (len(sources[s]), st[count_key]) for s, st in stats.items()}
    except Exception as e:  # noqa: BLE001  (whatever TFDS or array_record raise)
        return f"unreadable ({type(e).__name__}: {e})"
    wrong = {s: c for s, c in counts.items() if c[0] != c[1]}
    return f"record counts (have, built) {wrong}" if wrong else None


def _current_fingerprint(spec: CorpusSpec, layout: _Layout, max_length: int) -> dict:
    digests = {p.name: _digest(p.read_bytes()) for p in layout.files()}
    return _fingerprint(spec, max_length, digests)


def _open(builder: VaeText, spec: CorpusSpec) -> TextDataset:
    meta = builder.info.metadata
    vocab = Vocab(meta["vocab"], unk_token=meta["unk_token"])
    stats = {s: SplitStats(**st) for s, st in meta["stats"].items()}
    sources = builder.as_data_source()
    splits = _Splits({s: TextSplit(s, sources[s]) for s in stats}, spec, meta["missing_splits"])
    return TextDataset(
        corpus=spec.name,
        vocab=vocab,
        splits=splits,
        stats=stats,
        missing_splits=tuple(meta["missing_splits"]),
        vocab_source=meta["vocab_source"],
        max_length=builder.builder_config.max_length,
        data_dir=Path(builder.data_dir),
        fingerprint=fingerprint_id(meta["fingerprint"]),
    )


def load(
    corpus: str,
    source_dir: str | os.PathLike,
    tfds_dir: str | os.PathLike,
    max_length: int = 200,
) -> TextDataset:
    """Builds (if needed) and opens ``corpus`` read from ``source_dir`` into ``tfds_dir``.

    Raises:
      FileNotFoundError: ``source_dir`` or a required file is missing (before any building).
      ValueError: unknown corpus, ``max_length < 1``, an empty file, a non-UTF-8 line (the
        message gives file and 1-based line number) or another malformed line.
    """
    spec = get_spec(corpus)
    if int(max_length) != max_length or max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    max_length = int(max_length)
    layout = _check_sources(spec, source_dir)
    fingerprint = _current_fingerprint(spec, layout, max_length)

    config = _make_config(corpus, max_length, fingerprint_id(fingerprint))
    with _build_lock(tfds_dir, config.name) as writable:
        return _build_or_open(
            spec, config, layout, fingerprint, source_dir, tfds_dir, max_length, writable
        )


@contextlib.contextmanager
def _build_lock(tfds_dir: str | os.PathLike, name: str) -> Iterator[bool]:
    """Holds ``<tfds_dir>/<name>.lock`` (``flock``, released however the holder exits):
    processes loading the same build at once (a sweep's parallel jobs) take turns, the first
    builds it, the others then find it prepared. Yields whether the cache is writable: a
    read-only one (a shared, finished cache) is only read, under a shared lock where its lock
    file exists (`_ensure_prepared` then refuses to build)."""
    os.makedirs(tfds_dir, exist_ok=True)
    path = os.path.join(os.fspath(tfds_dir), f"{name}.lock")
    try:
        lock = open(path, "a")  # noqa: SIM115  (closed below)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        lock, writable = None, False
        with contextlib.suppress(OSError):
            lock = open(path)  # noqa: SIM115
    else:
        writable = True
    try:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_EX if writable else fcntl.LOCK_SH)
        yield writable
    finally:
        if lock is not None:
            lock.close()


def _ensure_prepared(
    make_builder: Callable[[], tfds.core.DatasetBuilder],
    fingerprint: Mapping[str, Any],
    *,
    name: str,
    manual_dir: str | os.PathLike,
    source_desc: str,
    count_key: str = "sentences",
    writable: bool = True,
) -> tuple[tfds.core.DatasetBuilder, bool]:
    """Makes sure the build of ``make_builder()`` exists, is of ``fingerprint`` and is
    undamaged, (re)building it otherwise; call it holding :func:`_build_lock`.

    Returns the builder (a fresh one after a build, reading back exactly what was written, as
    a later load would) and whether it was built now. ``name`` and ``source_desc`` only word
    the messages; ``count_key`` is the per-split record count in ``metadata["stats"]``.
    In a read-only cache (``writable`` False) a build that would be (re)built is an error.
    """
    builder = make_builder()
    # Checking existence first: is_prepared() logs a warning for a folder that is not there.
    exists = builder.data_path.exists()
    prepared = exists and builder.is_prepared()
    if prepared and builder.info.metadata.get("fingerprint") != fingerprint:
        # The name carries the fingerprint's hash: only a hash collision or a hand-edited
        # build gets here.
        logger.warning(
            "%s: the build at %s is of other sources; rebuilding it", name, builder.data_dir
        )
        prepared = False
    if prepared:
        damage = _damage(builder, count_key)
        if damage and not writable:
            raise ValueError(
                f"{name}: the build at {builder.data_dir} is damaged ({damage}) and its cache "
                "is read-only; point config.data.tfds_dir at a writable one to rebuild it."
            )
        if damage:
            logger.warning(
                "%s: the build at %s is damaged (%s); rebuilding it",
                name,
                builder.data_dir,
                damage,
            )
            shutil.rmtree(builder.data_dir)
            builder, exists, prepared = make_builder(), False, False
    if prepared:
        return builder, False
    if not writable:
        raise ValueError(
            f"{name}: no complete build of these sources at {builder.data_dir}, and the cache "
            "is read-only; point config.data.tfds_dir at a writable one to build it."
        )
    mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    if exists:
        mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS  # deletes, then regenerates
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=os.fspath(manual_dir),
            download_mode=mode,
            try_download_gcs=False,
        )
    )
    files = _build_files(Path(builder.data_dir))
    (Path(builder.data_dir) / _FILES).write_text(json.dumps(files, indent=1), encoding="utf-8")
    builder = make_builder()
    if builder.info.metadata.get("fingerprint") != fingerprint:
        raise RuntimeError(f"{name}: source files in {source_desc} changed during the build")
    return builder, True


def _build_or_open(
    spec: CorpusSpec,
    config: VaeTextConfig,
    layout: _Layout,
    fingerprint: dict,
    source_dir: str | os.PathLike,
    tfds_dir: str | os.PathLike,
    max_length: int,
    writable: bool = True,
) -> TextDataset:
    """`load` once it holds the build's lock."""

    def make_builder() -> VaeText:
        return VaeText(config=config, data_dir=os.fspath(tfds_dir), file_format="array_record")

    builder, built = _ensure_prepared(
        make_builder,
        fingerprint,
        name=spec.name,
        manual_dir=layout.source_dir,
        source_desc=os.fspath(source_dir),
        writable=writable,
    )
    dataset = _open(builder, spec)
    if not built:  # a build logs its deviations while preparing
        _log_deviations(
            spec, dataset.missing_splits, dataset.vocab_source, dataset.stats, max_length
        )
    return dataset


def check_source_dir(corpus: str, source_dir: str | os.PathLike) -> None:
    """Raises ``FileNotFoundError`` naming the path and the expected files if ``source_dir``
    lacks what ``load`` needs; cheap (no file is read)."""
    _check_sources(get_spec(corpus), source_dir)
