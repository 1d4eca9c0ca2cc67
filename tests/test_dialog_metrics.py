"""Known answers for the dialog response metrics (Zhao et al. 2017, as in Fu et al. 2019)."""

import math

import numpy as np
import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from vae_jax.dialog import metrics as dm

VECTORS_TEXT = "cat 1 0\ndog 0 1\nneg -3 1\n"


@pytest.fixture
def vectors_file(tmp_path):
    path = tmp_path / "vecs.txt"
    path.write_text(VECTORS_TEXT, encoding="utf-8")
    return path


def test_bleu_equals_nltk_with_the_official_weights():
    ref = "i do n't know what you mean by that".split()
    hyp = "i know what you mean".split()
    got = dm.bleu_scores([ref], [hyp])
    assert got.shape == (4, 1, 1)
    weights = [(1, 0, 0, 0), (0.5, 0.5, 0, 0), (1 / 3, 1 / 3, 1 / 3, 0), (0.25,) * 4]
    for n, w in enumerate(weights):
        want = sentence_bleu([ref], hyp, weights=w, smoothing_function=SmoothingFunction().method7)
        assert got[n, 0, 0] == pytest.approx(want, abs=1e-12)
    # BLEU-n falls with n here, and the four are distinct (so each weight is used).
    assert len(set(np.round(got[:, 0, 0], 9))) == 4


def test_identical_one_token_response_scores_one():
    scores = dm.score_responses([([["hello"]], [["hello"]])])
    assert scores["bleu1_precision"] == pytest.approx(1.0)
    assert scores["bleu1_recall"] == pytest.approx(1.0)
    assert scores["bleu1_f1"] == pytest.approx(1.0, abs=1e-10)


def test_smoothing_7_lets_an_identical_response_exceed_one():
    # Method 5 (inside 7) averages orders n-1, n, n+1 with p_0 := p_1 + 1; all p_n = 1 here.
    sent = "a b c d e".split()
    got = dm.bleu_scores([sent], [sent])[:, 0, 0]
    p = [4 / 3, 10 / 9, 28 / 27, 82 / 81]
    want = [math.prod(p[: n + 1]) ** (1 / (n + 1)) for n in range(4)]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_precision_recall_on_a_hand_matrix():
    scores = np.array([[0.1, 0.9], [0.2, 0.3]])  # samples × references
    p, r = dm.precision_recall(scores)
    assert p == pytest.approx((0.9 + 0.3) / 2)  # mean over samples of the best reference
    assert r == pytest.approx((0.2 + 0.9) / 2)  # mean over references of the best sample
    assert dm.f1(0.6, 0.55) == pytest.approx(2 * 0.6 * 0.55 / 1.15)


def test_bleu_precision_differs_from_recall_and_averages_over_contexts():
    # Context 1: both samples match reference 0 only -> [[1, 0], [1, 0]]: P = 1, R = 1/2.
    ctx1 = ([["a"], ["b"]], [["a"], ["a"]])
    # Context 2: one reference, one sample of two matches -> [[1], [0]]: P = 1/2, R = 1.
    ctx2 = ([["b"]], [["b"], ["c"]])
    np.testing.assert_allclose(dm.bleu_scores(*ctx1)[0], [[1, 0], [1, 0]])
    one = dm.score_responses([ctx1])
    assert one["bleu1_precision"] == pytest.approx(1.0)
    assert one["bleu1_recall"] == pytest.approx(0.5)
    assert one["bleu1_f1"] == pytest.approx(2 / 3)
    both = dm.score_responses([ctx1, ctx2])
    assert both["bleu1_precision"] == pytest.approx(0.75)
    assert both["bleu1_recall"] == pytest.approx(0.75)
    assert both["contexts"] == 2
    assert both["samples_per_context"] == 2
    assert both["references_per_context"] == 1.5


def test_empty_hypothesis_scores_zero_without_crashing(vectors_file):
    assert not dm.bleu_scores([["a", "b"]], [[]]).any()
    assert not dm.bleu_scores([[]], [["a", "b"]]).any()
    vectors = dm.load_word_vectors(vectors_file)
    scores = dm.score_responses([([["cat"]], [[], ["cat"]])], vectors)
    assert scores["bleu1_precision"] == pytest.approx(0.5)  # [[0], [1]]
    assert scores["bleu1_recall"] == pytest.approx(1.0)
    assert scores["a_bow_precision"] == pytest.approx(1.0)  # the empty sample is skipped
    # A context whose only sample is empty is left out of the embedding averages.
    scores = dm.score_responses([([["cat"]], [[]]), ([["dog"]], [["dog"]])], vectors)
    assert scores["embedding_contexts"] == 1
    assert scores["bleu1_precision"] == pytest.approx(0.5)


def test_distinct_on_a_hand_example():
    hyps = [["a", "b", "a"], ["a", "b"]]
    assert dm.distinct(hyps, 1) == pytest.approx(2 / 5)
    assert dm.distinct(hyps, 2) == pytest.approx(2 / 3)  # (a b), (b a), (a b)
    assert dm.distinct([["a"], []], 2) == 0.0
    assert dm.intra_distinct([[["a", "a"]], [["a", "b"]]], 1) == pytest.approx(0.75)
    scores = dm.score_responses([([["x"]], [["a", "a"]]), ([["x"]], [["a", "b"]])])
    assert scores["distinct1"] == pytest.approx(2 / 4)
    assert scores["intra_distinct1"] == pytest.approx(0.75)
    assert scores["distinct2"] == pytest.approx(1.0)


def test_embedding_scores_by_hand(vectors_file):
    vectors = dm.load_word_vectors(vectors_file)
    assert vectors.dim == 2 and len(vectors) == 3
    # "unk" has no vector and is dropped; the reference made only of "zzz" is skipped.
    got = dm.embedding_scores([["dog", "unk"], ["zzz"]], [["cat", "neg"]], vectors)
    assert got.shape == (2, 1, 1)
    # mean(cat, neg) = (-1, 0.5); extrema: dim 0 max 1 < |min -3| -> -3, dim 1 -> 1.
    a_bow = ((-1 * 0 + 0.5 * 1) / math.sqrt(1.25) + 1) / 2
    e_bow = ((-3 * 0 + 1 * 1) / math.sqrt(10) + 1) / 2
    assert got[0, 0, 0] == pytest.approx(a_bow)
    assert got[1, 0, 0] == pytest.approx(e_bow)
    scores = dm.score_responses([([["dog", "unk"], ["zzz"]], [["cat", "neg"]])], vectors)
    assert scores["a_bow_precision"] == pytest.approx(a_bow)
    assert scores["e_bow_recall"] == pytest.approx(e_bow)
    assert scores["e_bow_f1"] == pytest.approx(e_bow, abs=1e-10)


def test_word2vec_header_and_vocabulary(tmp_path):
    path = tmp_path / "w2v.txt"
    path.write_text("3 2\n" + VECTORS_TEXT + "bad 1 2 3\n", encoding="utf-8")
    vectors = dm.load_word_vectors(path, vocabulary={"neg", "cat"})
    assert set(vectors.vectors) == {"cat", "neg"}
    np.testing.assert_array_equal(vectors["neg"], [-3.0, 1.0])
    # Without a vocabulary every line is checked against the header's dimension.
    with pytest.raises(ValueError, match=r"w2v\.txt:5: expected 2 values after 'bad', found 3"):
        dm.load_word_vectors(path)


def test_bad_vectors_files_name_the_file_and_line(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        dm.load_word_vectors(missing)
    bad = tmp_path / "bad.txt"
    bad.write_text("cat 1 0\ndog 0\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.txt:2: expected 2 values"):
        dm.load_word_vectors(bad)
    bad.write_text("cat 1 0\n\ndog 0 x\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.txt:3: .*'x'"):
        dm.load_word_vectors(bad)
    bad.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="no word vectors"):
        dm.load_word_vectors(bad)


def test_score_keys_without_vectors_and_bad_contexts():
    scores = dm.score_responses([([["a", "b"]], [["a"]])])
    assert not any(k.startswith(("a_bow", "e_bow")) for k in scores)
    for n in range(1, 5):
        assert {f"bleu{n}_precision", f"bleu{n}_recall", f"bleu{n}_f1"} <= set(scores)
    with pytest.raises(ValueError, match="context 0"):
        dm.score_responses([([], [["a"]])])


def test_format_table():
    full = dm.score_responses(
        [([["cat"]], [["cat"]])], dm.WordVectors.from_dict({"cat": [1.0, 0.0]})
    )
    table = dm.format_table({"CVAE cyc": full, "CVAE mono": {"bleu1_precision": 0.25}})
    lines = table.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("| Model | BLEU-1 P / R / F1 |")
    assert all(line.count("|") == 10 for line in lines)
    assert "| CVAE cyc | 1.000 / 1.000 / 1.000 |" in table
    mono = lines[3].split(" | ")
    assert mono[1] == "0.250 / — / —"
    assert mono[2:] == ["—"] * 6 + ["— |"]
