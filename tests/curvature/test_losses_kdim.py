"""K-dimensional cross-entropy (logits ``[m, C, *d]``, targets ``[m, *d]``) in the per-sample
convention of :mod:`curvlib.curvatures.losses`, against independent dense float64 references.

The references never call the loss model under test: ℓ_b is written out from its definition,
ℓ_b = k Σ_pos −log softmax(f_b[:, pos])[y_b[pos]] with k = 1/D ("mean", D = prod(d)) or 1
("sum"); its gradient and Hessian w.r.t. the flattened output come from ``torch.func``;
expectations over the model's predictive distribution are exact sums over every joint target.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.func import grad, hessian, vmap

from curvlib.curvatures.losses import CrossEntropyLossModel, loss_model_for
from curvlib.errors import CurvlibError, UnsupportedLossError
from curvlib.testing import assert_close
from curvlib.testing import references as ref

DT = torch.float64
SHAPES = [(), (3,), (2, 2)]  # d: D = 1, 3, 4 positions
REDUCTIONS = ["mean", "sum"]


def _case(d: tuple[int, ...], m: int = 3, C: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    f = 1.5 * torch.randn(m, C, *d, generator=g, dtype=DT)
    y = torch.randint(0, C, (m, *d), generator=g)
    return f, y


def _k(reduction: str, d: tuple[int, ...]) -> float:
    return 1.0 if reduction == "sum" else 1.0 / math.prod(d)


def _ell(f_b: torch.Tensor, y_b: torch.Tensor, k: float) -> torch.Tensor:
    """ℓ_b from its definition: f_b ``[C, *d]``, y_b ``[*d]`` (long) -> scalar."""
    C = f_b.shape[0]
    logp = torch.log_softmax(f_b.reshape(C, -1), dim=0)  # [C, D]
    onehot = (torch.arange(C)[:, None] == y_b.reshape(1, -1)).to(f_b.dtype)  # [C, D]
    return -k * (onehot * logp).sum()


def _output_hessians(f: torch.Tensor, y: torch.Tensor, k: float) -> torch.Tensor:
    """∇²_f ℓ_b w.r.t. the flattened output ``[m, c, c]``, c = C·D, by torch.func.hessian."""
    shape = f.shape[1:]
    return vmap(hessian(lambda fb, yb: _ell(fb.reshape(shape), yb, k)))(f.reshape(f.shape[0], -1), y)


def _gram(columns, b: int) -> torch.Tensor:
    """Σ_n r_n[b] r_n[b]ᵀ over the columns, flattened ``[c, c]``."""
    R = torch.stack([columns.get(n)[b].reshape(-1) for n in range(columns.count)])
    return R.T @ R


# -- shapes, dtype and range ----------------------------------------------------------------------
@pytest.mark.parametrize("d", SHAPES)
def test_check_accepts_logits_with_positions_and_matching_targets(d):
    f, y = _case(d)
    lm = loss_model_for(nn.CrossEntropyLoss())
    assert isinstance(lm, CrossEntropyLossModel)
    lm.check(f, y)  # no error
    lm.check(f, torch.zeros_like(y, dtype=torch.int32))  # any integer dtype


@pytest.mark.parametrize(
    "f_shape, y_shape, y_dtype, match",
    [
        ((3, 4, 5), (3,), torch.long, r"expected integer class-index targets \[3, 5\]"),
        ((3, 4, 5), (3, 6), torch.long, r"expected integer class-index targets \[3, 5\]"),
        ((3, 4, 5), (3, 5, 1), torch.long, r"expected integer class-index targets \[3, 5\]"),
        ((3, 4), (3, 4), torch.long, r"expected integer class-index targets \[3\]"),
        ((3, 4, 5), (3, 5), DT, r"probability targets are not supported"),
        ((3, 4, 5), (3, 4, 5), DT, r"probability targets are not supported"),
        ((4,), (4,), torch.long, r"expected logits \[m, C\] or \[m, C, \*d\]"),
    ],
)
def test_check_rejects_mismatched_targets(f_shape, y_shape, y_dtype, match):
    f = torch.zeros(f_shape, dtype=DT)
    y = torch.zeros(y_shape, dtype=y_dtype)
    with pytest.raises(UnsupportedLossError, match=match) as info:
        loss_model_for(nn.CrossEntropyLoss()).check(f, y)
    assert isinstance(info.value, CurvlibError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("bad", [4, -1, -100])
def test_check_rejects_targets_out_of_range_and_ignore_index(bad):
    f, y = _case((2, 3), C=4)
    y[1, 0, 2] = bad
    with pytest.raises(UnsupportedLossError, match=r"expected targets in \[0, 4\).*ignore_index=-100"):
        loss_model_for(nn.CrossEntropyLoss()).check(f, y)


@pytest.mark.parametrize(
    "loss_fn",
    [
        nn.CrossEntropyLoss(weight=torch.ones(3, dtype=DT)),
        nn.CrossEntropyLoss(label_smoothing=0.1),
        nn.CrossEntropyLoss(reduction="none"),
    ],
)
def test_options_breaking_the_convention_are_still_rejected(loss_fn):
    with pytest.raises(UnsupportedLossError):
        loss_model_for(loss_fn)


# -- k and the per-sample losses --------------------------------------------------------------------
@pytest.mark.parametrize("d", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_k_and_the_mean_loss_follow_the_per_sample_convention(d, reduction):
    f, y = _case(d)
    m = f.shape[0]
    lm = loss_model_for(nn.CrossEntropyLoss(reduction=reduction))
    k = _k(reduction, d)
    assert lm.k(f) == k
    assert ref.k_factor(lm.loss_fn, tuple(f.shape[1:])) == k
    expected = sum(_ell(f[b], y[b], k) for b in range(m)) / m  # (1/m) Σ_b ℓ_b
    assert_close(lm.mean_loss(f, y), expected)
    # ... and the user's loss: (1/m) Σ ℓ_b for "mean", Σ ℓ_b for "sum"
    assert_close(lm.loss_fn(f, y), expected if reduction == "mean" else m * expected)


def test_k_factor_reference_for_cross_entropy_and_the_other_losses():
    mean, total = nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum")
    assert ref.k_factor(mean, (7, 5)) == 1 / 5
    assert ref.k_factor(mean, (7, 2, 3)) == 1 / 6
    assert ref.k_factor(mean, (7,)) == 1.0
    assert ref.k_factor(mean, 7) == 1.0  # an int: one position
    assert ref.k_factor(total, (7, 5)) == 1.0
    assert ref.k_factor(nn.MSELoss(), (2, 3)) == 2 / 6 and ref.k_factor(nn.MSELoss(), 6) == 2 / 6
    assert ref.k_factor(nn.BCEWithLogitsLoss(), (2, 3)) == 1 / 6
    assert ref.k_factor(nn.MSELoss(reduction="sum"), (2, 3)) == 2.0


@pytest.mark.parametrize("d", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_per_sample_gradients_are_the_gradients_of_ell_b(d, reduction):
    f, y = _case(d)
    m = f.shape[0]
    lm = loss_model_for(nn.CrossEntropyLoss(reduction=reduction))
    k = _k(reduction, d)
    expected = vmap(grad(lambda fb, yb: _ell(fb, yb, k)))(f, y)  # [m, C, *d]
    got = lm.per_sample_gradients(f, y)
    assert got.shape == f.shape
    assert_close(got, expected)
    # closed form k (p − onehot(y)) at every position
    p = torch.softmax(f, dim=1)
    onehot = nn.functional.one_hot(y, f.shape[1]).movedim(-1, 1).to(DT)
    assert_close(got, k * (p - onehot))
    if reduction == "mean":  # m × the gradient of the batch loss L
        fr = f.clone().requires_grad_(True)
        (gL,) = torch.autograd.grad(lm.loss_fn(fr, y), fr)
        assert_close(got, m * gL)


# -- GGN columns -----------------------------------------------------------------------------------
@pytest.mark.parametrize("d", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ggn_columns_are_a_square_root_of_the_output_hessian(d, reduction):
    f, y = _case(d)
    m, C, D = f.shape[0], f.shape[1], math.prod(d)
    lm = loss_model_for(nn.CrossEntropyLoss(reduction=reduction))
    cols = lm.ggn_columns(f)
    assert cols.count == C * D
    H = _output_hessians(f, y, _k(reduction, d))  # [m, c, c]
    H_loss = ref.per_sample_output_hessians(lm.loss_fn, f, y)  # loss_fn on one-sample batches
    assert_close(H_loss, H)
    for b in range(m):
        assert_close(_gram(cols, b), H[b], msg=f"sample {b}")


@pytest.mark.parametrize("d", [(3,), (2, 2)])
def test_ggn_column_n_lives_at_its_own_position(d):
    f, _ = _case(d)
    m, C, D = f.shape[0], f.shape[1], math.prod(d)
    k = 1.0 / D
    cols = loss_model_for(nn.CrossEntropyLoss()).ggn_columns(f)
    p = torch.softmax(f.reshape(m, C, D), dim=1)
    for n in range(cols.count):
        j, pos = divmod(n, D)  # column n = j·D + pos: the flattened output's order
        r = cols.get(n)
        assert r.shape == f.shape and r.dtype == DT
        r = r.reshape(m, C, D)
        others = [q for q in range(D) if q != pos]
        assert torch.count_nonzero(r[:, :, others]) == 0
        e_j = torch.zeros(C, dtype=DT)
        e_j[j] = 1.0
        expected = math.sqrt(k) * p[:, j, pos].sqrt()[:, None] * (e_j - p[:, :, pos])
        assert_close(r[:, :, pos], expected, msg=f"column {n}")


def test_ggn_columns_without_positions_are_unchanged():
    """D = 1: the columns √p_j (e_j − p) of logits ``[m, C]`` (k = 1 for both reductions)."""
    f, _ = _case(())
    p = torch.softmax(f, dim=1)
    for reduction in REDUCTIONS:
        cols = loss_model_for(nn.CrossEntropyLoss(reduction=reduction)).ggn_columns(f)
        assert cols.count == f.shape[1]
        for j in range(f.shape[1]):
            e_j = torch.eye(f.shape[1], dtype=DT)[j]
            assert torch.equal(cols.get(j), p[:, j : j + 1].sqrt() * (e_j - p))


# -- Fisher columns ------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradient_columns_are_gradients_over_root_k(d, reduction):
    f, y = _case(d)
    k = _k(reduction, d)
    lm = loss_model_for(nn.CrossEntropyLoss(reduction=reduction))
    _, y2 = _case(d, seed=1)
    cols = lm.gradient_columns(f, [y, y2])
    assert cols.count == 2
    for j, t in enumerate([y, y2]):
        expected = vmap(grad(lambda fb, yb: _ell(fb, yb, k)))(f, t) / math.sqrt(k)
        assert_close(cols.get(j), expected)


@pytest.mark.parametrize("d", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fisher_columns_equal_the_ggn_in_exact_expectation(d, reduction):
    """E_{ŷ ~ p(·|f)}[r(ŷ) r(ŷ)ᵀ] = Σ_n r_n r_nᵀ, the expectation summed over every joint target
    ŷ ∈ [C]^D of a sample, weighted by Π_pos p(ŷ_pos | f[:, pos]) (positions independent)."""
    f, _ = _case(d, m=2, C=3)
    m, C, D = f.shape[0], f.shape[1], math.prod(d)
    lm = loss_model_for(nn.CrossEntropyLoss(reduction=reduction))
    p = torch.softmax(f.reshape(m, C, D), dim=1)
    expected = torch.zeros(m, C * D, C * D, dtype=DT)
    total = torch.zeros(m, dtype=DT)
    for joint in itertools.product(range(C), repeat=D):
        t = torch.tensor(joint).reshape(d).expand(m, *d).clone()
        w = torch.stack([p[:, c, pos] for pos, c in enumerate(joint)]).prod(0)  # [m]
        r = lm.gradient_columns(f, [t]).get(0).reshape(m, -1)
        expected += w[:, None, None] * r[:, :, None] * r[:, None, :]
        total += w
    assert_close(total, torch.ones(m, dtype=DT))
    cols = lm.ggn_columns(f)
    for b in range(m):
        assert_close(_gram(cols, b), expected[b], msg=f"sample {b}")


# -- Monte Carlo targets ---------------------------------------------------------------------------
@pytest.mark.parametrize("d", SHAPES)
def test_sample_targets_shape_dtype_device_and_generator(d):
    f, _ = _case(d)
    m, S = f.shape[0], 4
    lm = loss_model_for(nn.CrossEntropyLoss())
    draws = lm.sample_targets(f, S, torch.Generator().manual_seed(3))
    assert draws.shape == (m, S, *d)
    assert draws.dtype == torch.long and draws.device == f.device
    assert int(draws.min()) >= 0 and int(draws.max()) < f.shape[1]
    lm.check(f, lm.target_column(draws, 0))  # every draw is a valid target [m, *d]
    for s in range(S):
        assert torch.equal(lm.target_column(draws, s), draws[:, s])
        assert lm.target_column(draws, s).shape == (m, *d)
    again = lm.sample_targets(f, S, torch.Generator().manual_seed(3))
    other = lm.sample_targets(f, S, torch.Generator().manual_seed(4))
    assert torch.equal(draws, again)
    assert not torch.equal(draws, other)


@pytest.mark.parametrize("loss_fn", [nn.BCEWithLogitsLoss(), nn.BCELoss()])
def test_bernoulli_draws_at_non_finite_outputs_are_fair_coins(loss_fn):
    """A NaN (or, for probabilities, ±inf) output entry is drawn as Bernoulli(1/2), the others
    as given: the same draws, from the same generator, as from the output with those entries
    replaced by the fair coin's (logit 0, probability 1/2)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g, dtype=DT)
    out = logits if isinstance(loss_fn, nn.BCEWithLogitsLoss) else torch.sigmoid(logits)
    fair = 0.0 if isinstance(loss_fn, nn.BCEWithLogitsLoss) else 0.5
    bad = out.clone()
    bad[0, 1], bad[2, 3] = float("nan"), float("nan")
    if isinstance(loss_fn, nn.BCELoss):
        bad[4, 0], bad[5, 4] = float("inf"), -float("inf")
    clean = torch.where(torch.isfinite(bad), bad, torch.full_like(bad, fair))
    lm = loss_model_for(loss_fn)
    draws = lm.sample_targets(bad, 3, torch.Generator().manual_seed(1))
    assert torch.isfinite(draws).all()
    assert torch.equal(draws, lm.sample_targets(clean, 3, torch.Generator().manual_seed(1)))


def test_sample_targets_without_positions_are_unchanged():
    """D = 1: the same draws as ``torch.multinomial(softmax(f), S)`` from the same generator."""
    f, _ = _case(())
    draws = loss_model_for(nn.CrossEntropyLoss()).sample_targets(f, 5, torch.Generator().manual_seed(7))
    expected = torch.multinomial(torch.softmax(f, dim=1), 5, replacement=True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(draws, expected)


def test_sample_targets_follow_the_softmax_independently_at_every_position():
    """Empirical frequencies of S draws within 5 standard errors of p at every (sample,
    position, class), and of the pairs of positions 0 and 1 within 5 standard errors of the
    product p_0 p_1 (independent positions)."""
    S = 20000
    f, _ = _case((2, 2), m=2, C=3, seed=5)
    m, C = f.shape[:2]
    draws = loss_model_for(nn.CrossEntropyLoss()).sample_targets(f, S, torch.Generator().manual_seed(11))
    p = torch.softmax(f, dim=1)  # [m, C, 2, 2]
    freq = nn.functional.one_hot(draws, C).to(DT).mean(1).movedim(-1, 1)  # [m, C, 2, 2]
    se = (p * (1 - p) / S).sqrt()
    assert bool(((freq - p).abs() <= 5 * se).all()), f"max |freq − p| / se = {((freq - p).abs() / se).max():.2f}"
    a, b = draws[:, :, 0, 0], draws[:, :, 0, 1]  # positions (0, 0) and (0, 1)
    joint = nn.functional.one_hot(a * C + b, C * C).to(DT).mean(1).reshape(m, C, C)
    pp = p[:, :, 0, 0, None] * p[:, None, :, 0, 1]
    se = (pp * (1 - pp) / S).sqrt()
    assert bool(((joint - pp).abs() <= 5 * se).all()), f"max |joint − p p| / se = {((joint - pp).abs() / se).max():.2f}"


# -- through curvlib.curvature: networks with logits [m, C, *d] ------------------------------------
def _positions_case(arch: str, reduction: str, m: int = 4, C: int = 3, seed: int = 0):
    """``"sequence"``: an MLP whose output is reshaped to logits ``[m, C, 3]``, targets ``[m, 3]``;
    ``"segmentation"``: two Conv2d layers giving per-pixel logits ``[m, C, 3, 3]``, targets
    ``[m, 3, 3]``."""
    g = torch.Generator().manual_seed(seed)
    if arch == "sequence":
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C * 3), nn.Unflatten(1, (C, 3)))
        X = torch.randn(m, 4, generator=g, dtype=DT)
        d: tuple[int, ...] = (3,)
    else:
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, C, 2, stride=2))
        X = torch.randn(m, 2, 6, 6, generator=g, dtype=DT)
        d = (3, 3)
    model = model.to(DT)
    with torch.no_grad():
        for q in model.parameters():
            q.copy_(torch.randn(q.shape, generator=g, dtype=DT) / math.sqrt(q[0].numel() if q.ndim > 1 else q.numel()))
    y = torch.randint(0, C, (m, *d), generator=g)
    return model, nn.CrossEntropyLoss(reduction=reduction), X, y


@pytest.mark.parametrize("kind", ["ggn", "fisher", "empirical_fisher", "hessian"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("arch", ["sequence", "segmentation"])
def test_curvature_of_a_network_with_logits_at_positions(arch, kind, reduction):
    import curvlib

    model, loss_fn, X, y = _positions_case(arch, reduction)
    options = {"mc_samples": 3} if kind == "fisher" else {}
    F = curvlib.curvature(kind, model, loss_fn, batch=(X, y), generator=torch.Generator().manual_seed(0), **options)
    params = F.params()
    if kind == "ggn":
        dense = ref.dense_ggn_params(model, params, loss_fn, X, y)
    elif kind == "fisher":
        assert F.sampled_targets.shape == (X.shape[0], 3, *y.shape[1:])
        dense = ref.dense_fisher_params(model, params, loss_fn, X, F.sampled_targets)
    elif kind == "empirical_fisher":
        dense = ref.dense_empirical_fisher_params(model, params, loss_fn, X, y)
    else:
        dense = ref.dense_hessian_params(model, params, loss_fn, X, y)
    g = torch.Generator().manual_seed(1)
    v = [torch.randn(q.shape, generator=g, dtype=DT) for q in params]
    out = F @ v
    assert [o.shape for o in out] == [q.shape for q in params]
    assert_close(ref.flatten_params(out), dense @ ref.flatten_params(v))
