"""``NaturalGradient``: a ``torch.optim.Optimizer`` around a curvlib :class:`~curvlib.precond.Preconditioner`.

Training loop::

    opt = NaturalGradient(model, loss_fn, config, lr=1e-2, momentum=0.9, weight_decay=1e-3, kl_clip=1e-2)
    for X, y in loader:
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        opt.step(batch=(X, y))        # refreshes the curvature on (X, y) when due

One step k (steps counted from 0; a skipped step does not count), for each parameter θ
of group G with learning rate α_G, momentum μ_G and weight decay η_G:

1. g = θ.grad + η_G θ (L2 weight decay added to the gradient before preconditioning, as
   in §4.3's "weight decay with a coefficient of 10⁻³ for all optimizers");
2. every T1 steps the curvature is captured on ``batch`` (for the true Fisher, the
   backward pass with targets sampled from the model is done here, not by the user) and
   the approximation refitted; every T2 steps the damped inverse is rebuilt;
3. Δ = P g over the preconditioned (adapted) parameters jointly, P the preconditioner
   (block-diagonal damped Kronecker inverse, optionally with the coarse correction; or a
   natural-gradient reference);
4. KL clipping (appendix 3.E) when ``kl_clip`` = c is set:
   Δ ← ν Δ with ν = min(1, sqrt(c / Σ_i |Δ_iᵀ g_i|)), the sum over the preconditioned
   layers i (Δ_i, g_i: layer i's weight and bias entries), computed on the device;
5. momentum on the preconditioned direction: b ← μ_G b + Δ (b = Δ at the first step);
   θ ← θ − α_G b (without momentum θ ← θ − α_G Δ).

Parameters the preconditioner does not cover (modules without a layer adapter or with an
unsupported configuration, listed in ``F.excluded``) are updated from g by the ``fallback``:

- ``"sgd"``: b ← μ_G b + g, θ ← θ − α_G b (``torch.optim.SGD`` with momentum, no dampening);
- ``"adam"``: m ← β₁ m + (1 − β₁) g, v ← β₂ v + (1 − β₂) g², θ ← θ − α_G m̂ / (√v̂ + ε)
  with m̂ = m / (1 − β₁ᵗ), v̂ = v / (1 − β₂ᵗ) (``torch.optim.Adam``, L2 weight decay).

Adapted parameters outside the optimizer's groups enter the preconditioner with a zero
gradient and are not updated.

Non-finite values never reach the parameters.  A step is **skipped** — the parameters, the
optimizer state and the preconditioner state (counters, generator, fits, inverse) are left
untouched, a :class:`~curvlib.errors.NumericalWarning` says why and
``metrics["counts"]["skipped_steps"]`` counts it — when the gradients (NaN or ±inf in any
``.grad`` of the groups) are non-finite, or when finite gradients give a non-finite
direction (the warning names the layer; e.g. an inverse whose product overflows).  A step
whose curvature refresh or inversion raises leaves everything untouched too (the
preconditioner's update is a transaction, :meth:`Preconditioner.transaction`).  Non-finite
statistics or factors at a refresh keep the previous fit (the approximator's rule, with a
warning); see docs/reliability.md for the whole policy.  A step has one host
synchronisation for the check (like ``torch.amp.GradScaler``'s): at a refresh step the
gradients are checked before the curvature sees the batch (and the direction after it); at
any other step the preconditioned direction and the fallback parameters' gradients are
checked together after the (layer by layer, asynchronous) application — a non-finite
gradient makes the direction non-finite, so the same steps are skipped.

Adaptive damping: when the damping is ``adaptive`` (``levenberg_marquardt``), after every refresh step the loss on ``batch`` is evaluated at
the new parameters (one forward pass, buffers restored) and
ρ = (L(θ + δ) − L(θ)) / (gᵀδ + ½ δᵀ C δ) is passed to it, with δ the step taken on the
preconditioned parameters, g and L(θ) the gradient and loss captured with the curvature
C = F (times m for ``reduction="sum"``, so that C approximates ∇²L).  The new λ takes
effect at the next inversion.

Data-parallel training (``torch.distributed``, a ``DistributedDataParallel`` model): the
curvature is the global batch's and every rank takes the same step; a model not wrapped in DDP
inside an initialised group has its gradients averaged over the ranks by :meth:`step`
(docs/distributed.md).

Observability: after every step :attr:`NaturalGradient.metrics` holds a dict (and the
optional ``callback(metrics)`` receives it):

- ``step``, ``refreshed``, ``inverted``, ``skipped`` (non-finite gradients);
- ``damping``: the damping's λ; ``kl_scale``: ν as a 0-d tensor on the device (``None``
  without clipping; a tensor so that no host synchronisation is added — ``float()`` it when
  logging); ``reduction_ratio``: ρ given to an adaptive damping (``None`` otherwise);
- ``refresh_seconds``, ``invert_seconds``: host wall-clock of the refresh / inversion;
- ``condition_numbers``: at inversion steps, layer name -> (κ_A, κ_G) of the two factors
  each inverse inverted (:class:`~curvlib.precond.preconditioner.InversionReport`);
- ``kept_previous``, ``fallbacks``, ``clamped``: at inversion steps, the layers whose
  inversion failed and kept the previous inverse, took a documented fallback, or clamped
  eigenvalues;
- ``counts``: running totals ``{"skipped_steps", "refreshes", "inversions",
  "kept_previous", "fallbacks"}``.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from curvlib.capture.layout import unwrap_model
from curvlib.curvatures.batches import split_batch
from curvlib.damping.levenberg_marquardt import quadratic_model_change, reduction_ratio
from curvlib.errors import ConfigError, NumericalError, NumericalWarning, warn
from curvlib.linalg import finite_screen
from curvlib.precond import PreconditionerConfig, UpdateInfo, build_preconditioner, preserved_buffers

__all__ = ["NaturalGradient"]

_FALLBACKS = ("sgd", "adam")


def _check_group_value(name: str, value: Any, *, low: float, high: float | None = None, high_open: bool = False) -> None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ConfigError(f"{name}: expected a number or a one-element tensor, got a tensor of shape {list(value.shape)}")
        if value.device.type != "cpu":
            return  # checking a device tensor would add a host synchronisation to every step
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or abs(value) > sys.float_info.max:
        raise ConfigError(f"{name}: expected a finite number, got {value!r}")
    if value < low or (high is not None and (value >= high if high_open else value > high)):
        bound = f"[{low}, {high}{')' if high_open else ']'}" if high is not None else f"≥ {low}"
        raise ConfigError(f"{name}: expected a value in {bound}, got {value!r}")


class NaturalGradient(torch.optim.Optimizer):
    """Natural-gradient descent with a curvlib preconditioner (see the module docstring).

    Args:
        model: the network.
        loss_fn: its loss module (see :func:`curvlib.curvature`).
        config: the preconditioner: a :class:`~curvlib.precond.PreconditionerConfig`, a
            mapping of its fields, a YAML/JSON file path, or ``None`` for the defaults
            (true Fisher with one MC sample, KFAC, heuristic damping λ = 1e-3, T1 = T2 = 1,
            EMA γ = 0.95).
        lr: α > 0 (per group: ``group["lr"]``, which learning-rate schedulers change).
        momentum: μ ∈ [0, 1) on the preconditioned direction (per group).
        weight_decay: η ≥ 0, L2 weight decay added to the gradient (per group).
        kl_clip: c > 0 of the KL clipping (appendix 3.E), or ``None`` for none.
        params: the parameters or parameter groups (default ``model.parameters()``);
            groups may set ``lr``, ``momentum`` and ``weight_decay``.
        fallback: how uncovered parameters are updated: ``"sgd"`` or ``"adam"``.
        adam_betas: (β₁, β₂) of the Adam fallback.
        adam_eps: ε of the Adam fallback.
        generator: the ``torch.Generator`` of the Monte Carlo targets.
        registry: the plugin :class:`~curvlib.plugins.Registry`.
        callback: called as ``callback(metrics)`` after every step (module docstring).
        process_group: under ``torch.distributed``: ``"auto"`` (a DDP model's group, else the
            initialised default group of more than one rank, else one process), a process
            group, or ``None`` (one process); see docs/distributed.md.

    Attributes:
        preconditioner: the :class:`~curvlib.precond.Preconditioner`.
        last_update: the :class:`~curvlib.precond.UpdateInfo` of the last step (``None`` before).
        last_kl_scale: ν of the last step as a 0-d tensor on the device (``None`` without clipping).
        last_reduction_ratio: ρ given to an adaptive damping at the last refresh step.
        metrics: the per-step metrics of the last step (module docstring; ``{}`` before).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        config: PreconditionerConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
        *,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        kl_clip: float | None = None,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]] | None = None,
        fallback: str = "sgd",
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        generator: torch.Generator | None = None,
        registry: Any = None,
        callback: Callable[[dict[str, Any]], Any] | None = None,
        process_group: Any = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"NaturalGradient: expected model to be an nn.Module, got {type(model).__name__}")
        _check_group_value("lr", lr, low=0.0)
        _check_group_value("momentum", momentum, low=0.0, high=1.0, high_open=True)
        _check_group_value("weight_decay", weight_decay, low=0.0)
        if kl_clip is not None:
            _check_group_value("kl_clip", kl_clip, low=0.0)
            if kl_clip <= 0:
                raise ConfigError(f"kl_clip: expected c > 0 or None, got {kl_clip!r}")
        if fallback not in _FALLBACKS:
            raise ConfigError(f"fallback: expected one of {list(_FALLBACKS)}, got {fallback!r}")
        if not isinstance(adam_betas, (tuple, list)) or len(adam_betas) != 2:
            raise ConfigError(f"adam_betas: expected two values (β₁, β₂), got {adam_betas!r}")
        for i, b in enumerate(adam_betas):
            _check_group_value(f"adam_betas[{i}]", b, low=0.0, high=1.0, high_open=True)
        _check_group_value("adam_eps", adam_eps, low=0.0)
        if adam_eps <= 0:
            raise ConfigError(f"adam_eps: expected ε > 0, got {adam_eps!r}")
        if callback is not None and not callable(callback):
            raise ConfigError(f"callback: expected a callable taking the metrics dict, got {type(callback).__name__}")
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        if isinstance(params, (str, bytes, torch.Tensor)):
            raise ConfigError(f"params: expected an iterable of parameters or of parameter groups, got {params!r}"
                              if not isinstance(params, torch.Tensor) else
                              "params: expected an iterable of parameters, got one tensor (wrap it in a list)")
        try:
            super().__init__(model.parameters() if params is None else params, defaults)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"params: {exc}") from exc
        self.model = unwrap_model(model)
        self.loss_fn = loss_fn
        self.callback = callback
        self.metrics: dict[str, Any] = {}
        self._counts = {"skipped_steps": 0, "refreshes": 0, "inversions": 0, "kept_previous": 0, "fallbacks": 0}
        self.kl_clip = None if kl_clip is None else float(kl_clip)
        self.fallback = fallback
        self.adam_betas = (float(adam_betas[0]), float(adam_betas[1]))
        self.adam_eps = float(adam_eps)
        self.preconditioner = build_preconditioner(model, loss_fn, config, generator=generator, registry=registry,
                                                   process_group=process_group)
        # DDP averages the gradients over the ranks in its backward; another model's gradients
        # are averaged here, so that every rank takes the same step
        self._average_gradients = self.preconditioner.shard is not None and not isinstance(
            model, nn.parallel.DistributedDataParallel)
        self.last_update: UpdateInfo | None = None
        self.last_kl_scale: torch.Tensor | None = None
        self.last_reduction_ratio: float | None = None
        self._grad_scale: float | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (``lr``, ``momentum``, ``weight_decay`` default to the constructor's)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f"param_groups[{len(self.param_groups) - 1}]"
        self._check_group(group, where)
        for p in group["params"]:
            if p.is_sparse:
                raise ConfigError(f"{where}: sparse parameters are not supported")

    @staticmethod
    def _check_group(group: Mapping[str, Any], where: str) -> None:
        _check_group_value(f"{where}.lr", group["lr"], low=0.0)
        _check_group_value(f"{where}.momentum", group["momentum"], low=0.0, high=1.0, high_open=True)
        _check_group_value(f"{where}.weight_decay", group["weight_decay"], low=0.0)

    # -- the step ---------------------------------------------------------------------------
    def _group_of(self) -> dict[int, dict[str, Any]]:
        return {id(p): g for g in self.param_groups for p in g["params"]}

    def _grads_finite(self) -> bool:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if bool(finite_screen(grads)):  # a host synchronisation (module docstring)
            return True
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())  # the screen may be a false alarm

    @contextlib.contextmanager
    def capture(self, batch: Any) -> Iterator[None]:
        """The curvature of a refresh due at the next :meth:`step`, captured from the caller's
        own forward pass of ``batch`` (one forward pass per refresh fewer than ``step(batch=...)``).

        Usage — the training loop of docs/optimizer.md::

            opt.zero_grad()
            with opt.capture((X, y)):
                loss = loss_fn(model(X), y)   # call the model once, on X
            loss.backward()
            opt.step()                        # no batch: it was captured

        At steps without a refresh the block costs nothing; see
        :meth:`curvlib.precond.Preconditioner.capture` for what is hooked and when.
        """
        with self.preconditioner.capture(batch):
            yield

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, batch: Any = None) -> Any:
        """One optimization step (module docstring).

        Args:
            closure: optional; re-evaluates the model, calls ``backward`` and returns the
                loss (as ``torch.optim`` expects); it is called first, with gradients enabled.
            batch: ``(X, y)`` for the curvature refresh; required at refresh steps
                (every ``update_every`` steps, and the first step), ignored otherwise.

        Returns:
            the closure's loss, or ``None``.

        Raises:
            ConfigError: a refresh is due and no ``batch`` was given, or a group's ``lr``,
                ``momentum`` or ``weight_decay`` is no longer valid (e.g. a scheduler made the
                learning rate NaN); nothing is changed.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for i, group in enumerate(self.param_groups):  # a scheduler or the user may have changed them
            self._check_group(group, f"param_groups[{i}]")
        pre = self.preconditioner
        pre.wait_inversion()  # background_inversion: the inverse started at the last step serves this one
        k = pre.step
        if batch is None:
            batch = pre.pending_batch(k)  # captured from the caller's own pass (capture())
        if batch is None and pre.refresh_due(k):
            raise ConfigError(
                f"NaturalGradient.step: a curvature refresh is due at step {k} (update_every = T1 = "
                f"{pre.config.update_every}; the first step always refreshes) and needs the batch: call "
                "opt.step(batch=(X, y)) with the batch the loss was computed on"
            )
        refresh = pre.refresh_due(k)
        if self._average_gradients:
            self._all_reduce_gradients()
        # the step's one host synchronisation: at refresh steps the gradients are checked before
        # the curvature sees the batch; at other steps the direction and the fallback gradients are
        # checked together after the (asynchronous) application
        if refresh and not self._grads_finite():
            return self._skip(k, loss)

        group_of = self._group_of()
        self._grad_scale = self._sum_scale(batch)
        try:
            # a step that raises or is skipped leaves the preconditioner as it was (a plain step
            # changes nothing before its check: apply is pure, the counter advances after it)
            with pre.transaction() if refresh else contextlib.nullcontext():
                info = pre.update(batch, step=k) if refresh else None
                pparams = pre.params()
                grads = self._gradients(pparams, group_of)
                try:
                    directions = pre.apply(grads, check_finite=False)
                except NumericalError as exc:  # a path that checks itself (coarse space, references)
                    raise _Skip(None if not self._grads_finite() else _nonfinite_direction(exc)) from None
                covered = {id(q) for q in pparams}
                fallback = [p.grad for g in self.param_groups for p in g["params"]
                            if p.grad is not None and id(p) not in covered]
                flags = [finite_screen([*directions, *fallback])]  # exact checks below if it fails
                if self.fallback == "adam":  # g² of Adam's second moment must not overflow either
                    flags += [t.abs().amax() <= math.sqrt(torch.finfo(t.dtype).max) for t in fallback if t.numel()]
                if not bool(torch.stack(flags).all()):
                    if not self._grads_finite():
                        raise _Skip(None)
                    if self.fallback == "adam" and not all(bool(f) for f in flags[1:]):
                        raise _Skip("a fallback parameter's gradient overflows Adam's second moment g²")
                    try:
                        pre.apply(grads)  # finite gradients, non-finite direction: names the layer
                    except NumericalError as exc:
                        raise _Skip(_nonfinite_direction(exc)) from None
                if not refresh:
                    info = pre.update(batch, step=k)
        except _Skip as skip:
            return self._skip(k, loss, skip.reason)
        index = {id(p): i for i, p in enumerate(pparams)}
        self.last_update = info
        self.last_kl_scale = None
        self.last_reduction_ratio = None
        if self.kl_clip is not None:
            nu = self._kl_scale(pre, directions, grads)
            directions = torch._foreach_mul(list(directions), nu)
            self.last_kl_scale = nu

        adaptive = info.refreshed and pre.damping.adaptive
        deltas = [torch.zeros_like(p) for p in pparams] if adaptive else None
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                i = index.get(id(p))
                if i is None:
                    self._fallback_update(p, group)
                    continue
                if p.grad is None:
                    continue
                d = directions[i]
                if mu != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.clone()
                    else:
                        buf.mul_(mu).add_(d)
                    d = buf
                _add_scaled(p, d, lr)
                if deltas is not None:
                    deltas[i] = -lr * d
        if deltas is not None:
            self._adapt_damping(batch, deltas)
        self._publish(self._step_metrics(info))
        return loss

    def _all_reduce_gradients(self) -> None:
        """The ranks' mean gradient in every ``.grad`` (a model not wrapped in DDP, module docstring)."""
        shard = self.preconditioner.shard
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        for g, mean in zip(grads, shard.sum(grads, "directions")):
            g.copy_(mean).div_(shard.world_size)

    def _gradients(self, pparams: Sequence[torch.Tensor], group_of: dict[int, dict[str, Any]]) -> list[torch.Tensor]:
        """g = ∇θ + η θ of the preconditioned parameters (zero outside the groups)."""
        grads = []
        for p in pparams:
            group = group_of.get(id(p))
            if group is None or p.grad is None:
                grads.append(torch.zeros_like(p))
                continue
            grads.append(self._gradient(p, group))
        return grads

    def _gradient(self, p: torch.Tensor, group: Mapping[str, Any]) -> torch.Tensor:
        """g = ∇θ (÷ m for a ``reduction="sum"`` loss, module docstring) + η θ."""
        g = p.grad if self._grad_scale is None else p.grad * self._grad_scale
        if group["weight_decay"] != 0:
            g = g.add(p, alpha=float(group["weight_decay"]))  # a float: torch takes an int alpha as int64
        return g

    def _sum_scale(self, batch: Any) -> float | None:
        """1/m for a ``reduction="sum"`` loss (m: the batch's samples, or the last refresh's), else None."""
        if getattr(self.loss_fn, "reduction", "mean") != "sum":
            return None
        m = split_batch(batch).num_samples if batch is not None else None
        if m is None and self.preconditioner.curvature is not None:
            m = self.preconditioner.curvature.num_samples
        return None if not m else 1.0 / m

    def _skip(self, k: int, loss: Any, reason: str | None = None) -> Any:
        self.preconditioner.discard_capture()  # captured on the skipped step's batch
        why = "non-finite gradients" if reason is None else reason
        warn(
            f"NaturalGradient.step: {why} at step {k}; the step is skipped (parameters, optimizer state and "
            "preconditioner state unchanged)",
            NumericalWarning,
        )
        self._counts["skipped_steps"] += 1
        self._publish({"step": k, "refreshed": False, "inverted": False, "skipped": True})
        return loss

    def _step_metrics(self, info: UpdateInfo) -> dict[str, Any]:
        pre = self.preconditioner
        out: dict[str, Any] = {
            "step": info.step, "refreshed": info.refreshed, "inverted": info.inverted, "skipped": False,
            "damping": pre.damping.value, "kl_scale": self.last_kl_scale, "reduction_ratio": self.last_reduction_ratio,
            "refresh_seconds": info.refresh_seconds, "invert_seconds": info.invert_seconds,
        }
        self._counts["refreshes"] += int(info.refreshed)
        if info.inverted and pre.last_inversion is not None:
            rep = pre.last_inversion
            out.update(condition_numbers=dict(rep.condition_numbers), kept_previous=list(rep.kept_previous),
                       fallbacks=dict(rep.fallbacks), clamped=dict(rep.clamped))
            self._counts["inversions"] += 1
            self._counts["kept_previous"] += len(rep.kept_previous)
            self._counts["fallbacks"] += len(rep.fallbacks)
        return out

    def _publish(self, metrics: dict[str, Any]) -> None:
        metrics["counts"] = dict(self._counts)
        self.metrics = metrics
        if self.callback is not None:
            self.callback(metrics)

    def _kl_scale(self, pre: Any, directions: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """ν = min(1, sqrt(c / Σ_i |Δ_iᵀ g_i|)) (appendix 3.E), a 0-d tensor on the device.

        With the preconditioner's layer-by-layer plan (every parameter in one layer, unsliced)
        the per-parameter products Δᵀg are summed per layer by one masked sum (no adapter
        calls per step: 0.3 ms of Python on the small MNIST auto-encoder); otherwise each
        layer's pieces are taken from its adapter."""
        plan = pre._layer_params
        if plan and len({d.dtype for d in directions}) == 1 and len(directions) == sum(map(len, plan)):
            products = torch._foreach_mul(list(directions), list(grads))
            sums = torch.stack([t.sum() for t in products])
            # picked, not multiplied by a 0/1 matrix: an overflowed (infinite) product stays in
            # its own layer (0·inf would make every layer NaN), as on the adapters' path
            per_layer = torch.where(self._kl_layers(plan, sums.device), sums, 0).sum(1)
            return torch.clamp(torch.sqrt(self.kl_clip / per_layer.abs().sum()), max=1.0)
        index = {id(p): k for k, p in enumerate(pre.params())}
        dots = []
        for L in pre.layers:  # layer i's entries: its pieces of the parameters (a group's rows, a tied weight once)
            ad = L.adapter
            d_i = ad.pieces([directions[index[id(p)]] for p in ad.params()])
            g_i = ad.pieces([grads[index[id(p)]] for p in ad.params()])
            dots.append(sum((d * g).sum() for d, g in zip(d_i, g_i)).abs())
        total = torch.stack(dots).sum()
        # total = 0 gives c/0 = inf and ν = 1: nothing to clip
        return torch.clamp(torch.sqrt(self.kl_clip / total), max=1.0)

    def _kl_layers(self, plan: list[list[int]], device: torch.device) -> torch.Tensor:
        """The mask ``[n_layers, n_params]`` of each layer's parameters in the plan (a masked sum
        over it is deterministic on every device, unlike ``index_add_``); cached per plan."""
        cached = getattr(self, "_kl_layer_mask", None)
        if cached is None or cached[0] is not plan or cached[1].device != device:
            mask = torch.zeros(len(plan), sum(map(len, plan)), dtype=torch.bool)
            for i, ks in enumerate(plan):
                mask[i, ks] = True
            cached = (plan, mask.to(device))
            self._kl_layer_mask = cached
        return cached[1]

    def _fallback_update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        if p.grad is None:
            return
        g = self._gradient(p, group)
        state = self.state[p]
        if self.fallback == "sgd":
            mu = group["momentum"]
            if mu != 0:
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = g.clone()
                else:
                    buf.mul_(mu).add_(g)
                g = buf
            _add_scaled(p, g, group["lr"])
            return
        b1, b2 = self.adam_betas
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        bc1 = 1 - b1**t
        bc2 = 1 - b2**t
        denom = (v.sqrt() / math.sqrt(bc2)).add_(self.adam_eps)
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            p.sub_(lr / bc1 * m / denom)
        else:
            p.addcdiv_(m, denom, value=-lr / bc1)

    def _adapt_damping(self, batch: Any, deltas: list[torch.Tensor]) -> None:
        """Levenberg–Marquardt: ρ from the loss change after the step (module docstring)."""
        pre = self.preconditioner
        F = pre.curvature
        X, y = batch
        inputs = tuple(X) if isinstance(X, (tuple, list)) else (X,)
        with preserved_buffers(self.model):
            loss_after = self.loss_fn(self.model(*inputs), y)
        delta = pre.params_to_vector(deltas)
        Cd = F @ delta
        if getattr(self.loss_fn, "reduction", "mean") == "sum":
            Cd = Cd * F.num_samples
        change = quadratic_model_change(F.gradient_vector(), delta, Cd)
        loss_before = F.loss
        if pre.shard is not None:  # the global batch's losses and model change (each linear in the samples)
            loss_before, loss_after, change = pre.shard.average(
                [torch.as_tensor(x, dtype=pre.dtype, device=pre.device).reshape(1) for x in (loss_before, loss_after, change)])
            loss_before, loss_after, change = loss_before[0], loss_after[0], change[0]
        rho = reduction_ratio(loss_before, loss_after, change)
        pre.damping.update(rho)
        self.last_reduction_ratio = rho

    # -- checkpoints ----------------------------------------------------------------------
    def _check_state(self, state: Mapping[str, Any], caller: str) -> None:
        """Validate the ``torch.optim`` part of a state against this optimizer (load_state_dict)."""
        groups = state.get("param_groups")
        if not isinstance(groups, (list, tuple)) or len(groups) != len(self.param_groups):
            n = len(groups) if isinstance(groups, (list, tuple)) else type(groups).__name__
            raise ConfigError(f"{caller}: the state has param_groups {n}, this optimizer {len(self.param_groups)} groups")
        for i, (saved, mine) in enumerate(zip(groups, self.param_groups)):
            where = f"param_groups[{i}]"
            if not isinstance(saved, Mapping):
                raise ConfigError(f"{caller}: {where} is a {type(saved).__name__}, expected a mapping")
            missing = [k for k in ("params", "lr", "momentum", "weight_decay") if k not in saved]
            if missing:
                raise ConfigError(f"{caller}: {where} has no {missing}")
            if not isinstance(saved["params"], (list, tuple)) or len(saved["params"]) != len(mine["params"]):
                raise ConfigError(f"{caller}: {where} holds {saved['params']!r} parameter ids, this group has "
                                  f"{len(mine['params'])} parameters")
            self._check_group(saved, f"{caller}: {where}")
        buffers_of = state.get("state", {})
        if not isinstance(buffers_of, Mapping):
            raise ConfigError(f"{caller}: the state's 'state' is a {type(buffers_of).__name__}, expected a mapping")
        params = [p for g in self.param_groups for p in g["params"]]
        known = _BUFFERS[self.fallback]
        for key, buffers in buffers_of.items():
            if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < len(params):
                raise ConfigError(f"{caller}: the state holds buffers of parameter {key!r}; this optimizer has "
                                  f"parameters 0..{len(params) - 1}")
            if not isinstance(buffers, Mapping):
                raise ConfigError(f"{caller}: the buffers of parameter {key} are a {type(buffers).__name__}")
            p = params[key]
            for name, t in buffers.items():
                where = f"buffer {name!r} of parameter {key}"
                if name not in known:
                    raise ConfigError(f"{caller}: unknown {where} (fallback {self.fallback!r} keeps {list(known)})")
                if name == "step":
                    value = t.item() if isinstance(t, torch.Tensor) and t.numel() == 1 else t
                    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 \
                            or value != int(value):
                        raise ConfigError(f"{caller}: {where} must be a whole number ≥ 0, got {t!r}")
                    continue
                if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                    raise ConfigError(f"{caller}: {where} must be a floating-point tensor, got {type(t).__name__}")
                if t.shape != p.shape:
                    raise ConfigError(f"{caller}: {where} is {list(t.shape)}, the parameter {list(p.shape)}")
                if not bool(torch.isfinite(t).all()) or (name == "exp_avg_sq" and bool((t < 0).any())):
                    raise ConfigError(f"{caller}: {where} holds non-finite{' or negative' if name == 'exp_avg_sq' else ''} "
                                      "values; a checkpoint never holds them")

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim`` state (groups, momentum buffers, Adam moments) plus
        ``"preconditioner"``: :meth:`Preconditioner.state_dict` (exact round trip)."""
        state = super().state_dict()
        state["preconditioner"] = self.preconditioner.state_dict()
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict`; resuming gives bit-identical steps on CPU.

        Atomic: everything is checked first — the groups (count, sizes, valid ``lr``,
        ``momentum``, ``weight_decay``), every buffer (a known name, shaped like its parameter,
        finite; Adam's ``step`` ≥ 0 and ``exp_avg_sq`` ≥ 0) and the preconditioner's state — and
        when any part does not load, the optimizer and its preconditioner are left as they were.

        Raises:
            ConfigError: not a mapping, no ``"preconditioner"`` entry, a group or buffer that does
                not fit (the message names it and both values), or a state that does not load
                (see :meth:`Preconditioner.load_state_dict`).
        """
        caller = "NaturalGradient.load_state_dict"
        if not isinstance(state_dict, Mapping):
            raise ConfigError(f"{caller}: expected the mapping of NaturalGradient.state_dict(), got "
                              f"{type(state_dict).__name__} (a path? load it with torch.load first)")
        state = dict(state_dict)
        pre_state = state.pop("preconditioner", None)
        if pre_state is None:
            raise ConfigError(f"{caller}: the state has no 'preconditioner' entry")
        self._check_state(state, caller)
        before, pre_before = super().state_dict(), self.preconditioner.state_dict()
        self.preconditioner.load_state_dict(pre_state)  # atomic itself
        try:
            super().load_state_dict(state)
        except Exception as exc:
            super().load_state_dict(before)
            self.preconditioner.load_state_dict(pre_before)
            raise ConfigError(f"{caller}: the optimizer state does not load ({type(exc).__name__}: {exc})") from exc


_BUFFERS = {"sgd": ("momentum_buffer",), "adam": ("momentum_buffer", "step", "exp_avg", "exp_avg_sq")}


def _nonfinite_direction(exc: Exception) -> str:
    return f"finite gradients gave a non-finite direction ({exc})"


class _Skip(Exception):
    """Internal: the step is skipped (``reason``: why the direction is non-finite, ``None``:
    non-finite gradients); raised inside the preconditioner's transaction to undo it."""

    def __init__(self, reason: str | None) -> None:
        super().__init__(reason)
        self.reason = reason


def _add_scaled(p: torch.Tensor, d: torch.Tensor, lr: float | torch.Tensor) -> None:
    """θ ← θ − lr·d (lr a number or a 0-d tensor)."""
    if isinstance(lr, torch.Tensor):
        p.sub_(lr * d)
    else:
        p.add_(d, alpha=-float(lr))
