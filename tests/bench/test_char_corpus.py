"""The character corpus of ``char_lm`` (curvlib.bench.data): the interpreter's own
standard-library sources read offline and deterministically, the vocabulary, the
next-character windows and the split by position."""

from __future__ import annotations

import socket
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from curvlib.bench.data import (
    ASCII_VOCABULARY,
    STDLIB_CORPUS_MODULES,
    CharVocabulary,
    DataFileError,
    TokenDataset,
    load_char_corpus,
    read_text_corpus,
    stdlib_corpus_files,
    token_windows,
)
from curvlib.errors import ConfigError, ShapeError


def _text_of(X: torch.Tensor, y: torch.Tensor) -> str:
    """The text the windows tile: every window's inputs, then the last target."""
    ids = torch.cat([X.reshape(-1), y[-1:, -1]]) if X.numel() else X.reshape(-1)
    return ASCII_VOCABULARY.decode(ids)


@pytest.fixture(scope="module")
def corpus() -> TokenDataset:
    return load_char_corpus(seq_len=16, max_chars=50_000)


# --------------------------------------------------------------------------- vocabulary


def test_vocabulary_is_printable_ascii_plus_one_unknown_id():
    vocab = ASCII_VOCABULARY
    assert vocab.size == 98 and vocab.unknown_id == 97
    assert vocab.chars[:2] == "\t\n" and vocab.chars[2:] == "".join(map(chr, range(32, 127)))
    text = "def f(x):\n\treturn x + 1  # ok ~"
    ids = vocab.encode(text)
    assert ids.dtype == np.int64 and ids.shape == (len(text),)
    assert ids.min() >= 0 and ids.max() < vocab.unknown_id
    assert vocab.decode(ids) == text
    assert [int(i) for i in vocab.encode("\n A~")] == [1, 2, 35, 96]
    # everything else — non-ASCII, control characters, \r — is the one unknown id
    odd = vocab.encode("é\r\x0c€\U0001F600")
    assert odd.tolist() == [97] * 5 and vocab.decode(odd) == "\ufffd" * 5
    assert vocab.decode(torch.tensor([42, 97])) == "H\ufffd"
    with pytest.raises(ConfigError, match=r"ids must lie in \[0, 98\)"):
        vocab.decode([98])
    with pytest.raises(ConfigError, match="without repeats"):
        CharVocabulary("aa")


# --------------------------------------------------------------------------- windows


def test_windows_tile_the_stream_with_next_token_targets():
    ids = np.arange(23, dtype=np.int64)
    X, y = token_windows(ids, 5)
    assert X.dtype == y.dtype == torch.int64 and X.shape == y.shape == (4, 5)  # (23 - 1) // 5; tail dropped
    assert torch.equal(y, X + 1)  # the target of each position is the next token
    assert torch.equal(X.reshape(-1), torch.arange(20))  # consecutive windows share one token
    assert torch.equal(y.reshape(-1), torch.arange(1, 21))  # each token but the first is a target once
    assert token_windows(np.arange(5), 5)[0].shape == (0, 5)
    with pytest.raises(ConfigError, match="seq_len"):
        token_windows(ids, 0)


# --------------------------------------------------------------------------- the stdlib corpus


def test_stdlib_corpus_is_read_offline_and_deterministically(corpus, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the corpus loader tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    again = load_char_corpus(seq_len=16, max_chars=50_000)
    for a, b in ((corpus.X_train, again.X_train), (corpus.y_train, again.y_train),
                 (corpus.X_test, again.X_test), (corpus.y_test, again.y_test)):
        assert torch.equal(a, b)
    assert again.description == corpus.description and again.source == corpus.source

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files, missing = stdlib_corpus_files()
    assert files and all(f.is_file() and stdlib in f.parents for f in files)
    assert len(files) + len(missing) == len(STDLIB_CORPUS_MODULES)
    # the text is the files' own, in the fixed module order
    first = files[0].read_text(encoding="utf-8")
    assert _text_of(corpus.X_train, corpus.y_train)[:1000] == first[:1000]
    assert corpus.source.startswith(str(stdlib)) and files[0].name in corpus.source
    assert "standard-library source" in corpus.description


def test_stdlib_corpus_split_by_position_and_windows(corpus):
    assert corpus.seq_len == 16 and corpus.vocab_size == corpus.n_classes == 98
    assert (corpus.n_train, corpus.n_test) == ((45_000 - 1) // 16, (5_000 - 1) // 16)  # test: the last 10 %
    for X, y in ((corpus.X_train, corpus.y_train), (corpus.X_test, corpus.y_test)):
        assert X.dtype == y.dtype == torch.int64
        assert torch.equal(X[:, 1:], y[:, :-1])  # y is X shifted by one position
        assert torch.equal(X[1:, 0], y[:-1, -1])  # the windows are consecutive stretches of the text
    full, _ = read_text_corpus(stdlib_corpus_files()[0], 50_000)
    train, test = _text_of(corpus.X_train, corpus.y_train), _text_of(corpus.X_test, corpus.y_test)
    assert full.startswith(train) and test == full[45_000: 45_000 + len(test)]
    assert load_char_corpus(seq_len=16, max_chars=50_000, test_fraction=0.0).n_test == 0
    # a longer corpus starts with the shorter one
    longer = load_char_corpus(seq_len=16, max_chars=60_000)
    assert torch.equal(longer.X_train[: corpus.n_train], corpus.X_train)


# --------------------------------------------------------------------------- the user's text


def test_user_text_file_and_folder(tmp_path):
    file = tmp_path / "a.txt"
    file.write_text("hello world\r\n" * 40)  # universal newlines: \r\n reads as \n
    ds = load_char_corpus(file, seq_len=8, test_fraction=0.25)
    assert ds.name == "text_chars" and "\ufffd" not in _text_of(ds.X_train, ds.y_train)
    assert _text_of(ds.X_train, ds.y_train).startswith("hello world\nhello")
    assert ds.n_train == (360 - 1) // 8 and ds.n_test == (120 - 1) // 8

    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("B" * 30)
    (folder / "a.txt").write_text("A" * 30)
    (folder / "sub" / "c.md").write_text("C" * 30)
    (folder / ".hidden").write_text("H" * 30)
    ds = load_char_corpus(folder, seq_len=4, test_fraction=0.0)
    # sorted by relative path, hidden files skipped; the last character is no window's input
    assert _text_of(ds.X_train, ds.y_train) == "A" * 30 + "B" * 30 + "C" * 29
    assert "a.txt, b.txt, sub/c.md" in ds.source
    cut = load_char_corpus(folder, seq_len=4, max_chars=41, test_fraction=0.0)
    assert _text_of(cut.X_train, cut.y_train) == "A" * 30 + "B" * 11


def test_user_text_errors(tmp_path):
    with pytest.raises(DataFileError, match="does not exist"):
        load_char_corpus(tmp_path / "nope.txt")
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(DataFileError, match="fewer than one window"):
        load_char_corpus(tmp_path / "short.txt", seq_len=16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFileError, match="holds no files"):
        load_char_corpus(tmp_path / "empty")
    with pytest.raises(ConfigError, match="test_fraction"):
        load_char_corpus(tmp_path / "short.txt", test_fraction=1.0)


def test_an_interpreter_without_library_sources(tmp_path):
    with pytest.raises(DataFileError, match="pass path="):
        stdlib_corpus_files(tmp_path)
    (tmp_path / "argparse.py").write_text("x = 1\n")
    (tmp_path / "collections").mkdir()
    (tmp_path / "collections" / "__init__.py").write_text("y = 2\n")
    files, missing = stdlib_corpus_files(tmp_path)
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["argparse.py", "collections/__init__.py"]
    assert "typing" in missing and "argparse" not in missing


# --------------------------------------------------------------------------- the data set


def test_token_dataset_validates_and_subsets(corpus):
    X = torch.zeros(3, 4, dtype=torch.int64)
    ok = dict(name="t", X_train=X, y_train=X, X_test=X[:1], y_test=X[:1], vocabulary=ASCII_VOCABULARY,
              description="", source="")
    TokenDataset(**ok)
    with pytest.raises(ShapeError, match="int64"):
        TokenDataset(**{**ok, "X_train": X.float()})
    with pytest.raises(ShapeError, match="same T"):
        wider = torch.zeros(1, 5, dtype=torch.int64)
        TokenDataset(**{**ok, "X_test": wider, "y_test": wider})
    with pytest.raises(ShapeError, match=r"ids must lie in \[0, 98\)"):
        TokenDataset(**{**ok, "y_train": X + 98})
    sub = corpus.subset(n_train=10, n_test=3)
    assert (sub.n_train, sub.n_test) == (10, 3) and torch.equal(sub.X_train, corpus.X_train[:10])
    with pytest.raises(ConfigError, match="n_train"):
        corpus.subset(n_train=corpus.n_train + 1)
