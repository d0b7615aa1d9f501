"""The character corpus of ``char_lm``: real text as next-character windows, read offline.

:func:`load_char_corpus` reads the running interpreter's own standard-library sources
(:data:`STDLIB_CORPUS_MODULES`) or the user's text files (``path=``), encodes them in a
:class:`~curvlib.bench.data.tokens.CharVocabulary` of printable ASCII plus one "unknown"
id, and splits them by position in the text (the test part is the end of the corpus).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from curvlib.bench.data.errors import DataFileError
from curvlib.bench.data.files import user_file
from curvlib.bench.data.tokens import ASCII_VOCABULARY, CharVocabulary, TokenDataset, token_windows
from curvlib.errors import ConfigError

__all__ = ["STDLIB_CORPUS_MODULES", "load_char_corpus", "read_text_corpus", "stdlib_corpus_files"]


#: The standard-library modules :func:`stdlib_corpus_files` reads, in this order: large,
#: long-lived pure-Python modules, present in every CPython from 3.9 on (one missing from an
#: interpreter is skipped, and the data set's description names it). About 2 MB of source
#: on CPython 3.11, prose (docstrings, comments) and code; the corpus is their
#: concatenation, cut at ``max_chars``, so its end — the test part — comes from the modules
#: reached last.
STDLIB_CORPUS_MODULES: tuple[str, ...] = (
    "argparse", "typing", "inspect", "dataclasses", "functools", "collections", "enum", "difflib",
    "textwrap", "shutil", "subprocess", "threading", "logging", "statistics", "fractions", "random",
    "heapq", "string", "pprint", "configparser", "tarfile", "pickle", "ast", "tokenize", "doctest",
    "pydoc", "unittest.case", "contextlib", "traceback", "tempfile", "ipaddress", "optparse", "_pydecimal",
)


def _stdlib_dir() -> Path:
    # The interpreter's own library directory (inside a virtual environment: the base
    # interpreter's), where the pure-Python modules live as source files.
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_corpus_files(stdlib: str | Path | None = None) -> tuple[list[Path], list[str]]:
    """The source files of :data:`STDLIB_CORPUS_MODULES`, in that order.

    A module ``a.b`` is ``a/b.py`` or the package file ``a/b/__init__.py`` under the
    standard-library directory (``sysconfig.get_paths()["stdlib"]`` of the running
    interpreter unless ``stdlib`` is given). Nothing is imported or downloaded.

    Returns:
        ``(files, missing)``: the files found, and the modules that have no source file there.

    Raises:
        DataFileError: none of the modules has a source file (an interpreter shipped
            without its library sources): pass ``path=`` to text files instead.
    """
    root = Path(stdlib) if stdlib is not None else _stdlib_dir()
    files: list[Path] = []
    missing: list[str] = []
    for module in STDLIB_CORPUS_MODULES:
        stem = root.joinpath(*module.split("."))
        for candidate in (stem.with_name(stem.name + ".py"), stem / "__init__.py"):
            if candidate.is_file():
                files.append(candidate)
                break
        else:
            missing.append(module)
    if not files:
        raise DataFileError(
            f"load_char_corpus: the standard library at {root} has none of the source files of "
            f"{', '.join(STDLIB_CORPUS_MODULES[:4])}, … (an interpreter without its library sources?); "
            "pass path= to a text file or a folder of text files"
        )
    return files, missing


def _text_files(path: Path) -> list[Path]:
    """``path`` itself, or every regular file under the folder ``path`` (hidden names skipped),
    sorted by their path relative to it."""
    if path.is_file():
        return [path]
    def hidden(f: Path) -> bool:
        return any(part.startswith(".") for part in f.relative_to(path).parts)

    files = sorted((f for f in path.rglob("*") if f.is_file() and not hidden(f)),
                   key=lambda f: f.relative_to(path).as_posix())
    if not files:
        raise DataFileError(f"load_char_corpus: the folder {str(path)!r} holds no files")
    return files


def read_text_corpus(files: list[Path], max_chars: int | None = None) -> tuple[str, list[Path]]:
    """The concatenated text of ``files``, in order, cut at ``max_chars`` characters.

    Files are decoded as UTF-8 (undecodable bytes become U+FFFD, hence the unknown id) with
    universal newlines (``\\r\\n`` and ``\\r`` read as ``\\n``); reading stops once
    ``max_chars`` characters are there.

    Returns:
        ``(text, used)``: the text and the files it came from.
    """
    if max_chars is not None and max_chars < 2:
        raise ConfigError(f"read_text_corpus: max_chars must be ≥ 2, got {max_chars}")
    parts: list[str] = []
    used: list[Path] = []
    total = 0
    for file in files:
        if max_chars is not None and total >= max_chars:
            break
        with open(file, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        parts.append(text)
        used.append(file)
        total += len(text)
    text = "".join(parts)
    return (text if max_chars is None else text[:max_chars]), used


def load_char_corpus(
    path: str | Path | None = None,
    *,
    seq_len: int = 64,
    max_chars: int | None = 1_000_000,
    test_fraction: float = 0.1,
    vocabulary: CharVocabulary = ASCII_VOCABULARY,
) -> TokenDataset:
    """Characters of real text as next-character windows, for a character-level language model.

    Text: ``path=None`` reads the running interpreter's own standard-library sources
    (:func:`stdlib_corpus_files`: the modules of :data:`STDLIB_CORPUS_MODULES` in order, from
    ``sysconfig.get_paths()["stdlib"]``) — real text every Python installation has, read
    offline. ``path`` may name a text file, or a folder whose files (hidden ones skipped) are
    read in the order of their sorted relative paths. The text is cut at ``max_chars``
    characters (``None``: all of it); the same interpreter always gives the same text.

    Ids: ``vocabulary`` (default :data:`ASCII_VOCABULARY`: tab, newline and printable ASCII,
    everything else one unknown id; ``V = 98``).

    Split by position: the last ``round(L·test_fraction)`` characters are the test text, the
    rest the training text; each is tiled into windows of ``T + 1`` characters by
    :func:`token_windows` (no window crosses the boundary). Training batches draw these
    windows in a random order.

    Returns:
        a :class:`TokenDataset` with ``X``, ``y`` ``[n, seq_len]`` int64.

    Raises:
        DataFileError: no text (``path`` missing or empty, an interpreter without sources),
            or too little for one training window.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if seq_len < 1:
        raise ConfigError(f"load_char_corpus: seq_len must be ≥ 1, got {seq_len}")
    if path is None:
        root = _stdlib_dir()
        files, missing = stdlib_corpus_files(root)
        what = f"Python {sysconfig.get_python_version()} standard-library source"
        where = str(root)
    else:
        folder = user_file(path, "load_char_corpus")
        files, missing = _text_files(folder), []
        what = f"text from {folder.name}"
        where = str(folder)
    text, used = read_text_corpus(files, max_chars)
    ids = vocabulary.encode(text)
    n_test_chars = int(round(len(ids) * test_fraction))
    cut = len(ids) - n_test_chars
    X_train, y_train = token_windows(ids[:cut], seq_len)
    X_test, y_test = token_windows(ids[cut:], seq_len)
    if X_train.shape[0] == 0:
        raise DataFileError(f"load_char_corpus: {len(ids)} characters of {what} ({where}) leave {cut} for "
                            f"training, fewer than one window of seq_len + 1 = {seq_len + 1}")
    n_unknown = int((ids == vocabulary.unknown_id).sum())
    names = [f.relative_to(where).as_posix() if path is None or Path(where).is_dir() else f.name for f in used]
    skipped = f"; not in this interpreter: {', '.join(missing)}" if missing else ""
    return TokenDataset(
        name="stdlib_chars" if path is None else "text_chars",
        X_train=X_train, y_train=y_train, X_test=X_test, y_test=y_test, vocabulary=vocabulary,
        description=f"{len(ids):,} characters of {what} ({len(used)} files), {vocabulary.size} ids "
        f"({n_unknown:,} characters unknown); split by position: first {cut:,} characters train "
        f"({X_train.shape[0]} windows of {seq_len}+1), last {n_test_chars:,} test ({X_test.shape[0]} windows)"
        f"{skipped}",
        source=f"{where}: {', '.join(names)}",
    )
