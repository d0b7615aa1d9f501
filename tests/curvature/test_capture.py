"""Capture: hooks' lifetime, the excluded-parameter policy, weight sharing, supported losses
and options, each failing with a clear error."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import curvature_reference as ref
from curvlib.capture.adapters import BatchCouplingWarning, ExcludedParametersWarning, LinearAdapter
from curvlib.capture.hooks import capture_forward
from curvlib.curvatures.api import curvature
from curvlib.curvatures.kinds import FisherOptions
from curvlib.errors import ConfigError, ShapeError, UnknownKindError, UnsupportedLayerError, UnsupportedLossError
from curvlib.plugins import load_registry
from curvlib.testing import assert_close

DT = torch.float64


@pytest.fixture(scope="module")
def registry():
    return load_registry(external=False)


def hook_count(model: nn.Module) -> int:
    return sum(len(mod._forward_hooks) + len(mod._backward_hooks) for mod in model.modules())


# -- hooks ---------------------------------------------------------------------------------------
class Exploding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        self.fc(x)
        raise RuntimeError("boom")


def test_hooks_removed_when_the_forward_raises(registry):
    model = Exploding().to(DT)
    with pytest.raises(RuntimeError, match="boom"):
        curvature("ggn", model, nn.MSELoss(), (torch.randn(4, 3, dtype=DT), torch.zeros(4, 2, dtype=DT)), registry=registry)
    assert hook_count(model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with capture_forward([LinearAdapter(model.fc, name="fc")]):
            assert hook_count(model) == 1
            model(torch.randn(4, 3, dtype=DT))
    assert hook_count(model) == 0


def test_hooks_removed_after_capture_and_model_untouched(registry):
    model, loss_fn, X, y, _ = ref.make_case("cnn-ce-mean")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    op = curvature("fisher", model, loss_fn, (X, y), generator=torch.Generator().manual_seed(0), registry=registry)
    assert hook_count(model) == 0
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert [L.name for L in op.layers] == ["0", "2", "5"] and [L.kind for L in op.layers] == ["conv2d", "conv2d", "linear"]


class SharedTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.fc(x)))


def _ggn_reference(model, op, loss_fn, X, y):
    J = ref.per_sample_jacobians(model, op, X)
    with torch.no_grad():
        H = ref.per_sample_output_hessians(loss_fn, model(X), y)
    return torch.einsum("bcp,bcd,bdq->pq", J, H, J) / X.shape[0]


def test_module_called_twice_has_one_use_per_call(registry):
    """Weight sharing across calls: the block sums both uses and stays exact."""
    model = SharedTwice().to(DT)
    X, y = torch.randn(4, 3, dtype=DT), torch.randn(4, 3, dtype=DT)
    op = curvature("ggn", model, nn.MSELoss(), (X, y), registry=registry)
    assert hook_count(model) == 0
    assert [L.name for L in op.layers] == ["fc"] and len(op.statistics(0).uses) == 2
    assert_close(_dense(op), _ggn_reference(model, op, nn.MSELoss(), X, y))


def test_tied_weights_are_one_block(registry):
    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Tanh(), nn.Linear(3, 3, bias=False)).to(DT)
    model[2].weight = model[0].weight
    X, y = torch.randn(4, 3, dtype=DT), torch.randn(4, 3, dtype=DT)
    op = curvature("ggn", model, nn.MSELoss(), (X, y), registry=registry)
    assert [L.name for L in op.layers] == ["0"] and op.params() == [model[0].weight] and op.excluded == []
    assert_close(_dense(op), _ggn_reference(model, op, nn.MSELoss(), X, y))


def test_tied_weights_with_separate_biases_are_refused(registry):
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)).to(DT)
    model[2].weight = model[0].weight
    with pytest.raises(UnsupportedLayerError, match=r"layers \['0', '2'\] share parameters but none of them uses all"):
        curvature("ggn", model, nn.MSELoss(), (torch.randn(4, 3, dtype=DT), torch.zeros(4, 3, dtype=DT)), registry=registry)


def test_parameter_also_used_by_a_module_without_adapter_is_refused(registry):
    odd = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Module())
    odd[1].register_parameter("w", odd[0].weight)
    with pytest.raises(UnsupportedLayerError, match=r"also registered by module\(s\) \['1'\]"):
        curvature("ggn", odd.to(DT), nn.MSELoss(), (torch.randn(4, 2, dtype=DT), torch.zeros(4, 2, dtype=DT)), registry=registry)


# -- excluded parameters ------------------------------------------------------------------------
def test_parameters_without_adapter_are_excluded_with_a_warning(registry):
    model = nn.Sequential(nn.Linear(4, 5), nn.PReLU(5), nn.Linear(5, 3)).to(DT)
    X, y = torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,))
    with pytest.warns(ExcludedParametersWarning, match=r"(?s)NaturalGradient updates them.*1\.weight: no layer adapter for PReLU"):
        op = curvature("ggn", model, nn.CrossEntropyLoss(), (X, y), registry=registry)
    assert op.excluded == ["1.weight"]
    assert [L.name for L in op.layers] == ["0", "2"]
    assert op.p == 5 * 5 + 3 * 6


def test_batchnorm_parameters_are_a_block(registry):
    model, loss_fn, X, y, _ = ref.make_case("bn-ce-mean")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op = curvature("ggn", model, loss_fn, (X, y), registry=registry)
    assert op.excluded == [] and [L.name for L in op.layers] == ["0", "1", "3"]
    assert (op.layers[1].g_dim, op.layers[1].a_dim) == (10, 1)  # W̄ = [γ; β]


def test_batchnorm_in_training_mode_warns_about_coupling(registry):
    model, loss_fn, X, y, _ = ref.make_case("bn-ce-mean")
    model.train()
    with pytest.warns(BatchCouplingWarning, match=r"\['1'\].*model.eval\(\)"):
        curvature("ggn", model, loss_fn, (X, y), registry=registry)


def test_frozen_parameters_are_skipped_silently(registry):
    model, loss_fn, X, y, _ = ref.make_case("mlp-mse-mean")
    model[0].requires_grad_(False)  # a whole layer
    model[4].bias.requires_grad_(False)  # a bias only: the layer becomes bias-free
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op = curvature("ggn", model, loss_fn, (X, y), registry=registry)
    assert [L.name for L in op.layers] == ["2", "4"] and op.excluded == []
    assert not op.layers[1].has_bias and op.layers[1].a_dim == 4
    # still exact on what is left
    J = ref.per_sample_jacobians(model, op, X)
    with torch.no_grad():
        H = ref.per_sample_output_hessians(loss_fn, model(X), y)
    assert_close(_dense(op), torch.einsum("bcp,bcd,bdq->pq", J, H, J) / X.shape[0])


def _dense(op):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return op.to_dense()


def test_frozen_weight_with_trainable_bias_excludes_the_bias(registry):
    model, loss_fn, X, y, _ = ref.make_case("mlp-mse-mean")
    model[0].weight.requires_grad_(False)
    with pytest.warns(ExcludedParametersWarning, match=r"0\.bias: bias of Linear '0' whose weight is frozen"):
        op = curvature("ggn", model, loss_fn, (X, y), registry=registry)
    assert op.excluded == ["0.bias"]


class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(3, 2)
        self.unused = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.used(x) * self.scale


def test_uncalled_layers_and_bare_parameters_are_excluded(registry):
    model = WithUnused().to(DT)
    X, y = torch.randn(4, 3, dtype=DT), torch.randn(4, 2, dtype=DT)
    with pytest.warns(ExcludedParametersWarning) as rec:
        op = curvature("empirical_fisher", model, nn.MSELoss(), (X, y), registry=registry)
    msg = str(rec[0].message)
    assert "unused.weight: Linear 'unused' was not called" in msg and "scale: no layer adapter for WithUnused" in msg
    assert sorted(op.excluded) == ["scale", "unused.bias", "unused.weight"]
    assert [L.name for L in op.layers] == ["used"]
    G = ref.per_sample_grads(model, op, nn.MSELoss(), X, y)
    assert_close(_dense(op), G.T @ G / (4 * 2 / 2))  # k = 2/c with c = 2


def test_no_adapted_layer_is_an_error(registry):
    model = nn.Sequential(nn.PReLU(3)).to(DT)
    with pytest.raises(UnsupportedLayerError, match="supported module types"):
        curvature("ggn", model, nn.MSELoss(), (torch.randn(4, 3, dtype=DT), torch.zeros(4, 3, dtype=DT)), registry=registry)


def test_inplace_activation_after_a_layer(registry):
    """nn.ReLU(inplace=True) overwrites the layer output; g must stay ∂/∂(pre-activation)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).to(DT)
    X, y = torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,))
    loss_fn = nn.CrossEntropyLoss()
    op = curvature("empirical_fisher", model, loss_fn, (X, y), registry=registry)
    G = ref.per_sample_grads(model, op, loss_fn, X, y)
    assert_close(_dense(op), G.T @ G / 5)


# -- losses and options -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "loss_fn, match",
    [
        (nn.L1Loss(), r"unsupported loss L1Loss; supported losses: nn.CrossEntropyLoss, nn.MSELoss"),
        (nn.CrossEntropyLoss(reduction="none"), r"reduction='none'.*'mean' or 'sum'"),
        (nn.CrossEntropyLoss(weight=torch.ones(3, dtype=DT)), r"weight=tensor.*expected weight=None"),
        (nn.CrossEntropyLoss(label_smoothing=0.1), r"label_smoothing=0.1.*expected label_smoothing=0"),
        (nn.BCEWithLogitsLoss(pos_weight=torch.ones(3, dtype=DT)), r"pos_weight"),
        (nn.functional.cross_entropy, r"unsupported loss <function cross_entropy"),
    ],
)
def test_unsupported_losses(loss_fn, match, registry):
    model, _, X, y, _ = ref.make_case("mlp-ce-mean")
    with pytest.raises(UnsupportedLossError, match=match):
        curvature("ggn", model, loss_fn, (X, y), registry=registry)


def test_unsupported_output_and_target_shapes(registry):
    model, _, X, y, _ = ref.make_case("mlp-ce-mean")
    with pytest.raises(UnsupportedLossError, match=r"integer class-index targets \[5\]"):
        curvature("ggn", model, nn.CrossEntropyLoss(), (X, torch.rand(5, 3, dtype=DT)), registry=registry)
    with pytest.raises(UnsupportedLossError, match=r"targets in \[0, 3\)"):
        curvature("ggn", model, nn.CrossEntropyLoss(), (X, torch.full((5,), -100)), registry=registry)
    with pytest.raises(UnsupportedLossError, match=r"targets of the output's shape \[5, 3\], got \[5, 1\]"):
        curvature("ggn", model, nn.MSELoss(), (X, torch.zeros(5, 1, dtype=DT)), registry=registry)
    cnn = nn.Sequential(nn.Conv2d(1, 3, 1)).to(DT)
    with pytest.raises(UnsupportedLossError, match=r"integer class-index targets \[2, 4, 4\]"):
        curvature("ggn", cnn, nn.CrossEntropyLoss(), (torch.randn(2, 1, 4, 4, dtype=DT), torch.zeros(2, 4, dtype=torch.long)), registry=registry)
    with pytest.raises(UnsupportedLossError, match=r"outputs in \[0, 1\]"):
        curvature("ggn", model, nn.BCELoss(), (X, torch.zeros(5, 3, dtype=DT)), registry=registry)


def test_kinds_and_options_are_validated(registry):
    model, loss_fn, X, y, _ = ref.make_case("mlp-ce-mean")
    with pytest.raises(UnknownKindError, match=r"known kinds: 'empirical_fisher', 'fisher', 'ggn', 'hessian'"):
        curvature("fischer", model, loss_fn, (X, y), registry=registry)
    with pytest.raises(ConfigError, match="mc_samples"):
        curvature("fisher", model, loss_fn, (X, y), mc_samples=0, registry=registry)
    with pytest.raises(ConfigError, match="mc_sample"):
        curvature("fisher", model, loss_fn, (X, y), mc_sample=2, registry=registry)
    with pytest.raises(ConfigError, match="mc_samples"):
        curvature("ggn", model, loss_fn, (X, y), mc_samples=2, registry=registry)
    op = curvature({"kind": "fisher", "mc_samples": 4}, model, loss_fn, (X, y), registry=registry)
    assert op.num_columns == 4 and op.kind == "fisher"
    assert FisherOptions().mc_samples == 1


def test_default_registry_and_generator():
    model, loss_fn, X, y, _ = ref.make_case("mlp-ce-mean")
    torch.manual_seed(11)
    a = curvature("fisher", model, loss_fn, (X, y), mc_samples=2)
    torch.manual_seed(11)
    b = curvature("fisher", model, loss_fn, (X, y), mc_samples=2)
    assert torch.equal(a.sampled_targets, b.sampled_targets)


def test_curvature_kinds_registered(registry):
    for kind in ("fisher", "empirical_fisher", "ggn", "hessian"):
        spec = registry.curvatures.get(kind)
        assert hasattr(spec.factory(spec.make_options()), "build")
    assert registry.curvatures.get("fisher").options is FisherOptions


def test_build_under_no_grad_is_exact(registry):
    model, loss_fn, X, y, _ = ref.make_case("cnn-ce-mean")
    with torch.no_grad():
        op = curvature("empirical_fisher", model, loss_fn, (X, y), registry=registry)
        H = curvature("hessian", model, loss_fn, (X, y), registry=registry)
        v = torch.randn(op.p, dtype=DT)
        Hv = H @ v
    G = ref.per_sample_grads(model, op, loss_fn, X, y)
    assert_close(_dense(op), G.T @ G / X.shape[0])
    assert_close(Hv, ref.dense_hessian(model, H, loss_fn, X, y) @ v)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["fisher", "ggn", "hessian"])
def test_device_is_preserved_on_cuda(kind, registry):
    model, loss_fn, X, y, _ = ref.make_case("convae-mse-mean")
    dev = torch.device("cuda")
    model, X, y = model.to(dev), X.to(dev), y.to(dev)
    op = curvature(kind, model, loss_fn, (X, y), generator=torch.Generator(device=dev).manual_seed(0), registry=registry)
    assert op.device.type == "cuda"
    v = torch.randn(op.p, dtype=DT, device=dev)
    out = op @ v
    assert out.device.type == "cuda"
    if kind != "hessian":
        assert op.statistics(0).a.device.type == "cuda"
        assert_close(out.cpu(), (_dense(op) @ v).cpu())


class _PositionalOnArange(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos, self.out = nn.Embedding(5, 3), nn.Embedding(4, 3), nn.Linear(3, 5)

    def forward(self, x):
        return self.out(self.tok(x) + self.pos(torch.arange(x.shape[1]))).transpose(1, 2)


@pytest.mark.parametrize("m", [3, 4])
def test_layer_without_the_batch_axis_is_refused_even_when_its_length_equals_the_batch(m, registry):
    """pos(arange(T)) has no per-sample statistics; with T = m the shapes cannot tell, the
    probe backward can (its gradient reaches every sample)."""
    model = _PositionalOnArange().to(DT)
    x = torch.randint(0, 5, (m, 4), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ShapeError, match=r"'pos'.*torch\.arange\(T\)"):
        curvature("ggn", model, nn.CrossEntropyLoss(), (x, x), registry=registry)
    assert hook_count(model) == 0


class _SampleMixing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        h = self.a(x)
        return self.b(h - h.mean(0, keepdim=True))  # couples the samples before b


def test_a_model_that_mixes_samples_is_refused(registry):
    model = _SampleMixing().to(DT)
    with pytest.raises(ShapeError, match=r"'a'.*combines samples"):
        curvature("ggn", model, nn.MSELoss(), (torch.randn(4, 3, dtype=DT), torch.zeros(4, 2, dtype=DT)), registry=registry)
