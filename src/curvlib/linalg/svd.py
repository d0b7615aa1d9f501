"""Top singular triplets of a matrix-free operator: power SVD and restarted Lanczos.

Both solvers see the operator Z [n_a, n_b] only through products, so Z(F_ii) of Def. 3.3
is never formed (Prop. 3.1).

- :func:`power_svd` — Algorithm 1 (appendix 3.B.1) for the leading triplet; further
  triplets by deflation (§3.2.3.1): triplet j is the leading triplet of
  Z − Σ_{i<j} σ_i u_i v_iᵀ, applied matrix-free.
- :func:`lanczos_svd` — Golub–Kahan–Lanczos bidiagonalization (Algorithm 2, appendix
  3.B.2, (3.39)–(3.40)) with full reorthogonalization, restarted as in §3.2.3.2 (thick
  restart on the wanted Ritz vectors).

Two kinds of operators.

- A :class:`MatVecOperator` (e.g. a :class:`~curvlib.linalg.zproducts.ZOperator`): the
  solvers iterate on vectors of R^{n_b} and R^{n_a}, one ``matvec``/``rmatvec`` per step.
- A :class:`GramOperator`: Z = X C Yᵀ with X ``[n_a, N_a]``, Y ``[n_b, N_b]`` known only
  through their Gram matrices G_a = XᵀX, G_b = YᵀY and a core C ``[N_a, N_b]``.  A Fisher
  block of m samples is such an operator, Z(F) = scale·Σ_b vec(ā_b ā_bᵀ) vec(g_b g_bᵀ)ᵀ
  (Prop. 3.1), with N = m (:class:`~curvlib.linalg.zproducts.GramForm`).  Every vector
  the solvers produce after their start is Z v = X (C Yᵀv) or Zᵀu = Y (Cᵀ Xᵀu), so they
  iterate on **coefficient vectors** — u = X α, v = Y β — with the inner products
  ⟨u, u'⟩ = αᵀ G_a α' and ⟨v, v'⟩ = βᵀ G_b β': the same iterates as on the vectors
  themselves, at O(N²) per step instead of a product with Z.  Each vector travels with its
  *image* (G_a α or G_b β, which is also Xᵀu or Yᵀv), so a step costs one product with
  each Gram matrix.  A start v₀ of R^{n_b} (a warm start) enters only through its images
  (:meth:`GramOperator.start_right_images`: Yᵀv₀, or those of a cheaper start near v₀); the
  returned U, V are coefficients (u_j = X U[:, j]).
  The stopping and breakdown tests use Z's shape and dtype (not the coefficients'), so
  they are the tests of the same iteration on the vectors.

Stopping rule (DESIGN.md §10, "Absolute stopping tolerances").  A triplet (σ, u, v) is
accepted when

    max(‖Zv − σu‖, ‖Zᵀu − σv‖) ≤ max(tol · σ, ε_round · σ_1),

where σ_1 is the largest singular value found and ε_round = 4·eps(dtype)·√max(n_a, n_b)
is the level at which the products themselves are polluted by rounding (it matters only
in float32; in float64 it is ~1e-14).  The test is invariant under scaling of Z, so a
mean-reduced loss with σ ≈ 1e-7 is solved as accurately as one with σ ≈ 1.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from curvlib.errors import ConfigError, DTypeDeviceError, NumericalError, ShapeError

__all__ = ["GramOperator", "MatVecOperator", "SVDResult", "power_svd", "lanczos_svd"]


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


class GramOperator(abc.ABC):
    """Z = X C Yᵀ ``[n_a, n_b]`` held through Gram matrices (module docstring).

    X ``[n_a, N_a]`` and Y ``[n_b, N_b]`` are never formed.  A left vector u = Xα is
    represented by its coefficients α ``[N_a]``, a right vector v = Yβ by β ``[N_b]``;
    every method takes and returns ``[N]`` or ``[N, k]`` (k vectors as columns).

    Subclasses provide :attr:`shape` (n_a, n_b), :attr:`coefficient_shape` (N_a, N_b),
    :attr:`dtype` (Z's: the rounding level of the tolerances), :attr:`work_dtype` (the
    coefficients' and the Gram matrices'), :attr:`device`, and the five methods.
    """

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, int]:
        """(n_a, n_b), the shape of Z."""

    @property
    @abc.abstractmethod
    def coefficient_shape(self) -> tuple[int, int]:
        """(N_a, N_b), the numbers of columns of X and Y."""

    @property
    @abc.abstractmethod
    def dtype(self) -> torch.dtype:
        """Z's dtype: the tolerances are those of products with Z in it."""

    @property
    @abc.abstractmethod
    def work_dtype(self) -> torch.dtype:
        """The dtype of the coefficients and the Gram matrices."""

    @property
    @abc.abstractmethod
    def device(self) -> torch.device: ...

    @abc.abstractmethod
    def metric_a(self, alpha: torch.Tensor) -> torch.Tensor:
        """G_a α = Xᵀ(Xα): ``[N_a(, k)]`` -> ``[N_a(, k)]``.  The Gram matrices and the core are
        finite (:class:`~curvlib.errors.NumericalError` otherwise, when they are formed), so
        the solvers do not check each step's product."""

    @abc.abstractmethod
    def metric_b(self, beta: torch.Tensor) -> torch.Tensor:
        """G_b β = Yᵀ(Yβ): ``[N_b(, k)]`` -> ``[N_b(, k)]``."""

    @abc.abstractmethod
    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """The coefficients C y of Z v, given y = Yᵀv: ``[N_b(, k)]`` -> ``[N_a(, k)]``."""

    @abc.abstractmethod
    def backward(self, x: torch.Tensor) -> torch.Tensor:
        """The coefficients Cᵀ x of Zᵀu, given x = Xᵀu: ``[N_a(, k)]`` -> ``[N_b(, k)]``."""

    @abc.abstractmethod
    def right_images(self, v: torch.Tensor) -> torch.Tensor:
        """Yᵀv for vectors of Z's right space: ``[n_b(, k)]`` (in :attr:`dtype`) -> ``[N_b(, k)]``."""

    def start_right_images(self, v: torch.Tensor) -> torch.Tensor:
        """The images of warm starts ``v [n_b(, k)]``: Yᵀv' for starts v' near v.  The solvers
        converge to the same triplets from any start with a component along them, so an
        operator may return the images of a start that are cheaper to form (a
        :class:`~curvlib.linalg.zproducts.GramForm` sketches MAT(v) at rank 8).  Default:
        :meth:`right_images`, v' = v."""
        return self.right_images(v)


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

    For a :class:`GramOperator`, U ``[N_a, k]`` and V ``[N_b, k]`` are coefficients
    (u_j = X U[:, j], unit in the G_a metric) and every tensor is in its ``work_dtype``; a
    triplet with σ_j = 0 may have zero coefficients when span(X) or span(Y) holds no unit
    vector orthogonal to the previous ones (its vector then lies outside the spans, where
    Z and Zᵀ vanish).
    """

    sigma: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor
    iterations: int
    residuals: torch.Tensor
    converged: bool


# --------------------------------------------------------------------------- helpers


def _dims(op: MatVecOperator | GramOperator) -> tuple[int, int]:
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


def _start_block(v0: torch.Tensor | None, n_b: int, op: MatVecOperator | GramOperator, caller: str) -> torch.Tensor | None:
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


def _all_finite(x: torch.Tensor) -> bool:
    """Every entry of x is finite: its min and max are (both propagate NaN) — two fused
    reductions, ~20× cheaper than ``isfinite(x).all()`` on CPU."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _finite_or_raise(x: torch.Tensor, what: str, caller: str) -> torch.Tensor:
    if not _all_finite(x):
        raise NumericalError(f"{caller}: {what} returned non-finite values (expected a finite vector)")
    return x


def _relative_residuals(abs_res: torch.Tensor, sigma: torch.Tensor, eps_round: float) -> torch.Tensor:
    """abs_res / max(σ_j, ε_round·σ_1), with 0/0 = 0 (the zero operator).

    Below the rounding level of the operator σ_j carries no information, so a
    numerically zero triplet is measured against that level instead of reading ``inf``.
    """
    denom = torch.clamp(sigma, min=eps_round * float(sigma.max()))
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(denom > 0, abs_res / safe, torch.where(abs_res > 0, math.inf, 0.0).to(abs_res))


# --------------------------------------------------------------------------- the solvers' vectors


class _Vectors(abc.ABC):
    """How a solver computes with the vectors of one operator (module docstring).

    A vector x (of the left space, or of the right space) travels with its image x̂: the
    vector itself for plain vectors, G x for coefficients in a Gram metric.  Inner products
    are ⟨x, y⟩ = xᵀŷ, and products take images: ``mv(v̂)`` is Z v, ``rmv(û)`` is Zᵀu.
    :meth:`T` is the same for Zᵀ (left and right swapped).

    Attributes:
        shape: (n_left, n_right) of the operator the solver sees (Z, or Zᵀ), in vectors.
        coefficients: (N_left, N_right), the sizes of the tensors the solver holds.
        plain: images are the vectors themselves.
    """

    shape: tuple[int, int]
    coefficients: tuple[int, int]
    plain: bool
    work_dtype: torch.dtype

    def __init__(self, caller: str, transposed: bool) -> None:
        self.caller = caller
        self.transposed = transposed

    @abc.abstractmethod
    def mv(self, v_img: torch.Tensor) -> torch.Tensor:
        """Z v from v̂ (finite, or :class:`NumericalError`)."""

    @abc.abstractmethod
    def rmv(self, u_img: torch.Tensor) -> torch.Tensor:
        """Zᵀ u from û."""

    @abc.abstractmethod
    def image_left(self, x: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def image_right(self, x: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def start_images(self, V: torch.Tensor) -> torch.Tensor:
        """The images ``[N_right, c]`` of vectors ``[n_b, c]`` of Z's right space (warm starts)."""

    @abc.abstractmethod
    def norm(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        """‖x‖ per column: ``[N]`` -> 0-d, ``[N, k]`` -> ``[k]``."""

    @abc.abstractmethod
    def T(self) -> _Vectors:
        """The same for Zᵀ."""

    def _random(self, n: int, image, basis: torch.Tensor | None, basis_img: torch.Tensor | None,
                generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A random unit vector (x, x̂) orthogonal to ``basis [N, j]`` (images ``basis_img``),
        or ``None`` when the space holds none (after 8 draws)."""
        for _ in range(8):
            x = torch.randn(n, generator=generator, dtype=self.work_dtype, device=device)
            size = None if self.plain else self.norm(x, image(x))
            if basis is not None and basis.shape[1] > 0:
                # twice is enough (Kahan–Parlett) for a numerically orthogonal result
                x = x - basis @ (basis_img.T @ x)
                x = x - basis @ (basis_img.T @ x)
            img = x if self.plain else image(x)
            norm = self.norm(x, img)
            # coefficients of a vector of a (numerically) exhausted span are rounding noise
            if (norm > 0) if self.plain else (norm > 1e-8 * size):
                return x / norm, (x / norm if self.plain else img / norm)
        return None

    def random_left(self, basis, basis_img, generator, device):
        return self._random(self.coefficients[0], self.image_left, basis, basis_img, generator, device)

    def random_right(self, basis, basis_img, generator, device):
        return self._random(self.coefficients[1], self.image_right, basis, basis_img, generator, device)


class _Plain(_Vectors):
    """Vectors of R^n with the Euclidean inner product; products by ``matvec``/``rmatvec``."""

    plain = True

    def __init__(self, op: MatVecOperator, caller: str, transposed: bool = False) -> None:
        super().__init__(caller, transposed)
        self.op = op
        n_a, n_b = _dims(op)
        self.shape = (n_b, n_a) if transposed else (n_a, n_b)
        self.coefficients = self.shape
        self.work_dtype = op.dtype

    def mv(self, v_img):
        f, what = (self.op.rmatvec, "rmatvec") if self.transposed else (self.op.matvec, "matvec")
        return _finite_or_raise(f(v_img), what, self.caller)

    def rmv(self, u_img):
        f, what = (self.op.matvec, "matvec") if self.transposed else (self.op.rmatvec, "rmatvec")
        return _finite_or_raise(f(u_img), what, self.caller)

    def image_left(self, x):
        return x

    def image_right(self, x):
        return x

    def start_images(self, V):
        return V

    def norm(self, x, img):
        return torch.linalg.vector_norm(x, dim=0)

    def T(self):
        return _Plain(self.op, self.caller, not self.transposed)


class _Gram(_Vectors):
    """Coefficients in the Gram metrics of a :class:`GramOperator` (module docstring)."""

    plain = False

    def __init__(self, op: GramOperator, caller: str, transposed: bool = False) -> None:
        super().__init__(caller, transposed)
        self.op = op
        n_a, n_b = _dims(op)
        N_a, N_b = (int(s) for s in op.coefficient_shape)
        self.shape = (n_b, n_a) if transposed else (n_a, n_b)
        self.coefficients = (N_b, N_a) if transposed else (N_a, N_b)
        self.work_dtype = op.work_dtype

    # no finiteness check per step: the products are O(N²) with finite Gram matrices (checked
    # once by the operator) and a finite core, so only the start images can bring in inf/NaN
    def mv(self, v_img):
        return self.op.backward(v_img) if self.transposed else self.op.forward(v_img)

    def rmv(self, u_img):
        return self.op.forward(u_img) if self.transposed else self.op.backward(u_img)

    def image_left(self, x):
        return self.op.metric_b(x) if self.transposed else self.op.metric_a(x)

    def image_right(self, x):
        return self.op.metric_a(x) if self.transposed else self.op.metric_b(x)

    def start_images(self, V):
        assert not self.transposed  # a start of Zᵀ is Z v₀: lanczos_svd maps it with the untransposed view
        return _finite_or_raise(self.op.start_right_images(V).to(self.work_dtype), "right_images", self.caller)

    def norm(self, x, img):
        # x̂ = Gx with G PSD: xᵀx̂ ≥ 0 up to rounding
        return (x * img).sum(0).clamp_min(0).sqrt()

    def T(self):
        return _Gram(self.op, self.caller, not self.transposed)


def _vectors(op: MatVecOperator | GramOperator, caller: str) -> _Vectors:
    return _Gram(op, caller) if isinstance(op, GramOperator) else _Plain(op, caller)


def _unit_or_zero(vectors: _Vectors, side: str, basis, basis_img, generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A random unit vector of one side orthogonal to ``basis``; zero coefficients when a Gram
    span holds none (see :class:`SVDResult`)."""
    draw = vectors.random_left if side == "left" else vectors.random_right
    got = draw(basis, basis_img, generator, device)
    if got is not None:
        return got
    n = vectors.coefficients[0 if side == "left" else 1]
    if vectors.plain:
        raise NumericalError(f"could not draw a unit vector orthogonal to a [{n}, {basis.shape[1]}] basis")
    zero = torch.zeros(n, dtype=vectors.work_dtype, device=device)
    return zero, zero


# --------------------------------------------------------------------------- power SVD


def power_svd(
    op: MatVecOperator | GramOperator,
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
    matrix-free; its residual is measured on that deflated operator.  The product
    w = Zv that tests an iterate is the first product of the next iteration, so a
    triplet costs 1 + 2·(iterations) products.

    Args:
        op: the operator Z ``[n_a, n_b]``: a :class:`MatVecOperator` (``matvec``,
            ``rmatvec``, ``shape``, ``dtype``, ``device``), or a :class:`GramOperator`
            (the iteration on coefficients, module docstring).
        k: number of triplets, 1 ≤ k ≤ min(n_a, n_b).
        tol: relative tolerance on the residual.
        max_iters: cap on power iterations per triplet.
        v0: ``[n_b]`` or ``[n_b, c]`` warm start (vectors of Z's right space, in ``op.dtype``,
            also for a :class:`GramOperator`); column j starts triplet j (columns beyond k
            are ignored, triplets beyond c start at random).
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
    vectors = _vectors(op, caller)
    n_a, n_b = _dims(op)
    _check_options(k=k, n_a=n_a, n_b=n_b, tol=tol, caller=caller)
    if max_iters < 1:
        raise ConfigError(f"{caller}: max_iters must be ≥ 1, got {max_iters}")
    starts = _start_block(v0, n_b, op, caller)
    generator = generator if generator is not None else _default_generator(op.device)
    _check_generator(generator, op.device, caller)
    eps_round = _rounding_floor(op.dtype, n_a, n_b)
    eps = torch.finfo(op.dtype).eps
    N_a, N_b = vectors.coefficients
    kw = {"dtype": vectors.work_dtype, "device": op.device}

    start_imgs = None
    if starts is not None:
        norms = torch.linalg.vector_norm(starts[:, :k], dim=0)
        usable = (norms > 0).tolist()
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        start_imgs = vectors.start_images(starts[:, :k] / safe)

    sigmas = torch.zeros(k, **kw)
    U, V = torch.zeros(N_a, k, **kw), torch.zeros(N_b, k, **kw)
    # images of the columns of U and V (the same tensors for plain vectors)
    UI, VI = (U, V) if vectors.plain else (torch.zeros(N_a, k, **kw), torch.zeros(N_b, k, **kw))
    abs_res = torch.zeros(k, **kw)
    total_iters = 0
    all_converged = True
    sigma_1 = 0.0

    for j in range(k):
        U_prev, V_prev, UI_prev, VI_prev, s_prev = U[:, :j], V[:, :j], UI[:, :j], VI[:, :j], sigmas[:j]

        # ⟨v_i, v⟩ = v_iᵀ v̂ (coefficients of the basis against the image of v)
        def deflated_mv(v_img: torch.Tensor) -> torch.Tensor:
            return vectors.mv(v_img) - U_prev @ (s_prev * (V_prev.T @ v_img))

        def deflated_rmv(u_img: torch.Tensor) -> torch.Tensor:
            return vectors.rmv(u_img) - V_prev @ (s_prev * (U_prev.T @ u_img))

        v = None  # a warm start enters through its image only (module docstring)
        if start_imgs is not None and j < start_imgs.shape[1] and usable[j]:
            v_img = start_imgs[:, j]
            warm = True
        else:
            v, v_img = _unit_or_zero(vectors, "right", None, None, generator, op.device)
            warm = False
        # below this, a product with the deflated operator is rounding noise of the
        # subtracted terms (exactly 0 for j = 0): the deflated operator is numerically 0
        zero_tol = 10.0 * eps * math.sqrt(max(n_a, n_b)) * sigma_1
        w = deflated_mv(v_img)
        w_img = vectors.image_left(w)
        alpha = vectors.norm(w, w_img)
        if warm and float(alpha) <= zero_tol:
            # the warm start lies in the null space; power iteration cannot leave it
            v, v_img = _unit_or_zero(vectors, "right", None, None, generator, op.device)
            w = deflated_mv(v_img)
            w_img = vectors.image_left(w)
            alpha = vectors.norm(w, w_img)

        converged = False
        vanished = float(alpha) == 0.0
        sigma = torch.zeros((), **kw)
        res = torch.zeros((), **kw)
        s = 0.0
        for it in range(max_iters if not vanished else 0):
            u = w / alpha
            u_img = u if vectors.plain else w_img / alpha
            z = deflated_rmv(u_img)
            z_img = vectors.image_right(z)
            sigma = vectors.norm(z, z_img)
            # σ = 0 (read below, with the other scalars) means z = 0: divide by 1 instead
            safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
            v = z / safe
            v_img = v if vectors.plain else z_img / safe
            w = deflated_mv(v_img)
            w_img = vectors.image_left(w)
            r = w - sigma * u
            res = vectors.norm(r, r if vectors.plain else w_img - sigma * u_img)
            alpha = vectors.norm(w, w_img)  # the next iteration's
            s, rs, a = torch.stack([sigma, res, alpha]).tolist()  # one host synchronisation per iteration
            if s == 0.0:
                vanished = True
                break
            total_iters += 1
            if rs <= max(tol * s, eps_round * max(sigma_1, s)):
                converged = True
                break
            # σ_it = ‖Zᵀu‖ never decreases along power iterations, and after one step it
            # already sees the deflated operator's leading σ (a random start only sees
            # σ·√(rank/n_b), far below it): still at rounding-noise level after a few
            # steps means the deflated operator is numerically zero.
            if it >= 2 and s <= zero_tol:
                vanished = True
                break
            if a == 0.0 and it + 1 < max_iters:
                vanished = True
                break
        if vanished or s <= zero_tol:
            # unit vectors orthogonal to the previous ones keep U and V orthonormal
            u, u_img = _unit_or_zero(vectors, "left", U_prev, UI_prev, generator, op.device)
            v, v_img = _unit_or_zero(vectors, "right", V_prev, VI_prev, generator, op.device)
            sigma = torch.zeros((), **kw)
            res = torch.zeros((), **kw)
            converged = True
        sigmas[j], U[:, j], V[:, j], abs_res[j] = sigma, u, v, res
        if not vectors.plain:
            UI[:, j], VI[:, j] = u_img, v_img
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
    op: MatVecOperator | GramOperator,
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
        op: the operator Z ``[n_a, n_b]``: a :class:`MatVecOperator` or a
            :class:`GramOperator` (the iteration on coefficients, module docstring).
        k: number of triplets, 1 ≤ k ≤ min(n_a, n_b).
        krylov_dim: K, the basis size per cycle; default min(max(2k + 8, 10), n), clamped
            to n = min(n_a, n_b); must exceed k unless it equals n.
        tol: relative tolerance on the residual.
        max_restarts: cap on restarts (so at most ``max_restarts + 1`` cycles).
        v0: ``[n_b]`` or ``[n_b, c]`` warm start (in ``op.dtype``); the columns (normalized)
            are summed into one start vector s, which contains all of them in its Krylov
            space.  When the run is on Zᵀ it starts from Z s (one step); on a
            :class:`GramOperator` not transposed, from ZᵀZ s (one step: s itself is not
            a coefficient vector, and its part outside span(Y) is in Z's null space).
        generator: source of random vectors (default: seeded with 0 on ``op.device``).

    Returns:
        :class:`SVDResult` (``iterations`` = Lanczos steps summed over cycles, each one
        product with Z and one with Zᵀ).  ``residuals`` are recomputed from the operator
        at the end (one product of Z and of Zᵀ with a ``[·, k]`` block).
    """
    caller = "lanczos_svd"
    base = _vectors(op, caller)
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
    device = op.device

    # run on Zᵀ when the left space is the smaller one: "rows" is the left dimension of
    # the operator the bidiagonalization sees, "cols" its right dimension (cols ≤ rows)
    transposed = n_a < n_b
    vectors = base.T() if transposed else base
    rows, cols = vectors.shape
    N_rows, N_cols = vectors.coefficients
    plain = vectors.plain
    kw = {"dtype": vectors.work_dtype, "device": device}

    steps = 0
    q0 = q0_img = None
    if starts is not None:
        norms = torch.linalg.vector_norm(starts, dim=0)
        if bool((norms > 0).any()):
            # Σ_j v0_j/‖v0_j‖ over the nonzero columns, as one GEMV (the columns are long)
            s0 = starts @ torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
            if plain and not transposed:
                q0 = s0
            else:
                # Z s₀: for Zᵀ a right start of Z is a left start; for a Gram operator the
                # coefficients come from Yᵀs₀, and ZᵀZ s₀ is the start (docstring)
                w = base.mv(base.start_images(s0.unsqueeze(-1))[:, 0])
                steps += 1
                q0 = w if transposed else base.rmv(base.image_left(w))
            q0_img = q0 if plain else vectors.image_right(q0)
            if not bool(vectors.norm(q0, q0_img) > 0):
                q0 = None
    if q0 is None:
        q0, q0_img = _unit_or_zero(vectors, "right", None, None, generator, device)
    else:
        size = vectors.norm(q0, q0_img)
        q0, q0_img = q0 / size, (q0 / size if plain else q0_img / size)

    Q = torch.zeros(N_cols, K + 1, **kw)
    P = torch.zeros(N_rows, K, **kw)
    QI, PI = (Q, P) if plain else (torch.zeros(N_cols, K + 1, **kw), torch.zeros(N_rows, K, **kw))
    H = torch.zeros(K, K, **kw)
    Q[:, 0] = q0
    if not plain:
        QI[:, 0] = q0_img

    def ritz(m: int, beta_last: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """SVD of H[:m, :m] (3.40) and whether the k leading Ritz triplets pass the test.

        The residual of Ritz triplet i is |β_last · X[m-1, i]| (Zᵀ P = Q Hᵀ + β q eᵀ).
        """
        X, s, Yt = torch.linalg.svd(H[:m, :m])
        est = (beta_last * X[m - 1, :k]).abs()
        floor = eps_round * float(s[0])
        ok = all(e <= max(tol * si, floor) for e, si in zip(est.tolist(), s[:k].tolist()))
        return X, s, Yt.T, ok

    def orthogonalize(x: torch.Tensor, x_img: torch.Tensor, B: torch.Tensor, BI: torch.Tensor, image):
        """x − B Bᵀx̂ twice (Kahan–Parlett), the coefficients h, and the new image."""
        h = B.T @ x_img
        x = x - B @ h
        x_img = x if plain else x_img - BI @ h
        h2 = B.T @ x_img
        x = x - B @ h2
        # a Gram image is recomputed: the updates above lose digits once x is small
        return x, (x if plain else image(x)), h + h2

    norm_est = 0.0  # running estimate of ‖Z‖ (largest coefficient seen) for breakdown tests
    j_start = 0

    for cycle in range(max_restarts + 1):
        m = K
        beta_last = 0.0
        exact = False
        for j in range(j_start, K):
            # --- left step: p_j from Z q_j, orthogonal to p_0..p_{j-1}
            w = vectors.mv(QI[:, j])
            steps += 1
            w, w_img, h = orthogonalize(w, w if plain else vectors.image_left(w), P[:, :j], PI[:, :j],
                                        vectors.image_left)
            # one host synchronisation for both scalars
            alpha, h_max = torch.stack([vectors.norm(w, w_img), h.abs().max() if j > 0 else h.new_zeros(())]).tolist()
            norm_est = max(norm_est, alpha, h_max)
            breakdown_tol = 10.0 * eps * math.sqrt(rows) * norm_est
            if alpha <= breakdown_tol:
                # Z q_j lies in span(P): any unit p_j orthogonal to P keeps Z Q = P H
                p, p_img = _unit_or_zero(vectors, "left", P[:, :j], PI[:, :j], generator, device)
                alpha = 0.0
            else:
                p, p_img = w / alpha, (None if plain else w_img / alpha)
            P[:, j] = p
            if not plain:
                PI[:, j] = p_img
            H[:j, j] = h
            H[j, j] = alpha
            # --- right step: q_{j+1} from Zᵀ p_j, orthogonal to q_0..q_j
            z = vectors.rmv(PI[:, j])
            z, z_img, _ = orthogonalize(z, z if plain else vectors.image_right(z), Q[:, : j + 1], QI[:, : j + 1],
                                        vectors.image_right)
            beta = float(vectors.norm(z, z_img))
            norm_est = max(norm_est, beta)
            breakdown_tol = 10.0 * eps * math.sqrt(cols) * norm_est
            if beta <= breakdown_tol:
                if j + 1 >= k or j + 1 >= cols:
                    m, beta_last, exact = j + 1, 0.0, True
                    break
                # invariant subspace smaller than k: continue in a fresh direction
                q, q_img = _unit_or_zero(vectors, "right", Q[:, : j + 1], QI[:, : j + 1], generator, device)
                beta = 0.0
            else:
                q, q_img = z / beta, (None if plain else z_img / beta)
            Q[:, j + 1] = q
            if not plain:
                QI[:, j + 1] = q_img
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
        for B, R in ((Q, Y), (P, X)) if plain else ((Q, Y), (QI, Y), (P, X), (PI, X)):
            B[:, :keep] = B[:, :m] @ R[:, :keep]
        Q[:, keep] = Q[:, m]
        if not plain:
            QI[:, keep] = QI[:, m]
        H.zero_()
        H[:keep, :keep] = torch.diag(s[:keep])
        j_start = keep

    sigma = s[:k].clone()
    left, right = P[:, :m] @ X[:, :k], Q[:, :m] @ Y[:, :k]
    left_img, right_img = (left, right) if plain else (PI[:, :m] @ X[:, :k], QI[:, :m] @ Y[:, :k])
    U, V = (right, left) if transposed else (left, right)
    U_img, V_img = (right_img, left_img) if transposed else (left_img, right_img)

    # honest residuals, from the operator itself
    if plain:
        r1 = torch.linalg.vector_norm(op.matvec(V) - U * sigma, dim=0)
        r2 = torch.linalg.vector_norm(op.rmatvec(U) - V * sigma, dim=0)
    else:
        R1, R2 = base.mv(V_img) - U * sigma, base.rmv(U_img) - V * sigma
        r1, r2 = base.norm(R1, base.image_left(R1)), base.norm(R2, base.image_right(R2))
    abs_res = torch.maximum(r1, r2)
    floor = eps_round * float(sigma[0])
    converged = all(r <= max(tol * si, floor) for r, si in zip(abs_res.tolist(), sigma.tolist()))
    return SVDResult(
        sigma=sigma,
        U=U,
        V=V,
        iterations=steps,
        residuals=_relative_residuals(abs_res, sigma, eps_round),
        converged=converged,
    )
