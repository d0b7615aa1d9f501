"""The ``curvlib`` entry point of this distribution (``grouped_newton`` in pyproject.toml).

Registers two kinds:

* the ``grouped_direction`` coarse space (seed 004 §4.1 as a coarse basis,
  :mod:`curvlib_grouped_newton.coarse`);
* the ``grouped_newton`` optimizer (family ``optimizers``): the whole method,
  :class:`~curvlib_grouped_newton.optimizer.GroupedNewton`, so that
  ``curvlib bench --methods grouped_newton`` runs it like a built-in method.

The rest of the method is built from curvlib's own kinds (the ``hessian`` curvature) plus
what no curvlib family models: the third-order summary (appendix A), the
cubic-regularized solve (appendix D) and the schedule of appendix F.

In ``curvlib bench`` the learning rate (``--lr``, default :data:`DEFAULT_LR`) is the
optimizer's ``lr``: the damping factor λ_d multiplying every step (§5.2).  Its other
hyperparameters are the fields of :class:`GroupedNewtonBenchOptions` (a config file's
``optimizer_options``); the benchmark's ``momentum``, ``damping``, ``kl_clip``, … do not
reach it.  ``step`` needs ``batch=(X, y)`` (the learning rates η are recomputed on it
every ``period`` steps), so the kind is registered with ``needs_batch=True``.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from curvlib.config import StrictModel
from curvlib.plugins import hookimpl

from curvlib_grouped_newton.coarse import GroupedDirectionCoarseSpace, GroupedDirectionOptions
from curvlib_grouped_newton.optimizer import GroupedNewton, GroupedNewtonOptions

__all__ = ["DEFAULT_LR", "GroupedNewtonBench", "GroupedNewtonBenchOptions"]

_D = {name: f.default for name, f in GroupedNewtonOptions.model_fields.items()}

#: ``default_lr`` of the ``grouped_newton`` optimizer kind: :class:`GroupedNewtonOptions`'s λ_d.
DEFAULT_LR: float = float(_D["lr"])


class GroupedNewtonBenchOptions(StrictModel):
    """The hyperparameters of :class:`GroupedNewton` other than ``lr`` (which is the
    benchmark's learning rate); defaults and meaning are :class:`GroupedNewtonOptions`'s."""

    cubic: float = Field(_D["cubic"], ge=0)
    period: int = Field(_D["period"], ge=1)
    momentum: float | None = Field(_D["momentum"], ge=0, lt=1)
    lr_momentum: float = Field(_D["lr_momentum"], ge=0, lt=1)
    positive_part: bool = _D["positive_part"]
    zero_scale: float = Field(_D["zero_scale"], gt=0)
    plateau_every: int | None = Field(_D["plateau_every"], ge=1)
    plateau_patience: int = Field(_D["plateau_patience"], ge=0)
    plateau_factor: float = Field(_D["plateau_factor"], gt=0, lt=1)


class GroupedNewtonBench:
    """Builder of the ``grouped_newton`` optimizer kind: ``GroupedNewtonBench(options).build(...)``."""

    def __init__(self, options: GroupedNewtonBenchOptions) -> None:
        self.options = options

    def build(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        *,
        lr: float,
        generator: torch.Generator | None = None,
        registry: Any = None,
    ) -> GroupedNewton:
        """A :class:`GroupedNewton` on ``model`` with λ_d = ``lr`` (it draws nothing at random:
        ``generator`` is unused); one group per parameter tensor."""
        return GroupedNewton(model, loss_fn, registry=registry, lr=lr, **self.options.model_dump())


@hookimpl
def curvlib_register_coarse_spaces(registry) -> None:
    """Register the coarse space of seed 004."""
    registry.add(
        "grouped_direction",
        GroupedDirectionCoarseSpace,
        options=GroupedDirectionOptions,
        description="seed 004: one column per group, the direction u (gradient) restricted to it; "
        "R₀HR₀ᵀ is the summary Hessian H̄ = UᵀHU",
    )


@hookimpl
def curvlib_register_optimizers(registry) -> None:
    """Register the optimizer of seed 004 (``curvlib bench --methods grouped_newton``)."""
    registry.add(
        "grouped_newton",
        GroupedNewtonBench,
        options=GroupedNewtonBenchOptions,
        needs_batch=True,
        default_lr=DEFAULT_LR,
        description="seed 004: Newton's method over a partition (one group per tensor), "
        "cubic-regularized summary step; lr = damping factor λ_d",
    )
