"""The Preconditioner: KFAC direction against a dense torch.kron reference, the T1/T2 schedule
(refreshes counted; factors change across refreshes), exact state round trips, buffers kept."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from curvlib.errors import ConfigError, CurvlibError, DTypeDeviceError, ShapeError
from curvlib.plugins import load_registry
from curvlib.precond import NotReadyError, build_preconditioner
from curvlib.testing.compare import assert_close
from curvlib.testing.references import dense_two_level_residual

DT = torch.float64


@pytest.fixture(scope="module")
def registry():
    return load_registry(external=False)


def _mlp(seed=0, widths=(4, 5, 3), dtype=DT):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    model = nn.Sequential(*layers).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.7 * torch.randn(p.shape, generator=g, dtype=dtype))
    return model


def _batch(seed, m=12, d_in=4, classes=3, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, d_in, generator=g, dtype=dtype), torch.randint(0, classes, (m,), generator=g)


# -- an independent dense reference for KFAC with the π-split ---------------------------------


def _vec_layer(W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """vec([W, b]) with columns stacked (DESIGN.md §1), written out without the adapters."""
    return torch.cat([W, b[:, None]], dim=1).T.reshape(-1)


def _reference_empirical_kfac_direction(model: nn.Sequential, X, y, lam):
    """[(A + π√λI) ⊗ (G + π⁻¹√λI)]⁻¹ g per Linear layer, dense, from torch.func per-sample
    gradients: A = (1/m) Σ ā āᵀ, G = (1/m) Σ ∂ℓ_b/∂s ∂ℓ_b/∂sᵀ (empirical Fisher, CE per sample)."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    m = X.shape[0]
    # layer inputs a_i and pre-activations s_i of the forward pass
    inputs, h = [], X
    with torch.no_grad():
        for mod in model:
            if isinstance(mod, nn.Linear):
                inputs.append(h)
            h = mod(h)

    # per-sample gradients w.r.t. the pre-activations: perturb s_i by zero offsets e_i
    def per_sample_loss(offsets, x, t):
        h = x[None]
        j = 0
        for mod in model:
            h = mod(h)
            if isinstance(mod, nn.Linear):
                h = h + offsets[j]
                j += 1
        return nn.functional.cross_entropy(h, t[None])

    zeros = [torch.zeros(L.out_features, dtype=DT) for L in linears]
    gs = [t.detach() for t in vmap(grad(per_sample_loss), in_dims=(None, 0, 0))(zeros, X, y)]  # [m, d_out] each
    params = dict(model.named_parameters())
    full_grad = grad(lambda p: nn.functional.cross_entropy(functional_call(model, p, (X,)), y))(params)
    out = []
    names = [n for n, mod in model.named_children() if isinstance(mod, nn.Linear)]
    for L, a, g, name in zip(linears, inputs, gs, names):
        abar = torch.cat([a, torch.ones(m, 1, dtype=DT)], dim=1)
        A = abar.T @ abar / m
        G = g.T @ g / m
        pi = math.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
        Ad = A + pi * math.sqrt(lam) * torch.eye(A.shape[0], dtype=DT)
        Gd = G + math.sqrt(lam) / pi * torch.eye(G.shape[0], dtype=DT)
        M = torch.kron(Ad, Gd)  # vec(ā gᵀ) = ā ⊗ g
        gv = _vec_layer(full_grad[f"{name}.weight"], full_grad[f"{name}.bias"])
        out.append(torch.linalg.solve(M, gv))
    return torch.cat(out)


def test_kfac_direction_equals_dense_pi_split_reference(registry):
    model = _mlp()
    X, y = _batch(1)
    lam = 0.03
    cfg = {"curvature": "empirical_fisher", "approximator": "kfac", "damping": {"kind": "heuristic", "value": lam}}
    pre = build_preconditioner(model, nn.CrossEntropyLoss(), cfg, registry=registry)
    pre.update((X, y))
    model.zero_grad()
    nn.CrossEntropyLoss()(model(X), y).backward()
    direction = pre.apply([p.grad for p in pre.params()])
    expected = _reference_empirical_kfac_direction(model, X, y, lam)
    assert_close(pre.params_to_vector(direction), expected, msg="KFAC π-split direction")


def test_fisher_kfac_direction_from_captured_statistics(registry):
    """With MC targets: the dense π-split inverse built from the captured statistics."""
    model = _mlp(2)
    X, y = _batch(3)
    lam = 1e-2
    cfg = {"curvature": {"kind": "fisher", "mc_samples": 2}, "damping": {"kind": "heuristic", "value": lam}}
    pre = build_preconditioner(model, nn.CrossEntropyLoss(), cfg, registry=registry, generator=torch.Generator().manual_seed(5))
    pre.update((X, y))
    F = pre.curvature
    with pytest.raises(CurvlibError, match="without the loss gradient"):
        F.gradient_vector()  # not captured: only an adaptive damping uses it (one backward pass saved)
    g = torch.randn(F.shape[0], dtype=DT, generator=torch.Generator().manual_seed(6))  # any right-hand side
    blocks = []
    for i, L in enumerate(F.layers):
        s = F.statistics(i)
        A = s.a[:, 0].T @ s.a[:, 0] / s.m
        gg = s.g.reshape(-1, s.g_dim)
        G = s.scale * gg.T @ gg
        pi = math.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
        M = torch.kron(A + pi * math.sqrt(lam) * torch.eye(A.shape[0], dtype=DT), G + math.sqrt(lam) / pi * torch.eye(G.shape[0], dtype=DT))
        blocks.append(torch.linalg.solve(M, g[L.slice]))
    assert_close(pre.apply(g), torch.cat(blocks))
    # list form and flat form agree
    as_list = pre.apply(F.vector_to_params(g))
    assert_close(pre.params_to_vector(as_list), torch.cat(blocks))


# -- the schedule --------------------------------------------------------------------------------


def _train_steps(pre, model, steps, seed0=100, lr=0.05):
    """Plain preconditioned descent; returns per-step records."""
    loss_fn = nn.CrossEntropyLoss()
    records = []
    for k in range(steps):
        X, y = _batch(seed0 + k)
        before = (pre.num_refreshes, pre.num_inversions)
        info = pre.update((X, y))
        A0 = pre.approximation[0].terms[0][0].clone()
        model.zero_grad()
        loss_fn(model(X), y).backward()
        d = pre.apply([p.grad for p in pre.params()])
        with torch.no_grad():
            for p, dp in zip(pre.params(), d):
                p.sub_(lr * dp)
        records.append((k, info, before, A0, pre.inverse))
    return records


def test_refreshes_and_inversions_happen_exactly_on_schedule(registry):
    """DESIGN.md §10 'curvature updated once': count refreshes, and check the factors change."""
    model = _mlp()
    T1, T2 = 3, 6
    cfg = {"update_every": T1, "invert_every": T2, "ema": 0.5, "damping": {"kind": "heuristic", "value": 1e-2}}
    pre = build_preconditioner(model, nn.CrossEntropyLoss(), cfg, registry=registry, generator=torch.Generator().manual_seed(0))
    records = _train_steps(pre, model, 14)
    refreshed = [k for k, info, *_ in records if info.refreshed]
    inverted = [k for k, info, *_ in records if info.inverted]
    assert refreshed == [0, 3, 6, 9, 12]
    assert inverted == [0, 6, 12]
    assert pre.num_refreshes == 5 and pre.num_inversions == 3
    assert (pre.last_refresh_step, pre.last_inversion_step) == (12, 12)
    # the counters moved exactly at those steps
    for (k, info, (r0, i0), *_), nxt in zip(records, [r[2] for r in records[1:]] + [(5, 3)]):
        assert info.refreshed == (k % T1 == 0) and info.inverted == (k % T2 == 0)
        assert nxt == (r0 + info.refreshed, i0 + info.inverted)
    # factors change at every refresh and only then; the inverse object only at inversions
    for (k0, _, _, A_prev, inv_prev), (k1, info, _, A_next, inv_next) in zip(records, records[1:]):
        if info.refreshed:
            assert not torch.equal(A_prev, A_next), f"factors did not change at refresh step {k1}"
        else:
            assert torch.equal(A_prev, A_next), f"factors changed at step {k1} without a refresh"
        assert (inv_next is not inv_prev) == info.inverted
    # the EMA counter of the approximation advanced once per refresh
    assert pre.approximation[0].refresh == 5


def test_update_needs_a_batch_only_when_a_refresh_is_due(registry):
    model = _mlp()
    pre = build_preconditioner(model, nn.CrossEntropyLoss(), {"update_every": 2, "invert_every": 2}, registry=registry)
    with pytest.raises(NotReadyError):
        pre.apply(torch.zeros(1, dtype=DT))
    with pytest.raises(ConfigError, match="refresh is due at step 0.*batch"):
        pre.update()
    assert pre.step == 0
    pre.update(_batch(0))
    info = pre.update()  # step 1: nothing due
    assert not info.refreshed and pre.step == 2
    with pytest.raises(ConfigError, match="step 2"):
        pre.update()
    info = pre.update(_batch(1), step=10)
    assert info.refreshed and info.inverted and pre.step == 11


def test_apply_checks_dtype_device_and_shape(registry):
    model = _mlp()
    pre = build_preconditioner(model, nn.CrossEntropyLoss(), None, registry=registry)
    pre.update(_batch(0))
    with pytest.raises(DTypeDeviceError):
        pre.apply(torch.zeros(pre.p, dtype=torch.float32))
    with pytest.raises(ShapeError):
        pre.apply(torch.zeros(pre.p + 1, dtype=DT))
    with pytest.raises(ShapeError):
        pre.apply([torch.zeros(2, dtype=DT)])
    V = torch.randn(pre.p, 3, dtype=DT)
    out = pre.apply(V)
    assert out.shape == (pre.p, 3)
    assert_close(out[:, 1], pre.apply(V[:, 1]))


def test_refresh_leaves_model_buffers_untouched(registry):
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    X, y = _batch(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(Warning):  # batch coupling
        pre = build_preconditioner(model, nn.CrossEntropyLoss(), None, registry=registry)
        pre.update((X, y))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert pre.excluded == [] and "1" in [L.name for L in pre.layers]


# -- exact state round trips ----------------------------------------------------------------------


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


CONFIGS = {
    "kfac_corrected_lm": {
        "curvature": {"kind": "fisher", "mc_samples": 1},
        "approximator": {"kind": "kfac_corrected", "max_iters": 30},
        "damping": {"kind": "levenberg_marquardt", "value": 1e-2, "inner": "heuristic"},
        "update_every": 2,
        "invert_every": 4,
        "ema": 0.9,
    },
    "deflation_tikhonov": {
        "approximator": {"kind": "deflation", "rank": 2, "max_iters": 30},
        "damping": {"kind": "tikhonov", "value": 1e-2},
        "update_every": 1,
        "invert_every": 3,
    },
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_dict_round_trip_gives_bit_identical_directions(registry, name):
    cfg = CONFIGS[name]
    model = _mlp()
    pre = build_preconditioner(model, nn.CrossEntropyLoss(), cfg, registry=registry, generator=torch.Generator().manual_seed(1))
    _train_steps(pre, model, 5)
    state = _roundtrip(pre.state_dict())
    model_state = copy.deepcopy(model.state_dict())
    later = _train_steps(pre, model, 5, seed0=200)
    final = [p.detach().clone() for p in model.parameters()]

    model2 = _mlp(seed=9)
    model2.load_state_dict(model_state)
    pre2 = build_preconditioner(model2, nn.CrossEntropyLoss(), cfg, registry=registry, generator=torch.Generator().manual_seed(77))
    pre2.load_state_dict(state)
    assert pre2.step == 5 and pre2.num_refreshes == pre.num_refreshes - sum(r[1].refreshed for r in later)
    later2 = _train_steps(pre2, model2, 5, seed0=200)
    for (k, info, _, A, _), (k2, info2, _, A2, _) in zip(later, later2):
        assert info == info2 and torch.equal(A, A2)
    for p, q in zip(final, model2.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(pre.generator.get_state(), pre2.generator.get_state())
    assert pre.damping.state_dict() == pre2.damping.state_dict()


def test_load_state_dict_rejects_other_setups(registry):
    model = _mlp()
    pre = build_preconditioner(model, nn.CrossEntropyLoss(), {"approximator": "kfac"}, registry=registry)
    pre.update(_batch(0))
    state = pre.state_dict()
    other = build_preconditioner(model, nn.CrossEntropyLoss(), {"approximator": "kpsvd"}, registry=registry)
    with pytest.raises(ConfigError, match="approximator"):
        other.load_state_dict(state)
    with pytest.raises(ConfigError, match="version"):
        pre.load_state_dict({**state, "version": 99})
    bad = copy.deepcopy(state)
    bad["layers"][0]["name"] = "nope"
    with pytest.raises(ConfigError, match="nope"):
        pre.load_state_dict(bad)


def test_state_before_the_first_update_round_trips(registry):
    model = _mlp()
    pre = build_preconditioner(model, nn.CrossEntropyLoss(), None, registry=registry, generator=torch.Generator().manual_seed(4))
    state = _roundtrip(pre.state_dict())
    pre2 = build_preconditioner(model, nn.CrossEntropyLoss(), None, registry=registry, generator=torch.Generator().manual_seed(8))
    pre2.load_state_dict(state)
    assert not pre2.is_ready and pre2.step == 0
    X, y = _batch(0)
    pre.update((X, y))
    pre2.update((X, y))
    g = torch.randn(pre.p, dtype=DT, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pre.apply(g), pre2.apply(g))


# -- the coarse correction ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["multiplicative", "additive"])
def test_coarse_correction_uses_the_latest_curvature_and_the_current_gradient(registry, mode):
    model = _mlp()
    lam = 0.05
    cfg = {"coarse_space": {"kind": "residual"}, "coarse_mode": mode, "damping": {"kind": "heuristic", "value": lam},
           "update_every": 2, "invert_every": 4}
    pre = build_preconditioner(model, nn.CrossEntropyLoss(), cfg, registry=registry, generator=torch.Generator().manual_seed(0))
    pre.update(_batch(0))
    pre.update()
    pre.update(_batch(1))  # step 2: refresh without inversion
    F = pre.curvature
    assert pre.last_inversion_step == 0 and pre.last_refresh_step == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        F_dense = F.to_dense()
    M_dense = pre.inverse.to_dense()  # the first level from step 0
    for seed in (0, 1):
        g = torch.randn(pre.p, dtype=DT, generator=torch.Generator().manual_seed(seed))
        expected = dense_two_level_residual(F_dense, M_dense, g, lam, [L.slice for L in F.layers], mode)
        assert_close(pre.apply(g), expected, msg=f"two-level {mode}")


def test_coarse_state_round_trip_is_bit_identical(registry):
    cfg = {"coarse_space": {"kind": "residual"}, "approximator": "kfac", "damping": {"kind": "heuristic", "value": 1e-2},
           "update_every": 2, "invert_every": 4}
    model = _mlp()
    pre = build_preconditioner(model, nn.CrossEntropyLoss(), cfg, registry=registry, generator=torch.Generator().manual_seed(1))
    _train_steps(pre, model, 3)  # resume after a refresh that was not an inversion
    state = _roundtrip(pre.state_dict())
    assert state["curvature"] is not None
    model_state = copy.deepcopy(model.state_dict())
    g = torch.randn(pre.p, dtype=DT, generator=torch.Generator().manual_seed(5))
    expected_now = pre.apply(g)
    _train_steps(pre, model, 4, seed0=300)
    model2 = _mlp(seed=3)
    model2.load_state_dict(model_state)
    pre2 = build_preconditioner(model2, nn.CrossEntropyLoss(), cfg, registry=registry)
    pre2.load_state_dict(state)
    assert torch.equal(pre2.apply(g), expected_now)
    _train_steps(pre2, model2, 4, seed0=300)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


class _Skippable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 5).to(DT)
        self.b = nn.Linear(5, 5).to(DT)
        self.c = nn.Linear(5, 3).to(DT)
        self.use_b = True

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.use_b:
            h = torch.tanh(self.b(h))
        return self.c(h)


def test_a_refresh_with_other_layers_rebuilds_the_inverse(registry):
    model = _Skippable()
    pre = build_preconditioner(model, nn.CrossEntropyLoss(), {"update_every": 1, "invert_every": 5}, registry=registry)
    pre.update(_batch(0))
    p_full = pre.p
    model.use_b = False
    with pytest.warns(Warning, match="b"):  # b's parameters are excluded from this capture
        info = pre.update(_batch(1))
    assert info.refreshed and info.inverted and pre.p == p_full - 30
    assert [L.name for L in pre.layers] == ["a", "c"]
    out = pre.apply(torch.ones(pre.p, dtype=DT))
    assert out.shape == (pre.p,) and torch.isfinite(out).all()
