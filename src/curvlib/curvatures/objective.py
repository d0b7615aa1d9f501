"""Objectives that are not likelihoods: any scalar loss that is a mean (or sum) of per-sample terms.

A GAN's critic loss, a generator's ``−D(G(z))``, a contrastive term: none is the negative
log-likelihood of a model of the targets, so the ``fisher`` kind (targets sampled from the
model) has no meaning for them. :class:`Objective` wraps such a loss so that the curvatures
that *are* defined for it can be captured, and the optimizer can train with it::

    critic = Objective(lambda out, sign: 2 * sign * out.squeeze(1))   # ℓ_b = 2 s_b D(x_b)
    opt = NaturalGradient(D, critic, {"curvature": "empirical_fisher"}, lr=1e-3)

With f_b the network's output for sample b and ``per_sample(f, y)`` returning the terms
ℓ_b ``[m]`` (each depending on f_b and y_b only), the objective is

    L = (1/m) Σ_b ℓ_b   (reduction "mean"),        L = Σ_b ℓ_b   (reduction "sum"),

and, as for every loss (:mod:`curvlib.curvatures.losses`), each curvature is the per-sample
mean (1/m) Σ_b C_b with

- ``empirical_fisher``: C_b = J_bᵀ ∇_f ℓ_b ∇_f ℓ_bᵀ J_b — the per-sample gradients' outer
  products (k = 1: there is no likelihood to rescale), captured from the caller's own forward
  pass like any loss's;
- ``ggn``: C_b = J_bᵀ ∇²_f ℓ_b J_b, defined when every ∇²_f ℓ_b is positive semi-definite
  (square-root columns √e_j v_j of its eigendecomposition); ∇²_f ℓ_b comes from
  ``output_hessian(f, y)`` ``[m, c, c]`` when given, else from autograd (c extra backward
  passes through ``per_sample``, c the output entries per sample). An indefinite output
  Hessian raises :class:`~curvlib.errors.UnsupportedLossError` naming the sample — the GGN
  of, e.g., a generator's ``−D(x)`` is indefinite, its empirical Fisher is not;
- ``hessian``: the exact Hessian of L (double back-propagation through ``per_sample``).

What enters the statistics is the per-sample terms of the captured forward pass, nothing
else: a gradient penalty computed on another forward pass (WGAN-GP's interpolates, outside
the capture block, docs/gan.md) contributes to the gradient the optimizer preconditions but
not to the curvature.

The targets ``y`` may be ``None`` (``batch=(z, None)``): ``per_sample`` receives whatever the
batch carries.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from curvlib.curvatures.losses import Columns, LossModel
from curvlib.errors import ConfigError, UnsupportedLossError

__all__ = ["Objective", "ObjectiveLossModel"]

PerSample = Callable[[torch.Tensor, Any], torch.Tensor]


class ObjectiveLossModel(LossModel):
    """An :class:`Objective` seen through the per-sample convention: k = 1, no sampling."""

    target_required = False

    def check(self, output: torch.Tensor, target: Any) -> None:
        if output.ndim < 1:
            raise UnsupportedLossError(f"Objective {self.loss_fn.name}: expected an output [m, *out], got a scalar")

    def k(self, output: torch.Tensor) -> float:
        return 1.0

    def sample_targets(self, output: torch.Tensor, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        raise UnsupportedLossError(
            f"Objective {self.loss_fn.name} is not the negative log-likelihood of a model of the targets, so the "
            "true Fisher (kind 'fisher', targets sampled from the model) is not defined for it: use "
            "'empirical_fisher' (its per-sample gradients) or 'ggn'"
        )

    def output_hessians(self, output: torch.Tensor, target: Any) -> torch.Tensor:
        """∇²_f ℓ_b of every sample, ``[m, c, c]`` (symmetric): the user's, or by autograd."""
        m, c = output.shape[0], self.num_outputs(output)
        f = output.detach()
        given = self.loss_fn.output_hessian
        if given is not None:
            H = given(f, target)
            if not isinstance(H, torch.Tensor) or tuple(H.shape) != (m, c, c):
                got = list(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__
                raise UnsupportedLossError(f"Objective {self.loss_fn.name}: output_hessian must return [m, c, c] = "
                                           f"{[m, c, c]}, got {got}")
            H = H.to(f.dtype)
        else:
            flat = f.reshape(m, c).requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(self.loss_fn.terms(flat.reshape(f.shape), target).sum(), flat,
                                           create_graph=True)
                if not g.requires_grad:  # ℓ_b linear in f_b: ∇²_f ℓ_b = 0
                    return torch.zeros(m, c, c, dtype=f.dtype, device=f.device)
                rows = []
                for j in range(c):  # row j of every sample's Hessian: ∂(∇_f ℓ_b)_j / ∂f_b (ℓ_b: sample b only)
                    (h,) = torch.autograd.grad(g[:, j].sum(), flat, retain_graph=j < c - 1, allow_unused=True)
                    rows.append(torch.zeros_like(flat) if h is None else h)
            H = torch.stack(rows, dim=1)
        return (H + H.transpose(1, 2)) / 2

    def ggn_columns(self, output: torch.Tensor, target: Any = None) -> Columns:
        H = self.output_hessians(output, target)
        e, V = torch.linalg.eigh(H)  # [m, c], [m, c, c]
        size = e.abs().amax(dim=1)
        tol = math.sqrt(torch.finfo(e.dtype).eps) * size
        bad = e[:, 0] < -tol
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            raise UnsupportedLossError(
                f"Objective {self.loss_fn.name}: the output Hessian ∇²_f ℓ_b of sample {b} has the eigenvalue "
                f"{float(e[b, 0]):.3g} < 0 (largest |eigenvalue| {float(size[b]):.3g}), so the GGN J_bᵀ ∇²_f ℓ_b J_b is "
                "not positive semi-definite and has no square-root columns; use curvature 'empirical_fisher', "
                "which every objective has"
            )
        roots = V * e.clamp_min(0).sqrt().unsqueeze(1)  # column j: √e_j v_j
        return Columns(roots.shape[2], lambda j: roots[:, :, j].reshape(output.shape))


class Objective(nn.Module):
    """A scalar objective L of per-sample terms ℓ_b = ``per_sample(f, y)[b]`` (module docstring).

    Args:
        per_sample: ``(output [m, *out], targets or None) -> [m]``, term b depending on
            sample b's output (and target) only. A module (a critic) is called, not registered:
            its parameters are not this loss's.
        reduction: ``"mean"`` (L = (1/m) Σ_b ℓ_b) or ``"sum"`` (L = Σ_b ℓ_b).
        output_hessian: optional ``(output, targets) -> [m, c, c]``, ∇²_f ℓ_b of each sample
            (c = prod(out)); without it the ``ggn`` kind differentiates ``per_sample`` twice.
        name: how messages and ``repr`` call it (default: ``per_sample``'s name).
    """

    #: the :class:`LossModel` :func:`~curvlib.curvatures.losses.loss_model_for` sees it through
    loss_model = ObjectiveLossModel

    def __init__(self, per_sample: PerSample, *, reduction: str = "mean",
                 output_hessian: PerSample | None = None, name: str | None = None) -> None:
        super().__init__()
        if not callable(per_sample):
            raise ConfigError(f"Objective: expected per_sample to be a callable (output, targets) -> [m], "
                              f"got {type(per_sample).__name__}")
        if reduction not in ("mean", "sum"):
            raise ConfigError(f"Objective: expected reduction 'mean' or 'sum', got {reduction!r}")
        if output_hessian is not None and not callable(output_hessian):
            raise ConfigError(f"Objective: expected output_hessian to be a callable (output, targets) -> [m, c, c] "
                              f"or None, got {type(output_hessian).__name__}")
        # plain attributes: a critic passed as per_sample must not become a submodule of the loss
        self.__dict__["per_sample"] = per_sample
        self.__dict__["output_hessian"] = output_hessian
        self.reduction = reduction
        self.name = name or getattr(per_sample, "__qualname__", type(per_sample).__name__)

    def terms(self, output: torch.Tensor, target: Any = None) -> torch.Tensor:
        """ℓ_b of every sample, ``[m]`` (checked)."""
        t = self.per_sample(output, target)
        m = output.shape[0] if output.ndim else None
        if not isinstance(t, torch.Tensor) or m is None or tuple(t.shape) != (m,):
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise UnsupportedLossError(f"Objective {self.name}: per_sample must return the m = {m} per-sample terms "
                                       f"[m] for the output {list(output.shape)}, got {got}")
        return t

    def forward(self, output: torch.Tensor, target: Any = None) -> torch.Tensor:
        t = self.terms(output, target)
        return t.mean() if self.reduction == "mean" else t.sum()

    def extra_repr(self) -> str:
        return f"{self.name}, reduction={self.reduction!r}"


ObjectiveLossModel.loss_type = Objective
