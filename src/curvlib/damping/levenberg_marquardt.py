"""``levenberg_marquardt``: an inner damping whose λ adapts to the reduction ratio.

The thesis notes that KFAC's λ "is gradually adjusted according to the behavior of the
iterates" (after (2.96)) without giving the rule; curvlib uses Martens & Grosse's
Levenberg–Marquardt rule with their constants.  With the quadratic model of the objective
h around θ,

    q(δ) − q(0) = ∇hᵀδ + ½ δᵀ C δ                          (:func:`quadratic_model_change`)

(C the curvature the step was computed from, undamped or damped as the caller chooses),
the reduction ratio of a step δ is

    ρ = (h(θ + δ) − h(θ)) / (q(δ) − q(0))                   (:func:`reduction_ratio`)

and :meth:`LevenbergMarquardtDamping.update` moves λ by

    ρ < 1/4  (the model was too optimistic):  λ ← λ / ω
    ρ > 3/4  (the model was trustworthy):      λ ← ω · λ
    otherwise:                                 λ unchanged
    then λ ← min(max(λ, floor), ceiling)

with ω = (19/20)^{T1} when λ is updated every T1 steps (``interval``), or the ``omega``
given.  A non-finite ρ (the loss became NaN/inf, or q(δ) = q(0)) counts as a failed step
(λ ← λ/ω) with a :class:`NumericalWarning`.  The thresholds 1/4 and 3/4 are the options
``rho_low`` and ``rho_high``.

λ has the meaning of the inner kind (``tikhonov``: M = Σ A_k⊗B_k + λI; ``heuristic``:
the π-split (2.95)); :meth:`invert` uses the current λ.  After :meth:`update`, rebuild
the inverses (``curvlib.damped_inverse(approx, inv.damping, previous=inv)``) for the new
λ to take effect.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from curvlib.config import FrozenDict, StrictModel, validate_options
from curvlib.damping.base import BlockInverse, BlockRequirement, Damping
from curvlib.damping.heuristic import HeuristicDamping, HeuristicOptions
from curvlib.damping.tikhonov import TikhonovDamping, TikhonovOptions
from curvlib.errors import ConfigError, DTypeDeviceError, NumericalWarning, ShapeError, warn

__all__ = [
    "LevenbergMarquardtOptions",
    "LevenbergMarquardtDamping",
    "quadratic_model_change",
    "reduction_ratio",
    "OMEGA_BASE",
]

#: ω per step of Martens & Grosse's rule: ω = OMEGA_BASE ** T1.
OMEGA_BASE = 19.0 / 20.0

_INNER: dict[str, tuple[type[Damping], type[StrictModel]]] = {
    "tikhonov": (TikhonovDamping, TikhonovOptions),
    "heuristic": (HeuristicDamping, HeuristicOptions),
}


class LevenbergMarquardtOptions(StrictModel):
    """Options of the ``levenberg_marquardt`` damping.

    Attributes:
        value: the initial λ > 0 (meaning: the inner kind's λ), within [floor, ceiling].
        inner: the damping whose λ is adapted: ``"tikhonov"`` (default) or ``"heuristic"``.
        inner_options: the inner kind's other options (not ``value``), e.g.
            ``{"pcg_tol": 1e-10}`` or ``{"floor": 0.05}``.
        interval: T1, the number of optimizer steps between two λ updates (sets ω).
        omega: the factor ω ∈ (0, 1); default (19/20)^interval.
        rho_low: below this ρ, λ grows (default 1/4).
        rho_high: above this ρ, λ shrinks (default 3/4).
        floor: the smallest λ, > 0.
        ceiling: the largest λ.
    """

    value: float = Field(gt=0, allow_inf_nan=False, description="initial λ of the inner damping")
    inner: Literal["tikhonov", "heuristic"] = "tikhonov"
    inner_options: FrozenDict = Field(default_factory=FrozenDict)
    interval: int = Field(1, ge=1)
    omega: float | None = Field(None, gt=0, lt=1, allow_inf_nan=False)
    rho_low: float = Field(0.25, allow_inf_nan=False)
    rho_high: float = Field(0.75, allow_inf_nan=False)
    floor: float = Field(1e-8, gt=0, allow_inf_nan=False)
    ceiling: float = Field(1e8, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _check(self) -> LevenbergMarquardtOptions:
        if not self.floor < self.ceiling:
            raise ValueError(f"floor ({self.floor}) must be < ceiling ({self.ceiling})")
        if not self.floor <= self.value <= self.ceiling:
            raise ValueError(f"value ({self.value}) must lie in [floor, ceiling] = [{self.floor}, {self.ceiling}]")
        if not self.rho_low < self.rho_high:
            raise ValueError(f"rho_low ({self.rho_low}) must be < rho_high ({self.rho_high})")
        if "value" in self.inner_options or "kind" in self.inner_options:
            raise ValueError("inner_options must not set 'value' or 'kind': λ is the adaptive 'value' field")
        _, model = _INNER[self.inner]
        try:
            validate_options(model, {**self.inner_options, "value": self.value}, where=f"inner damping '{self.inner}'")
        except ConfigError as exc:
            raise ValueError(f"inner_options: {exc}") from None
        return self

    @property
    def resolved_omega(self) -> float:
        """ω: ``omega`` if given, else (19/20)^interval."""
        return self.omega if self.omega is not None else OMEGA_BASE**self.interval


class LevenbergMarquardtDamping(Damping):
    """``levenberg_marquardt``: the inner damping's M⁻¹ with λ adapted by Martens & Grosse's rule."""

    kind = "levenberg_marquardt"
    options_model = LevenbergMarquardtOptions
    adaptive = True

    def __init__(self, options: Any = None, /, **overrides: Any) -> None:
        super().__init__(options, **overrides)
        self._lam = float(self.options.value)
        self._num_updates = 0
        self._inner_cache: tuple[float, Damping] | None = None

    @property
    def value(self) -> float:
        """The current λ."""
        return self._lam

    @property
    def omega(self) -> float:
        return self.options.resolved_omega

    @property
    def num_updates(self) -> int:
        """How many times :meth:`update` ran."""
        return self._num_updates

    @property
    def formula_kind(self) -> str:
        """The inner kind: λ has its meaning."""
        return self.options.inner

    @property
    def inner(self) -> Damping:
        """The inner damping at the current λ."""
        if self._inner_cache is None or self._inner_cache[0] != self._lam:
            cls, _ = _INNER[self.options.inner]
            self._inner_cache = (self._lam, cls(dict(self.options.inner_options), value=self._lam))
        return self._inner_cache[1]

    def block_requirement(self) -> BlockRequirement | None:
        """What the inner damping inverts (λ, and so the blocks, follow the inner kind)."""
        return self.inner.block_requirement()

    def inverse_capabilities(self, block: tuple[type, ...], terms: int | None) -> tuple[type, ...] | None:
        """What the inner damping's inverses offer: :meth:`invert` builds them."""
        return self.inner.inverse_capabilities(block, terms)

    def _invert(self, block: Any) -> BlockInverse:
        return self.inner._invert(block)

    def update(self, reduction_ratio: float | torch.Tensor) -> float:
        """Move λ by the rule of the module docstring; returns the new λ.

        Args:
            reduction_ratio: ρ = (h(θ+δ) − h(θ)) / (q(δ) − q(0)), a float or a 0-d tensor.
        """
        rho = float(reduction_ratio)
        o = self.options
        omega = o.resolved_omega
        lam = self._lam
        if not math.isfinite(rho):
            warn(
                f"LevenbergMarquardtDamping.update: non-finite reduction ratio {rho}; treating the step as a "
                f"failure and increasing λ from {lam:.3e} to {lam / omega:.3e}",
                NumericalWarning,
            )
            lam = lam / omega
        elif rho < o.rho_low:
            lam = lam / omega
        elif rho > o.rho_high:
            lam = omega * lam
        self._lam = min(max(lam, o.floor), o.ceiling)
        self._num_updates += 1
        return self._lam

    def state_dict(self) -> dict[str, Any]:
        """``{"kind": "levenberg_marquardt", "value": λ, "num_updates": n}`` (λ a Python float: exact)."""
        return {"kind": self.kind, "value": self._lam, "num_updates": self._num_updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore λ (and the update count) from :meth:`state_dict`.

        Raises:
            ConfigError: wrong kind, missing or invalid value (not finite, ≤ 0, or outside
                [floor, ceiling]).
        """
        caller = "LevenbergMarquardtDamping.load_state_dict"
        if not isinstance(state, Mapping):
            raise ConfigError(f"{caller}: expected a mapping, got {type(state).__name__}")
        kind = state.get("kind", self.kind)
        if kind != self.kind:
            raise ConfigError(f"{caller}: state of kind {kind!r}, expected {self.kind!r}")
        unknown = set(state) - {"kind", "value", "num_updates"}
        if unknown:
            raise ConfigError(f"{caller}: unknown keys {sorted(unknown)}; expected 'kind', 'value', 'num_updates'")
        if "value" not in state:
            raise ConfigError(f"{caller}: missing 'value' (λ)")
        lam = float(state["value"])
        o = self.options
        if not (math.isfinite(lam) and o.floor <= lam <= o.ceiling):
            raise ConfigError(f"{caller}: value must be finite and in [floor, ceiling] = [{o.floor}, {o.ceiling}], got {lam}")
        n = int(state.get("num_updates", 0))
        if n < 0:
            raise ConfigError(f"{caller}: num_updates must be ≥ 0, got {n}")
        self._lam = lam
        self._num_updates = n


def quadratic_model_change(
    grad: torch.Tensor, direction: torch.Tensor, curvature_product: torch.Tensor
) -> torch.Tensor:
    """q(δ) − q(0) = gᵀδ + ½ δᵀ(Cδ), the change predicted by the quadratic model.

    Args:
        grad: g = ∇h(θ) ``[p]``.
        direction: the step δ actually taken (θ ← θ + δ) ``[p]``.
        curvature_product: C δ ``[p]`` (C the curvature the model uses).

    Returns:
        a 0-d tensor in the inputs' dtype and device (negative for a step the model
        predicts to decrease h).
    """
    caller = "quadratic_model_change"
    for name, t in (("direction", direction), ("curvature_product", curvature_product)):
        if t.shape != grad.shape:
            raise ShapeError(f"{caller}: {name} must be shaped like grad {list(grad.shape)}, got {list(t.shape)}")
        if t.dtype != grad.dtype or t.device != grad.device:
            raise DTypeDeviceError(
                f"{caller}: {name} is {t.dtype} on {t.device}, grad is {grad.dtype} on {grad.device}"
            )
    return (grad * direction).sum() + 0.5 * (direction * curvature_product).sum()


def reduction_ratio(
    loss_before: float | torch.Tensor, loss_after: float | torch.Tensor, model_change: float | torch.Tensor
) -> float:
    """ρ = (h(θ+δ) − h(θ)) / (q(δ) − q(0)); NaN when q(δ) − q(0) is 0 or non-finite.

    Args:
        loss_before: h(θ).
        loss_after: h(θ + δ).
        model_change: q(δ) − q(0), e.g. from :func:`quadratic_model_change`.
    """
    predicted = float(model_change)
    if predicted == 0 or not math.isfinite(predicted):
        return math.nan
    return (float(loss_after) - float(loss_before)) / predicted
