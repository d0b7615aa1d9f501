"""Peer libraries' KFAC-family optimizer steps, each a ``step()`` callable on its own model, for
``step_cost.py`` (imported as ``_peers``; every peer is optional and imported only when built).

One step = zero the gradients, forward, backward, the library's preconditioning, the parameter
update (plain SGD without momentum, ``lr``), on one fixed batch (X [m, 784], Y [m, 784]) and the
problem's mean-reduced ``BCEWithLogitsLoss``.  Every library gets the same schedule
(:class:`Schedule`): factors refreshed every T1 steps with a moving average γ = 0.95 where the
library keeps one, inverses rebuilt every T2 steps, one Monte Carlo sample, damping λ.

How λ maps (curvlib's ``kfac``: the π-split (A + π√λI) ⊗ (G + π⁻¹√λI), (2.95)–(2.96)):

* ASDL ``KfacGradientMaker``: ``damping = λ`` is split the same way (π from the mean
  eigenvalues, ``Kron.update_inv``), Cholesky inverses, applied as two GEMMs; its A has no
  bias row (the bias is preconditioned by G⁻¹ alone: d_a = d_in, a negligible difference
  for the FLOP model, which counts d_in + 1 for everyone).  ASDL has no
  Bernoulli likelihood: its Monte Carlo targets are drawn as for ``loss_type="mse"``
  (Gaussian, var 1) — the same one backward of sampled targets, a different G.  ASDL runs
  the forward once and back-propagates the sampled targets with parameter gradients off.
  It divides the gradient by m on refresh steps (it expects a sum-reduced loss): a scale,
  no extra work.  Its sampling uses torch's global generator.
* kfac-pytorch ``KFACPreconditioner``: ``compute_method="eigen"`` (its default) inverts
  (A ⊗ G + λI) exactly in the eigenbasis (``damping = λ``, eigh, four GEMMs);
  ``"inverse"`` forms (A + δI)⁻¹ and (G + δI)⁻¹ with ``torch.linalg.inv`` (LU), δ = √λ so
  that λI is the identity term (the π = 1 case of the π-split).  kfac-pytorch captures G
  in the backward hooks of whatever backward runs — as documented, the loss's own
  backward (empirical Fisher, the ``EF`` row).  Its Monte Carlo rows are this script's
  glue: sampled Bernoulli targets back-propagated with ``autograd.grad`` to the first
  layer's weight only (output gradients through every layer), scaled by m·√c so that G
  has the per-sample convention of curvlinops and curvlib; then the loss's backward with
  the modules in eval mode, which kfac-pytorch's hooks skip.  KL clipping off (a
  ``kl_clip`` callable returning ``None``: its ``__init__`` refuses a plain ``None``).
* curvlinops: ``KFACLinearOperator(fisher_type="mc")`` rebuilt from the batch every T1
  steps (its own second forward and ``autograd.grad`` of the sampled loss to the
  parameters; no moving average: the latest batch's factors), and
  ``KFACInverseLinearOperator(damping=λ, use_heuristic_damping=True)`` — the same π-split,
  Cholesky inverses, formed at its first product after each T2 rebuild — applied to the
  gradient as the step direction.
* SINGD: ``damping = λ`` enters the update of its preconditioner factors K, C (no inverse
  exists); T = T1; dense structures, ``alpha1`` 0.5 and ``lr_cov`` 1e-2 (its defaults),
  ``momentum`` 0.  SINGD uses the empirical Fisher (its docstring) from the loss's own
  backward; it has no separate inversion (the ``refresh+invert`` kind does not exist).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from _flops import CHOLESKY_INVERSE, EIGH, LU_INVERSE, StepAlgorithm

__all__ = ["DISTRIBUTIONS", "EMA", "PEERS", "PeerOptimizer", "Schedule", "installed", "stub_cpu_nvtx"]

EMA = 0.95  # γ of the factors' moving average, where a library keeps one

#: what to install for each peer module (the step_cost.py docstring has the commands)
DISTRIBUTIONS = {"asdl": "asdfghjkl==0.1a5", "kfac": "kfac-pytorch, a GitHub checkout",
                 "curvlinops": "curvlinops-for-pytorch==3.0.1", "singd": "singd==0.0.5"}

StepFn = Callable[[], None]


@dataclass(frozen=True)
class Schedule:
    """T1: steps between factor refreshes; T2: steps between inversions; λ; the step size."""

    T1: int
    T2: int
    lam: float
    lr: float


Builder = Callable[[nn.Module, nn.Module, torch.Tensor, torch.Tensor, Schedule, torch.Generator], StepFn]


@dataclass(frozen=True)
class PeerOptimizer:
    """One peer configuration: a row of the table.

    Attributes:
        name: the row label.
        module: the import that must be found for the peer to run.
        build: ``build(model, loss_fn, X [m, d], Y [m, c], schedule, generator) -> step``.
        algorithm: what the step computes, for its FLOP-model limit.
        summary: its configuration in one line (Fisher, damping, inverse) for the legend.
        inverts: the library has an inversion to schedule apart from the refresh (SINGD not).
    """

    name: str
    module: str
    build: Builder
    algorithm: StepAlgorithm
    summary: str
    inverts: bool = True


def stub_cpu_nvtx() -> None:
    """Make ``torch.cuda.nvtx``'s range functions no-ops when this torch has no NVTX (a CPU
    build raises ``RuntimeError`` from them), as ASDL calls them on every step.  Changes
    torch's module attributes in this process only; the installed ASDL is not touched."""
    import torch.cuda.nvtx as nvtx

    try:
        nvtx.range_push("probe")
        nvtx.range_pop()
    except RuntimeError:
        nvtx.range_push = lambda msg: 0
        nvtx.range_pop = lambda: 0
        nvtx.mark = lambda msg: None


def installed(peers: tuple[PeerOptimizer, ...]) -> tuple[list[PeerOptimizer], list[str]]:
    """The peers whose module can be imported, and the names of the modules that cannot."""
    found, missing = [], []
    for peer in peers:
        if importlib.util.find_spec(peer.module) is not None:
            found.append(peer)
        elif peer.module not in missing:
            missing.append(peer.module)
    return found, missing


def _sgd(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0)


# --------------------------------------------------------------------------- ASDL


def _asdl_kfac(model, loss_fn, X, Y, s: Schedule, generator) -> StepFn:
    stub_cpu_nvtx()
    from asdl import KfacGradientMaker, PreconditioningConfig

    config = PreconditioningConfig(data_size=X.shape[0], damping=s.lam, curvature_upd_interval=s.T1,
                                   preconditioner_upd_interval=s.T2, ema_decay=1 - EMA)
    maker = KfacGradientMaker(model, config, fisher_type="fisher_mc", loss_type="mse", n_mc_samples=1)
    opt = _sgd(model, s.lr)
    output = maker.setup_model_call(model, X)
    maker.setup_loss_call(loss_fn, output, Y)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        maker.forward_and_backward()
        opt.step()

    return step


# --------------------------------------------------------------------------- kfac-pytorch


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """kfac-pytorch's hooks skip modules in eval mode (the AE has no train/eval difference)."""
    model.eval()
    try:
        yield
    finally:
        model.train()


def _kfac_pytorch(compute_method: str, monte_carlo: bool) -> Builder:
    def build(model, loss_fn, X, Y, s: Schedule, generator) -> StepFn:
        from kfac.preconditioner import KFACPreconditioner

        damping = s.lam if compute_method == "eigen" else math.sqrt(s.lam)
        # kl_clip: None turns the scaling off in step(), but __init__ refuses a plain None
        pre = KFACPreconditioner(model, factor_update_steps=s.T1, inv_update_steps=s.T2, damping=damping,
                                 factor_decay=EMA, kl_clip=lambda step: None, lr=s.lr,
                                 compute_method=compute_method)
        opt = _sgd(model, s.lr)
        first_weight = next(model.parameters())
        # per-sample convention of G: undo the loss's 1/m, keep 1/c as curvlinops does (√c)
        scale = X.shape[0] * math.sqrt(Y.shape[1])

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            out = model(X)
            loss = loss_fn(out, Y)
            if monte_carlo and pre.steps % s.T1 == 0:
                sampled = torch.bernoulli(torch.sigmoid(out.detach()), generator=generator)
                torch.autograd.grad(scale * loss_fn(out, sampled), first_weight, retain_graph=True)
                with _eval_mode(model):
                    loss.backward()
            else:
                loss.backward()
            pre.step()
            opt.step()

        return step

    return build


# --------------------------------------------------------------------------- curvlinops


class _CurvlinopsKFACStep:
    """curvlinops' KFAC as an optimizer: the operator rebuilt every T1 steps, its inverse every
    T2 steps, the inverse applied to the gradient."""

    def __init__(self, model, loss_fn, X, Y, s: Schedule, generator) -> None:
        from curvlinops import KFACInverseLinearOperator, KFACLinearOperator

        self._kfac_cls, self._inverse_cls = KFACLinearOperator, KFACInverseLinearOperator
        self.model, self.loss_fn, self.X, self.Y, self.s, self.generator = model, loss_fn, X, Y, s, generator
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = _sgd(model, s.lr)
        self.steps = 0
        self.kfac = self.inverse = None

    def _refresh(self) -> None:
        seed = int(torch.randint(2**31 - 1, (1,), generator=self.generator))
        self.kfac = self._kfac_cls(self.model, self.loss_fn, self.params, [(self.X, self.Y)], fisher_type="mc",
                                   mc_samples=1, seed=seed, separate_weight_and_bias=False,
                                   check_deterministic=False, num_data=self.X.shape[0],
                                   num_per_example_loss_terms=1)
        self.kfac.compute_kronecker_factors()

    def __call__(self) -> None:
        if self.steps % self.s.T1 == 0:
            self._refresh()
        if self.steps % self.s.T2 == 0:
            # the inverses are formed at the first product below
            self.inverse = self._inverse_cls(self.kfac, damping=self.s.lam, use_heuristic_damping=True)
        self.opt.zero_grad(set_to_none=True)
        self.loss_fn(self.model(self.X), self.Y).backward()
        direction = self.inverse @ [p.grad for p in self.params]
        for p, d in zip(self.params, direction):
            p.grad = d
        self.opt.step()
        self.steps += 1


def _curvlinops_kfac(model, loss_fn, X, Y, s: Schedule, generator) -> StepFn:
    return _CurvlinopsKFACStep(model, loss_fn, X, Y, s, generator)


# --------------------------------------------------------------------------- SINGD


def _singd(model, loss_fn, X, Y, s: Schedule, generator) -> StepFn:
    from singd.optim.optimizer import SINGD

    opt = SINGD(model, lr=s.lr, momentum=0.0, damping=s.lam, T=s.T1, loss_average="batch",
                structures=("dense", "dense"))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(X), Y).backward()
        opt.step()

    return step


PEERS: tuple[PeerOptimizer, ...] = (
    PeerOptimizer(
        "asdl kfac (MC)", "asdl", _asdl_kfac,
        StepAlgorithm(second_forward=False, sampled_backward=2, apply_gemms=2, inversion_cubic=CHOLESKY_INVERSE),
        "KfacGradientMaker fisher_mc, Gaussian targets (no Bernoulli in ASDL); π-split damping=λ; "
        "Cholesky inverses; ema_decay 0.05"),
    PeerOptimizer(
        "kfac-pytorch eigen (MC, glue)", "kfac", _kfac_pytorch("eigen", monte_carlo=True),
        StepAlgorithm(second_forward=False, sampled_backward=2, apply_gemms=4, inversion_cubic=EIGH),
        "KFACPreconditioner eigen: (A⊗G + λI)⁻¹ in the eigenbasis, damping=λ; sampled Bernoulli "
        "targets back-propagated by this script; factor_decay 0.95"),
    PeerOptimizer(
        "kfac-pytorch inverse (MC, glue)", "kfac", _kfac_pytorch("inverse", monte_carlo=True),
        StepAlgorithm(second_forward=False, sampled_backward=2, apply_gemms=2, inversion_cubic=LU_INVERSE),
        "KFACPreconditioner inverse: (A + δI)⁻¹, (G + δI)⁻¹ by torch.linalg.inv, δ = √λ; "
        "MC glue as above"),
    PeerOptimizer(
        "kfac-pytorch eigen (EF)", "kfac", _kfac_pytorch("eigen", monte_carlo=False),
        StepAlgorithm(second_forward=False, sampled_backward=0, apply_gemms=4, inversion_cubic=EIGH),
        "as documented: G from the loss's own backward (empirical Fisher, mean loss), damping=λ"),
    PeerOptimizer(
        "curvlinops KFAC (MC)", "curvlinops", _curvlinops_kfac,
        StepAlgorithm(second_forward=True, sampled_backward=4, apply_gemms=2, inversion_cubic=CHOLESKY_INVERSE),
        "KFACLinearOperator(fisher_type='mc') rebuilt every T1 (no moving average) + "
        "KFACInverseLinearOperator(damping=λ, use_heuristic_damping=True): π-split, Cholesky"),
    PeerOptimizer(
        "singd dense (EF)", "singd", _singd,
        StepAlgorithm(second_forward=False, sampled_backward=0, apply_gemms=4, inversion_cubic=0.0,
                      factor_gemms=2, refresh_cubic=4.0),
        "SINGD dense, T=T1, damping=λ in the K/C update, empirical Fisher only; inverse-free: "
        "no refresh+invert step", inverts=False),
)
