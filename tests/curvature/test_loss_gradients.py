"""The closed-form per-sample output gradients of MSELoss and BCEWithLogitsLoss against the
loss modules' own autograd gradients (the route every other loss takes)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from curvlib.curvatures.losses import LossModel, loss_model_for
from curvlib.testing.compare import assert_close


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), loss=st.sampled_from(["mse", "bce_logits"]), reduction=st.sampled_from(["mean", "sum"]),
       dtype=st.sampled_from([torch.float32, torch.float64]), scale=st.sampled_from([1.0, 30.0]),
       shape=st.sampled_from([(5, 3), (4, 2, 3)]))
def test_closed_form_equals_the_modules_autograd_gradient(seed, loss, reduction, dtype, scale, shape):
    module = {"mse": nn.MSELoss, "bce_logits": nn.BCEWithLogitsLoss}[loss](reduction=reduction)
    model = loss_model_for(module)
    gen = torch.Generator().manual_seed(seed)
    f = (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)  # saturated logits at 30
    y = torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype)
    if loss == "bce_logits":
        y = (y < 0.5).to(dtype)
    autograd = LossModel.per_sample_gradients(model, f, y)  # the generic route: the module's backward
    assert_close(model.per_sample_gradients(f, y), autograd)


def test_other_target_dtypes_take_the_modules_route():
    model = loss_model_for(nn.MSELoss())
    f, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float32)
    got = model.per_sample_gradients(f, y)
    assert got.dtype == LossModel.per_sample_gradients(model, f, y).dtype
    assert torch.equal(got, LossModel.per_sample_gradients(model, f, y))  # the very same computation
