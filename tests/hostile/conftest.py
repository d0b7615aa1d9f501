"""Shared machinery of the hostile-input suite (issue 13: "nothing silently broken under hostile input").

Every test here runs *situations* (one hostile input, one configuration) and classifies each into

- ``"ok"``: the library did its job with finite results;
- ``"clear error"``: a :class:`curvlib.errors.CurvlibError` with a message naming what was wrong,
  and nothing changed;
- ``"documented fallback (warning)"``: a :class:`curvlib.errors.NumericalWarning` and the documented
  behaviour (a skipped step with bit-identical state, a kept previous fit, ...);
- ``"failure"``: anything else (a raw exception from deep inside, non-finite state, a half-applied
  step, a resume that is not bit-identical, a hang).

Each situation is recorded in :data:`COLLECTOR`; the totals are printed in pytest's terminal summary
(``HOSTILE_REPORT=path.json`` also writes every row).  Properties run with :func:`run_situations`:
every hypothesis example is tried and recorded, and the test fails at the end listing *all* failing
situations (no shrinking, so the counts do not depend on failures).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import io
import json
import math
import os
import signal
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from torch import nn

from curvlib.errors import CurvlibError, NumericalWarning

OK, CLEAR, FALLBACK, FAILURE = "ok", "clear error", "documented fallback (warning)", "failure"
OUTCOMES = (OK, CLEAR, FALLBACK, FAILURE)
_RANK = {o: i for i, o in enumerate(OUTCOMES)}

APPROXIMATORS = ("kfac", "kpsvd", "deflation", "lanczos", "kfac_corrected", "ekfac")
DAMPINGS = ("heuristic", "tikhonov", "levenberg_marquardt")
CURVATURES = ("fisher", "ggn", "empirical_fisher")
COARSE = (None, "nicolaides", "residual", "spectral", "krylov", "taylor")

# fast, deterministic, all examples tried (no shrinking: failures are listed, not minimised)
HYPOTHESIS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)


# --------------------------------------------------------------------------- the collector


class Collector:
    """Rows ``(group, situation, outcome, detail)`` of every situation the suite tried."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def record(self, group: str, situation: str, outcome: str, detail: str = "") -> None:
        assert outcome in OUTCOMES, outcome
        self.rows.append((group, situation, outcome, detail))


COLLECTOR = Collector()


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001
    rows = COLLECTOR.rows
    if not rows:
        return
    tr = terminalreporter
    tr.section("hostile situations (issue 13)")
    per_group: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    total: collections.Counter = collections.Counter()
    for group, _, outcome, _ in rows:
        per_group[group][outcome] += 1
        total[outcome] += 1
    width = max(len(g) for g in per_group)
    head = " | ".join(f"{o:>8}" if o != FALLBACK else "fallback" for o in OUTCOMES)
    tr.write_line(f"{'group':<{width}} | {'tried':>5} | {head}")
    for group in sorted(per_group):
        c = per_group[group]
        tr.write_line(f"{group:<{width}} | {sum(c.values()):>5} | " + " | ".join(f"{c[o]:>8}" for o in OUTCOMES))
    tr.write_line(f"{'TOTAL':<{width}} | {sum(total.values()):>5} | " + " | ".join(f"{total[o]:>8}" for o in OUTCOMES))
    # distinct failure kinds: (group, first line of detail) -> count, first situation
    kinds: dict[tuple[str, str], list[Any]] = {}
    for group, situation, outcome, detail in rows:
        if outcome != FAILURE:
            continue
        key = (group, _signature(detail))
        if key not in kinds:
            kinds[key] = [0, situation, detail]
        kinds[key][0] += 1
    if kinds:
        tr.write_line(f"distinct failure kinds: {len(kinds)}")
        for (group, sig), (n, situation, _) in sorted(kinds.items()):
            tr.write_line(f"  [{group}] x{n}: {sig}")
            tr.write_line(f"      e.g. {situation}")
    path = os.environ.get("HOSTILE_REPORT")
    if path:
        with open(path, "w") as fh:
            json.dump([dict(zip(("group", "situation", "outcome", "detail"), r)) for r in rows], fh, indent=1)


def _signature(detail: str) -> str:
    """A failure's kind: its first line, numbers and tensor contents stripped."""
    import re

    line = detail.splitlines()[0] if detail else ""
    line = re.sub(r"step \d+", "step k", line)
    line = re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", "#", line)
    return line[:220]


def worst(outcomes: Iterable[tuple[str, str]]) -> tuple[str, str]:
    """The worst (outcome, detail) of several steps of one situation."""
    best = (OK, "")
    for o, d in outcomes:
        if _RANK[o] > _RANK[best[0]]:
            best = (o, d)
    return best


def run_situations(group: str, strategy, body: Callable[[Any], tuple[str, str, str]], *, max_examples: int) -> None:
    """Try ``body(example) -> (situation, outcome, detail)`` on every hypothesis example of
    ``strategy``, record each, and fail at the end listing every failing situation."""
    failures: list[tuple[str, str]] = []

    @settings(max_examples=max_examples, **HYPOTHESIS)
    @given(strategy)
    def prop(example):
        situation, outcome, detail = body(example)
        COLLECTOR.record(group, situation, outcome, detail)
        if outcome == FAILURE:
            failures.append((situation, detail))

    prop()
    report_failures(group, failures)


def record_one(group: str, situation: str, outcome: str, detail: str = "") -> None:
    """Record one parametrized situation and fail the test if it is a failure."""
    COLLECTOR.record(group, situation, outcome, detail)
    report_failures(group, [(situation, detail)] if outcome == FAILURE else [])


def report_failures(group: str, failures: list[tuple[str, str]]) -> None:
    if not failures:
        return
    seen: dict[str, list[str]] = {}
    for situation, detail in failures:
        seen.setdefault(_signature(detail), []).append(f"{situation}\n        -> {detail}")
    lines = [f"{len(failures)} failing hostile situation(s) in {group!r}, {len(seen)} kind(s):"]
    for sig, items in seen.items():
        lines.append(f"  * {len(items)}x {sig}")
        lines.extend(f"      {it}" for it in items[:3])
    pytest.fail("\n".join(lines), pytrace=False)


# --------------------------------------------------------------------------- time limits


class SituationTimeout(BaseException):
    """Raised by :func:`time_limit` (a BaseException, so library ``except Exception`` blocks
    cannot swallow it)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def _raise(signum, frame):  # noqa: ARG001
        raise SituationTimeout(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --------------------------------------------------------------------------- models and data


class Scale(nn.Module):
    """A custom module with a parameter and no layer adapter (its parameter takes the fallback)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.s


DTYPES = {"float32": torch.float32, "float64": torch.float64}


def tiny_model(dtype: str | torch.dtype = "float64", seed: int = 0, variant: str = "mlp", out: int = 3) -> nn.Module:
    """Linear(4,6)-Tanh-Linear(6,out) and variants: ``"ln"`` (+LayerNorm), ``"custom"`` (+ a
    :class:`Scale`), ``"relu"``, ``"dead_relu"`` (ReLU with first-layer bias −10: dead units)."""
    dt = DTYPES.get(dtype, dtype)
    torch.manual_seed(seed)
    act = nn.ReLU() if variant in ("relu", "dead_relu") else nn.Tanh()
    mods: list[nn.Module] = [nn.Linear(4, 6)]
    if variant == "ln":
        mods.append(nn.LayerNorm(6))
    mods.append(act)
    if variant == "custom":
        mods.append(Scale(6))
    mods.append(nn.Linear(6, out))
    model = nn.Sequential(*mods).to(dt)
    if variant == "dead_relu":
        with torch.no_grad():
            model[0].bias.fill_(-10.0)
    return model


def tiny_batch(dtype: str | torch.dtype = "float64", loss: str = "ce", m: int = 8, seed: int = 0, out: int = 3):
    dt = DTYPES.get(dtype, dtype)
    g = torch.Generator().manual_seed(1000 + seed)
    X = torch.randn(m, 4, generator=g, dtype=dt)
    y = torch.randint(0, out, (m,), generator=g) if loss == "ce" else torch.randn(m, out, generator=g, dtype=dt)
    return X, y


def loss_module(loss: str) -> nn.Module:
    return nn.CrossEntropyLoss() if loss == "ce" else nn.MSELoss()


def make_config(approximator="kfac", damping="heuristic", curvature="ggn", coarse=None, T1=1, T2=1,
                coarse_mode="multiplicative", ema=0.95, value=1e-2) -> dict[str, Any]:
    """A valid :class:`PreconditionerConfig` mapping."""
    if damping == "levenberg_marquardt":
        d = {"kind": damping, "value": value, "inner": "heuristic" if approximator != "ekfac" else "tikhonov"}
    else:
        d = {"kind": damping, "value": value}
    cfg: dict[str, Any] = {
        "curvature": {"kind": curvature},
        "approximator": {"kind": approximator},
        "damping": d,
        "update_every": T1,
        "invert_every": T2,
        "ema": ema,
    }
    if approximator in ("kpsvd", "deflation", "lanczos", "kfac_corrected"):
        cfg["approximator"]["max_iters"] = 30  # keep the suite fast
    if coarse is not None:
        cfg["coarse_space"] = {"kind": coarse}
        cfg["coarse_mode"] = coarse_mode
    return cfg


def make_opt(model: nn.Module, loss_fn: nn.Module, config: Any, *, seed: int = 1, **kw) -> Any:
    from curvlib.optim import NaturalGradient

    kw.setdefault("lr", 0.1)
    kw.setdefault("generator", torch.Generator().manual_seed(seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExcludedParametersWarning for the custom module, ...
        return NaturalGradient(model, loss_fn, config, **kw)


def backward(model: nn.Module, loss_fn: nn.Module, X, y, opt=None) -> None:
    (opt or model).zero_grad()
    with torch.enable_grad():
        loss_fn(model(X), y).backward()


# --------------------------------------------------------------------------- state walkers


def _walk(obj: Any, path: str):
    """Yield (path, leaf) for every leaf of nested mappings / sequences."""
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, obj


def _nonfinite(leaf: Any) -> bool:
    if isinstance(leaf, torch.Tensor):
        if leaf.is_floating_point() or leaf.is_complex():
            return not bool(torch.isfinite(leaf).all())
        return False
    if isinstance(leaf, float):
        return not math.isfinite(leaf)
    return False


def finite_state(opt, model: nn.Module, *, params: bool = True) -> list[str]:
    """Paths of every non-finite value in the parameters (unless ``params=False``), the optimizer
    state (momentum buffers, Adam moments) and ``opt.state_dict()["preconditioner"]`` — a
    ``state_dict()`` that raises is reported too.  ``[]`` when everything is finite."""
    bad = []
    if params:
        bad += [f"param {n}" for n, p in model.named_parameters() if _nonfinite(p.detach())]
    try:
        sd = opt.state_dict()
    except Exception as exc:  # noqa: BLE001
        return bad + [f"opt.state_dict() raised {type(exc).__name__}: {exc}"]
    bad += [f"optimizer {p}" for p, leaf in _walk(sd.get("state", {}), "state") if _nonfinite(leaf)]
    bad += [f"checkpoint {p}" for p, leaf in _walk(sd.get("preconditioner", {}), "preconditioner") if _nonfinite(leaf)]
    return bad


def _snap(leaf: Any) -> Any:
    if isinstance(leaf, torch.Tensor):
        return leaf.detach().clone()
    if isinstance(leaf, torch.Generator):
        return leaf.get_state().clone()
    return copy.deepcopy(leaf)


def fingerprint(opt, model: nn.Module | None = None) -> dict[str, Any]:
    """Everything a step may change, as ``{path: snapshot}`` for bit-identity checks: parameters,
    buffers, optimizer groups and state, the whole preconditioner state (counters, generator,
    factors, damping) and the optimizer's running counts."""
    fp: dict[str, Any] = {}
    if model is not None:
        for n, p in model.named_parameters():
            fp[f"param {n}"] = p.detach().clone()
        for n, b in model.named_buffers():
            fp[f"buffer {n}"] = b.detach().clone()
    try:
        sd = opt.state_dict()
    except Exception as exc:  # noqa: BLE001
        fp["state_dict()"] = f"raised {type(exc).__name__}"
        sd = {}
    for p, leaf in _walk(sd.get("state", {}), "state"):
        fp[f"optimizer {p}"] = _snap(leaf)
    for i, g in enumerate(sd.get("param_groups", [])):
        for k, v in g.items():
            if k != "params":
                fp[f"optimizer param_groups[{i}].{k}"] = _snap(v)
    for p, leaf in _walk(sd.get("preconditioner", {}), "preconditioner"):
        fp[f"checkpoint {p}"] = _snap(leaf)
    pre = opt.preconditioner
    fp["preconditioner.step"] = pre.step
    fp["preconditioner.num_refreshes"] = pre.num_refreshes
    fp["preconditioner.num_inversions"] = pre.num_inversions
    counts = {k: 0 for k in ("skipped_steps", "refreshes", "inversions", "kept_previous", "fallbacks")}
    counts.update(dict(opt.metrics.get("counts", {})))  # no metrics before the first step: zeros
    for k, v in counts.items():
        fp[f"counts.{k}"] = v
    return fp


def _bits_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.is_floating_point() or a.is_complex():
            return torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))
        return torch.equal(a, b)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001
        return False


def diff(before: Mapping[str, Any], after: Mapping[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """Paths whose snapshots differ bit for bit (or exist on one side only)."""
    ign = tuple(ignore)
    out = []
    for k in sorted(set(before) | set(after)):
        if k.startswith(ign) if ign else False:
            continue
        if k not in before or k not in after:
            out.append(f"{k} ({'added' if k not in before else 'removed'})")
        elif not _bits_equal(before[k], after[k]):
            out.append(k)
    return out


def _short(paths: list[str], n: int = 6) -> str:
    return ", ".join(paths[:n]) + (f", ... ({len(paths)} in all)" if len(paths) > n else "")


# --------------------------------------------------------------------------- classifiers


def where(exc: BaseException) -> str:
    """The innermost frame of the traceback (file:line function), relative to the repository."""
    tb = traceback.extract_tb(exc.__traceback__)
    if not tb:
        return "?"
    f = tb[-1]
    name = f.filename
    for marker in ("/src/", "/site-packages/", "/plugins/"):
        if marker in name:
            name = name.split(marker, 1)[1]
            break
    return f"{name}:{f.lineno} {f.name}"


def describe(exc: BaseException) -> str:
    msg = " | ".join(line.strip() for line in str(exc).strip().splitlines()) or "<empty message>"
    return f"{type(exc).__name__}: {msg[:300]}"


def classify_exception(exc: BaseException, names: Iterable[str] = (), *, want: type = CurvlibError) -> tuple[str, str]:
    """``clear error`` for a ``want`` (CurvlibError by default) whose message names one of
    ``names`` (when given); ``failure`` otherwise."""
    if isinstance(exc, SituationTimeout):
        return FAILURE, f"hang: {exc}"
    if not isinstance(exc, want):
        wanted = " or ".join(w.__name__ for w in (want if isinstance(want, tuple) else (want,)))
        kind = "raw" if not isinstance(exc, CurvlibError) else f"{type(exc).__name__} instead of {wanted}:"
        return FAILURE, f"{kind} {describe(exc)} (at {where(exc)})"
    msg = str(exc)
    names = [n for n in names if n]
    if not msg.strip():
        return FAILURE, f"{type(exc).__name__} with an empty message"
    if names and not any(str(n) in msg for n in names):
        return FAILURE, f"{describe(exc)} -- does not name any of {names}"
    return CLEAR, describe(exc)


def expect_clear_error_or_ok(fn: Callable[[], Any], names: Iterable[str] = (), *, seconds: float = 5.0,
                             want: type = CurvlibError) -> tuple[str, str, Any]:
    """Run ``fn``: ``(ok, "", result)``, ``(documented fallback, warning, result)`` when it warned a
    NumericalWarning, ``(clear error, message, None)`` for a CurvlibError naming one of ``names``,
    ``(failure, why, None)`` otherwise."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with time_limit(seconds):
                result = fn()
        except BaseException as exc:  # noqa: BLE001
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            o, d = classify_exception(exc, names, want=want)
            return o, d, None
    num = [w for w in caught if issubclass(w.category, NumericalWarning)]
    if num:
        return FALLBACK, f"NumericalWarning: {str(num[0].message)[:200]}", result
    return OK, "", result


def grads_nonfinite(opt) -> bool:
    """Whether any ``.grad`` of the optimizer's groups holds NaN or ±inf (the documented skip rule)."""
    return any(p.grad is not None and not bool(torch.isfinite(p.grad).all())
               for g in opt.param_groups for p in g["params"])


def step_outcome(opt, model: nn.Module, do_step: Callable[[], Any], *, params_poisoned: bool = False,
                 seconds: float = 5.0, want: type | tuple[type, ...] | None = CurvlibError) -> tuple[str, str]:
    """Run one ``opt.step`` (inside ``do_step``) and check the step invariant (issue 13):

    - taken: parameters (unless the user poisoned them: ``params_poisoned``), optimizer state and the
      checkpoint are finite; ``preconditioner.step`` advanced by one; ``metrics["skipped"]`` False;
    - skipped: a NumericalWarning, ``metrics["skipped"]``, everything bit-identical except
      ``counts.skipped_steps`` (+1);
    - raised: a CurvlibError (``want``: the documented class for the situation; ``None``: no error is
      documented, e.g. non-finite statistics with a previous fit to keep) and everything bit-identical
      (nothing half-applied);
    - non-finite ``.grad`` before the step: only the documented skip is acceptable (docs/optimizer.md,
      *Non-finite gradients*).
    """
    must_skip = grads_nonfinite(opt)
    before = fingerprint(opt, model)
    k = opt.preconditioner.step
    skipped_before = before.get("counts.skipped_steps", 0)
    err: BaseException | None = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with time_limit(seconds):
                do_step()
        except BaseException as exc:  # noqa: BLE001
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            err = exc
    num = [str(w.message) for w in caught if issubclass(w.category, NumericalWarning)]
    after = fingerprint(opt, model)
    # "the previous valid fit is kept with a NumericalWarning naming the layer" (issue 13)
    layers = [n for n, mod in model.named_modules() if n and any(True for _ in mod.parameters(recurse=False))]
    unnamed = [m for m in num if "previous fit" in m and not any(f"'{n}'" in m or f"layer {n}" in m for n in layers)]
    unnamed_failure = (FAILURE, f"step {k}: the NumericalWarning of a kept fit names no layer (of {layers}): "
                                f"{unnamed[0][:160]}") if unnamed else None
    if err is not None:
        if want is None:  # the documented behaviour here is a fallback, not an error
            if isinstance(err, SituationTimeout):
                return FAILURE, f"step {k}: hang: {err}"
            return FAILURE, (f"step {k}: {'' if isinstance(err, CurvlibError) else 'raw '}{describe(err)} "
                             f"(at {where(err)}) -- documented: keep the previous fit with a NumericalWarning")
        outcome, detail = classify_exception(err, want=want)
        if outcome == FAILURE:
            return outcome, f"step {k}: {detail}"
        if must_skip:
            return FAILURE, (f"step {k}: non-finite gradients: expected the documented skip with a NumericalWarning, "
                             f"got {detail}")
        changed = diff(before, after)
        if changed:
            return FAILURE, f"step {k}: {detail} raised, but the step was half-applied: changed {_short(changed)}"
        return CLEAR, f"step {k}: {detail}"
    if opt.metrics.get("skipped"):
        if not num:
            return FAILURE, f"step {k}: skipped without a NumericalWarning"
        changed = diff(before, after, ignore=("counts.skipped_steps",))
        if changed:
            return FAILURE, f"step {k}: skipped (NumericalWarning) but state changed: {_short(changed)}"
        if after.get("counts.skipped_steps", 0) != skipped_before + 1:
            return FAILURE, f"step {k}: skipped but counts.skipped_steps did not advance"
        return unnamed_failure or (FALLBACK, f"step {k}: skipped: {num[0][:200]}")
    if must_skip:
        return FAILURE, f"step {k}: non-finite gradients but the step was taken (metrics['skipped'] is not set)"
    bad = finite_state(opt, model, params=not params_poisoned)
    if bad:
        warned = f" (warned: {num[0][:120]})" if num else " (no NumericalWarning)"
        return FAILURE, f"step {k}: step taken with non-finite state: {_short(bad)}{warned}"
    if opt.preconditioner.step != k + 1:
        return FAILURE, f"step {k}: step taken but preconditioner.step is {opt.preconditioner.step}, expected {k + 1}"
    if after.get("counts.skipped_steps", 0) != skipped_before:
        return FAILURE, f"step {k}: step taken but counts.skipped_steps changed"
    for key, flag in (("refreshes", "refreshed"), ("inversions", "inverted")):
        expect = before.get(f"counts.{key}", 0) + int(bool(opt.metrics.get(flag)))
        if after.get(f"counts.{key}", 0) != expect:
            return FAILURE, (f"step {k}: counts.{key} is {after.get(f'counts.{key}')}, expected {expect} "
                             f"(metrics[{flag!r}] = {opt.metrics.get(flag)})")
    if num:
        return unnamed_failure or (FALLBACK, f"step {k}: {num[0][:200]}")
    return OK, ""


def roundtrip(state: Any, mode: str) -> Any:
    """A checkpoint through ``deepcopy`` or ``torch.save`` → ``torch.load(weights_only=True)``."""
    if mode == "deepcopy":
        return copy.deepcopy(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)
