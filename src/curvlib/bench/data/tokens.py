"""Next-token data: a character vocabulary, and windows of token ids with their
next-token targets.

A :class:`TokenDataset` holds int64 windows of ``T`` token ids ``[n, T]`` and, as targets,
the ``T`` tokens that follow each one (the same window shifted by one position), in a
:class:`CharVocabulary`; :func:`token_windows` tiles a token stream into such windows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from curvlib.errors import ConfigError, ShapeError

__all__ = ["ASCII_VOCABULARY", "CharVocabulary", "TokenDataset", "token_windows"]


@dataclass(frozen=True)
class CharVocabulary:
    """A character vocabulary: id ``i < len(chars)`` is the character ``chars[i]``; every
    other character (non-ASCII letters, form feeds, ``\\r`` …) maps to one extra id,
    :attr:`unknown_id` ``= len(chars)``, so the vocabulary has ``len(chars) + 1`` ids.

    Attributes:
        chars: the known characters, each once, in id order.
        unknown_text: what :meth:`decode` writes for the unknown id.
    """

    chars: str
    unknown_text: str = "\ufffd"

    def __post_init__(self) -> None:
        if not self.chars or len(set(self.chars)) != len(self.chars):
            raise ConfigError(f"CharVocabulary: chars must be non-empty and without repeats, got {self.chars!r}")

    @property
    def size(self) -> int:
        """``V``: the known characters and the unknown id."""
        return len(self.chars) + 1

    @property
    def unknown_id(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """``text`` as ids: ``[len(text)]`` int64 in ``[0, V)``."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        top = max(map(ord, self.chars))
        table = np.full(top + 1, self.unknown_id, dtype=np.int64)
        table[[ord(c) for c in self.chars]] = np.arange(len(self.chars))
        return np.where(codes <= top, table[np.minimum(codes, top)], self.unknown_id).astype(np.int64)

    def decode(self, ids: np.ndarray | torch.Tensor | list[int]) -> str:
        """Ids ``[n]`` back to text (the unknown id becomes :attr:`unknown_text`)."""
        flat = np.asarray(ids.tolist() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64).reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= self.size):
            raise ConfigError(f"CharVocabulary.decode: ids must lie in [0, {self.size}), got "
                              f"[{flat.min()}, {flat.max()}]")
        return "".join(self.chars[i] if i < len(self.chars) else self.unknown_text for i in flat.tolist())


#: Tab, newline and the 95 printable ASCII characters ``' '``–``'~'`` (97 characters, ids
#: 0–96); everything else is the unknown id 97 (``V = 98``). Python source is almost
#: entirely ASCII: of the 2.2 million characters of the standard-library corpus on CPython
#: 3.11, 8 are unknown.
ASCII_VOCABULARY = CharVocabulary("\t\n" + "".join(chr(c) for c in range(32, 127)))


@dataclass(frozen=True, eq=False)
class TokenDataset:
    """Next-token prediction windows of a token stream, split into train and test.

    Row ``i`` of ``X`` holds ``T`` consecutive token ids and row ``i`` of ``y`` the ``T``
    tokens one position later (the window shifted by one): the target of position ``t``
    is the token that follows it.  Built by :func:`token_windows`.

    Attributes:
        name: short id (``"stdlib_chars"``, ...).
        X_train: ``[n_train, T]`` int64 token ids in ``[0, V)``.
        y_train: ``[n_train, T]`` int64, the next token of each position.
        X_test: ``[n_test, T]`` int64 (``n_test`` may be 0).
        y_test: ``[n_test, T]`` int64.
        vocabulary: the ids' meaning; ``V = vocabulary.size``.
        description: one line on what the text is and how it was split.
        source: where it came from (the files read).
    """

    name: str
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    vocabulary: CharVocabulary
    description: str
    source: str

    def __post_init__(self) -> None:
        T = self.X_train.shape[1] if self.X_train.ndim == 2 else None
        for split, X, y in (("train", self.X_train, self.y_train), ("test", self.X_test, self.y_test)):
            if X.ndim != 2 or X.shape[1] != T or T < 1:
                raise ShapeError(f"TokenDataset {self.name!r}: X_{split} must be [n, T] with the same T ≥ 1 "
                                 f"for both splits, got {tuple(X.shape)} (X_train {tuple(self.X_train.shape)})")
            if X.dtype != torch.int64 or y.dtype != torch.int64 or y.shape != X.shape:
                raise ShapeError(f"TokenDataset {self.name!r}: X_{split} and y_{split} must both be int64 "
                                 f"[n, T], got {X.dtype} {tuple(X.shape)} and {y.dtype} {tuple(y.shape)}")
            for label, ids in (("X", X), ("y", y)):
                if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocabulary.size):
                    raise ShapeError(f"TokenDataset {self.name!r}: {label}_{split} ids must lie in "
                                     f"[0, {self.vocabulary.size}), got [{int(ids.min())}, {int(ids.max())}]")

    @property
    def n_train(self) -> int:
        """Training windows (rows)."""
        return self.X_train.shape[0]

    @property
    def n_test(self) -> int:
        return self.X_test.shape[0]

    @property
    def seq_len(self) -> int:
        """``T``, the tokens of one window."""
        return self.X_train.shape[1]

    @property
    def vocab_size(self) -> int:
        """``V``."""
        return self.vocabulary.size

    @property
    def n_classes(self) -> int:
        """The classes of the per-position cross-entropy: ``V``."""
        return self.vocabulary.size

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> TokenDataset:
        """The first ``n_train`` training and ``n_test`` test windows (``None`` keeps all):
        a contiguous stretch from the start of each split's text (windows are in text order)."""
        for label, k, n in (("n_train", n_train, self.n_train), ("n_test", n_test, self.n_test)):
            if k is not None and not 0 <= k <= n:
                raise ConfigError(f"TokenDataset {self.name!r}: {label} must be in [0, {n}], got {k}")
        tr = slice(None) if n_train is None else slice(0, n_train)
        te = slice(None) if n_test is None else slice(0, n_test)
        return replace(
            self,
            X_train=self.X_train[tr], y_train=self.y_train[tr], X_test=self.X_test[te], y_test=self.y_test[te],
            description=f"{self.description} (subset: {self.X_train[tr].shape[0]} train, "
            f"{self.X_test[te].shape[0]} test windows)",
        )


def token_windows(ids: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile a token stream into windows of ``T + 1`` tokens: inputs and next-token targets.

    Window ``i`` covers tokens ``[i·T, i·T + T]``: its first ``T`` are row ``i`` of ``X``,
    its last ``T`` row ``i`` of ``y``. Consecutive windows share one token, so every token
    but the first is a target exactly once, with a context of 0 to ``T − 1`` tokens before it.

    Args:
        ids: ``[L]`` int64 token ids.
        seq_len: ``T`` ≥ 1.

    Returns:
        ``(X, y)``, both ``[n, T]`` int64 with ``n = (L − 1) // T`` (a tail shorter than a
        window is dropped).
    """
    if seq_len < 1:
        raise ConfigError(f"token_windows: seq_len must be ≥ 1, got {seq_len}")
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    n = max(0, (ids.shape[0] - 1) // seq_len)
    X = ids[: n * seq_len].reshape(n, seq_len)
    y = ids[1: n * seq_len + 1].reshape(n, seq_len)
    return torch.from_numpy(np.ascontiguousarray(X)), torch.from_numpy(np.ascontiguousarray(y))
