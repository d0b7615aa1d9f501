"""Supported losses and curvlib's per-sample loss convention.

Supported: ``nn.CrossEntropyLoss`` (logits ``[m, C]`` with class-index targets ``[m]``, or
torch's K-dimensional form: logits ``[m, C, *d]`` with targets ``[m, *d]``, e.g. a language
model's ``[m, V, T]`` with next-token targets ``[m, T]``),
``nn.MSELoss`` (outputs ``[m, *out]``, targets of the same shape), ``nn.BCEWithLogitsLoss``
(logits ``[m, *out]``, targets in [0, 1] of the same shape) and ``nn.BCELoss`` applied to
probabilities ``[m, *out]`` (sigmoid outputs); ``reduction`` "mean" or "sum".  Class
weights, ``pos_weight``, ``label_smoothing`` and ``ignore_index`` targets are rejected.

**The convention (the library's, once).**  Let c be the number of output entries per
sample (``prod(out)``; c = C·D for cross-entropy with C classes at D = prod(d) positions,
D = 1 for logits ``[m, C]``).  The loss L of a batch of m samples is split into per-sample
terms ℓ_b with

    L = (1/m) Σ_b ℓ_b   (reduction "mean"),        L = Σ_b ℓ_b   (reduction "sum"),

so for ``MSELoss``/``BCE*`` with "mean", ℓ_b keeps the 1/c of the average over the output
entries, and for cross-entropy with "mean" (torch averages over the m·D entries) ℓ_b keeps
the 1/D of the average over the positions; the batch factor 1/m is undone exactly once, by
this definition.  Each ℓ_b is k · NLL_b for a probabilistic model of the targets:

===================  ===================================  ===========================
loss                 model p(y | f)                       k ("sum" / "mean")
===================  ===================================  ===========================
CrossEntropyLoss     categorical(softmax f[:, pos]) at    1 / 1/D
                     each of the D positions, independent (NLL_b = Σ_pos CE_{b,pos})
MSELoss              Gaussian N(f, I)                     2 / 2/c   (NLL = ½‖y − f‖²)
BCEWithLogitsLoss    Bernoulli(sigmoid f)                 1 / 1/c
BCELoss              Bernoulli(f)                         1 / 1/c
===================  ===================================  ===========================

Every curvature is a per-sample mean C = (1/m) Σ_b C_b of matrices built from "columns"
r ∈ R^{c} back-propagated from the output f (§2.2.4; ``J_b`` = ∂f_b/∂θ):

- ``ggn``: C_b = J_bᵀ (∇²_f ℓ_b) J_b with the columns of a square root of ∇²_f ℓ_b
  (:meth:`LossModel.ggn_columns`);
- ``fisher`` (2.84): r_{b,s} = ∇_f ℓ_b(ŷ_{b,s}) / √k with ŷ_{b,s} ~ p(· | f_b), S draws
  (:meth:`LossModel.sample_targets`), so E[r rᵀ] = k·E[∇NLL ∇NLLᵀ] = ∇²_f ℓ_b and
  E[fisher] = ggn exactly (Thm 2.1);
- ``empirical_fisher`` (2.85): r_b = ∇_f ℓ_b(y_b) / √k with the data targets.

``fisher``/``empirical_fisher`` columns are the exact gradients of the user's loss module
(autograd on the output, times m for "mean"), divided by √k — for ``MSELoss`` (2(f − y)) and
``BCEWithLogitsLoss`` (σ(f) − y) in closed form, one elementwise pass (tested equal to the
module's autograd gradient to rounding).

For ``BCELoss`` the ``ggn`` kind returns J_pᵀ diag(k / (p(1−p))) J_p (columns
√k/√(p_j(1−p_j)) e_j back-propagated from the probabilities p): the Fisher of the Bernoulli
model, which is E[fisher] and, when p = sigmoid(z), exactly the GGN with respect to the
logits z (the natural parameters, Thm 2.1).  It is *not* J_pᵀ ∇²_p ℓ J_p (which depends on
the targets).  p(1−p) is floored at the dtype's smallest normal number so saturated
outputs give zero columns, not NaN.

Non-finite outputs (NaN/inf logits or probabilities, e.g. from a non-finite batch): the
``fisher`` draws are made as if that sample's distribution were uniform (a fair coin for
Bernoulli) — the draw is arbitrary there, and the sample's back-propagated column is
non-finite whatever is drawn.  So sampling never raises; the non-finite statistics reach the
approximator, whose non-finite rule applies (the previous fit is kept with a
:class:`~curvlib.errors.NumericalWarning`), exactly as for ``ggn`` and ``empirical_fisher``.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from curvlib.errors import UnsupportedLossError

__all__ = [
    "BCELossModel",
    "BCEWithLogitsLossModel",
    "Columns",
    "CrossEntropyLossModel",
    "LossModel",
    "MSELossModel",
    "SUPPORTED_LOSSES",
    "loss_model_for",
]


@dataclass(frozen=True)
class Columns:
    """c columns r_j ``[m, *out]`` (one per back-propagation), produced lazily by ``get(j)``."""

    count: int
    get: Callable[[int], torch.Tensor]


class LossModel(abc.ABC):
    """A supported loss module seen through the per-sample convention of this module."""

    #: the ``torch.nn`` loss class handled
    loss_type: type[nn.Module]

    def __init__(self, loss_fn: nn.Module) -> None:
        self.loss_fn = loss_fn
        self.reduction = getattr(loss_fn, "reduction", None)
        if self.reduction not in ("mean", "sum"):
            raise UnsupportedLossError(
                f"{type(loss_fn).__name__}(reduction={self.reduction!r}): expected reduction 'mean' or 'sum'"
            )
        self._check_options()

    def _check_options(self) -> None:
        """Reject loss options that break the per-sample convention."""

    def _reject(self, attr: str, ok: Callable[[object], bool], what: str) -> None:
        val = getattr(self.loss_fn, attr, None)
        if not ok(val):
            raise UnsupportedLossError(
                f"{type(self.loss_fn).__name__} with {attr}={val!r} is not supported (expected {what})"
            )

    @property
    def name(self) -> str:
        return type(self.loss_fn).__name__

    # -- shapes --------------------------------------------------------------------------
    @abc.abstractmethod
    def check(self, output: torch.Tensor, target: torch.Tensor) -> None:
        """Raise :class:`UnsupportedLossError` for an unsupported output or target shape/dtype."""

    @staticmethod
    def num_outputs(output: torch.Tensor) -> int:
        """c: output entries per sample."""
        return math.prod(output.shape[1:])

    @abc.abstractmethod
    def k(self, output: torch.Tensor) -> float:
        """ℓ_b = k · NLL_b (see the module docstring)."""

    # -- losses --------------------------------------------------------------------------
    def mean_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(1/m) Σ_b ℓ_b (a scalar in the graph): the user's loss for "mean", loss/m for "sum"."""
        L = self.loss_fn(output, target)
        return L if self.reduction == "mean" else L / output.shape[0]

    def per_sample_gradients(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """∇_{f_b} ℓ_b(y_b) for every sample: ``[m, *out]`` (exact, from the user's loss module)."""
        f = output.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(self.loss_fn(f, target), f)
        return grad * output.shape[0] if self.reduction == "mean" else grad

    def gradient_columns(self, output: torch.Tensor, targets: list[torch.Tensor]) -> Columns:
        """Columns r_j = ∇_f ℓ(targets[j]) / √k (``fisher`` and ``empirical_fisher``)."""
        root_k = math.sqrt(self.k(output))
        return Columns(len(targets), lambda j: self.per_sample_gradients(output, targets[j]) / root_k)

    #: whether the batch must carry a target tensor (an :class:`Objective` may ignore it)
    target_required: bool = True

    @abc.abstractmethod
    def ggn_columns(self, output: torch.Tensor, target: torch.Tensor | None = None) -> Columns:
        """Columns of a square root of ∇²_f ℓ_b (``ggn``): Σ_j r_j[b] r_j[b]ᵀ = ∇²_f ℓ_b
        (``target``: the batch's targets, for a loss whose output Hessian depends on them)."""

    @abc.abstractmethod
    def sample_targets(self, output: torch.Tensor, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        """S draws ŷ ~ p(· | f) per sample: CE ``[m, S, *d]`` (class indices, for logits
        ``[m, C, *d]``), others ``[m, S, *out]``.

        Drawn on ``generator``'s device, returned on ``output``'s device.
        """

    def target_column(self, samples: torch.Tensor, s: int) -> torch.Tensor:
        """The s-th draw, shaped like a target: ``samples[:, s]`` (CE ``[m, *d]``, others ``[m, *out]``)."""
        return samples[:, s]


class CrossEntropyLossModel(LossModel):
    """``nn.CrossEntropyLoss``: logits ``[m, C, *d]``, class indices ``[m, *d]`` (``d = ()``:
    logits ``[m, C]``, targets ``[m]``); D = prod(d) positions, k = 1 ("sum") or 1/D ("mean").

    ℓ_b = k Σ_pos CE(f_b[:, pos], y_b[pos]), so ∇²_f ℓ_b = k · blockdiag_pos(diag(p_pos) − p_pos p_posᵀ)
    with p_pos = softmax(f_b[:, pos]).  GGN columns: r_{j,pos} = √k √p_{j,pos} (e_j − p_pos) at
    position pos and zero at the others (c = C·D columns, column n = j·D + pos, the order of the
    flattened output ``[C, *d]``): Σ_j r_{j,pos} r_{j,pos}ᵀ = k (diag(p_pos) − p_pos p_posᵀ).
    r_{j,pos} is √(k p_{j,pos}) times the gradient of CE at pos for class j, so p-weighted MC
    columns reproduce the block exactly.
    """

    loss_type = nn.CrossEntropyLoss

    def _check_options(self) -> None:
        self._reject("weight", lambda v: v is None, "weight=None")
        self._reject("label_smoothing", lambda v: not v, "label_smoothing=0")

    def check(self, output: torch.Tensor, target: torch.Tensor) -> None:
        if output.ndim < 2:
            raise UnsupportedLossError(
                f"CrossEntropyLoss: expected logits [m, C] or [m, C, *d], got {list(output.shape)}"
            )
        expected = [output.shape[0], *output.shape[2:]]
        if list(target.shape) != expected or target.is_floating_point() or target.is_complex():
            raise UnsupportedLossError(
                f"CrossEntropyLoss: expected integer class-index targets {expected} for logits "
                f"{list(output.shape)}, got {target.dtype} {list(target.shape)} (probability targets are not supported)"
            )
        C = output.shape[1]
        bad = (target < 0) | (target >= C)
        if bool(bad.any()):
            raise UnsupportedLossError(
                f"CrossEntropyLoss: expected targets in [0, {C}), got {target[bad][:5].tolist()} "
                f"(ignore_index={self.loss_fn.ignore_index} targets are not supported)"
            )

    @staticmethod
    def num_positions(output: torch.Tensor) -> int:
        """D = prod(d) for logits ``[m, C, *d]`` (1 for ``[m, C]``)."""
        return math.prod(output.shape[2:])

    def k(self, output: torch.Tensor) -> float:
        return 1.0 if self.reduction == "sum" else 1.0 / self.num_positions(output)

    def _probabilities(self, output: torch.Tensor) -> torch.Tensor:
        """softmax over the classes, positions flattened: ``[m, C, D]``."""
        return torch.softmax(output.detach().reshape(output.shape[0], output.shape[1], -1), dim=1)

    def ggn_columns(self, output: torch.Tensor, target: torch.Tensor | None = None) -> Columns:
        p = self._probabilities(output)  # [m, C, D]
        m, C, D = p.shape
        scaled_root_p = (self.k(output) * p).sqrt()
        eye = torch.eye(C, dtype=p.dtype, device=p.device)

        def get(n: int) -> torch.Tensor:
            j, pos = divmod(n, D)
            r = torch.zeros_like(p)
            r[:, :, pos] = scaled_root_p[:, j, pos : pos + 1] * (eye[j] - p[:, :, pos])
            return r.reshape(output.shape)

        return Columns(C * D, get)

    def sample_targets(self, output: torch.Tensor, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        p = self._probabilities(output)  # [m, C, D]
        m, C, D = p.shape
        rows = _drawable(p.transpose(1, 2).reshape(m * D, C).to(generator.device), 1.0, rows=True)  # row b·D + pos
        draws = torch.multinomial(rows, num_samples, replacement=True, generator=generator)  # [m·D, S]
        draws = draws.reshape(m, D, num_samples).transpose(1, 2)  # [m, S, D]
        return draws.reshape(m, num_samples, *output.shape[2:]).to(output.device)


class _ElementwiseLossModel(LossModel):
    """Losses with targets shaped like the outputs (MSE, BCE)."""

    def check(self, output: torch.Tensor, target: torch.Tensor) -> None:
        if output.ndim < 2:
            raise UnsupportedLossError(f"{self.name}: expected outputs [m, *out], got {list(output.shape)}")
        if target.shape != output.shape:
            raise UnsupportedLossError(
                f"{self.name}: expected targets of the output's shape {list(output.shape)}, got {list(target.shape)}"
            )
        if not target.is_floating_point():
            raise UnsupportedLossError(f"{self.name}: expected floating-point targets, got {target.dtype}")

    def _diagonal_columns(self, output: torch.Tensor, diag: torch.Tensor) -> Columns:
        """Columns d_j e_j of diag(d) (d ``[m, c]``), reshaped like the output."""
        m, c = diag.shape

        def get(j: int) -> torch.Tensor:
            r = torch.zeros_like(diag)
            r[:, j] = diag[:, j]
            return r.reshape(output.shape)

        return Columns(c, get)


class _ClosedFormGradient(_ElementwiseLossModel):
    """An elementwise loss whose per-sample output gradient has a closed form,
    ∇_{f_b} ℓ_b(y_b) = ``self._gradient(f, y)`` (for ``"sum"``; divided by c for ``"mean"``):
    one elementwise pass instead of the loss module's forward and backward (tested equal to
    the module's autograd gradient to rounding).  Targets of another dtype than the output
    take the module's route."""

    def _gradient(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def per_sample_gradients(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.dtype != output.dtype or target.shape != output.shape:
            return super().per_sample_gradients(output, target)
        grad = self._gradient(output.detach(), target)
        return grad if self.reduction == "sum" else grad / self.num_outputs(output)


class MSELossModel(_ClosedFormGradient):
    """``nn.MSELoss``: Gaussian N(f, I), k = 2 ("sum") or 2/c ("mean"); ∇²_f ℓ = k·I."""

    loss_type = nn.MSELoss

    def k(self, output: torch.Tensor) -> float:
        return 2.0 if self.reduction == "sum" else 2.0 / self.num_outputs(output)

    def _gradient(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 2.0 * (f - y)

    def ggn_columns(self, output: torch.Tensor, target: torch.Tensor | None = None) -> Columns:
        f = output.detach().reshape(output.shape[0], -1)
        return self._diagonal_columns(output, torch.full_like(f, math.sqrt(self.k(output))))

    def sample_targets(self, output: torch.Tensor, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        f = output.detach()
        shape = (f.shape[0], num_samples, *f.shape[1:])
        eps = torch.randn(shape, generator=generator, dtype=f.dtype, device=generator.device).to(f.device)
        return f.unsqueeze(1) + eps


class BCEWithLogitsLossModel(_ClosedFormGradient):
    """``nn.BCEWithLogitsLoss``: Bernoulli(sigmoid f), k = 1 or 1/c; ∇²_f ℓ = k·diag(p(1−p))."""

    loss_type = nn.BCEWithLogitsLoss

    def _gradient(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(f) - y

    def _check_options(self) -> None:
        self._reject("weight", lambda v: v is None, "weight=None")
        self._reject("pos_weight", lambda v: v is None, "pos_weight=None")

    def k(self, output: torch.Tensor) -> float:
        return 1.0 if self.reduction == "sum" else 1.0 / self.num_outputs(output)

    def ggn_columns(self, output: torch.Tensor, target: torch.Tensor | None = None) -> Columns:
        p = torch.sigmoid(output.detach().reshape(output.shape[0], -1))
        return self._diagonal_columns(output, (self.k(output) * p * (1 - p)).sqrt())

    def sample_targets(self, output: torch.Tensor, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        p = _drawable(torch.sigmoid(output.detach()), 0.5).unsqueeze(1).expand(output.shape[0], num_samples, *output.shape[1:])
        return _bernoulli(p, generator).to(output.device)


class BCELossModel(_ElementwiseLossModel):
    """``nn.BCELoss`` on probabilities p: Bernoulli(p), k = 1 or 1/c; ``ggn`` = J_pᵀ diag(k/(p(1−p))) J_p."""

    loss_type = nn.BCELoss

    def _check_options(self) -> None:
        self._reject("weight", lambda v: v is None, "weight=None")

    def check(self, output: torch.Tensor, target: torch.Tensor) -> None:
        super().check(output, target)
        p = output.detach()
        if bool(((p < 0) | (p > 1)).any()):
            raise UnsupportedLossError("BCELoss: expected outputs in [0, 1] (sigmoid outputs), got values outside")

    def k(self, output: torch.Tensor) -> float:
        return 1.0 if self.reduction == "sum" else 1.0 / self.num_outputs(output)

    def ggn_columns(self, output: torch.Tensor, target: torch.Tensor | None = None) -> Columns:
        p = output.detach().reshape(output.shape[0], -1)
        var = (p * (1 - p)).clamp_min(torch.finfo(p.dtype).tiny)
        return self._diagonal_columns(output, (self.k(output) / var).sqrt())

    def sample_targets(self, output: torch.Tensor, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        p = _drawable(output.detach(), 0.5).unsqueeze(1).expand(output.shape[0], num_samples, *output.shape[1:])
        return _bernoulli(p, generator).to(output.device)


def _bernoulli(p: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Bernoulli(p) draws as 1[u < p], u ~ U[0, 1) from ``generator`` (on its device): the same
    distribution as ``torch.bernoulli``, about twice as fast on the CPU."""
    u = torch.rand(p.shape, generator=generator, dtype=p.dtype, device=generator.device)
    return (u < p.to(generator.device)).to(p.dtype)


def _drawable(p: torch.Tensor, fill: float, *, rows: bool = False) -> torch.Tensor:
    """Probabilities whose non-finite entries (``rows``: whole rows holding one, as for the
    categorical rows of CE) are replaced by ``fill`` (module docstring: non-finite outputs),
    without a host synchronisation: entrywise, one fused pass (``nan_to_num``)."""
    if not rows:
        return torch.nan_to_num(p, nan=fill, posinf=fill, neginf=fill)
    bad = (~torch.isfinite(p)).any(dim=1, keepdim=True)
    return torch.where(bad, torch.full_like(p, fill), p)


SUPPORTED_LOSSES: tuple[type[LossModel], ...] = (
    CrossEntropyLossModel,
    MSELossModel,
    BCEWithLogitsLossModel,
    BCELossModel,
)


def loss_model_for(loss_fn: object) -> LossModel:
    """The :class:`LossModel` of a loss module; :class:`UnsupportedLossError` names the supported ones."""
    own = getattr(type(loss_fn), "loss_model", None)  # a loss module declaring its own (curvlib.Objective)
    if isinstance(loss_fn, nn.Module) and isinstance(own, type) and issubclass(own, LossModel):
        return own(loss_fn)
    for cls in SUPPORTED_LOSSES:
        if type(loss_fn) is cls.loss_type:
            return cls(loss_fn)  # type: ignore[arg-type]
    names = ", ".join(f"nn.{c.loss_type.__name__}" for c in SUPPORTED_LOSSES) + ", curvlib.Objective (any mean of per-sample terms)"
    got = type(loss_fn).__name__ if isinstance(loss_fn, nn.Module) else repr(loss_fn)
    raise UnsupportedLossError(
        f"unsupported loss {got}; supported losses: {names} (reduction 'mean' or 'sum'; "
        "pass the loss module instance, not a function)"
    )
