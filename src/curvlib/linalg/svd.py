"""Top singular triplets of a matrix-free operator: power SVD and restarted Lanczos.

Both solvers see the operator Z [n_a, n_b] only through ``matvec`` (Z·v) and
``rmatvec`` (Zᵀ·u), so Z(F_ii) of Def. 3.3 is never formed (Prop. 3.1).

- :func:`power_svd` — Algorithm 1 (appendix 3.B.1) for the leading triplet; further
  triplets by deflation (§3.2.3.1): triplet j is the leading triplet of
  Z − Σ_{i<j} σ_i u_i v_iᵀ, applied matrix-free.
- :func:`lanczos_svd` — Golub–Kahan–Lanczos bidiagonalization (Algorithm 2, appendix
  3.B.2, (3.39)–(3.40)) with full reorthogonalization, restarted as in §3.2.3.2 (thick
  restart on the wanted Ritz vectors).

Stopping rule (DESIGN.md §10, "Absolute stopping tolerances").  A triplet (σ, u, v) is
accepted when

    max(‖Zv − σu‖, ‖Zᵀu − σv‖) ≤ max(tol · σ, ε_round · σ_1),

where σ_1 is the largest singular value found and ε_round = 4·eps(dtype)·√max(n_a, n_b)
is the level at which the products themselves are polluted by rounding (it matters only
in float32; in float64 it is ~1e-14).  The test is invariant under scaling of Z, so a
mean-reduced loss with σ ≈ 1e-7 is solved as accurately as one with σ ≈ 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from curvlib.errors import ConfigError, DTypeDeviceError, NumericalError, ShapeError

__all__ = ["MatVecOperator", "SVDResult", "power_svd", "lanczos_svd"]


@runtime_checkable
class MatVecOperator(Protocol):
    """What the solvers need of an operator Z [n_a, n_b] (e.g. a :class:`ZOperator`).

    ``matvec(v [n_b] or [n_b, k]) -> [n_a] or [n_a, k]`` and
    ``rmatvec(u [n_a] or [n_a, k]) -> [n_b] or [n_b, k]``.
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor: ...

    def rmatvec(self, u: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class SVDResult:
    """The k leading singular triplets of an operator Z [n_a, n_b], σ descending.

    Attributes:
        sigma: ``[k]`` singular values σ_1 ≥ … ≥ σ_k ≥ 0.
        U: ``[n_a, k]`` left singular vectors (unit norm).
        V: ``[n_b, k]`` right singular vectors (unit norm).  Signs are arbitrary (a pair
            (u, v) may come back as (−u, −v)); callers that average across refreshes must
            normalize them (DESIGN.md §10, "Sign ambiguity").
        iterations: operator work, counted as the number of steps that each cost one
            product with Z and one with Zᵀ on a single vector: power iterations summed
            over the k triplets (:func:`power_svd`), Lanczos steps summed over restarts
            (:func:`lanczos_svd`).
        residuals: ``[k]`` relative residuals max(‖Zv − σu‖, ‖Zᵀu − σv‖)/σ.  For a
            triplet below the rounding level (σ_j < ε_round·σ_1, module docstring) the
            denominator is ε_round·σ_1 instead; 0 for the zero operator.
        converged: every triplet met the stopping rule of the module docstring.
    """

    sigma: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor
    iterations: int
    residuals: torch.Tensor
    converged: bool


# --------------------------------------------------------------------------- helpers


def _dims(op: MatVecOperator) -> tuple[int, int]:
    n_a, n_b = (int(s) for s in op.shape)
    return n_a, n_b


def _rounding_floor(dtype: torch.dtype, n_a: int, n_b: int) -> float:
    """ε_round of the module docstring: relative noise level of a product with Z."""
    return 4.0 * torch.finfo(dtype).eps * math.sqrt(max(n_a, n_b))


def _check_options(*, k: int, n_a: int, n_b: int, tol: float, caller: str) -> None:
    if not 1 <= k <= min(n_a, n_b):
        raise ConfigError(f"{caller}: k must be in [1, min(n_a, n_b)] = [1, {min(n_a, n_b)}], got k={k}")
    if not (math.isfinite(tol) and tol >= 0):
        raise ConfigError(f"{caller}: tol must be a finite number ≥ 0, got {tol}")


def _default_generator(device: torch.device) -> torch.Generator:
    # A fixed seed makes two calls on the same operator return the same triplets.
    return torch.Generator(device=device).manual_seed(0)


def _check_generator(generator: torch.Generator, device: torch.device, caller: str) -> None:
    if generator.device.type != device.type:
        raise DTypeDeviceError(f"{caller}: generator is on {generator.device}, operator is on {device}")


def _start_block(v0: torch.Tensor | None, n_b: int, op: MatVecOperator, caller: str) -> torch.Tensor | None:
    """Validate a warm start ``v0 [n_b] or [n_b, c]`` and return it as ``[n_b, c]``."""
    if v0 is None:
        return None
    if v0.dtype != op.dtype or v0.device != op.device:
        raise DTypeDeviceError(f"{caller}: operator is {op.dtype} on {op.device}, v0 is {v0.dtype} on {v0.device}")
    if v0.ndim == 1 and v0.shape[0] == n_b:
        return v0.unsqueeze(-1)
    if v0.ndim == 2 and v0.shape[0] == n_b and v0.shape[1] >= 1:
        return v0
    raise ShapeError(f"{caller}: v0 must be [{n_b}] or [{n_b}, c] with c ≥ 1, got {list(v0.shape)}")


def _finite_or_raise(x: torch.Tensor, what: str, caller: str) -> torch.Tensor:
    if not bool(torch.isfinite(x).all()):
        raise NumericalError(f"{caller}: {what} returned non-finite values (expected a finite vector)")
    return x


def _random_unit(n: int, basis: torch.Tensor | None, *, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random unit vector ``[n]``, orthogonal to the columns of ``basis [n, j]`` (j < n)."""
    for _ in range(8):
        x = torch.randn(n, generator=generator, dtype=like.dtype, device=like.device)
        if basis is not None and basis.shape[1] > 0:
            # twice is enough (Kahan–Parlett) for a numerically orthogonal result
            x = x - basis @ (basis.T @ x)
            x = x - basis @ (basis.T @ x)
        norm = torch.linalg.vector_norm(x)
        if norm > 0:
            return x / norm
    raise NumericalError(f"could not draw a unit vector orthogonal to a [{n}, {basis.shape[1]}] basis")


def _relative_residuals(abs_res: torch.Tensor, sigma: torch.Tensor, eps_round: float) -> torch.Tensor:
    """abs_res / max(σ_j, ε_round·σ_1), with 0/0 = 0 (the zero operator).

    Below the rounding level of the operator σ_j carries no information, so a
    numerically zero triplet is measured against that level instead of reading ``inf``.
    """
    denom = torch.clamp(sigma, min=eps_round * float(sigma.max()))
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(denom > 0, abs_res / safe, torch.where(abs_res > 0, math.inf, 0.0).to(abs_res))


# --------------------------------------------------------------------------- power SVD


def power_svd(
    op: MatVecOperator,
    k: int = 1,
    *,
    tol: float = 1e-6,
    max_iters: int = 100,
    v0: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SVDResult:
    """The k leading singular triplets of Z by the power SVD algorithm with deflation.

    Algorithm 1 (appendix 3.B.1) for each triplet: w = Zv, u = w/‖w‖, z = Zᵀu,
    σ = ‖z‖, v = z/σ, until ‖Zv − σu‖ ≤ max(tol·σ, ε_round·σ_1) (relative; see the module
    docstring).  Since v = Zᵀu/σ exactly, ‖Zᵀu − σv‖ = 0 and that test is the full
    residual.  Triplet j (j > 1) is the leading triplet of the deflated operator
    Z − Σ_{i<j} σ_i u_i v_iᵀ (§3.2.3.1, the Z(F̂) = Z(F) − vec(R)vec(S)ᵀ step), applied
    matrix-free; its residual is measured on that deflated operator.

    Args:
        op: the operator Z ``[n_a, n_b]`` (``matvec``, ``rmatvec``, ``shape``, ``dtype``,
            ``device``).
        k: number of triplets, 1 ≤ k ≤ min(n_a, n_b).
        tol: relative tolerance on the residual.
        max_iters: cap on power iterations per triplet.
        v0: ``[n_b]`` or ``[n_b, c]`` warm start; column j starts triplet j (columns
            beyond k are ignored, triplets beyond c start at random).
        generator: source of the random starts; default a generator on ``op.device``
            seeded with 0, so results are deterministic.

    Returns:
        :class:`SVDResult` (``iterations`` = power iterations summed over triplets; each
        is one product with Z and one with Zᵀ).  A warm start in the null space of the
        (deflated) operator is replaced by a random one.  If the deflated operator is
        numerically zero (its σ estimate stays ≤ 10·eps·√max(n_a, n_b)·σ_1 after three power
        steps, or a product is exactly zero), the triplet is σ = 0 with unit vectors orthogonal to the
        previous ones, so asking for more triplets than the rank is safe.
    """
    caller = "power_svd"
    n_a, n_b = _dims(op)
    _check_options(k=k, n_a=n_a, n_b=n_b, tol=tol, caller=caller)
    if max_iters < 1:
        raise ConfigError(f"{caller}: max_iters must be ≥ 1, got {max_iters}")
    starts = _start_block(v0, n_b, op, caller)
    generator = generator if generator is not None else _default_generator(op.device)
    _check_generator(generator, op.device, caller)
    eps_round = _rounding_floor(op.dtype, n_a, n_b)
    like = torch.empty(0, dtype=op.dtype, device=op.device)

    sigmas = torch.zeros(k, dtype=op.dtype, device=op.device)
    U = torch.zeros(n_a, k, dtype=op.dtype, device=op.device)
    V = torch.zeros(n_b, k, dtype=op.dtype, device=op.device)
    abs_res = torch.zeros(k, dtype=op.dtype, device=op.device)
    total_iters = 0
    all_converged = True
    sigma_1 = 0.0

    for j in range(k):
        U_prev, V_prev, s_prev = U[:, :j], V[:, :j], sigmas[:j]

        def deflated_matvec(v: torch.Tensor) -> torch.Tensor:
            out = op.matvec(v) - U_prev @ (s_prev * (V_prev.T @ v))
            return _finite_or_raise(out, "matvec", caller)

        def deflated_rmatvec(u: torch.Tensor) -> torch.Tensor:
            out = op.rmatvec(u) - V_prev @ (s_prev * (U_prev.T @ u))
            return _finite_or_raise(out, "rmatvec", caller)

        if starts is not None and j < starts.shape[1] and bool(torch.linalg.vector_norm(starts[:, j]) > 0):
            v = starts[:, j] / torch.linalg.vector_norm(starts[:, j])
            warm = True
        else:
            v = _random_unit(n_b, None, like=like, generator=generator)
            warm = False
        # below this, a product with the deflated operator is rounding noise of the
        # subtracted terms (exactly 0 for j = 0): the deflated operator is numerically 0
        zero_tol = 10.0 * torch.finfo(op.dtype).eps * math.sqrt(max(n_a, n_b)) * sigma_1
        w = deflated_matvec(v)
        if warm and float(torch.linalg.vector_norm(w)) <= zero_tol:
            # the warm start lies in the null space; power iteration cannot leave it
            v = _random_unit(n_b, None, like=like, generator=generator)
            w = deflated_matvec(v)

        converged = False
        vanished = float(torch.linalg.vector_norm(w)) == 0.0
        sigma = torch.zeros((), dtype=op.dtype, device=op.device)
        res = torch.zeros((), dtype=op.dtype, device=op.device)
        for it in range(max_iters if not vanished else 0):
            alpha = torch.linalg.vector_norm(w)
            if float(alpha) == 0.0:
                vanished = True
                break
            u = w / alpha
            z = deflated_rmatvec(u)
            sigma = torch.linalg.vector_norm(z)
            if float(sigma) == 0.0:
                vanished = True
                break
            v = z / sigma
            w = deflated_matvec(v)
            total_iters += 1
            res = torch.linalg.vector_norm(w - sigma * u)
            s = float(sigma)
            if float(res) <= max(tol * s, eps_round * max(sigma_1, s)):
                converged = True
                break
            # σ_it = ‖Zᵀu‖ never decreases along power iterations, and after one step it
            # already sees the deflated operator's leading σ (a random start only sees
            # σ·√(rank/n_b), far below it): still at rounding-noise level after a few
            # steps means the deflated operator is numerically zero.
            if it >= 2 and s <= zero_tol:
                vanished = True
                break
        if vanished or float(sigma) <= zero_tol:
            # unit vectors orthogonal to the previous ones keep U and V orthonormal
            u = _random_unit(n_a, U_prev, like=like, generator=generator)
            v = _random_unit(n_b, V_prev, like=like, generator=generator)
            sigma = torch.zeros((), dtype=op.dtype, device=op.device)
            res = torch.zeros((), dtype=op.dtype, device=op.device)
            converged = True
        sigmas[j], U[:, j], V[:, j], abs_res[j] = sigma, u, v, res
        sigma_1 = max(sigma_1, float(sigma))
        all_converged = all_converged and converged

    return SVDResult(
        sigma=sigmas,
        U=U,
        V=V,
        iterations=total_iters,
        residuals=_relative_residuals(abs_res, sigmas, eps_round),
        converged=all_converged,
    )


# --------------------------------------------------------------------------- Lanczos


def lanczos_svd(
    op: MatVecOperator,
    k: int = 2,
    *,
    krylov_dim: int | None = None,
    tol: float = 1e-6,
    max_restarts: int = 50,
    v0: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SVDResult:
    """The k leading singular triplets of Z by restarted Lanczos bidiagonalization.

    Algorithm 2 (appendix 3.B.2) builds orthonormal Q ``[n_b, K]``, P ``[n_a, K]`` and a
    small upper-triangular H ``[K, K]`` (bidiagonal in the first cycle) with

        Z Q = P H,        Zᵀ P = Q Hᵀ + β q_K e_Kᵀ,

    reorthogonalizing every new vector against the whole basis (K is small).  With
    H = X Σ Yᵀ (3.40), the Ritz triplets are (σ_i, P x_i, Q y_i), and Z v_i = σ_i u_i
    holds exactly while ‖Zᵀu_i − σ_i v_i‖ = |β · X[K, i]| — the stopping test (relative,
    see the module docstring) costs nothing.  If it fails, the cycle restarts (§3.2.3.2)
    thickly: the leading Ritz vectors are kept (the k wanted plus half of the rest of
    the basis), q_K continues the bidiagonalization, and H becomes the arrow matrix
    [diag(σ), ρ; 0, α] with ρ_i = β X[K, i], which the reorthogonalization coefficients
    produce by themselves.

    Breakdown (β ≈ 0: the Krylov space is invariant under ZᵀZ) with at least k Ritz
    triplets ends the run: they are exact singular triplets.  With fewer, the
    bidiagonalization continues from a random direction orthogonal to the basis (β = 0
    in H keeps the found triplets exact).  When the basis spans the whole (smaller) space
    the result is the exact SVD.  As with every Krylov method, a start vector with no
    component along a leading right singular vector cannot find it; random starts have
    one with probability 1.

    When n_a < n_b the same algorithm runs on Zᵀ, so the right basis lives in the smaller
    space and krylov_dim = min(n_a, n_b) gives the exact SVD in one cycle.

    Args:
        op: the operator Z ``[n_a, n_b]``.
        k: number of triplets, 1 ≤ k ≤ min(n_a, n_b).
        krylov_dim: K, the basis size per cycle; default min(max(2k + 8, 10), n), clamped
            to n = min(n_a, n_b); must exceed k unless it equals n.
        tol: relative tolerance on the residual.
        max_restarts: cap on restarts (so at most ``max_restarts + 1`` cycles).
        v0: ``[n_b]`` or ``[n_b, c]`` warm start; the columns (normalized) are summed
            into one start vector, which contains all of them in its Krylov space.
        generator: source of random vectors (default: seeded with 0 on ``op.device``).

    Returns:
        :class:`SVDResult` (``iterations`` = Lanczos steps summed over cycles, each one
        product with Z and one with Zᵀ).  ``residuals`` are recomputed from the operator
        at the end (one product of Z and of Zᵀ with a ``[·, k]`` block).
    """
    caller = "lanczos_svd"
    n_a, n_b = _dims(op)
    _check_options(k=k, n_a=n_a, n_b=n_b, tol=tol, caller=caller)
    if max_restarts < 0:
        raise ConfigError(f"{caller}: max_restarts must be ≥ 0, got {max_restarts}")
    n = min(n_a, n_b)
    K = min(max(2 * k + 8, 10), n) if krylov_dim is None else min(int(krylov_dim), n)
    if K < n and K <= k:
        raise ConfigError(f"{caller}: krylov_dim must be > k={k} (or ≥ min(n_a, n_b)={n}), got {krylov_dim}")
    starts = _start_block(v0, n_b, op, caller)
    generator = generator if generator is not None else _default_generator(op.device)
    _check_generator(generator, op.device, caller)
    eps_round = _rounding_floor(op.dtype, n_a, n_b)
    eps = torch.finfo(op.dtype).eps
    like = torch.empty(0, dtype=op.dtype, device=op.device)

    # run on Zᵀ when the left space is the smaller one: "rows" is the left dimension of
    # the operator the bidiagonalization sees, "cols" its right dimension (cols ≤ rows)
    transposed = n_a < n_b
    if transposed:
        rows, cols = n_b, n_a
        raw_mv, raw_rmv = op.rmatvec, op.matvec
    else:
        rows, cols = n_a, n_b
        raw_mv, raw_rmv = op.matvec, op.rmatvec

    def mv(x: torch.Tensor) -> torch.Tensor:
        return _finite_or_raise(raw_mv(x), "matvec" if not transposed else "rmatvec", caller)

    def rmv(x: torch.Tensor) -> torch.Tensor:
        return _finite_or_raise(raw_rmv(x), "rmatvec" if not transposed else "matvec", caller)

    steps = 0
    q0 = None
    if starts is not None:
        norms = torch.linalg.vector_norm(starts, dim=0)
        if bool((norms > 0).any()):
            q0 = (starts[:, norms > 0] / norms[norms > 0]).sum(dim=1)
            if transposed:
                # a right start of Z is a left start of Zᵀ: map it to Zᵀ's right space
                q0 = _finite_or_raise(op.matvec(q0), "matvec", caller)
                steps += 1
            if not bool(torch.linalg.vector_norm(q0) > 0):
                q0 = None
    if q0 is None:
        q0 = _random_unit(cols, None, like=like, generator=generator)
    else:
        q0 = q0 / torch.linalg.vector_norm(q0)

    Q = torch.zeros(cols, K + 1, dtype=op.dtype, device=op.device)
    P = torch.zeros(rows, K, dtype=op.dtype, device=op.device)
    H = torch.zeros(K, K, dtype=op.dtype, device=op.device)
    Q[:, 0] = q0

    def ritz(m: int, beta_last: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """SVD of H[:m, :m] (3.40) and whether the k leading Ritz triplets pass the test.

        The residual of Ritz triplet i is |β_last · X[m-1, i]| (Zᵀ P = Q Hᵀ + β q eᵀ).
        """
        X, s, Yt = torch.linalg.svd(H[:m, :m])
        est = (beta_last * X[m - 1, :k]).abs()
        floor = eps_round * float(s[0])
        ok = all(float(est[i]) <= max(tol * float(s[i]), floor) for i in range(k))
        return X, s, Yt.T, ok

    norm_est = 0.0  # running estimate of ‖Z‖ (largest coefficient seen) for breakdown tests
    j_start = 0

    for cycle in range(max_restarts + 1):
        m = K
        beta_last = 0.0
        exact = False
        for j in range(j_start, K):
            # --- left step: p_j from Z q_j, orthogonal to p_0..p_{j-1}
            w = mv(Q[:, j])
            steps += 1
            Pj = P[:, :j]
            h = Pj.T @ w
            w = w - Pj @ h
            h2 = Pj.T @ w
            w = w - Pj @ h2
            h = h + h2
            alpha = float(torch.linalg.vector_norm(w))
            norm_est = max(norm_est, alpha, float(h.abs().max()) if j > 0 else 0.0)
            breakdown_tol = 10.0 * eps * math.sqrt(rows) * norm_est
            if alpha <= breakdown_tol:
                # Z q_j lies in span(P): any unit p_j orthogonal to P keeps Z Q = P H
                P[:, j] = _random_unit(rows, Pj, like=like, generator=generator)
                alpha = 0.0
            else:
                P[:, j] = w / alpha
            H[:j, j] = h
            H[j, j] = alpha
            # --- right step: q_{j+1} from Zᵀ p_j, orthogonal to q_0..q_j
            z = rmv(P[:, j])
            Qj = Q[:, : j + 1]
            z = z - Qj @ (Qj.T @ z)
            z = z - Qj @ (Qj.T @ z)
            beta = float(torch.linalg.vector_norm(z))
            norm_est = max(norm_est, beta)
            breakdown_tol = 10.0 * eps * math.sqrt(cols) * norm_est
            if beta <= breakdown_tol:
                if j + 1 >= k or j + 1 >= cols:
                    m, beta_last, exact = j + 1, 0.0, True
                    break
                # invariant subspace smaller than k: continue in a fresh direction
                Q[:, j + 1] = _random_unit(cols, Qj, like=like, generator=generator)
                beta = 0.0
            else:
                Q[:, j + 1] = z / beta
            beta_last = beta
            if k <= j + 1 < K and ritz(j + 1, beta_last)[3]:
                # converged before the basis is full (typical of a warm start)
                m = j + 1
                break

        X, s, Y, converged = ritz(m, beta_last)
        converged = converged or exact
        if converged or cycle == max_restarts:
            break
        # thick restart: keep the leading Ritz vectors, continue from q_K
        keep = min(K - 1, k + (K - k) // 2)
        Q[:, :keep] = Q[:, :m] @ Y[:, :keep]
        Q[:, keep] = Q[:, m]
        P[:, :keep] = P[:, :m] @ X[:, :keep]
        H.zero_()
        H[:keep, :keep] = torch.diag(s[:keep])
        j_start = keep

    sigma = s[:k].clone()
    left = P[:, :m] @ X[:, :k]
    right = Q[:, :m] @ Y[:, :k]
    U, V = (right, left) if transposed else (left, right)

    # honest residuals, from the operator itself
    r1 = torch.linalg.vector_norm(op.matvec(V) - U * sigma, dim=0)
    r2 = torch.linalg.vector_norm(op.rmatvec(U) - V * sigma, dim=0)
    abs_res = torch.maximum(r1, r2)
    floor = eps_round * float(sigma[0])
    converged = all(float(abs_res[i]) <= max(tol * float(sigma[i]), floor) for i in range(k))
    return SVDResult(
        sigma=sigma,
        U=U,
        V=V,
        iterations=steps,
        residuals=_relative_residuals(abs_res, sigma, eps_round),
        converged=converged,
    )
