"""The algebraically largest eigenpairs of a symmetric matrix-free operator.

:func:`top_eigenpairs` finds the r largest eigenvalues θ_1 ≥ … ≥ θ_r of a symmetric
M ``[N, N]`` — which may be indefinite — and their eigenvectors, from products M V on
blocks of vectors only.  It is the solver of ``kfac_lowrank`` (the top eigenvectors of the
residual F_ii − A⊗G, which is indefinite) and is general.

Method: restarted block Krylov with Rayleigh–Ritz.  A cycle starts from an orthonormal
block V ``[N, b]`` (b = r + ``oversample``), builds the block Krylov basis
Q = [V, MV, M²V, …] (``depth`` blocks, each orthogonalized twice against all before it and
made orthonormal by QR; a block that vanishes — an invariant subspace — is replaced by
random directions), forms the Rayleigh quotient H = Qᵀ M Q from the products it already
has, and takes the Ritz pairs (θ, u = Q y) of H.  The next cycle restarts from the b
leading Ritz vectors.  Each cycle costs ``depth`` products of M with b vectors.

Stopping rule (as for the SVD solvers, DESIGN.md §10).  With θ_ref = the largest |θ| of
the Ritz values (a lower bound of ‖M‖₂) and ε_round = 4·eps(dtype)·√N, a wanted pair is
accepted when

    ‖M u − θ u‖ ≤ max(tol · |θ|, ε_round · θ_ref),

and a pair with θ ≤ tol · θ_ref is accepted as it is: a caller that keeps only the positive
part (max(θ, 0)) gives it a weight of at most tol · θ_ref.  The rule is invariant under the
scaling of M.  When N ≤ b·depth the basis would span the whole space: M is then formed
from N products and decomposed densely (exact).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from curvlib.errors import ConfigError, ShapeError

__all__ = ["EigenResult", "top_eigenpairs"]


@dataclass(frozen=True)
class EigenResult:
    """The r algebraically largest eigenpairs of a symmetric operator M ``[N, N]``.

    Attributes:
        theta: ``[r]`` eigenvalues, descending (may be negative).
        U: ``[r, N]`` orthonormal eigenvectors (rows; signs arbitrary).
        products: the number of vectors M was applied to.
        residuals: ``[r]`` ‖M u_j − θ_j u_j‖ / max(|θ_j|, ε_round·θ_ref) (0 on the dense path).
        converged: every pair met the stopping rule (module docstring).
    """

    theta: torch.Tensor
    U: torch.Tensor
    products: int
    residuals: torch.Tensor
    converged: bool


def _orthonormal(W: torch.Tensor, against: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """Rows of W ``[k, N]`` made orthonormal and orthogonal to the rows of ``against``
    (projected out twice, then QR, then once more); rows that lose more than half of their
    digits in the projection (norm below √eps of the block's) are replaced by random
    directions, orthogonalized the same way — a nearly dependent row would carry its rounding
    error into the basis and break its orthogonality."""
    k, N = W.shape
    out: torch.Tensor | None = None
    for _ in range(4):
        scale = W.norm(dim=1).amax().clamp_min(torch.finfo(W.dtype).tiny)
        if against is not None:
            for _ in range(2):
                W = W - (W @ against.T) @ against
        Q, R = torch.linalg.qr(W.T)
        weak = R.diagonal().abs() <= math.sqrt(torch.finfo(W.dtype).eps) * scale
        if against is not None and not bool(weak.all()):  # a last pass against rounding in the QR
            kept = Q.T[~weak]
            kept = kept - (kept @ against.T) @ against
            Q2, _ = torch.linalg.qr(kept.T)
            Q = Q.clone()
            Q[:, ~weak] = Q2
        good = Q.T[~weak]
        out = good if out is None else torch.cat([out, good])
        if not bool(weak.any()):
            return out
        against = good if against is None else torch.cat([against, good])
        W = torch.randn(int(weak.sum()), N, generator=generator, dtype=torch.float64,
                        device=generator.device).to(dtype=W.dtype, device=W.device)
    raise ShapeError(f"top_eigenpairs: cannot find {k} orthonormal directions in R^{N} (the basis is full)")


def top_eigenpairs(
    apply: Callable[[torch.Tensor], torch.Tensor],
    N: int,
    r: int,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    tol: float = 1e-6,
    max_iters: int = 50,
    v0: torch.Tensor | None = None,
    oversample: int = 4,
    depth: int = 3,
    generator: torch.Generator | None = None,
) -> EigenResult:
    """The r algebraically largest eigenpairs of a symmetric M ``[N, N]`` (module docstring).

    Args:
        apply: ``V [k, N] -> (M V)ᵀ`` row-wise, i.e. row j of the result is M v_j.
        N: the dimension.
        r: how many pairs (1 ≤ r ≤ N).
        dtype, device: of the vectors.
        tol: relative residual tolerance of each wanted pair.
        max_iters: cap on the cycles.
        v0: ``[k, N]`` start vectors (a warm start: the previous eigenvectors); completed with
            random ones to the block size.
        oversample: extra vectors per block beyond r.
        depth: Krylov blocks per cycle (≥ 2).
        generator: the random starts' generator (a seeded CPU generator by default).

    Returns:
        an :class:`EigenResult`.
    """
    caller = "top_eigenpairs"
    if not (isinstance(r, int) and 1 <= r <= N):
        raise ConfigError(f"{caller}: expected 1 ≤ r ≤ N = {N}, got r = {r!r}")
    if not (tol >= 0 and math.isfinite(tol)) or max_iters < 1 or depth < 2 or oversample < 0:
        raise ConfigError(f"{caller}: expected tol ≥ 0, max_iters ≥ 1, depth ≥ 2, oversample ≥ 0; got "
                          f"{tol}, {max_iters}, {depth}, {oversample}")
    device = torch.device(device)
    if generator is None:
        generator = torch.Generator(device="cpu").manual_seed(0)
    b = min(N, r + oversample)
    if N <= b * depth:
        return _dense(apply, N, r, dtype, device)
    eps_round = 4 * torch.finfo(dtype).eps * math.sqrt(N)

    def randn(k: int) -> torch.Tensor:
        return torch.randn(k, N, generator=generator, dtype=torch.float64,
                           device=generator.device).to(dtype=dtype, device=device)

    start = randn(b) if v0 is None else torch.cat([v0.reshape(-1, N).to(dtype=dtype, device=device)[:b],
                                                   randn(max(0, b - v0.reshape(-1, N).shape[0]))])
    V = _orthonormal(start, None, generator)
    products = 0
    for _ in range(max_iters):
        blocks, images = [V], []
        for j in range(depth):
            W = apply(blocks[-1])
            if W.shape != blocks[-1].shape:
                raise ShapeError(f"{caller}: apply returned {list(W.shape)} for vectors {list(blocks[-1].shape)}")
            images.append(W)
            products += W.shape[0]
            if j < depth - 1:
                blocks.append(_orthonormal(W, torch.cat(blocks), generator))
        Q, MQ = torch.cat(blocks), torch.cat(images)
        H = Q @ MQ.T
        theta, Y = torch.linalg.eigh(0.5 * (H + H.T))
        theta, Y = theta.flip(0), Y.flip(1)
        U, MU = Y[:, :b].T @ Q, Y[:, :b].T @ MQ
        theta_ref = float(theta.abs().max())
        res = (MU[:r] - theta[:r, None] * U[:r]).norm(dim=1)
        floor = eps_round * theta_ref
        denom = torch.maximum(theta[:r].abs(), torch.full_like(theta[:r], max(floor, torch.finfo(dtype).tiny)))
        ok = (res <= torch.clamp(tol * theta[:r].abs(), min=floor)) | (theta[:r] <= tol * theta_ref)
        if theta_ref == 0.0 or bool(ok.all()):
            return EigenResult(theta[:r], U[:r], products, res / denom, True)
        V = _orthonormal(U, None, generator)
    return EigenResult(theta[:r], U[:r], products, res / denom, False)


def _dense(apply, N: int, r: int, dtype: torch.dtype, device: torch.device) -> EigenResult:
    M = apply(torch.eye(N, dtype=dtype, device=device))
    theta, Y = torch.linalg.eigh(0.5 * (M + M.T))
    theta, Y = theta.flip(0)[:r], Y.flip(1)[:, :r]
    return EigenResult(theta, Y.T.contiguous(), N, torch.zeros_like(theta), True)
