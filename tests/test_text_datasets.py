"""Tests for vae_jax.data.text: building plain-text corpora as array_record TFDS datasets."""

import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from hypothesis import given, settings
from hypothesis import strategies as st

from vae_jax.core import tokens
from vae_jax.data import text

REPO = Path(__file__).resolve().parents[1]
LOGGER = "vae_jax.data.text"

# A tiny PTB-format corpus whose vocabulary order is worked out by hand: frequencies in train
# are the:3, cat:2, sat:2, <unk>:2 (not a word of its own), then dog, a, end once each, in that
# order of first appearance.
TINY_TRAIN = "the cat sat <unk> \nthe dog sat \na cat <unk> the end \n"
TINY_VALID = "the bird sat \n"
TINY_TEST = "a dog \ncat \n"
TINY_WORDS = ("the", "cat", "sat", "dog", "a", "end")


def write_ptb(
    directory: Path, train: str = TINY_TRAIN, valid: str = TINY_VALID, test: str = TINY_TEST
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for split, content in (("train", train), ("valid", valid), ("test", test)):
        (directory / f"ptb.{split}.txt").write_text(content, encoding="utf-8")
    return directory


@pytest.fixture
def tiny_ptb(tmp_path: Path) -> Path:
    return write_ptb(tmp_path / "src")


# ----------------------------------------------------------------------------- tiny PTB


def test_tiny_ptb_vocab_counts_and_ids(tiny_ptb: Path, tmp_path: Path) -> None:
    ds = text.load("ptb", tiny_ptb, tmp_path / "tfds")

    assert ds.vocab.words == tokens.SPECIALS + TINY_WORDS
    assert len(ds.vocab) == 10
    assert [ds.vocab.word_to_id[w] for w in tokens.SPECIALS] == [0, 1, 2, 3]
    assert (tokens.PAD_ID, tokens.UNK_ID, tokens.BOS_ID, tokens.EOS_ID) == (0, 1, 2, 3)
    assert ds.vocab.word_to_id["<unk>"] == 1
    assert ds.vocab_source == "train" and ds.missing_splits == ()

    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 3, "valid": 1, "test": 2}
    train = ds.stats["train"]
    assert (train.sentences, train.words, train.unks, train.dropped_too_long) == (3, 12, 2, 0)
    assert train.predicted_tokens == 15
    assert ds.stats["valid"].unks == 1  # "bird" is not a training word
    assert ds.stats["test"].predicted_tokens == 3 + 2

    first = ds.splits["train"][0]
    assert first.dtype == np.int32
    # No <s>/</s>: the pipeline adds them. The corpus's <unk> is our id 1.
    np.testing.assert_array_equal(first, [4, 5, 6, 1])
    np.testing.assert_array_equal(ds.splits["valid"][0], [4, 1, 6])
    np.testing.assert_array_equal(ds.splits["test"][-1], [5])
    with pytest.raises(IndexError):
        ds.splits["test"][2]


def test_tiny_ptb_order_index_and_round_trip(tiny_ptb: Path, tmp_path: Path) -> None:
    ds = text.load("ptb", tiny_ptb, tmp_path / "tfds")
    train = ds.splits["train"]
    lines = TINY_TRAIN.splitlines()
    assert [train.example(i)["index"] for i in range(len(train))] == [0, 1, 2]
    assert [ds.vocab.decode(ids) for ids in train] == [" ".join(s.split()) for s in lines]
    batch = train.__getitems__([2, 0])
    np.testing.assert_array_equal(batch[1], train[0])
    # decode stops at </s> and skips <s>/<pad>, as for model samples.
    assert ds.vocab.decode([2, 4, 5, 3, 6, 0]) == "the cat"
    assert ds.vocab.decode([2, 4, 3], strip_special=False) == "<s> the </s>"


def test_reload_reuses_build_and_vocab(tiny_ptb: Path, tmp_path: Path, caplog) -> None:
    first = text.load("ptb", tiny_ptb, tmp_path / "tfds")
    stamp = {p: p.stat().st_mtime_ns for p in first.data_dir.iterdir()}
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        again = text.load("ptb", tiny_ptb, tmp_path / "tfds")
    assert again.vocab == first.vocab and again.vocab.words == first.vocab.words
    assert again.stats == first.stats
    assert {p: p.stat().st_mtime_ns for p in again.data_dir.iterdir()} == stamp
    assert "rebuilding" not in caplog.text
    # The vocabulary is the one recorded with the dataset.
    assert first.data_dir.joinpath("metadata.json").is_file()


def test_readable_with_tfds_data_source(tiny_ptb: Path, tmp_path: Path) -> None:
    ds = text.load("ptb", tiny_ptb, tmp_path / "tfds", max_length=50)
    name = ds.data_dir.parent.name  # ptb_max50_<fingerprint>
    assert name == f"ptb_max50_{ds.fingerprint[:12]}"
    sources = tfds.data_source(f"vae_text/{name}", data_dir=str(tmp_path / "tfds"))
    assert len(sources["train"]) == 3
    np.testing.assert_array_equal(sources["train"][1]["ids"], ds.splits["train"][1])


def test_builds_and_reads_without_tensorflow(tiny_ptb: Path, tmp_path: Path) -> None:
    # A fresh interpreter in which TensorFlow looks uninstalled (find_spec() gives None and
    # importing it fails), so this holds even on a machine where TF is installed.
    script = textwrap.dedent(
        f"""
        import sys

        class HideTensorFlow:
            def __init__(self, finder):
                self.finder = finder

            def find_spec(self, name, path=None, target=None):
                if name == "tensorflow" or name.startswith("tensorflow."):
                    return None
                return self.finder.find_spec(name, path, target)

            def __getattr__(self, attr):
                return getattr(self.finder, attr)

        sys.meta_path[:] = [HideTensorFlow(f) for f in sys.meta_path]
        from vae_jax.data import text
        ds = text.load("ptb", {str(tiny_ptb)!r}, {str(tmp_path / "tfds")!r})
        assert ds.splits["train"][0].tolist() == [4, 5, 6, 1]
        assert "tensorflow" not in sys.modules
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            print("ok")
        """
    )
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_overlong_sentences_dropped_and_counted(tiny_ptb: Path, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ds = text.load("ptb", tiny_ptb, tmp_path / "tfds", max_length=3)
    assert ds.stats["train"].dropped_too_long == 2
    assert ds.stats["train"].sentences == 1
    assert ds.stats["train"].words == 3
    # max_length is part of the config name, so it never reuses a build made with another.
    assert ds.data_dir.parent.name.startswith("ptb_max3_") and ds.data_dir.name == "1.0.0"
    assert "dropped 2 sentence(s) longer than max_length=3" in caplog.text
    # The kept sentence remembers its line in the source file.
    assert ds.splits["train"].example(0)["index"] == 1
    # The vocabulary does not depend on max_length.
    assert ds.vocab.words == tokens.SPECIALS + TINY_WORDS


def test_changed_source_is_built_beside_the_old_build(tiny_ptb: Path, tmp_path: Path) -> None:
    before = text.load("ptb", tiny_ptb, tmp_path / "tfds")
    assert len(before.splits["valid"]) == 1
    write_ptb(tiny_ptb, valid="the cat \nthe dog \n")
    after = text.load("ptb", tiny_ptb, tmp_path / "tfds")
    assert len(after.splits["valid"]) == 2
    assert after.stats["valid"].unks == 0
    # Another fingerprint, another build: the first one is untouched (a run trained on it
    # still finds its data).
    assert after.fingerprint != before.fingerprint and after.data_dir != before.data_dir
    assert len(before.splits["valid"]) == 1 and before.data_dir.joinpath("metadata.json").exists()


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_damaged_build_is_detected_and_rebuilt(tiny_ptb, tmp_path, damage, caplog) -> None:
    """A build with a deleted or truncated array_record file is detected: a warning names the
    damaged build, it is rebuilt, and the rebuilt data are the first build's."""
    first = text.load("ptb", tiny_ptb, tmp_path / "tfds")
    record = next(p for p in sorted(first.data_dir.iterdir()) if "train.array_record" in p.name)
    if damage == "delete":
        record.unlink()
    else:
        os.truncate(record, record.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        again = text.load("ptb", tiny_ptb, tmp_path / "tfds")
    assert (
        f"the build at {first.data_dir} is damaged" in caplog.text and "rebuilding" in caplog.text
    )
    assert again.vocab == first.vocab and again.stats == first.stats
    np.testing.assert_array_equal(again.splits["train"][1], first.splits["train"][1])


# ----------------------------------------------------------------------------- bad inputs


def test_missing_source_dir_raises_before_building(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as err:
        text.load("ptb", missing, tmp_path / "tfds")
    message = str(err.value)
    assert str(missing) in message
    for name in ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"):
        assert name in message
    assert not (tmp_path / "tfds").exists()


def test_missing_file_raises(tiny_ptb: Path, tmp_path: Path) -> None:
    (tiny_ptb / "ptb.valid.txt").unlink()
    with pytest.raises(FileNotFoundError) as err:
        text.load("ptb", tiny_ptb, tmp_path / "tfds")
    assert str(tiny_ptb / "ptb.valid.txt") in str(err.value)
    assert "ptb.train.txt" in str(err.value)  # the expected files are listed
    assert not (tmp_path / "tfds").exists()


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_split_raises(tiny_ptb: Path, tmp_path: Path, content: str) -> None:
    (tiny_ptb / "ptb.test.txt").write_text(content)
    with pytest.raises(ValueError, match="empty") as err:
        text.load("ptb", tiny_ptb, tmp_path / "tfds")
    assert str(tiny_ptb / "ptb.test.txt") in str(err.value)


def test_non_utf8_line_raises_with_line_number(tiny_ptb: Path, tmp_path: Path) -> None:
    (tiny_ptb / "ptb.valid.txt").write_bytes(b"the cat \nthe \xff dog \n")
    with pytest.raises(ValueError, match="line 2 is not valid UTF-8") as err:
        text.load("ptb", tiny_ptb, tmp_path / "tfds")
    assert str(tiny_ptb / "ptb.valid.txt") in str(err.value)


def test_empty_lines_dropped_and_counted(tmp_path: Path, caplog) -> None:
    src = write_ptb(tmp_path / "src", valid="the cat \n\nthe dog \n")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ds = text.load("ptb", src, tmp_path / "tfds")
    assert ds.stats["valid"].dropped_empty == 1
    assert [ds.splits["valid"].example(i)["index"] for i in range(2)] == [0, 2]
    assert "dropped 1 empty line(s)" in caplog.text


def test_bad_arguments(tiny_ptb: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown corpus"):
        text.load("wikitext", tiny_ptb, tmp_path / "tfds")
    with pytest.raises(ValueError, match="max_length"):
        text.load("ptb", tiny_ptb, tmp_path / "tfds", max_length=0)


# ----------------------------------------------------------------------------- other formats


def test_short_yelp_tab_labels(tmp_path: Path) -> None:
    src = tmp_path / "short_yelp"
    src.mkdir()
    (src / "vocab.txt").write_text("<pad>\n<s>\n</s>\n<unk>\ngood\nfood\nbad\nservice\n")
    for n in (100, 500, 1000, 2000, 10000):
        (src / f"short_yelp.train.{n}.txt").write_text("1\tgood food .\n0\tbad service\n")
    (src / "short_yelp.valid.txt").write_text("1\tgood <unk>\n")
    (src / "short_yelp.test.txt").write_text("0\tbad food\n1\tgood service\n")
    ds = text.load("short_yelp", src, tmp_path / "tfds")
    assert ds.vocab.words == tokens.SPECIALS + ("good", "food", "bad", "service")
    assert ds.vocab_source == "file:vocab.txt"
    assert ds.missing_splits == ("train",)
    train = ds.splits["train_100"]
    np.testing.assert_array_equal(train[0], [4, 5, 1])  # "." is not in vocab.txt
    assert [train.example(i)["label"] for i in range(2)] == [1, 0]
    assert ds.stats["valid"].unks == 1
    with pytest.raises(KeyError, match="absent"):
        ds.splits["train"]


def test_yelp_sentiment_suffix_labels_vocab_fallback(tmp_path: Path, caplog) -> None:
    src = tmp_path / "yelp_shen_sentiment"
    src.mkdir()
    (src / "sentiment.dev.0").write_text("awful food\nawful\n")
    (src / "sentiment.dev.1").write_text("great food\n")
    (src / "sentiment.test.0").write_text("awful service\n")
    (src / "sentiment.test.1").write_text("great\n")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ds = text.load("yelp_sentiment", src, tmp_path / "tfds")
    assert "vocabulary taken from 'valid'" in caplog.text
    assert "['train'] absent" in caplog.text
    assert ds.vocab.words == tokens.SPECIALS + ("awful", "food", "great")
    valid = ds.splits["valid"]
    assert [valid.example(i)["label"] for i in range(3)] == [0, 0, 1]
    assert [valid.example(i)["index"] for i in range(3)] == [0, 1, 2]
    np.testing.assert_array_equal(ds.splits["test"][0], [4, 1])


def test_yahoo_missing_train_and_unk_token(tmp_path: Path) -> None:
    src = tmp_path / "yahoo"
    src.mkdir()
    (src / "yahoo.dict").write_text("<pad> 0\n<unk> 1\n<s> 2\n</s> 3\n_UNK 4\nwhat 5\nis 6\n")
    (src / "yahoo.valid.txt").write_text("what is _UNK ?\n")
    (src / "yahoo.test.txt").write_text("is what\n")
    ds = text.load("yahoo", src, tmp_path / "tfds")
    assert ds.vocab.words == tokens.SPECIALS + ("what", "is")
    assert ds.missing_splits == ("train",)
    np.testing.assert_array_equal(ds.splits["valid"][0], [4, 5, 1, 1])
    assert sorted(ds.splits) == ["test", "valid"]


@pytest.mark.parametrize("corpus", sorted(text.CORPORA))
def test_real_corpora_specs_find_their_files(corpus: str) -> None:
    source = text.source_dir_for(corpus, _data_root())
    if not source.is_dir():
        pytest.skip(f"{source} is absent (set VAE_JAX_DATA_DIR to the corpora root)")
    layout = text._check_sources(text.get_spec(corpus), source)
    assert layout.splits, corpus


# ----------------------------------------------------------------------------- Vocab


_WORDS = st.sampled_from(TINY_WORDS)


@settings(max_examples=50, deadline=None)
@given(st.lists(_WORDS, min_size=1, max_size=20))
def test_vocab_round_trip(words: list[str]) -> None:
    vocab = text.Vocab(tokens.SPECIALS + TINY_WORDS)
    sentence = " ".join(words)
    ids = vocab.encode(sentence)
    assert ids.dtype == np.int32 and len(ids) == len(words)
    assert vocab.decode(ids) == sentence


def test_vocab_unknowns_and_validation() -> None:
    vocab = text.Vocab(tokens.SPECIALS + ("a", "b"), unk_token="_UNK")
    np.testing.assert_array_equal(vocab.encode("a _UNK zzz <unk> b"), [4, 1, 1, 1, 5])
    with pytest.raises(ValueError, match="start with"):
        text.Vocab(("a", "b"))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab.decode([99])


# ----------------------------------------------------------------------------- real PTB


def _data_root() -> Path:
    env = os.environ.get("VAE_JAX_DATA_DIR")
    # CI clones the repository with ../shared beside it.
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def real_ptb(tmp_path_factory):
    source = _data_root() / "ptb"
    if not (source / "ptb.train.txt").is_file():
        pytest.skip(f"PTB not found at {source} (set VAE_JAX_DATA_DIR to the corpora root)")
    tfds_dir = tmp_path_factory.mktemp("ptb_tfds")
    start = time.perf_counter()
    ds = text.load("ptb", source, tfds_dir)
    elapsed = time.perf_counter() - start
    return ds, source, tfds_dir, elapsed


def test_real_ptb_counts(real_ptb) -> None:
    ds, _, _, elapsed = real_ptb
    counts = {s: (st.sentences, st.words, st.predicted_tokens) for s, st in ds.stats.items()}
    assert counts == {
        "train": (42_068, 887_521, 929_589),
        "valid": (3_370, 70_390, 73_760),
        "test": (3_761, 78_669, 82_430),
    }
    assert {s: len(v) for s, v in ds.splits.items()} == {
        "train": 42_068,
        "valid": 3_370,
        "test": 3_761,
    }
    assert all(st.dropped_too_long == 0 and st.dropped_empty == 0 for st in ds.stats.values())
    assert len(ds.vocab) == 10_002
    assert ds.vocab.words[:5] == ("<pad>", "<unk>", "<s>", "</s>", "the")
    # Only the corpus's own <unk> tokens become id 1: PTB valid/test have no other unknowns.
    assert {s: st.unks for s, st in ds.stats.items()} == {
        "train": 45_020,
        "valid": 3_485,
        "test": 4_794,
    }
    # Building must stay fast (a few seconds here); the bound only catches a pathology.
    assert elapsed < 60, f"building PTB took {elapsed:.1f}s"


def test_real_ptb_round_trip_and_reload(real_ptb) -> None:
    ds, source, tfds_dir, _ = real_ptb
    lines = (source / "ptb.valid.txt").read_text(encoding="utf-8").splitlines()
    valid = ds.splits["valid"]
    for i in (0, 1, len(valid) - 1):
        assert ds.vocab.decode(valid[i]) == " ".join(lines[i].split())
    again = text.load("ptb", source, tfds_dir)
    assert again.vocab == ds.vocab


def test_concurrent_loads_build_once(tmp_path):
    """Parallel jobs (a sweep's) loading one build at once: all succeed, one build is made."""
    import subprocess
    import sys

    src = write_ptb(tmp_path / "src")
    script = (
        "import sys; from vae_jax.data import text; "
        "ds = text.load('ptb', sys.argv[1], sys.argv[2]); print(len(ds.splits['train']))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(src), str(tmp_path / "tfds")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    assert len({out.strip().splitlines()[-1] for out, _ in outs}) == 1
    builds = list((tmp_path / "tfds" / "vae_text").iterdir())
    assert len([b for b in builds if b.is_dir() and b.name.startswith("ptb_")]) == 1
