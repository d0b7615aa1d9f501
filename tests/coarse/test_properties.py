"""Property tests over random small networks and batches: (4.21) and (4.46) (hypothesis)."""

from __future__ import annotations

import warnings

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import coarse_reference as ref
from curvlib.approximators.api import approximate
from curvlib.coarse import two_level
from curvlib.curvatures.api import curvature
from curvlib.damping.api import damped_inverse
from curvlib.errors import NumericalWarning
from curvlib.plugins import load_registry
from curvlib.testing.strategies import seeds

DT = torch.float64
REGISTRY = load_registry(external=False)
SPACES = [
    ("nicolaides", {}),
    ("spectral", {}),
    ("krylov", {"seed": "nicolaides"}),
    ("krylov", {"seed": "residual", "iterations": 2}),
    ("residual", {}),
    ("taylor", {"order": 2}),
    ("taylor", {"order": 3}),
]


@st.composite
def problems(draw):
    """A random MLP (1–3 Linear layers of width 1–4, random biases and activations), a batch
    of 1–5 samples, a curvature kind and a damping."""
    depth = draw(st.integers(1, 3))
    widths = [draw(st.integers(1, 4)) for _ in range(depth + 1)]
    biases = [draw(st.booleans()) for _ in range(depth)]
    acts = [draw(st.sampled_from([nn.Tanh, nn.Sigmoid, nn.Softplus])) for _ in range(depth - 1)]
    m = draw(st.integers(1, 5))
    kind = draw(st.sampled_from(["ggn", "fisher", "empirical_fisher"]))
    lam = draw(st.floats(1e-3, 1.0))
    seed = draw(seeds)
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for k in range(depth):
        layers.append(nn.Linear(widths[k], widths[k + 1], bias=biases[k]))
        if k < depth - 1:
            layers.append(acts[k]())
    model = nn.Sequential(*layers).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    X = torch.randn(m, widths[0], generator=g, dtype=DT)
    y = torch.randn(m, widths[-1], generator=g, dtype=DT)
    opts = {"mc_samples": 2, "generator": torch.Generator().manual_seed(seed)} if kind == "fisher" else {}
    F = curvature(kind, model, nn.MSELoss(), (X, y), registry=REGISTRY, **opts)
    space = draw(st.sampled_from(SPACES))
    mode = draw(st.sampled_from(["multiplicative", "additive", "previous"]))
    return F, lam, space, mode


@given(problems())
def test_error_reduction_property(problem):
    """𝔈(β*) ≤ 𝔈(0) (4.21) for the multiplicative correction, and error_reduction (4.46),
    computed without ζ, equals 𝔈(β) − 𝔈(0) from the exact ζ = F•⁻¹u, for every mode."""
    F, lam, (space, opts), mode = problem
    inv = damped_inverse(approximate(F, "kfac", registry=REGISTRY), "heuristic", value=lam, registry=REGISTRY)
    u = F.gradient_vector()
    Fb = ref.damped_dense(F, lam)
    zeta = torch.linalg.solve(Fb, u)
    e = torch.linalg.eigvalsh(Fb)
    pre = two_level(inv, F, space, lam, mode, registry=REGISTRY, **opts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumericalWarning)  # collinear Krylov columns on 1-wide layers
        z = pre @ u
        er = float(pre.error_reduction(u))
    E0 = float(ref.energy_error(inv @ u, zeta, Fb))
    E = float(ref.energy_error(z, zeta, Fb))
    # the dense reference carries the rounding of a solve with F•: eps·κ(F•) relative to 𝔈(0)
    tol = 1e3 * torch.finfo(DT).eps * float(e[-1] / e[0]) * max(E0, float(u @ zeta))
    assert abs(er - (E - E0)) <= tol, (er, E - E0, tol)
    if mode == "multiplicative":
        assert er <= tol
        assert E <= E0 + tol
