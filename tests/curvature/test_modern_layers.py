"""Acceptance: exact curvature products on networks built from a modern model's layers.

For a decoder-only transformer language model (both ``batch_first`` layouts, tied output head,
K-dimensional cross-entropy over the positions), a ResNet with BatchNorm in eval mode, and one
model mixing Conv1d/Conv3d, grouped and depthwise Conv2d, an embedding with ``padding_idx``
tied to the output head, LayerNorm, GroupNorm, RMSNorm and BatchNorm1d/2d (eval mode)
(:mod:`curvlib.testing.models`), and for every curvature kind, ``F @ v`` must equal the dense
float64 reference in torch's parameter layout (``dense_*_params`` of
:mod:`curvlib.testing.references`, computed with ``torch.func`` only) to a relative error of
1e-10, with no parameter excluded and every trainable parameter covered exactly once.
"""

from __future__ import annotations

import pytest
import torch

import curvlib
from curvlib.testing import max_error_report
from curvlib.testing import references as ref
from curvlib.testing.models import ModelCase, tiny_mixed_model, tiny_resnet, tiny_transformer_lm

DT = torch.float64
KINDS = ["ggn", "fisher", "empirical_fisher", "hessian"]
MODELS = {
    "lm_batch_first": lambda: tiny_transformer_lm(batch_first=True),
    "lm_seq_first": lambda: tiny_transformer_lm(batch_first=False),
    "resnet": lambda: tiny_resnet(),  # eval mode
    "mixed": lambda: tiny_mixed_model(),  # eval mode
}
RTOL = 1e-10


@pytest.fixture(scope="module")
def cases() -> dict[str, ModelCase]:
    return {name: build() for name, build in MODELS.items()}


@pytest.fixture(scope="module")
def hessians() -> dict[tuple[str, tuple[int, ...]], torch.Tensor]:
    """Dense Hessians by (model, ids of the parameter list): each costs p backward passes."""
    return {}


def _curvature(kind: str, case: ModelCase):
    options = {"mc_samples": 2} if kind == "fisher" else {}
    return curvlib.curvature(
        kind, case.model, case.loss_fn, batch=(case.X, case.y), generator=torch.Generator().manual_seed(0), **options
    )


def _reference(kind: str, name: str, case: ModelCase, F, params: list[torch.Tensor], hessians) -> torch.Tensor:
    args = (case.model, params, case.loss_fn, case.X)
    if kind == "ggn":
        return ref.dense_ggn_params(*args, case.y)
    if kind == "fisher":
        return ref.dense_fisher_params(*args, F.sampled_targets)
    if kind == "empirical_fisher":
        return ref.dense_empirical_fisher_params(*args, case.y)
    key = (name, tuple(id(q) for q in params))
    if key not in hessians:
        hessians[key] = ref.dense_hessian_params(*args, case.y)
    return hessians[key]


def _assert_relative_error(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    rel = float(torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected))
    assert torch.isfinite(actual).all() and rel <= RTOL, (
        f"{what}: relative error ‖F v − C v‖/‖C v‖ = {rel:.3e} > {RTOL:.0e}; {max_error_report(actual, expected)}"
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(MODELS))
def test_every_parameter_is_covered_exactly_once(name, kind, cases):
    case = cases[name]
    F = _curvature(kind, case)
    assert F.excluded == []
    ids = [id(q) for q in F.params()]
    assert len(ids) == len(set(ids)), "F.params() lists a parameter twice (a tied weight must appear once)"
    trainable = {id(q) for q in case.model.parameters() if q.requires_grad}
    names = {id(q): n for n, q in case.model.named_parameters()}
    missing = [names[i] for i in trainable - set(ids)]
    foreign = [i for i in ids if i not in trainable]
    assert missing == [] and foreign == [], f"missing from F.params(): {missing}; not model parameters: {len(foreign)}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(MODELS))
def test_products_equal_the_dense_reference(name, kind, cases, hessians):
    case = cases[name]
    F = _curvature(kind, case)
    assert F.excluded == []
    params = F.params()
    g = torch.Generator().manual_seed(1)
    v = [torch.randn(q.shape, generator=g, dtype=DT) for q in params]
    if kind == "fisher":
        m, d = case.num_samples, tuple(case.y.shape[1:])
        assert tuple(F.sampled_targets.shape) == (m, 2, *d)
    C = _reference(kind, name, case, F, params, hessians)  # first: a failure below is curvlib's
    out = F @ v
    assert isinstance(out, (list, tuple)) and [tuple(o.shape) for o in out] == [tuple(q.shape) for q in params]
    _assert_relative_error(ref.flatten_params(out), C @ ref.flatten_params(v), f"{name} {kind}")
