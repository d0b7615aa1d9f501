"""The block-approximator interface: what one layer's fit is, and what fits it.

A :class:`BlockApproximator` turns the per-sample statistics of one layer
(:class:`~curvlib.curvatures.statistics.LayerStatistics`) into a :class:`LayerFit`:

* ``block`` — the approximation of the layer block F_ii ``[p_i, p_i]``, p_i = d_a·d_g:
  a :class:`~curvlib.linalg.KroneckerSum` Σ_k A_k ⊗ B_k with A_k ``[d_a, d_a]``
  (activation side) and B_k ``[d_g, d_g]`` (gradient side), (3.18)–(3.19); or, for the
  ``exact_block`` kind, an :class:`~curvlib.approximators.exact.ExactBlock`;
* ``info`` — a :class:`FitInfo` (method, iterations, residuals, singular values, …);
* ``state`` — a ``dict`` of tensors and ints the next refresh needs (refresh counter k,
  warm-start vectors).  The averaged terms themselves are ``block.terms``.

A fit must round-trip exactly through ``copy.deepcopy`` and ``torch.save``/``torch.load``
(the whole object with ``weights_only=False``, or :meth:`LayerFit.state_dict` with the
default ``weights_only=True``), because optimizers keep it in their ``state_dict``.

Exponential moving average (§3.1.2).  At the k-th refresh of a layer (k = 1 for the
first), the weight of the past is

    ρ = min(1 − 1/k, γ),          γ = the ``ema`` option (``None``: ρ = 0, no average),

so the first refresh is the batch estimate itself and the average never trusts the past
more than γ.  :func:`ema_rho` computes it; :func:`ema_terms` averages Kronecker terms
factor by factor, after aligning their signs (:func:`align_signs`): singular vectors come
with arbitrary signs, and an average of (A, B) with (−A, −B) — the same Kronecker
product — would cancel (DESIGN.md §10, "Sign ambiguity").

What curvlib checks in a fit (:func:`curvlib.approximate`, for every kind, built-in or not;
docs/plugin_guide.md, "What curvlib checks"): :func:`fit_structure_problem` (a
:class:`LayerFit`, a layer block of the layer's size, dtype and device, factors
``[d_a, d_a]`` and ``[d_g, d_g]``, what the kind declares in :attr:`BlockApproximator.blocks`)
and :func:`fit_value_flags` (finite factors; each term symmetric — both factors symmetric,
or both antisymmetric; a single term A ⊗ B with symmetric factors and a diagonal of the sign
of a curvature block, A_ii·B_jj ≥ 0), O(d²) per layer and refresh with one host
synchronisation for all layers; a failure raises :class:`~curvlib.errors.PluginOutputError`
naming the kind, its distribution and the layer.  :func:`single_term_definite_flag` (a
single term A ⊗ B positive semi-definite: A and B both PSD or both NSD, by a Cholesky
factorization) runs once per inversion; an indefinite single term gets a
:class:`~curvlib.errors.NumericalWarning` and the damping's documented rule for indefinite
blocks (:meth:`curvlib.approximators.BlockDiagonalApproximation.check_before_inversion`).
"""

from __future__ import annotations

import abc
import contextvars
import dataclasses
import functools
import importlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, Field

from curvlib.config import StrictModel, validate_options
from curvlib.curvatures.factors import kfac_factors
from curvlib.curvatures.statistics import LayerStatistics
from curvlib.errors import ConfigError, DTypeDeviceError, NumericalError, NumericalWarning, ShapeError, warn
from curvlib.linalg import KroneckerFactored, KroneckerSum, LayerBlockOperator, finite_screen
from curvlib.plugins.hookspecs import BlockDeclaration

_EXACT_BLOCK_CLASS = "curvlib.approximators.exact:ExactBlock"

__all__ = [
    "PSD_RTOL",
    "ApproximatorOptions",
    "BlockApproximator",
    "BlockDeclaration",
    "FactorFitted",
    "FitInfo",
    "LayerFit",
    "align_signs",
    "ema_pairs",
    "ema_rho",
    "ema_terms",
    "fit_structure_problem",
    "fit_value_flags",
    "fit_value_problem",
    "single_term_definite_flag",
    "single_term_sign_problem",
]


# --------------------------------------------------------------------------- options


class ApproximatorOptions(StrictModel):
    """Options shared by the Kronecker approximators.

    Attributes:
        ema: γ ∈ [0, 1] of the exponential moving average of §3.1.2, ρ = min(1 − 1/k, γ)
            at the k-th refresh; ``None`` (default) fits each batch on its own (ρ = 0).
        weight_sharing: how the positions of a weight-shared layer (a convolution, a
            Linear layer on tokens, a module called several times) combine —
            ``"expand"`` (default; KFC for convolutions) or ``"reduce"`` (Eschenhagen et al.
            2023); see :mod:`curvlib.curvatures.factors`.  Layers without positions are
            unaffected.
    """

    ema: float | None = Field(None, ge=0.0, le=1.0, description="EMA decay γ (ρ = min(1 − 1/k, γ)); None: no average")
    weight_sharing: Literal["expand", "reduce"] = Field(
        "expand", description="positions as extra samples ('expand') or summed first ('reduce')"
    )


# --------------------------------------------------------------------------- fit records


@dataclass(frozen=True)
class FitInfo:
    """What a fit reports.

    Attributes:
        method: the approximator kind (``"kpsvd"``, …).
        iterations: operator work of the iterative solver: power iterations summed over
            the power SVDs, or Lanczos steps summed over restarts; each costs one product
            with Z(F) and one with Z(F)ᵀ (Prop. 3.1).  0 for ``kfac`` and ``exact_block``.
        residuals: relative residual max(‖Zv − σu‖, ‖Zᵀu − σv‖)/σ of each singular
            triplet found (see :mod:`curvlib.linalg.svd`); ``()`` when none was computed.
        singular_values: σ of each triplet found, of the operator the solver saw (the
            deflated one for the second power SVD of a deflation, Z(F − A⊗G) for the
            correction of ``kfac_corrected``, the EMA-combined one in ``"fisher"`` mode).
        converged: every triplet met the tolerance within the iteration cap.
        refresh: k, the number of refreshes of this layer so far (1 for the first).
        rho: the EMA weight of the past used at this refresh, min(1 − 1/k, γ) (0 without EMA).
    """

    method: str
    iterations: int = 0
    residuals: tuple[float, ...] = ()
    singular_values: tuple[float, ...] = ()
    converged: bool = True
    refresh: int = 1
    rho: float = 0.0

    @property
    def residual(self) -> float:
        """The largest relative residual over the triplets (0.0 when none was computed)."""
        return max(self.residuals, default=0.0)


def _owns_contiguous_storage(M: torch.Tensor) -> bool:
    return M.is_contiguous() and M.storage_offset() == 0 and M.untyped_storage().nbytes() == M.numel() * M.element_size()


@dataclass(frozen=True)
class LayerFit:
    """One layer's fitted block, with what the fit reports and what the next refresh needs.

    Attributes:
        block: a :class:`~curvlib.linalg.LayerBlockOperator` declaring its capabilities: a
            :class:`~curvlib.linalg.KroneckerSum` Σ_k A_k ⊗ B_k (A_k ``[d_a, d_a]``,
            B_k ``[d_g, d_g]``), an :class:`~curvlib.approximators.exact.ExactBlock`, a plugin's.
        info: a :class:`FitInfo`.
        state: ``{"refresh": k}`` plus, for the iterative methods, ``"v0"``: the right
            singular vectors ``[d_g², K]`` of the last solve (warm start of the next one).
            Only tensors and ints.
    """

    block: LayerBlockOperator
    info: FitInfo
    state: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.block, LayerBlockOperator):
            raise ConfigError(
                f"LayerFit: the block must be a curvlib.linalg.LayerBlockOperator (e.g. a KroneckerSum, or a "
                f"KroneckerFactored / ShiftSolvable subclass), got {type(self.block).__name__}"
            )

    @property
    def terms(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """``block.terms``: the pairs (A_k ``[d_a, d_a]``, B_k ``[d_g, d_g]``).

        Raises:
            TypeError: the block is not :class:`~curvlib.linalg.KroneckerFactored` (e.g. an exact block).
        """
        if not isinstance(self.block, KroneckerFactored):
            raise TypeError(f"LayerFit.terms: the block is a {type(self.block).__name__}, not KroneckerFactored")
        return self.block.terms

    @property
    def refresh(self) -> int:
        """k, the number of refreshes so far."""
        return int(self.state.get("refresh", self.info.refresh))

    @property
    def a_dim(self) -> int:
        return self.block.a_dim

    @property
    def b_dim(self) -> int:
        return self.block.b_dim

    # -- serialization with plain containers (torch.load(weights_only=True) compatible)
    def state_dict(self) -> dict[str, Any]:
        """The fit as nested dicts of tensors, strings, numbers, tuples and ``None``.

        Loadable by ``torch.load`` with its default ``weights_only=True``; rebuild with
        :meth:`from_state_dict`.
        """
        if isinstance(self.block, KroneckerSum):
            block: dict[str, Any] = {
                "type": "kronecker_sum",
                "A": torch.stack([A for A, _ in self.block.terms]),
                "B": torch.stack([B for _, B in self.block.terms]),
            }
        else:  # any other block type (the exact block, a plugin's) is rebuilt by its own from_state_dict
            cls = type(self.block)
            block = {"type": "plugin", "class": f"{cls.__module__}:{cls.__qualname__}", **self.block.state_dict()}
        return {"block": block, "info": dataclasses.asdict(self.info), "state": dict(self.state)}

    def as_restored(self) -> LayerFit:
        """The fit as ``from_state_dict(state_dict())`` rebuilds it — the memory layout a
        checkpoint restores, so that a resumed run computes with the same tensors (BLAS rounding
        depends on strides and offsets) — without the copies where the layout already is that:
        a one-term Kronecker block whose factors each own their contiguous storage from offset 0
        keeps its tensors (a load unbinds a stack of one: the same layout); anything else takes
        the round trip."""
        if isinstance(self.block, KroneckerSum) and len(self.block.terms) == 1 and all(
                _owns_contiguous_storage(M) for M in self.block.terms[0]):
            return self._restored(KroneckerSum(self.block.terms), dataclasses.asdict(self.info), dict(self.state))
        return LayerFit.from_state_dict(self.state_dict())

    @classmethod
    def from_state_dict(cls, data: Mapping[str, Any]) -> LayerFit:
        """Inverse of :meth:`state_dict`."""
        block_data = dict(data["block"])
        kind = block_data.pop("type")
        if kind == "kronecker_sum":
            block: Any = KroneckerSum(zip(block_data["A"].unbind(0), block_data["B"].unbind(0)))
        elif kind == "exact_block":  # the name states of version ≤ 2 gave the exact block
            block = _plugin_block_class(_EXACT_BLOCK_CLASS).from_state_dict(block_data)
        elif kind == "plugin":
            block = _plugin_block_class(block_data.pop("class")).from_state_dict(block_data)
        else:
            raise ConfigError(
                f"LayerFit.from_state_dict: unknown block type {kind!r}; expected 'kronecker_sum', 'exact_block' or 'plugin'"
            )
        return cls._restored(block, data["info"], data["state"])

    @classmethod
    def _restored(cls, block: Any, info_data: Mapping[str, Any], state_data: Mapping[str, Any]) -> LayerFit:
        """The fit of a rebuilt block with its info and state checked and normalised as a load does."""
        info = dict(info_data)
        for key in ("residuals", "singular_values"):
            info[key] = tuple(float(x) for x in info.get(key, ()))
        state = dict(state_data)
        for where, values, key, low in (("info", info, "refresh", 1), ("info", info, "iterations", 0),
                                        ("state", state, "refresh", 1)):
            if key in values:
                _check_count(values[key], f"LayerFit.from_state_dict: {where}.{key}", low)
        rho = info.get("rho", 0.0)
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0.0 <= rho < 1.0:
            raise ConfigError(f"LayerFit.from_state_dict: info.rho = {rho!r}; expected a number in [0, 1)")
        return cls(block=block, info=FitInfo(**info), state=state)


def _check_count(value: Any, where: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{where} = {value!r}; expected an integer ≥ {low}")


def _plugin_block_class(path: str) -> type:
    """The block class a state dict names as ``"module:QualName"`` (a plugin's block type,
    which provides ``state_dict()`` and the classmethod ``from_state_dict(data)``)."""
    module_name, _, qualname = str(path).partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(
            f"LayerFit.from_state_dict: cannot import the block class {path!r} ({type(exc).__name__}: {exc}); "
            "is the plugin that fitted it installed?"
        ) from exc
    if not (isinstance(obj, type) and callable(getattr(obj, "from_state_dict", None))):
        raise ConfigError(f"LayerFit.from_state_dict: {path!r} is not a class with a from_state_dict(data) classmethod")
    return obj


# --------------------------------------------------------------------------- EMA helpers


#: The name of the layer being fitted, set by :func:`curvlib.approximate` around each
#: ``fit``/``fit_factors`` call so that an approximator's warnings and errors can name it.
fitting_layer: contextvars.ContextVar[str | None] = contextvars.ContextVar("fitting_layer", default=None)


def ema_rho(refresh: int, gamma: float | None) -> float:
    """ρ = min(1 − 1/k, γ) at the k-th refresh (§3.1.2); 0 when ``gamma`` is ``None``."""
    if refresh < 1:
        raise ConfigError(f"ema_rho: the refresh count k must be ≥ 1, got {refresh}")
    if gamma is None:
        return 0.0
    return min(1.0 - 1.0 / refresh, float(gamma))


def align_signs(
    new_terms: Sequence[tuple[torch.Tensor, torch.Tensor]],
    old_terms: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Flip (A_k, B_k) → (−A_k, −B_k) where that agrees better with the previous term k.

    A_k ⊗ B_k is unchanged by the flip.  Term k of ``new_terms`` is flipped when the sum
    of the cosines ⟨A_new, A_old⟩/(‖A_new‖‖A_old‖) + ⟨B_new, B_old⟩/(‖B_new‖‖B_old‖) is
    negative; on a tie (0, e.g. an all-zero term) it is kept.  Terms are matched by
    position (descending singular value).

    Args:
        new_terms, old_terms: pairs (A ``[d_a, d_a]``, B ``[d_g, d_g]``), the same number.

    Returns:
        the aligned new terms.
    """
    if len(new_terms) != len(old_terms):
        raise ShapeError(f"align_signs: expected as many new terms as old ones, got {len(new_terms)} and {len(old_terms)}")
    out = []
    for (A, B), (A0, B0) in zip(new_terms, old_terms):
        agreement = _cosine(A, A0) + _cosine(B, B0)
        out.append((-A, -B) if agreement < 0 else (A, B))
    return out


def _cosine(X: torch.Tensor, Y: torch.Tensor) -> float:
    nx, ny = torch.linalg.matrix_norm(X), torch.linalg.matrix_norm(Y)
    if float(nx) == 0.0 or float(ny) == 0.0:
        return 0.0
    return float((X * Y).sum() / (nx * ny))


def ema_terms(
    old_terms: Sequence[tuple[torch.Tensor, torch.Tensor]],
    new_terms: Sequence[tuple[torch.Tensor, torch.Tensor]],
    rho: float,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The factor-wise EMA of §3.1.2, term by term after :func:`align_signs`:

        A_k = ρ A_k^old + (1 − ρ) A_k^new,    B_k = ρ B_k^old + (1 − ρ) B_k^new.

    Returns:
        pairs (A_k ``[d_a, d_a]``, B_k ``[d_g, d_g]``).
    """
    return ema_pairs(old_terms, align_signs(new_terms, old_terms), rho)


def ema_pairs(
    old_terms: Sequence[tuple[torch.Tensor, torch.Tensor]],
    new_terms: Sequence[tuple[torch.Tensor, torch.Tensor]],
    rho: float,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """ρ·old + (1 − ρ)·new factor by factor, as they are (no sign alignment), each one kernel
    (``torch.lerp``) instead of three; new tensors, the inputs are not changed."""
    return [(torch.lerp(A, A0, rho), torch.lerp(B, B0, rho)) for (A0, B0), (A, B) in zip(old_terms, new_terms)]


# --------------------------------------------------------------------------- interface


class BlockApproximator(abc.ABC):
    """Fits one layer block from its statistics (and the previous fit, for EMA and warm starts).

    Subclasses set :attr:`options_model` (a pydantic model deriving from
    :class:`~curvlib.config.StrictModel`) and :attr:`kind`, and implement :meth:`fit`.
    Instances are stateless between calls: everything a refresh carries over lives in
    the :class:`LayerFit` it returns, so one approximator serves every layer.

    Args:
        options: an instance of :attr:`options_model`, a mapping validated against it,
            or ``None`` for the defaults.
    """

    options_model: ClassVar[type[BaseModel]] = ApproximatorOptions
    kind: ClassVar[str] = ""
    #: What every block :meth:`fit` returns is, e.g. ``BlockDeclaration((ShiftSolvable,))`` or
    #: ``BlockDeclaration((KroneckerFactored,), terms=(1, 1))``; ``None``: not declared (then
    #: only the data-time checks apply).  A kind whose blocks depend on its options overrides
    #: :meth:`declared_blocks` instead.  :func:`curvlib.build_preconditioner` checks it against
    #: the damping's :meth:`~curvlib.damping.Damping.block_requirement` before any data is
    #: seen, and :func:`curvlib.approximate` checks every fit against it.
    blocks: ClassVar[BlockDeclaration | None] = None
    #: Whether :meth:`fit` fits the global batch when the statistics are one rank's shard of it
    #: (:mod:`curvlib.distributed`): every sum over samples it computes goes through
    #: :meth:`_global_average` (KFAC's factors) or a :class:`~curvlib.distributed.ShardedZOperator`
    #: (the SVD methods' products).  A kind that does not declare it is refused under
    #: ``torch.distributed`` (its fits would differ between the ranks).
    distributed: ClassVar[bool] = False
    #: The :class:`~curvlib.distributed.Shard` the statistics belong to (set by
    #: :func:`curvlib.approximate`), ``None`` in one process.
    shard: Any = None

    def __init__(self, options: BaseModel | Mapping[str, Any] | None = None) -> None:
        model = type(self).options_model
        if options is None:
            options = model()
        elif isinstance(options, Mapping):
            options = validate_options(model, dict(options), where=f"approximator {self.kind!r}")
        elif not isinstance(options, model):
            raise ConfigError(
                f"{type(self).__name__}: expected options of type {model.__name__} (or a mapping), "
                f"got {type(options).__name__}"
            )
        self.options = options

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"

    def declared_blocks(self) -> BlockDeclaration | None:
        """What every block of this approximator (with its options) is: :attr:`blocks` by
        default; ``None`` when not declared.  A kind whose blocks depend on its options (the
        number of terms of ``deflation``/``lanczos`` is their ``rank``) overrides it."""
        return type(self).blocks

    @abc.abstractmethod
    def fit(self, stats: LayerStatistics, previous: LayerFit | None = None) -> LayerFit:
        """Fit the block F_ii = scale·J_i J_iᵀ of :class:`~curvlib.curvatures.statistics.LayerStatistics`
        (for one use: scale·Σ_b Σ_c Σ_{t,t'} ā_{b,t} ā_{b,t'}ᵀ ⊗ g_{b,c,t} g_{b,c,t'}ᵀ).

        Args:
            stats: the layer's statistics (uses with their positions; see that class).
            previous: the previous fit of the same layer by the same kind (EMA, warm
                start), or ``None``.

        Returns:
            a :class:`LayerFit` in the statistics' dtype and device.

        Raises:
            NumericalError: the statistics are not finite and there is no previous fit
                (with one, it is returned unchanged with a :class:`NumericalWarning`).
        """

    # -- helpers for implementations ---------------------------------------------------
    def _global_average(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Averages over this rank's samples -> averages over the global batch (one all-reduce;
        the tensors themselves in one process)."""
        return list(tensors) if self.shard is None else self.shard.average(tensors)

    def _check_previous(self, stats: LayerStatistics, previous: LayerFit | None) -> None:
        """Raise if ``previous`` cannot continue into a fit of ``stats`` by this kind."""
        self._check_previous_fits(previous, stats.a_dim, stats.g_dim, stats.dtype, stats.device, "the statistics")

    def _check_previous_fits(self, previous: LayerFit | None, a_dim: int, g_dim: int, dtype: torch.dtype,
                             device: torch.device, what: str) -> None:
        """Raise if ``previous`` cannot continue into a fit of a ``(a_dim, g_dim)`` block by this kind."""
        if previous is None:
            return
        if not isinstance(previous, LayerFit):
            raise ConfigError(f"{self.kind}: previous must be a LayerFit or None, got {type(previous).__name__}")
        if previous.info.method != self.kind:
            raise ConfigError(
                f"{self.kind}: the previous fit was made by {previous.info.method!r}; expected {self.kind!r} "
                "(EMA and warm starts continue one kind's fits)"
            )
        if (previous.a_dim, previous.b_dim) != (a_dim, g_dim):
            raise ShapeError(
                f"{self.kind}: the previous fit has (d_a, d_g) = {(previous.a_dim, previous.b_dim)}, {what} "
                f"{(a_dim, g_dim)}"
            )
        if previous.block.dtype != dtype or previous.block.device != device:
            raise DTypeDeviceError(
                f"{self.kind}: the previous fit is {previous.block.dtype} on {previous.block.device}, {what} "
                f"are {dtype} on {device}"
            )

    def _begin_refresh(self, stats: LayerStatistics, previous: LayerFit | None) -> tuple[LayerFit | None, int]:
        """The common start of :meth:`fit`.

        Returns:
            ``(previous, 0)`` when ``stats`` hold non-finite values and ``previous`` is kept
            (see :meth:`_keep_previous_if_nonfinite`; :meth:`fit` returns it as is); else
            ``(None, k)`` once :meth:`_check_previous` has passed, with k the refresh count
            of the new fit (1, or ``previous.refresh + 1``).
        """
        kept = self._keep_previous_if_nonfinite(stats, previous)
        if kept is not None:
            return kept, 0
        self._check_previous(stats, previous)
        return None, (1 if previous is None else previous.refresh + 1)

    def _keep_previous_if_nonfinite(self, stats: LayerStatistics, previous: LayerFit | None) -> LayerFit | None:
        """``previous`` (with a :class:`NumericalWarning`) if ``stats`` hold non-finite values,
        :class:`NumericalError` if they do and there is no previous fit, else ``None``."""
        bad_a, bad_g = stats.num_nonfinite()
        bad_scale = not math.isfinite(float(stats.scale))
        if not (bad_a or bad_g or bad_scale):
            return None
        why = f"non-finite statistics (activations: {bad_a} entries, gradients: {bad_g} entries, scale {stats.scale})"
        return self._fallback(why, previous)

    def _fallback(self, why: str, previous: LayerFit | None) -> LayerFit:
        """``previous`` with a :class:`NumericalWarning` naming the layer (:data:`fitting_layer`)
        and ``why``; :class:`NumericalError` when there is none."""
        layer = fitting_layer.get()
        who = self.kind if layer is None else f"{self.kind}, layer {layer!r}"
        if previous is None:
            raise NumericalError(f"{who}: {why}; expected finite values, and there is no previous fit to keep")
        warn(f"{who}: {why}; keeping the previous fit (refresh {previous.refresh}) unchanged", NumericalWarning)
        return previous


class FactorFitted(abc.ABC):
    """Capability of an approximator whose fit needs only a layer's KFAC factors
    (:func:`~curvlib.curvatures.factors.kfac_factors`), not its per-sample statistics — so it
    can be fitted from factors accumulated over a whole data set in one pass
    (:func:`~curvlib.curvatures.data.kfac_factors_over`)."""

    @abc.abstractmethod
    def fit_factors(self, terms: Sequence[tuple[torch.Tensor, torch.Tensor]], previous: LayerFit | None = None) -> LayerFit:
        """The fit from the factor terms ``[(A [d_a, d_a], G [d_g, d_g]), …]`` of one layer."""


class FromKFACFactors(FactorFitted):
    """A :class:`BlockApproximator` mixin whose fit is a function of the batch's KFAC factors
    (options ``weight_sharing``): :meth:`fit` computes them (averaged over the global batch under
    ``torch.distributed``: one all-reduce), :meth:`fit_factors` takes them from elsewhere; both
    screen them and continue into :meth:`_fit_terms` with finite factors."""

    def fit(self, stats: LayerStatistics, previous: LayerFit | None = None) -> LayerFit:
        """The fit from the KFAC factors of ``stats`` (see :meth:`BlockApproximator.fit`)."""
        kept, k = self._begin_refresh(stats, previous)
        if kept is not None:
            return kept
        terms = kfac_factors(stats, self.options.weight_sharing)
        if self.shard is not None:
            flat = self._global_average([M for term in terms for M in term])
            terms = [(flat[2 * t], flat[2 * t + 1]) for t in range(len(terms))]
        return self._fit_finite_terms(terms, k, previous)

    def fit_factors(self, terms: Sequence[tuple[torch.Tensor, torch.Tensor]], previous: LayerFit | None = None) -> LayerFit:
        """The fit from factors computed elsewhere (e.g. over a data set by
        :func:`~curvlib.curvatures.data.kfac_factors_over`), continuing ``previous`` as :meth:`fit` does."""
        terms = [(A, G) for A, G in terms]
        A0, G0 = terms[0]
        self._check_previous_fits(previous, A0.shape[0], G0.shape[0], A0.dtype, A0.device, "the factors")
        return self._fit_finite_terms(terms, 1 if previous is None else previous.refresh + 1, previous)

    def _fit_finite_terms(self, terms: list[tuple[torch.Tensor, torch.Tensor]], k: int,
                          previous: LayerFit | None) -> LayerFit:
        # finite statistics can still overflow in the factor GEMMs (inputs × 1e20): such factors
        # must never enter an EMA or a running update, or every later fit and inversion inherits them
        factors = [M for term in terms for M in term]
        bad = 0 if bool(finite_screen(factors)) else int(sum((~torch.isfinite(M)).sum() for M in factors))
        if bad:
            return self._fallback(f"non-finite KFAC factors ({bad} entries; finite statistics that overflowed)",
                                  previous)
        return self._fit_terms(terms, k, previous)

    @abc.abstractmethod
    def _fit_terms(self, terms: list[tuple[torch.Tensor, torch.Tensor]], k: int, previous: LayerFit | None) -> LayerFit:
        """The k-th fit from finite factor terms, continuing ``previous``."""


# --------------------------------------------------------------------------- output checks

#: Tolerance of the sign and positive semi-definiteness checks of a single-term block A ⊗ B:
#: a factor M (sign-normalized, see :func:`single_term_definite_flag`) counts as PSD when
#: λ_min(M) ≥ −PSD_RTOL·‖M‖_F (and its diagonal as non-negative when M_ii ≥ −PSD_RTOL·‖M‖_F).
#: Rounding and the solver tolerances of the built-in kinds stay orders of magnitude below it;
#: a negative-definite factor has λ_min ≤ −‖M‖_F/√d.
PSD_RTOL = 1e-3


def _what(x: Any) -> str:
    return "None" if x is None else f"a {type(x).__name__}"


def fit_structure_problem(
    fit: Any,
    *,
    a_dim: int,
    g_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    declared: BlockDeclaration | None = None,
) -> str | None:
    """What is wrong with the structure of an approximator's result for a layer whose
    statistics are ``(a_dim, g_dim)`` in ``dtype`` on ``device`` (``None``: nothing).

    Checks (no tensor is read, no host synchronisation): a :class:`LayerFit` whose block is a
    :class:`~curvlib.linalg.LayerBlockOperator` with the capabilities ``declared``, of the
    layer's (d_a, d_g) (so [p_i, p_i], p_i = d_a·d_g), dtype and device; a
    :class:`~curvlib.linalg.KroneckerFactored` block has at least one term, as many as
    declared, each a pair of tensors A_k ``[d_a, d_a]``, B_k ``[d_g, d_g]`` in that dtype
    and on that device.

    Returns:
        the problem, stating what was expected and what came, or ``None``.
    """
    if not isinstance(fit, LayerFit):
        return f"fit() returned {_what(fit)}; expected a curvlib.approximators.LayerFit (block, info, state)"
    block = fit.block
    if not isinstance(block, LayerBlockOperator):
        return f"fit() returned a LayerFit whose block is {_what(block)}; expected a curvlib.linalg.LayerBlockOperator"
    if declared is not None:
        missing = [c.__name__ for c in declared.capabilities if not isinstance(block, c)]
        if missing:
            return (f"fit() returned a {type(block).__name__} block, which is not {' and '.join(missing)}; "
                    f"the kind declares {declared}")
    p = a_dim * g_dim
    got = (int(block.a_dim), int(block.b_dim))
    if got != (a_dim, g_dim) or tuple(block.shape) != (p, p):
        return (
            f"fit() returned a block of (d_a, d_g) = {got} and shape {list(block.shape)}; expected "
            f"({a_dim}, {g_dim}) and [{p}, {p}] (p_i = d_a·d_g, the layer's parameter count), the layer's statistics"
        )
    if block.dtype != dtype or torch.device(block.device) != torch.device(device):
        return f"fit() returned a block in {block.dtype} on {block.device}; expected {dtype} on {device}, the statistics'"
    if not isinstance(block, KroneckerFactored):
        return None
    terms = block.terms
    if len(terms) == 0:
        return (f"fit() returned a {type(block).__name__} block with no terms; expected at least one pair "
                "(A [d_a, d_a], B [d_g, d_g])")
    if declared is not None and declared.terms is not None:
        lo, hi = declared.terms
        if len(terms) < lo or (hi is not None and len(terms) > hi):
            return f"fit() returned {len(terms)} Kronecker term(s); the kind declares {declared}"
    for k, term in enumerate(terms):
        if not (isinstance(term, (tuple, list)) and len(term) == 2):
            return f"term {k} is {_what(term)}; expected a pair (A_{k} [d_a, d_a], B_{k} [d_g, d_g])"
        for name, M, n in (("A", term[0], a_dim), ("B", term[1], g_dim)):
            if not isinstance(M, torch.Tensor):
                return f"term {k}: factor {name}_{k} is {_what(M)}; expected a tensor [{n}, {n}]"
            if tuple(M.shape) != (n, n):
                side = "d_a" if name == "A" else "d_g"
                return f"term {k}: factor {name}_{k} has shape {list(M.shape)}; expected [{side}, {side}] = [{n}, {n}]"
            if M.dtype != dtype or M.device != torch.device(device):
                return f"term {k}: factor {name}_{k} is {M.dtype} on {M.device}; expected {dtype} on {device}, the statistics'"
    return None


def _symmetry(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(symmetric, antisymmetric, zero) of M within rounding, 0-d bool tensors, from one probe:
    ‖Mv ∓ Mᵀv‖ ≤ √eps·‖M‖_F‖v‖ for a fixed pseudo-random v.  Two matrix-vector products
    and no d×d temporary (an asymmetry above ~√(d·eps) of ‖M‖_F is caught: the check is for
    a plugin's mistake, not for rounding)."""
    v = _probe(M.shape[0], M.dtype, M.device)
    Mv, Mtv = M @ v, v @ M
    size = torch.linalg.matrix_norm(M)
    tol = math.sqrt(torch.finfo(M.dtype).eps) * size * torch.linalg.vector_norm(v)
    return torch.linalg.vector_norm(Mv - Mtv) <= tol, torch.linalg.vector_norm(Mv + Mtv) <= tol, size == 0


@functools.lru_cache(maxsize=64)
def _probe(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The fixed probe vector of :func:`_symmetry` (seeded, so checks are reproducible)."""
    return torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64).to(dtype=dtype, device=device)


def _sign(A: torch.Tensor) -> torch.Tensor:
    """+1, or −1 when tr A < 0: A ⊗ B = (−A) ⊗ (−B) is checked with tr A ≥ 0."""
    return torch.where(torch.diagonal(A).sum() < 0, -1.0, 1.0).to(A.dtype)


def _diagonal_sign_ok(M: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """s·diag(M) ≥ −PSD_RTOL·‖M‖_F: the diagonal of a PSD factor is ≥ 0."""
    return (s * torch.diagonal(M) >= -PSD_RTOL * torch.linalg.matrix_norm(M)).all()


def fit_value_flags(fit: LayerFit, *, psd_by_construction: bool = False) -> torch.Tensor | None:
    """The O(d²) value checks of a structurally checked fit, on the block's device (no host
    synchronisation): ``[finite, symmetric, single_term_diagonal]`` (0/1), or ``None`` for a
    block that is not :class:`~curvlib.linalg.KroneckerFactored` (its tensors are its own).

    - finite: every factor;
    - symmetric: each term A_k ⊗ B_k — A_k and B_k both symmetric, or (the unconstrained
      fits of ``symmetric_factors=False``) both antisymmetric, within rounding;
    - single-term diagonal: one term A ⊗ B has symmetric factors whose diagonals have the
      sign of a PSD block (s·diag(A) ≥ 0 and s·diag(B) ≥ 0, s = sign tr A, up to
      :data:`PSD_RTOL`·‖·‖_F): a negative-definite block (−A, B) fails it.  Always 1 for
      sums of several terms, whose later terms are legitimately indefinite.

    Finiteness is checked by the one-reduction :func:`~curvlib.linalg.finite_screen` — a 0 may
    be a false alarm, which :func:`fit_value_problem` (the exact check) clears.  With
    ``psd_by_construction`` (the kind's :class:`~curvlib.plugins.hookspecs.BlockDeclaration`
    says ``psd_factors``: symmetric Gram matrices) only finiteness is checked.
    """
    block = fit.block
    if not isinstance(block, KroneckerFactored):
        return None
    if psd_by_construction:
        ones = torch.ones((), dtype=torch.bool, device=block.device)
        return torch.stack([finite_screen([M for term in block.terms for M in term]), ones, ones])
    symmetric = []
    for A, B in block.terms:
        (sa, aa, za), (sb, ab, zb) = _symmetry(A), _symmetry(B)
        symmetric.append((sa & sb) | (aa & ab) | za | zb)
    diagonal = torch.ones((), dtype=torch.bool, device=block.device)
    if len(block.terms) == 1:  # (sa, za, sb, zb) are the single term's
        (A, B), = block.terms
        s = _sign(A)
        diagonal = (sa & sb & _diagonal_sign_ok(A, s) & _diagonal_sign_ok(B, s)) | za | zb
    finite = finite_screen([M for term in block.terms for M in term])  # a 0 may be a false alarm (see above)
    return torch.stack([finite, torch.stack(symmetric).all(), diagonal])


def _spectrum_text(M: torch.Tensor) -> tuple[float, float, str]:
    """(λ_min, λ_max, text) of the symmetric part of M, in float64 (error messages only)."""
    S = M.detach().to(torch.float64)
    e = torch.linalg.eigvalsh(0.5 * (S + S.T))
    lo, hi = float(e[0]), float(e[-1])
    return lo, hi, f"eigenvalues in [{lo:.3e}, {hi:.3e}], ‖·‖_F = {float(torch.linalg.matrix_norm(S)):.3e}"


def single_term_sign_problem(block: KroneckerFactored) -> str | None:
    """Why a single-term block A ⊗ B fails the diagonal test of :func:`fit_value_flags` (the
    error path; O(d³) for the spectra it quotes, host): a factor that is not symmetric, or
    diagonal entries A_ii·B_jj of the wrong sign — a negative (semi-)definite block."""
    (A, B), = block.terms
    for name, M in (("A", A), ("B", B)):
        sym, _, zero = (bool(t) for t in _symmetry(M))
        if not (sym or zero):
            return (
                f"the single term A ⊗ B must have symmetric factors, but {name} {list(M.shape)} is not symmetric "
                f"(max|{name} − {name}ᵀ| = {float((M - M.T).abs().amax()):.3e}); expected A and B both PSD, or both NSD"
            )
    if bool(_symmetry(A)[2]) or bool(_symmetry(B)[2]):
        return None
    s = _sign(A)
    if bool(_diagonal_sign_ok(A, s)) and bool(_diagonal_sign_ok(B, s)):
        return None
    tol = PSD_RTOL

    def verdict(M: torch.Tensor) -> str:
        lo, hi, text = _spectrum_text(M)
        n = float(torch.linalg.matrix_norm(M.double()))
        kind = "PSD" if lo >= -tol * n else "NSD" if hi <= tol * n else "indefinite"
        d = torch.diagonal(M).double()
        return f"{kind} ({text}, diagonal in [{float(d.min()):.3e}, {float(d.max()):.3e}])"

    return (
        f"the single term A ⊗ B has diagonal entries A_ii·B_jj of the wrong sign (a negative (semi-)definite block, "
        f"while a curvature block's diagonal is ≥ 0): expected A and B both PSD, or both NSD (up to "
        f"−{tol:g}·‖·‖_F); got A {list(A.shape)} {verdict(A)} and B {list(B.shape)} {verdict(B)}"
    )


def fit_value_problem(fit: LayerFit) -> str | None:
    """Which check of :func:`fit_value_flags` fails, with the numbers (the error path; host)."""
    block = fit.block
    if not isinstance(block, KroneckerFactored):
        return None
    for k, (A, B) in enumerate(block.terms):
        for name, M in (("A", A), ("B", B)):
            bad = int((~torch.isfinite(M)).sum())
            if bad:
                return f"term {k}: factor {name}_{k} {list(M.shape)} has {bad} non-finite entries; expected finite factors"
    for k, (A, B) in enumerate(block.terms):
        (sa, aa, za), (sb, ab, zb) = ((bool(t) for t in _symmetry(M)) for M in (A, B))
        if not ((sa and sb) or (aa and ab) or za or zb):
            asym = {n: float((M - M.T).abs().amax() / M.abs().amax()) for n, M in ((f"A_{k}", A), (f"B_{k}", B))}
            rel = ", ".join(f"max|{n} − {n}ᵀ|/max|{n}| = {v:.3e}" for n, v in asym.items())
            return (
                f"term {k}: A_{k} ⊗ B_{k} is not symmetric ({rel}; rounding allows √eps = "
                f"{math.sqrt(torch.finfo(A.dtype).eps):.1e}); expected both factors symmetric (or both antisymmetric)"
            )
    if len(block.terms) == 1:
        return single_term_sign_problem(block)
    return None


def _cholesky_ok(M: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Cholesky of s·M + (PSD_RTOL·‖M‖_F + tiny)·I succeeds: λ_min(s·M) > −PSD_RTOL·‖M‖_F."""
    W = M if M.dtype in (torch.float32, torch.float64) else M.to(torch.float32)
    W = s.to(W.dtype) * 0.5 * (W + W.T)
    shift = PSD_RTOL * torch.linalg.matrix_norm(W) + torch.finfo(W.dtype).tiny
    eye = torch.eye(W.shape[0], dtype=W.dtype, device=W.device)
    return torch.linalg.cholesky_ex(W + shift * eye).info == 0


def single_term_definite_flag(block: LayerBlockOperator) -> torch.Tensor | None:
    """0-d bool tensor (no host synchronisation): a single-term block A ⊗ B is positive
    semi-definite — with s = −1 when tr A < 0, else 1, both s·A and s·B pass a Cholesky
    factorization after a shift of :data:`PSD_RTOL`·‖·‖_F (or a factor is zero).  ``None``
    for other blocks (sums of several terms, whose later terms may be indefinite; blocks
    without Kronecker factors).  O(d_a³ + d_g³): run once per inversion, where the factors
    are decomposed anyway (:meth:`CheckedApproximation.check_before_inversion
    <curvlib.plugins.hookspecs.CheckedApproximation.check_before_inversion>`)."""
    if not isinstance(block, KroneckerFactored) or len(block.terms) != 1:
        return None
    (A, B), = block.terms
    s = _sign(A)
    zero = (A == 0).all() | (B == 0).all()
    return (_cholesky_ok(A, s) & _cholesky_ok(B, s)) | zero
