"""The test models of :mod:`curvlib.testing.models` and the dense references in torch's
parameter layout (``dense_*_params`` of :mod:`curvlib.testing.references`), each checked
against routes that share nothing with them:

- per-sample gradients and Jacobians by Python loops of ``torch.autograd.grad`` on the real
  modules (no ``torch.func``, no ``functional_call``), tied weights summed by autograd itself;
- the output Hessian of each per-sample loss by ``torch.autograd.functional.hessian``;
- Hessian-vector products by double back-propagation through the real modules, and by central
  differences of the gradient;
- GGN = Hessian for models linear in their parameters; GGN = the exact expectation of the Fisher
  over every (joint) target; the "sum" matrices are D × the "mean" ones for cross-entropy over
  D positions;
- symmetry and positive semi-definiteness.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvlib.testing import assert_close, assert_psd, assert_symmetric
from curvlib.testing import references as ref
from curvlib.testing.models import (
    ModelCase,
    TinyMixedModel,
    tiny_mixed_model,
    tiny_resnet,
    tiny_transformer_lm,
)

DT = torch.float64

BUILDERS = {
    "lm_batch_first": lambda **kw: tiny_transformer_lm(batch_first=True, **kw),
    "lm_seq_first": lambda **kw: tiny_transformer_lm(batch_first=False, **kw),
    "lm_untied": lambda **kw: tiny_transformer_lm(tied=False, **kw),
    "resnet": lambda **kw: tiny_resnet(**kw),
    "mixed": lambda **kw: tiny_mixed_model(**kw),
}
# smaller variants where a dense Hessian (p reverse-over-reverse products) is computed
SMALL = {
    "lm_batch_first": lambda: tiny_transformer_lm(batch_first=True, d=4, dim_ff=6, num_layers=2, seq_len=4, vocab=5),
    "lm_seq_first": lambda: tiny_transformer_lm(batch_first=False, d=4, dim_ff=6, num_layers=2, seq_len=4, vocab=5),
    "resnet": lambda: tiny_resnet(width=2, size=6),
    "mixed": lambda: tiny_mixed_model(),
}


@pytest.fixture(scope="module")
def cases() -> dict[str, ModelCase]:
    return {name: build() for name, build in BUILDERS.items()}


def _params(case: ModelCase) -> list[torch.Tensor]:
    return list(case.model.parameters())


def _positions(case: ModelCase) -> int:
    """D: positions per sample of the cross-entropy (T for the language model, else 1)."""
    return math.prod(case.output().shape[2:])


def _k(case: ModelCase) -> float:
    """k of the per-sample convention, written out: 1/D for "mean", 1 for "sum"."""
    return 1.0 / _positions(case) if case.loss_fn.reduction == "mean" else 1.0


def _sample(case: ModelCase, b: int) -> tuple[torch.Tensor, ...]:
    return tuple(x[b : b + 1] for x in case.inputs)


def _loop_grads(case: ModelCase, targets: torch.Tensor | None = None) -> torch.Tensor:
    """∇_θ ℓ_b ``[m, p]`` by a loop of ``torch.autograd.grad`` on one-sample batches."""
    y = case.y if targets is None else targets
    params = _params(case)
    rows = []
    for b in range(case.num_samples):
        loss = case.loss_fn(case.model(*_sample(case, b)), y[b : b + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def _loop_jacobians(case: ModelCase) -> torch.Tensor:
    """J_b ``[m, c, p]`` by one ``torch.autograd.grad`` per output entry and sample."""
    params = _params(case)
    out = []
    for b in range(case.num_samples):
        f = case.model(*_sample(case, b)).reshape(-1)
        rows = [torch.autograd.grad(f[i], params, retain_graph=True) for i in range(f.numel())]
        out.append(torch.stack([torch.cat([g.reshape(-1) for g in r]) for r in rows]))
    return torch.stack(out)


def _loop_output_hessians(case: ModelCase) -> torch.Tensor:
    """∇²_f ℓ_b ``[m, c, c]`` by ``torch.autograd.functional.hessian`` per sample."""
    out = case.output()
    shape = out.shape[1:]
    Hs = []
    for b in range(case.num_samples):
        yb = case.y[b : b + 1]
        Hs.append(torch.autograd.functional.hessian(lambda f: case.loss_fn(f.reshape(1, *shape), yb), out[b].reshape(-1)))
    return torch.stack(Hs)


def _hvp(case: ModelCase, v: torch.Tensor) -> torch.Tensor:
    """∇²_θ ((1/m)Σ_b ℓ_b) v by double back-propagation through the real modules."""
    params = _params(case)
    vs = ref.unflatten_params(v, params)
    with sdpa_kernel([SDPBackend.MATH]):  # the fused CPU attention kernel has no double backward
        L = case.loss_fn(case.model(*case.inputs), case.y)
        if case.loss_fn.reduction == "sum":
            L = L / case.num_samples
        grads = torch.autograd.grad(L, params, create_graph=True)
        hv = torch.autograd.grad(grads, params, grad_outputs=vs)
    return ref.flatten_params(hv)


def _sampled_targets(case: ModelCase, S: int, seed: int = 0) -> torch.Tensor:
    """S categorical draws per sample (and position) from softmax(f), ``[m, S, *d]``, by hand."""
    out = case.output()
    m, C = out.shape[:2]
    p = out.reshape(m, C, -1).transpose(1, 2).reshape(-1, C).softmax(-1)
    draws = torch.multinomial(p, S, replacement=True, generator=torch.Generator().manual_seed(seed))  # [m·D, S]
    return draws.reshape(m, -1, S).transpose(1, 2).reshape(m, S, *out.shape[2:])


# -- the models ---------------------------------------------------------------------------------------
def test_language_model_layouts_compute_the_same_function(cases):
    a, b = cases["lm_batch_first"], cases["lm_seq_first"]
    assert a.model.blocks[0].self_attn.batch_first and not b.model.blocks[0].self_attn.batch_first
    for (na, pa), (nb, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    assert torch.equal(a.X, b.X) and torch.equal(a.y, b.y)
    fa, fb = a.output(), b.output()
    m, T = a.X.shape
    assert fa.shape == (m, 7, T)  # [m, V, T]
    assert_close(fb, fa)
    # the targets are the next tokens
    assert a.X.dtype == torch.long and a.y.shape == (m, T)


def test_language_model_is_causal_and_tied(cases):
    case = cases["lm_batch_first"]
    model = case.model
    assert model.head.weight is model.tok.weight and model.head.bias is None
    assert cases["lm_untied"].model.head.weight is not cases["lm_untied"].model.tok.weight
    assert isinstance(model.pos, nn.Embedding) and len(model.blocks) >= 2
    # changing the last token changes only the last position's logits
    X2 = case.X.clone()
    X2[:, -1] = (X2[:, -1] + 1) % model.tok.num_embeddings
    with torch.no_grad():
        f1, f2 = model(case.X), model(X2)
    assert_close(f2[:, :, :-1], f1[:, :, :-1])
    assert (f2[:, :, -1] - f1[:, :, -1]).abs().max() > 1e-3


def test_resnet_and_mixed_model_layers(cases):
    resnet, mixed = cases["resnet"].model, cases["mixed"].model
    assert not resnet.training and not mixed.training
    bns = [mod for mod in resnet.modules() if isinstance(mod, nn.BatchNorm2d)]
    assert len(bns) == 6
    for bn in bns:  # non-trivial running statistics and affine values
        assert bn.running_mean.abs().min() > 0 and (bn.running_var - 1).abs().min() > 0
        assert (bn.weight - 1).abs().min() > 0 and bn.bias.abs().min() > 0
    shortcuts = [type(b.shortcut) for b in resnet.blocks]
    assert shortcuts == [nn.Identity, nn.Sequential]
    assert cases["resnet"].X.shape == (3, 1, 8, 8)

    assert isinstance(mixed, TinyMixedModel)
    assert mixed.head.weight is mixed.emb.weight and mixed.head.bias is not None
    assert mixed.emb.padding_idx == 0 and bool((cases["mixed"].X[0] == 0).any())
    assert torch.count_nonzero(mixed.emb.weight[0]) == 0  # the padding row, as torch initialises it
    assert mixed.grouped.groups == 2 and mixed.depthwise.groups == mixed.depthwise.in_channels == 4
    kinds = {type(mod) for mod in mixed.modules()}
    for t in (nn.Conv1d, nn.Conv3d, nn.Conv2d, nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.RMSNorm, nn.Linear):
        assert t in kinds, t
    assert [list(x.shape) for x in cases["mixed"].inputs] == [[3, 4], [3, 2, 6], [3, 2, 3, 3, 3], [3, 2, 5, 5]]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_models_run_in_float64_every_module_is_called_every_parameter_is_used(name, cases):
    case = cases[name]
    model = case.model
    called: set[str] = set()
    handles = [mod.register_forward_hook(lambda mod, i, o, n=n: called.add(n)) for n, mod in model.named_modules()]
    try:
        out = model(*case.inputs)
    finally:
        for h in handles:
            h.remove()
    # containers without a forward, and MultiheadAttention.out_proj, whose weights torch uses
    # functionally (F.multi_head_attention_forward), are never called
    skipped = {n for n, mod in model.named_modules() if isinstance(mod, nn.ModuleList) or n.endswith("self_attn.out_proj")}
    assert {n for n, _ in model.named_modules()} - skipped <= called
    assert out.dtype == DT
    loss = case.loss_fn(out, case.y)
    params = _params(case)
    grads = torch.autograd.grad(loss, params)
    unused = [n for (n, _), g in zip(model.named_parameters(), grads) if torch.count_nonzero(g) == 0]
    assert unused == []
    assert all(p.dtype == DT and p.requires_grad for p in params)
    assert sum(p.numel() for p in params) <= 3000


def test_builders_are_seeded_and_leave_the_global_rng_alone():
    state = torch.random.get_rng_state()
    for build in BUILDERS.values():
        a, b, c = build(seed=1), build(seed=1), build(seed=2)
        for pa, pb in zip(a.model.parameters(), b.model.parameters()):
            assert torch.equal(pa, pb)
        assert any(not torch.equal(pa, pc) for pa, pc in zip(a.model.parameters(), c.model.parameters()))
        assert all(torch.equal(x, y) for x, y in zip(a.inputs, b.inputs)) and torch.equal(a.y, b.y)
    assert torch.equal(torch.random.get_rng_state(), state)


# -- first-order references against loops of torch.autograd.grad -------------------------------------------
@pytest.mark.parametrize("name", list(BUILDERS))
def test_per_sample_gradients_and_jacobians_match_autograd_loops(name, cases):
    case = cases[name]
    params = _params(case)
    G = ref.per_sample_grads_params(case.model, params, case.loss_fn, case.X, case.y)
    assert G.shape == (case.num_samples, sum(p.numel() for p in params))
    assert_close(G, _loop_grads(case))
    J = ref.per_sample_jacobians_params(case.model, params, case.X)
    assert_close(J, _loop_jacobians(case))


@pytest.mark.parametrize("name", list(BUILDERS))
def test_empirical_fisher_and_fisher_match_autograd_loops(name, cases):
    case = cases[name]
    params = _params(case)
    m, k = case.num_samples, _k(case)
    G = _loop_grads(case)
    EF = ref.dense_empirical_fisher_params(case.model, params, case.loss_fn, case.X, case.y)
    assert_close(EF, G.T @ G / (m * k))
    S = 2
    Yhat = _sampled_targets(case, S)
    expected = sum(Gs.T @ Gs for Gs in (_loop_grads(case, Yhat[:, s]) for s in range(S))) / (m * S * k)
    F = ref.dense_fisher_params(case.model, params, case.loss_fn, case.X, Yhat)
    assert_close(F, expected)
    for M in (EF, F):
        assert_symmetric(M)
        assert_psd(M)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_ggn_matches_loops_of_jacobians_and_output_hessians(name, cases):
    case = cases[name]
    GGN = ref.dense_ggn_params(case.model, _params(case), case.loss_fn, case.X, case.y)
    J, H = _loop_jacobians(case), _loop_output_hessians(case)
    expected = sum(J[b].T @ H[b] @ J[b] for b in range(case.num_samples)) / case.num_samples
    assert_close(GGN, expected)
    assert_symmetric(GGN)
    assert_psd(GGN)


# -- the Hessian ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_hessians() -> dict[str, tuple[ModelCase, torch.Tensor]]:
    out = {}
    for name, build in SMALL.items():
        case = build()
        out[name] = (case, ref.dense_hessian_params(case.model, _params(case), case.loss_fn, case.X, case.y))
    return out


@pytest.mark.parametrize("name", list(SMALL))
def test_hessian_matches_double_backpropagation_and_finite_differences(name, small_hessians):
    case, H = small_hessians[name]
    p = H.shape[0]
    assert_symmetric(H)
    g = torch.Generator().manual_seed(0)
    V = torch.randn(p, 3, generator=g, dtype=DT)
    for j in range(3):
        assert_close(H @ V[:, j], _hvp(case, V[:, j]), msg=f"H v_{j}")
    # central differences of the gradient (an independent route, accurate to ~1e-8)
    params = _params(case)
    theta = ref.flatten_params([q.detach().clone() for q in params])

    def gradient_at(t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for q, value in zip(params, ref.unflatten_params(t, params)):
                q.copy_(value)
        with sdpa_kernel([SDPBackend.MATH]):
            L = case.loss_fn(case.model(*case.inputs), case.y)
            return ref.flatten_params(torch.autograd.grad(L, params))

    # torch treats an embedding's padding row as a constant (zero gradient through the lookup);
    # central differences would see the lookup's dependence on it
    vs = ref.unflatten_params(V[:, 0].clone(), params)
    for mod in case.model.modules():
        if isinstance(mod, nn.Embedding) and mod.padding_idx is not None:
            vs[next(i for i, q in enumerate(params) if q is mod.weight)][mod.padding_idx] = 0.0
    eps, v = 1e-5, ref.flatten_params(vs)
    try:
        fd = (gradient_at(theta + eps * v) - gradient_at(theta - eps * v)) / (2 * eps)
    finally:
        gradient_at(theta)
    rel = float(torch.linalg.vector_norm(H @ v - fd) / torch.linalg.vector_norm(fd))
    assert rel < 1e-6, f"relative error of H v against central differences: {rel:.3e}"


def test_hessian_of_a_layer_norm_model_is_symmetric():
    """The case torch.func gets wrong under vmap (mixed weight × input second derivatives of
    F.layer_norm): the reference must still be symmetric and match double back-propagation."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)).to(DT)
    with torch.no_grad():
        for q in model.parameters():
            q.copy_(torch.randn(q.shape, generator=g, dtype=DT))
    case = ModelCase("ln", model, nn.CrossEntropyLoss(), torch.randn(5, 4, generator=g, dtype=DT), torch.randint(0, 3, (5,), generator=g), 0)
    H = ref.dense_hessian_params(model, _params(case), case.loss_fn, case.X, case.y)
    assert_symmetric(H)
    for j in range(H.shape[0]):
        e = torch.zeros(H.shape[0], dtype=DT)
        e[j] = 1.0
        assert_close(H[:, j], _hvp(case, e), msg=f"column {j}")


class _LinearInParameters(nn.Module):
    """f = lin(x) + lin2(tanh x), lin2.weight tied to lin.weight, + BatchNorm1d (eval) of x:
    linear in every parameter (BN's affine map in eval mode is linear in (weight, bias))."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.lin2 = nn.Linear(4, 4)
        self.lin2.weight = self.lin.weight
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.lin2(torch.tanh(x)) + self.bn(x)


class _SequenceLogits(nn.Module):
    """Conv1d logits ``[m, C, L]`` plus a learned per-position offset: linear in the parameters."""

    def __init__(self, C: int = 3, L: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, C, 3, padding=1)
        self.offset = nn.Parameter(torch.zeros(C, L))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.offset


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("which", ["mse", "sequence_ce"])
def test_ggn_equals_hessian_for_models_linear_in_their_parameters(which, reduction):
    g = torch.Generator().manual_seed(3)
    m = 4
    if which == "mse":
        model = _LinearInParameters().to(DT)
        X = torch.randn(m, 4, generator=g, dtype=DT)
        y = torch.randn(m, 4, generator=g, dtype=DT)
        loss_fn: nn.Module = nn.MSELoss(reduction=reduction)
    else:
        model = _SequenceLogits().to(DT)
        X = torch.randn(m, 2, 4, generator=g, dtype=DT)
        y = torch.randint(0, 3, (m, 4), generator=g)
        loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    with torch.no_grad():
        for q in model.parameters():
            q.copy_(torch.randn(q.shape, generator=g, dtype=DT))
        if which == "mse":
            model.bn.running_mean.normal_(generator=g)
            model.bn.running_var.uniform_(0.5, 2.0, generator=g)
    model.eval()
    params = list(model.parameters())
    GGN = ref.dense_ggn_params(model, params, loss_fn, X, y)
    H = ref.dense_hessian_params(model, params, loss_fn, X, y)
    assert_close(GGN, H)
    assert torch.linalg.matrix_norm(H) > 0.1


# -- expectations, reductions, parameter subsets -------------------------------------------------------------
@pytest.mark.parametrize("name", ["lm_small", "mixed"])
def test_ggn_is_the_exact_expectation_of_the_fisher(name):
    """Σ over every joint target ŷ of a sample (C^D of them), weighted by Π_pos p(ŷ_pos), of
    ∇ℓ_b(ŷ)∇ℓ_b(ŷ)ᵀ/k, averaged over the samples, equals the GGN (Thm 2.1)."""
    if name == "lm_small":
        case = tiny_transformer_lm(vocab=3, seq_len=2, d=4, nhead=2, dim_ff=4, num_layers=1, m=2)
    else:
        case = tiny_mixed_model(vocab=4, d=4, m=2)
    params = _params(case)
    out = case.output()
    m, C = out.shape[:2]
    d = tuple(out.shape[2:])
    P = out.reshape(m, C, -1).softmax(1)  # [m, C, D]
    k = _k(case)
    expected = 0
    for joint in itertools.product(range(C), repeat=P.shape[2]):
        t = torch.tensor(joint).reshape(d).expand(m, *d).clone()
        w = torch.stack([P[:, c, pos] for pos, c in enumerate(joint)]).prod(0)  # [m]
        G = ref.per_sample_grads_params(case.model, params, case.loss_fn, case.X, t)
        expected = expected + (G * w[:, None]).T @ G
    GGN = ref.dense_ggn_params(case.model, params, case.loss_fn, case.X, case.y)
    assert_close(GGN, expected / (m * k))


def test_sum_reduction_scales_every_matrix_by_the_number_of_positions():
    """Cross-entropy over D = T positions: ℓ_b("sum") = D ℓ_b("mean") and k("sum") = D k("mean"),
    so GGN, empirical Fisher and Hessian of "sum" are D × those of "mean"."""
    mean = tiny_transformer_lm(d=4, dim_ff=6, seq_len=4, vocab=5, reduction="mean")
    total = tiny_transformer_lm(d=4, dim_ff=6, seq_len=4, vocab=5, reduction="sum")
    D = mean.X.shape[1]
    for fn in (ref.dense_ggn_params, ref.dense_empirical_fisher_params, ref.dense_hessian_params):
        a = fn(mean.model, _params(mean), mean.loss_fn, mean.X, mean.y)
        b = fn(total.model, _params(total), total.loss_fn, total.X, total.y)
        assert_close(b, D * a, msg=fn.__name__)


@pytest.mark.parametrize("name", ["lm_batch_first", "mixed"])
def test_a_list_of_some_parameters_gives_the_matching_sub_block(name, cases):
    """The references over a reordered subset (including the tied weight) are the sub-blocks of
    the references over all parameters, rows and columns picked by parameter identity."""
    case = cases[name]
    allp = _params(case)
    offsets = dict()
    start = 0
    for q in allp:
        offsets[id(q)] = torch.arange(start, start + q.numel())
        start += q.numel()
    tied = case.model.head.weight
    norm = next(mod.weight for mod in case.model.modules() if isinstance(mod, nn.LayerNorm))
    sub = [norm, tied, allp[1]]
    idx = torch.cat([offsets[id(q)] for q in sub])
    Yhat = _sampled_targets(case, 2)
    pairs = [
        (ref.dense_ggn_params, case.y),
        (ref.dense_empirical_fisher_params, case.y),
        (ref.dense_fisher_params, Yhat),
    ]
    for fn, y in pairs:
        full = fn(case.model, allp, case.loss_fn, case.X, y)
        part = fn(case.model, sub, case.loss_fn, case.X, y)
        assert_close(part, full[idx][:, idx], msg=fn.__name__)


def test_hessian_of_a_parameter_subset_matches_double_backpropagation(cases):
    """Columns of the subset Hessian = the subset's entries of H·v, v zero off the subset."""
    case = cases["mixed"]
    params = _params(case)
    sub = [case.model.head.weight, case.model.rms.weight, case.model.gn.bias]
    where = [next(i for i, q in enumerate(params) if q is s) for s in sub]
    H = ref.dense_hessian_params(case.model, sub, case.loss_fn, case.X, case.y)
    for j in range(0, H.shape[0], 5):
        e = torch.zeros(H.shape[0], dtype=DT)
        e[j] = 1.0
        vs = [torch.zeros_like(q) for q in params]
        for i, part in zip(where, ref.unflatten_params(e, sub)):
            vs[i] = part
        hv = ref.unflatten_params(_hvp(case, ref.flatten_params(vs)), params)
        assert_close(H[:, j], ref.flatten_params([hv[i] for i in where]), msg=f"column {j}")


def test_references_reject_foreign_and_repeated_parameters(cases):
    case = cases["mixed"]
    params = _params(case)
    with pytest.raises(ValueError, match="is not a parameter of TinyMixedModel"):
        ref.dense_ggn_params(case.model, [nn.Parameter(torch.zeros(3, dtype=DT))], case.loss_fn, case.X, case.y)
    with pytest.raises(ValueError, match=r"params\[1\] is params\[0\] again"):
        ref.dense_ggn_params(case.model, [case.model.emb.weight, case.model.head.weight], case.loss_fn, case.X, case.y)
    with pytest.raises(ValueError, match="unflatten_params"):
        ref.unflatten_params(torch.zeros(3, dtype=DT), params)
