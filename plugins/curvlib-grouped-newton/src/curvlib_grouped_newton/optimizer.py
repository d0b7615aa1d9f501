"""``GroupedNewton``: seed 004's method as a ``torch.optim.Optimizer`` (Method 4.1 with the
practical algorithm of appendix F).

Training loop (the same shape as :class:`curvlib.optim.NaturalGradient`)::

    opt = GroupedNewton(model, loss_fn, lr=0.5, cubic=1.0, period=10)
    for X, y in loader:
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step(batch=(X, y))        # the learning rates are recomputed on (X, y) when due

Step k (counted from 0; a skipped step does not count), with g_k the gradient in ``.grad``:

1. momentum on the gradients: u_k = g_k at k = 0, else u_k = μ u_{k−1} + (1 − μ) g_k
   (appendix F, "momentum"; default μ = 1 − 1/T, so that u remembers about T gradients);
2. every T steps (``period``; k = 0 included), ``compute_lr`` on ``batch`` (the sampler
   B' of appendix F; it is recommended to be about T times larger than the gradient
   minibatch): the summary ḡ, H̄ = UᵀHU, D̄ along u_k over the partition
   (:func:`~curvlib_grouped_newton.summary.grouped_summary`) and the solution η̂ of the
   cubic-regularized system (2) with internal damping λ_int (``cubic``; §4.2,
   appendix D); the learning rates follow a momentum:
   η_k = η̂ at the first computation, else ν η_{k−1} + (1 − ν) η̂ (``lr_momentum`` = ν);
   between two computations η is kept;
3. θ ← θ − λ_d Σ_s (η_s)₊ u_{k,s}: the damping factor λ_d (the group's ``lr``; §5.2) times
   the positive part of the learning rates ("we have to take the positive part of η in
   order to avoid negative learning rates", appendix F; ``positive_part=False`` keeps η);
4. optionally (``plateau_every`` = T_sched), every T_sched steps the mean of the losses
   seen since the last call (the losses ``closure`` returned; without a closure, the
   losses of the batches of the ``compute_lr`` steps) is passed to
   ``torch.optim.lr_scheduler.ReduceLROnPlateau``
   (patience P, factor f) acting on λ_d, "in order to reduce the damping when the loss
   attains a plateau".

Appendix F's equations do not survive in the seed's text; the two momentum rules (an
exponential average x ← βx + (1−β)x_new, starting from the first value), the order
"momentum, then positive part" and the default hyperparameters are this package's reading
of its prose, stated here once.  λ_d, λ_int, T, μ, ν are the paper's hyperparameters.

Invariance (appendix E): with u the gradient or its momentum, the trajectory is the same
in any parametrization θ_s → c_s θ_s (+ offsets) of the groups: H̄, ḡ, D̄ transform with
the diagonal A = diag(1/c_s²) and η with A⁻¹, so Uη does not change (tested).

Parameters: every trainable parameter of ``model`` must be covered by a curvlib layer
adapter (Linear, Conv2d, ConvTranspose2d, or a layer plugin's): the method has nothing to
say about the others, so they raise a :class:`~curvlib.errors.ConfigError`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from pydantic import Field
from torch import nn

from curvlib.config import StrictModel, validate_options
from curvlib.errors import ConfigError, NumericalWarning

from curvlib_grouped_newton.partition import GroupsSpec, resolve_partition
from curvlib_grouped_newton.rates import GroupedRates, learning_rates
from curvlib_grouped_newton.summary import GroupedSummary, grouped_summary, hessian_layout

__all__ = ["GroupedNewton", "GroupedNewtonOptions"]


class GroupedNewtonOptions(StrictModel):
    """The hyperparameters of :class:`GroupedNewton` (appendix F).

    The defaults of λ_d, λ_int, T and ν are the best of a short grid search on
    ``mnist_autoencoder`` (``small=True``, 200 steps; ``benchmarks/grouped_newton_vs_kfac.py``):
    a starting point, not a tuned optimum elsewhere — the seed grid-searches λ_d and λ_int
    per problem.  λ_int is dimensionless (λ_int = 1 is the diagonal third-order Taylor
    term itself); real networks need far more, because the cubic model keeps only the
    diagonal D̄ of the third derivative.

    Attributes:
        lr: λ_d > 0, the damping factor multiplying every step (§5.2); the param group's
            ``lr``, so torch learning-rate schedulers act on it.
        cubic: λ_int ≥ 0, the internal damping of the cubic term (§4.2); 0 gives the
            unregularized step (1).
        period: T ≥ 1, steps between two computations of η ("compute_lr").
        momentum: μ ∈ [0, 1) of the gradient average; ``None``: 1 − 1/T.
        lr_momentum: ν ∈ [0, 1) of the average of the learning rates.
        positive_part: step with (η)₊ (appendix F) rather than η.
        zero_scale: the fallback scale of groups with D̄_s = 0 when the cubic model would be
            unbounded below, relative to max d (:mod:`~curvlib_grouped_newton.rates`).
        plateau_every: T_sched, steps between two calls of the plateau schedule on λ_d;
            ``None``: no schedule.
        plateau_patience: P of ``ReduceLROnPlateau``.
        plateau_factor: f ∈ (0, 1) of ``ReduceLROnPlateau``.
    """

    lr: float = Field(1.0, gt=0)
    cubic: float = Field(1e4, ge=0)
    period: int = Field(5, ge=1)
    momentum: float | None = Field(None, ge=0, lt=1)
    lr_momentum: float = Field(0.5, ge=0, lt=1)
    positive_part: bool = True
    zero_scale: float = Field(1.0, gt=0)
    plateau_every: int | None = Field(None, ge=1)
    plateau_patience: int = Field(5, ge=0)
    plateau_factor: float = Field(0.5, gt=0, lt=1)

    @property
    def gradient_momentum(self) -> float:
        """μ: the given value, or 1 − 1/T."""
        return self.momentum if self.momentum is not None else 1.0 - 1.0 / self.period


class GroupedNewton(torch.optim.Optimizer):
    """Newton's method over a partition of the parameters (seed 004; module docstring).

    Args:
        model: the network.
        loss_fn: its loss module (see :func:`curvlib.curvature`); the method minimizes
            ``loss_fn(model(X), y)``.
        groups: the partition (default: one group per parameter tensor; see
            :func:`~curvlib_grouped_newton.partition.resolve_partition`).
        registry: the curvlib plugin registry (layer adapters).
        **options: :class:`GroupedNewtonOptions` fields (``lr``, ``cubic``, ``period``,
            ``momentum``, ``lr_momentum``, …), validated.

    Attributes:
        options: the validated :class:`GroupedNewtonOptions`.
        last_summary: the :class:`~curvlib_grouped_newton.summary.GroupedSummary` of the
            last computation of η (``None`` before).
        last_rates: the :class:`~curvlib_grouped_newton.rates.GroupedRates` of it.
        partition: the :class:`~curvlib.coarse.Partition` in use (after the first step).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        *,
        groups: GroupsSpec = None,
        registry: Any = None,
        **options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"GroupedNewton: expected model to be an nn.Module, got {type(model).__name__}")
        opts = validate_options(GroupedNewtonOptions, options, where="GroupedNewton")
        assert isinstance(opts, GroupedNewtonOptions)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("GroupedNewton: the model has no trainable parameters")
        super().__init__(params, {"lr": opts.lr})
        self.options = opts
        self.model = model
        self.loss_fn = loss_fn
        self.groups = groups
        self.registry = registry
        self.partition = None
        self.last_summary: GroupedSummary | None = None
        self.last_rates: GroupedRates | None = None
        self._layout: Any = None
        self._step = 0
        self._eta: torch.Tensor | None = None  # [S] float64, after the momentum ν
        self._coef: dict[int, torch.Tensor] | None = None
        self._losses: list[float] = []  # closure losses since the last plateau call
        self._lr_losses: list[float] = []  # losses of the compute_lr batches since then
        self._plateau = None
        if opts.plateau_every is not None:
            self._plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self, mode="min", factor=opts.plateau_factor, patience=opts.plateau_patience
            )

    # -- description ------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Steps taken so far."""
        return self._step

    @property
    def learning_rates(self) -> torch.Tensor | None:
        """η ``[S]`` (float64) in use, after the momentum ν (before the positive part); ``None`` before the first step."""
        return None if self._eta is None else self._eta.clone()

    @property
    def group_names(self) -> list[str]:
        """The names of the S groups (after the first step)."""
        return [] if self.partition is None else list(self.partition.names)

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    # -- pieces ------------------------------------------------------------------------------
    def _ensure_layout(self, batch: Any) -> None:
        if self._layout is not None:
            return
        layout = hessian_layout(self.model, self.loss_fn, batch, registry=self.registry)
        if layout.excluded:
            raise ConfigError(
                "GroupedNewton: the parameters " + ", ".join(layout.excluded) + " have no layer adapter; freeze "
                "them (requires_grad=False) or register a layer plugin for their modules"
            )
        mine = {id(p) for p in self._params()}
        theirs = {id(p) for p in layout.params()}
        if mine != theirs:
            raise ConfigError(
                f"GroupedNewton: the optimizer holds {len(mine)} parameters and the model's adapted layers "
                f"{len(theirs)}; they must be the same tensors (pass the whole model)"
            )
        self._layout = layout
        self.partition = resolve_partition(self.groups, layout)

    def _set_coefficients(self) -> None:
        """Per-parameter tensors holding (η_s)₊ (or η_s) on the entries of group s."""
        assert self._eta is not None and self._layout is not None and self.partition is not None
        eta = self._eta.clamp_min(0) if self.options.positive_part else self._eta
        F = self._layout
        flat = torch.empty(F.p, dtype=F.dtype, device=F.device)
        values = eta.to(dtype=F.dtype, device=F.device)
        for s, grp in enumerate(self.partition.groups):
            if isinstance(grp, slice):
                flat[grp] = values[s]
            else:
                flat.index_fill_(0, self.partition.index(s, flat.device), values[s])
        coef = F.vector_to_params(flat)
        self._coef = {id(p): c for p, c in zip(F.params(), coef)}

    def _compute_lr(self, batch: Any) -> None:
        """appendix F "compute_lr": summary along u on ``batch``, cubic solve, momentum ν."""
        F = self._layout
        u = [self.state[p]["direction"] for p in F.params()]
        opts = self.options
        summary = grouped_summary(
            self.model, self.loss_fn, batch, direction=u, groups=self.partition,
            third_order=opts.cubic > 0, curvature=F,
        )
        self.last_summary = summary
        if self._plateau is not None:
            self._lr_losses.append(float(summary.loss))
        finite = all(bool(torch.isfinite(t).all()) for t in (summary.g_bar, summary.H_bar)) and (
            summary.D_bar is None or bool(torch.isfinite(summary.D_bar).all())
        )
        rates = learning_rates(summary, opts.cubic, zero_scale=opts.zero_scale) if finite else None
        if rates is None or not bool(torch.isfinite(rates.eta).all()):
            warnings.warn(
                f"GroupedNewton: non-finite summary or learning rates at step {self._step}; the learning rates "
                "are kept" + ("" if self._eta is not None else " (zero: no previous value)"),
                NumericalWarning,
                stacklevel=3,
            )
            if self._eta is None:
                self._eta = torch.zeros(len(self.partition), dtype=torch.float64, device=F.device)
            return
        self.last_rates = rates
        nu = opts.lr_momentum
        self._eta = rates.eta.clone() if self._eta is None else nu * self._eta + (1.0 - nu) * rates.eta

    def _grads_finite(self) -> bool:
        flags = [torch.isfinite(p.grad).all() for p in self._params() if p.grad is not None]
        return bool(torch.stack(flags).all()) if flags else True

    # -- the step ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, batch: Any = None) -> Any:
        """One step (module docstring).

        Args:
            closure: optional; re-evaluates the model, calls ``backward`` and returns the loss.
            batch: ``(X, y)``, needed at the steps that compute η (every ``period`` steps,
                the first included) — the sampler B' of appendix F.

        Returns:
            the closure's loss, if any.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        k = self._step
        due = k % self.options.period == 0 or self._coef is None
        if due and batch is None:
            raise ConfigError(
                f"GroupedNewton.step: the learning rates are due at step {k} (period T = {self.options.period}; "
                "the first step always computes them) and need a batch: call opt.step(batch=(X, y))"
            )
        if not self._grads_finite():
            warnings.warn(
                f"GroupedNewton.step: non-finite gradients at step {k}; the step is skipped",
                NumericalWarning,
                stacklevel=2,
            )
            return loss
        mu = self.options.gradient_momentum
        for p in self._params():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            state = self.state[p]
            u = state.get("direction")
            if u is None:
                state["direction"] = g.detach().clone()
            else:
                u.mul_(mu).add_(g, alpha=1.0 - mu)
        if due:
            self._ensure_layout(batch)
            if k % self.options.period == 0 or self._eta is None:
                self._compute_lr(batch)
            self._set_coefficients()
        assert self._coef is not None
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                p.addcmul_(self._coef[id(p)], self.state[p]["direction"], value=-lr)
        self._step += 1
        if loss is not None and self._plateau is not None:
            self._losses.append(float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss))
        if self._plateau is not None and self._step % self.options.plateau_every == 0:
            window = self._losses or self._lr_losses
            self._losses, self._lr_losses = [], []
            metric = sum(window) / len(window) if window else float("nan")
            if math.isfinite(metric):
                self._plateau.step(metric)
        return loss

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``torch.optim`` state (the gradient averages u) plus the step count, η and the schedule."""
        out = super().state_dict()
        out["grouped_newton"] = {
            "step": self._step,
            "eta": None if self._eta is None else self._eta.clone(),
            "losses": list(self._losses),
            "lr_losses": list(self._lr_losses),
            "plateau": None if self._plateau is None else self._plateau.state_dict(),
        }
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the coefficients are rebuilt at the next step (which then needs ``batch``)."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("grouped_newton", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self._step = int(extra["step"])
            self._eta = None if extra["eta"] is None else extra["eta"].clone()
            self._losses = list(extra["losses"])
            self._lr_losses = list(extra["lr_losses"])
            if self._plateau is not None and extra["plateau"] is not None:
                self._plateau.load_state_dict(extra["plateau"])
        self._coef = None
