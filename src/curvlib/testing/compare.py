"""Comparisons that fail with a readable report (max abs error, where, relative error).

:func:`assert_close` compares two tensors; :func:`assert_symmetric` and :func:`assert_psd`
check a matrix's structure and say by how much it misses.

Tolerances come from the dtype's machine epsilon; ``atol`` is scaled by the largest
entry of the reference, so a comparison means the same thing for tiny and huge values
(DESIGN.md §6).
"""

from __future__ import annotations

import torch

__all__ = ["assert_close", "assert_psd", "assert_symmetric", "default_tolerances", "max_error_report"]

# multiples of eps: generous enough for O(d) accumulated rounding, tight enough that
# a wrong formula (errors of order 1) can never pass.
_EPS_FACTOR_RTOL = {torch.float64: 1e6, torch.float32: 1e3, torch.float16: 10.0, torch.bfloat16: 10.0}


def default_tolerances(dtype: torch.dtype, scale: float = 1.0) -> tuple[float, float]:
    """``(rtol, atol)`` for ``dtype``: rtol = c·eps, atol = rtol·scale.

    float64: rtol ≈ 2.2e-10; float32: rtol ≈ 1.2e-4.
    """
    eps = torch.finfo(dtype).eps
    rtol = _EPS_FACTOR_RTOL.get(dtype, 1e3) * eps
    return rtol, rtol * float(scale)


def max_error_report(actual: torch.Tensor, expected: torch.Tensor) -> str:
    """A one-paragraph report: max abs error, its index, both values, relative error."""
    a = torch.as_tensor(actual).detach().to(torch.float64).cpu()
    e = torch.as_tensor(expected).detach().to(torch.float64).cpu()
    if a.shape != e.shape:
        return f"shape mismatch: actual {tuple(a.shape)} vs expected {tuple(e.shape)}"
    if a.numel() == 0:
        return "empty tensors"
    diff = (a - e).abs()
    nonfinite = (~torch.isfinite(a)).sum().item()
    flat = int(torch.nan_to_num(diff, nan=float("inf")).argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape))
    ref = e.abs().max().item()
    rel = (diff.max().item() / ref) if ref > 0 else float("inf")
    fro = (torch.linalg.vector_norm(a - e) / max(torch.linalg.vector_norm(e).item(), 1e-300)).item()
    return (
        f"max abs error {diff.max().item():.3e} at index {idx} "
        f"(actual {a[idx].item():.6e}, expected {e[idx].item():.6e}); "
        f"max error / max |expected| = {rel:.3e}; relative Frobenius error = {fro:.3e}; "
        f"non-finite entries in actual: {nonfinite}; shape {tuple(a.shape)}"
    )


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    dtype: torch.dtype | None = None,
    msg: str = "",
) -> None:
    """Assert ``|actual − expected| ≤ atol + rtol·|expected|`` elementwise.

    Default tolerances come from ``dtype`` (default: ``expected``'s dtype) via
    :func:`default_tolerances`, with ``atol`` scaled by ``max |expected|``.
    """
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    if actual.shape != expected.shape:
        raise AssertionError(f"{msg}: shape mismatch: actual {tuple(actual.shape)} vs expected {tuple(expected.shape)}")
    dt = dtype or (expected.dtype if expected.is_floating_point() else torch.float64)
    scale = expected.detach().abs().max().item() if expected.numel() else 1.0
    r0, a0 = default_tolerances(dt, scale=max(scale, torch.finfo(dt).tiny))
    rtol = r0 if rtol is None else rtol
    atol = a0 if atol is None else atol
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    ok = torch.isfinite(a).all() and bool(((a - e).abs() <= atol + rtol * e.abs()).all())
    if not ok:
        prefix = f"{msg}: " if msg else ""
        raise AssertionError(f"{prefix}not close (rtol={rtol:.1e}, atol={atol:.1e}): {max_error_report(actual, expected)}")


def assert_symmetric(M: torch.Tensor, *, rtol: float | None = None, msg: str = "") -> None:
    """Assert ``M [n, n]`` equals its transpose up to ``rtol``·max|M| (default from M's dtype)."""
    M = torch.as_tensor(M)
    prefix = f"{msg}: " if msg else ""
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise AssertionError(f"{prefix}expected a square matrix, got shape {tuple(M.shape)}")
    r0, _ = default_tolerances(M.dtype if M.is_floating_point() else torch.float64)
    rtol = r0 if rtol is None else rtol
    A = M.detach().to(torch.float64).cpu()
    scale = A.abs().max().item() if A.numel() else 0.0
    asym = (A - A.T).abs()
    worst = asym.max().item() if A.numel() else 0.0
    if not bool(torch.isfinite(A).all()) or worst > rtol * scale:
        idx = tuple(int(i) for i in torch.unravel_index(torch.nan_to_num(asym, nan=float("inf")).argmax(), A.shape))
        raise AssertionError(
            f"{prefix}expected a symmetric matrix (|M − Mᵀ| ≤ {rtol:.1e}·max|M| = {rtol * scale:.3e}); "
            f"max |M − Mᵀ| = {worst:.3e} at {idx} (M{list(idx)} = {A[idx].item():.6e}, "
            f"M{list(idx[::-1])} = {A[idx[::-1]].item():.6e}); shape {tuple(M.shape)}"
        )


def assert_psd(M: torch.Tensor, *, rtol: float | None = None, msg: str = "") -> None:
    """Assert the symmetric part of ``M [n, n]`` has no eigenvalue below −``rtol``·‖M‖₂.

    Eigenvalues are computed in float64 (``torch.linalg.eigvalsh``); the default ``rtol``
    comes from M's dtype (rounding of a PSD matrix assembled in that dtype).
    """
    M = torch.as_tensor(M)
    prefix = f"{msg}: " if msg else ""
    r0, _ = default_tolerances(M.dtype if M.is_floating_point() else torch.float64)
    rtol = r0 if rtol is None else rtol
    A = M.detach().to(torch.float64).cpu()
    if not bool(torch.isfinite(A).all()):
        raise AssertionError(f"{prefix}expected a finite PSD matrix, got {int((~torch.isfinite(A)).sum())} non-finite entries")
    e = torch.linalg.eigvalsh(0.5 * (A + A.T))
    top = e.abs().max().item() if e.numel() else 0.0
    if e.numel() and e.min().item() < -rtol * top:
        neg = int((e < -rtol * top).sum())
        raise AssertionError(
            f"{prefix}expected a positive semi-definite matrix (eigenvalues ≥ −{rtol:.1e}·‖M‖₂ = {-rtol * top:.3e}); "
            f"smallest eigenvalue {e.min().item():.6e}, {neg} of {e.numel()} below the bound, ‖M‖₂ = {top:.6e}"
        )
