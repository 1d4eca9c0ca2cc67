"""SwitchBoard dialogs (the NeuralDialog-CVAE corpus of Zhao et al. 2017) as a TFDS dataset.

The valid and test splits are the official NeuralDialog-CVAE ``valid.jsonl``/``test.jsonl``
(60 and 62 dialogs). Their 2,316-dialog training split is not available, so **train is a
stand-in**: the ~1,100 conversations of the 1997 Switchboard Dialog Act Corpus (SwDA, 1,155
annotated conversations) that are not among the 56 SwDA conversations of valid/test
(``valid_test_in_swda.tsv``), converted from their ``.utt`` files to the jsonl schema. A check
(:func:`check_no_leak`) refuses a build where a valid/test conversation is in train, by file and
conversation number and by text overlap. Everything that departs from the original corpus is
listed in :attr:`DialogDataset.deviations` (also logged on every load).

Public API
----------
``load(swda_dir, swda_raw_dir, tfds_dir, max_vocab=10000) -> DialogDataset``
    Builds ``vae_swda/swda_vocab<max_vocab>_<fingerprint>`` under ``tfds_dir`` if needed (and
    again if damaged), as ``array_record`` read back with ``tfds.data_source`` (no TensorFlow).
``DialogDataset``
    ``.vocab`` (:class:`vae_jax.data.text.Vocab`), ``.topics``, ``.acts``, ``.splits``
    (``"train"``/``"valid"``/``"test"`` -> ``list[Dialog]``), ``.stats``, ``.fingerprint``,
    ``.deviations``.
``Dialog``
    ``topic``, ``profiles`` (2, 4), ``speakers``, ``utterances`` (word ids without ``<s>``/
    ``</s>``; utterance 0 is ``[<d>]``), ``acts``, ``source``.
``convert_utt(path, speaker_meta)``
    A SwDA ``.utt`` file as a jsonl-schema dict; ``source_dirs(data_root=None)``.

As the official code reads the corpus
-------------------------------------
Utterances are lower-cased and tokenised with ``nltk.WordPunctTokenizer`` (train and
valid/test alike); every dialog starts with the begin-of-dialog utterance ``<d>`` of speaker
A. The vocabulary is ``<pad> <unk> <s> </s>`` (ids 0-3, ``vae_jax.core.tokens``), ``<d>``, then
train words by descending count (ties by first appearance). ``max_vocab`` counts tokens as
the official ``build_vocab`` does, i.e. the ``max_vocab`` most common train tokens *including*
``<s>``, ``</s>`` and ``<d>``: ``len(vocab) == max_vocab + 2`` (10,002 for 10,000, as there).
Profiles are ``[age/100, education/3, male, female]`` for caller A then B. The official code
compares ``sex == "FEMALE"`` on the jsonl's raw strings, which carry quotes and spaces
(``' "FEMALE"'``), so it makes every caller male; here the strings are normalised first (a
deliberate fix). Education 9 (unknown in Switchboard) is kept as 9/3, as there. Topics: train
topics by descending count, then ``<unk_topic>``. Acts: train acts by descending count, then
the other clustered SWBD-DAMSL names; -1 where unknown.

Converting the SwDA ``.utt`` files
----------------------------------
The rules were inferred by aligning the conversion with the jsonl text of the 56 matched
dialogs (which come from a later transcription of the same calls):

* noises and comments (``<laughter>``, ``<<...>>``, ``[[...]]``) are removed;
* disfluency marks are removed and their words kept: ``{F ...}``, ``{D ...}``, ``{E ...}``,
  ``{C ...}``, ``{A ...}``, the repair brackets ``[ reparandum + repair ]`` (both parts kept,
  as in the jsonl), ``#`` (overlap), ``((...))`` (uncertain), ``*``, ``/`` and ``-/`` (slash
  units), ``--`` and a lone ``-``; punctuation ``.,?!;:"()`` is dropped;
* the filled pauses ``uh`` and ``um`` are dropped (the jsonl has none; ``oh``, ``uh-huh``,
  ``um-hum``... stay), and so are word fragments ending in ``-`` (``th-``);
* spelled letters are joined (``T V`` -> ``tv``, ``C D -s`` -> ``cds``) and hyphenated
  numbers split (``twenty-two`` -> ``twenty two``), as the jsonl writes them; lower-cased.

Utterances: one per speaker turn (``A.12``), except that a turn starting with a ``+`` slash
unit (the continuation of the same speaker's interrupted utterance) is appended to that
speaker's previous utterance, the other speaker's turns in between (mostly backchannels)
following it, which is how the jsonl joins interrupted utterances. Utterances left empty by the
cleaning are dropped. An utterance's dialog act is the SWBD-DAMSL tag of its slash units
covering most of its words (a ``+`` unit counting for the unit it continues), clustered into the
42 classes of the coding manual (``sdac/doc/manual.august1.html``, section 1c); it agrees with
the jsonl's act on 73% of the aligned utterances of the matched dialogs (the first unit's tag:
62%); for analysis only. Topic numbers get the jsonl's topic names where a matched dialog shows
them; names of valid/test topics of no matched dialog are inferred by word-profile (tf-idf)
similarity between the train conversations of each unnamed number and the valid/test dialogs of
each unplaced name, accepted only for mutual best matches; any other number is
``TOPIC_<number>``. Caller profiles come from ``speaker_meta.csv``; ages are ``2016 - birth
year``, the convention of the jsonl (its ages exceed the age at the call, from the ``.utt``
``DATE``, by 24-25 years in every matched dialog), not the age at the call. Only
``sdac/sw??utt/*.utt`` is read (the release also holds a stray older copy of conversation 2767
named ``sw09utt/\\x7f``, which is ignored).
"""

import collections
import csv
import dataclasses
import difflib
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from nltk.tokenize import WordPunctTokenizer

from vae_jax.core.tokens import BOS, EOS, SPECIALS, UNK_ID
from vae_jax.data import text
from vae_jax.data.text import Vocab

logger = logging.getLogger(__name__)

# Bump when the meaning of a build changes (cleaning, segmentation, features, vocabulary).
_FORMAT_VERSION = 1
NAME = "swda"  # config.data.name
PROFILE_DIM = 4  # [age/100, education/3, male, female]
JSONL_FOLDER = "swda"
RAW_FOLDER = "swda_raw"
SPLITS = ("train", "valid", "test")
BOD = "<d>"
UNK_TOPIC = "<unk_topic>"
# The jsonl's "age" is this year minus the caller's birth year (checked on all matched dialogs).
JSONL_AGE_YEAR = 2016
OFFICIAL_TRAIN_DIALOGS = 2316
# Word 5-grams shared by a train and a valid/test dialog, over the smaller of the two sets: the
# 56 matched conversations score >= 0.357 against their jsonl dialog, every other pair <= 0.040.
LEAK_NGRAM = 5
LEAK_THRESHOLD = 0.15

_UTT_GLOB = "sdac/sw??utt/*.utt"
_META = "speaker_meta.csv"
_MATCHES = "valid_test_in_swda.tsv"

_tokenizer = WordPunctTokenizer()


def tokenize(utterance: str) -> list[str]:
    """Tokens of an utterance as the official code makes them: lower-cased, WordPunct."""
    return _tokenizer.tokenize(utterance.lower())


def source_dirs(data_root: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """``(<root>/swda, <root>/swda_raw)`` with ``<root>`` = ``data_root`` or
    ``$VAE_JAX_DATA_DIR``."""
    root = data_root if data_root is not None else os.environ.get(text.DATA_DIR_ENV)
    if not root:
        raise ValueError(
            f"config.data.data_dir is empty and ${text.DATA_DIR_ENV} is unset: set one to the "
            f"directory holding {JSONL_FOLDER}/ and {RAW_FOLDER}/"
        )
    return Path(root) / JSONL_FOLDER, Path(root) / RAW_FOLDER


# ----------------------------------------------------------------------------- .utt files


@dataclasses.dataclass(frozen=True)
class SlashUnit:
    """One tagged line of a ``.utt`` file (a slash unit)."""

    tag: str
    speaker: str  # "A" or "B"
    turn: int
    index: int  # utt<index> within the turn
    text: str


@dataclasses.dataclass(frozen=True)
class UttFile:
    """A parsed ``.utt`` file: header fields and slash units."""

    name: str  # e.g. "sw_0001_4325.utt"
    conversation: int
    callers: tuple[int, int]  # caller ids of speaker A and B
    topic: int  # Switchboard topic number (TOPIC#)
    date: str  # yymmdd
    units: tuple[SlashUnit, ...]


_NAME_RE = re.compile(r"^sw_\d{4}_(\d+)\.utt$")
_UNIT_RE = re.compile(r"^(\S+)\s+@*([AB])\.(\d+)\s+utt(\d+):(.*)$")
_SEPARATOR_RE = re.compile(r"^\s*={10,}\s*$", re.M)


def read_utt(path: str | os.PathLike) -> UttFile:
    """Parses a SwDA ``.utt`` file (tolerating the release's header typos)."""
    path = Path(path)
    name_match = _NAME_RE.match(path.name)
    if not name_match:
        raise ValueError(f"{path}: not a SwDA file name (sw_NNNN_<conversation>.utt)")
    data = _decode(path, path.read_bytes()).replace("\r", "")
    separator = _SEPARATOR_RE.search(data)
    if not separator:
        raise ValueError(f"{path}: no '=====' line between the header and the utterances")
    header, body = data[: separator.start()], data[separator.end() :]
    position = header.find("FILENAME")
    ids = re.search(r"(\d+)_(\d+)_(\d+)", header[position:]) if position >= 0 else None
    topic = re.search(r"^\s*TOPIC#:?\s*(\d+)", header, re.M)
    date = re.search(r"^\s*DATE:?\s*(\d{6})\b", header, re.M)
    if not (ids and topic and date):
        raise ValueError(f"{path}: header lacks FILENAME <conv>_<caller>_<caller>, TOPIC# or DATE")
    conversation = int(name_match.group(1))
    if int(ids.group(1)) != conversation:
        raise ValueError(f"{path}: FILENAME {ids.group(0)} is not conversation {conversation}")
    units = []
    for line in body.split("\n"):
        m = _UNIT_RE.match(line)
        if m:
            tag, speaker, turn, index, utterance = m.groups()
            units.append(SlashUnit(tag, speaker, int(turn), int(index), utterance.strip()))
    if not units:
        raise ValueError(f"{path}: no utterance lines")
    return UttFile(
        name=path.name,
        conversation=conversation,
        callers=(int(ids.group(2)), int(ids.group(3))),
        topic=int(topic.group(1)),
        date=date.group(1),
        units=tuple(units),
    )


_FILLERS = frozenset({"uh", "um"})
_NUMBER_WORDS = frozenset(
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"
    " sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety"
    " hundred thousand".split()
)
_LETTER_RE = re.compile(r"[A-Z]")


def clean_text(utterance: str) -> str:
    """A SwDA utterance's words as the jsonl writes them (see the module docstring)."""
    t = re.sub(r"<<[^>]*>>|<[^<>]*>|\[\[[^\]]*\]\]", " ", utterance)
    t = re.sub(r"\{[FDECA]\b", " ", t)
    t = re.sub(r"[{}\[\]+#*.,?!;:\"()]", " ", t)
    t = re.sub(r"(?<!\S)-+/?(?!\S)", " ", t).replace("/", " ")
    tokens = t.split()
    words: list[str] = []
    k = 0
    while k < len(tokens):
        token = tokens[k]
        if _LETTER_RE.fullmatch(token):
            end = k
            while end < len(tokens) and _LETTER_RE.fullmatch(tokens[end]):
                end += 1
            letters = tokens[k:end]
            if len(letters) >= 2 and set(letters) != {"I"}:  # "I I" is a repeated pronoun
                word = "".join(letters)
                if end < len(tokens) and tokens[end] in ("-s", "'s"):
                    word += tokens[end].lstrip("-")
                    end += 1
                words.append(word.lower())
                k = end
                continue
        k += 1
        word = token.lower()
        if word.endswith("-") or word == "-s" or word in _FILLERS:
            continue
        parts = word.split("-")
        if len(parts) > 1 and all(p in _NUMBER_WORDS for p in parts):
            words.extend(parts)
        else:
            words.append(word)
    return " ".join(words)


# The 42 clustered SWBD-DAMSL classes (manual section 1c), named as the jsonl names them
# (lower case, spaces as "_"); "%" is both "Abandoned or Turn-Exit" and "Uninterpretable".
ACT_NAMES: dict[str, str] = {
    "sd": "statement-non-opinion",
    "b": "acknowledge_(backchannel)",
    "sv": "statement-opinion",
    "aa": "agree/accept",
    "%": "abandoned_or_turn-exit/uninterpretable",
    "ba": "appreciation",
    "qy": "yes-no-question",
    "x": "non-verbal",
    "ny": "yes_answers",
    "fc": "conventional-closing",
    "qw": "wh-question",
    "nn": "no_answers",
    "bk": "response_acknowledgement",
    "h": "hedge",
    "qy^d": "declarative_yes-no-question",
    "o": "other",
    "bh": "backchannel_in_question_form",
    "^q": "quotation",
    "bf": "summarize/reformulate",
    "na": "affirmative_non-yes_answers",
    "ad": "action-directive",
    "^2": "collaborative_completion",
    "b^m": "repeat-phrase",
    "qo": "open-question",
    "qh": "rhetorical-questions",
    "^h": "hold_before_answer/agreement",
    "ar": "reject",
    "ng": "negative_non-no_answers",
    "br": "signal-non-understanding",
    "no": "other_answers",
    "fp": "conventional-opening",
    "qrr": "or-clause",
    "arp": "dispreferred_answers",
    "t3": "3rd-party-talk",
    "oo": "offers,_options_commits",
    "t1": "self-talk",
    "bd": "downplayer",
    "aap": "maybe/accept-part",
    "^g": "tag-question",
    "qw^d": "declarative_wh-question",
    "fa": "apology",
    "ft": "thanking",
}
# Rare tags the manual groups with another on the same line.
_ACT_GROUPS = {
    "qr": "qy",
    "fe": "ba",
    "co": "oo",
    "cc": "oo",
    "fx": "sv",
    "fo": "o",
    "fw": "o",
    '"': "o",
    "by": "o",
    "bc": "o",
    "am": "aap",
    "nd": "arp",
}


def act_name(tag: str) -> str | None:
    """The clustered class name of a SWBD-DAMSL tag, ``None`` for ``+`` (a continuation, whose
    act is the continued utterance's) and unknown tags.

    As the manual clusters them: secondary ``^`` dimensions are dropped except ``qy^d``,
    ``qw^d`` and ``b^m``; ``nn^e`` is ``ng`` and ``ny^e`` is ``na``; a tag of dimensions only
    (``^q``, ``^2``, ``^h``, ``^g``) is that class; ``@`` (bad segmentation), ``*`` (comment)
    and parentheses are ignored, and of several labels (``sd,o``) the first counts.
    """
    t = re.sub(r"[@*()\s]", "", tag)
    t = re.split(r"[,;]", t)[0]
    if not t or t.startswith("+"):
        return None
    base, *dims = t.split("^")
    if not base:
        key = f"^{dims[0]}"
    elif base == "nn" and "e" in dims:
        key = "ng"
    elif base == "ny" and "e" in dims:
        key = "na"
    elif (base in ("qy", "qw") and "d" in dims) or (base == "b" and "m" in dims):
        key = f"{base}^{'d' if base != 'b' else 'm'}"
    else:
        key = base
    return ACT_NAMES.get(_ACT_GROUPS.get(key, key))


def segment(units: Sequence[SlashUnit]) -> list[tuple[str, list[SlashUnit]]]:
    """Groups slash units into utterances ``(speaker, units)``: one per turn, a turn starting
    with a ``+`` continuation appended to its speaker's previous utterance."""
    utterances: list[tuple[str, list[SlashUnit]]] = []
    current: tuple[str, list[SlashUnit]] | None = None
    turn_key = None
    for unit in units:
        key = (unit.speaker, unit.turn)
        if key != turn_key:
            turn_key, current = key, None
            if unit.tag.startswith("+"):
                current = next((u for u in reversed(utterances) if u[0] == unit.speaker), None)
            if current is None:
                current = (unit.speaker, [])
                utterances.append(current)
        current[1].append(unit)
    return utterances


def read_speaker_meta(path: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """``speaker_meta.csv`` by caller id: ``sex``, ``birth_year``, ``dialect_area``,
    ``education`` (as integers where they are)."""
    meta = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            meta[int(row["speaker_id"])] = {
                "sex": row["sex"].strip(),
                "birth_year": int(row["birth_year"]),
                "dialect_area": row["dialect_area"].strip(),
                "education": int(row["education"]),
            }
    return meta


def _caller_profile(caller: int, meta: Mapping[int, Mapping[str, Any]], year: int) -> dict:
    m = meta.get(caller)
    if m is None:
        fields = ("sex", "age", "age_at_call", "education", "dialect")
        return {"caller": caller, **dict.fromkeys(fields, None)}
    return {
        "caller": caller,
        "sex": m["sex"],
        "age": JSONL_AGE_YEAR - m["birth_year"],
        "age_at_call": year - m["birth_year"],
        "education": m["education"],
        "dialect": m["dialect_area"],
    }


def _main_act(act_words: Mapping[str | None, int]) -> str | None:
    """The act covering most words (ties: the first); known acts beat ``None``."""
    known = {a: n for a, n in act_words.items() if a is not None}
    return max(known, key=known.__getitem__) if known else None


def _convert(utt: UttFile, speaker_meta: Mapping[int, Mapping[str, Any]], topic: str) -> dict:
    year = 1900 + int(utt.date[:2])
    utts = []
    for speaker, units in segment(utt.units):
        words: list[str] = []
        act_words: collections.Counter[str | None] = collections.Counter()
        act = None
        for unit in units:
            # A "+" unit continues the act of the unit before it.
            act = act if unit.tag.startswith("+") else act_name(unit.tag)
            cleaned = clean_text(unit.text)
            if cleaned:
                words.append(cleaned)
                act_words[act] += len(cleaned.split())
        if words:
            utts.append([speaker, " ".join(words), [_main_act(act_words), None]])
    return {
        "A": _caller_profile(utt.callers[0], speaker_meta, year),
        "B": _caller_profile(utt.callers[1], speaker_meta, year),
        "topic": topic,
        "topic_number": utt.topic,
        "prompt": "",
        "utts": utts,
        "file": utt.name,
        "conversation": utt.conversation,
        "date": utt.date,
    }


def convert_utt(
    path: str | os.PathLike,
    speaker_meta: Mapping[int, Mapping[str, Any]],
    topic_names: Mapping[int, str] | None = None,
) -> dict:
    """A SwDA ``.utt`` file as a jsonl-schema dialog.

    Keys as in ``swda/*.jsonl`` (``A``, ``B``, ``topic``, ``prompt``, ``utts``: ``[speaker,
    text, [act or None, None]]``; no sentiment, which the release lacks), profile strings
    without the jsonl's quotes, and ``topic_number``, ``file``, ``conversation``, ``date``.
    A caller absent from ``speaker_meta`` has ``None`` fields. ``topic`` is
    ``topic_names[number]`` or ``"TOPIC_<number>"``.
    """
    utt = read_utt(path)
    topic = (topic_names or {}).get(utt.topic, f"TOPIC_{utt.topic}")
    return _convert(utt, speaker_meta, topic)


def utt_paths(swda_raw_dir: str | os.PathLike) -> list[Path]:
    """The release's ``.utt`` files, sorted by path."""
    return sorted(Path(swda_raw_dir).glob(_UTT_GLOB))


def word_match_rate(reference: Sequence[str], hypothesis: Sequence[str]) -> float:
    """Share of ``reference`` words that ``hypothesis`` reproduces in order (longest common
    subsequence by ``difflib``, over ``len(reference)``)."""
    if not reference:
        return 1.0
    matcher = difflib.SequenceMatcher(None, list(reference), list(hypothesis), autojunk=False)
    return sum(b.size for b in matcher.get_matching_blocks()) / len(reference)


# ----------------------------------------------------------------------------- checks


class LeakError(ValueError):
    """A valid/test conversation is in the training split."""


def _conversation_of(file_name: str) -> int | None:
    m = _NAME_RE.match(file_name)
    return int(m.group(1)) if m else None


def _ngrams(dialog: Mapping[str, Any], n: int) -> set[tuple[str, ...]]:
    words = [w for u in dialog["utts"] for w in tokenize(u[1])]
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def check_no_leak(
    train: Sequence[Mapping[str, Any]],
    heldout: Mapping[str, Sequence[Mapping[str, Any]]],
    heldout_files: Collection[str],
    threshold: float = LEAK_THRESHOLD,
) -> dict[str, float]:
    """Raises :class:`LeakError` if a train dialog is a valid/test conversation.

    By file: a train dialog whose ``file`` is in ``heldout_files`` or of the same conversation
    number. By text: a train dialog sharing at least ``threshold`` of its word 5-grams (of the
    smaller set) with a ``heldout[split]`` dialog. Returns the highest overlap per held-out
    split (for the record).
    """
    files = set(heldout_files)
    conversations = {c for c in map(_conversation_of, files) if c is not None}
    for d in train:
        name = d.get("file", "")
        if name in files or _conversation_of(name) in conversations:
            raise LeakError(f"train dialog {name} is a valid/test conversation (by file)")
    index: dict[tuple[str, ...], list[int]] = collections.defaultdict(list)
    held: list[tuple[str, int, int]] = []
    for split, dialogs in heldout.items():
        for i, d in enumerate(dialogs):
            grams = _ngrams(d, LEAK_NGRAM)
            for g in grams:
                index[g].append(len(held))
            held.append((split, i, len(grams)))
    highest = {split: 0.0 for split in heldout}
    for t, d in enumerate(train):
        grams = _ngrams(d, LEAK_NGRAM)
        hits: collections.Counter[int] = collections.Counter()
        for g in grams:
            hits.update(index.get(g, ()))
        for h, count in hits.items():
            split, i, size = held[h]
            overlap = count / max(1, min(len(grams), size))
            if overlap >= threshold:
                raise LeakError(
                    f"train dialog {d.get('file', t)} shares {overlap:.0%} of its word"
                    f" {LEAK_NGRAM}-grams with {split} dialog {i} (threshold {threshold:.0%}):"
                    " a valid/test conversation is in train"
                )
            highest[split] = max(highest[split], overlap)
    return highest


# ----------------------------------------------------------------------------- topics


def _norm(value: Any) -> str:
    """A jsonl profile/topic string without its stray quotes and spaces."""
    return str(value).strip().strip('"').strip()


@dataclasses.dataclass(frozen=True)
class TopicNames:
    """Topic number -> name: from matched dialogs, inferred by content, or neither."""

    names: dict[int, str]
    matched: tuple[int, ...]
    inferred: tuple[int, ...]
    unnamed: tuple[int, ...]

    def name(self, number: int) -> str:
        return self.names.get(number, f"TOPIC_{number}")


def _tfidf(docs: Mapping[Any, collections.Counter]) -> dict[Any, dict[str, float]]:
    df: collections.Counter[str] = collections.Counter()
    for counts in docs.values():
        df.update(counts.keys())
    n = len(docs)
    vectors = {}
    for key, counts in docs.items():
        v = {w: (1 + math.log(c)) * math.log(n / df[w]) for w, c in counts.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        vectors[key] = {w: x / norm for w, x in v.items() if x}
    return vectors


def infer_topic_names(
    converted: Sequence[Mapping[str, Any]],
    heldout: Mapping[str, Sequence[Mapping[str, Any]]],
    matches: Mapping[tuple[str, int], str],
    min_ratio: float = 1.05,
) -> TopicNames:
    """Names the topic numbers of ``converted`` (jsonl-schema dicts with ``topic_number`` and
    ``file``) from the held-out jsonl dialogs.

    A number gets the name of the matched held-out dialogs of its conversations (the most
    common one if they disagree). Names of held-out dialogs left unplaced are matched to the
    numbers left unnamed by tf-idf cosine similarity of their words: a pair is accepted when
    each is the other's best match and the best beats the name's second best by ``min_ratio``.
    """
    number_of = {d["file"]: d["topic_number"] for d in converted}
    votes: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for (split, line), file in matches.items():
        votes[number_of[file]][_norm(heldout[split][line]["topic"])] += 1
    names = {number: c.most_common(1)[0][0] for number, c in votes.items()}
    matched = tuple(sorted(names))
    placed = set(names.values())
    number_docs: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for d in converted:
        if d["topic_number"] not in names:
            for u in d["utts"]:
                number_docs[d["topic_number"]].update(tokenize(u[1]))
    name_docs: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for dialogs in heldout.values():
        for d in dialogs:
            name = _norm(d["topic"])
            if name not in placed:
                for u in d["utts"]:
                    name_docs[name].update(tokenize(u[1]))
    inferred = []
    if number_docs and name_docs:
        vectors = _tfidf(
            {
                **{("n", k): v for k, v in number_docs.items()},
                **{("t", k): v for k, v in name_docs.items()},
            }
        )
        numbers, topic_names = sorted(number_docs), sorted(name_docs)
        sim = np.array(
            [
                [
                    sum(x * vectors[("n", b)].get(w, 0.0) for w, x in vectors[("t", a)].items())
                    for b in numbers
                ]
                for a in topic_names
            ]
        )
        for i, name in enumerate(topic_names):
            j = int(np.argmax(sim[i]))
            ranked = np.sort(sim[i])[::-1]
            second = ranked[1] if len(ranked) > 1 else 0.0
            if int(np.argmax(sim[:, j])) == i and ranked[0] > 0 and ranked[0] >= min_ratio * second:
                names[numbers[j]] = name
                inferred.append(numbers[j])
    all_numbers = {d["topic_number"] for d in converted}
    unnamed = tuple(sorted(all_numbers - set(names)))
    return TopicNames(names, matched, tuple(sorted(inferred)), unnamed)


# ----------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class _Sources:
    swda_dir: Path
    raw_dir: Path
    jsonl: dict[str, Path]
    meta: Path
    matches: Path
    utts: tuple[Path, ...]

    def describe(self) -> str:
        return f"{self.swda_dir} and {self.raw_dir}"


def check_source_dirs(swda_dir: str | os.PathLike, raw_dir: str | os.PathLike) -> None:
    """Raises ``FileNotFoundError`` naming the first missing source file or folder."""
    _check_sources(swda_dir, raw_dir)


def _check_sources(swda_dir: str | os.PathLike, raw_dir: str | os.PathLike) -> _Sources:
    """Finds every source file; raises ``FileNotFoundError`` naming what is missing."""
    swda_dir, raw_dir = Path(swda_dir), Path(raw_dir)
    for directory, wants in (
        (swda_dir, "valid.jsonl, test.jsonl"),
        (raw_dir, f"{_UTT_GLOB}, {_META}, {_MATCHES}"),
    ):
        if not directory.is_dir():
            raise FileNotFoundError(
                f"swda: source directory {directory} does not exist (or is not a directory);"
                f" expected it to contain: {wants}"
            )
    jsonl = {split: swda_dir / f"{split}.jsonl" for split in ("valid", "test")}
    for path in (*jsonl.values(), raw_dir / _META, raw_dir / _MATCHES):
        if not path.is_file():
            raise FileNotFoundError(f"swda: missing source file {path}")
    utts = tuple(utt_paths(raw_dir))
    if not utts:
        raise FileNotFoundError(f"swda: no SwDA conversations ({raw_dir / _UTT_GLOB}) found")
    return _Sources(swda_dir, raw_dir, jsonl, raw_dir / _META, raw_dir / _MATCHES, utts)


def _digest_files(sources: _Sources, data: Mapping[Path, bytes] | None = None) -> dict:
    def digest(p: Path) -> str:
        return text._digest(data[p] if data is not None else p.read_bytes())

    utts = hashlib.sha256()
    for p in sources.utts:
        utts.update(f"{p.relative_to(sources.raw_dir).as_posix()} {digest(p)}\n".encode())
    return {
        f"{JSONL_FOLDER}/valid.jsonl": digest(sources.jsonl["valid"]),
        f"{JSONL_FOLDER}/test.jsonl": digest(sources.jsonl["test"]),
        f"{RAW_FOLDER}/{_META}": digest(sources.meta),
        f"{RAW_FOLDER}/{_MATCHES}": digest(sources.matches),
        f"{RAW_FOLDER}/{_UTT_GLOB}": f"{len(sources.utts)} files, {utts.hexdigest()}",
    }


def _fingerprint(max_vocab: int, digests: Mapping[str, str]) -> dict:
    return json.loads(
        json.dumps(
            {"format_version": _FORMAT_VERSION, "max_vocab": max_vocab, "files": dict(digests)}
        )
    )


def _decode(path: Path, data: bytes) -> str:
    """``data`` as UTF-8; a bad byte is a `ValueError` naming the file, line and byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(
            f"{path}: line {line}: byte {data[e.start : e.start + 1]!r} at offset {e.start} is "
            f"not UTF-8 ({e.reason})"
        ) from None


def _is_utt(u: Any) -> bool:
    """``[speaker, text, [act, …]]``, as the NeuralDialog-CVAE jsonl holds an utterance."""
    return (
        isinstance(u, list)
        and len(u) >= 3
        and isinstance(u[0], str)
        and isinstance(u[1], str)
        and isinstance(u[2], list)
        and len(u[2]) >= 1
        and (u[2][0] is None or isinstance(u[2][0], str))
    )


def _read_jsonl(path: Path, data: bytes) -> list[dict]:
    dialogs = []
    for lineno, line in enumerate(_decode(path, data).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            for key in ("A", "B", "topic", "utts"):
                d[key]  # noqa: B018  (presence check)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: line {lineno} is not a jsonl dialog ({e})") from None
        if not isinstance(d["utts"], list):
            raise ValueError(f"{path}: line {lineno}: utts is not a list")
        for i, u in enumerate(d["utts"]):
            if not _is_utt(u):
                raise ValueError(
                    f"{path}: line {lineno}: utts[{i}]={u!r:.80} is not [speaker, text, [act, …]]"
                )
        dialogs.append(d)
    if not dialogs:
        raise ValueError(f"{path}: no dialogs")
    return dialogs


def _read_matches(path: Path, heldout: Mapping[str, Sequence[dict]]) -> dict[tuple[str, int], str]:
    matches = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            split, line, file = row["split"], int(row["line_index"]), row["swda_utt_file"].strip()
            if split not in heldout or not 0 <= line < len(heldout[split]):
                raise ValueError(f"{path}: no {split} dialog {line}")
            if file != "-":
                matches[(split, line)] = file
    return matches


# ----------------------------------------------------------------------------- records


def _profile(caller: Mapping[str, Any]) -> list[float]:
    age, education, sex = caller.get("age"), caller.get("education"), caller.get("sex")
    if age is None or education is None or sex is None:
        return [0.0, 0.0, 0.0, 0.0]
    female = _norm(sex) == "FEMALE"
    return [float(age) / 100.0, float(_norm(education)) / 3.0, float(not female), float(female)]


def _by_count(items: Sequence[str]) -> list[str]:
    """Distinct items by descending count, ties by first appearance."""
    counts = collections.Counter(items)
    return sorted(counts, key=lambda k: -counts[k])


def _build_vocab(train_tokens: Sequence[Sequence[Sequence[str]]], max_vocab: int) -> Vocab:
    counts: collections.Counter[str] = collections.Counter()
    for dialog in train_tokens:
        counts[BOS] += len(dialog) + 1
        counts[EOS] += len(dialog) + 1
        counts[BOD] += 1
        for utterance in dialog:
            counts.update(utterance)
    reserved = {*SPECIALS, BOD}
    words = [w for w in sorted(counts, key=lambda w: -counts[w]) if w not in reserved]
    return Vocab((*SPECIALS, BOD, *words[: max_vocab - 3]))


@dataclasses.dataclass
class _Prepared:
    records: dict[str, list[dict[str, Any]]]
    metadata: dict[str, Any]


def _prepare(sources: _Sources, max_vocab: int) -> _Prepared:
    """Reads, converts, checks and numbers everything a build needs (plain Python)."""
    data = {p: p.read_bytes() for p in (*sources.jsonl.values(), sources.meta, sources.matches)}
    data.update({p: p.read_bytes() for p in sources.utts})
    heldout = {s: _read_jsonl(p, data[p]) for s, p in sources.jsonl.items()}
    matches = _read_matches(sources.matches, heldout)
    meta = read_speaker_meta(sources.meta)
    converted = [_convert(read_utt(p), meta, "") for p in sources.utts]
    by_file = {d["file"]: d for d in converted}
    unknown = sorted(set(matches.values()) - set(by_file))
    if unknown:
        raise ValueError(f"{sources.matches}: files {unknown} are not in {sources.raw_dir}")

    topics = infer_topic_names(converted, heldout, matches)
    for d in converted:
        d["topic"] = topics.name(d["topic_number"])
    heldout_files = set(matches.values())
    held_numbers = {by_file[f]["conversation"] for f in heldout_files}
    train = [
        d
        for d in converted
        if d["file"] not in heldout_files and d["conversation"] not in held_numbers
    ]
    overlap = check_no_leak(train, heldout, heldout_files)

    dialogs: dict[str, list[tuple[str, Mapping[str, Any]]]] = {
        "train": [(f"swda:{d['file']}", d) for d in train],
        **{s: [(f"jsonl:{s}:{i}", d) for i, d in enumerate(ds)] for s, ds in heldout.items()},
    }
    tokens = {s: [[tokenize(u[1]) for u in d["utts"]] for _, d in ds] for s, ds in dialogs.items()}
    vocab = _build_vocab(tokens["train"], max_vocab)
    topic_list = (*_by_count([_norm(d["topic"]) for _, d in dialogs["train"]]), UNK_TOPIC)
    train_acts = [u[2][0] for _, d in dialogs["train"] for u in d["utts"] if u[2][0]]
    act_list = _by_count(train_acts)
    act_list += [a for a in ACT_NAMES.values() if a not in act_list]
    held_acts = [u[2][0] for s in heldout for _, d in dialogs[s] for u in d["utts"] if u[2][0]]
    act_list += [a for a in dict.fromkeys(held_acts) if a not in act_list]
    topic_id = {t: i for i, t in enumerate(topic_list)}
    act_id = {a: i for i, a in enumerate(act_list)}
    bod_id = vocab.word_to_id[BOD]

    records: dict[str, list[dict[str, Any]]] = {}
    stats: dict[str, dict[str, int]] = {}
    for split, ds in dialogs.items():
        records[split] = []
        n_utts = n_words = n_unks = 0
        for index, ((_, d), utt_tokens) in enumerate(zip(ds, tokens[split], strict=True)):
            ids = [vocab.encode(t) for t in utt_tokens]
            words = np.concatenate([np.array([bod_id], np.int32), *ids]) if ids else None
            n_utts += len(ids)
            n_words += sum(len(i) for i in ids)
            n_unks += sum(int(np.count_nonzero(i == UNK_ID)) for i in ids)
            speakers = [0] + [int(u[0] == "B") for u in d["utts"]]
            acts = [-1] + [act_id.get(u[2][0], -1) if u[2][0] else -1 for u in d["utts"]]
            records[split].append(
                {
                    "index": index,
                    "topic": topic_id.get(_norm(d["topic"]), topic_id[UNK_TOPIC]),
                    "profiles": np.array([_profile(d["A"]), _profile(d["B"])], np.float32),
                    "speakers": np.array(speakers, np.int32),
                    "acts": np.array(acts, np.int32),
                    "lengths": np.array([1] + [len(i) for i in ids], np.int32),
                    "words": words if words is not None else np.array([bod_id], np.int32),
                }
            )
        stats[split] = {"dialogs": len(ds), "utterances": n_utts, "words": n_words, "unks": n_unks}

    deviations = _deviations(converted, train, heldout, matches, by_file, topics, stats, overlap)
    metadata = {
        "vocab": list(vocab.words),
        "topics": list(topic_list),
        "acts": act_list,
        "stats": stats,
        "sources": {s: [src for src, _ in ds] for s, ds in dialogs.items()},
        "topic_names": {str(k): v for k, v in sorted(topics.names.items())},
        "deviations": deviations,
        "fingerprint": _fingerprint(max_vocab, _digest_files(sources, data)),
    }
    return _Prepared(records, metadata)


def _deviations(
    converted: Sequence[dict],
    train: Sequence[dict],
    heldout: Mapping[str, Sequence[dict]],
    matches: Mapping[tuple[str, int], str],
    by_file: Mapping[str, dict],
    topics: TopicNames,
    stats: Mapping[str, Mapping[str, int]],
    overlap: Mapping[str, float],
) -> list[str]:
    n_held = sum(len(ds) for ds in heldout.values())
    held_topics = {_norm(d["topic"]) for ds in heldout.values() for d in ds}
    train_topics = {d["topic"] for d in train}
    train_seen = sum(d["topic"] in held_topics for d in train)
    held_seen = sum(_norm(d["topic"]) in train_topics for ds in heldout.values() for d in ds)
    n_train_utts = sum(len(d["utts"]) for d in train)
    labelled = sum(u[2][0] is not None for d in train for u in d["utts"])
    missing = sorted(
        {(d["file"], d[s]["caller"]) for d in train for s in "AB" if d[s]["sex"] is None}
    )
    profile_diff = 0
    for (split, line), file in matches.items():
        j, c = heldout[split][line], by_file[file]
        for side in "AB":
            ours = (c[side]["sex"], c[side]["age"], c[side]["education"], c[side]["dialect"])
            theirs = (_norm(j[side]["sex"]), j[side]["age"], int(_norm(j[side]["education"])),
                      _norm(j[side]["dialect"]))  # fmt: skip
            if ours != theirs:
                profile_diff += 1
                break
    inferred = ", ".join(f"{n}={topics.names[n]}" for n in topics.inferred)
    out = [
        f"train is a stand-in: {len(train)} SwDA conversations (1997 release, {len(converted)}"
        f" conversations, less the {len(set(matches.values()))} in valid/test) instead of the"
        f" original {OFFICIAL_TRAIN_DIALOGS:,}-dialog NeuralDialog-CVAE training split, which is"
        " not available",
        f"train text is cleaned from the SwDA transcripts, valid/test keep the jsonl's later"
        " transcription: spellings ('uh-huh' vs 'um-hum'), contractions and utterance boundaries"
        f" differ somewhat ({stats['train']['words'] / max(1, stats['train']['utterances']):.1f}"
        " words/utterance in train, "
        f"{stats['valid']['words'] / max(1, stats['valid']['utterances']):.1f} in valid)",
        f"topics: {len(topics.matched)} SwDA topic numbers named from matched valid/test dialogs,"
        f" {len(topics.inferred)} inferred by content similarity ({inferred}),"
        f" {len(topics.unnamed)} unnamed (TOPIC_<number>: {list(topics.unnamed)});"
        f" {train_seen}/{len(train)} train dialogs have a topic seen in valid/test,"
        f" {held_seen}/{n_held} valid/test dialogs one seen in train",
        f"train dialog acts are SWBD-DAMSL tags clustered to the 42 classes (valid/test: the"
        f" jsonl's); {labelled}/{n_train_utts} train utterances labelled, the rest -1",
        "profiles: sex compared after stripping the jsonl's quotes and spaces (the official code"
        " compares the raw strings and so makes every caller male): a deliberate fix",
        f"train ages are {JSONL_AGE_YEAR} - birth year, the jsonl's convention (not the age at"
        " the call)",
        f"{profile_diff} of {len(matches)} matched conversations have other caller profiles in"
        " the jsonl than in speaker_meta.csv (A and B swapped, or another caller)",
        "train has no sentiment scores (the release has none)",
        f"leak check: no valid/test conversation in train (highest word 5-gram overlap of a"
        f" train dialog: {', '.join(f'{s} {v:.1%}' for s, v in overlap.items())})",
    ]
    if missing:
        out.append(f"callers absent from speaker_meta.csv, profile rows of zeros: {missing}")
    return out


# ----------------------------------------------------------------------------- TFDS builder


@dataclasses.dataclass(eq=False)
class VaeSwdaConfig(tfds.core.BuilderConfig):
    """``max_vocab`` and the source directories (the latter not part of the name)."""

    max_vocab: int = 10000
    swda_dir: str = ""
    raw_dir: str = ""


def _array(shape: tuple[int | None, ...], dtype: type) -> tfds.features.Tensor:
    # Raw bytes: decodes to one ndarray without TensorFlow.
    return tfds.features.Tensor(shape=shape, dtype=dtype, encoding=tfds.features.Encoding.BYTES)


class VaeSwda(tfds.core.GeneratorBasedBuilder):
    """SwitchBoard dialogs: stand-in train from SwDA, valid/test from NeuralDialog-CVAE."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Use vae_jax.dialog.swda.load()."
    BUILDER_CONFIGS = [VaeSwdaConfig(name="swda_vocab10000")]

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict(
            {
                "index": np.int64,
                "topic": np.int32,
                "profiles": _array((2, 4), np.float32),
                "speakers": _array((None,), np.int32),
                "acts": _array((None,), np.int32),
                "lengths": _array((None,), np.int32),  # utterance lengths, in order
                "words": _array((None,), np.int32),  # every utterance's ids, concatenated
            }
        )
        return text._LocalDatasetInfo(
            builder=self,
            description=self.builder_config.description,
            features=features,
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        config = self.builder_config
        prepared = _prepare(_check_sources(config.swda_dir, config.raw_dir), config.max_vocab)
        self.info.metadata.update(prepared.metadata)
        return {s: self._generate_examples(r) for s, r in prepared.records.items()}

    def _generate_examples(
        self, records: list[dict[str, Any]]
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        yield from enumerate(records)


# ----------------------------------------------------------------------------- loading


@dataclasses.dataclass(frozen=True, eq=False)
class Dialog:
    """One dialog; utterance 0 is the begin-of-dialog utterance ``[<d>]`` of speaker A.

    The arrays are read-only views of the stored bytes; copy one before writing into it.
    """

    topic: int  # id in DialogDataset.topics (unknown topic -> id of "<unk_topic>")
    profiles: np.ndarray  # float32 (2, 4): caller A, caller B: [age/100, edu/3, male, female]
    speakers: np.ndarray  # int32 (U,): 0 = A, 1 = B
    utterances: tuple[np.ndarray, ...]  # U int32 arrays of word ids without <s>/</s>
    acts: np.ndarray  # int32 (U,): id in DialogDataset.acts, -1 where unknown
    source: str  # "swda:<file>.utt" or "jsonl:<split>:<line>"


@dataclasses.dataclass(frozen=True)
class DialogStats:
    """Counts of a split; utterances and words exclude the begin-of-dialog utterance."""

    dialogs: int
    utterances: int
    words: int
    unks: int

    @property
    def oov_rate(self) -> float:
        return self.unks / max(1, self.words)


@dataclasses.dataclass(frozen=True)
class DialogDataset:
    """The built corpus: vocabularies, dialogs by split, statistics and deviations."""

    vocab: Vocab
    topics: tuple[str, ...]
    acts: tuple[str, ...]
    splits: dict[str, list[Dialog]]
    stats: dict[str, DialogStats]
    fingerprint: str
    deviations: list[str]
    max_vocab: int
    data_dir: Path


def _dialog(record: Mapping[str, Any], source: str) -> Dialog:
    ends = np.cumsum(record["lengths"])[:-1]
    return Dialog(
        topic=int(record["topic"]),
        profiles=np.asarray(record["profiles"], np.float32).reshape(2, 4),
        speakers=np.asarray(record["speakers"], np.int32),
        utterances=tuple(np.split(np.asarray(record["words"], np.int32), ends)),
        acts=np.asarray(record["acts"], np.int32),
        source=source,
    )


def _open(builder: VaeSwda) -> DialogDataset:
    meta = builder.info.metadata
    sources = builder.as_data_source()
    splits = {}
    for split in SPLITS:
        records = sources[split].__getitems__(list(range(len(sources[split]))))
        names = meta["sources"][split]
        splits[split] = [_dialog(r, names[int(r["index"])]) for r in records]
    return DialogDataset(
        vocab=Vocab(meta["vocab"]),
        topics=tuple(meta["topics"]),
        acts=tuple(meta["acts"]),
        splits=splits,
        stats={s: DialogStats(**st) for s, st in meta["stats"].items()},
        fingerprint=text.fingerprint_id(meta["fingerprint"]),
        deviations=list(meta["deviations"]),
        max_vocab=builder.builder_config.max_vocab,
        data_dir=Path(builder.data_dir),
    )


def load(
    swda_dir: str | os.PathLike,
    swda_raw_dir: str | os.PathLike,
    tfds_dir: str | os.PathLike,
    max_vocab: int = 10000,
) -> DialogDataset:
    """Builds (if needed) and opens the SwitchBoard dialogs into ``tfds_dir``.

    ``swda_dir`` holds ``valid.jsonl``/``test.jsonl``, ``swda_raw_dir`` the SwDA release
    (``sdac/sw??utt/*.utt``, ``speaker_meta.csv``, ``valid_test_in_swda.tsv``); both are only
    read. Raises ``FileNotFoundError`` naming a missing source (before any work),
    ``ValueError`` for a malformed one or ``max_vocab < 4``, :class:`LeakError` if a
    valid/test conversation would be in train.
    """
    if int(max_vocab) != max_vocab or max_vocab < 4:
        raise ValueError(f"max_vocab must be an integer >= 4, got {max_vocab!r}")
    max_vocab = int(max_vocab)
    sources = _check_sources(swda_dir, swda_raw_dir)
    fingerprint = _fingerprint(max_vocab, _digest_files(sources))
    fp_id = text.fingerprint_id(fingerprint)
    config = VaeSwdaConfig(
        name=f"swda_vocab{max_vocab}_{fp_id[:12]}",
        description=(
            "SwitchBoard dialogs: stand-in train from SwDA, valid/test from NeuralDialog-CVAE,"
            f" {max_vocab}-token vocabulary"
        ),
        max_vocab=max_vocab,
        swda_dir=os.fspath(sources.swda_dir),
        raw_dir=os.fspath(sources.raw_dir),
    )

    def make_builder() -> VaeSwda:
        return VaeSwda(config=config, data_dir=os.fspath(tfds_dir), file_format="array_record")

    with text._build_lock(tfds_dir, config.name) as writable:
        builder, _ = text._ensure_prepared(
            make_builder,
            fingerprint,
            name="swda",
            manual_dir=sources.raw_dir,
            source_desc=sources.describe(),
            count_key="dialogs",
            writable=writable,
        )
        dataset = _open(builder)
    logger.warning(
        "swda: deviations from the original corpus:\n  %s", "\n  ".join(dataset.deviations)
    )
    return dataset
