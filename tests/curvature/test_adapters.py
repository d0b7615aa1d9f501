"""Layer adapters: the weight/bias <-> vec(W̄) mapping and the captured statistics
reproduce torch.func per-sample gradients exactly (DW̄_n = Σ_t g_{n,t} ā_{n,t}ᵀ)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvature_reference as ref
from curvlib.capture.adapters import Conv2dAdapter, ConvTranspose2dAdapter, LinearAdapter
from curvlib.curvatures.api import curvature
from curvlib.errors import ShapeError, UnsupportedLayerError
from curvlib.plugins import load_registry
from curvlib.testing import assert_close

DT = torch.float64


@pytest.fixture(scope="module")
def registry():
    return load_registry(external=False)


def test_layer_plugins_registered(registry):
    kinds = {s.kind: s for s in registry.layers}
    assert {"linear", "conv2d", "conv_transpose2d"} <= set(kinds)
    assert kinds["linear"].metadata["module_types"] == (nn.Linear,)
    assert kinds["conv2d"].metadata["module_types"] == (nn.Conv2d,)
    assert kinds["conv_transpose2d"].metadata["module_types"] == (nn.ConvTranspose2d,)


# -- the mapping, against formulas written out here ------------------------------------------
def test_linear_mapping_with_bias():
    lin = nn.Linear(3, 2).to(DT)
    ad = LinearAdapter(lin, name="fc")
    expected = torch.cat([lin.weight, lin.bias[:, None]], 1).T.reshape(-1)
    assert_close(ad.params_to_vector([lin.weight, lin.bias]), expected)
    assert_close(ad.to_matrix(), torch.cat([lin.weight, lin.bias[:, None]], 1))
    w, b = ad.vector_to_params(expected)
    assert_close(w, lin.weight)
    assert_close(b, lin.bias)
    assert (ad.a_dim, ad.g_dim, ad.num_params) == (4, 2, 8)
    # vec stacks columns: entry (row r, column c) of W̄ sits at c·g_dim + r
    v = ad.params_to_vector([lin.weight, lin.bias])
    assert v[1 * 2 + 1] == lin.weight[1, 1] and v[3 * 2 + 0] == lin.bias[0]


def test_linear_mapping_without_bias_and_frozen_bias():
    lin = nn.Linear(3, 2, bias=False).to(DT)
    ad = LinearAdapter(lin)
    assert not ad.has_bias and ad.a_dim == 3
    assert_close(ad.params_to_vector([lin.weight]), lin.weight.T.reshape(-1))
    lin2 = nn.Linear(3, 2).to(DT)
    lin2.bias.requires_grad_(False)
    ad2 = LinearAdapter(lin2)
    assert not ad2.has_bias and ad2.params() == [lin2.weight]
    x = torch.randn(4, 3, dtype=DT)
    assert ad2.activations(x).shape == (4, 3)


def test_conv2d_mapping():
    conv = nn.Conv2d(2, 3, (2, 3)).to(DT)
    ad = Conv2dAdapter(conv)
    W = conv.weight.reshape(3, 2 * 2 * 3)
    expected = torch.cat([W, conv.bias[:, None]], 1).T.reshape(-1)
    assert_close(ad.params_to_vector([conv.weight, conv.bias]), expected)
    w, b = ad.vector_to_params(expected)
    assert_close(w, conv.weight)
    assert_close(b, conv.bias)
    assert (ad.a_dim, ad.g_dim, ad.kernel_size) == (13, 3, (2, 3))


def test_conv_transpose2d_mapping_swaps_channel_axes():
    conv = nn.ConvTranspose2d(2, 3, (2, 3)).to(DT)  # weight [c_in=2, c_out=3, 2, 3]
    ad = ConvTranspose2dAdapter(conv)
    W = conv.weight.permute(1, 0, 2, 3).reshape(3, 2 * 2 * 3)
    expected = torch.cat([W, conv.bias[:, None]], 1).T.reshape(-1)
    assert_close(ad.params_to_vector([conv.weight, conv.bias]), expected)
    w, b = ad.vector_to_params(expected)
    assert_close(w, conv.weight)
    assert (ad.a_dim, ad.g_dim) == (13, 3)
    # the plain reshape (no transpose) is a different matrix
    assert not torch.allclose(ad.to_matrix()[:, :-1], conv.weight.reshape(3, -1))


def test_mapping_rejects_wrong_shapes():
    ad = LinearAdapter(nn.Linear(3, 2).to(DT), name="fc")
    with pytest.raises(ShapeError, match="fc"):
        ad.params_to_vector([torch.zeros(3, 2, dtype=DT), torch.zeros(2, dtype=DT)])
    with pytest.raises(ShapeError, match=r"\[8\]"):
        ad.vector_to_params(torch.zeros(7, dtype=DT))
    with pytest.raises(ShapeError, match=r"\[m, 3\]"):
        ad.activations(torch.zeros(2, 5, 3, dtype=DT))


@pytest.mark.parametrize("cls", [nn.Conv2d, nn.ConvTranspose2d])
def test_groups_rejected_naming_module(cls, registry):
    model = nn.Sequential(nn.Linear(2, 8), nn.Unflatten(1, (4, 2, 1)), cls(4, 4, 1, groups=2)).to(DT)
    X = torch.randn(3, 2, dtype=DT)
    with pytest.raises(UnsupportedLayerError, match=r"'2'.*groups=2"):
        curvature("ggn", model, nn.MSELoss(), (X, torch.zeros(3, 4, 2, 1, dtype=DT)), registry=registry)


# -- statistics reproduce per-sample gradients -------------------------------------------------
class CallWithOutputSize(nn.Module):
    def __init__(self, up: nn.ConvTranspose2d, size) -> None:
        super().__init__()
        self.up, self.size = up, size

    def forward(self, x):
        return self.up(x, output_size=self.size)


LAYERS = {
    "linear": (lambda: nn.Linear(4, 3), (4,)),
    "linear-nobias": (lambda: nn.Linear(4, 3, bias=False), (4,)),
    "conv": (lambda: nn.Conv2d(2, 3, 3), (2, 5, 5)),
    "conv-stride-pad-nobias": (lambda: nn.Conv2d(2, 3, (3, 2), stride=2, padding=1, bias=False), (2, 6, 5)),
    "conv-dilation": (lambda: nn.Conv2d(2, 2, 3, dilation=2, padding=2, stride=(1, 2)), (2, 6, 6)),
    "conv-same-even-kernel": (lambda: nn.Conv2d(2, 3, (4, 2), padding="same"), (2, 5, 4)),
    "conv-valid": (lambda: nn.Conv2d(1, 2, 2, padding="valid"), (1, 4, 3)),
    "conv-reflect": (lambda: nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), (2, 4, 4)),
    "conv-circular": (lambda: nn.Conv2d(2, 2, 3, padding=(1, 2), padding_mode="circular"), (2, 4, 5)),
    "convT": (lambda: nn.ConvTranspose2d(2, 3, 3), (2, 3, 3)),
    "convT-stride-pad-outpad": (lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1), (2, 3, 4)),
    "convT-dilation-nobias": (
        lambda: nn.ConvTranspose2d(3, 2, (3, 2), stride=(2, 1), padding=(1, 0), dilation=2, output_padding=(1, 0), bias=False),
        (3, 3, 3),
    ),
    "convT-crop": (lambda: nn.ConvTranspose2d(2, 2, 2, stride=3, padding=2), (2, 4, 3)),
    "convT-output-size": (lambda: CallWithOutputSize(nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1), [6, 5]), (2, 3, 3)),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("case", list(LAYERS))
def test_statistics_reproduce_per_sample_gradients(case, registry):
    make, in_shape = LAYERS[case]
    torch.manual_seed(0)
    model = nn.Sequential(make()).to(DT)
    m = 3
    X = torch.randn(m, *in_shape, dtype=DT)
    with torch.no_grad():
        out = model(X)
    Y = torch.randn(out.shape, dtype=DT)
    loss_fn = nn.MSELoss(reduction="sum")
    op = curvature("empirical_fisher", model, loss_fn, (X, Y), registry=registry)
    assert len(op.layers) == 1
    grads = ref.per_sample_grads_dict(model, op, loss_fn, X, Y)
    expected = ref.flatten(op, grads) / 2.0**0.5  # columns ∇ℓ_b/√k, k = 2
    st = op.statistics(0)
    L = op.layers[0]
    if L.spatial_shape is not None:
        assert st.geometry.kind == "grid" and st.geometry.shape == tuple(out.shape[-2:]) and L.spatial_shape == tuple(out.shape[-2:])
    else:
        assert st.geometry.kind == "none" and st.T == 1
    DW = torch.einsum("bctg,bta->bga", st.g, st.a)
    layer = model[0].up if case == "convT-output-size" else model[0]
    assert st.c == 1 and st.scale == 1.0 / m and st.has_bias == (layer.bias is not None)
    assert_close(DW.transpose(1, 2).reshape(m, -1), expected)
    # the same through J: its columns are vec(DW̄_n)
    assert_close(op.J(torch.eye(m, dtype=DT)).T, expected)
    # and the adapter's own mapping of torch's per-sample weight/bias gradients agrees
    names = ref.trainable_names(op)
    for b in range(m):
        assert_close(op.params_to_vector([grads[n][b] for n in names]) / 2.0**0.5, expected[b])
