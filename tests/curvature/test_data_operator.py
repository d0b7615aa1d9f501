"""Curvature over a data set (``curvlib.curvature(..., data=...)``) and dict batches (``batch_fn``).

The data operator must equal the operator of one big batch holding all the data,
(1/N) Σ_β m_β C_β = (1/N) Σ_b C_b, for batches of unequal sizes; the big-batch operators
are themselves checked against torch.func references in test_operator.py, and here the
data operator's dense matrix is also compared with those references directly (float64).
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import curvature_reference as ref
import curvlib
from curvlib.curvatures.api import curvature
from curvlib.curvatures.data import DataCurvatureOperator, kfac_factors_over
from curvlib.curvatures.factors import kfac_factors
from curvlib.curvatures.operator import NoStatisticsError
from curvlib.errors import ConfigError, PerformanceWarning, ShapeError
from curvlib.plugins import load_registry
from curvlib.testing import assert_close
from curvlib.testing import references as dense_ref
from curvlib.testing.references import dense_kfac_factors

DT = torch.float64
SIZES = (5, 3, 4)  # unequal batches, N = 12
TOL = 1e-12


@pytest.fixture(scope="module")
def registry():
    return load_registry(external=False)


def close(actual, expected, msg=""):
    """|actual − expected| ≤ 1e-12·(max|expected| + |expected|)."""
    scale = max(float(expected.abs().max()), 1e-300)
    assert_close(actual, expected, rtol=TOL, atol=TOL * scale, msg=msg)


def dense(op):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PerformanceWarning)
        return op.to_dense()


def split(X, y, sizes=SIZES):
    """The list of batches (X_β, y_β) of the given sizes."""
    out, start = [], 0
    for m in sizes:
        out.append((X[start : start + m], y[start : start + m]))
        start += m
    assert start == X.shape[0]
    return out


def case(name, registry, kind, **options):
    model, loss_fn, X, y, link = ref.make_case(name, m=sum(SIZES))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        big = curvature(kind, model, loss_fn, (X, y), registry=registry, **options)
        F = curvature(kind, model, loss_fn, data=split(X, y), registry=registry, **options)
    return F, big, model, loss_fn, X, y, link


CASES = ["mlp-ce-mean", "mlp-mse-sum", "cnn-ce-mean", "skip-mse-sum", "convae-bcelogits-sum"]


# -- the data operator equals the big batch ------------------------------------------------------
@pytest.mark.parametrize("kind", ["ggn", "empirical_fisher", "hessian"])
@pytest.mark.parametrize("name", CASES)
def test_products_equal_one_big_batch(kind, name, registry):
    F, big, *_ = case(name, registry, kind)
    assert isinstance(F, DataCurvatureOperator) and isinstance(F, curvlib.linalg.LinearOperator)
    assert F.num_samples == big.num_samples == sum(SIZES) and F.kind == big.kind == kind
    assert F.shape == big.shape and F.p == big.p and F.dtype == big.dtype and F.device == big.device
    assert [L.name for L in F.layers] == [L.name for L in big.layers] and F.excluded == big.excluded
    assert all(a is b for a, b in zip(F.params(), big.params())) and F.layout.shapes == big.layout.shapes
    assert F.symmetric and F.T is F
    g = torch.Generator().manual_seed(1)
    V = torch.randn(F.p, 3, generator=g, dtype=DT)
    close(F @ V, big @ V, f"{kind} {name}: F @ V [p, 3]")
    close(F @ V[:, 0], big @ V[:, 0], f"{kind} {name}: F @ v [p]")
    close(F.matmat(V), big.matmat(V), f"{kind} {name}: F.matmat(V)")
    vs = F.vector_to_params(V[:, 1])
    out = F @ vs
    assert isinstance(out, list) and [t.shape for t in out] == [q.shape for q in F.params()]
    close(F.params_to_vector(out), big @ V[:, 1], f"{kind} {name}: F @ [tensors]")
    close(F.gradient_vector(), big.gradient_vector(), f"{kind} {name}: gradient_vector")
    loss, grad = F.loss_and_gradient()
    close(loss, big.loss, f"{kind} {name}: loss")


@pytest.mark.parametrize("kind", ["ggn", "empirical_fisher", "hessian"])
def test_dense_blocks_and_scipy_equal_one_big_batch(kind, registry):
    F, big, *_ = case("mlp-ce-sum", registry, kind)
    D = dense(F)
    close(D, dense(big), f"{kind}: to_dense")
    for i, Li in enumerate(F.layers):
        for j, Lj in enumerate(F.layers):
            B = F.block(i, j)
            assert B.shape == (Li.p_i, Lj.p_i)
            close(dense(B), D[Li.slice, Lj.slice], f"{kind}: block({i}, {j}).to_dense()")
            v = torch.randn(Lj.p_i, dtype=DT)
            close(B @ v, big.block(i, j) @ v, f"{kind}: block({i}, {j}) @ v")
    x = np.random.default_rng(0).standard_normal((F.p, 2))
    close(torch.as_tensor(F.to_scipy() @ x), torch.as_tensor(big.to_scipy() @ x), f"{kind}: to_scipy")


@pytest.mark.parametrize("kind", ["ggn", "empirical_fisher", "hessian"])
def test_dense_matrix_equals_the_torch_func_reference(kind, registry):
    F, big, model, loss_fn, X, y, link = case("mlp-mse-mean", registry, kind)
    if kind == "ggn":
        expected = dense_ref.dense_ggn(model, F, loss_fn, X, y)
    elif kind == "empirical_fisher":
        expected = dense_ref.dense_empirical_fisher(model, F, loss_fn, X, y)
    else:
        expected = dense_ref.dense_hessian(model, F, loss_fn, X, y)
    assert_close(dense(F), expected, msg=f"{kind}: data operator vs torch.func over all {X.shape[0]} samples")


def test_a_dataloader_equals_one_big_batch(registry):
    model, loss_fn, X, y, _ = ref.make_case("cnn-ce-mean", m=12)
    loader = DataLoader(TensorDataset(X, y), batch_size=5)  # batches of 5, 5, 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        F = curvature("ggn", model, loss_fn, data=loader, registry=registry)
        big = curvature("ggn", model, loss_fn, (X, y), registry=registry)
    V = torch.randn(F.p, 2, dtype=DT)
    close(F @ V, big @ V, "DataLoader")
    assert F.num_samples == 12


def test_num_data_saves_the_counting_pass(registry):
    model, loss_fn, X, y, _ = ref.make_case("mlp-ce-mean", m=12)

    class Counting:
        def __init__(self, batches):
            self.batches, self.loaded = batches, 0

        def __iter__(self):
            for b in self.batches:
                self.loaded += 1
                yield b

    data = Counting(split(X, y))
    F = curvature("ggn", model, loss_fn, data=data, num_data=12, registry=registry)
    assert data.loaded == 1 and F.num_samples == 12  # only the first batch, captured for the layers
    big = curvature("ggn", model, loss_fn, (X, y), registry=registry)
    v = torch.randn(F.p, dtype=DT)
    close(F @ v, big @ v, "num_data given")
    data = Counting(split(X, y))
    curvature("ggn", model, loss_fn, data=data, registry=registry)
    assert data.loaded == 3  # counting pass


# -- Monte Carlo fisher ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp-ce-mean", "mlp-bcelogits-sum", "mlp-mse-mean"])
def test_fisher_over_data_is_deterministic_and_weights_each_batch(name, registry):
    S = 2
    model, loss_fn, X, y, _ = ref.make_case(name, m=12)
    batches = split(X, y)
    g = torch.Generator().manual_seed(5)
    F = curvature("fisher", model, loss_fn, data=batches, mc_samples=S, generator=g, registry=registry)
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(5).get_state())  # the user's generator is not advanced
    V = torch.randn(F.p, 3, dtype=DT)
    first = F @ V
    assert torch.equal(F @ V, first)  # same targets at every pass
    assert torch.equal((F @ V[:, :1])[:, 0], F @ V[:, 0])
    # reference: the batch operators built in order on a generator in the same state
    g2 = torch.Generator().manual_seed(5)
    expected_v, expected_dense = 0, 0
    for Xb, yb in batches:
        op = curvature("fisher", model, loss_fn, (Xb, yb), mc_samples=S, generator=g2, registry=registry)
        w = Xb.shape[0] / X.shape[0]
        expected_v = expected_v + w * (op @ V)
        expected_dense = expected_dense + w * dense_ref.dense_fisher(model, op, loss_fn, Xb, op.sampled_targets)
    close(first, expected_v, f"{name}: fisher over data vs weighted batch operators")
    assert_close(dense(F), expected_dense, msg=f"{name}: fisher over data vs torch.func at the drawn targets")


def test_fisher_over_one_batch_equals_the_batch_operator(registry):
    model, loss_fn, X, y, _ = ref.make_case("mlp-ce-sum", m=12)
    F = curvature("fisher", model, loss_fn, data=[(X, y)], generator=torch.Generator().manual_seed(3), registry=registry)
    big = curvature("fisher", model, loss_fn, (X, y), generator=torch.Generator().manual_seed(3), registry=registry)
    v = torch.randn(F.p, dtype=DT)
    close(F @ v, big @ v, "fisher, one batch")


# -- KFAC factors over the data ---------------------------------------------------------------------
def _compare_factors(over, expected, what):
    assert len(over) == len(expected)
    for i, (terms, exp) in enumerate(zip(over, expected)):
        assert len(terms) == len(exp)
        for (A, G), (A0, G0) in zip(terms, exp):
            close(A, A0.to(A.dtype), f"{what}: A of layer {i}")
            close(G, G0.to(G.dtype), f"{what}: G of layer {i}")


@pytest.mark.parametrize("kind", ["ggn", "empirical_fisher"])
@pytest.mark.parametrize("name", ["mlp-ce-mean", "cnn-ce-mean", "convae-mse-mean", "skip-mse-sum"])
def test_kfac_factors_over_data_equal_the_big_batch(kind, name, registry):
    F, big, *_ = case(name, registry, kind)
    over = kfac_factors_over(F, "expand")
    _compare_factors(over, [kfac_factors(big.statistics(i), "expand") for i in range(len(big.layers))], f"{kind} {name}")
    _compare_factors(over, [dense_kfac_factors(big.statistics(i), "expand") for i in range(len(big.layers))],
                     f"{kind} {name} (explicit sums)")
    _compare_factors(kfac_factors_over(big), over, f"{kind} {name}: kfac_factors_over(one batch)")


class MaskedTokens(nn.Module):
    """forward(x, mask): a Linear layer on tokens (weight shared over T positions), a masked mean."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x, mask):
        h = torch.tanh(self.inp(x)) * mask[..., None]
        return self.out(h.sum(1) / mask.sum(1, keepdim=True))


class DictData(Dataset):
    def __init__(self, x, mask, y):
        self.x, self.mask, self.y = x, mask, y

    def __len__(self):
        return self.x.shape[0]

    def __getitem__(self, b):
        return {"x": self.x[b], "mask": self.mask[b], "y": self.y[b]}


def masked_case(N=12, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MaskedTokens().to(DT)
    x = torch.randn(N, T, 4, generator=g, dtype=DT)
    mask = (torch.rand(N, T, generator=g) > 0.3).to(DT)
    mask[:, 0] = 1.0
    y = torch.randint(0, 3, (N,), generator=g)
    return model, x, mask, y


def batch_fn(b):
    return {"x": b["x"], "mask": b["mask"]}, b["y"]


@pytest.mark.parametrize("setting", ["expand", "reduce"])
def test_kfac_factors_over_data_on_tokens(setting, registry):
    model, x, mask, y = masked_case()
    loss_fn = nn.CrossEntropyLoss()
    big = curvature("ggn", model, loss_fn, ((x, mask), y), registry=registry)
    assert big.statistics(0).T == x.shape[1]  # the token Linear has positions
    loader = DataLoader(DictData(x, mask, y), batch_size=5)
    F = curvature("ggn", model, loss_fn, data=loader, batch_fn=batch_fn, registry=registry)
    over = kfac_factors_over(F, setting)
    _compare_factors(over, [kfac_factors(big.statistics(i), setting) for i in range(2)], setting)
    _compare_factors(over, [dense_kfac_factors(big.statistics(i), setting) for i in range(2)], f"{setting} (explicit sums)")


def test_kfac_factors_over_a_fisher_with_several_samples(registry):
    model, loss_fn, X, y, _ = ref.make_case("mlp-ce-mean", m=12)
    batches = split(X, y)
    F = curvature("fisher", model, loss_fn, data=batches, mc_samples=3, generator=torch.Generator().manual_seed(2),
                  registry=registry)
    over = kfac_factors_over(F)
    g2 = torch.Generator().manual_seed(2)
    expected = None
    for Xb, yb in batches:
        op = curvature("fisher", model, loss_fn, (Xb, yb), mc_samples=3, generator=g2, registry=registry)
        w = Xb.shape[0] / 12
        terms = [[(w * A, w * G) for A, G in dense_kfac_factors(op.statistics(i))] for i in range(len(op.layers))]
        expected = terms if expected is None else [
            [(A0 + A, G0 + G) for (A0, G0), (A, G) in zip(e, t)] for e, t in zip(expected, terms)
        ]
    _compare_factors(over, expected, "fisher, S = 3")


@pytest.mark.parametrize("name", ["mlp-ce-mean", "cnn-ce-mean"])
def test_approximate_kfac_over_data_equals_one_big_batch(name, registry):
    F, big, *_ = case(name, registry, "ggn")
    over = curvlib.approximate(F, "kfac", registry=registry)
    one = curvlib.approximate(big, "kfac", registry=registry)
    for i in one.layer_indices:
        for (A, G), (A1, G1) in zip(over[i].terms, one[i].terms):
            close(A, A1, f"layer {i} A")
            close(G, G1, f"layer {i} G")
    again = curvlib.approximate(F, {"kind": "kfac", "ema": 0.5}, previous=over, registry=registry)
    assert again[0].refresh == 2  # the EMA continues across data-set fits
    close(again[0].terms[0][0], over[0].terms[0][0], "same data: the EMA of equal factors")


def test_statistics_and_approximate_point_to_kfac_factors_over(registry):
    F, *_ = case("mlp-ce-mean", registry, "ggn")
    with pytest.raises(NoStatisticsError, match="kfac_factors_over"):
        F.statistics(0)
    with pytest.raises(ConfigError, match="'kpsvd' needs the per-sample statistics"):
        curvlib.approximate(F, "kpsvd", registry=registry)
    H, *_ = case("mlp-ce-mean", registry, "hessian")
    with pytest.raises(NoStatisticsError):
        kfac_factors_over(H)
    with pytest.raises(ConfigError, match="weight_sharing"):
        kfac_factors_over(F, "sideways")


# -- dict batches and batch_fn ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ggn", "empirical_fisher", "fisher", "hessian"])
def test_dict_batches_through_batch_fn(kind, registry):
    model, x, mask, y = masked_case()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")

    def gen():
        return torch.Generator().manual_seed(11)

    positional = curvature(kind, model, loss_fn, ((x, mask), y), generator=gen(), registry=registry)
    keyword = curvature(kind, model, loss_fn, ({"x": x, "mask": mask}, y), generator=gen(), registry=registry)
    mapped = curvature(kind, model, loss_fn, {"x": x, "mask": mask, "y": y}, batch_fn=batch_fn, generator=gen(),
                       registry=registry)
    V = torch.randn(positional.p, 2, dtype=DT)
    expected = positional @ V
    close(keyword @ V, expected, f"{kind}: model(**X)")
    close(mapped @ V, expected, f"{kind}: batch_fn, one batch")
    assert keyword.num_samples == mapped.num_samples == x.shape[0]
    loader = DataLoader(DictData(x, mask, y), batch_size=5)
    F = curvature(kind, model, loss_fn, data=loader, batch_fn=batch_fn, generator=gen(), registry=registry)
    assert F.num_samples == x.shape[0]
    close(F.gradient_vector(), positional.gradient_vector(), f"{kind}: gradient over dict batches")
    if kind != "fisher":  # the fisher draws per batch differ from one big batch's
        close(F @ V, expected, f"{kind}: DataLoader of dict batches")
    else:
        assert torch.equal(F @ V, F @ V)


def test_batch_fn_must_return_a_pair(registry):
    model, x, mask, y = masked_case()
    b = {"x": x, "mask": mask, "y": y}
    with pytest.raises(ShapeError, match="batch_fn"):
        curvature("ggn", model, nn.CrossEntropyLoss(), b, batch_fn=lambda b: b["x"], registry=registry)
    with pytest.raises(ShapeError, match="batch_fn"):  # a dict batch without batch_fn: the message says what to do
        curvature("ggn", model, nn.CrossEntropyLoss(), b, registry=registry)
    with pytest.raises(ShapeError, match="batch_fn"):
        curvature("ggn", model, nn.CrossEntropyLoss(), data=[b], registry=registry)
    with pytest.raises(ConfigError, match="batch_fn"):
        curvature("ggn", model, nn.CrossEntropyLoss(), b, batch_fn="x", registry=registry)
    with pytest.raises(ShapeError, match="string keys"):
        curvature("ggn", model, nn.CrossEntropyLoss(), ({0: x, 1: mask}, y), registry=registry)


# -- progress ---------------------------------------------------------------------------------------
def test_progress_bar_changes_nothing(registry):
    model, loss_fn, X, y, _ = ref.make_case("mlp-ce-mean", m=12)
    F = curvature("ggn", model, loss_fn, data=split(X, y), progress=True, registry=registry)
    big = curvature("ggn", model, loss_fn, (X, y), registry=registry)
    v = torch.randn(F.p, dtype=DT)
    close(F @ v, big @ v, "progress=True")


def test_progress_without_tqdm_or_rich_warns_once(registry, monkeypatch):
    for mod in ("tqdm", "tqdm.auto", "rich", "rich.progress"):
        monkeypatch.setitem(sys.modules, mod, None)  # import raises ImportError
    model, loss_fn, X, y, _ = ref.make_case("mlp-ce-mean", m=12)
    with pytest.warns(UserWarning, match="tqdm or rich"):
        F = curvature("ggn", model, loss_fn, data=split(X, y), progress=True, registry=registry)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F @ torch.randn(F.p, dtype=DT)


# -- errors -----------------------------------------------------------------------------------------
def test_exactly_one_of_batch_and_data(registry):
    model, loss_fn, X, y, _ = ref.make_case("mlp-ce-mean", m=12)
    with pytest.raises(ConfigError, match="both"):
        curvature("ggn", model, loss_fn, (X, y), data=split(X, y), registry=registry)
    with pytest.raises(ConfigError, match="neither"):
        curvature("ggn", model, loss_fn, registry=registry)
    with pytest.raises(ConfigError, match="num_data"):
        curvature("ggn", model, loss_fn, (X, y), num_data=12, registry=registry)
    with pytest.raises(ConfigError, match="progress"):
        curvature("ggn", model, loss_fn, (X, y), progress=True, registry=registry)


def test_bad_data(registry):
    model, loss_fn, X, y, _ = ref.make_case("mlp-ce-mean", m=12)
    with pytest.raises(ShapeError, match="at least one batch"):
        curvature("ggn", model, loss_fn, data=[], registry=registry)
    with pytest.raises(ShapeError, match="at least one batch"):
        curvature("ggn", model, loss_fn, data=[], num_data=3, registry=registry)
    with pytest.raises(ConfigError, match="one-shot iterator"):
        curvature("ggn", model, loss_fn, data=iter(split(X, y)), registry=registry)
    with pytest.raises(ConfigError, match="batch="):
        curvature("ggn", model, loss_fn, data=(X, y), registry=registry)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="num_data"):
            curvature("ggn", model, loss_fn, data=split(X, y), num_data=bad, registry=registry)
    with pytest.raises(ShapeError, match="at least one sample"):
        curvature("ggn", model, loss_fn, data=[(X[:0], y[:0])], registry=registry)


def test_num_data_mismatch_is_reported_at_the_first_pass(registry):
    model, loss_fn, X, y, _ = ref.make_case("mlp-ce-mean", m=12)
    F = curvature("ggn", model, loss_fn, data=split(X, y), num_data=13, registry=registry)
    with pytest.raises(ShapeError, match=r"num_data = 13.*hold 12 samples"):
        F @ torch.randn(F.p, dtype=DT)


def test_data_that_changes_between_passes(registry):
    model, loss_fn, X, y, _ = ref.make_case("mlp-ce-mean", m=12)
    batches = split(X, y)
    F = curvature("empirical_fisher", model, loss_fn, data=batches, registry=registry)
    batches.pop()
    with pytest.raises(ShapeError, match="held 12 samples.*saw 8"):
        F.gradient_vector()


class Branching(nn.Module):
    """Calls ``small`` on batches of fewer than 4 samples and ``large`` on the others."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.small = nn.Linear(5, 3)
        self.large = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.small(h) if x.shape[0] < 4 else self.large(h)


def test_batches_calling_different_layers(registry):
    model = Branching().to(DT)
    X, y = torch.randn(12, 4, dtype=DT), torch.randint(0, 3, (12,))
    with pytest.warns(curvlib.ExcludedParametersWarning, match="small"):
        F = curvature("ggn", model, nn.CrossEntropyLoss(), data=split(X, y), registry=registry)
    with pytest.raises(ShapeError, match=r"batch 1 calls the layer blocks \['body', 'small'\].*\['body', 'large'\]"):
        F @ torch.randn(F.p, dtype=DT)


def test_products_skip_the_probe_and_the_gradient_of_each_batch(registry, monkeypatch):
    """The probe and ∇L run for the first batch at construction; a product captures each batch
    for its statistics only (two backward passes per batch fewer), with the same result."""
    import curvlib.curvatures.kinds as kinds

    F, big, *_ = case("mlp-ce-mean", registry, "ggn")
    calls = {"probe": 0, "gradient": 0}
    real_probe, real_grad = kinds.check_samples_independent, kinds._loss_gradient
    monkeypatch.setattr(kinds, "check_samples_independent",
                        lambda *a, **k: (calls.__setitem__("probe", calls["probe"] + 1), real_probe(*a, **k))[1])
    monkeypatch.setattr(kinds, "_loss_gradient",
                        lambda *a, **k: (calls.__setitem__("gradient", calls["gradient"] + 1), real_grad(*a, **k))[1])
    v = torch.randn(F.p, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    close(F @ v, big @ v, "ggn product")
    assert calls == {"probe": 0, "gradient": 0}
    with pytest.raises(NoStatisticsError, match="products only"):
        next(F._operators("check"))[0].gradient_vector()
