"""Response-generation metrics of Zhao et al. (2017, NeuralDialog-CVAE), as Fu et al. (2019,
cyclical annealing, Table 2) report them for sampled dialog responses.

Each test context c has R_c human references and H_c sampled responses (tokens lists, special
tokens already removed). For a pairwise score s(hyp, ref) the context gives an H_c × R_c matrix
S, and

    precision_c = mean_h max_r S[h, r]     (how good the average sample is)
    recall_c    = mean_r max_h S[h, r]     (how many references some sample covers)

precision and recall are averaged over contexts, and F1 = 2PR / (P + R + 1e-11).

Pairwise scores:

- BLEU-n (`bleu_scores`), n = 1..4: NLTK's `sentence_bleu` of the one reference, smoothing
  method 7 (Chen & Cherry 2014), weights (1,0,0,0), (1/2,1/2,0,0), (1/3,1/3,1/3,0),
  (1/4,1/4,1/4,1/4), all of length 4 as in the official code (the length changes method 7's
  smoothing). Method 7 interpolates neighbouring orders, so a score can exceed 1: an identical
  hypothesis of 3 tokens has BLEU-1 = 4/3; this is kept, as in the official numbers. Values
  follow the installed NLTK, whose smoothing changed after the official code was written.
- A-bow and E-bow (`embedding_scores`): (cos(u, v) + 1) / 2 of two sentence vectors, the mean
  of the word vectors (A-bow) or their "extrema" (E-bow: per dimension the max if
  |min| <= max, else the min). Words without a vector are dropped, and sentences left without
  any are skipped; a context with no scorable sample or reference is left out of the
  embedding averages (`embedding_contexts` counts the ones kept).

Plus distinct-n (Li et al. 2016; `distinct`, `intra_distinct`): distinct n-grams / all n-grams
of the sampled responses.

Word vectors: the official code used GloVe Twitter 27B 200d (`glove.twitter.27B.200d.txt`,
from https://nlp.stanford.edu/projects/glove/). No package ships these vectors offline, so the
embedding metrics take a path (`load_word_vectors`) and are skipped, with a logged message,
when no vectors are given.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from absl import logging
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

Tokens = list[str]

BLEU_WEIGHTS: tuple[tuple[float, float, float, float], ...] = (
    (1.0, 0.0, 0.0, 0.0),
    (1 / 2, 1 / 2, 0.0, 0.0),
    (1 / 3, 1 / 3, 1 / 3, 0.0),
    (1 / 4, 1 / 4, 1 / 4, 1 / 4),
)
F1_EPS = 1e-11  # the official code's 10e-12
_SMOOTHING = SmoothingFunction().method7


# --------------------------------------------------------------------------- aggregation


def precision_recall(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Over the last two axes (samples H, references R) of `scores`: precision = mean_h max_r,
    recall = mean_r max_h. Both need H, R >= 1."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim < 2 or scores.shape[-1] == 0 or scores.shape[-2] == 0:
        raise ValueError(f"need a (..., H, R) score array with H, R >= 1, got {scores.shape}")
    return scores.max(axis=-1).mean(axis=-1), scores.max(axis=-2).mean(axis=-1)


def f1(precision: float, recall: float) -> float:
    """2PR / (P + R + 1e-11), the official code's F1."""
    return 2 * precision * recall / (precision + recall + F1_EPS)


# --------------------------------------------------------------------------- BLEU


def _bleu_pair(reference: Tokens, hypothesis: Tokens) -> list[float]:
    """BLEU-1..4 of one hypothesis against one reference.

    An empty hypothesis or reference scores 0.0 without asking NLTK: nothing matches, and the
    NLTK of the official code raised there (which it caught, scoring 0.0). The ZeroDivisionError
    and ValueError (log 0) that older NLTK versions raise on other degenerate pairs, e.g. a
    one-token hypothesis, are scored 0.0 the same way; anything else propagates.
    """
    if not reference or not hypothesis:
        return [0.0] * len(BLEU_WEIGHTS)
    out = []
    for weights in BLEU_WEIGHTS:
        try:
            score = sentence_bleu(
                [reference], hypothesis, weights=weights, smoothing_function=_SMOOTHING
            )
        except (ZeroDivisionError, ValueError):
            score = 0.0
        out.append(float(score))
    return out


def bleu_scores(references: Sequence[Tokens], hypotheses: Sequence[Tokens]) -> np.ndarray:
    """BLEU-1..4 of every (hypothesis, reference) pair of one context: array (4, H, R),
    entry [n-1, h, r] = sentence_bleu([ref_r], hyp_h) with BLEU_WEIGHTS[n-1], smoothing 7."""
    out = np.zeros((len(BLEU_WEIGHTS), len(hypotheses), len(references)))
    for h, hyp in enumerate(hypotheses):
        for r, ref in enumerate(references):
            out[:, h, r] = _bleu_pair(list(ref), list(hyp))
    return out


# --------------------------------------------------------------------------- word vectors


@dataclasses.dataclass(frozen=True)
class WordVectors:
    """Word → vector (float64, shape (dim,)), as read from a GloVe/word2vec text file."""

    vectors: dict[str, np.ndarray]
    dim: int
    path: str = ""

    def __len__(self) -> int:
        return len(self.vectors)

    def __contains__(self, word: object) -> bool:
        return word in self.vectors

    def __getitem__(self, word: str) -> np.ndarray:
        return self.vectors[word]

    def embed(self, tokens: Iterable[str]) -> np.ndarray:
        """(n, dim) vectors of the tokens that have one (the others dropped); n may be 0."""
        rows = [self.vectors[w] for w in tokens if w in self.vectors]
        return np.stack(rows) if rows else np.zeros((0, self.dim))

    @classmethod
    def from_dict(cls, vectors: Mapping[str, Sequence[float]]) -> WordVectors:
        """Vectors given in code (tests, small experiments); all of one dimension."""
        arrays = {w: np.asarray(v, dtype=np.float64) for w, v in vectors.items()}
        dims = {a.shape for a in arrays.values()}
        if len(dims) != 1 or len(next(iter(dims))) != 1:
            raise ValueError(f"word vectors must all be 1-D of one size, got shapes {dims}")
        return cls(arrays, next(iter(dims))[0])


def _is_header(fields: list[str]) -> bool:
    return len(fields) == 2 and all(f.isdigit() for f in fields)


def load_word_vectors(path: str | os.PathLike, vocabulary: set[str] | None = None) -> WordVectors:
    """Read a text file of `word v1 v2 … vD` lines (GloVe), optionally headed by a word2vec
    `N D` line. With `vocabulary`, only those words' vectors are parsed and kept, and reading
    stops once all are found (lines of other words are not checked). Blank lines are skipped;
    a repeated word keeps its first vector.

    Raises FileNotFoundError naming the file when it is missing, and ValueError naming the file
    and line when a line is not UTF-8, has a value that is not a number, or has a number of
    values other than D (from the header, else from the first vector line)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"word vectors file {path!r} does not exist (the official dialog metrics used "
            "glove.twitter.27B.200d.txt from https://nlp.stanford.edu/projects/glove/)"
        )
    wanted = None if vocabulary is None else set(vocabulary)
    vectors: dict[str, np.ndarray] = {}
    dim: int | None = None
    first = True
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{number}: not UTF-8 ({e})") from None
            if not line.strip():
                continue
            if first:
                first = False
                fields = line.split()
                if _is_header(fields):
                    dim = int(fields[1])
                    if dim == 0:
                        raise ValueError(f"{path}:{number}: header gives dimension 0")
                    continue
            # Split at the first ASCII space only: a word may hold other (Unicode) spaces.
            word, _, rest = line.rstrip("\r\n").partition(" ")
            if wanted is not None and word not in wanted:
                continue
            if word in vectors:
                continue
            values = rest.split()
            if dim is None:
                dim = len(values)
                if dim == 0:
                    raise ValueError(f"{path}:{number}: no vector values after {word!r}")
            if len(values) != dim:
                raise ValueError(
                    f"{path}:{number}: expected {dim} values after {word!r}, found {len(values)}"
                )
            try:
                vectors[word] = np.array([float(v) for v in values], dtype=np.float64)
            except ValueError as e:
                raise ValueError(f"{path}:{number}: {e}") from None
            if wanted is not None and len(vectors) == len(wanted):
                break
    if dim is None:
        raise ValueError(f"{path}: no word vectors in the file")
    return WordVectors(vectors, dim, path)


# --------------------------------------------------------------------------- embedding scores


def sentence_vectors(embedded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, extrema) of an (n, D) array of word vectors, n >= 1: mean over words, and per
    dimension the max if |min| <= max, else the min."""
    hi, lo = embedded.max(axis=0), embedded.min(axis=0)
    return embedded.mean(axis=0), np.where(np.abs(lo) <= hi, hi, lo)


def _cosine01(u: np.ndarray, v: np.ndarray) -> float:
    """(cos(u, v) + 1) / 2; a zero vector is taken as cosine 0 (score 0.5), where the official
    code gave NaN."""
    norm = math.sqrt(float(u @ u) * float(v @ v))
    cos = float(u @ v) / norm if norm > 0 else 0.0
    return (cos + 1.0) / 2.0


def embedding_scores(
    references: Sequence[Tokens], hypotheses: Sequence[Tokens], vectors: WordVectors
) -> np.ndarray:
    """A-bow and E-bow of every scorable (hypothesis, reference) pair of one context: array
    (2, H', R'), [0] = (cos(mean_h, mean_r) + 1) / 2, [1] the same of the extrema vectors.
    Sentences with no word in `vectors` are skipped, so H' <= H and R' <= R (either may be
    0)."""
    refs = [sentence_vectors(e) for e in map(vectors.embed, references) if len(e)]
    hyps = [sentence_vectors(e) for e in map(vectors.embed, hypotheses) if len(e)]
    out = np.zeros((2, len(hyps), len(refs)))
    for h, hyp in enumerate(hyps):
        for r, ref in enumerate(refs):
            out[0, h, r] = _cosine01(hyp[0], ref[0])
            out[1, h, r] = _cosine01(hyp[1], ref[1])
    return out


# --------------------------------------------------------------------------- distinct-n


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct(hypotheses_all: Iterable[Tokens], n: int) -> float:
    """Corpus-level distinct-n (Li et al. 2016): the number of distinct n-grams divided by the
    total number of n-grams, over all sampled responses of a split (all contexts together).
    0.0 when there are no n-grams."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [g for hyp in hypotheses_all for g in _ngrams(hyp, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def intra_distinct(hypotheses_per_context: Iterable[Sequence[Tokens]], n: int) -> float:
    """Intra-context distinct-n: `distinct` of each context's samples, averaged over the
    contexts whose samples have at least one n-gram (0.0 when none has)."""
    values = []
    for hyps in hypotheses_per_context:
        if any(len(h) >= n for h in hyps):
            values.append(distinct(hyps, n))
    return float(np.mean(values)) if values else 0.0


# --------------------------------------------------------------------------- all metrics


def score_responses(
    contexts: Sequence[tuple[Sequence[Tokens], Sequence[Tokens]]],
    vectors: WordVectors | None = None,
) -> dict[str, float]:
    """All metrics over `contexts`, each a (references, hypotheses) pair of token lists with at
    least one of each (a hypothesis may be empty: it scores 0 BLEU and no embedding score).

    Keys: bleu{1..4}_{precision,recall,f1}; a_bow_* and e_bow_* and embedding_contexts (only
    with `vectors`); distinct{1,2} (corpus-level), intra_distinct{1,2}; contexts,
    samples_per_context and references_per_context (means)."""
    if not contexts:
        raise ValueError("no contexts to score")
    bleu_p, bleu_r, emb_p, emb_r = [], [], [], []
    for i, (references, hypotheses) in enumerate(contexts):
        if not references or not hypotheses:
            raise ValueError(
                f"context {i} has {len(references)} references and {len(hypotheses)} samples; "
                "each needs at least one of each"
            )
        p, r = precision_recall(bleu_scores(references, hypotheses))
        bleu_p.append(p)
        bleu_r.append(r)
        if vectors is not None:
            emb = embedding_scores(references, hypotheses, vectors)
            if emb.shape[1] and emb.shape[2]:
                p, r = precision_recall(emb)
                emb_p.append(p)
                emb_r.append(r)
    out: dict[str, float] = {}
    bleu_p, bleu_r = np.mean(bleu_p, axis=0), np.mean(bleu_r, axis=0)
    for n in range(4):
        _put(out, f"bleu{n + 1}", bleu_p[n], bleu_r[n])
    if vectors is None:
        logging.info(
            "No word vectors given: A-bow and E-bow skipped (they need GloVe vectors, e.g. "
            "glove.twitter.27B.200d.txt, passed through load_word_vectors)."
        )
    else:
        out["embedding_contexts"] = float(len(emb_p))
        if emb_p:
            emb_p, emb_r = np.mean(emb_p, axis=0), np.mean(emb_r, axis=0)
            _put(out, "a_bow", emb_p[0], emb_r[0])
            _put(out, "e_bow", emb_p[1], emb_r[1])
        else:
            logging.warning("No context has a sample and a reference with word vectors.")
    samples = [list(map(list, hyps)) for _, hyps in contexts]
    for n in (1, 2):
        out[f"distinct{n}"] = distinct((h for hyps in samples for h in hyps), n)
        out[f"intra_distinct{n}"] = intra_distinct(samples, n)
    out["contexts"] = float(len(contexts))
    out["samples_per_context"] = float(np.mean([len(h) for _, h in contexts]))
    out["references_per_context"] = float(np.mean([len(r) for r, _ in contexts]))
    return out


def _put(out: dict[str, float], name: str, precision: float, recall: float) -> None:
    out[f"{name}_precision"] = float(precision)
    out[f"{name}_recall"] = float(recall)
    out[f"{name}_f1"] = float(f1(precision, recall))


# --------------------------------------------------------------------------- table

_PRF_COLUMNS = (
    ("BLEU-1", "bleu1"),
    ("BLEU-2", "bleu2"),
    ("BLEU-3", "bleu3"),
    ("BLEU-4", "bleu4"),
    ("A-bow", "a_bow"),
    ("E-bow", "e_bow"),
)
_SINGLE_COLUMNS = (("distinct-1", "distinct1"), ("distinct-2", "distinct2"))
MISSING = "—"


def _fmt(metrics: Mapping[str, float], key: str) -> str:
    value = metrics.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return f"{value:.3f}"


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table in the layout of Zhao et al.'s / Fu et al.'s Table 2: one row per model
    (in the order given), BLEU-1..4, A-bow and E-bow as "P / R / F1", then distinct-1 and
    distinct-2; three decimals, a missing metric shown as "—"."""
    header = ["Model"] + [f"{name} P / R / F1" for name, _ in _PRF_COLUMNS]
    header += [name for name, _ in _SINGLE_COLUMNS]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + [":---:"] * (len(header) - 1)) + "|",
    ]
    for model, metrics in results.items():
        cells = [str(model).replace("|", "\\|")]
        for _, key in _PRF_COLUMNS:
            parts = [_fmt(metrics, f"{key}_{part}") for part in ("precision", "recall", "f1")]
            cells.append(MISSING if all(p == MISSING for p in parts) else " / ".join(parts))
        cells += [_fmt(metrics, key) for _, key in _SINGLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
