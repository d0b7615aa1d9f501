"""``curvlib.approximate``: one Kronecker sum per layer block of a curvature operator, and
``curvlib.approximation_error``: how far each is from the exact block (§3.3.1).

Example::

    F = curvlib.curvature("fisher", model, loss_fn, (X, y), generator=g)
    approx = curvlib.approximate(F, "deflation", power_tol=1e-6, max_iters=50)
    approx[i].terms            # ((A_1, B_1), (A_2, B_2)): A [d_in+1, d_in+1], B [d_out, d_out]
    approx @ v                 # block-diagonal product, v [p] or [p, k]
    approx.to_dense()          # [p, p]
    curvlib.approximation_error(F, approx)   # per layer: Error 1 and Error 2 of §3.3.1

    # next batch: EMA and warm starts continue from the previous approximation
    approx = curvlib.approximate(F_next, "deflation", previous=approx, ema=0.95)

:func:`approximate` is where curvlib receives every approximator's result, and the
statistics it was fitted from: both are checked there, for the built-in kinds as for a
plugin's (:mod:`curvlib.approximators.base`, "What curvlib checks"), and a failure raises
:class:`~curvlib.errors.PluginOutputError` naming the kind, its distribution and the layer.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel

from curvlib.approximators.base import (
    PSD_RTOL,
    BlockApproximator,
    FactorFitted,
    LayerFit,
    fit_structure_problem,
    fit_value_flags,
    fit_value_problem,
    fitting_layer,
    single_term_definite_flag,
)
from curvlib.approximators.exact import ExactBlock, pair_gram
from curvlib.approximators.svd_based import z_operator
from curvlib.curvatures.data import DataCurvatureOperator, kfac_factors_over
from curvlib.curvatures.statistics import LayerStatistics
from curvlib.errors import ConfigError, NumericalWarning, ShapeError, warn
from curvlib.linalg import (
    BlockDiagonalOperator,
    KroneckerFactored,
    KroneckerSum,
    LayerBlockOperator,
    VectorLayout,
    host_values,
    vec,
)
from curvlib.plugins import load_registry
from curvlib.plugins.hookspecs import CheckedApproximation, KindOrigin

__all__ = ["ApproximationError", "BlockDiagonalApproximation", "approximate", "approximation_error"]

class BlockDiagonalApproximation(BlockDiagonalOperator, CheckedApproximation):
    """diag(F̂_11, …, F̂_ℓℓ): one fitted block per layer of a curvature operator (3.20).

    A :class:`~curvlib.linalg.BlockDiagonalOperator`: ``approx @ v`` for ``v [p]``, ``[p, k]``
    or a list shaped like the operator's parameters, the operator algebra, ``to_dense``.
    Indexed by the layer's index in the operator (``F.layers``), so ``approx[i]`` is the
    :class:`~curvlib.approximators.base.LayerFit` of layer i.  When only some layers were
    fitted (``approximate(..., layers=[...])``), the others act as zero blocks.

    Attributes:
        kind: the approximator kind.
        layer_indices: the fitted layers' indices in ``F.layers``, ascending.
        names: their module names.
        slices: their rows in the flat curvlib vector ``[p]``.
        p: the size of the flat vector (all layers of the operator).
        origin: the :class:`~curvlib.plugins.hookspecs.KindOrigin` of the approximator kind
            (its distribution and plugin), ``None`` when not made through a registry.
        psd_factors: the kind declares PSD factors by construction
            (:class:`~curvlib.plugins.hookspecs.BlockDeclaration`); :meth:`check_before_inversion`
            has nothing to check then.

    A :class:`~curvlib.plugins.hookspecs.CheckedApproximation`: :func:`curvlib.damped_inverse`
    names its layers and its kind in messages and calls :meth:`check_before_inversion` first.
    """

    def __init__(
        self,
        kind: str,
        fits: Mapping[int, LayerFit],
        names: Mapping[int, str],
        slices: Mapping[int, slice],
        p: int,
        *,
        layout: VectorLayout | None = None,
        origin: KindOrigin | None = None,
        psd_factors: bool = False,
    ) -> None:
        if not fits:
            raise ShapeError("BlockDiagonalApproximation: expected at least one layer fit, got none")
        self.kind = kind
        self._origin = origin
        self.psd_factors = bool(psd_factors)
        self._checked_definite = self.psd_factors  # PSD by construction: nothing to check
        self.layer_indices: tuple[int, ...] = tuple(sorted(fits))
        self._fits = {i: fits[i] for i in self.layer_indices}
        self.names: tuple[str, ...] = tuple(names[i] for i in self.layer_indices)
        super().__init__([self._fits[i].block for i in self.layer_indices], [slices[i] for i in self.layer_indices],
                         p=p, layout=layout)

    # -- provenance and the check deferred to the inversion ---------------------------------
    @property
    def origin(self) -> KindOrigin | None:
        return self._origin

    @property
    def layer_names(self) -> tuple[str, ...]:
        return self.names

    def check_before_inversion(self) -> None:
        """Warn about single-term blocks A ⊗ B that are indefinite: with s = sign tr A, s·A or
        s·B has an eigenvalue below −:data:`~curvlib.approximators.base.PSD_RTOL`·‖·‖_F
        (:func:`~curvlib.approximators.base.single_term_definite_flag`, a Cholesky factorization
        of each factor, O(d³) — so it runs here, once per approximation and before its first
        inversion, where the factors are decomposed anyway, not at every refresh; one host
        synchronisation for all layers).  A block of the wrong sign was refused by
        :func:`approximate` already; an indefinite one with the right sign is inverted by the
        damping's documented rule for it (``tikhonov``: negative joint eigenvalues count as 0;
        ``heuristic``: the factors' negative eigenvalues are clamped at 0), with a
        :class:`~curvlib.errors.NumericalWarning` naming the kind, its distribution and the
        layers (docs/plugin_guide.md §7).
        """
        if self._checked_definite:
            return
        self._checked_definite = True
        flags = [(i, f) for i, fit in enumerate(self.fits) if (f := single_term_definite_flag(fit.block)) is not None]
        if not flags:
            return
        ok = host_values([f for _, f in flags])
        bad = [self.names[i] for (i, _), good in zip(flags, ok) if not good]
        if bad:
            origin = self._origin or KindOrigin("approximators", self.kind)
            # the text names no numbers, so Python's default filter shows it once per kind and layers
            warn(
                f"{origin} returned indefinite single-term blocks A ⊗ B for layers {bad} (a factor, sign-normalized by "
                f"tr A, has eigenvalues below −{PSD_RTOL:g}·‖·‖_F; an approximation of a PSD curvature block should be "
                "PSD): each is inverted by the damping's rule for indefinite blocks (tikhonov: negative joint "
                "eigenvalues count as 0; heuristic: the factors' negative eigenvalues are clamped at 0)",
                NumericalWarning,
            )

    # -- container ---------------------------------------------------------------------
    def __getitem__(self, i: int) -> LayerFit:
        try:
            return self._fits[i]
        except (KeyError, TypeError):
            raise IndexError(f"no fit for layer {i!r}; fitted layers: {list(self.layer_indices)}") from None

    def __len__(self) -> int:
        return len(self._fits)

    def __iter__(self) -> Iterator[LayerFit]:
        return iter(self.fits)

    def __contains__(self, i: object) -> bool:
        return i in self._fits

    @property
    def fits(self) -> list[LayerFit]:
        """The :class:`LayerFit` of each fitted layer, in ``layer_indices`` order."""
        return [self._fits[i] for i in self.layer_indices]

    def __repr__(self) -> str:
        return f"BlockDiagonalApproximation(kind={self.kind!r}, layers={list(self.layer_indices)}, p={self.p}, dtype={self.dtype})"

    def state_dict(self) -> dict[str, Any]:
        """Plain containers (``torch.load(weights_only=True)`` compatible); see :meth:`from_state_dict`."""
        return self._state(LayerFit.state_dict)

    def _state(self, fit_state: Callable[[LayerFit], Any]) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "p": self.p,
            "origin": None if self._origin is None else self._origin.state_dict(),
            "psd_factors": self.psd_factors,
            "layers": [
                {"index": i, "name": n, "start": sl.start, "stop": sl.stop, "fit": fit_state(self._fits[i])}
                for i, n, sl in zip(self.layer_indices, self.names, self.slices)
            ],
        }

    def as_restored(self) -> BlockDiagonalApproximation:
        """``from_state_dict(state_dict())``, each fit by :meth:`LayerFit.as_restored` (no copies
        of factors already laid out as a load lays them out)."""
        return self._from_state(self._state(lambda fit: fit), LayerFit.as_restored)

    @classmethod
    def from_state_dict(cls, data: Mapping[str, Any]) -> BlockDiagonalApproximation:
        """Inverse of :meth:`state_dict`."""
        return cls._from_state(data, LayerFit.from_state_dict)

    @classmethod
    def _from_state(cls, data: Mapping[str, Any], fit_from: Callable[[Any], LayerFit]) -> BlockDiagonalApproximation:
        layers = data["layers"]
        for d in layers:
            if not isinstance(d["name"], str):
                raise ConfigError(f"BlockDiagonalApproximation.from_state_dict: layer {d['index']!r} has the name "
                                  f"{d['name']!r}; expected a module name (a str)")
        return cls(
            kind=data["kind"],
            fits={d["index"]: fit_from(d["fit"]) for d in layers},
            names={d["index"]: d["name"] for d in layers},
            slices={d["index"]: slice(d["start"], d["stop"]) for d in layers},
            p=data["p"],
            origin=KindOrigin.from_state_dict(data.get("origin")),
            psd_factors=data.get("psd_factors", False) is True,
        )


def _layer_indices(F: Any, layers: Sequence[int | str] | None) -> list[int]:
    n = len(F.layers)
    if layers is None:
        return list(range(n))
    names = {L.name: i for i, L in enumerate(F.layers)}
    out = []
    for x in layers:
        if isinstance(x, str):
            if x not in names:
                raise ConfigError(f"unknown layer name {x!r}; layers of the operator: {list(names)}")
            out.append(names[x])
        elif isinstance(x, int) and not isinstance(x, bool) and -n <= x < n:
            out.append(x % n)
        else:
            raise ConfigError(f"layers: expected indices in [-{n}, {n}) or layer names, got {x!r}")
    if len(set(out)) != len(out):
        raise ConfigError(f"layers: each layer at most once, got {list(layers)}")
    return sorted(out)


@contextlib.contextmanager
def _fitting(name: str) -> Iterator[None]:
    token = fitting_layer.set(name)
    try:
        yield
    finally:
        fitting_layer.reset(token)


def approximate(
    F: Any,
    kind: str | Mapping[str, Any] | BaseModel,
    *,
    previous: BlockDiagonalApproximation | None = None,
    registry: Any = None,
    layers: Sequence[int | str] | None = None,
    shard: Any = None,
    **options: Any,
) -> BlockDiagonalApproximation:
    """Fit every layer block of the curvature operator ``F`` with one approximator kind.

    Args:
        F: a curvature operator with per-layer statistics (``fisher``,
            ``empirical_fisher``, ``ggn``; :func:`curvlib.curvatures.api.curvature`), or one over a
            data set (``curvature(..., data=...)``) for approximators fitted from the KFAC factors
            alone (``kfac``: one pass over the data accumulates them, equal to one big batch).
        kind: a registered approximator kind (``"kfac"``, ``"kpsvd"``, ``"deflation"``,
            ``"lanczos"``, ``"kfac_corrected"``, ``"exact_block"``, or a plugin's), or a
            mapping ``{"kind": ..., **options}``.
        previous: the approximation of the previous refresh (same kind and layers), for the
            EMA (``ema``) and warm starts.
        registry: a :class:`curvlib.plugins.Registry` (default: :func:`curvlib.plugins.load_registry`).
        layers: indices or names of the layers to fit (default: all); the others act as 0.
        shard: the :class:`~curvlib.distributed.Shard` when ``F`` holds one rank's part of a
            global batch under ``torch.distributed`` (the fit is then the global batch's,
            identical on every rank; the kind must declare
            :attr:`~curvlib.approximators.BlockApproximator.distributed`); ``None``: one process.
        **options: the kind's options, validated against its pydantic model (unknown or
            invalid options raise :class:`~curvlib.errors.ConfigError`).

    Returns:
        a :class:`BlockDiagonalApproximation` in F's dtype and device.
    """
    if registry is None:
        registry = load_registry()
    spec, opts = registry.approximators.resolve(kind, **options)
    origin = KindOrigin.of(spec)
    approximator = spec.factory(opts)
    if not isinstance(approximator, BlockApproximator):
        raise origin.error(None, f"the factory built {type(approximator).__name__}; expected a "
                                 "curvlib.approximators.BlockApproximator (with fit(stats, previous) -> LayerFit)")
    if shard is not None:
        if not type(approximator).distributed:
            raise ConfigError(f"approximator {spec.kind!r} ({origin}) does not declare that it fits sharded statistics "
                              "(BlockApproximator.distributed): under torch.distributed its fits would differ between "
                              "the ranks; use kfac, kpsvd, deflation, lanczos or kfac_corrected")
        if isinstance(F, DataCurvatureOperator):
            raise ConfigError("approximate: a curvature over a data set is not fitted in shards (shard=None)")
        approximator.shard = shard
    idx = _layer_indices(F, layers)
    if previous is not None:
        if not isinstance(previous, BlockDiagonalApproximation):
            raise ConfigError(f"previous must be a BlockDiagonalApproximation or None, got {type(previous).__name__}")
        if previous.kind != spec.kind:
            raise ConfigError(f"previous was fitted by {previous.kind!r}; expected {spec.kind!r} (EMA continues one kind)")
        if previous.p != F.p or tuple(previous.layer_indices) != tuple(idx):
            raise ConfigError(
                f"previous covers layers {list(previous.layer_indices)} of p = {previous.p}; expected layers {idx} of p = {F.p}"
            )
    prev = {i: None if previous is None else previous[i] for i in idx}
    if isinstance(F, DataCurvatureOperator):
        # over a data set only the factors accumulate in one pass (memory of one batch)
        if not isinstance(approximator, FactorFitted):
            raise ConfigError(
                f"approximate over a data set (curvature(..., data=...)): {spec.kind!r} needs the per-sample statistics "
                "of one batch; use an approximator fitted from the KFAC factors ('kfac'), or a single batch"
            )
        factors = kfac_factors_over(F, approximator.options.weight_sharing)
        fits = {}
        for i in idx:
            with _fitting(F.layers[i].name):
                fits[i] = approximator.fit_factors(factors[i], previous=prev[i])
    else:
        fits = {}
        for i in idx:
            stats = F.statistics(i)
            _check_statistics(F, i, stats, registry)
            with _fitting(F.layers[i].name):
                fits[i] = approximator.fit(stats, previous=prev[i])
    declared = approximator.declared_blocks()
    _check_fits(F, fits, origin, declared)
    return BlockDiagonalApproximation(
        kind=spec.kind,
        fits=fits,
        names={i: F.layers[i].name for i in idx},
        slices={i: F.layers[i].slice for i in idx},
        p=F.p,
        layout=F.layout,
        origin=origin,
        psd_factors=declared is not None and declared.psd_factors,
    )


def _check_statistics(F: Any, i: int, stats: Any, registry: Any) -> None:
    """The statistics F gave for layer i fit the layer block: a :class:`LayerStatistics` of
    its (d_a, d_g), in F's dtype and on its device.  They come from the curvature kind and
    the layer's adapter, both plugins: the message names both."""
    L = F.layers[i]
    problem = None
    if not isinstance(stats, LayerStatistics):
        problem = f"statistics(i) returned {'None' if stats is None else type(stats).__name__}; expected LayerStatistics"
    elif (stats.a_dim, stats.g_dim) != (L.a_dim, L.g_dim):
        problem = (f"the statistics have (d_a, d_g) = {(stats.a_dim, stats.g_dim)}; expected {(L.a_dim, L.g_dim)}, "
                   "the layer block's")
    elif stats.dtype != F.dtype or stats.device != torch.device(F.device):
        problem = f"the statistics are {stats.dtype} on {stats.device}; expected {F.dtype} on {F.device}, the operator's"
    if problem is not None:
        layer = KindOrigin.lookup(registry, "layers", L.kind)
        raise KindOrigin.lookup(registry, "curvatures", F.kind).error(L.name, f"{problem} (captured by the {layer})")


def _check_fits(F: Any, fits: Mapping[int, LayerFit], origin: KindOrigin, declared: Any) -> None:
    """Every fit passes :func:`~curvlib.approximators.base.fit_structure_problem` and
    :func:`~curvlib.approximators.base.fit_value_flags` (one host synchronisation for all layers)."""
    flags = []
    psd = declared is not None and declared.psd_factors
    for i, fit in fits.items():
        L = F.layers[i]
        problem = fit_structure_problem(fit, a_dim=L.a_dim, g_dim=L.g_dim, dtype=F.dtype, device=torch.device(F.device),
                                        declared=declared)
        if problem is not None:
            raise origin.error(L.name, problem)
        f = fit_value_flags(fit, psd_by_construction=psd)
        if f is not None:
            flags.append((i, f))
    if not flags:
        return
    ok = [all(row) for row in host_values([f for _, f in flags])]
    for (i, _), good in zip(flags, ok):
        if not good:
            problem = fit_value_problem(fits[i])
            if problem is None:
                continue  # a false alarm of the finiteness screen (the other flags are exact)
            raise origin.error(F.layers[i].name, problem or "the factors failed the value checks")


# --------------------------------------------------------------------------- errors of §3.3.1


@dataclass(frozen=True)
class ApproximationError:
    """Error 1 and Error 2 of §3.3.1 for one layer block.

    Attributes:
        layer: the layer's index in ``F.layers``.
        name: its module name.
        error1: ‖F_ii − F̂_ii‖_F / ‖F_ii‖_F.
        error2: ‖spec(F_ii) − spec(F̂_ii)‖₂ / ‖spec(F_ii)‖₂ with both spectra sorted
            (``nan`` when not computed).
    """

    layer: int
    name: str
    error1: float
    error2: float


def _dense_kronecker_sum(terms: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Σ_k A_k ⊗ B_k as one dense matrix, accumulated row block by row block (p² memory, no
    K·p² intermediate as :meth:`KroneckerSum.to_dense` would form)."""
    A0, B0 = terms[0]
    d_a, d_b = A0.shape[0], B0.shape[0]
    M = torch.zeros(d_a * d_b, d_a * d_b, dtype=A0.dtype, device=A0.device)
    M4 = M.view(d_a, d_b, d_a, d_b)  # M4[i, k, j, l] = Σ A[i, j] B[k, l]
    for A, B in terms:
        for i in range(d_a):  # a loop over a factor's rows bounds the temporary at d_a·d_b² entries
            M4[i] += A[i][None, :, None] * B[:, None, :]
    return M


def _spectrum(block: LayerBlockOperator, p: int) -> torch.Tensor:
    """All p eigenvalues of a fitted block, float64, descending."""
    if isinstance(block, ExactBlock):
        ev = block.nonzero_spectrum()
    elif not isinstance(block, KroneckerFactored):  # another block (kfac_lowrank, a plugin's): dense, O(p³)
        M = block.to_dense()
        ev = torch.linalg.eigvalsh(0.5 * (M + M.T))
    else:
        live = [(A, B) for A, B in block.terms if bool(A.any()) and bool(B.any())]
        if not live:
            return torch.zeros(p, dtype=torch.float64, device=block.device)
        if len(live) == 1:  # spec(A ⊗ B) = {α_i β_j} (Thm 3.9): O(d_a³ + d_g³)
            A, B = live[0]
            ev = (torch.linalg.eigvalsh(0.5 * (A + A.T))[:, None] * torch.linalg.eigvalsh(0.5 * (B + B.T))[None, :]).reshape(-1)
        else:  # no cheap route for a sum: dense eigvalsh, O(p³) time, p² memory
            M = _dense_kronecker_sum(live)
            ev = torch.linalg.eigvalsh(0.5 * (M + M.T))
    ev = ev.sort(descending=True).values
    if ev.shape[0] < p:
        ev = torch.cat([ev, ev.new_zeros(p - ev.shape[0])])
    return ev[:p] if ev.shape[0] > p else ev


def _inner_with_block(stats: LayerStatistics, block: LayerBlockOperator) -> torch.Tensor:
    """⟨F_ii, F̂_ii⟩_F, matrix-free.

    Kronecker sum: ⟨F, A⊗B⟩ = ⟨Z(F), vec(A)vec(B)ᵀ⟩ = vec(A)ᵀ Z(F) vec(B) (Z preserves the
    Frobenius inner product entry by entry, (3.37)), one product with the exact Z(F)
    (all position pairs), O(m·d²).  Exact block: scale·scale'·‖J_iᵀJ'_i‖²_F.  Any other block
    (``kfac_lowrank``, a plugin's): scale·Σ_n ⟨D_n, F̂_ii D_n⟩ from the per-pair gradients D_n
    (:meth:`~curvlib.curvatures.statistics.LayerStatistics.pair_gradients`), n block products.
    """
    if isinstance(block, ExactBlock):
        cross = pair_gram(stats, block.stats)
        return float(stats.scale) * block.scale * (cross * cross).sum()
    if not isinstance(block, KroneckerFactored):  # any other block: scale·Σ_n ⟨D_n, F̂ D_n⟩, n products
        total = torch.zeros((), dtype=block.dtype, device=block.device)
        for D in stats.pair_gradient_chunks():
            total = total + (D * block.apply(D)).sum()
        return float(stats.scale) * total
    zop = z_operator(stats, band_radius=None)
    VB = torch.stack([vec(B) for _, B in block.terms], dim=1)  # [d_g², K]
    VA = torch.stack([vec(A) for A, _ in block.terms], dim=1)  # [d_a², K]
    return (VA * zop.matvec(VB)).sum()


def approximation_error(
    F: Any,
    approx: BlockDiagonalApproximation,
    layers: Sequence[int | str] | None = None,
    *,
    error2: bool = True,
) -> list[ApproximationError]:
    """Error 1 and Error 2 of §3.3.1 for each fitted layer block, in float64.

    * Error 1 = ‖F_ii − F̂_ii‖_F / ‖F_ii‖_F from ‖F − F̂‖² = ‖F‖² − 2⟨F, F̂⟩ + ‖F̂‖²,
      matrix-free: ‖F_ii‖²_F = scale²·‖J_iᵀJ_i‖²_F (an ``[n, n]`` Gram matrix, n = m·c;
      for Linear (J_iᵀJ_i)_{nn'} = (ā_nᵀā_n')(g_nᵀg_n'), so this is
      scale² Σ_{n,n'} (ā_nᵀā_n')²(g_nᵀg_n')²), ⟨F, Σ A_k⊗B_k⟩ = Σ_k vec(A_k)ᵀ Z(F) vec(B_k)
      (for Linear = scale Σ_n (ā_nᵀA_kā_n)(g_nᵀB_kg_n)), ‖F̂‖²_F from the factors' Gram
      matrices.  The subtraction limits its absolute accuracy to about √eps ≈ 1e-8.
    * Error 2 = ‖spec(F_ii) − spec(F̂_ii)‖₂ / ‖spec(F_ii)‖₂, both sorted descending:
      spec(F_ii) is the spectrum of scale·J_iᵀJ_i ``[n, n]`` padded with p_i − n zeros;
      spec(A⊗B) the products of the factors' eigenvalues (O(d_a³ + d_g³)); a sum of two
      or more terms (or another block: ``kfac_lowrank``, a plugin's) has no cheap spectrum, so it is formed densely and passed to
      ``eigvalsh``: O(p_i³) time and p_i² float64 memory (layer 5 of the MNIST
      auto-encoder, p_i = 7,750: 480 MB, about 10 s on 2 CPU cores).  ``error2=False``
      skips it (``nan``).

    Args:
        F: the curvature operator the approximation was fitted to (or another batch's).
        approx: a :class:`BlockDiagonalApproximation`.
        layers: indices or names of the layers to report (default: every fitted layer).
        error2: compute Error 2.

    Returns:
        one :class:`ApproximationError` per layer; a block with ‖F_ii‖ = 0 reports ``nan``.
    """
    idx = list(approx.layer_indices) if layers is None else _layer_indices(F, layers)
    out = []
    for i in idx:
        fit = approx[i]
        stats = F.statistics(i).to(torch.float64)
        if (stats.a_dim, stats.g_dim) != (fit.a_dim, fit.b_dim):
            raise ShapeError(
                f"layer {i}: the operator's block has (d_a, d_g) = {(stats.a_dim, stats.g_dim)}, the fit "
                f"{(fit.a_dim, fit.b_dim)}"
            )
        block = fit.block.to(dtype=torch.float64)
        exact = ExactBlock(stats)
        gram = exact.gram()
        norm_f2 = float(stats.scale) ** 2 * (gram * gram).sum()
        norm_h2 = block.frobenius_norm() ** 2
        inner = _inner_with_block(stats, block)
        if float(norm_f2) > 0:
            e1 = math.sqrt(max(float(norm_f2 - 2 * inner + norm_h2), 0.0) / float(norm_f2))
        else:
            e1 = math.nan
        e2 = math.nan
        if error2:
            p = stats.a_dim * stats.g_dim
            spec_f = _spectrum(exact, p)
            nf = float(torch.linalg.vector_norm(spec_f))
            if nf > 0:
                e2 = float(torch.linalg.vector_norm(spec_f - _spectrum(block, p))) / nf
        out.append(ApproximationError(layer=i, name=F.layers[i].name, error1=e1, error2=e2))
    return out
