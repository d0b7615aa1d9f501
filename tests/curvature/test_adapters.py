"""Layer adapters: the weight/bias <-> vec(W̄) mapping and the captured statistics
reproduce torch.func per-sample gradients exactly (DW̄_n = Σ_t g_{n,t} ā_{n,t}ᵀ)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvature_reference as ref
from curvlib.capture.adapters import Conv2dAdapter, ConvTranspose2dAdapter, LinearAdapter
from curvlib.curvatures.api import curvature
from curvlib.errors import ShapeError
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
    (use,) = ad2.capture((x,), {}, lin2(x))
    assert use.rows.shape == (4, 1, 3) and use.geometry.kind == "none"


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
    with pytest.raises(ShapeError, match=r"\[m, \*positions, 3\]"):
        ad.capture((torch.zeros(2, 5, 4, dtype=DT),), {}, None)
    with pytest.raises(ShapeError, match="samples on axis 0, got \\[3\\]"):
        ad.capture((torch.zeros(3, dtype=DT),), {}, None)


@pytest.mark.parametrize("cls", [nn.Conv2d, nn.ConvTranspose2d])
def test_groups_are_one_block_each(cls, registry):
    model = nn.Sequential(nn.Linear(2, 8), nn.Unflatten(1, (4, 2, 1)), cls(4, 6 if cls is nn.Conv2d else 4, 1, groups=2)).to(DT)
    X = torch.randn(3, 2, dtype=DT)
    with torch.no_grad():
        out = model(X)
    op = curvature("ggn", model, nn.MSELoss(), (X, torch.zeros(out.shape, dtype=DT)), registry=registry)
    assert [L.name for L in op.layers] == ["0", "2:group0", "2:group1"]
    assert op.params() == [model[0].weight, model[0].bias, model[2].weight, model[2].bias]
    assert op.excluded == []


# -- statistics reproduce per-sample gradients -------------------------------------------------
class SelfAttention(nn.Module):
    """nn.MultiheadAttention on x [m, T, E] (transposed to [T, m, E] when not batch-first)."""

    def __init__(self, E: int, H: int, *, batch_first: bool = True, causal: bool = False) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=batch_first)
        self.causal = causal

    def forward(self, x):
        if not self.attn.batch_first:
            x = x.transpose(0, 1)
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[0 if not self.attn.batch_first else 1], dtype=x.dtype) if self.causal else None
        out, _ = self.attn(x, x, x, attn_mask=mask, need_weights=False, is_causal=self.causal)
        return out if self.attn.batch_first else out.transpose(0, 1)


class CrossAttention(nn.Module):
    """Queries from the first half of the tokens, keys/values from the second (two uses of in_proj)."""

    def __init__(self, E: int, H: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=True, add_zero_attn=True)

    def forward(self, x):
        q, kv = x[:, :2], x[:, 2:]
        pad = torch.zeros(x.shape[0], kv.shape[1], dtype=torch.bool)
        pad[:, -1] = True
        out, w = self.attn(q, kv, kv, key_padding_mask=pad)
        return out + w.sum(-1, keepdim=True)


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
    "linear-tokens": (lambda: nn.Linear(4, 3), (5, 4)),
    "linear-grid-nobias": (lambda: nn.Linear(4, 3, bias=False), (2, 3, 4)),
    "conv1d": (lambda: nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=1), (2, 7)),
    "conv1d-same-reflect": (lambda: nn.Conv1d(2, 2, 4, padding="same", padding_mode="reflect", dilation=2), (2, 9)),
    "conv3d": (lambda: nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1)), (2, 3, 5, 3)),
    "conv3d-dilation-nobias": (lambda: nn.Conv3d(1, 2, 2, dilation=2, bias=False), (1, 4, 4, 5)),
    "conv-grouped": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (4, 4, 4)),
    "conv-depthwise": (lambda: nn.Conv2d(3, 3, 3, groups=3, stride=2), (3, 5, 5)),
    "convT1d": (lambda: nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1, output_padding=1), (2, 4)),
    "convT3d-grouped": (lambda: nn.ConvTranspose3d(4, 2, 2, stride=2, groups=2), (4, 2, 2, 3)),
    "embedding": (lambda: nn.Embedding(6, 3, padding_idx=2), ("tokens", 5, 6)),
    "layernorm": (lambda: nn.LayerNorm(4), (5, 4)),
    "layernorm-2d-nobias": (lambda: nn.LayerNorm((3, 4), bias=False), (2, 3, 4)),
    "rmsnorm": (lambda: nn.RMSNorm(4), (3, 4)),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), (4, 3, 3)),
    "batchnorm1d-eval": (lambda: nn.BatchNorm1d(4), (4,)),
    "batchnorm2d-eval": (lambda: nn.BatchNorm2d(3), (3, 4, 4)),
    "attention": (lambda: SelfAttention(4, 2), (5, 4)),
    "attention-seq-first-masked": (lambda: SelfAttention(4, 2, batch_first=False, causal=True), (5, 4)),
    "cross-attention-zero-attn": (lambda: CrossAttention(4, 2), (6, 4)),
}


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching rule")
@pytest.mark.parametrize("case", list(LAYERS))
def test_statistics_reproduce_per_sample_gradients(case, registry):
    make, in_shape = LAYERS[case]
    torch.manual_seed(0)
    model = nn.Sequential(make()).to(DT)
    with torch.no_grad():  # non-trivial affine and running statistics for the norm layers
        for name, buf in model.named_buffers():
            if "running_var" in name:
                buf.uniform_(0.5, 2.0)
            elif "running_mean" in name:
                buf.normal_()
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.eval()
    m = 3
    if in_shape[0] == "tokens":
        _, T, V = in_shape
        X = torch.randint(0, V, (m, T))
    else:
        X = torch.randn(m, *in_shape, dtype=DT)
    with torch.no_grad():
        out = model(X)
    Y = torch.randn(out.shape, dtype=DT)
    loss_fn = nn.MSELoss(reduction="sum")
    op = curvature("empirical_fisher", model, loss_fn, (X, Y), registry=registry)
    assert op.excluded == []
    grads = ref.per_sample_grads_dict(model, op, loss_fn, X, Y)
    expected = ref.flatten(op, grads) / 2.0**0.5  # columns ∇ℓ_b/√k, k = 2
    for i, L in enumerate(op.layers):
        st = op.statistics(i)
        assert st.c == 1 and st.scale == 1.0 / m
        D = st.pair_gradients()  # Σ_u Σ_t g āᵀ per sample
        assert_close(D.transpose(1, 2).reshape(m, -1), expected[:, L.slice], msg=f"block {L.name}")
        if isinstance(L.module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            (u,) = st.uses
            assert u.geometry.kind == "grid" and u.geometry.shape == tuple(out.shape[2:]) == L.spatial_shape
            assert u.geometry.kernel == tuple(L.module.kernel_size)
    # the same through J: its columns are vec(DW̄_n)
    assert_close(op.J(torch.eye(m, dtype=DT)).T, expected)
    # and the adapter's own mapping of torch's per-sample weight/bias gradients agrees
    names = ref.trainable_names(op)
    for b in range(m):
        assert_close(op.params_to_vector([grads[n][b] for n in names]) / 2.0**0.5, expected[b])
