"""The layer-adapter interface: the one place where a module's parameters meet the layer matrix W̄.

DESIGN.md §1.  A layer block has a matrix W̄ ``[g_dim, a_dim]`` built from (slices of) the
module's trainable parameters, and its curvlib parameter vector is vec(W̄) = W̄ᵀ.reshape(-1)
(``vec`` stacks columns, Def. 3.2).  Each call of the module is one or more **uses**
(:class:`UseCapture`): activation rows ā ``[m, T, a_dim]`` at the T positions of a
:class:`~curvlib.linalg.geometry.Geometry`, the output tensors whose gradients define the
back-propagated columns, and how to turn those gradients into g ``[m, T, g_dim]``; the
per-sample gradient of one call is Σ_t g_t ā_tᵀ (3.27).

A new layer type is one :class:`LayerAdapter` subclass (a file of
:mod:`curvlib.capture.adapters`, or a third-party plugin) plus its registration through
``curvlib_register_layers`` (``registry.add(kind, AdapterClass, module_types=(...,))``).
It implements

* :meth:`LayerAdapter.params`, :attr:`~LayerAdapter.a_dim`, :attr:`~LayerAdapter.g_dim`,
  :meth:`~LayerAdapter.params_to_matrix`, :meth:`~LayerAdapter.matrix_to_params` (the
  weight ↔ W̄ mapping, optionally over row slices of the parameters — one block per group
  of a grouped convolution), and
* :meth:`LayerAdapter.capture` — from one call's ``(args, kwargs, output)`` to its uses —
  or, for a module whose weights bypass a plain forward call (``nn.MultiheadAttention``),
  ``capture_via = "forward"`` and :meth:`LayerAdapter.forward_with_capture`, a forward that
  computes the same function and reports its uses.

Everything else — discovery, tied parameters, modules called several times, the flat
vector, the statistics — is shared (:mod:`curvlib.capture.layout`, :mod:`curvlib.capture.hooks`).

The batch axis.  Statistics are per sample; ``batch_dim`` says which axis of the module's
input and output holds the samples (0 by default, 1 inside torch's transformer layers built
with ``batch_first=False``).  The remaining leading axes of a Linear-like input are
positions (tokens, patches).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from curvlib.errors import ShapeError, UnsupportedLayerError
from curvlib.linalg.geometry import Geometry
from curvlib.linalg.rows import Rows

__all__ = [
    "BatchCouplingWarning",
    "ExcludedParametersWarning",
    "LayerAdapter",
    "UseCapture",
    "append_one",
    "pair",
]


class ExcludedParametersWarning(UserWarning):
    """Trainable parameters were left out of the curvature (no adapter, unsupported
    configuration, never called, …).

    The message lists each excluded parameter by its qualified name and the reason; the
    names are also recorded in the operator's ``excluded`` attribute.
    """


class BatchCouplingWarning(UserWarning):
    """A module couples the samples of a batch (BatchNorm in training mode), so per-sample
    gradients, and hence the Fisher/GGN statistics, are not those of independent samples."""


def pair(x: int | Sequence[int], n: int = 2) -> tuple[int, ...]:
    """An int or a sequence as an n-tuple."""
    if isinstance(x, int):
        return (x,) * n
    t = tuple(int(v) for v in x)
    return t * n if len(t) == 1 else t


def append_one(a: torch.Tensor) -> torch.Tensor:
    """a ``[..., d]`` -> [a, 1] ``[..., d + 1]``."""
    return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)


@dataclass
class UseCapture:
    """One use of an adapter's weight in one forward call.

    Attributes:
        rows: activation rows ā ``[m, T, a_dim]``.
        outputs: tensors in the autograd graph whose gradients define the columns.
        geometry: the T positions.
        columns: the gradients of ``outputs`` for one back-propagated column (zeros where
            a gradient does not reach) -> g ``[m, T, g_dim]``.
        batch_dim: the axis of each output that holds the samples.
    """

    rows: Rows
    outputs: tuple[torch.Tensor, ...]
    geometry: Geometry
    columns: Callable[[Sequence[torch.Tensor]], torch.Tensor]
    batch_dim: int = 0


class LayerAdapter(abc.ABC):
    """Maps one module to a layer matrix W̄ ``[g_dim, a_dim]`` and captures its uses.

    An adapter is created for one module (by the registry's ``layers`` family through
    :meth:`create`, see :func:`curvlib.capture.layout.find_layers`) and lives as long as
    the curvature operator built from it.

    Attributes:
        module: the adapted module.
        name: its qualified name in the model (``""`` if unknown).
        batch_dim: the axis of the module's input/output that holds the samples.
    """

    #: module types this adapter handles (also registered as plugin metadata)
    module_types: ClassVar[tuple[type[nn.Module], ...]] = ()
    #: ``"hook"``: a forward hook passes each call to :meth:`capture`; ``"forward"``: the
    #: module's forward is replaced during capture by :meth:`forward_with_capture`
    capture_via: ClassVar[Literal["hook", "forward"]] = "hook"

    def __init__(self, module: nn.Module, *, name: str = "", batch_dim: int = 0) -> None:
        self.module = module
        self.name = name
        self.batch_dim = int(batch_dim)
        self._check_module()

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def create(cls, module: nn.Module, *, name: str = "", batch_dim: int = 0) -> list[LayerAdapter]:
        """The adapters of ``module``: one block, several (one per group of a grouped
        convolution), or none (no trainable parameter to adapt).

        Raises:
            UnsupportedLayerError: a configuration the adapter cannot map (the module's
                parameters are then excluded with this reason).
        """
        return [cls(module, name=name, batch_dim=batch_dim)] if cls._trainable(module) else []

    @classmethod
    def excluded_parameters(cls, module: nn.Module, *, name: str = "") -> dict[str, str]:
        """``{parameter name in the module: reason}`` for trainable parameters of ``module``
        that :meth:`create`'s adapters leave out (e.g. the bias of a layer whose weight is
        frozen)."""
        return {}

    @classmethod
    def _trainable(cls, module: nn.Module) -> bool:
        w = getattr(module, "weight", None)
        return isinstance(w, torch.Tensor) and w.requires_grad

    # -- description -------------------------------------------------------------------------
    @property
    def block_name(self) -> str:
        """The name of the layer block (the module's name; a suffix for sub-blocks)."""
        return self.name

    def _label(self) -> str:
        return f"{type(self.module).__name__} layer {self.name!r}" if self.name else type(self.module).__name__

    def _check_module(self) -> None:
        """Raise :class:`UnsupportedLayerError` for configurations the adapter cannot map."""
        if not self.params():
            raise UnsupportedLayerError(f"{self._label()}: no trainable parameter to adapt")

    @property
    def has_bias(self) -> bool:
        """Whether W̄'s last column is a bias (ā carries a trailing 1)."""
        return False

    @property
    @abc.abstractmethod
    def a_dim(self) -> int:
        """Columns of W̄."""

    @property
    @abc.abstractmethod
    def g_dim(self) -> int:
        """Rows of W̄."""

    @property
    def num_params(self) -> int:
        """p_i = a_dim · g_dim."""
        return self.a_dim * self.g_dim

    @property
    def spatial_shape(self) -> tuple[int, ...] | None:
        """The output position grid of the last captured call (convolutions), else ``None``."""
        return getattr(self, "_spatial_shape", None)

    @property
    def kernel_size(self) -> tuple[int, ...] | None:
        """The kernel size of a convolution, else ``None``."""
        return None

    # -- parameters <-> W̄ ----------------------------------------------------------------------
    @abc.abstractmethod
    def params(self) -> list[torch.Tensor]:
        """The (full) parameter tensors W̄ is built from, in order."""

    def param_slices(self) -> list[slice | None]:
        """The rows (along dim 0) of each of :meth:`params` that belong to this block; ``None``: all."""
        return [None] * len(self.params())

    def pieces(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Tensors shaped like :meth:`params` -> this block's slices of them."""
        return [t if s is None else t[s] for t, s in zip(tensors, self.param_slices())]

    def piece_shapes(self) -> list[torch.Size]:
        return [p.shape for p in self.pieces(self.params())]

    @abc.abstractmethod
    def _to_matrix(self, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
        """Pieces (the block's slices, checked) -> W̄ ``[g_dim, a_dim]``."""

    @abc.abstractmethod
    def _from_matrix(self, Wbar: torch.Tensor) -> list[torch.Tensor]:
        """W̄ ``[g_dim, a_dim]`` -> pieces shaped like :meth:`piece_shapes`."""

    def params_to_matrix(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Tensors shaped like the block's pieces (:meth:`piece_shapes`) -> W̄ ``[g_dim, a_dim]``."""
        expected = self.piece_shapes()
        got = [tuple(t.shape) for t in tensors]
        if len(tensors) != len(expected) or any(tuple(e) != g for e, g in zip(expected, got)):
            raise ShapeError(
                f"{self._label()}: expected tensors of shapes {[list(e) for e in expected]}, got {[list(g) for g in got]}"
            )
        return self._to_matrix(tensors)

    def matrix_to_params(self, Wbar: torch.Tensor) -> list[torch.Tensor]:
        """W̄ ``[g_dim, a_dim]`` -> tensors shaped like the block's pieces."""
        if tuple(Wbar.shape) != (self.g_dim, self.a_dim):
            raise ShapeError(f"{self._label()}: expected W̄ of shape [{self.g_dim}, {self.a_dim}], got {list(Wbar.shape)}")
        return self._from_matrix(Wbar)

    def to_matrix(self) -> torch.Tensor:
        """The current W̄ ``[g_dim, a_dim]``."""
        return self.params_to_matrix([p.detach() for p in self.pieces(self.params())])

    def params_to_vector(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Tensors shaped like the block's pieces -> vec(W̄) ``[p_i]`` (columns stacked)."""
        return self.params_to_matrix(tensors).T.reshape(-1)

    def vector_to_params(self, v: torch.Tensor) -> list[torch.Tensor]:
        """vec(W̄) ``[p_i]`` -> tensors shaped like the block's pieces."""
        if v.shape != (self.num_params,):
            raise ShapeError(f"{self._label()}: expected a vector [{self.num_params}], got {list(v.shape)}")
        return self.matrix_to_params(v.reshape(self.a_dim, self.g_dim).T)

    # -- capture -------------------------------------------------------------------------------
    def capture(self, args: tuple, kwargs: dict[str, Any], output: Any) -> list[UseCapture]:
        """The uses of one call, from the forward hook's ``(args, kwargs, output)``."""
        raise NotImplementedError(f"{type(self).__name__} captures through {self.capture_via!r}")

    def forward_with_capture(self, report: Callable[[list[UseCapture]], None], *args: Any, **kwargs: Any) -> Any:
        """The module's forward, computing the same function, calling ``report(uses)``
        (``capture_via = "forward"`` only)."""
        raise NotImplementedError(f"{type(self).__name__} captures through {self.capture_via!r}")

    def _batch_first(self, x: torch.Tensor, what: str = "input") -> torch.Tensor:
        """``x`` with the batch axis moved to the front (``x.ndim ≥ 1 + batch_dim``)."""
        if x.ndim <= self.batch_dim:
            raise ShapeError(f"{self._label()}: expected a batched {what} with the samples on axis {self.batch_dim}, "
                             f"got {list(x.shape)}")
        return x if self.batch_dim == 0 else x.movedim(self.batch_dim, 0)

    @staticmethod
    def _positions(x: torch.Tensor, features: int) -> tuple[int, tuple[int, ...]]:
        """For ``x [m, *pos, *features]`` (batch first), ``(T, pos)``."""
        pos = tuple(x.shape[1 : x.ndim - features])
        return math.prod(pos), pos
