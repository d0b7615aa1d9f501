"""Curvature over a data set: exact matrix-free products that iterate over the batches.

With batches β = 1 … B of m_β samples each (N = Σ_β m_β) and C_β the curvature operator of
batch β — a per-sample mean C_β = (1/m_β) Σ_{b∈β} C_b (:mod:`curvlib.curvatures.losses`) —
the operator over the data is

    C_data = (1/N) Σ_β m_β C_β = (1/N) Σ_{b=1}^{N} C_b,

the per-sample mean over the whole data set: the operator of **one big batch holding all
the data** (the model's samples must be independent; BatchNorm in training mode, which
couples the samples of a batch, is the exception).  For ``fisher``, ``empirical_fisher``
and ``ggn`` C_β = scale_β·J_β J_βᵀ (4.56)–(4.57); for ``hessian`` C_β = ∇²_θ (1/m_β) Σ ℓ_b.

Memory is bounded by one batch, as in curvlinops: every product (``F @ v``, a block
product, ``to_dense``) runs over the data again — it builds the kind's operator on one batch
(one hooked forward pass, the gradient and the per-sample probe, the kind's backward
passes), multiplies, and drops it before the next batch.  A product over the data thus
costs about what building the single-batch operator on every batch costs, plus the
products; the model is evaluated **at the parameters of the moment of the product** (a
training loop that changes the weights changes the operator).

Monte Carlo ``fisher``: the targets of each batch are drawn from a private copy of the
generator whose state is snapshot when the operator is built and restored at the start of
every pass, so every product over the data uses the same targets (the operator is a
fixed, symmetric matrix — what CG or Lanczos need).  The user's generator is not advanced;
pass a freshly seeded one for other draws.  This needs the data in the same order at
every pass (``DataLoader(shuffle=False)``, or a list of batches).

KFAC over the data (:func:`kfac_factors_over`): one pass, each batch's factors weighted by
m_β/N.  With ``kfac_factors`` (:mod:`curvlib.curvatures.factors`) both factors of a batch
are per-sample means — A_β = (1/m_β) Σ_{b,t} ā āᵀ and G_β = (scale_β/T) Σ g gᵀ with
scale_β = 1/(m_β·S) (expand), A_β = (1/m_β) Σ_b â âᵀ and G_β = scale_β Σ ĝ ĝᵀ (reduce) — so
Σ_β (m_β/N) A_β and Σ_β (m_β/N) G_β are exactly the factors of the one big batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from curvlib.capture.adapters import BatchCouplingWarning, ExcludedParametersWarning
from curvlib.capture.layout import LayerBlock, OnLayers, current_uncovered, uncovered_parameters
from curvlib.curvatures.batches import BatchFn, as_pair, split_batch
from curvlib.curvatures.factors import WEIGHT_SHARING, WeightSharing, kfac_factors
from curvlib.curvatures.kinds import BuiltinCurvature, capture_batch
from curvlib.curvatures.losses import loss_model_for
from curvlib.curvatures.operator import CurvatureBlock, CurvatureOperator, NoStatisticsError, PerSampleMean
from curvlib.errors import ConfigError, DTypeDeviceError, PerformanceWarning, ShapeError, UnsupportedLossError, warn

__all__ = ["DataCurvatureOperator", "kfac_factors_over"]

Term = tuple[torch.Tensor, torch.Tensor]


class DataCurvatureOperator(OnLayers, PerSampleMean):
    """C_data = (1/N) Σ_β m_β C_β ``[p, p]`` over the batches of ``data`` (module docstring).

    Built by ``curvlib.curvature(kind, model, loss_fn, data=loader, ...)``.  The first batch
    is captured once when it is built (layer blocks, loss and per-sample checks); with
    ``num_data=None`` the batches are also counted then (one pass that only loads them).

    Attributes:
        kind: the curvature kind.
        layers: the :class:`LayerBlock` s of the first batch, in flat-vector order; every
            batch must call the same ones (:class:`ShapeError` otherwise).
        excluded: qualified names of trainable parameters left out.
        num_samples: N = Σ_β m_β (``num_data`` when given; checked at every pass).
        model, loss_fn, data: as given.

    The shared interface of the single-batch operators: ``F @ v`` (``[p]``, ``[p, k]`` or a
    list shaped like :meth:`params`), :meth:`block`, :meth:`to_dense`, ``to_scipy``,
    :meth:`gradient_vector`, :attr:`layout`, :meth:`params_to_vector`,
    :meth:`vector_to_params`.  :meth:`statistics` raises :class:`NoStatisticsError` (the
    statistics of every batch at once would hold the data set): use
    :func:`kfac_factors_over` for KFAC factors.
    """

    symmetric = True
    dense_warning_size = 0  # a curvature matrix is p × p: forming it always deserves the warning

    def __init__(
        self,
        factory: Any,
        model: nn.Module,
        loss_fn: nn.Module,
        data: Iterable[Any],
        *,
        kind: str,
        num_data: int | None = None,
        progress: bool = False,
        batch_fn: BatchFn | None = None,
        generator: torch.Generator | None = None,
        registry: Any,
    ) -> None:
        """
        Args:
            factory: the kind's factory: ``factory.build(model, loss_fn, (inputs, targets),
                generator=..., registry=...)`` returns the operator of one batch.
            model, loss_fn: as for :func:`curvlib.curvature`.
            data: a re-iterable of batches (a ``DataLoader``, a list); each batch is a pair
                ``(X, y)`` or goes through ``batch_fn``.
            kind: the registered kind's name.
            num_data: N, if known (saves the counting pass; checked at the first pass).
            progress: show a progress bar (tqdm, else rich) over the batches of every pass.
            batch_fn: ``batch -> (inputs, targets)`` (:mod:`curvlib.curvatures.batches`).
            generator: the Monte Carlo source of ``fisher`` (its state is snapshot here).
            registry: a :class:`curvlib.plugins.Registry`.

        Raises:
            ConfigError: ``data`` is a one-shot iterator or a single batch, bad ``num_data``,
                ``progress`` or ``generator``.
            ShapeError: empty data, a batch without samples.
        """
        _check_data(data)
        if num_data is not None and (isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 1):
            raise ConfigError(f"num_data: expected a positive int (the number of samples in data) or None, got {num_data!r}")
        if not isinstance(progress, bool):
            raise ConfigError(f"progress: expected True or False, got {progress!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ConfigError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        self.kind = kind
        self.model, self.loss_fn, self.data = model, loss_fn, data
        self._factory, self._registry, self._batch_fn = factory, registry, batch_fn
        self._loss_model = loss_model_for(loss_fn)
        self._bar = _progress_bar(progress)
        self._uncovered = current_uncovered()  # every later pass discovers the layers the same way

        first, counted = None, 0
        if num_data is None:  # the counting pass loads every batch, never calls the model
            for k, batch in enumerate(self._bar(data, f"curvlib {kind}: counting samples")):
                pair = as_pair(batch, batch_fn)
                first = pair if first is None else first
                counted += _batch_size(pair, k)
        else:
            batch = next(iter(data), _EMPTY)
            first = None if batch is _EMPTY else as_pair(batch, batch_fn)
            if first is not None:
                _batch_size(first, 0)
        if first is None:
            raise ShapeError("data: expected at least one batch, got none")
        cap = capture_batch(model, self._loss_model, first, registry)
        self.layers: list[LayerBlock] = list(cap.layers)
        self.excluded: list[str] = list(cap.excluded)
        self._signature = _signature(self.layers)
        w = self.layers[0].adapter.params()[0]
        self._dtype, self._device = w.dtype, w.device
        self.num_samples = int(counted if num_data is None else num_data)
        self._checked = num_data is None  # a given num_data is checked at the end of the first pass

        source = generator if generator is not None else _seeded_from_global_rng()
        self._generator = torch.Generator(device=source.device)
        self._generator_state = source.get_state()
        self._generator.set_state(self._generator_state)

    # -- passes over the data ---------------------------------------------------------------
    def _pairs(self, what: str) -> Iterator[tuple[int, Any, int]]:
        """Each batch as ``(index, (inputs, targets), m_β)``, the ``fisher`` generator restored
        first; at the end, Σ m_β is checked against N."""
        self._generator.set_state(self._generator_state)
        seen, k = 0, -1
        for k, batch in enumerate(self._bar(self.data, f"curvlib {self.kind}: {what}")):
            pair = as_pair(batch, self._batch_fn)
            m = _batch_size(pair, k)
            seen += m
            yield k, pair, m
        if k < 0:
            raise ShapeError("data: expected at least one batch, got none (the data is empty now)")
        if seen != self.num_samples:
            if not self._checked:
                raise ShapeError(f"num_data = {self.num_samples}, but the batches of data hold {seen} samples")
            raise ShapeError(
                f"data held {self.num_samples} samples when the operator was built, this pass saw {seen} "
                "(the data changed between passes)"
            )
        self._checked = True

    def _operators(self, what: str) -> Iterator[tuple[Any, float]]:
        """The kind's operator of each batch with its weight m_β/N, one at a time."""
        N = self.num_samples
        for k, pair, m in self._pairs(what):
            with warnings.catch_warnings(), uncovered_parameters(self._uncovered):  # warnings: announced once
                warnings.simplefilter("ignore", ExcludedParametersWarning)
                warnings.simplefilter("ignore", BatchCouplingWarning)
                # curvlib's own kinds skip the probe and ∇L of batches after the first (verified at
                # construction, and products need neither); a plugin's kind builds its usual way
                extra = {"verify": False, "gradient": False} if isinstance(self._factory, BuiltinCurvature) else {}
                op = self._factory.build(self.model, self.loss_fn, pair, generator=self._generator,
                                         registry=self._registry, **extra)
            got = _signature(op.layers)
            if got != self._signature:
                raise ShapeError(
                    f"batch {k} calls the layer blocks {_names(op.layers)}, the first batch {_names(self.layers)}; "
                    "every batch must call the same layers"
                )
            yield op, m / N
            del op  # before the next batch is captured: one batch in memory

    def _accumulate(self, what: str, product: Callable[[Any], torch.Tensor]) -> torch.Tensor:
        """Σ_β (m_β/N) · product(C_β), one batch in memory at a time."""
        out = None
        for op, w in self._operators(what):
            r = product(op).detach()
            out = w * r if out is None else out.add_(r, alpha=w)
            del op, r
        assert out is not None  # _pairs raises on empty data
        return out

    # -- products ------------------------------------------------------------------------------
    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """V ``[p, k]`` -> C_data·V ``[p, k]`` (one pass)."""
        return self._accumulate("product", lambda op: op._matmat(V))

    def _block_matmat(self, i: int, j: int, V: torch.Tensor) -> torch.Tensor:
        """V ``[p_j, k]`` -> (C_data)_ij·V ``[p_i, k]`` (one pass)."""
        return self._accumulate(f"block ({i}, {j}) product", lambda op: op._block_matmat(i, j, V))

    def _dense_block(self, i: int, j: int) -> torch.Tensor:
        return self._accumulate(f"dense block ({i}, {j})", lambda op: op._dense_block(i, j))

    def block(self, i: int, j: int) -> CurvatureBlock:
        """The (i, j) layer block ``[p_i, p_j]`` as an operator (``matvec``, ``shape``,
        ``to_dense``); every product is a pass over the data."""
        n = len(self.layers)
        if not (-n <= i < n and -n <= j < n):
            raise IndexError(f"{type(self).__name__}.block: expected layer indices in [0, {n}), got ({i}, {j})")
        return CurvatureBlock(self, i % n, j % n)  # type: ignore[arg-type]

    def to_dense(self) -> torch.Tensor:
        """C_data as a dense ``[p, p]`` matrix (one pass; :class:`PerformanceWarning`)."""
        warn(
            f"{type(self).__name__}.to_dense() forms a dense {self.p} × {self.p} matrix",
            PerformanceWarning,
        )
        return self._accumulate("dense matrix", lambda op: op._dense())

    def statistics(self, i: int) -> Any:
        """Always raises: the per-sample statistics of every batch would hold the whole data set."""
        raise NoStatisticsError(
            f"{type(self).__name__} ({self.kind!r}) holds no per-layer statistics (they would hold every batch); "
            "for KFAC over the data use curvlib.curvatures.data.kfac_factors_over(F, weight_sharing), for one "
            "batch's statistics curvlib.curvature(..., batch=(X, y))"
        )

    # -- first order -----------------------------------------------------------------------------
    def loss_and_gradient(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, ∇_θ L ``[p]``) of the whole data set as one batch, with the user's reduction:
        Σ_β (m_β/N)·L_β for ``"mean"``, Σ_β L_β for ``"sum"`` (one pass, forward and
        backward per batch; the gradient in curvlib order)."""
        params = self.params()
        mean = self._loss_model.reduction == "mean"
        loss = torch.zeros((), dtype=self.dtype, device=self.device)
        grad = torch.zeros(self.p, dtype=self.dtype, device=self.device)
        for _, pair, m in self._pairs("gradient"):
            split = split_batch(pair)
            for t in split.tensors():
                if t.device != self.device:
                    raise DTypeDeviceError(f"batch tensor on {t.device}, the model's parameters are on {self.device}")
            with torch.enable_grad():
                output = split.call(self.model)
                if not isinstance(output, torch.Tensor):
                    raise UnsupportedLossError(f"expected the model to return one tensor, got {type(output).__name__}")
                self._loss_model.check(output, split.target)
                L = self._loss_model.loss_fn(output, split.target)
                grads = torch.autograd.grad(L, params, allow_unused=True)
            w = m / self.num_samples if mean else 1.0
            grad.add_(self.params_to_vector([torch.zeros_like(q) if g is None else g for q, g in zip(params, grads)]), alpha=w)
            loss.add_(L.detach(), alpha=w)
        return loss, grad

    def gradient_vector(self) -> torch.Tensor:
        """∇_θ L of the data set (see :meth:`loss_and_gradient`) in curvlib order ``[p]``: the
        mean gradient for ``reduction="mean"``, the summed one for ``"sum"``."""
        return self.loss_and_gradient()[1]

    def __repr__(self) -> str:
        names = ", ".join(L.name or L.kind for L in self.layers)
        return (
            f"{type(self).__name__}(kind={self.kind!r}, p={self.p}, N={self.num_samples}, layers=[{names}], "
            f"dtype={self.dtype})"
        )


def kfac_factors_over(
    F: DataCurvatureOperator | CurvatureOperator, weight_sharing: WeightSharing = "expand"
) -> list[list[Term]]:
    """The KFAC factors of every layer of ``F``, as :func:`~curvlib.curvatures.factors.kfac_factors`
    gives them for one batch: per layer, one term (A ``[d_a, d_a]``, G ``[d_g, d_g]``) per
    orientation group (two for a weight tied in transposed form).

    For a :class:`DataCurvatureOperator`, one pass over the data accumulating
    Σ_β (m_β/N) A_β and Σ_β (m_β/N) G_β — exactly the factors of one big batch holding all
    the data (module docstring); for a single-batch operator, ``kfac_factors`` of its
    statistics.

    Raises:
        ConfigError: ``weight_sharing`` is neither ``"expand"`` nor ``"reduce"``.
        NoStatisticsError: the kind has no statistics (``hessian``; raised by the first batch).
        ShapeError: batches give a layer a different number of terms or factor shapes.
    """
    if weight_sharing not in WEIGHT_SHARING:
        raise ConfigError(f"weight_sharing must be 'expand' or 'reduce', got {weight_sharing!r}")
    if not isinstance(F, DataCurvatureOperator):
        return [kfac_factors(F.statistics(i), weight_sharing) for i in range(len(F.layers))]
    acc: list[list[Term]] | None = None
    for k, (op, w) in enumerate(F._operators(f"KFAC factors ({weight_sharing})")):
        batch = [kfac_factors(op.statistics(i), weight_sharing) for i in range(len(op.layers))]
        del op
        if acc is None:
            acc = [[(w * A, w * G) for A, G in terms] for terms in batch]
            continue
        for i, (total, terms) in enumerate(zip(acc, batch)):
            if [(A.shape, G.shape) for A, G in total] != [(A.shape, G.shape) for A, G in terms]:
                raise ShapeError(
                    f"layer {F.layers[i].name!r}: batch {k} gives KFAC terms of shapes "
                    f"{[(tuple(A.shape), tuple(G.shape)) for A, G in terms]}, the first batch "
                    f"{[(tuple(A.shape), tuple(G.shape)) for A, G in total]}"
                )
            for A_acc, G_acc, (A, G) in zip((A for A, _ in total), (G for _, G in total), terms):
                A_acc.add_(A, alpha=w)
                G_acc.add_(G, alpha=w)
    assert acc is not None  # _pairs raises on empty data
    return acc


# --------------------------------------------------------------------------- helpers

_EMPTY = object()


def _check_data(data: Any) -> None:
    if data is None or isinstance(data, (torch.Tensor, str, bytes)):
        raise ConfigError(f"data: expected a re-iterable of batches (a DataLoader, a list), got {type(data).__name__}")
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        raise ConfigError("data: expected an iterable of batches, got one batch (X, y); pass it as batch=(X, y)")
    try:
        it = iter(data)
    except TypeError:
        raise ConfigError(f"data: expected an iterable of batches (a DataLoader, a list), got {type(data).__name__}") from None
    if it is data:
        raise ConfigError(
            f"data: expected a re-iterable of batches (a DataLoader, a list), got the one-shot iterator "
            f"{type(data).__name__}: every product iterates over the data again"
        )


def _batch_size(pair: tuple[Any, Any], k: int) -> int:
    m = split_batch(pair).num_samples
    if m is None or m < 1:
        raise ShapeError(
            f"batch {k}: expected at least one sample on axis 0 of its inputs (of its targets for keyword inputs), "
            f"got {m if m is not None else 'no tensor to count'}"
        )
    return m


def _signature(layers: list[LayerBlock]) -> list[tuple[Any, ...]]:
    return [(L.name, L.kind, L.a_dim, L.g_dim, L.slice.start, L.slice.stop, id(L.module)) for L in layers]


def _names(layers: list[LayerBlock]) -> list[str]:
    return [L.name for L in layers]


def _seeded_from_global_rng() -> torch.Generator:
    """A CPU generator seeded from torch's global RNG (reproducible under ``torch.manual_seed``)."""
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))


def _progress_bar(enabled: bool) -> Callable[[Iterable[Any], str], Iterable[Any]]:
    """``bar(iterable, description)``: the iterable itself, or wrapped in a transient tqdm
    (preferred) or rich progress bar; neither package is required — without both,
    ``progress=True`` warns once and shows nothing."""
    if not enabled:
        return lambda it, desc: it

    def total(it: Iterable[Any]) -> int | None:
        try:
            return len(it)  # type: ignore[arg-type]
        except TypeError:
            return None

    try:
        from tqdm.auto import tqdm
    except ImportError:
        pass
    else:
        return lambda it, desc: tqdm(it, desc=desc, total=total(it), leave=False, unit="batch")
    try:
        from rich.progress import track
    except ImportError:
        pass
    else:
        return lambda it, desc: track(it, description=desc, total=total(it), transient=True)
    warn(
        "progress=True shows a bar with tqdm or rich; neither is installed, so no progress is shown",
        UserWarning,
    )
    return lambda it, desc: it
