"""``Preconditioner``: the product of the builder — a curvature approximation kept up to date on
a schedule and applied to gradients (DESIGN.md §3 "Preconditioner").

Schedule (§3.1.2).  Steps are counted from 0 by :meth:`Preconditioner.update`.  At step k

- a **refresh** happens when k is a multiple of T1 = ``update_every`` (and at the very first
  update, whatever k): the curvature is captured on the given batch (one forward pass, one
  backward pass per back-propagated column, e.g. per Monte Carlo target of the true
  Fisher), and the approximation is refitted with the previous one as ``previous`` (EMA
  ρ = min(1 − 1/k', γ) at the k'-th refresh, warm starts);
- an **inversion** happens when k is a multiple of T2 = ``invert_every`` (a multiple of T1,
  so every inversion follows a refresh at the same step; also at a refresh whose forward
  pass called a different set of layers): the damping is applied to the latest
  approximation and the factors are eigendecomposed — the only place they are.

Between inversions :meth:`Preconditioner.apply` reuses the same inverse.  What ``apply``
computes depends on ``config.preconditioner``:

- ``"kronecker"``: ζ = F̂•⁻¹ g, the damped block-diagonal Kronecker inverse of the last
  inversion; with a ``coarse_space``, the two-level direction (4.17) (or (4.19)/(4.20) for
  the additive modes) built from that inverse, the curvature F of the **latest refresh**
  and the current gradient g;
- ``"block_natural_gradient"``: ζ_i = (F_ii + λI)⁻¹ g_i per layer (4.52);
- ``"exact_natural_gradient"``: ζ = (F + λI)⁻¹ g (4.50);

for the last two, F is the curvature captured at the last inversion step and λ the
damping's current ``value``.

The curvature capture runs the model forward once more; the model's buffers (BatchNorm
running statistics, ``num_batches_tracked``) are restored afterwards, so a refresh leaves
the model exactly as it found it.  Monte Carlo targets are drawn from the
preconditioner's own ``torch.Generator`` (its state is part of :meth:`state_dict`).

Everything lives on the model's device and in its dtype; the per-step path
(:meth:`apply`) has no host synchronisation of its own.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import operator
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from curvlib.approximators.api import BlockDiagonalApproximation, approximate
from curvlib.capture.layout import (
    BlockCandidate,
    LayerBlock,
    OnLayers,
    find_layers,
    leaving_out,
    uncovered_parameters,
    unwrap_model,
)
from curvlib.coarse.api import two_level
from curvlib.coarse.basis import Partition
from curvlib.config import positive_damping
from curvlib.curvatures.batches import split_batch
from curvlib.curvatures.kinds import (
    BuiltinCurvature,
    EmpiricalFisherCurvature,
    FisherCurvature,
    StatisticsCurvature,
)
from curvlib.curvatures.objective import Objective
from curvlib.curvatures.operator import CurvatureOperator
from curvlib.curvatures.statistics import LayerStatistics
from curvlib.damping.api import BlockDiagonalInverse, damped_inverse
from curvlib.damping.base import BlockInverse, Damping
from curvlib.distributed import Shard, ShardedCurvature, resolve_process_group
from curvlib.errors import (
    ConfigError,
    CurvlibError,
    NumericalError,
    NumericalWarning,
    PerformanceWarning,
    ShapeError,
    warn,
)
from curvlib.linalg import BlockDiagonalOperator, LinearOperator, finite_screen
from curvlib.precond.config import PreconditionerConfig, ResolvedConfig, ResolvedRule
from curvlib.precond.references import block_natural_gradient, exact_natural_gradient

__all__ = ["InversionReport", "LayerGroup", "NotReadyError", "Preconditioner", "UpdateInfo"]

_STATE_VERSION = 4


class NotReadyError(CurvlibError, RuntimeError):
    """The preconditioner was used before its first refresh (call ``update(batch)`` first)."""


@dataclass(frozen=True)
class UpdateInfo:
    """What one :meth:`Preconditioner.update` did.

    Attributes:
        step: the step index k the update was made for.
        refreshed: the curvature was captured and the approximation refitted.
        inverted: the damped inverse was rebuilt (with ``background``: started in a worker
            thread, installed by the next :meth:`Preconditioner.wait_inversion`).
        refresh_seconds, invert_seconds: host wall-clock time of the refresh and of the
            inversion (0 when not done).  On a GPU, kernels still queued at the end are not
            included (no synchronisation is added for the measurement); in the background, the
            time to start the worker.
        background: the inversion runs in the background (``background_inversion``).
    """

    step: int
    refreshed: bool
    inverted: bool
    refresh_seconds: float = field(default=0.0, compare=False)  # measurements: not part of equality
    invert_seconds: float = field(default=0.0, compare=False)
    background: bool = False


@dataclass(frozen=True)
class InversionReport:
    """What the last inversion produced, per layer (host values, computed once per inversion).

    Attributes:
        step: the step index of the inversion.
        condition_numbers: layer name -> (κ_A, κ_G) of the two factors each inverse inverted
            (:meth:`~curvlib.damping.BlockInverse.condition_numbers`): the eigenvalue ratios
            |λ|max/|λ|min where the inverse eigendecomposed them (Tikhonov's factors), κ₁ =
            ‖M‖₁‖M⁻¹‖₁ where it inverted them by Cholesky (the π-split's damped factors; never
            below the eigenvalue ratio, at most d times it).
        kept_previous: names of the layers whose inversion failed and kept the previous inverse.
        fallbacks: layer name -> the documented fallback an inverse took (``InverseInfo.fallback``).
        clamped: layer name -> eigenvalues raised to their floor (``InverseInfo.n_clamped``), nonzero only.
    """

    step: int
    condition_numbers: dict[str, tuple[float, float]]
    kept_previous: tuple[str, ...] = ()
    fallbacks: dict[str, str] = field(default_factory=dict)
    clamped: dict[str, int] = field(default_factory=dict)


def _inversion_report(step: int, inverse: Any, names: Sequence[str]) -> InversionReport:
    """The :class:`InversionReport` of a freshly built inverse (one host sync for all layers)."""
    if not isinstance(inverse, BlockDiagonalOperator):
        return InversionReport(step, {})
    conds, fallbacks, clamped = {}, {}, {}
    ratios, eig_names = [], []
    for name, block in zip(names, inverse.blocks):
        if isinstance(block, BlockInverse):
            kappa = block.condition_numbers()
            if kappa is not None:
                ratios.append(kappa)
                eig_names.append(name)
            if block.info.fallback is not None:
                fallbacks[name] = block.info.fallback
            if block.info.n_clamped:
                clamped[name] = int(block.info.n_clamped)
    if ratios:
        conds = {n: (ka, kg) for n, (ka, kg) in zip(eig_names, torch.stack(ratios).double().cpu().tolist())}
    kept = tuple(names[i] for i in inverse.kept_previous) if isinstance(inverse, BlockDiagonalInverse) else ()
    return InversionReport(step, conds, kept, fallbacks, clamped)


@dataclass(frozen=True)
class _PendingCapture:
    """A refresh captured by :meth:`Preconditioner.capture` for ``step`` (``operator`` None: the
    kind captures the batch itself in :meth:`Preconditioner.update`)."""

    step: int
    batch: Any
    operator: CurvatureOperator | None
    generator_after: torch.Tensor | None
    finish: Any = None  # empirical_fisher: builds the operator from the caller's backward (None: it could not)


@dataclass(frozen=True)
class LayerGroup:
    """The layers one rule gives its settings to, and their fits (replaced, never changed in
    place: :meth:`Preconditioner.transaction` restores attributes by reference).

    Attributes:
        rule: the :class:`~curvlib.precond.config.ResolvedRule`.
        damping: its damping object (the default rule's own object for a rule without one).
        names: the layer blocks it holds at the latest refresh (``()``: none matched).
        approximation: its fit of the latest refresh (over ``names``).
        inverted_approximation: the fit its inverse was built from.
        inverse: its :class:`BlockDiagonalInverse` (over ``names``).
        inverted_damping_state: the damping's state at that inversion.
        num_refreshes, num_inversions, last_refresh_step, last_inversion_step: its own schedule.
    """

    rule: ResolvedRule
    damping: Damping | None
    names: tuple[str, ...] = ()
    approximation: Any = None
    inverted_approximation: Any = None
    inverse: Any = None
    inverted_damping_state: dict[str, Any] | None = None
    num_refreshes: int = 0
    num_inversions: int = 0
    last_refresh_step: int | None = None
    last_inversion_step: int | None = None

    @property
    def kind(self) -> dict[str, Any]:
        """The approximator kind mapping ``{"kind": ..., **options}`` (approximate's ``kind``)."""
        rk = self.rule.approximator
        return {"kind": rk.kind, **rk.data}

    def refresh_due(self, k: int) -> bool:
        return bool(self.names) and (self.approximation is None or k % self.rule.update_every == 0)

    def inversion_due(self, k: int) -> bool:
        return bool(self.names) and (self.inverse is None or k % self.rule.invert_every == 0)


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Restore every buffer of ``model`` (running statistics, counters) on exit."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in saved:
                b.copy_(s)


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    raise ShapeError(f"{type(model).__name__} has no floating-point parameters to precondition")


def default_generator(device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from torch's global RNG (reproducible under ``torch.manual_seed``)."""
    seed = int(torch.randint(0, 2**62, (1,)).item())
    return torch.Generator(device=device).manual_seed(seed)


def _first_difference(a: Any, b: Any, where: str = "state") -> str | None:
    """The path of the first leaf where two nested states differ (types included), or None."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
        return None if same else where
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if set(a) != set(b):
            return f"{where} (keys {sorted(map(str, set(a) ^ set(b)))})"
        return next((d for k in a if (d := _first_difference(a[k], b[k], f"{where}[{k!r}]")) is not None), None)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{where} (length {len(a)}, expected {len(b)})"
        return next((d for i, (x, y) in enumerate(zip(a, b))
                     if (d := _first_difference(x, y, f"{where}[{i}]")) is not None), None)
    return None if type(a) is type(b) and a == b else where


def _stable_text(value: Any) -> str:
    """A JSON stand-in for a value that is not JSON (a rule's predicate), the same in every
    process: a callable's qualified name, not its address."""
    if callable(value):
        return f"<{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__qualname__)}>"
    return str(value)


def _step_index(step: Any, caller: str) -> int:
    """A step index: an integer ≥ 0 (Python or NumPy/torch integer scalars)."""
    try:
        k = -1 if isinstance(step, bool) else operator.index(step)
    except TypeError:
        k = -1
    if k < 0:
        raise ConfigError(f"{caller}: expected a step ≥ 0 (an integer), got {step!r}")
    return k


def _nonfinite_parts(F: CurvatureOperator) -> list[str]:
    """What of a captured curvature holds NaN/inf: layers' statistics, the loss, the gradient."""
    bad = []
    stats = [F.statistics(i) for i in range(len(F.layers))]
    for L, st, counts in zip(F.layers, stats, LayerStatistics.num_nonfinite_all(stats)):
        if any(counts) or not math.isfinite(float(st.scale)):
            bad.append(f"statistics of layer {L.name!r}")
    if F.loss is not None and not bool(torch.isfinite(torch.as_tensor(F.loss)).all()):
        bad.append("the loss")
    if not all(bool(torch.isfinite(g).all()) for g in F.gradient_blocks or ()):
        bad.append("the gradient")
    return bad


def _curvature_state(F: Any) -> dict[str, Any]:
    """A curvature operator's captured statistics as plain containers (to rebuild it exactly)."""
    if not isinstance(F, CurvatureOperator):
        raise ConfigError(
            f"Preconditioner.state_dict: the curvature operator {type(F).__name__} "
            "cannot be saved; the coarse correction and the natural-gradient references need one built from "
            "captured statistics (fisher, empirical_fisher, ggn)"
        )
    stats = [F.statistics(i) for i in range(len(F.layers))]
    return {
        "kind": F.kind,
        "scale": F.scale,
        "excluded": list(F.excluded),
        "statistics": [s.state_dict() for s in stats],
        "loss": F.loss,
        "gradient": F.gradient_blocks,
        "sampled_targets": F.sampled_targets,
    }


def _curvature_from_state(state: Mapping[str, Any], layers: Sequence[LayerBlock], caller: str) -> Any:
    gradient = state["gradient"]
    if gradient is not None:
        if len(gradient) != len(layers):
            raise ConfigError(f"{caller}: the state's curvature gradient has {len(gradient)} blocks, the layers "
                              f"{len(layers)}")
        for G, L in zip(gradient, layers):
            if not isinstance(G, torch.Tensor) or tuple(G.shape) != (L.g_dim, L.a_dim):
                got = list(G.shape) if isinstance(G, torch.Tensor) else type(G).__name__
                raise ConfigError(f"{caller}: the state's curvature gradient of layer {L.name!r} is {got}; expected "
                                  f"[d_g, d_a] = {[L.g_dim, L.a_dim]}")
    return CurvatureOperator(
        layers,
        state["excluded"],
        [LayerStatistics.from_state_dict(s) for s in state["statistics"]],
        kind=state["kind"],
        loss=state["loss"],
        gradient=None if gradient is None else list(gradient),
        sampled_targets=state["sampled_targets"],
    )


def _joined(parts: Sequence[Any], damping: Damping | None = None) -> Any:
    """The groups' block-diagonal fits (or, with ``damping``, inverses) as one operator over
    the flat vector, blocks in layer order: the one part itself when there is one; ``None``
    when there is none."""
    if len(parts) <= 1:
        return parts[0] if parts else None
    items = sorted(((sl, block, name, part, j) for part in parts
                    for j, (sl, block, name) in enumerate(zip(part.slices, part.blocks, part.names))),
                   key=lambda t: t[0].start)
    first = parts[0]
    if damping is None:
        return BlockDiagonalOperator([t[1] for t in items], [t[0] for t in items], p=first.p, layout=first.layout)
    kept = [i for i, t in enumerate(items) if t[4] in t[3].kept_previous]
    return BlockDiagonalInverse([t[1] for t in items], [t[0] for t in items], damping, p=first.p, kept_previous=kept,
                                layout=first.layout, names=[t[2] for t in items],
                                block_dampings=[t[3].damping for t in items])


class _BackgroundInversion:
    """One inversion running in a worker thread, on ``stream`` (a side CUDA stream) when
    given: the stream first waits for the work queued on the caller's stream so far (the
    refresh that made the factors), and :meth:`result` makes the caller's stream wait for the
    inversion's kernels.  Memory made on the side stream stays in its pool, and the next
    inversion's kernels wait for everything queued before it, so freed inverses are reused safely."""

    def __init__(self, step: int, fn: Any, stream: Any) -> None:
        self.step = step
        self._stream = stream
        self._value: Any = None
        self._error: BaseException | None = None
        self._done_event: Any = None
        queued = None
        if stream is not None:
            queued = torch.cuda.Event()
            queued.record(torch.cuda.current_stream(stream.device))
        # not a daemon: the interpreter waits for a running inversion at exit (one killed inside a torch
        # call aborts the process)
        self._thread = threading.Thread(target=self._run, args=(fn, queued), name=f"curvlib-inversion-{step}")
        self._thread.start()

    def _run(self, fn: Any, queued: Any) -> None:
        try:
            if self._stream is None:
                with torch.no_grad():  # grad mode is per thread: the caller's no_grad does not reach here
                    self._value = fn()
                return
            with torch.no_grad(), torch.cuda.stream(self._stream):
                self._stream.wait_event(queued)
                self._value = fn()
                self._done_event = torch.cuda.Event()
                self._done_event.record(self._stream)
        except BaseException as exc:  # raised in the caller's thread by result()
            self._error = exc

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._done_event is not None:
            torch.cuda.current_stream(self._stream.device).wait_event(self._done_event)
        return self._value


# --------------------------------------------------------------------------- the preconditioner


def _state_v3_to_v4(state: Mapping[str, Any]) -> dict[str, Any]:
    """A state saved before rules (version 3: one approximator and damping for every layer)
    as version 4: the default rule's group holding every layer."""
    kronecker = state.get("preconditioner") == "kronecker"
    layers = state.get("layers")
    group = {
        "rule": "default",
        "approximator": state.get("approximator"),
        "layers": [] if not kronecker or not isinstance(layers, (list, tuple))
        else [e.get("name") if isinstance(e, Mapping) else e for e in layers],
        "damping": None,
        "inverted_damping": state.get("inverted_damping") if kronecker else None,
        "approximation": state.get("approximation"),
        "inverted_approximation": state.get("inverted_approximation"),
        "inverted_is_latest": state.get("inverted_is_latest"),
        "num_refreshes": state.get("num_refreshes") if kronecker else 0,
        "num_inversions": state.get("num_inversions") if kronecker else 0,
        "last_refresh_step": state.get("last_refresh_step") if kronecker else None,
        "last_inversion_step": state.get("last_inversion_step") if kronecker else None,
    }
    out = {k: v for k, v in state.items() if k not in ("approximation", "inverted_approximation", "inverted_is_latest")}
    out.update(version=4, groups=[group], inverted_damping=None if kronecker else state.get("inverted_damping"))
    return out


def _foreign_tensor(state: Any, dtype: torch.dtype, device: torch.device, where: str = "state") -> (
        tuple[str, torch.Tensor] | None):
    """The first floating-point tensor of a (nested) state in another dtype, on another device,
    or holding NaN/inf."""
    if isinstance(state, torch.Tensor):
        off = state.is_floating_point() and (state.dtype != dtype or state.device != device
                                             or not bool(torch.isfinite(state).all()))
        return (where, state) if off else None
    items = state.items() if isinstance(state, Mapping) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    for key, value in items:
        found = _foreign_tensor(value, dtype, device, f"{where}[{key!r}]")
        if found is not None:
            return found
    return None


class Preconditioner(OnLayers, LinearOperator):
    """A curvature approximation kept up to date on the T1/T2 schedule and applied to gradients.

    Build it with :func:`curvlib.build_preconditioner` (which validates the configuration
    against the plugin registry); see the module docstring for the schedule and what
    :meth:`apply` computes.

    Args:
        model: the network; its adapted layers (every layer plugin: Linear, convolutions,
            embeddings, norms, attention, third-party adapters) are preconditioned.
        loss_fn: the loss module (see :func:`curvlib.curvature`).
        resolved: the :class:`~curvlib.precond.config.ResolvedConfig`.
        generator: the ``torch.Generator`` of the Monte Carlo targets (default: a
            generator on the model's device seeded from torch's global RNG).
        registry: the plugin :class:`~curvlib.plugins.Registry` the kinds come from.
        process_group: ``"auto"``, a ``torch.distributed`` process group or ``None``
            (:func:`curvlib.distributed.resolve_process_group`): under torch.distributed the
            statistics are all-reduced and the inversions spread over the ranks, so every rank
            applies the global batch's preconditioner (docs/distributed.md).

    Attributes:
        config: the :class:`PreconditionerConfig`.
        model, loss_fn, registry, generator: as given.
        damping: the damping object (reused across inversions: an adaptive λ carries over).
        num_refreshes, num_inversions: how many refreshes / inversions happened.
        last_refresh_step, last_inversion_step: the step index of the last ones (``None``
            before the first).
        curvature: the curvature operator F of the latest refresh (``None`` before it): its
            products and statistics; its loss gradient ``F.gradient_vector()`` only with an
            adaptive damping, the one user of it (the refresh skips that backward pass otherwise).
        approximation: the block-diagonal approximation of the latest refresh (``kronecker`` only).
        inverse: the operator :meth:`apply` uses (first level only, without the coarse correction).
        last_inversion: the :class:`InversionReport` of the last inversion (``None`` before).
        shard: the :class:`~curvlib.distributed.Shard` under torch.distributed (its ``comm``
            counts the bytes sent), ``None`` in one process.

    A :class:`~curvlib.linalg.LinearOperator` (once ready): ``pre @ g`` is :meth:`apply`,
    and it combines with other operators like any curvlib operator; its adjoint is that of
    the operator it applies (a multiplicative two-level correction is not symmetric).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        resolved: ResolvedConfig,
        *,
        generator: torch.Generator | None = None,
        registry: Any,
        process_group: Any = "auto",
    ) -> None:
        self.model = unwrap_model(model)  # capture passes run on the module under compile/DDP wrappers
        self.loss_fn = loss_fn
        self.resolved = resolved
        self.config: PreconditionerConfig = resolved.config
        self.registry = registry
        self._device, self._dtype = _model_device_dtype(model)
        if generator is None:
            generator = default_generator(self.device)
        elif not isinstance(generator, torch.Generator):
            raise ConfigError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator
        self.damping = self._make_damping(resolved.groups[-1])  # the default rule's
        self._dampings = [None if g.fallback else self.damping if not g.own_damping or g.index is None
                          else self._make_damping(g) for g in resolved.groups]
        self._curvature_factory = resolved.curvature.spec.factory(resolved.curvature.options)
        if isinstance(self._curvature_factory, FisherCurvature) and isinstance(loss_fn, Objective):
            raise ConfigError(f"curvature 'fisher' samples targets from the model's likelihood, and the objective "
                              f"{loss_fn.name} is not one: use curvature 'empirical_fisher' or 'ggn'")
        self._verified: tuple[Any, ...] | None = None  # model state and batch shapes the per-sample probe passed on
        self._pending: _PendingCapture | None = None  # a refresh captured from the caller's own pass (capture())
        self.shard: Shard | None = self._make_shard(model, process_group)
        self._stream_seed: int | None = None
        self._background: _BackgroundInversion | None = None  # an inversion running in a worker thread
        self._side_stream: Any = None  # its CUDA stream, made at the first one on a GPU
        if self.shard is not None:  # the ranks agree on the model and the configuration before anything else
            self.shard.agree(self._fingerprint(), 1)
            self._stream_seed = self.shard.broadcast_seed(self.generator.initial_seed())
        self._reset()

    @staticmethod
    def _make_damping(rule: ResolvedRule) -> Damping:
        damping = rule.damping.spec.factory(rule.damping.options)
        if not isinstance(damping, Damping):
            where = "" if rule.index is None else f"{rule.label}: "
            raise ConfigError(f"{where}damping kind {rule.damping.kind!r} built a {type(damping).__name__}, "
                              "expected a curvlib Damping")
        return damping

    @property
    def dampings(self) -> list[Damping]:
        """The distinct damping objects: the default rule's first, then each rule's own."""
        out: list[Damping] = [self.damping]
        for d in self._dampings:
            if d is not None and all(d is not e for e in out):
                out.append(d)
        return out

    def _make_shard(self, model: nn.Module, process_group: Any) -> Shard | None:
        """The :class:`~curvlib.distributed.Shard` under torch.distributed (None: one process),
        after checking that the configuration can be fitted in shards."""
        group = resolve_process_group(model, process_group)
        if group is None:
            return None
        cfg = self.config
        if cfg.preconditioner != "kronecker":
            raise ConfigError(f"preconditioner={cfg.preconditioner!r} inverts the dense curvature of one batch; under "
                              "torch.distributed use preconditioner='kronecker'")
        for rule in self.resolved.groups:
            rk = rule.approximator
            if rk is not None and not getattr(type(rk.spec.factory(rk.options)), "distributed", False):
                where = "" if rule.index is None else f"{rule.label}: "
                raise ConfigError(f"{where}approximator {rk.kind!r} does not declare that it fits sharded statistics "
                                  "(BlockApproximator.distributed): under torch.distributed its fits would differ "
                                  "between the ranks; use kfac, kpsvd, deflation, lanczos or kfac_corrected")
        if cfg.coarse_space is not None and cfg.coarse_mode == "previous":
            raise ConfigError("coarse_mode='previous' builds F̄• from one batch's per-layer statistics; under "
                              "torch.distributed use 'multiplicative' or 'additive'")
        if cfg.background_inversion:
            raise ConfigError("background_inversion runs the inversion in a worker thread, and under torch.distributed "
                              "the inversion's collectives must run in the same order on every rank; set it False")
        return Shard(group, self.device, inversion=cfg.distributed_inversion)

    def _reset(self) -> None:
        self._step = 0
        self.num_refreshes = 0
        self.num_inversions = 0
        self.last_refresh_step: int | None = None
        self.last_inversion_step: int | None = None
        self._layers: list[LayerBlock] | None = None
        self._excluded: list[str] = []
        self.curvature: Any = None
        self._groups: tuple[LayerGroup, ...] = tuple(LayerGroup(rule, damping)
                                                 for rule, damping in zip(self.resolved.groups, self._dampings))
        self.approximation: Any = None  # the groups' fits joined (the one group's, without rules)
        self.inverse: Any = None  # the groups' inverses joined
        self._inverted_curvature: Any = None  # natural-gradient references: F of the last inversion
        self._inverted_damping_state: dict[str, Any] | None = None  # natural-gradient references
        self.last_inversion: InversionReport | None = None
        self._operator: Any = None  # what apply() multiplies by (two-level when configured)
        self._operator_lam: float | None = None  # λ the two-level operator was built with
        self._layer_params: list[list[int]] | None = None  # the layer-by-layer plan of apply()

    # -- description ---------------------------------------------------------------------
    @property
    def step(self) -> int:
        """The index of the next step (the number of updates so far, or the last ``step`` given + 1)."""
        return self._step

    @property
    def is_ready(self) -> bool:
        """Whether :meth:`apply` can be called (a first refresh and inversion happened)."""
        return self._operator is not None

    @property
    def layers(self) -> list[LayerBlock]:
        """The preconditioned layers (as of the latest refresh), in flat-vector order."""
        self._check_ready("layers")
        assert self._layers is not None
        return list(self._layers)

    @property
    def excluded(self) -> list[str]:
        """Qualified names of the trainable parameters the curvature left out (no adapter)."""
        return list(self._excluded)

    def refresh_due(self, step: int | None = None) -> bool:
        """Whether :meth:`update` at ``step`` (default: :attr:`step`) captures the curvature."""
        k = self._step if step is None else _step_index(step, "Preconditioner.refresh_due")
        if self._operator is None:
            return True
        if self.config.preconditioner != "kronecker":
            return k % self.config.update_every == 0
        return any(g.refresh_due(k) for g in self._groups)

    def inversion_due(self, step: int | None = None) -> bool:
        """Whether :meth:`update` at ``step`` (default: :attr:`step`) rebuilds the inverse."""
        k = self._step if step is None else _step_index(step, "Preconditioner.inversion_due")
        if self._operator is None:
            return True
        if self.config.preconditioner != "kronecker":
            return k % self.config.invert_every == 0
        return any(g.inversion_due(k) for g in self._groups)

    @property
    def groups(self) -> tuple[LayerGroup, ...]:
        """One :class:`LayerGroup` per rule (``config.rules`` in order, the default rule last):
        its layers, fits, inverse and own schedule counters."""
        return self._groups

    def rule_of(self, name: str) -> str:
        """The rule a preconditioned layer block follows (``"rules[i]"`` or ``"default"``)."""
        for g in self._groups:
            if name in g.names:
                return g.rule.label
        raise ConfigError(f"Preconditioner.rule_of: no preconditioned layer {name!r}; layers: "
                          f"{[n for g in self._groups for n in g.names]}")

    def describe(self) -> str:
        """A table of every layer block: the rule it matched, the approximator, damping and
        T1/T2 it gets, its factor sizes, the memory of its fitted factors and the FLOPs of one
        product with its fitted block (:mod:`curvlib.precond.explain`; ``curvlib explain``)."""
        from curvlib.precond.explain import format_plan, layer_plan

        return format_plan(layer_plan(self), torch.empty((), dtype=self.dtype).element_size())

    def _rule_index(self, name: str, module: nn.Module, num_params: int) -> int:
        """Index in :attr:`groups` of the first rule matching a layer block (the default: last)."""
        for i, g in enumerate(self.resolved.groups[:-1]):
            if g.rule.matches(name, module, num_params):
                return i
        return len(self.resolved.groups) - 1

    @contextlib.contextmanager
    def _discovery(self) -> Iterator[None]:
        """Layer discovery as configured: the fallback rules' layers left out
        (:func:`~curvlib.capture.layout.leaving_out`) and the ``uncovered`` mode
        (:func:`~curvlib.capture.layout.uncovered_parameters`)."""
        with leaving_out(self._leave_out()), uncovered_parameters(self.config.uncovered):
            yield

    def _leave_out(self) -> Any:
        """The :func:`~curvlib.capture.layout.leaving_out` reason of the fallback rules (None: none)."""
        if not any(g.fallback for g in self.resolved.groups):
            return None

        def reason(c: BlockCandidate) -> str | None:
            rule = self.resolved.groups[self._rule_index(c.name, c.adapter.module, c.adapter.num_params)]
            return f"left to the fallback optimizer by {rule.label} ({rule.rule.describe()})" if rule.fallback else None
        return reason

    def __repr__(self) -> str:
        c = self.config
        coarse = "" if c.coarse_space is None else f", coarse_space={c.coarse_space['kind']!r} ({c.coarse_mode})"
        return (
            f"Preconditioner({c.preconditioner}, curvature={self.resolved.curvature.kind!r}, "
            f"approximator={self.resolved.approximator.kind!r}, damping={self.damping!r}{coarse}, "
            f"T1={c.update_every}, T2={c.invert_every}, step={self._step})"
        )

    # -- schedule --------------------------------------------------------------------------
    def update(self, batch: Any = None, *, step: int | None = None) -> UpdateInfo:
        """Advance the schedule by one step: refresh and/or invert when due (module docstring).

        Args:
            batch: ``(X, y)`` the curvature is captured on; may be ``None`` at steps where
                no refresh is due, and after :meth:`capture` for this step (whose capture, and
                batch, are then used).
            step: the step index k (default: :attr:`step`); the next default is k + 1.

        Returns:
            an :class:`UpdateInfo`.

        Atomic: when the capture, the fit or the inversion raises, the preconditioner
        (counters, generator, damping, fits, inverse) is left exactly as it was.  A numerical
        failure (:class:`~curvlib.errors.NumericalError`, e.g. a Gram or coarse matrix that
        overflows) with a previous refresh to fall back on is not raised: that refresh and its
        inverse are kept, with a :class:`~curvlib.errors.NumericalWarning`, the step counter
        advances and the returned info says ``refreshed=False, inverted=False``.

        With ``background_inversion``, an inversion started by the previous update is first
        installed (:meth:`wait_inversion`), and an inversion due at this step is started in
        the background after the refresh (``UpdateInfo.background``).

        Raises:
            ConfigError: a refresh is due and ``batch`` is ``None``; or ``step`` < 0.
            NumericalError: the first refresh fails numerically (nothing to keep).
            whatever a background inversion raised (:meth:`wait_inversion`), before anything
            of this update is done.
        """
        self.wait_inversion()
        k = self._step if step is None else _step_index(step, "Preconditioner.update")
        refresh = self.refresh_due(k)
        invert = self.inversion_due(k)
        pending, self._pending = self._pending, None  # a capture serves this update or none
        if pending is not None and (pending.step != k or not refresh):
            pending = None
        if refresh and batch is None and pending is not None:
            batch = pending.batch
        if refresh and batch is None:
            raise ConfigError(
                f"Preconditioner.update: a curvature refresh is due at step {k} (update_every = T1 = "
                f"{self.config.update_every}{', first refresh' if self._operator is None else ''}) and needs "
                "the batch: pass batch=(X, y)"
            )
        t0 = t1 = time.perf_counter()
        background = False
        try:
            with self.transaction("Preconditioner.update"):  # a failed update leaves no trace
                relayout = refresh and self._refresh(batch, k, pending)
                if relayout:
                    invert = True  # the layers changed: the old inverse no longer fits
                t1 = time.perf_counter()
                background = invert and self.config.background_inversion and not relayout and self.inverse is not None
                if invert and not background:
                    self._invert(k)
                if refresh:
                    self._build_operator()
        except NumericalError as exc:
            if self._operator is None:
                raise
            warn(
                f"Preconditioner.update: the refresh at step {k} failed numerically ({exc}); keeping the "
                f"previous refresh (step {self.last_refresh_step}) and its inverse",
                NumericalWarning,
            )
            refresh = invert = background = False
        if background:
            self._start_background_inversion(k)
        t2 = time.perf_counter()
        self._step = k + 1
        return UpdateInfo(step=k, refreshed=refresh, inverted=invert, refresh_seconds=t1 - t0 if refresh else 0.0,
                          invert_seconds=t2 - t1 if invert else 0.0, background=background)

    # -- statistics from the caller's own pass ----------------------------------------------------
    @contextlib.contextmanager
    def capture(self, batch: Any) -> Iterator[None]:
        """Capture the refresh due at the next :meth:`update` from the caller's own forward pass.

        Usage (the training-loop pattern of docs/optimizer.md)::

            with pre.capture((X, y)):
                loss = loss_fn(model(X), y)   # the model called once, on X
            loss.backward()
            pre.update()                      # no batch needed: it was captured

        When a refresh is due at the next step and the curvature kind is one of curvlib's
        statistics kinds (``fisher``, ``empirical_fisher``, ``ggn``), the layers are hooked
        during the block and the kind's columns (the sampled targets of ``fisher``) are
        back-propagated through the caller's graph at its exit (the graph is retained for the
        caller's backward): the statistics equal those :meth:`update` would capture from
        ``batch`` with a forward pass of its own, which this saves.  ``empirical_fisher``
        back-propagates nothing at the exit: its column is the caller's ``loss.backward()``
        (:meth:`~curvlib.curvatures.kinds.StatisticsCurvature.capturing_backward`), read by
        :meth:`update`; when that backward cannot stand for it, :meth:`update` captures the
        batch itself with a :class:`~curvlib.errors.PerformanceWarning`.  Otherwise (no refresh
        due: nothing is hooked; another kind: the batch is kept and :meth:`update` captures
        it as usual) the block costs nothing.  The capture is used by the next :meth:`update`
        of the same step, and dropped by any other.
        """
        k = self._step
        self._pending = None
        if not self.refresh_due(k):
            yield
            return
        factory = self._curvature_factory
        if not isinstance(factory, StatisticsCurvature):
            yield
            self._pending = _PendingCapture(k, batch, None, None)
            return
        self._seed_stream()
        if isinstance(factory, EmpiricalFisherCurvature):  # its column is the caller's own backward
            with self._discovery(), factory.capturing_backward(
                    self.model, self.loss_fn, batch, registry=self.registry, **self._capture_options(batch)) as state:
                yield
            self._pending = _PendingCapture(k, batch, None, self.generator.get_state(), state.finish)
            return
        before = self.generator.get_state()
        with self._discovery(), factory.capturing(
                self.model, self.loss_fn, batch, generator=self.generator, registry=self.registry,
                **self._capture_options(batch)) as state:
            yield
        after = self.generator.get_state()
        self.generator.set_state(before)  # the draws are committed by the update that uses them
        self._pending = _PendingCapture(k, batch, state.operator, after)

    def discard_capture(self) -> None:
        """Drop a capture no :meth:`update` used (e.g. the optimizer skipped the step)."""
        self._pending = None

    def pending_batch(self, step: int) -> Any:
        """The batch :meth:`capture` captured for ``step``, or ``None``."""
        p = self._pending
        return p.batch if p is not None and p.step == step else None

    def _capture_options(self, batch: Any) -> dict[str, bool]:
        """``verify``/``gradient`` for curvlib's own kinds: the per-sample probe (one backward pass)
        runs again only when the model's modes or the batch shapes changed since it last passed,
        and only an adaptive damping's reduction ratio uses the captured ∇L."""
        if not isinstance(self._curvature_factory, BuiltinCurvature):
            return {}
        extra = {}
        if self._probe_key(batch) == self._verified:
            extra["verify"] = False
        if not self.damping.adaptive:
            extra["gradient"] = False
        return extra

    def _probe_key(self, batch: Any) -> tuple[Any, ...]:
        return (tuple(mod.training for mod in self.model.modules()),
                tuple(tuple(t.shape) for t in split_batch(batch).tensors()))

    def _seed_stream(self) -> None:
        """Under torch.distributed: this rank's Monte Carlo stream for the coming refresh,
        reseeded from (seed, rank, refresh) (:meth:`curvlib.distributed.Shard.stream_seed`)."""
        if self.shard is not None:
            self.generator.manual_seed(self.shard.stream_seed(self._stream_seed, self.num_refreshes))

    def _fingerprint(self, F: Any = None, k: int | None = None) -> str:
        """What every rank must share, one item per line (compared by hash): the world size, the
        dtype, each configuration field and parameter shape; at a refresh (``F``, step ``k``)
        the step and the preconditioned layers."""
        lines = [f"world size {self.shard.world_size}", f"dtype {self.dtype}"]
        lines += [f"configuration {key} = {json.dumps(value, sort_keys=True, default=_stable_text)}"
                  for key, value in sorted(self.config.to_dict().items())]
        if F is None:
            lines += [f"parameter {name!r} {list(q.shape)}" for name, q in self.model.named_parameters()]
        else:
            lines += [f"step {k}, refresh {self.num_refreshes}", f"{len(F.layers)} preconditioned layers"]
            lines += [f"layer {L.name!r} (d_a, d_g) = {(L.a_dim, L.g_dim)}" for L in F.layers]
        return "\n".join(lines)

    def _refresh(self, batch: Any, k: int, pending: _PendingCapture | None = None) -> bool:
        """Capture (or take ``pending``, the capture of the caller's pass) and refit; returns
        whether the set of layers changed (a new layout)."""
        factory = self._curvature_factory
        if pending is not None:
            batch = pending.batch
        key = self._probe_key(batch)
        extra = self._capture_options(batch)
        F = None
        if pending is not None and pending.finish is not None:
            F = pending.finish()  # the empirical Fisher from the caller's backward
            if F is None:
                warn(f"Preconditioner.update: the backward pass after capture() at step {k} cannot stand for the "
                     "empirical Fisher's column (it did not run, ran more than once, or its gradient at the network "
                     "output is not a multiple of the loss's per-sample gradients: a loss with other terms of the "
                     "output, a scaled loss); capturing the batch with a forward and backward pass of its own",
                     PerformanceWarning)
        elif pending is not None and pending.operator is not None:
            F = pending.operator
            self.generator.set_state(pending.generator_after)
        if F is None:
            self._seed_stream()
            with preserved_buffers(self.model), torch.enable_grad(), self._discovery():
                F = factory.build(self.model, self.loss_fn, batch, generator=self.generator, registry=self.registry,
                                  **extra)
        bad = _nonfinite_parts(F) if isinstance(F, CurvatureOperator) else []
        if self.shard is not None:  # one decision for all ranks (and the check that they agree)
            if self.shard.agree(self._fingerprint(F, k), F.num_samples, bool(bad)) and not bad:
                bad = ["another rank's statistics"]
        if bad:
            where = "; ".join(bad)
            if self.curvature is None:
                raise NumericalError(f"Preconditioner.update: the curvature captured at step {k} is not finite ({where}), "
                                     "and there is no previous refresh to keep")
            warn(
                f"Preconditioner.update: the curvature captured at step {k} is not finite ({where}); keeping "
                f"the previous refresh (step {self.last_refresh_step}): its fits, curvature and inverse",
                NumericalWarning,
            )
            return False
        changed = self._layers is not None and [L.name for L in F.layers] != [L.name for L in self._layers]
        if changed and extra.pop("verify", True) is False:  # another set of layers than the verified one: verify it
            with preserved_buffers(self.model), torch.enable_grad(), self._discovery():
                F = factory.build(self.model, self.loss_fn, batch, generator=self.generator, registry=self.registry,
                                  **extra)
        self._verified = key
        if self.config.preconditioner == "kronecker":
            # a different set of layers (a module skipped by this forward): EMA and warm
            # starts cannot continue, and the inverses are rebuilt at once
            self._groups = self._refit(F, k, relayout=changed or self._layers is None)
        self.curvature = F
        self._layers = list(F.layers)
        self._excluded = list(F.excluded)
        self.num_refreshes += 1
        self.last_refresh_step = k
        return changed

    def _refit(self, F: Any, k: int, relayout: bool) -> tuple[LayerGroup, ...]:
        """The groups after the refresh at step k: each group due refits its layers of ``F``
        (``relayout``: the layers are assigned to the rules anew and every fit starts over)."""
        groups = self._groups
        if relayout:
            names: list[list[str]] = [[] for _ in groups]
            for L in F.layers:
                i = self._rule_index(L.name, L.module, L.p_i)
                if groups[i].rule.fallback:
                    raise ConfigError(
                        f"Preconditioner.update: the curvature kind {self.resolved.curvature.kind!r} captured layer "
                        f"{L.name!r}, which {groups[i].rule.label} leaves to the fallback optimizer: this kind does "
                        "not leave layers out (curvlib.capture.layout.leaving_out); use fisher, empirical_fisher or ggn"
                    )
                names[i].append(L.name)
            groups = tuple(LayerGroup(g.rule, g.damping, tuple(n)) for g, n in zip(groups, names))
        out = []
        for g in groups:
            if not g.refresh_due(k):
                out.append(g)
                continue
            approx = approximate(F, g.kind, previous=g.approximation, registry=self.registry, layers=list(g.names),
                                 shard=self.shard)
            # Store the fit in the memory layout a checkpoint restores (factors stacked per
            # layer, contiguous; as_restored copies only where the layout differs): BLAS rounding
            # depends on strides, and a resumed run must compute with exactly the tensors the
            # uninterrupted one uses.
            approx = approx.as_restored()
            out.append(dataclasses.replace(g, approximation=approx, num_refreshes=g.num_refreshes + 1,
                                           last_refresh_step=k))
        self.approximation = _joined([g.approximation for g in out if g.approximation is not None])
        return tuple(out)

    def _invert(self, k: int) -> None:
        if self.config.preconditioner == "kronecker":
            self._install_inverse(k, self._inverted_groups(self._groups, k, self.shard))
            return
        self._inverted_damping_state = copy.deepcopy(self.damping.state_dict())
        self.inverse = self._natural_gradient(self.curvature)
        self._inverted_curvature = self.curvature
        self._count_inversion(k)

    @staticmethod
    def _inverted_groups(groups: Sequence[LayerGroup], k: int, shard: Shard | None) -> tuple[LayerGroup, ...]:
        """The groups with the damped inverses of those due at step k rebuilt from their latest fits
        (pure: reads the groups and their dampings, changes neither)."""
        out = []
        for g in groups:
            if not g.inversion_due(k):
                out.append(g)
                continue
            state = copy.deepcopy(g.damping.state_dict())
            previous = g.inverse if isinstance(g.inverse, BlockDiagonalInverse) else None
            if previous is not None and [b.shape for b in previous.blocks] != [
                (s.stop - s.start,) * 2 for s in g.approximation.slices
            ]:
                previous = None
            inverse = damped_inverse(g.approximation, g.damping, previous=previous, shard=shard)
            out.append(dataclasses.replace(g, inverse=inverse, inverted_approximation=g.approximation,
                                           inverted_damping_state=state, num_inversions=g.num_inversions + 1,
                                           last_inversion_step=k))
        return tuple(out)

    def _install_inverse(self, k: int, groups: tuple[LayerGroup, ...], report: InversionReport | None = None) -> None:
        self._groups = groups
        self.inverse = _joined([g.inverse for g in groups if g.inverse is not None], self.damping)
        self._count_inversion(k, report)

    def _count_inversion(self, k: int, report: InversionReport | None = None) -> None:
        """The counters and report of the inversion of step k, whose inverse is installed."""
        self.num_inversions += 1
        self.last_inversion_step = k
        self.last_inversion = report or _inversion_report(k, self.inverse, [L.name for L in self._layers or []])

    # -- background inversion ------------------------------------------------------------------
    def _start_background_inversion(self, k: int) -> None:
        """Start the inversion of step k in a worker thread (``background_inversion``): it reads
        the groups as they are now, with frozen copies of their dampings (the live ones may adapt
        meanwhile), and :meth:`wait_inversion` installs its result."""
        groups = self._groups
        frozen = copy.deepcopy([g.damping for g in groups])  # one call: shared dampings stay shared
        snapshot = tuple(dataclasses.replace(g, damping=d) for g, d in zip(groups, frozen))
        names = [L.name for L in self._layers or []]

        def invert() -> tuple[tuple[LayerGroup, ...], InversionReport]:
            done = self._inverted_groups(snapshot, k, None)
            return done, _inversion_report(k, _joined([g.inverse for g in done if g.inverse is not None],
                                                      frozen[-1]), names)

        if self.device.type == "cuda" and self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        self._background = _BackgroundInversion(k, invert, self._side_stream)  # None: no side stream off a GPU

    def wait_inversion(self) -> bool:
        """Wait for the inversion running in the background (``background_inversion``), if any,
        and install it: the next :meth:`apply` uses the new inverse.  :meth:`update`,
        :meth:`state_dict` and :meth:`load_state_dict` call it first, and so does
        :class:`~curvlib.optim.NaturalGradient` at the start of every step, so the inverse
        started at step k serves the directions from step k + 1 on.

        Returns:
            whether an inversion was installed.

        Raises:
            whatever the inversion raised (e.g. a damping plugin's error); the preconditioner
            then keeps its previous inverse, and the next inversion is due at the next multiple
            of T2.
        """
        job = self._background
        if job is None:
            return False
        try:
            done, report = job.result()
        finally:
            self._background = None
        live = {id(g.rule): g.damping for g in self._groups}
        installed = []
        for g in done:  # the inverses were built with frozen copies: point them at the live dampings
            damping = live[id(g.rule)]
            if g.last_inversion_step == job.step and isinstance(g.inverse, BlockDiagonalInverse):
                g.inverse.damping = damping
                g.inverse.block_dampings = (damping,) * len(g.inverse.blocks)
            installed.append(dataclasses.replace(g, damping=damping))
        self._install_inverse(job.step, tuple(installed), report)
        self._build_operator()
        return True

    def _lam(self) -> float:
        return self.damping.value

    def _natural_gradient(self, F: Any) -> Any:
        if self.config.preconditioner == "exact_natural_gradient":
            return exact_natural_gradient(F, self._lam())
        return block_natural_gradient(F, self._lam())

    def _build_operator(self, lam: float | None = None) -> None:
        """The operator apply() uses: the inverse, or the two-level one around it (with the
        damping's current λ, or ``lam`` — the one it was built with, when a state is loaded)."""
        self._layer_params = None
        self._operator_lam = self._lam() if lam is None else float(lam)
        if self.resolved.coarse_space is None:
            self._operator = self.inverse
            self._layer_params = self._layerwise_plan()
            return
        rc = self.resolved.coarse_space
        # "previous" (4.20b) damps F̄•'s diagonal blocks like the first level does
        tko_diagonal = "tikhonov" if self.damping.formula_kind == "tikhonov" else "heuristic"
        self._operator = two_level(
            self.inverse,
            self.curvature if self.shard is None else ShardedCurvature(self.curvature, self.shard),
            {"kind": rc.kind, **rc.data},
            self._operator_lam,
            self.config.coarse_mode,
            registry=self.registry,
            tko_diagonal=tko_diagonal,
            partition=self._coarse_partition(),
        )

    def _coarse_partition(self) -> Partition | None:
        """With rules: one group per layer of the rules in the coarse space (the other layers'
        rows of R₀ᵀ are zero: one level there); without: ``None``, every layer."""
        if not self.config.rules:
            return None
        chosen = [L for L in self.curvature.layers
                  for g in self._groups if g.rule.coarse and L.name in g.names]
        if not chosen:
            raise ConfigError(
                "Preconditioner.update: no preconditioned layer is in the coarse space: the rules that put layers in it "
                f"({[g.rule.label for g in self._groups if g.rule.coarse]}) matched none of "
                f"{[L.name for L in self.curvature.layers]}")
        chosen.sort(key=lambda L: L.slice.start)
        return Partition([L.slice for L in chosen], self.curvature.shape[0], names=[L.name for L in chosen], cover=False)

    # -- application -------------------------------------------------------------------------
    def _check_ready(self, what: str) -> None:
        if self._operator is None:
            raise NotReadyError(
                f"Preconditioner.{what}: no curvature yet; call update(batch) (or the optimizer's "
                "step(batch=...)) before using the preconditioner"
            )

    def apply(self, grad: torch.Tensor | Sequence[torch.Tensor], *,
              check_finite: bool = True) -> torch.Tensor | list[torch.Tensor]:
        """The preconditioned direction ζ ≈ F•⁻¹ g (see the module docstring for the kinds).

        A list of gradients with the block-diagonal Kronecker preconditioner (no coarse space,
        no parameter shared between layers) takes the lean path: each layer's inverse is applied
        to its gradient matrix [∇W, ∇b] directly (two GEMMs for a π-split inverse), with no
        flat vector in between.

        Args:
            grad: the flat curvlib vector ``[p]`` (or ``[p, k]``), or a list of tensors
                shaped like :meth:`params` (e.g. their ``.grad``).
            check_finite: on the lean path, ``False`` skips the finiteness check of the
                direction (its host synchronisation) — the caller checks it (the optimizer
                folds it into the step's one check); other paths always check.

        Returns:
            the direction in the same form as ``grad``.

        Raises:
            NotReadyError: before the first :meth:`update`.
            ShapeError, DTypeDeviceError: ``grad`` does not fit.
        """
        self._check_ready("apply")
        if isinstance(grad, (list, tuple)) and self._layer_params is not None:
            return self._apply_layerwise(grad, check_finite)
        return self.matvec(grad)

    def _layerwise_plan(self) -> list[list[int]] | None:
        """For each layer the indices (in :meth:`params`) of its parameters, when the operator is
        the block-diagonal inverse over exactly the layers and no parameter is shared or sliced
        between layers: then :meth:`apply` works on each layer's gradient matrix directly."""
        inv = self._operator
        if not isinstance(inv, BlockDiagonalInverse) or inv.uncovered:
            return None
        layers = self.layers
        if [(s.start, s.stop) for s in inv.slices] != [(L.slice.start, L.slice.stop) for L in layers]:
            return None
        index = {id(q): k for k, q in enumerate(self.params())}
        plan, seen = [], set()
        for L in layers:
            ad = L.adapter
            ks = [index[id(q)] for q in ad.params()]
            if any(s is not None for s in ad.param_slices()) or seen & set(ks):
                return None
            seen |= set(ks)
            plan.append(ks)
        return plan

    def _apply_layerwise(self, grads: Sequence[torch.Tensor], check_finite: bool) -> list[torch.Tensor]:
        """Per layer Y_i = M_i⁻¹ applied to the gradient matrix [∇W, ∇b] ``[d_g, d_a]`` and split
        back — no flat vector, no vec transposes; one finiteness check (one host sync) for all."""
        params = self.params()
        if len(grads) != len(params) or any(g.shape != q.shape for g, q in zip(grads, params)):
            return self.matvec(grads)  # the flat path reports the mismatch
        for g in grads:
            if g.dtype != self.dtype or g.device != self.device:
                return self.matvec(grads)
        out: list[torch.Tensor] = [None] * len(params)  # type: ignore[list-item]
        # the shapes are checked above and the plan has no sliced parameter, so the adapters'
        # unchecked conversions serve (their checked forms re-derive every piece's shape)
        for L, block, ks in zip(self.layers, self._operator.blocks, self._layer_params):
            Y = block._apply(L.adapter._to_matrix([grads[k] for k in ks]).unsqueeze(0))[0]
            for k, piece in zip(ks, L.adapter._from_matrix(Y)):
                out[k] = piece
        if self._directions_reduced():  # each rank computed its own layers (zero elsewhere)
            out = self.shard.sum(out, "directions")
        if check_finite and not bool(finite_screen(out)):
            return self.matvec(grads)  # checks exactly: reports which layer block and why (NumericalError)
        return out

    @property
    def symmetric(self) -> bool:  # type: ignore[override]
        self._check_ready("symmetric")
        return self._operator.symmetric

    def _directions_reduced(self) -> bool:
        return self.shard is not None and self.shard.inversion == "direction"

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        if self._directions_reduced():  # checked after the sum: every rank raises, or none
            Y = self.shard.sum([self._operator._matmat(X)], "directions")[0]
            self._operator._check_result(Y, X, "Preconditioner.apply")
            return Y
        return self._operator.matmat(X)

    def _rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        if self._directions_reduced():
            Z = self.shard.sum([self._operator._rmatmat(Y)], "directions")[0]
            self._operator._check_result(Z, Y, "Preconditioner.apply")
            return Z
        return self._operator.rmatmat(Y)

    # -- checkpoints ---------------------------------------------------------------------------
    def _needs_latest_curvature(self) -> bool:
        return self.resolved.coarse_space is not None

    def state_dict(self) -> dict[str, Any]:
        """Everything the next steps depend on, as plain containers of tensors and numbers.

        Keys: the step counters, the generator state, the layer layout, the latest
        approximation (factors, EMA counters, warm-start vectors), the approximation and
        damping state the current inverse was built from (the inverse is rebuilt from them
        on load, deterministically), the damping state (e.g. the Levenberg–Marquardt λ),
        and — when the coarse correction or a natural-gradient reference needs it — the
        captured statistics of the curvature.  Loadable with ``torch.load(weights_only=True)``.
        An inversion running in the background is waited for and installed first.
        """
        self.wait_inversion()
        state: dict[str, Any] = {
            "version": _STATE_VERSION,
            "preconditioner": self.config.preconditioner,
            "approximator": self.resolved.approximator.kind,
            "step": self._step,
            "num_refreshes": self.num_refreshes,
            "num_inversions": self.num_inversions,
            "last_refresh_step": self.last_refresh_step,
            "last_inversion_step": self.last_inversion_step,
            "generator": self.generator.get_state(),
            "layers": None
            if self._layers is None
            else [{"name": L.name} for L in self._layers],
            "excluded": list(self._excluded),
            "damping": copy.deepcopy(self.damping.state_dict()),
            "inverted_damping": copy.deepcopy(self._inverted_damping_state),
            "groups": [self._group_state(g) for g in self._groups],
            "curvature": None,
            "inverted_curvature": None,
            "inverted_curvature_is_latest": False,
            "operator_lam": self._operator_lam,
            "world_size": 1 if self.shard is None else self.shard.world_size,
            "stream_seed": self._stream_seed,
        }
        if self._operator is not None and self._needs_latest_curvature():
            state["curvature"] = _curvature_state(self.curvature)
            if self.shard is not None:  # every rank's shard: a collective (docs/distributed.md)
                state["curvature"] = self.shard.gather_objects(state["curvature"])
        if self._inverted_curvature is not None:
            if self._inverted_curvature is self.curvature and state["curvature"] is not None:
                state["inverted_curvature_is_latest"] = True
            else:
                state["inverted_curvature"] = _curvature_state(self._inverted_curvature)
        return state

    @staticmethod
    def _group_state(g: LayerGroup) -> dict[str, Any]:
        same = g.inverted_approximation is g.approximation
        own = g.rule.own_damping and g.rule.index is not None
        return {
            "rule": g.rule.label,
            "approximator": None if g.rule.fallback else g.rule.approximator.kind,
            "layers": list(g.names),
            "damping": copy.deepcopy(g.damping.state_dict()) if own else None,
            "inverted_damping": copy.deepcopy(g.inverted_damping_state),
            "approximation": None if g.approximation is None else g.approximation.state_dict(),
            "inverted_approximation": None
            if g.inverted_approximation is None or same
            else g.inverted_approximation.state_dict(),
            "inverted_is_latest": g.inverted_approximation is not None and same,
            "num_refreshes": g.num_refreshes,
            "num_inversions": g.num_inversions,
            "last_refresh_step": g.last_refresh_step,
            "last_inversion_step": g.last_inversion_step,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` into this preconditioner (built for the same model and config).

        The next :meth:`update`/:meth:`apply` calls then give bit-identical results to those
        of the preconditioner that was saved (on the same device and torch build).

        The load is atomic: when anything in the state does not fit, the preconditioner
        (counters, generator, damping, factors, inverse) is left exactly as it was.

        Raises:
            ConfigError: the state is of another version, preconditioner type or approximator
                kind, names layers the model does not have or factors of other shapes, has a
                negative step or a corrupt generator state, or does not load for another reason.
        """
        caller = "Preconditioner.load_state_dict"
        self.wait_inversion()  # its result would otherwise land on the loaded state
        if isinstance(state, Mapping) and state.get("version") == 2:  # saved before torch.distributed: one process
            state = {**state, "version": 3, "world_size": 1, "stream_seed": None}
        if isinstance(state, Mapping) and state.get("version") == 3:  # saved before rules: one group
            state = _state_v3_to_v4(state)
        with self.transaction(caller, "the state does not load"):
            self._load(state, caller)
            # whatever the loaders coerced (a NaN flag into True, a truncated tensor) shows here
            where = _first_difference(state, self.state_dict())
            if where is not None:
                raise ConfigError(f"{caller}: the state's entry {where} is not what a preconditioner saves (a corrupt "
                                  "or edited state?): it does not round-trip")

    @contextlib.contextmanager
    def transaction(self, caller: str = "Preconditioner.transaction", what: str | None = None) -> Iterator[None]:
        """All or nothing: on any exception the preconditioner (attributes, generator state,
        damping state) is restored exactly and the exception re-raised — with ``what`` given,
        one that is not a :class:`ConfigError` as a :class:`ConfigError` (``what`` says what
        failed) chained to it.

        The attributes are restored by reference: an update or a load only rebinds them to new
        objects (fits, inverses, curvatures are never changed in place)."""
        saved = dict(self.__dict__)
        generator_state = self.generator.get_state()
        damping_states = [(d, copy.deepcopy(d.state_dict())) for d in self.dampings]
        try:
            yield
        except BaseException as exc:
            self.__dict__.clear()
            self.__dict__.update(saved)
            self.generator.set_state(generator_state)
            for d, dstate in damping_states:
                d.load_state_dict(dstate)
            if what is None or isinstance(exc, ConfigError) or not isinstance(exc, Exception):
                raise
            raise ConfigError(f"{caller}: {what} ({type(exc).__name__}: {exc}); the preconditioner is "
                              "unchanged") from exc

    def _load(self, state: Mapping[str, Any], caller: str) -> None:
        if not isinstance(state, Mapping):
            raise ConfigError(f"{caller}: expected a mapping, got {type(state).__name__}")
        if state.get("version") != _STATE_VERSION:
            raise ConfigError(f"{caller}: expected state version {_STATE_VERSION}, got {state.get('version')!r}")
        for key, mine in (("preconditioner", self.config.preconditioner), ("approximator", self.resolved.approximator.kind)):
            if state.get(key) != mine:
                raise ConfigError(f"{caller}: the state was saved with {key}={state.get(key)!r}, this one has {mine!r}")
        step = _step_index(state.get("step"), caller)
        for key in ("last_refresh_step", "last_inversion_step"):
            if state.get(key) is not None and _step_index(state[key], f"{caller}: {key}") >= step:
                raise ConfigError(f"{caller}: the state's {key} = {state[key]!r} is not before its step {step}")
        world = 1 if self.shard is None else self.shard.world_size
        if state.get("world_size") != world:
            raise ConfigError(f"{caller}: the state was saved by {state.get('world_size')!r} processes, this preconditioner "
                              f"runs in {world} (resume with the world size the checkpoint was saved with)")
        curvature_state = state.get("curvature")
        if curvature_state is not None and self.shard is not None:
            if not isinstance(curvature_state, (list, tuple)) or len(curvature_state) != world:
                raise ConfigError(f"{caller}: the state's curvature should hold the statistics of each of the {world} "
                                  "ranks")
            curvature_state = curvature_state[self.shard.rank]
        groups = state.get("groups")
        labels = [g.rule.label for g in self._groups]
        if not isinstance(groups, (list, tuple)) or [g.get("rule") if isinstance(g, Mapping) else None
                                                     for g in groups] != labels:
            got = ([g.get("rule") if isinstance(g, Mapping) else type(g).__name__ for g in groups]
                   if isinstance(groups, (list, tuple)) else type(groups).__name__)
            raise ConfigError(f"{caller}: the state holds the groups {got}; this preconditioner's rules make {labels} "
                              "(it was saved with other rules?)")
        for g, saved_group in zip(self._groups, groups):
            mine = None if g.rule.fallback else g.rule.approximator.kind
            for key in ("approximation", "inverted_approximation"):
                saved = saved_group.get(key)
                if saved is not None and (not isinstance(saved, Mapping) or saved.get("kind") != mine):
                    got = saved.get("kind") if isinstance(saved, Mapping) else type(saved).__name__
                    where = "" if g.rule.index is None and len(labels) == 1 else f"{g.rule.label} "
                    raise ConfigError(f"{caller}: the state's {where}{key} was fitted by {got!r}; this preconditioner "
                                      f"uses {mine!r}")
        if state.get("operator_lam") is not None:  # (its type is checked by the round trip)
            positive_damping(state["operator_lam"], f"{caller}: operator_lam")
        bad = _foreign_tensor(state, self.dtype, self.device)
        if bad is not None:
            where, t = bad
            if t.dtype == self.dtype and t.device == self.device:
                raise ConfigError(f"{caller}: the state's tensor {where} holds non-finite values; a checkpoint never "
                                  "holds them (a corrupt file?)")
            raise ConfigError(f"{caller}: the state's tensor {where} is {t.dtype} on {t.device}; this preconditioner "
                              f"works in {self.dtype} on {self.device} (cast the model, or load with "
                              "torch.load(..., map_location=...))")
        if self._needs_latest_curvature() and state.get("layers") is not None and state.get("curvature") is None:
            raise ConfigError(f"{caller}: this preconditioner's coarse space needs the captured curvature, and the state "
                              "has none (it was saved by a preconditioner without a coarse space?)")
        self._reset()

        try:
            self.generator.set_state(state["generator"])
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"{caller}: the generator state does not fit this generator ({exc})") from None
        layers = None if state["layers"] is None else self._layout(state["layers"], caller)
        self._layers = layers
        self._excluded = list(state["excluded"])
        seed = state["stream_seed"]
        if (seed is None) != (self.shard is None) or (seed is not None and (isinstance(seed, bool) or not isinstance(seed, int))):
            raise ConfigError(f"{caller}: the state's stream_seed is {seed!r}; expected "
                              f"{'None (one process)' if self.shard is None else 'an int (the seed of the ranks streams)'}")
        self._stream_seed = seed
        self._groups = tuple(self._load_group(g, saved, layers, caller) for g, saved in zip(self._groups, groups))
        self.approximation = _joined([g.approximation for g in self._groups if g.approximation is not None])
        if curvature_state is not None:
            assert layers is not None
            self.curvature = _curvature_from_state(curvature_state, layers, caller)
        if state["inverted_curvature_is_latest"]:
            self._inverted_curvature = self.curvature
        elif state["inverted_curvature"] is not None:
            assert layers is not None
            self._inverted_curvature = _curvature_from_state(state["inverted_curvature"], layers, caller)
        # rebuild the inverses with each damping in the state it was in at the inversion
        if self.config.preconditioner == "kronecker":
            rebuilt = []
            for g in self._groups:
                if g.inverted_damping_state is not None and g.inverted_approximation is not None:
                    self._load_damping(g.damping, g.inverted_damping_state, caller)
                    g = dataclasses.replace(g, inverse=damped_inverse(g.inverted_approximation, g.damping,
                                                                      shard=self.shard))
                rebuilt.append(g)
            self._groups = tuple(rebuilt)
            self.inverse = _joined([g.inverse for g in rebuilt if g.inverse is not None], self.damping)
        elif state["inverted_damping"] is not None and self._inverted_curvature is not None:
            self._load_damping(self.damping, state["inverted_damping"], caller)
            self.inverse = self._natural_gradient(self._inverted_curvature)
            self._inverted_damping_state = copy.deepcopy(dict(state["inverted_damping"]))
        for g, saved in zip(self._groups, groups):
            if saved["damping"] is not None:
                self._load_damping(g.damping, saved["damping"], f"{caller}: {g.rule.label}")
        self._load_damping(self.damping, state["damping"], caller)
        if self.inverse is not None:
            # an adaptive λ may have moved since the operator was built (after its refresh)
            self._build_operator(state.get("operator_lam"))
        self._step = int(state["step"])
        self.num_refreshes = int(state["num_refreshes"])
        self.num_inversions = int(state["num_inversions"])
        self.last_refresh_step = state["last_refresh_step"]
        self.last_inversion_step = state["last_inversion_step"]

    def _load_group(self, g: LayerGroup, saved: Mapping[str, Any], layers: list[LayerBlock] | None,
                    caller: str) -> LayerGroup:
        """A group from its saved state, its layers and fits checked against the model's layout."""
        where = f"{caller}: {g.rule.label}"
        names = saved["layers"]
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"{where}: the state's layers are {names!r}; expected a list of layer names")
        by_name = {L.name: L for L in layers or []}
        for n in names:
            L = by_name.get(n)
            if L is None:
                raise ConfigError(f"{where}: the state's group holds layer {n!r}, which its layout does not have")
            rule = self.resolved.groups[self._rule_index(L.name, L.module, L.p_i)]
            if rule is not g.rule:
                raise ConfigError(f"{where}: the state's group holds layer {n!r}, which this preconditioner's rules give "
                                  f"to {rule.label}")
        if (saved["damping"] is None) == (g.rule.own_damping and g.rule.index is not None):
            raise ConfigError(f"{where}: the state's damping is {type(saved['damping']).__name__}; expected "
                              f"{'its own damping state' if g.rule.own_damping else 'None (it shares the default one)'}")

        def fit(key: str) -> Any:
            if saved[key] is None:
                return None
            approx = BlockDiagonalApproximation.from_state_dict(saved[key])
            if list(approx.names) != list(names):
                raise ConfigError(f"{where}: the state's {key} covers layers {list(approx.names)}, its group {list(names)}")
            for i, name, f in zip(approx.layer_indices, approx.names, approx.fits):
                L = layers[i] if layers is not None and 0 <= i < len(layers) else None
                if L is None or name != L.name:
                    raise ConfigError(f"{caller}: the state's approximation names layer {i} {name!r}, its layout "
                                      f"{None if L is None else L.name!r}")
                if (f.a_dim, f.b_dim) != (L.a_dim, L.g_dim):
                    raise ConfigError(
                        f"{caller}: the state's factors of layer {L.name!r} are (d_a, d_g) = {(f.a_dim, f.b_dim)}, "
                        f"the model's layer has {(L.a_dim, L.g_dim)}"
                    )
            return approx

        approximation = fit("approximation")
        inverted = approximation if saved["inverted_is_latest"] else fit("inverted_approximation")
        counters = {}
        for key in ("num_refreshes", "num_inversions"):
            counters[key] = _step_index(saved[key], f"{where}: {key}")
        for key in ("last_refresh_step", "last_inversion_step"):
            counters[key] = None if saved[key] is None else _step_index(saved[key], f"{where}: {key}")
        state = None if saved["inverted_damping"] is None else copy.deepcopy(dict(saved["inverted_damping"]))
        return LayerGroup(g.rule, g.damping, tuple(names), approximation, inverted, None, state, **counters)

    def _load_damping(self, damping: Damping, dstate: Mapping[str, Any], caller: str) -> None:
        try:
            damping.load_state_dict(copy.deepcopy(dict(dstate)))
        except ConfigError as exc:
            raise ConfigError(f"{caller}: {exc}") from None

    def _layout(self, entries: Sequence[Mapping[str, Any]], caller: str) -> list[LayerBlock]:
        with self._discovery():
            candidates, _ = find_layers(self.model, self.registry)
        by_name = {c.name: c for c in candidates}
        chosen = []
        for e in entries:
            c = by_name.get(e["name"])
            if c is None:
                raise ConfigError(
                    f"{caller}: the state names layer {e['name']!r}; the model's adapted layers are {list(by_name)}"
                )
            chosen.append(c)
        return LayerBlock.build(chosen)
