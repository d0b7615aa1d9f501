"""The two abstractions of the damping family: :class:`Damping` and :class:`BlockInverse`.

A :class:`Damping` turns one layer block of a curvature approximation into an applied,
regularized inverse, a :class:`BlockInverse`.  What λ means is fixed per damping kind
and stated with its formula in that kind's docstring (DESIGN.md §10, "Damping means a
different thing in every optimizer"):

- ``tikhonov``: (Σ_k A_k⊗B_k + λI)⁻¹, "normal damping" (2.94), (4.54);
- ``heuristic``: [(A_1 + π√λ I) ⊗ (B_1 + π⁻¹√λ I) (+ A_2⊗B_2)]⁻¹, the π-split (2.95)–(2.96);
- ``levenberg_marquardt``: either of the two, with λ adapted from the reduction ratio.

Blocks declare what they offer through the capability classes of :mod:`curvlib.linalg.blocks`
(the approximators' result types are not imported here):

- :class:`~curvlib.linalg.KroneckerFactored` blocks expose ``terms``, pairs ``(A_k [d_a, d_a],
  B_k [d_g, d_g])`` meaning Σ_k A_k ⊗ B_k (e.g. :class:`curvlib.linalg.KroneckerSum`);
- :class:`~curvlib.linalg.ShiftSolvable` blocks solve ``tikhonov_solve(X [..., d_g, d_a], lam)``,
  the already damped (F_ii + λI)⁻¹ vec(X) in matrix form (e.g. the exact block).

Orientation (DESIGN.md §1): a layer's gradient in matrix form is X ``[d_g, d_a]``
(= W̄'s shape ``[d_out, d_in+1]``), its flat form is the column-major vec(X) ``[p_i]``,
p_i = d_a·d_g, and (A⊗B) vec(X) = vec(B X Aᵀ).

Factor eigendecompositions are computed in :meth:`Damping.invert` (once per refresh, T2)
and reused by every :meth:`BlockInverse.solve` until the next refresh.

Declarations (checked by :func:`curvlib.build_preconditioner` before any data is seen), made
by each kind on its own class, curvlib's as a plugin's: :attr:`Damping.requires` /
:meth:`Damping.block_requirement` — the blocks a kind inverts (``tikhonov``: Kronecker-factored
or shift-solvable; ``heuristic``: Kronecker-factored with at most two terms) — and
:meth:`Damping.inverse_capabilities` — what its inverses offer (an eigenbasis, damped
factors), which the ``spectral`` coarse space may need.  What the inverses must be
(:func:`inverse_structure_problem`, :func:`inverse_value_flag`) is checked by
:func:`curvlib.damped_inverse` for every kind.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel

from curvlib.config import StrictModel, validate_options
from curvlib.errors import (
    ConfigError,
    DTypeDeviceError,
    NotPSDError,
    NumericalError,
    NumericalWarning,
    ShapeError,
    warn,
)
from curvlib.linalg import (
    DampedKroneckerFactors,
    FactorEigenbasis,
    InverseFactored,
    KroneckerFactored,
    LayerBlockOperator,
    ShiftSolvable,
    finite_screen,
)
from curvlib.plugins.hookspecs import BlockRequirement, KindOrigin, describe_capabilities

__all__ = [
    "BlockInverse",
    "BlockRequirement",
    "Damping",
    "InverseInfo",
    "block_capabilities",
    "inverse_structure_problem",
    "inverse_value_flag",
    "inverse_value_problem",
    "psd_part_terms",
]


# --------------------------------------------------------------------------- block typing


def _check_block(block: Any, caller: str) -> None:
    if not isinstance(block, (KroneckerFactored, ShiftSolvable, InverseFactored)):
        raise ConfigError(
            f"{caller}: expected a KroneckerFactored block (Σ A_k⊗B_k with .terms, e.g. a KroneckerSum), a "
            f"ShiftSolvable block (with an exact .tikhonov_solve(X, lam), e.g. an ExactBlock) or an InverseFactored "
            f"block (with its .inverse_factors, e.g. singd's); got {type(block).__name__}"
        )


def _check_finite_terms(terms: Sequence[tuple[torch.Tensor, torch.Tensor]], caller: str) -> None:
    if bool(finite_screen([M for term in terms for M in term])):  # one reduction per factor, one host sync
        return
    for k, (A, B) in enumerate(terms):  # the screen may be a false alarm: check exactly
        for name, M in (("A", A), ("B", B)):
            if not bool(torch.isfinite(M).all()):
                n_bad = int((~torch.isfinite(M)).sum())
                raise NumericalError(
                    f"{caller}: term {k} factor {name}_{k} {list(M.shape)} has {n_bad} non-finite entries "
                    "(expected finite factors)"
                )


def psd_part_terms(
    eigs: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """The positive semi-definite part of Σ_k A_k⊗B_k, term by term, as a Kronecker sum.

    With A = A⁺ − A⁻ and B = B⁺ − B⁻ split by the signs of their eigenvalues
    (A⁺ = Q_a max(e_a, 0) Q_aᵀ, A⁻ = Q_a max(−e_a, 0) Q_aᵀ, both PSD), the eigenvalues of
    A⊗B are the products e_a,i·e_b,j on the eigenvectors q_a,i⊗q_b,j, so its PSD part
    (negative eigenvalues set to 0) is exactly

        psd(A⊗B) = A⁺⊗B⁺ + A⁻⊗B⁻.

    Terms whose factors are zero are left out (at least one term is always returned).

    Args:
        eigs: per term ``(e_a [d_a], Q_a [d_a, d_a], e_b [d_g], Q_b [d_g, d_g])``.

    Returns:
        pairs ``(A [d_a, d_a], B [d_g, d_g])``, every one PSD⊗PSD.
    """
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    for e_a, Q_a, e_b, Q_b in eigs:
        for sign in (1.0, -1.0):
            pa = (sign * e_a).clamp_min(0)
            pb = (sign * e_b).clamp_min(0)
            if bool((pa > 0).any()) and bool((pb > 0).any()):
                out.append(((Q_a * pa) @ Q_a.T, (Q_b * pb) @ Q_b.T))
    if not out:
        e_a, Q_a, e_b, Q_b = eigs[0]
        out.append((torch.zeros_like(Q_a), torch.zeros_like(Q_b)))
    return tuple(out)


# --------------------------------------------------------------------------- BlockInverse


@dataclass(frozen=True)
class InverseInfo:
    """What a damping did to build (and, for iterative methods, last apply) an inverse.

    Attributes:
        kind: the damping kind (``"tikhonov"``, ``"heuristic"``, ...).
        method: ``"eigen"`` (joint eigenbasis), ``"pcg"``, ``"dense"``, ``"two_term"``
            (§3.2.5) or ``"exact_block"``.
        lam: the λ used, with the meaning of ``kind``.
        pi: π of (2.96) (heuristic only).
        n_clamped: how many joint eigenvalues (two-term heuristic: μ of §3.2.5) or factor
            eigenvalues (one-term heuristic) were raised to their floor.
        iterations: PCG steps of the last solve (``None`` for direct methods).
        converged: whether the last PCG solve reached its tolerance.
        relative_residual: the largest ‖b − Mx‖/‖b‖ over the columns of the last PCG solve.
        fallback: ``None``, or the documented fallback taken (``"psd_part"``: the
            negative part of each Kronecker term dropped; ``"leading_term"``: PCG's last
            fallback, the exact inverse of the leading term (A_1⊗B_1 + λI)⁻¹;
            ``"psd_leading_factors"``: the leading factors' negative eigenvalues clamped at 0,
            or at their rounding level).
        certified_definite: PCG only: True when Weyl's bound λ + Σ_k λ_min(A_k⊗B_k) > 0
            proves the damped sum positive definite before any solve; False when it
            could not (PCG's own curvature check then decides).
    """

    kind: str
    method: str
    lam: float
    pi: float | None = None
    n_clamped: int = 0
    iterations: int | None = None
    converged: bool | None = None
    relative_residual: float | None = None
    fallback: str | None = None
    certified_definite: bool | None = None


class BlockInverse(LayerBlockOperator):
    """An applied damped inverse M⁻¹ of one layer block, M ``[p_i, p_i]``, p_i = d_a·d_g.

    A :class:`~curvlib.linalg.LayerBlockOperator`: ``@``/``matvec`` on flat vectors, the
    matrix form :meth:`solve` (= ``apply``), the operator algebra.  Subclasses implement
    :meth:`_solve` on matrices ``[k, d_g, d_a]`` only.  Every public result is checked to be
    finite: a non-finite result raises :class:`NumericalError` (never a silent NaN);
    block-diagonal callers apply the private product and check the assembled direction
    once (one host sync per application, not one per layer).

    Args:
        a_dim: d_a (activation side, ``d_in + 1`` for a Linear layer with bias).
        b_dim: d_g (gradient side, ``d_out``).
        dtype, device: those of the block's factors; operands must match.
        info: :class:`InverseInfo`.
    """

    def __init__(self, *, a_dim: int, b_dim: int, dtype: torch.dtype, device: torch.device, info: InverseInfo) -> None:
        self._a_dim = int(a_dim)
        self._b_dim = int(b_dim)
        self._dtype = dtype
        self._device = torch.device(device)
        self._info = info

    # ---- description -------------------------------------------------------------
    @property
    def a_dim(self) -> int:
        """d_a, the size of the activation-side factors."""
        return self._a_dim

    @property
    def b_dim(self) -> int:
        """d_g, the size of the gradient-side factors."""
        return self._b_dim

    @property
    def info(self) -> InverseInfo:
        """What was done (method, iterations of the last solve, clamps, fallback)."""
        return self._info

    def __repr__(self) -> str:
        i = self._info
        return (
            f"{type(self).__name__}(kind={i.kind!r}, method={i.method!r}, lam={i.lam:.3e}, "
            f"a_dim={self.a_dim}, b_dim={self.b_dim}, dtype={self.dtype}, device={self.device})"
        )

    def condition_numbers(self) -> torch.Tensor | None:
        """(κ_A, κ_G) of the two (damped) factors the inverse inverted, a ``[2]`` tensor on the
        device (no host synchronisation), or ``None`` when it has no such factors.  Default: the
        eigenvalue ratios |λ|max/|λ|min of :attr:`~curvlib.linalg.FactorEigenbasis.eigen` for
        inverses with that capability."""
        if not isinstance(self, FactorEigenbasis):
            return None
        e = self.eigen
        ea, eb = e.eval_a.abs(), e.eval_b.abs()
        return torch.stack([ea.max() / ea.min(), eb.max() / eb.min()])

    # ---- products ------------------------------------------------------------------
    def _check_result(self, Y: torch.Tensor, X: torch.Tensor, caller: str) -> None:
        if not bool(torch.isfinite(Y).all()):
            why = (
                "the right-hand side already has non-finite entries"
                if not bool(torch.isfinite(X).all())
                else "the inverse produced them from a finite right-hand side"
            )
            raise NumericalError(f"{caller}: the result {list(Y.shape)} has non-finite entries: {why}")

    def solve(self, X: torch.Tensor) -> torch.Tensor:
        """M⁻¹ vec(X) in matrix form: X ``[..., d_g, d_a]`` -> ``[..., d_g, d_a]``.

        Raises:
            ShapeError, DTypeDeviceError: X does not fit.
            NumericalError: the result is not finite.
        """
        return self.apply(X)

    def _apply(self, X: torch.Tensor) -> torch.Tensor:
        return self._solve(X)

    # ---- transfer between ranks (curvlib.distributed) ---------------------------------
    def for_transfer(self) -> BlockInverse:
        """What the owner rank sends to the others (``distributed_inversion="broadcast"``):
        default this inverse; a kind may leave out what the receivers rebuild from the block
        they all hold (:meth:`after_transfer`)."""
        return self

    def after_transfer(self, block: Any) -> None:
        """Rebuild, on a receiving rank, what :meth:`for_transfer` left out (``block``: the
        approximation's block this inverse inverts, identical on every rank)."""

    @abc.abstractmethod
    def _solve(self, X: torch.Tensor) -> torch.Tensor:
        """M⁻¹ vec(X) in matrix form for a checked X ``[k, d_g, d_a]`` -> ``[k, d_g, d_a]``."""


# --------------------------------------------------------------------------- Damping


class Damping(abc.ABC):
    """A regularization that turns one layer block into a :class:`BlockInverse`.

    Subclasses set the class attributes :attr:`kind` and :attr:`options_model` (a
    :class:`~curvlib.config.StrictModel` with a ``value`` field, the λ of the kind) and
    implement :meth:`_invert`.  :meth:`invert` is the public entry point: it checks the
    block, rejects non-finite factors and, when the inversion fails numerically, keeps
    the ``previous`` inverse with a :class:`NumericalWarning` (or raises without one).

    Args:
        options: an instance of :attr:`options_model`, a mapping of its fields (a
            ``"kind"`` key, if present, must name this kind), or ``None``.
        **overrides: fields merged on top of ``options``.

    Raises:
        ConfigError: the options do not validate (e.g. λ ≤ 0, an unknown field).
    """

    kind: ClassVar[str] = ""
    options_model: ClassVar[type[StrictModel]]
    #: λ adapts from the reduction ratio through :meth:`update` (the optimizer measures it)
    adaptive: ClassVar[bool] = False
    #: The blocks this kind inverts, e.g. ``BlockRequirement((KroneckerFactored,), max_terms=2,
    #: reason="...")``; ``None``: not declared (a block it cannot invert fails at the first
    #: inversion).  A kind whose requirement depends on its options overrides
    #: :meth:`block_requirement`.
    requires: ClassVar[BlockRequirement | None] = None
    #: Who made this damping (kind, plugin, distribution), named in every message about its
    #: inverses; set by whoever builds it from a registry (:func:`curvlib.damped_inverse`,
    #: :func:`curvlib.build_preconditioner`).  ``None``: not made through a registry.
    origin: KindOrigin | None = None

    def __init__(self, options: BaseModel | Mapping[str, Any] | None = None, /, **overrides: Any) -> None:
        self._options = self._validate_options(options, overrides)

    @classmethod
    def _validate_options(cls, options: BaseModel | Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> Any:
        model = cls.options_model
        if isinstance(options, model) and not overrides:
            return options
        if options is None:
            data: dict[str, Any] = {}
        elif isinstance(options, BaseModel):
            data = options.model_dump()
        elif isinstance(options, Mapping):
            data = dict(options)
        else:
            raise ConfigError(
                f"damping '{cls.kind}': options must be a {model.__name__}, a mapping or None; "
                f"got {type(options).__name__}"
            )
        data.update(overrides)
        kind = data.pop("kind", cls.kind)
        if kind != cls.kind:
            raise ConfigError(f"damping '{cls.kind}': options name kind {kind!r}, expected {cls.kind!r}")
        return validate_options(model, data, where=f"damping '{cls.kind}'")

    @property
    def options(self) -> Any:
        """The validated, frozen options model."""
        return self._options

    @property
    def value(self) -> float:
        """The current λ (its meaning is stated by the kind)."""
        return float(self._options.value)

    @property
    def formula_kind(self) -> str:
        """The kind whose formula λ follows (``tikhonov``, ``heuristic``, …): the kind itself,
        or for a wrapper such as ``levenberg_marquardt`` the kind it wraps."""
        return self.kind

    # -- declarations ------------------------------------------------------------------
    def block_requirement(self) -> BlockRequirement | None:
        """The blocks this damping inverts: :attr:`requires` by default; ``None`` when not
        declared.  A kind whose requirement depends on its options overrides it (as
        ``levenberg_marquardt`` does: it inverts what its inner kind inverts)."""
        return type(self).requires

    def inverse_capabilities(self, block: tuple[type, ...], terms: int | None) -> tuple[type, ...] | None:
        """The capability classes (:class:`~curvlib.linalg.FactorEigenbasis`,
        :class:`~curvlib.linalg.DampedKroneckerFactors`) every inverse this damping builds for
        a block with capabilities ``block`` and ``terms`` Kronecker terms (``None``: not
        Kronecker-factored) derives from; ``None`` (the default) when not declared.  A kind
        overrides it to declare its inverses (then :func:`curvlib.damped_inverse` checks them)."""
        return None

    def update(self, reduction_ratio: float | torch.Tensor) -> float:
        """Adapt λ from a reduction ratio (adaptive kinds only); returns the new λ.

        Raises:
            ConfigError: the kind is not :attr:`adaptive`.
        """
        raise ConfigError(f"damping {self.kind!r} is not adaptive: it has no update(reduction_ratio)")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`.  A stateless kind checks the state is its own.

        Raises:
            ConfigError: the state belongs to another kind or another λ.
        """
        if not isinstance(state, Mapping) or dict(state) != self.state_dict():
            raise ConfigError(f"{type(self).__name__}.load_state_dict: the damping {self!r} cannot load the state "
                              f"{state!r}: it differs from its own {self.state_dict()!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(value={self.value:.3e})"

    def invert(self, block: Any, *, previous: BlockInverse | None = None) -> BlockInverse:
        """The damped inverse of ``block``; factor decompositions happen here, once.

        Args:
            block: a Kronecker-sum block (``terms``: pairs ``(A_k [d_a, d_a], B_k [d_g, d_g])``)
                or an exact block (``tikhonov_solve``), see the module docstring.
            previous: the inverse of the same layer from the previous refresh.

        Returns:
            a :class:`BlockInverse`; ``previous`` itself (with a :class:`NumericalWarning`
            saying why) when the factors are non-finite or a decomposition fails even
            after :func:`~curvlib.linalg.eigh_safe`'s float64 retry.

        Raises:
            NumericalError, NotPSDError: the inversion failed and no ``previous`` was given.
            ShapeError, DTypeDeviceError: ``previous`` does not fit ``block``.
            ConfigError: the block type is not supported by this kind.
        """
        caller = f"{type(self).__name__}.invert"
        _check_block(block, caller)
        if previous is not None:
            self._check_previous(block, previous, caller)

        def build() -> BlockInverse:
            if isinstance(block, KroneckerFactored):
                _check_finite_terms(block.terms, caller)
            return self._invert(block)

        return self._or_previous(build, previous, caller)

    def invert_many(self, blocks: Sequence[Any], previous: Sequence[BlockInverse | None]) -> list[BlockInverse]:
        """The damped inverses of several blocks (a network's layers), each as :meth:`invert` builds it.

        By default one :meth:`invert` per block.  A kind may override it to share work between
        the blocks — ``heuristic`` factors every damped factor of one shape in one batched call —
        with the same results, checks and per-block fallbacks (a block whose inversion fails
        keeps its ``previous``).  :func:`~curvlib.damping.damped_inverse` calls this.
        """
        self._check_many(blocks, previous)
        return [self.invert(b, previous=p) for b, p in zip(blocks, previous)]

    def _check_many(self, blocks: Sequence[Any], previous: Sequence[BlockInverse | None]) -> None:
        """One ``previous`` per block (:meth:`invert_many` and its overrides)."""
        if len(blocks) != len(previous):
            raise ShapeError(f"{type(self).__name__}.invert_many: {len(blocks)} blocks, {len(previous)} previous")

    @staticmethod
    def _or_previous(build: Callable[[], BlockInverse], previous: BlockInverse | None, caller: str) -> BlockInverse:
        """``build()``, or ``previous`` with a :class:`NumericalWarning` when it fails numerically
        (re-raised when there is no ``previous``): the fallback of :meth:`invert`."""
        try:
            return build()
        except (NumericalError, NotPSDError) as exc:
            if previous is None:
                raise
            warn(
                f"{caller}: could not build the damped inverse ({type(exc).__name__}: {exc}); "
                "keeping the previous inverse",
                NumericalWarning,
            )
            return previous

    @staticmethod
    def _check_previous(block: Any, previous: BlockInverse, caller: str) -> None:
        if not isinstance(previous, BlockInverse):
            raise ConfigError(f"{caller}: previous must be a BlockInverse or None, got {type(previous).__name__}")
        if (previous.a_dim, previous.b_dim) != (int(block.a_dim), int(block.b_dim)):
            raise ShapeError(
                f"{caller}: previous inverse has (d_a, d_g) = {(previous.a_dim, previous.b_dim)}, "
                f"the block has {(int(block.a_dim), int(block.b_dim))}"
            )
        if previous.dtype != block.dtype or previous.device != torch.device(block.device):
            raise DTypeDeviceError(
                f"{caller}: previous inverse is {previous.dtype} on {previous.device}, "
                f"the block is {block.dtype} on {block.device}"
            )

    @abc.abstractmethod
    def _invert(self, block: Any) -> BlockInverse:
        """Build the inverse of a checked block with finite factors (raise
        :class:`NumericalError` / :class:`NotPSDError` on numerical failure)."""

    def state_dict(self) -> dict[str, Any]:
        """``{"kind": ..., "value": λ}``; adaptive kinds add their state."""
        return {"kind": self.kind, "value": self.value}


# --------------------------------------------------------------------------- block capabilities


def block_capabilities(block: Any) -> tuple[tuple[type, ...], int | None]:
    """(the capability classes a block derives from, its number of Kronecker terms or ``None``)."""
    caps = tuple(c for c in (KroneckerFactored, ShiftSolvable) if isinstance(block, c))
    return caps, (len(block.terms) if isinstance(block, KroneckerFactored) else None)


# --------------------------------------------------------------------------- output checks


def inverse_structure_problem(inv: Any, block: Any, declared: tuple[type, ...] | None = None) -> str | None:
    """What is wrong with what a damping's ``invert(block)`` returned (``None``: nothing).

    Checks (no tensor is read, no host synchronisation): a :class:`BlockInverse` of the block's
    (d_a, d_g) (so [p_i, p_i]), dtype and device, deriving from the capability classes the
    kind ``declared`` (:meth:`Damping.inverse_capabilities`); the damped factors
    (:class:`~curvlib.linalg.DampedKroneckerFactors`) and eigenvectors
    (:class:`~curvlib.linalg.FactorEigenbasis`) it exposes are ``[d_a, d_a]`` and ``[d_g, d_g]``.
    """
    if not isinstance(inv, BlockInverse):
        what = "None" if inv is None else f"a {type(inv).__name__}"
        return f"invert() returned {what}; expected a curvlib.damping.BlockInverse"
    want = (int(block.a_dim), int(block.b_dim))
    got = (int(inv.a_dim), int(inv.b_dim))
    if got != want or tuple(inv.shape) != tuple(block.shape):
        return (f"invert() returned an inverse of (d_a, d_g) = {got} (shape {list(inv.shape)}); expected {want} "
                f"(shape {list(block.shape)}), the block's")
    if inv.dtype != block.dtype or torch.device(inv.device) != torch.device(block.device):
        return (f"invert() returned an inverse in {inv.dtype} on {inv.device}; expected {block.dtype} on "
                f"{block.device}, the block's")
    if declared is not None:
        missing = [c for c in declared if not isinstance(inv, c)]
        if missing:
            return (f"invert() returned a {type(inv).__name__}, which is not {describe_capabilities(tuple(missing))}; "
                    f"the kind declares {describe_capabilities(declared)} inverses for this block")
    for name, M, shape in _exposed(inv):
        if not isinstance(M, torch.Tensor):
            return f"the inverse exposes {name} as a {type(M).__name__}; expected a tensor {list(shape)}"
        if tuple(M.shape) != shape:
            return f"the inverse exposes {name} of shape {list(M.shape)}; expected {list(shape)}"
        if M.dtype != inv.dtype or M.device != torch.device(inv.device):
            return f"the inverse exposes {name} in {M.dtype} on {M.device}; expected {inv.dtype} on {inv.device}"
    return None


def _exposed(inv: Any) -> list[tuple[str, Any, tuple[int, ...]]]:
    """The tensors an inverse exposes through its capabilities: (name, tensor, expected shape)."""
    a, g = int(inv.a_dim), int(inv.b_dim)
    out: list[tuple[str, Any, tuple[int, ...]]] = []
    if isinstance(inv, DampedKroneckerFactors):
        A, G = inv.damped_factors
        out += [("damped factor A", A, (a, a)), ("damped factor G", G, (g, g))]
    if isinstance(inv, FactorEigenbasis) and inv.eigen_computed:  # checked where it is computed otherwise
        e = inv.eigen
        out += [("eigen.eval_a", e.eval_a, (a,)), ("eigen.evec_a", e.evec_a, (a, a)),
                ("eigen.eval_b", e.eval_b, (g,)), ("eigen.evec_b", e.evec_b, (g, g))]
    return out


def inverse_value_flag(inv: BlockInverse) -> torch.Tensor | None:
    """0-d bool tensor (no host synchronisation): ``True`` proves every tensor the inverse
    exposes through its capabilities finite (:func:`~curvlib.linalg.finite_screen`: a ``False``
    may be a false alarm, which :func:`inverse_value_problem` clears); ``None`` when it exposes
    none (its products are checked for finiteness where they are applied, :meth:`BlockInverse.solve`)."""
    tensors = [M for _, M, _ in _exposed(inv)]
    if not tensors:
        return None
    return finite_screen(tensors)


def inverse_value_problem(inv: BlockInverse) -> str | None:
    """Which exposed tensor of the inverse is not finite (the error path of :func:`inverse_value_flag`)."""
    for name, M, _ in _exposed(inv):
        bad = int((~torch.isfinite(M)).sum())
        if bad:
            return f"the inverse's {name} {list(M.shape)} has {bad} non-finite entries; expected finite values"
    return None
