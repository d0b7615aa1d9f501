"""NaturalGradient: the update formula (weight decay, momentum, KL clipping), lr schedulers,
param groups, the SGD/Adam fallback for parameters without an adapter, non-finite gradients, missing batches,
closures, bit-identical resume from a checkpoint, and the natural-gradient references."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn

from curvlib.capture.adapters import BatchCouplingWarning, ExcludedParametersWarning
from curvlib.errors import ConfigError, NumericalWarning
from curvlib.optim import NaturalGradient
from curvlib.plugins import load_registry
from curvlib.precond import build_preconditioner
from curvlib.testing.compare import assert_close

DT = torch.float64


@pytest.fixture(scope="module")
def registry():
    return load_registry(external=False)


def _mlp(seed=0, widths=(4, 6, 3), dtype=DT, batch_norm=False):
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            if batch_norm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.Tanh())
    model = nn.Sequential(*layers).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.6 * torch.randn(p.shape, generator=g, dtype=dtype) + (1.0 if p.ndim == 1 and batch_norm else 0.0))
    return model


def _batch(seed, m=16, d_in=4, classes=3, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, d_in, generator=g, dtype=dtype), torch.randint(0, classes, (m,), generator=g)


def _backward(model, X, y, loss_fn=None):
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    loss = loss_fn(model(X), y)
    loss.backward()
    return loss


def _quiet():
    """Silence the expected capture warnings (excluded parameters, batch coupling)."""
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore", ExcludedParametersWarning)
    warnings.simplefilter("ignore", BatchCouplingWarning)
    return ctx


def _snapshot(opt):
    return [p.detach().clone() for g in opt.param_groups for p in g["params"]]


def _expected_direction(opt, weight_decay=0.0):
    """P (g + ηθ) from the preconditioner as it stands (no refresh due), list like pre.params()."""
    pre = opt.preconditioner
    grads = [p.grad + weight_decay * p for p in pre.params()]
    return pre.apply(grads), grads


CFG = {"damping": {"kind": "heuristic", "value": 1e-2}, "update_every": 1000, "invert_every": 1000}


# -- the update formula --------------------------------------------------------------------


def test_step_with_weight_decay_and_momentum_follows_the_formula(registry):
    model = _mlp()
    opt = NaturalGradient(model, nn.CrossEntropyLoss(), CFG, lr=0.1, momentum=0.9, weight_decay=1e-2,
                          registry=registry, generator=torch.Generator().manual_seed(0))
    X, y = _batch(0)
    opt.zero_grad()
    _backward(model, X, y)
    opt.step(batch=(X, y))  # step 0: refresh + invert; b = Δ_0
    pre = opt.preconditioner
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in pre.params()]
    for k in (1, 2):
        X, y = _batch(k)
        opt.zero_grad()
        _backward(model, X, y)
        d, _ = _expected_direction(opt, weight_decay=1e-2)
        before = [p.detach().clone() for p in pre.params()]
        opt.step(batch=(X, y))
        assert not opt.last_update.refreshed
        for p, p0, b, dk in zip(pre.params(), before, buffers, d):
            b_new = 0.9 * b + dk
            assert_close(p.detach(), p0 - 0.1 * b_new)
        buffers = [opt.state[p]["momentum_buffer"].clone() for p in pre.params()]


def test_lr_scheduler_changes_the_step_size(registry):
    model = _mlp()
    opt = NaturalGradient(model, nn.CrossEntropyLoss(), CFG, lr=0.2, registry=registry)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    pre = opt.preconditioner
    lrs = []
    for k in range(3):
        X, y = _batch(k)
        opt.zero_grad()
        _backward(model, X, y)
        if pre.is_ready:
            d, _ = _expected_direction(opt)
            before = [p.detach().clone() for p in pre.params()]
        opt.step(batch=(X, y))
        if k > 0:
            lr = opt.param_groups[0]["lr"]
            lrs.append(lr)
            for p, p0, dk in zip(pre.params(), before, d):
                assert_close(p.detach(), p0 - lr * dk)
        sched.step()
    assert lrs == pytest.approx([0.02, 0.002])


def test_param_groups_with_different_learning_rates(registry):
    model = _mlp()
    first, second = model[0], model[2]
    opt = NaturalGradient(
        model, nn.CrossEntropyLoss(), CFG, lr=0.05, registry=registry,
        params=[{"params": first.parameters(), "lr": 0.3}, {"params": second.parameters()}],
    )
    X, y = _batch(0)
    opt.zero_grad()
    _backward(model, X, y)
    opt.step(batch=(X, y))
    X, y = _batch(1)
    opt.zero_grad()
    _backward(model, X, y)
    d, _ = _expected_direction(opt)
    pre = opt.preconditioner
    lr_of = {id(p): 0.3 for p in first.parameters()} | {id(p): 0.05 for p in second.parameters()}
    before = [p.detach().clone() for p in pre.params()]
    opt.step(batch=(X, y))
    for p, p0, dk in zip(pre.params(), before, d):
        assert_close(p.detach(), p0 - lr_of[id(p)] * dk)


def test_parameters_outside_the_groups_are_not_updated(registry):
    model = _mlp()
    frozen = [p.detach().clone() for p in model[2].parameters()]
    opt = NaturalGradient(model, nn.CrossEntropyLoss(), CFG, lr=0.1, registry=registry, params=model[0].parameters())
    for k in range(2):
        X, y = _batch(k)
        opt.zero_grad()
        _backward(model, X, y)
        opt.step(batch=(X, y))
    for p, q in zip(model[2].parameters(), frozen):
        assert torch.equal(p.detach(), q)


@pytest.mark.parametrize("clip", [1e-4, 1e3])
def test_kl_clipping_scales_the_step_as_appendix_3E(registry, clip):
    model = _mlp()
    opt = NaturalGradient(model, nn.CrossEntropyLoss(), CFG, lr=0.5, kl_clip=clip, registry=registry)
    X, y = _batch(0)
    opt.zero_grad()
    _backward(model, X, y)
    opt.step(batch=(X, y))
    X, y = _batch(1)
    opt.zero_grad()
    _backward(model, X, y)
    pre = opt.preconditioner
    d, g = _expected_direction(opt)
    # ν = min(1, sqrt(c / Σ_i |Δ_iᵀ g_i|)), i over layers (weight and bias together)
    total = 0.0
    j = 0
    for L in pre.layers:
        n = len(L.param_shapes)
        total += abs(sum(float((dk * gk).sum().detach()) for dk, gk in zip(d[j : j + n], g[j : j + n])))
        j += n
    nu = min(1.0, math.sqrt(clip / total))
    before = [p.detach().clone() for p in pre.params()]
    opt.step(batch=(X, y))
    assert float(opt.last_kl_scale) == pytest.approx(nu, rel=1e-12)
    assert (nu < 1.0) == (clip < 1.0)
    for p, p0, dk in zip(pre.params(), before, d):
        assert_close(p.detach(), p0 - 0.5 * nu * dk)
    assert opt.last_kl_scale.device == p.device and opt.last_kl_scale.dtype == DT


# -- fallback for parameters without an adapter ------------------------------------------------


@pytest.mark.parametrize("fallback", ["sgd", "adam"])
def test_parameters_without_adapter_follow_the_fallback(registry, fallback):
    ctx = _quiet()
    try:
        g = torch.Generator().manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.PReLU(6), nn.Linear(6, 3)).to(DT)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(0.6 * torch.randn(p.shape, generator=g, dtype=DT))
        bn = model[1]  # no layer adapter: the fallback updates it
        opt = NaturalGradient(model, nn.CrossEntropyLoss(), {"damping": {"kind": "heuristic", "value": 1e-2}},
                              lr=0.05, momentum=0.8, weight_decay=1e-3, fallback=fallback,
                              adam_betas=(0.85, 0.99), adam_eps=1e-7, registry=registry)
        # the reference: torch's own optimizer on copies of the BN parameters, fed the same gradients
        ref_params = [p.detach().clone().requires_grad_(True) for p in bn.parameters()]
        if fallback == "sgd":
            ref = torch.optim.SGD(ref_params, lr=0.05, momentum=0.8, weight_decay=1e-3)
        else:
            ref = torch.optim.Adam(ref_params, lr=0.05, betas=(0.85, 0.99), eps=1e-7, weight_decay=1e-3)
        for k in range(4):
            X, y = _batch(k)
            opt.zero_grad()
            _backward(model, X, y)
            for q, p in zip(ref_params, bn.parameters()):
                q.grad = p.grad.clone()
            opt.step(batch=(X, y))
            ref.step()
            for q, p in zip(ref_params, bn.parameters()):
                assert_close(p.detach(), q.detach(), msg=f"{fallback} step {k}")
        assert opt.preconditioner.excluded == ["1.weight"]
        pre2 = build_preconditioner(model, nn.CrossEntropyLoss(), opt.preconditioner.config, registry=registry)
        pre2.load_state_dict(_ckpt_roundtrip(opt.preconditioner.state_dict()))
        assert pre2.excluded == opt.preconditioner.excluded
    finally:
        ctx.__exit__(None, None, None)


# -- robustness ----------------------------------------------------------------------------------


def _flatten_state(obj, prefix=""):
    """Nested containers -> {path: leaf} for exact comparison."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten_state(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_flatten_state(v, f"{prefix}/{i}"))
    else:
        out[prefix] = obj
    return out


def _assert_same_state(a, b):
    fa, fb = _flatten_state(a), _flatten_state(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        x, y = fa[k], fb[k]
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), k
        else:
            assert x == y, k


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_skips_the_step_and_keeps_all_state(registry, bad):
    ctx = _quiet()
    try:
        model = _mlp(batch_norm=True)
        opt = NaturalGradient(model, nn.CrossEntropyLoss(), {"update_every": 1, "invert_every": 2}, lr=0.1,
                              momentum=0.9, kl_clip=1e-2, fallback="adam", registry=registry,
                              generator=torch.Generator().manual_seed(0))
        for k in range(3):
            X, y = _batch(k)
            opt.zero_grad()
            _backward(model, X, y)
            opt.step(batch=(X, y))
        params = _snapshot(opt)
        state = copy.deepcopy(opt.state_dict())
        X, y = _batch(9)
        opt.zero_grad()
        _backward(model, X, y)
        model[0].weight.grad[1, 2] = bad
        with pytest.warns(NumericalWarning, match="non-finite"):
            opt.step(batch=(X, y))
        for p, q in zip(_snapshot(opt), params):
            assert torch.equal(p, q)
        _assert_same_state(opt.state_dict(), state)
        assert opt.preconditioner.step == 3
        # the next finite step proceeds as step 3
        opt.zero_grad()
        _backward(model, X, y)
        opt.step(batch=(X, y))
        assert opt.last_update.step == 3 and opt.preconditioner.step == 4
    finally:
        ctx.__exit__(None, None, None)


def test_missing_batch_at_a_refresh_step_is_a_clear_error(registry):
    model = _mlp()
    opt = NaturalGradient(model, nn.CrossEntropyLoss(), {"update_every": 2, "invert_every": 2}, lr=0.1, registry=registry)
    X, y = _batch(0)
    opt.zero_grad()
    _backward(model, X, y)
    with pytest.raises(ConfigError, match=r"refresh is due at step 0.*batch=\(X, y\)"):
        opt.step()
    opt.step(batch=(X, y))
    opt.zero_grad()
    _backward(model, X, y)
    opt.step()  # step 1: no refresh due, no batch needed
    opt.zero_grad()
    _backward(model, X, y)
    with pytest.raises(ConfigError, match="step 2"):
        opt.step()


def test_closure_and_explicit_backward_give_the_same_steps(registry):
    results = []
    for use_closure in (False, True):
        model = _mlp()
        opt = NaturalGradient(model, nn.CrossEntropyLoss(), {"update_every": 2, "invert_every": 2}, lr=0.1,
                              momentum=0.5, registry=registry, generator=torch.Generator().manual_seed(3))
        losses = []
        for k in range(4):
            X, y = _batch(k)
            if use_closure:
                def closure(X=X, y=y):
                    opt.zero_grad()
                    return _backward(model, X, y)
                losses.append(float(opt.step(closure, batch=(X, y)).detach()))
            else:
                opt.zero_grad()
                losses.append(float(_backward(model, X, y).detach()))
                opt.step(batch=(X, y))
        results.append((losses, [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == results[1][0]
    for p, q in zip(results[0][1], results[1][1]):
        assert torch.equal(p, q)


def test_hyperparameters_are_validated(registry):
    model = _mlp()
    loss = nn.CrossEntropyLoss()
    with pytest.raises(ConfigError, match="momentum"):
        NaturalGradient(model, loss, lr=0.1, momentum=1.0, registry=registry)
    with pytest.raises(ConfigError, match="lr"):
        NaturalGradient(model, loss, lr=-1.0, registry=registry)
    with pytest.raises(ConfigError, match="kl_clip"):
        NaturalGradient(model, loss, lr=0.1, kl_clip=0.0, registry=registry)
    with pytest.raises(ConfigError, match="fallback"):
        NaturalGradient(model, loss, lr=0.1, fallback="rmsprop", registry=registry)
    with pytest.raises(ConfigError, match=r"param_groups\[1\]\.weight_decay"):
        NaturalGradient(model, loss, lr=0.1, registry=registry,
                        params=[{"params": model[0].parameters()}, {"params": model[2].parameters(), "weight_decay": -1}])
    with pytest.raises(ConfigError, match=r"invert_every"):
        NaturalGradient(model, loss, {"update_every": 3, "invert_every": 4}, lr=0.1, registry=registry)


# -- checkpoints -------------------------------------------------------------------------------


def _train(model, opt, batches, loss_fn):
    for X, y in batches:
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step(batch=(X, y))


def _ckpt_roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


RESUME_CONFIGS = {
    "kfac_corrected_lm": {
        "curvature": {"kind": "fisher", "mc_samples": 2},
        "approximator": {"kind": "kfac_corrected", "max_iters": 25},
        "damping": {"kind": "levenberg_marquardt", "value": 1e-2, "inner": "heuristic"},
        "update_every": 2,
        "invert_every": 4,
        "ema": 0.9,
    },
    "exact_natural_gradient": {
        "preconditioner": "exact_natural_gradient",
        "damping": {"kind": "tikhonov", "value": 1e-2},
        "update_every": 2,
        "invert_every": 2,
    },
}


@pytest.mark.parametrize("name", sorted(RESUME_CONFIGS))
def test_resume_from_checkpoint_is_bit_identical(registry, name):
    cfg = RESUME_CONFIGS[name]
    loss_fn = nn.CrossEntropyLoss()
    batches = [_batch(k) for k in range(12)]
    ctx = _quiet()
    try:
        def make(seed_model, seed_gen):
            model = _mlp(seed=seed_model, batch_norm=True)
            params = [
                {"params": [p for n, p in model.named_parameters() if n.startswith("0.")], "lr": 0.05},
                {"params": [p for n, p in model.named_parameters() if not n.startswith("0.")]},
            ]
            opt = NaturalGradient(model, loss_fn, cfg, lr=0.1, momentum=0.9, weight_decay=1e-3, kl_clip=1e-2,
                                  fallback="adam", params=params, registry=registry,
                                  generator=torch.Generator().manual_seed(seed_gen))
            return model, opt

        model, opt = make(0, 1)
        _train(model, opt, batches[:5], loss_fn)
        model_state = _ckpt_roundtrip(copy.deepcopy(model.state_dict()))
        opt_state = _ckpt_roundtrip(copy.deepcopy(opt.state_dict()))
        _train(model, opt, batches[5:], loss_fn)

        model2, opt2 = make(7, 99)  # fresh objects, other weights and generator seed
        model2.load_state_dict(model_state)
        opt2.load_state_dict(opt_state)
        _train(model2, opt2, batches[5:], loss_fn)
    finally:
        ctx.__exit__(None, None, None)
    for (n, p), q in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, q), n
    for (n, b), c in zip(model.named_buffers(), model2.buffers()):
        assert torch.equal(b, c), n
    _assert_same_state(opt.state_dict(), opt2.state_dict())


def test_load_state_dict_requires_the_preconditioner_entry(registry):
    model = _mlp()
    opt = NaturalGradient(model, nn.CrossEntropyLoss(), lr=0.1, registry=registry)
    state = opt.state_dict()
    del state["preconditioner"]
    with pytest.raises(ConfigError, match="preconditioner"):
        opt.load_state_dict(state)


# -- natural-gradient references as preconditioners -----------------------------------------------


@pytest.mark.parametrize("kind", ["exact_natural_gradient", "block_natural_gradient"])
def test_natural_gradient_references_give_the_dense_damped_direction(registry, kind):
    model = _mlp()
    lam = 3e-2
    opt = NaturalGradient(model, nn.CrossEntropyLoss(), {"preconditioner": kind, "damping": {"kind": "tikhonov", "value": lam}},
                          lr=1.0, registry=registry, generator=torch.Generator().manual_seed(0))
    X, y = _batch(0, m=6)
    opt.zero_grad()
    _backward(model, X, y)
    pre = opt.preconditioner
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(batch=(X, y))
    F = pre.curvature
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        D = F.to_dense()
    if kind == "block_natural_gradient":
        mask = torch.zeros_like(D, dtype=torch.bool)
        for L in F.layers:
            mask[L.slice, L.slice] = True
        D = torch.where(mask, D, torch.zeros_like(D))
    g = F.params_to_vector([p.grad for p in F.params()])
    expected = torch.linalg.solve(D + lam * torch.eye(F.p, dtype=DT), g)
    step = F.params_to_vector([p0 - p.detach() for p0, p in zip(before, model.parameters())])
    assert_close(step, expected, msg=kind)


# -- Levenberg–Marquardt damping ------------------------------------------------------------------


def test_levenberg_marquardt_lambda_follows_the_reduction_ratio(registry):
    model = _mlp()
    lam0, omega = 1e-1, 0.5
    cfg = {"damping": {"kind": "levenberg_marquardt", "value": lam0, "omega": omega, "inner": "heuristic"},
           "update_every": 1, "invert_every": 2}
    opt = NaturalGradient(model, nn.CrossEntropyLoss(), cfg, lr=0.5, registry=registry,
                          generator=torch.Generator().manual_seed(0))
    pre = opt.preconditioner
    lam = lam0
    for k in range(4):
        X, y = _batch(k)
        opt.zero_grad()
        _backward(model, X, y)
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(batch=(X, y))
        assert pre.inverse.infos[0].lam == (lam if k % 2 == 0 else pre.inverse.infos[0].lam)
        # ρ = (L(θ+δ) − L(θ)) / (gᵀδ + ½ δᵀFδ), from the dense curvature of this step's batch
        F = pre.curvature
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            D = F.to_dense()
        delta = F.params_to_vector([p.detach() - p0 for p, p0 in zip(model.parameters(), before)])
        with torch.no_grad():
            after = nn.CrossEntropyLoss()(model(X), y)
            before_loss = nn.CrossEntropyLoss()(torch.func.functional_call(
                model, {n: p0 for (n, _), p0 in zip(model.named_parameters(), before)}, (X,)), y)
        g = F.gradient_vector()
        rho = float((after - before_loss) / (g @ delta + 0.5 * delta @ (D @ delta)))
        assert opt.last_reduction_ratio == pytest.approx(rho, rel=1e-8)
        lam = lam / omega if rho < 0.25 else (lam * omega if rho > 0.75 else lam)
        assert pre.damping.value == pytest.approx(lam, rel=1e-12)
    assert pre.damping.num_updates == 4
