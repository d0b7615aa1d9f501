"""hypothesis strategies for curvlib's tests and for plugin authors.

Shapes are drawn first and data second; elements are bounded and never subnormal;
every tensor is float64 unless a ``dtype`` is given.  Data tensors are built from a
drawn integer seed through a ``torch.Generator`` (fast, and shrinks well).

What there is:

- matrices: :func:`matrices`, :func:`spd_matrices`, :func:`psd_matrices`,
  :func:`kronecker_factors`;
- per-sample statistics: :func:`linear_statistics` / :func:`conv_statistics` (raw tensors)
  and :func:`layer_statistics` (a :class:`~curvlib.curvatures.statistics.LayerStatistics`,
  what an approximator's ``fit`` receives, in every geometry of :data:`STATISTICS_KINDS`:
  no positions, 1-/2-/3-D grids, sequences, one-hot rows, several uses, tied transposed uses);
- small networks with a batch: :func:`networks` draws a :class:`NetworkCase` built by
  :func:`build_mlp`, :func:`build_cnn` or :func:`build_conv_autoencoder` (float64 by
  default, weights drawn from a seeded generator).

:func:`load_profile` registers and loads the deterministic profile curvlib's own test
suite uses (a plugin's ``conftest.py`` can call it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import nn

from curvlib.curvatures.statistics import LayerStatistics, Use
from curvlib.linalg.geometry import Geometry
from curvlib.linalg.rows import DenseRows, OneHotRows

__all__ = [
    "ARCHITECTURES",
    "STATISTICS_KINDS",
    "NetworkCase",
    "build_conv_autoencoder",
    "build_cnn",
    "build_mlp",
    "conv_statistics",
    "dims",
    "kronecker_factors",
    "layer_statistics",
    "linear_statistics",
    "load_profile",
    "matrices",
    "networks",
    "psd_matrices",
    "seeds",
    "spd_matrices",
]

seeds = st.integers(min_value=0, max_value=2**31 - 1)


def dims(min_value: int = 1, max_value: int = 6) -> st.SearchStrategy[int]:
    return st.integers(min_value=min_value, max_value=max_value)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


@st.composite
def matrices(draw, rows: int | None = None, cols: int | None = None, *, max_dim: int = 6, dtype=torch.float64):
    """A dense matrix with entries ~ N(0, 1)."""
    r = rows if rows is not None else draw(dims(1, max_dim))
    c = cols if cols is not None else draw(dims(1, max_dim))
    return torch.randn(r, c, generator=_gen(draw(seeds)), dtype=dtype)


@st.composite
def spd_matrices(draw, n: int | None = None, *, max_dim: int = 6, min_eig: float = 0.1, dtype=torch.float64):
    """A symmetric positive definite matrix with eigenvalues ≥ ``min_eig`` (condition ≤ ~1e3)."""
    n = n if n is not None else draw(dims(1, max_dim))
    g = _gen(draw(seeds))
    X = torch.randn(n, n, generator=g, dtype=dtype)
    return X @ X.T / n + min_eig * torch.eye(n, dtype=dtype)


@st.composite
def psd_matrices(draw, n: int | None = None, *, max_dim: int = 6, max_rank: int | None = None, dtype=torch.float64):
    """A symmetric positive semi-definite matrix, possibly rank deficient."""
    n = n if n is not None else draw(dims(1, max_dim))
    k = draw(st.integers(min_value=1, max_value=max_rank or n))
    X = torch.randn(n, k, generator=_gen(draw(seeds)), dtype=dtype)
    return X @ X.T / k


@st.composite
def kronecker_factors(draw, *, max_dim: int = 5, spd: bool = True, dtype=torch.float64):
    """A pair ``(A [a, a], B [b, b])`` of SPD (or general square) factors."""
    a = draw(dims(1, max_dim))
    b = draw(dims(1, max_dim))
    if spd:
        return draw(spd_matrices(a, dtype=dtype)), draw(spd_matrices(b, dtype=dtype))
    return draw(matrices(a, a, dtype=dtype)), draw(matrices(b, b, dtype=dtype))


@st.composite
def linear_statistics(draw, *, max_m: int = 8, max_dim: int = 5, bias: bool = True, dtype=torch.float64):
    """Per-sample statistics of a Linear layer: ``(Â [m, d_a], Ĝ [m, d_g])``.

    With ``bias`` the last column of Â is 1 (ā = [a; 1]).
    """
    m = draw(dims(1, max_m))
    d_in = draw(dims(1, max_dim))
    d_g = draw(dims(1, max_dim))
    g = _gen(draw(seeds))
    A = torch.randn(m, d_in, generator=g, dtype=dtype)
    if bias:
        A = torch.cat([A, torch.ones(m, 1, dtype=dtype)], dim=1)
    G = torch.randn(m, d_g, generator=g, dtype=dtype)
    return A, G


@st.composite
def conv_statistics(draw, *, max_m: int = 3, max_hw: int = 4, max_dim: int = 4, dtype=torch.float64):
    """Per-sample, per-position statistics of a conv layer.

    Returns ``(Â [m, T, d_a], Ĝ [m, T, d_g], (H, W))`` with T = H·W positions in
    row-major order (t = row·W + col).
    """
    m = draw(dims(1, max_m))
    H = draw(dims(1, max_hw))
    W = draw(dims(1, max_hw))
    d_a = draw(dims(1, max_dim))
    d_g = draw(dims(1, max_dim))
    g = _gen(draw(seeds))
    A = torch.randn(m, H * W, d_a, generator=g, dtype=dtype)
    G = torch.randn(m, H * W, d_g, generator=g, dtype=dtype)
    return A, G, (H, W)


# --------------------------------------------------------------------------- LayerStatistics


#: The kinds of layer statistics :func:`layer_statistics` draws (one per position geometry
#: and way of sharing a weight).
STATISTICS_KINDS: tuple[str, ...] = ("linear", "conv", "sequence", "grid", "one_hot", "uses", "tied")


def _rows(gen: torch.Generator, m: int, T: int, d_in: int, bias: bool) -> torch.Tensor:
    a = torch.randn(m, T, d_in, generator=gen, dtype=torch.float64)
    if bias:
        a = torch.cat([a, torch.ones(m, T, 1, dtype=torch.float64)], dim=-1)
    return a


@st.composite
def layer_statistics(
    draw,
    kind: str | None = None,
    *,
    max_m: int = 4,
    max_c: int = 2,
    max_dim: int = 4,
    max_hw: int = 3,
    bias: bool | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> LayerStatistics:
    """Per-sample statistics of one layer block, as a curvature operator captures them.

    Args:
        kind: one of :data:`STATISTICS_KINDS`, or ``None`` (any):

            - ``"linear"``: one use without positions (``a [m, 1, d_a]``, ``g [m, c, 1, d_g]``);
            - ``"conv"``: one use on a 2-D grid (H, W) ≤ ``max_hw`` with a drawn kernel size;
            - ``"sequence"``: a Linear layer on tokens, one use on a sequence of ≤ 2·``max_hw``
              positions (no kernel);
            - ``"grid"``: a Conv1d or Conv3d, one use on a 1-D or 3-D grid with a kernel;
            - ``"one_hot"``: an embedding, one-hot rows of width d_a on a sequence (negative
              indices — padding — included), no bias;
            - ``"uses"``: a module called 2–3 times, each use on its own sequence;
            - ``"tied"``: a weight shared by an output layer (an untransposed use on a
              sequence, ``[d_g = tokens, d_a = width (+1)]``) and an embedding (a transposed
              use with one-hot rows of width d_g).
        max_m, max_c: bounds on the samples m and the back-propagated columns c.
        max_dim: bound on d_in (d_a = d_in + 1 with a bias) and d_g.
        max_hw: bound on the sizes of the position axes.
        bias: whether ā carries the trailing 1 (``None``: drawn; always ``False`` for ``one_hot``).
        dtype, device: of the statistics.

    Entries of ā (but the bias 1) and g are N(0, 1); ``scale = 1/(m·c)`` (the ``fisher``
    scaling with S = c samples).
    """
    kind = kind if kind is not None else draw(st.sampled_from(STATISTICS_KINDS))
    if kind not in STATISTICS_KINDS:
        raise ValueError(f"layer_statistics: kind must be one of {STATISTICS_KINDS} or None, got {kind!r}")
    m = draw(dims(1, max_m))
    c = draw(dims(1, max_c))
    d_in = draw(dims(1, max_dim))
    d_g = draw(dims(1, max_dim))
    has_bias = False if kind == "one_hot" else (draw(st.booleans()) if bias is None else bool(bias))
    gen = _gen(draw(seeds))

    def grads(T: int, d: int) -> torch.Tensor:
        return torch.randn(m, c, T, d, generator=gen, dtype=torch.float64)

    def tokens(T: int, width: int) -> torch.Tensor:
        return torch.randint(-1, width, (m, T), generator=gen)  # -1: a padding token (zero row)

    uses: list[Use] = []
    if kind == "linear":
        uses.append(Use(DenseRows(_rows(gen, m, 1, d_in, has_bias)), grads(1, d_g), Geometry.none()))
    elif kind == "conv":
        H, W = draw(dims(1, max_hw)), draw(dims(1, max_hw))
        kernel = (draw(dims(1, 3)), draw(dims(1, 3)))
        uses.append(Use(DenseRows(_rows(gen, m, H * W, d_in, has_bias)), grads(H * W, d_g), Geometry.grid((H, W), kernel)))
    elif kind == "sequence":
        T = draw(dims(1, 2 * max_hw))
        uses.append(Use(DenseRows(_rows(gen, m, T, d_in, has_bias)), grads(T, d_g), Geometry.sequence(T)))
    elif kind == "grid":
        ndim = draw(st.sampled_from([1, 3]))
        shape = tuple(draw(dims(1, max_hw if ndim == 1 else 2)) for _ in range(ndim))
        kernel = tuple(draw(dims(1, 3)) for _ in range(ndim))
        T = math.prod(shape)
        geometry = Geometry.grid(shape, kernel) if ndim > 1 else Geometry.sequence(T, kernel[0])
        uses.append(Use(DenseRows(_rows(gen, m, T, d_in, has_bias)), grads(T, d_g), geometry))
    elif kind == "one_hot":
        T = draw(dims(1, 2 * max_hw))
        width = d_in + 1
        uses.append(Use(OneHotRows(tokens(T, width), width, dtype=torch.float64), grads(T, d_g), Geometry.sequence(T)))
    elif kind == "uses":
        for _ in range(draw(st.integers(2, 3))):
            T = draw(dims(1, max_hw))
            uses.append(Use(DenseRows(_rows(gen, m, T, d_in, has_bias)), grads(T, d_g), Geometry.sequence(T)))
    else:  # tied: W̄ [d_g = tokens, d_a = width (+ 1)]; the embedding's own matrix is [width, tokens]
        T = draw(dims(1, max_hw))
        uses.append(Use(DenseRows(_rows(gen, m, T, d_in, has_bias)), grads(T, d_g), Geometry.sequence(T)))
        T2 = draw(dims(1, max_hw))
        g_emb = grads(T2, d_in)
        if has_bias:  # the embedding's use has no gradient for the output layer's bias
            g_emb = torch.cat([g_emb, torch.zeros(m, c, T2, 1, dtype=torch.float64)], dim=-1)
        rows = OneHotRows(tokens(T2, d_g), d_g, dtype=torch.float64)
        uses.append(Use(rows, g_emb, Geometry.sequence(T2), transposed=True))
    uses = [u.to(dtype, device) for u in uses]
    return LayerStatistics(uses=uses, scale=1.0 / (m * c), has_bias=has_bias)


# --------------------------------------------------------------------------- networks

#: The architectures :func:`networks` draws from.
ARCHITECTURES: tuple[str, ...] = ("mlp", "cnn", "conv_autoencoder")

_ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softplus": nn.Softplus}


@dataclass
class NetworkCase:
    """A small network, its loss and one batch.

    Attributes:
        arch: ``"mlp"``, ``"cnn"`` or ``"conv_autoencoder"``.
        model: the network (parameters drawn from a seeded generator).
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``.
        X: the inputs ``[m, ...]``.
        y: the targets (class indices ``[m]`` or ``[m, outputs]``).
        seed: the seed everything was drawn from (a generator for Monte Carlo draws can
            be seeded from it).
    """

    arch: str
    model: nn.Module
    loss_fn: nn.Module
    X: torch.Tensor
    y: torch.Tensor
    seed: int

    @property
    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(X, y)``."""
        return self.X, self.y

    @property
    def dtype(self) -> torch.dtype:
        return self.X.dtype

    def __repr__(self) -> str:  # what hypothesis prints for a falsifying example
        return (
            f"NetworkCase(arch={self.arch!r}, X={list(self.X.shape)}, loss={type(self.loss_fn).__name__}, "
            f"seed={self.seed}, model={self.model})"
        )


def _init_parameters(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Every parameter ~ N(0, 1/fan_in) from ``generator`` (no global RNG)."""
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else p.numel()
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) / math.sqrt(max(fan_in, 1)))
    return model


def build_mlp(
    widths: Sequence[int],
    *,
    bias: bool | Sequence[bool] = True,
    activation: str = "tanh",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> nn.Sequential:
    """Linear layers ``widths[0] -> widths[1] -> … -> widths[-1]`` with ``activation``
    between them (``"tanh"``, ``"sigmoid"``, ``"softplus"``).

    Args:
        widths: at least two sizes.
        bias: one flag for all layers, or one per layer.
        seed: the parameters' generator seed.
    """
    if len(widths) < 2:
        raise ValueError(f"build_mlp: expected at least two widths, got {list(widths)}")
    n = len(widths) - 1
    biases = [bool(bias)] * n if isinstance(bias, bool) else [bool(b) for b in bias]
    if len(biases) != n:
        raise ValueError(f"build_mlp: {n} layers but {len(biases)} bias flags")
    layers: list[nn.Module] = []
    for k in range(n):
        layers.append(nn.Linear(widths[k], widths[k + 1], bias=biases[k]))
        if k < n - 1:
            layers.append(_ACTIVATIONS[activation]())
    model = nn.Sequential(*layers).to(dtype)
    return _init_parameters(model, torch.Generator().manual_seed(int(seed)))


def build_cnn(
    in_channels: int = 2,
    channels: int = 3,
    size: int = 4,
    classes: int = 3,
    *,
    bias: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> nn.Sequential:
    """Conv2d(3×3, padding 1) -> Tanh -> Conv2d(2×2, stride 2) -> Tanh -> Flatten -> Linear.

    Inputs ``[m, in_channels, size, size]`` with an even ``size``; outputs ``[m, classes]``.
    """
    if size % 2:
        raise ValueError(f"build_cnn: size must be even, got {size}")
    model = nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1, bias=bias),
        nn.Tanh(),
        nn.Conv2d(channels, 2, 2, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * (size // 2) ** 2, classes),
    ).to(dtype)
    return _init_parameters(model, torch.Generator().manual_seed(int(seed)))


def build_conv_autoencoder(
    channels: int = 2,
    size: int = 4,
    *,
    bias: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> nn.Sequential:
    """Conv2d(3×3, stride 2, padding 1) -> Tanh -> ConvTranspose2d(3×3, stride 2, padding 1,
    output_padding 1) -> Tanh -> Conv2d(1×1) -> Flatten: ``[m, 1, size, size]`` ->
    ``[m, size²]`` (``size`` even).
    """
    if size % 2:
        raise ValueError(f"build_conv_autoencoder: size must be even, got {size}")
    model = nn.Sequential(
        nn.Conv2d(1, channels, 3, stride=2, padding=1, bias=bias),
        nn.Tanh(),
        nn.ConvTranspose2d(channels, 2, 3, stride=2, padding=1, output_padding=1),
        nn.Tanh(),
        nn.Conv2d(2, 1, 1),
        nn.Flatten(),
    ).to(dtype)
    return _init_parameters(model, torch.Generator().manual_seed(int(seed)))


@st.composite
def networks(
    draw,
    archs: Sequence[str] = ARCHITECTURES,
    *,
    max_m: int = 4,
    dtype: torch.dtype = torch.float64,
) -> NetworkCase:
    """A :class:`NetworkCase`: architecture, sizes, loss, weights and batch all drawn.

    - ``mlp``: 1–3 Linear layers of widths 1–4 (biases and the activation drawn), MSE or
      cross-entropy (≥ 2 classes);
    - ``cnn``: :func:`build_cnn` on 4×4 inputs with 1–2 input channels, cross-entropy;
    - ``conv_autoencoder``: :func:`build_conv_autoencoder` on 4×4 images, MSE or
      BCE-with-logits against the flattened input.
    """
    arch = draw(st.sampled_from(list(archs)))
    m = draw(dims(1, max_m))
    seed = draw(seeds)
    g = torch.Generator().manual_seed(seed + 1)
    if arch == "mlp":
        depth = draw(st.integers(1, 3))
        widths = [draw(dims(1, 4)) for _ in range(depth + 1)]
        loss_name = draw(st.sampled_from(["mse", "ce"]))
        if loss_name == "ce":
            widths[-1] = max(widths[-1], 2)
        model = build_mlp(
            widths,
            bias=[draw(st.booleans()) for _ in range(depth)],
            activation=draw(st.sampled_from(sorted(_ACTIVATIONS))),
            seed=seed,
            dtype=dtype,
        )
        X = torch.randn(m, widths[0], generator=g, dtype=dtype)
        if loss_name == "ce":
            loss_fn: nn.Module = nn.CrossEntropyLoss()
            y = torch.randint(0, widths[-1], (m,), generator=g)
        else:
            loss_fn = nn.MSELoss()
            y = torch.randn(m, widths[-1], generator=g, dtype=dtype)
    elif arch == "cnn":
        c_in = draw(dims(1, 2))
        model = build_cnn(c_in, draw(dims(1, 3)), 4, 3, bias=draw(st.booleans()), seed=seed, dtype=dtype)
        X = torch.randn(m, c_in, 4, 4, generator=g, dtype=dtype)
        loss_fn = nn.CrossEntropyLoss()
        y = torch.randint(0, 3, (m,), generator=g)
    elif arch == "conv_autoencoder":
        model = build_conv_autoencoder(draw(dims(1, 2)), 4, bias=draw(st.booleans()), seed=seed, dtype=dtype)
        X = torch.rand(m, 1, 4, 4, generator=g, dtype=dtype)
        loss_fn = draw(st.sampled_from([nn.MSELoss(), nn.BCEWithLogitsLoss()]))
        y = X.reshape(m, -1).clone()
    else:
        raise ValueError(f"networks: unknown architecture {arch!r}; expected one of {ARCHITECTURES}")
    return NetworkCase(arch=arch, model=model, loss_fn=loss_fn, X=X, y=y, seed=seed)


# --------------------------------------------------------------------------- profiles


def load_profile(name: str | None = None) -> str:
    """Register curvlib's hypothesis profiles and load one; returns its name.

    - ``"curvlib-ci"`` (default): deterministic (``derandomize=True``), no example
      database, no deadline, 30 examples;
    - ``"curvlib-explore"``: random, 300 examples.

    ``name=None`` reads ``HYPOTHESIS_PROFILE`` (``"explore"`` selects the second).
    A plugin's ``conftest.py`` calls ``load_profile()`` to run the conformance kit as
    curvlib's own suite does.
    """
    settings.register_profile(
        "curvlib-ci",
        derandomize=True,
        database=None,
        deadline=None,
        max_examples=30,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.register_profile(
        "curvlib-explore", deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow]
    )
    if name is None:
        name = "curvlib-explore" if os.environ.get("HYPOTHESIS_PROFILE", "") == "explore" else "curvlib-ci"
    settings.load_profile(name)
    return name
