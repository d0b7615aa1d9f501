"""Largest relative error of curvlib's exact curvature blocks, per layer type, against dense torch.func references.

For the test models of :mod:`curvlib.testing.models` (a transformer language model with a
tied head in both ``batch_first`` layouts, a ResNet with BatchNorm, a model mixing
Conv1d/Conv3d/grouped/depthwise convolutions, a tied embedding and four norm layers), every
curvature kind is built and each diagonal block F_ii is compared with the same block of
the dense float64 reference (``curvlib.testing.references.dense_*_params``, computed with
``torch.func`` in torch's parameter layout and mapped to curvlib's layout through the
operator's ``params_to_vector``).  Prints, per layer kind, the largest
‖F_ii − C_ii‖_F / ‖C_ii‖_F over all blocks, models and kinds, and the whole operator's error.

Usage::

    python benchmarks/layer_coverage_errors.py
"""

from __future__ import annotations

import argparse
import warnings
from collections import defaultdict

import torch

import curvlib
from curvlib.testing import references as ref
from curvlib.testing.models import tiny_mixed_model, tiny_resnet, tiny_transformer_lm

MODELS = {
    "lm (batch_first)": lambda: tiny_transformer_lm(batch_first=True),
    "lm (seq-first)": lambda: tiny_transformer_lm(batch_first=False),
    "resnet (eval)": tiny_resnet,
    "mixed (eval)": tiny_mixed_model,
}
KINDS = ("ggn", "fisher", "empirical_fisher", "hessian")


def _to_curvlib_layout(F, R: torch.Tensor) -> torch.Tensor:
    """R in torch's flat layout (``p.reshape(-1)`` concatenated over ``F.params()``) -> M R Mᵀ."""
    params = F.params()
    cols = []
    for k in range(R.shape[0]):
        e = torch.zeros(R.shape[0], dtype=R.dtype)
        e[k] = 1.0
        cols.append(F.params_to_vector(ref.unflatten_params(e, params)))
    M = torch.stack(cols, dim=1)  # [p, p]: torch layout -> curvlib layout
    return M @ R @ M.T


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    worst: dict[str, float] = defaultdict(float)
    whole: dict[str, float] = defaultdict(float)
    for mname, build in MODELS.items():
        case = build()
        for kind in KINDS:
            opts = {"mc_samples": 2} if kind == "fisher" else {}
            F = curvlib.curvature(kind, case.model, case.loss_fn, (case.X, case.y),
                                  generator=torch.Generator().manual_seed(0), **opts)
            params = F.params()
            args = (case.model, params, case.loss_fn, case.X)
            if kind == "ggn":
                R = ref.dense_ggn_params(*args, case.y)
            elif kind == "fisher":
                R = ref.dense_fisher_params(*args, F.sampled_targets)
            elif kind == "empirical_fisher":
                R = ref.dense_empirical_fisher_params(*args, case.y)
            else:
                R = ref.dense_hessian_params(*args, case.y)
            C = _to_curvlib_layout(F, R)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", curvlib.PerformanceWarning)
                D = F.to_dense()
            whole[f"{mname} {kind}"] = float(torch.linalg.matrix_norm(D - C) / torch.linalg.matrix_norm(C))
            for L in F.layers:
                Cii = C[L.slice, L.slice]
                err = float(torch.linalg.matrix_norm(D[L.slice, L.slice] - Cii) / torch.linalg.matrix_norm(Cii))
                tied = "+tied" if len(L.adapters) > 1 else ""
                worst[L.kind + tied] = max(worst[L.kind + tied], err)
        print(f"done: {mname}", flush=True)
    print("\nlargest relative error of a diagonal block, per layer kind (all models, all four kinds):")
    for k, e in sorted(worst.items()):
        print(f"  {k:28s} {e:.2e}")
    print("\nwhole operator, relative Frobenius error:")
    for k, e in whole.items():
        print(f"  {k:34s} {e:.2e}")


if __name__ == "__main__":
    main()
