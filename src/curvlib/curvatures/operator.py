"""Curvature operators: exact matrix-free products with a p × p curvature matrix C.

The flat curvlib vector (DESIGN.md §1) is the concatenation over layers i of vec(W̄_i)
(``vec`` stacks columns); ``F.layers[i].slice`` gives layer i's rows.  It is *not* torch's
parameter order: :meth:`params_to_vector` / :meth:`vector_to_params` convert, through the
layer adapters (the only place that knows the mapping).

:class:`CurvatureOperator` (``fisher``, ``empirical_fisher``, ``ggn``) is built from
captured per-sample statistics and never re-runs the model.  With n = m·c the number of
(sample b, column j) pairs — ordered b-major, n = b·c + j — and

    J = [vec(DW̄_1) … vec(DW̄_n)] ∈ R^{p × n},   DW̄_{i,n} = Σ_t g_{i,n,t} ā_{i,b,t}ᵀ   (3.27),

the operator is C = scale · J Jᵀ (4.56)–(4.57), its blocks C_ij = scale · J_i J_jᵀ (4.75),
where J_i holds layer i's rows of J.  The products follow appendix 4.A/4.B:

- (J_iᵀ u)_n = Σ_t g_{n,t}ᵀ U ā_{b,t} with U = MAT(u_i) ``[g_dim, a_dim]`` (4.59), (4.62);
- MAT(J_i w) = Σ_{n,t} w_n g_{n,t} ā_{b,t}ᵀ (4.68), (4.71) — w_n multiplies all positions t
  of its own (sample, column) pair (the transposed-index trap of DESIGN.md §10);
- (J_iᵀ J_i)_{nn'} = Σ_{t,t'} (g_{n,t}ᵀ g_{n',t'})(ā_{b,t}ᵀ ā_{b',t'}) (4.78), (4.79);

summed over the uses of a layer whose weight is used several times (implemented once, in
:class:`~curvlib.curvatures.statistics.LayerStatistics`).

``J``/``Jt``/``JtJ`` exclude ``scale``.  Cost of one product C·v: two batched GEMM
passes over each layer's statistics, O(m·T·c·a_dim·g_dim) (c back-propagated columns, T
positions); memory O(m·T·g_dim·k) for k right-hand sides.  J or a p × p matrix is never
formed (``to_dense`` excepted).

:class:`HessianOperator` gives exact Hessian-vector products of (1/m)Σ_b ℓ_b by double
back-propagation, re-running the model once per product call.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvlib.capture.layout import LayerBlock, OnLayers
from curvlib.curvatures.statistics import LayerStatistics
from curvlib.linalg.operator import LinearOperator, ScaledOperator
from curvlib.errors import CurvlibError, ShapeError

__all__ = ["CurvatureBlock", "CurvatureOperator", "HessianOperator", "LayerBlock", "NoStatisticsError"]



class NoStatisticsError(CurvlibError, NotImplementedError):
    """The operator has no Kronecker statistics (e.g. the Hessian, available through products only)."""


def _vec_batch(M: torch.Tensor) -> torch.Tensor:
    """k matrices ``[k, g, a]`` -> their vec's as columns ``[a·g, k]``."""
    return M.transpose(1, 2).reshape(M.shape[0], -1).T


def _matT_batch(U: torch.Tensor, g_dim: int, a_dim: int) -> torch.Tensor:
    """Columns ``[a·g, k]`` -> MAT(u)ᵀ for each column ``[k, a, g]``."""
    return U.T.reshape(U.shape[1], a_dim, g_dim)


class CurvatureBlock(LinearOperator):
    """The (i, j) block C_ij ``[p_i, p_j]`` of a curvature operator, as an operator."""

    def __init__(self, parent: _BlockOperator, i: int, j: int) -> None:
        self.parent, self.i, self.j = parent, i, j

    @property
    def shape(self) -> tuple[int, int]:
        return (self.parent.layers[self.i].p_i, self.parent.layers[self.j].p_i)

    @property
    def dtype(self) -> torch.dtype:
        return self.parent.dtype

    @property
    def device(self) -> torch.device:
        return self.parent.device

    @property
    def symmetric(self) -> bool:  # type: ignore[override]
        return self.i == self.j

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.parent._block_matmat(self.i, self.j, V)

    def _rmatmat(self, U: torch.Tensor) -> torch.Tensor:
        return self.parent._block_matmat(self.j, self.i, U)  # C_ijᵀ = C_ji

    def to_dense(self) -> torch.Tensor:
        """C_ij as a dense ``[p_i, p_j]`` matrix."""
        return self.parent._dense_block(self.i, self.j)

    def __repr__(self) -> str:
        return f"CurvatureBlock({self.parent.layers[self.i].name!r}, {self.parent.layers[self.j].name!r}, shape={self.shape})"


class PerSampleMean(LinearOperator):
    """An operator that is the per-sample mean (1/m) Σ_b C_b of ``num_samples`` = m
    per-sample curvatures (subclasses set ``num_samples``)."""

    num_samples: int

    def total(self) -> LinearOperator:
        """Σ_b C_b = m·C, the curvature of the sum-reduced loss (lazy)."""
        return ScaledOperator(self, float(self.num_samples))


class _BlockOperator(OnLayers, PerSampleMean):
    """Shared interface: shapes, vector <-> parameter conversions, products, blocks, exports.

    Attributes:
        layers: the :class:`LayerBlock` s, in flat-vector order.
        excluded: qualified names of trainable parameters left out (see
            :func:`curvlib.capture.adapters.find_layers`).
        dtype, device: of the model's adapted parameters; every vector must match.
        num_samples: m, the batch size.
        loss: the batch loss L as the user's loss module computes it (detached scalar).
    """

    kind: str = ""
    symmetric = True
    dense_warning_size = 0  # a curvature matrix is p × p: forming it always deserves the warning

    def __init__(
        self,
        layers: Sequence[LayerBlock],
        excluded: Sequence[str],
        *,
        num_samples: int,
        loss: torch.Tensor,
        gradient: Sequence[torch.Tensor] | None,
    ) -> None:
        self.layers: list[LayerBlock] = list(layers)
        self.excluded: list[str] = list(excluded)
        w = self.layers[0].adapter.params()[0]
        self._dtype: torch.dtype = w.dtype
        self._device: torch.device = w.device
        self.num_samples = int(num_samples)
        self.loss = loss
        self._gradient = None if gradient is None else list(gradient)

    @property
    def gradient_blocks(self) -> list[torch.Tensor] | None:
        """∇_{W̄_i} L of each layer, ``[g_dim, a_dim]``, or ``None`` when captured for products only."""
        return None if self._gradient is None else list(self._gradient)

    def gradient_vector(self) -> torch.Tensor:
        """∇_θ L of the captured batch (the user's loss and reduction) in curvlib order ``[p]``."""
        if self._gradient is None:
            raise NoStatisticsError(f"{type(self).__name__}: captured for products only, without the loss gradient")
        return torch.cat([G.T.reshape(-1) for G in self._gradient])

    def _as_columns(self, v: torch.Tensor, n: int, what: str) -> tuple[torch.Tensor, bool]:
        """Check dtype/device/shape of a tensor: ``[n]`` or ``[n, k]`` -> (``[n, k]``, was-a-vector)."""
        caller = f"{type(self).__name__}.{what}"
        if not isinstance(v, torch.Tensor):
            raise ShapeError(f"{caller}: expected a tensor, got {type(v).__name__}")
        X, form = self._normalise(v, n, caller)
        return X, form == "vector"

    # -- products ----------------------------------------------------------------------
    def block(self, i: int, j: int) -> CurvatureBlock:
        """The (i, j) layer block C_ij ``[p_i, p_j]`` as an operator (``matvec``, ``shape``, ``to_dense``)."""
        n = len(self.layers)
        if not (-n <= i < n and -n <= j < n):
            raise IndexError(f"{type(self).__name__}.block: expected layer indices in [0, {n}), got ({i}, {j})")
        return CurvatureBlock(self, i % n, j % n)

    @abc.abstractmethod
    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """V ``[p, k]`` -> C·V ``[p, k]``."""

    def _block_matmat(self, i: int, j: int, V: torch.Tensor) -> torch.Tensor:
        """V ``[p_j, k]`` -> C_ij·V ``[p_i, k]`` (default: a full product of the padded vector)."""
        full = V.new_zeros(self.p, V.shape[1])
        full[self.layers[j].slice] = V
        return self._matmat(full)[self.layers[i].slice]

    def _dense_block(self, i: int, j: int) -> torch.Tensor:
        pj = self.layers[j].p_i
        return self._block_matmat(i, j, torch.eye(pj, dtype=self.dtype, device=self.device))

    def _dense(self) -> torch.Tensor:
        return self._matmat(torch.eye(self.p, dtype=self.dtype, device=self.device))

    def statistics(self, i: int) -> LayerStatistics:
        """:class:`LayerStatistics` of layer i."""
        raise NoStatisticsError(f"{type(self).__name__} ({self.kind!r}) has no per-layer statistics")

    def __repr__(self) -> str:
        names = ", ".join(L.name or L.kind for L in self.layers)
        return f"{type(self).__name__}(kind={self.kind!r}, p={self.p}, m={self.num_samples}, layers=[{names}], dtype={self.dtype})"


class CurvatureOperator(_BlockOperator):
    """C = scale · J Jᵀ from captured per-sample statistics (``fisher``, ``empirical_fisher``, ``ggn``).

    Layer i's part of J, its products and its Gram matrix are those of its
    :class:`~curvlib.curvatures.statistics.LayerStatistics` (the one implementation of
    J_i, J_iᵀ, J_iᵀJ_i for every layer type, weight-sharing geometry and number of uses).

    Attributes (beyond the shared ones: ``layers``, ``excluded``, ``shape``, ``dtype``,
    ``device``, ``num_samples``, ``loss``):
        kind: the curvature kind.
        scale: 1/(m·S) for ``fisher`` with S samples, 1/m otherwise.
        num_columns: c, the back-propagated columns per sample.
        num_pairs: n = m·c, the columns of J.
        sampled_targets: the targets drawn for ``fisher`` (CE ``[m, S, *d]`` class indices,
            otherwise ``[m, S, *out]``); ``None`` for the other kinds.
    """

    def __init__(
        self,
        layers: Sequence[LayerBlock],
        excluded: Sequence[str],
        statistics: Sequence[LayerStatistics],
        *,
        kind: str,
        loss: torch.Tensor,
        gradient: Sequence[torch.Tensor] | None,
        sampled_targets: torch.Tensor | None = None,
    ) -> None:
        stats = list(statistics)
        if len(stats) != len(layers) or not stats:
            raise ShapeError(f"CurvatureOperator: expected one LayerStatistics per layer ({len(layers)}), got {len(stats)}")
        m, c, scale = stats[0].m, stats[0].c, stats[0].scale
        super().__init__(layers, excluded, num_samples=m, loss=loss, gradient=gradient)
        self.kind = kind
        self.scale = float(scale)
        self.sampled_targets = sampled_targets
        for L, st in zip(self.layers, stats):
            if (st.a_dim, st.g_dim) != (L.a_dim, L.g_dim) or (st.m, st.c) != (m, c) or st.scale != self.scale:
                raise ShapeError(
                    f"layer {L.name!r}: statistics with (d_a, d_g) = {(st.a_dim, st.g_dim)}, (m, c) = {(st.m, st.c)}, "
                    f"scale {st.scale} do not match a_dim={L.a_dim}, g_dim={L.g_dim}, (m, c) = {(m, c)}, scale {self.scale}"
                )
        self._stats = stats
        self.num_columns = int(c)
        self.num_pairs = m * self.num_columns

    def statistics(self, i: int) -> LayerStatistics:
        """Per-sample statistics of layer i (see :class:`LayerStatistics`); the block is
        C_ii = scale · J_i J_iᵀ (3.18), (3.28)."""
        return self._stats[i]

    # -- Jacobian pieces (appendix 4.A.2, 4.B) -------------------------------------------
    def _Jt_i(self, i: int, U: torch.Tensor) -> torch.Tensor:
        """U ``[p_i, k]`` -> J_iᵀ U ``[n, k]`` (4.62)."""
        return self._stats[i].jt(U)

    def _J_i(self, i: int, W: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """W ``[n, k]`` -> J_i W ``[p_i, k]`` (written into ``out`` if given) (4.71)."""
        return self._stats[i].j(W, out=out)

    def Jt_i(self, i: int, u: torch.Tensor) -> torch.Tensor:
        """J_iᵀ u: ``[p_i]`` -> ``[n]`` or ``[p_i, k]`` -> ``[n, k]`` (no ``scale``)."""
        U, squeeze = self._as_columns(u, self.layers[i].p_i, f"Jt_i({i})")
        out = self._Jt_i(i, U)
        return out.squeeze(1) if squeeze else out

    def J_i(self, i: int, w: torch.Tensor) -> torch.Tensor:
        """J_i w: ``[n]`` -> ``[p_i]`` or ``[n, k]`` -> ``[p_i, k]`` (no ``scale``)."""
        W, squeeze = self._as_columns(w, self.num_pairs, f"J_i({i})")
        out = self._J_i(i, W)
        return out.squeeze(1) if squeeze else out

    def Jt(self, u: torch.Tensor) -> torch.Tensor:
        """Jᵀ u = Σ_i J_iᵀ u_[i]: ``[p]`` -> ``[n]`` or ``[p, k]`` -> ``[n, k]`` (4.58)."""
        U, squeeze = self._as_columns(u, self.p, "Jt")
        out = self._Jt(U)
        return out.squeeze(1) if squeeze else out

    def J(self, w: torch.Tensor) -> torch.Tensor:
        """J w = Σ_n w_n vec(DW̄_n): ``[n]`` -> ``[p]`` or ``[n, k]`` -> ``[p, k]`` (4.65)."""
        W, squeeze = self._as_columns(w, self.num_pairs, "J")
        out = self._J(W)
        return out.squeeze(1) if squeeze else out

    def _Jt(self, U: torch.Tensor) -> torch.Tensor:
        out = None
        for i, L in enumerate(self.layers):
            t = self._Jt_i(i, U[L.slice])
            out = t if out is None else out + t
        return out

    def _J(self, W: torch.Tensor) -> torch.Tensor:
        out = W.new_empty(self.p, W.shape[1])
        parts = [self._J_i(i, W, out[L.slice]) for i, L in enumerate(self.layers)]
        return out if not W.requires_grad else torch.cat(parts, dim=0)

    def JtJ_i(self, i: int) -> torch.Tensor:
        """J_iᵀ J_i ``[n, n]`` (4.78)/(4.79), without forming J_i for one use without positions."""
        return self._stats[i].gram()

    def JtJ(self) -> torch.Tensor:
        """Jᵀ J = Σ_i J_iᵀ J_i ``[n, n]`` (4.78)/(4.79); C's nonzero spectrum is scale × its spectrum."""
        out = self.JtJ_i(0)
        for i in range(1, len(self.layers)):
            out = out + self.JtJ_i(i)
        return out

    # -- products ----------------------------------------------------------------------
    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        # scale the small [n, k] intermediate, not the [p, k] result
        return self._J(self.scale * self._Jt(V))

    def _block_matmat(self, i: int, j: int, V: torch.Tensor) -> torch.Tensor:
        return self._J_i(i, self.scale * self._Jt_i(j, V))

    def _dw_rows(self, i: int, b0: int, b1: int) -> torch.Tensor:
        """vec(DW̄_{i,n})ᵀ for the pairs n of samples b0..b1−1: ``[(b1−b0)·c, p_i]`` (dense export only)."""
        return self._stats[i].pair_vectors(b0, b1)

    def _sample_chunks(self, width: int) -> list[tuple[int, int]]:
        """Sample ranges whose ``[chunk·c, width]`` row blocks hold at most ~4M entries."""
        step = max(1, (1 << 22) // max(1, self.num_columns * width))
        return [(b, min(b + step, self.num_samples)) for b in range(0, self.num_samples, step)]

    def _dense_block(self, i: int, j: int) -> torch.Tensor:
        out = torch.zeros(self.layers[i].p_i, self.layers[j].p_i, dtype=self.dtype, device=self.device)
        for b0, b1 in self._sample_chunks(self.layers[i].p_i + self.layers[j].p_i):
            out += self._dw_rows(i, b0, b1).T @ self._dw_rows(j, b0, b1)
        return self.scale * out

    def _dense(self) -> torch.Tensor:
        out = torch.zeros(self.p, self.p, dtype=self.dtype, device=self.device)
        for b0, b1 in self._sample_chunks(self.p):
            rows = torch.cat([self._dw_rows(i, b0, b1) for i in range(len(self.layers))], dim=1)  # [n_chunk, p]
            out += rows.T @ rows
        return self.scale * out


class HessianOperator(_BlockOperator):
    """Exact Hessian of (1/m) Σ_b ℓ_b (= L for reduction "mean", L/m for "sum") with respect
    to the adapted parameters (excluded ones held fixed), by double back-propagation.

    Each product call re-runs the forward pass on the stored batch (so a model with dropout
    should be in eval mode, and BatchNorm in training mode updates its running statistics
    each call), with scaled-dot-product attention on its math kernel (the fused CPU/GPU
    kernels have no double backward); the k columns of a ``[p, k]`` input share that
    forward pass.  There are no
    Kronecker statistics: :meth:`statistics` raises :class:`NoStatisticsError`.
    """

    kind = "hessian"

    def __init__(
        self,
        layers: Sequence[LayerBlock],
        excluded: Sequence[str],
        *,
        model: torch.nn.Module,
        loss_model: Any,
        inputs: tuple[torch.Tensor, ...],
        target: torch.Tensor,
        num_samples: int,
        loss: torch.Tensor,
        gradient: Sequence[torch.Tensor] | None,
        input_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(layers, excluded, num_samples=num_samples, loss=loss, gradient=gradient)
        self.model = model
        self.loss_model = loss_model
        self._inputs = inputs
        self._input_kwargs = dict(input_kwargs or {})  # model(*inputs, **input_kwargs)
        self._target = target

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        params = self.params()
        out = torch.empty_like(V)
        # fused attention kernels have no double backward: the math kernel computes the same function
        with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
            L = self.loss_model.mean_loss(self.model(*self._inputs, **self._input_kwargs), self._target)
            grads = torch.autograd.grad(L, params, create_graph=True, allow_unused=True)
            live = [(gr, p) for gr, p in zip(grads, params) if gr is not None and gr.requires_grad]
            for j in range(V.shape[1]):
                vs = self.vector_to_params(V[:, j])
                vmap = {id(p): v for p, v in zip(params, vs)}
                hv = torch.autograd.grad(
                    [gr for gr, _ in live],
                    params,
                    grad_outputs=[vmap[id(p)] for _, p in live],
                    retain_graph=j + 1 < V.shape[1],
                    allow_unused=True,
                ) if live else [None] * len(params)
                out[:, j] = self.params_to_vector([torch.zeros_like(p) if h is None else h for h, p in zip(hv, params)])
        return out.detach()

    def _no_jacobian(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NoStatisticsError(
            "HessianOperator has no per-sample Jacobian factorization (the Hessian is not of the form "
            "scale·J Jᵀ); use the 'ggn' or 'fisher' kinds for J/Jt/JtJ"
        )

    J = Jt = JtJ = J_i = Jt_i = JtJ_i = _no_jacobian
