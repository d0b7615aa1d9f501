"""Every operator of curvlib passes one shared conformance class
(:class:`curvlib.testing.conformance.OperatorConformance`).

Each class builds one small float64 operator and its dense reference another way:

- curvatures: dense GGN / Fisher / Hessian of a tiny network from ``torch.func``
  (:mod:`curvlib.testing.references`);
- Kronecker sums and Kronecker approximations: ``torch.kron`` of the factors (KFAC factors
  by explicit sums of outer products, :func:`~curvlib.testing.references.dense_kfac_factors`);
- exact blocks and Z-operators: the block by loops over samples and positions
  (:func:`~curvlib.testing.references.dense_block`), Z by index loops
  (:func:`~curvlib.testing.references.rearrange_dense`);
- inverses: ``torch.linalg.solve`` of the dense damped matrix (π-split written out by hand);
- two-level preconditioners: the dense formula P = M + R₀ᵀ(R₀F•R₀ᵀ)⁻¹R₀(I − F•M) (4.17)
  with M, F• and R₀ᵀ formed densely.

Column-major vec throughout: (A ⊗ B) vec(X) = vec(B X Aᵀ), vec stacks columns.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings

import torch
from torch import nn

import curvlib
from curvlib.approximators.exact import ExactBlock
from curvlib.approximators.lowrank import KroneckerLowRank
from curvlib.curvatures.statistics import LayerStatistics, Use
from curvlib.damping import (
    BlockDiagonalInverse,
    DenseTikhonovInverse,
    EigenTikhonovInverse,
    ExactBlockTikhonovInverse,
    HeuristicDamping,
    PCGTikhonovInverse,
    PiSplitInverse,
    TikhonovDamping,
    TwoTermHeuristicInverse,
)
from curvlib.errors import PerformanceWarning, ShapeError
from curvlib.linalg import (
    AdjointOperator,
    BlockDiagonalOperator,
    DenseOperator,
    IdentityOperator,
    KroneckerSum,
    LinearOperator,
    PermutationOperator,
    ProductOperator,
    ScaledOperator,
    SubmatrixOperator,
    SumOperator,
    VectorLayout,
)
from curvlib.linalg.geometry import Geometry
from curvlib.linalg.rows import DenseRows
from curvlib.linalg.zproducts import (
    AffineZOperator,
    ConvZOperator,
    DenseZOperator,
    ExactZOperator,
    LinearZOperator,
    PositionZOperator,
    SumZOperator,
    TransposedZOperator,
)
from curvlib.plugins import load_registry
from curvlib.precond.references import BlockNaturalGradient, ExactNaturalGradient
from curvlib.testing import references as ref
from curvlib.testing.conformance import OperatorConformance

F64 = torch.float64
LAM = 0.1


# --------------------------------------------------------------------------- small inputs
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=F64)


def spd(n: int, seed: int) -> torch.Tensor:
    X = randn(n, n, seed=seed)
    return X @ X.T / n + 0.2 * torch.eye(n, dtype=F64)


def kron(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """torch.kron of standard-strided copies (A ⊗ B acts on vec(X), X ``[d_B, d_A]``)."""
    return torch.kron(A.contiguous(), B.contiguous())


def block_diag(p: int, blocks, slices, fill: float = 0.0) -> torch.Tensor:
    """``[p, p]`` with ``blocks`` on ``slices`` and ``fill`` on the diagonal of uncovered rows."""
    M = fill * torch.eye(p, dtype=F64)
    for B, s in zip(blocks, slices):
        M[s, s] = B
    return M


def inv(M: torch.Tensor) -> torch.Tensor:
    return torch.linalg.solve(M, torch.eye(M.shape[0], dtype=F64))


@functools.lru_cache(maxsize=None)
def builtin_registry():
    return load_registry(external=False)


@functools.lru_cache(maxsize=None)
def mlp_problem():
    """A tanh MLP 4 -> 5 -> 3 (p = 43) with cross-entropy on 6 samples."""
    g = gen(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    with torch.no_grad():
        for q in model.parameters():
            q.copy_(0.8 * torch.randn(q.shape, generator=g, dtype=F64))
    X = torch.randn(6, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (6,), generator=g)
    return model, nn.CrossEntropyLoss(), X, y


@functools.lru_cache(maxsize=None)
def mlp_ggn():
    """``(F, dense GGN)`` of :func:`mlp_problem` (the GGN from torch.func, (2.89))."""
    model, loss_fn, X, y = mlp_problem()
    F = curvlib.curvature("ggn", model, loss_fn, (X, y), registry=builtin_registry())
    return F, ref.dense_ggn(model, F, loss_fn, X, y)


def kfac_terms(F, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """KFAC factors of layer i by explicit sums of outer products (3.19)."""
    (A, G), = ref.dense_kfac_factors(F.statistics(i))
    return A, G


def pi_damped(A: torch.Tensor, G: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A + π√λ I, G + π⁻¹√λ I), π = sqrt((tr A / d_a) / (tr G / d_g)) (2.95)–(2.96), by hand."""
    pi = math.sqrt((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0]))
    eye_a, eye_g = torch.eye(A.shape[0], dtype=F64), torch.eye(G.shape[0], dtype=F64)
    return A + pi * math.sqrt(lam) * eye_a, G + math.sqrt(lam) / pi * eye_g


def dense_z_of_pairs(D: torch.Tensor, scale: float) -> torch.Tensor:
    """Z(F) by index loops for F = scale·Σ_n vec(D_n) vec(D_n)ᵀ, D ``[n, d_g, d_a]``."""
    x = ref.vec(D)  # [n, d_a·d_g]
    F = scale * x.T @ x
    return ref.rearrange_dense(F, D.shape[2], D.shape[1])


class SplitLayout(VectorLayout):
    """A list form for the base's own operators: ``[n]`` -> a ``[2, 3]`` tensor and the rest."""

    def __init__(self, n: int) -> None:
        self.n = n

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [(2, 3), (self.n - 6,)]

    def to_vector(self, tensors, caller: str) -> torch.Tensor:
        if len(tensors) != 2 or tuple(tensors[0].shape) != (2, 3) or tuple(tensors[1].shape) != (self.n - 6,):
            raise ShapeError(f"{caller}: expected tensors of shapes {self.shapes}, got {[list(t.shape) for t in tensors]}")
        return torch.cat([tensors[0].reshape(-1), tensors[1]])

    def to_tensors(self, v: torch.Tensor, caller: str) -> list[torch.Tensor]:
        return [v[:6].reshape(2, 3), v[6:]]


# =========================================================================== the operator base
class TestDenseOperator(OperatorConformance):
    """A rectangular, non-symmetric matrix."""

    def make_operator(self):
        M = randn(7, 5, seed=1)
        return DenseOperator(M.clone()), M


class TestSymmetricDenseOperatorWithLayout(OperatorConformance):
    def make_operator(self):
        M = spd(9, seed=2)
        return DenseOperator(M.clone(), symmetric=True, layout=SplitLayout(9)), M


class TestIdentityOperator(OperatorConformance):
    def make_operator(self):
        return IdentityOperator(8, dtype=F64, device="cpu", layout=SplitLayout(8)), torch.eye(8, dtype=F64)


class TestSumOperator(OperatorConformance):
    def make_operator(self):
        A, B = randn(6, 4, seed=3), randn(6, 4, seed=4)
        return SumOperator([DenseOperator(A), DenseOperator(B), DenseOperator(A)]), 2 * A + B


class TestScaledOperator(OperatorConformance):
    def make_operator(self):
        A = randn(5, 6, seed=5)
        return ScaledOperator(DenseOperator(A), -0.7), -0.7 * A


class TestProductOperator(OperatorConformance):
    def make_operator(self):
        A, B = randn(6, 3, seed=6), randn(3, 5, seed=7)
        return ProductOperator(DenseOperator(A), DenseOperator(B)), A @ B


class TestAdjointOperator(OperatorConformance):
    def make_operator(self):
        A = randn(4, 7, seed=8)
        return AdjointOperator(DenseOperator(A)), A.T.clone()


class TestPermutationOperator(OperatorConformance):
    """(P x)_j = x_{index[j]}: P[j, index[j]] = 1."""

    def make_operator(self):
        index = torch.randperm(7, generator=gen(80))
        P = torch.zeros(7, 7, dtype=F64)
        for j, i in enumerate(index.tolist()):
            P[j, i] = 1.0
        return PermutationOperator(index, dtype=F64, device="cpu"), P


class TestSubmatrixOperator(OperatorConformance):
    """A[1:6, 2:9] of a non-symmetric ``[8, 9]`` operator."""

    def make_operator(self):
        M = randn(8, 9, seed=81)
        return SubmatrixOperator(DenseOperator(M.clone()), slice(1, 6), slice(2, 9)), M[1:6, 2:9].clone()


class TestSubmatrixOperatorSymmetric(OperatorConformance):
    """A diagonal block S[2:7, 2:7] of a symmetric operator (declared symmetric)."""

    def make_operator(self):
        S = spd(8, seed=82)
        return SubmatrixOperator(DenseOperator(S.clone(), symmetric=True), slice(2, 7), slice(2, 7)), S[2:7, 2:7].clone()


class TestBlockDiagonalOperator(OperatorConformance):
    """Symmetric blocks, an uncovered row scaled by 0.5, a layout."""

    def make_operator(self):
        A, B = spd(3, seed=9), spd(4, seed=10)
        op = BlockDiagonalOperator([DenseOperator(A, symmetric=True), DenseOperator(B, symmetric=True)],
                                   [slice(0, 3), slice(4, 8)], p=9, uncovered_scale=0.5, layout=SplitLayout(9))
        dense = torch.zeros(9, 9, dtype=F64)
        dense[:3, :3], dense[4:8, 4:8] = A, B
        dense[3, 3] = dense[8, 8] = 0.5
        return op, dense



class TestBlockDiagonalOperatorNonSymmetricBlocks(OperatorConformance):
    """A non-symmetric KroneckerSum block and a non-symmetric dense block."""

    def make_operator(self):
        A, B, C = randn(2, 2, seed=90), randn(3, 3, seed=91), randn(4, 4, seed=92)
        op = BlockDiagonalOperator([KroneckerSum([(A, B)]), DenseOperator(C)], [slice(0, 6), slice(6, 10)])
        return op, block_diag(10, [kron(A, B), C], [slice(0, 6), slice(6, 10)])


# =========================================================================== Kronecker sums, Z-operators
class TestKroneckerSum(OperatorConformance):
    """Two terms with general (non-symmetric) factors: Σ_k A_k ⊗ B_k by torch.kron."""

    def make_operator(self):
        terms = [(randn(3, 3, seed=11), randn(4, 4, seed=12)), (randn(3, 3, seed=13), randn(4, 4, seed=14))]
        return KroneckerSum([(A.clone(), B.clone()) for A, B in terms]), kron(*terms[0]) + kron(*terms[1])


class TestDenseZOperator(OperatorConformance):
    def make_operator(self):
        Z = randn(9, 4, seed=15)
        return DenseZOperator(Z.clone(), 3, 2), Z


class TestExactZOperator(OperatorConformance):
    """Z(scale·Σ_n vec(D_n)vec(D_n)ᵀ) ``[d_a², d_g²]`` = ``[9, 4]``."""

    def make_operator(self):
        D = randn(5, 2, 3, seed=16)
        return ExactZOperator(D.clone(), 0.3), dense_z_of_pairs(D, 0.3)


def conv_use(seed: int, m: int = 2, c: int = 2, shape=(3, 3), d_a: int = 3, d_g: int = 2) -> Use:
    T = math.prod(shape)
    a = randn(m, T, d_a, seed=seed)
    g = randn(m, c, T, d_g, seed=seed + 1)
    return Use(DenseRows(a), g, Geometry.grid(shape, (3, 3)))


class TestPositionZOperator(OperatorConformance):
    """A finite band (r = 1) on a 3×3 grid: Z of the banded block (3.35) by loops."""

    def make_operator(self):
        use = conv_use(17)
        stats = LayerStatistics(uses=[use], scale=0.25, has_bias=False)
        op = PositionZOperator(use.a, use.g, use.geometry, 1, 0.25)
        return op, ref.rearrange_dense(ref.dense_block(stats, radius=1), 3, 2)


class TestPositionZOperatorAllPairs(OperatorConformance):
    """Every pair of positions of a sequence (r = None): the exact block's Z."""

    def make_operator(self):
        a, g = randn(3, 4, 2, seed=19), randn(3, 2, 4, 3, seed=20)
        use = Use(DenseRows(a), g, Geometry.sequence(4))
        stats = LayerStatistics(uses=[use], scale=0.5, has_bias=False)
        op = PositionZOperator(use.a, use.g, use.geometry, None, 0.5)
        return op, ref.rearrange_dense(ref.dense_block(stats), 2, 3)


class TestLinearZOperator(OperatorConformance):
    """One position (Prop. 3.1): Z(scale·Σ ā āᵀ ⊗ g gᵀ)."""

    def make_operator(self):
        a, g = randn(5, 3, seed=21), randn(5, 2, 4, seed=22)
        stats = LayerStatistics(a=a, g=g, scale=0.1, has_bias=False)
        return LinearZOperator(a, g, 0.1), ref.rearrange_dense(ref.dense_block(stats), 3, 4)


class TestConvZOperator(OperatorConformance):
    """A 2×3 grid, band radius 1."""

    def make_operator(self):
        a, g = randn(2, 6, 2, seed=23), randn(2, 1, 6, 3, seed=24)
        use = Use(DenseRows(a), g, Geometry.grid((2, 3)))
        stats = LayerStatistics(uses=[use], scale=0.5, has_bias=False)
        return ConvZOperator(a, g, (2, 3), 1, 0.5), ref.rearrange_dense(ref.dense_block(stats, radius=1), 2, 3)


class TestSumZOperator(OperatorConformance):
    def make_operator(self):
        D1, D2 = randn(3, 2, 3, seed=25), randn(4, 2, 3, seed=26)
        op = SumZOperator([ExactZOperator(D1, 0.5), ExactZOperator(D2, 2.0)])
        return op, dense_z_of_pairs(D1, 0.5) + dense_z_of_pairs(D2, 2.0)


class TestTransposedZOperator(OperatorConformance):
    """Z(K F Kᵀ) = Z(F)ᵀ: ``[d_g², d_a²]`` = ``[4, 9]`` of an ``[9, 4]`` operator."""

    def make_operator(self):
        D = randn(4, 2, 3, seed=27)
        return TransposedZOperator(ExactZOperator(D, 0.7)), dense_z_of_pairs(D, 0.7).T.clone()


class TestAffineZOperator(OperatorConformance):
    """Z(0.6·F − 1.3·Σ_k R_k ⊗ S_k): Z of the dense matrix, by loops."""

    def make_operator(self):
        D = randn(5, 2, 3, seed=28)
        terms = [(randn(3, 3, seed=29), randn(2, 2, seed=30)), (randn(3, 3, seed=31), randn(2, 2, seed=32))]
        op = AffineZOperator(ExactZOperator(D, 0.4), terms, base_coeff=0.6, term_coeff=-1.3)
        x = ref.vec(D)
        M = 0.6 * 0.4 * x.T @ x - 1.3 * (kron(*terms[0]) + kron(*terms[1]))
        return op, ref.rearrange_dense(M, 3, 2)


# =========================================================================== curvatures
class TestCurvatureOperator(OperatorConformance):
    """The GGN of a tanh MLP against torch.func's (2.89); list form over the parameters."""

    def make_operator(self):
        return mlp_ggn()


class TestCurvatureOperatorFisherCNN(OperatorConformance):
    """The MC Fisher of a small CNN (conv, strided conv without bias, Linear; p = 138) at
    the operator's sampled targets (2.84)."""

    def make_operator(self):
        g = gen(40)
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 2, stride=2, bias=False), nn.Tanh(),
            nn.Flatten(), nn.Linear(2 * 3 * 3, 3),
        ).to(F64)
        with torch.no_grad():
            for q in model.parameters():
                q.copy_(0.5 * torch.randn(q.shape, generator=g, dtype=F64))
        X = torch.randn(4, 2, 6, 6, generator=g, dtype=F64)
        y = torch.randint(0, 3, (4,), generator=g)
        loss_fn = nn.CrossEntropyLoss()
        F = curvlib.curvature("fisher", model, loss_fn, (X, y), mc_samples=2, generator=gen(41),
                              registry=builtin_registry())
        return F, ref.dense_fisher(model, F, loss_fn, X, F.sampled_targets)


class TestDataCurvatureOperator(OperatorConformance):
    """The GGN over a data set of two unequal batches (2 + 4 samples) = the GGN of one batch
    holding all the data, from torch.func."""

    def make_operator(self):
        model, loss_fn, X, y = mlp_problem()
        data = [(X[:2], y[:2]), (X[2:], y[2:])]
        F = curvlib.curvature("ggn", model, loss_fn, data=data, registry=builtin_registry())
        return F, ref.dense_ggn(model, F, loss_fn, X, y)


class TestHessianOperator(OperatorConformance):
    """Exact Hessian-vector products against torch.func.hessian."""

    def make_operator(self):
        model, loss_fn, X, y = mlp_problem()
        H = curvlib.curvature("hessian", model, loss_fn, (X, y), registry=builtin_registry())
        return H, ref.dense_hessian(model, H, loss_fn, X, y)


class TestCurvatureBlockDiagonal(OperatorConformance):
    """F.block(1, 1): symmetric ``[p_1, p_1]``."""

    def make_operator(self):
        F, D = mlp_ggn()
        s = F.layers[1].slice
        return F.block(1, 1), D[s, s].clone()


class TestCurvatureBlockOffDiagonal(OperatorConformance):
    """F.block(0, 1): rectangular ``[p_0, p_1]`` = ``[25, 18]``, adjoint C_10."""

    def make_operator(self):
        F, D = mlp_ggn()
        s0, s1 = F.layers[0].slice, F.layers[1].slice
        return F.block(0, 1), D[s0, s1].clone()


class TestHessianBlockOffDiagonal(OperatorConformance):
    """H.block(1, 0) of the Hessian (the padded-product path)."""

    def make_operator(self):
        model, loss_fn, X, y = mlp_problem()
        H = curvlib.curvature("hessian", model, loss_fn, (X, y), registry=builtin_registry())
        D = ref.dense_hessian(model, H, loss_fn, X, y)
        return H.block(1, 0), D[H.layers[1].slice, H.layers[0].slice].clone()


# =========================================================================== approximations
class TestBlockDiagonalApproximation(OperatorConformance):
    """curvlib.approximate(F, "kfac"): diag(A_i ⊗ G_i) with the factors by explicit sums."""

    def make_operator(self):
        F, _ = mlp_ggn()
        approx = curvlib.approximate(F, "kfac", registry=builtin_registry())
        blocks = [kron(*kfac_terms(F, i)) for i in range(len(F.layers))]
        return approx, block_diag(F.p, blocks, [L.slice for L in F.layers])


class TestBlockDiagonalApproximationPartial(OperatorConformance):
    """Only layer 1 fitted: the other rows are zero blocks."""

    def make_operator(self):
        F, _ = mlp_ggn()
        approx = curvlib.approximate(F, "kfac", layers=[1], registry=builtin_registry())
        return approx, block_diag(F.p, [kron(*kfac_terms(F, 1))], [F.layers[1].slice])


def conv_stats(seed: int) -> LayerStatistics:
    """One conv use on a 2×2 grid, d_a = 4, d_g = 3, c = 2 (p_i = 12)."""
    a, g = randn(3, 4, 4, seed=seed), randn(3, 2, 4, 3, seed=seed + 1)
    return LayerStatistics(a=a, g=g, scale=1.0 / 6, spatial_shape=(2, 2), kernel_size=(2, 2), has_bias=False)


class TestExactBlock(OperatorConformance):
    """The exact conv block F_ii from its statistics, against the loops of dense_block (3.28)."""

    def make_operator(self):
        stats = conv_stats(50)
        return ExactBlock(stats), ref.dense_block(stats)


class TestKroneckerLowRank(OperatorConformance):
    """A ⊗ G + Σ_j s_j vec(U_j) vec(U_j)ᵀ from torch.kron and outer products of the columns."""

    def make_operator(self):
        A, G = spd(4, 55), spd(3, 56)
        Q, _ = torch.linalg.qr(randn(12, 2, seed=57))
        U = Q.T.reshape(2, 4, 3).transpose(1, 2)  # MAT of each column (column-major vec)
        s = torch.tensor([2.0, 0.5], dtype=F64)
        return KroneckerLowRank(A, G, U, s), kron(A, G) + (Q * s) @ Q.T


class TestKroneckerLowRankTikhonovInverse(OperatorConformance):
    """(A ⊗ G + U S Uᵀ + λI)⁻¹ by Woodbury against the dense inverse."""

    def make_operator(self):
        block, dense = TestKroneckerLowRank().make_operator()
        op = TikhonovDamping(value=LAM).invert(block)
        return op, inv(dense + LAM * torch.eye(12, dtype=F64))


class TestMultiKronecker(OperatorConformance):
    """A_1 ⊗ A_2 ⊗ A_3 over the modes (2, 2 | 3) from torch.kron."""

    def make_operator(self):
        from curvlib.approximators import MultiKronecker

        factors = [spd(2, 70), spd(2, 71), spd(3, 72)]
        return MultiKronecker(factors, (2, 2), (3,)), kron(kron(factors[0], factors[1]), factors[2])


class TestMultiKroneckerSum(OperatorConformance):
    """A_1 ⊗ A_2 ⊗ A_3 + B_1 ⊗ B_2 ⊗ B_3 (the second term indefinite) from torch.kron."""

    def make_operator(self):
        from curvlib.approximators import MultiKronecker, MultiKroneckerSum

        first = [spd(2, 74), spd(2, 75), spd(3, 76)]
        second = [spd(2, 77), -spd(2, 78), spd(3, 79)]
        dense = sum(kron(kron(f[0], f[1]), f[2]) for f in (first, second))
        return MultiKroneckerSum([MultiKronecker(first, (2, 2), (3,)), MultiKronecker(second, (2, 2), (3,))]), dense


class TestSINGDBlock(OperatorConformance):
    """(K Kᵀ)⁻¹ ⊗ (C Cᵀ)⁻¹ from torch.kron of the dense inverses."""

    def make_operator(self):
        from curvlib.approximators import SINGDBlock

        K, C = randn(4, 4, seed=80) + 2 * torch.eye(4, dtype=F64), randn(3, 3, seed=81) + 2 * torch.eye(3, dtype=F64)
        block = SINGDBlock(K, C, torch.zeros(4, 4, dtype=F64), torch.zeros(3, 3, dtype=F64))
        return block, kron(inv(K @ K.T), inv(C @ C.T))


class TestInverseFreeInverse(OperatorConformance):
    """K_A² ⊗ K_G² of the π-split, block-diagonal factors, against the dense blockwise inverses."""

    def make_operator(self):
        from curvlib.damping import InverseFreeDamping

        (A, B), = kron_terms([73])
        op = InverseFreeDamping(value=LAM, block_size=2, tol=1e-14, max_iters=200).invert(KroneckerSum([(A, B)]))
        return op, kron(op.PA, op.PG)


class TestKroneckerApproximateInverse(OperatorConformance):
    """C ⊗ D ≈ (F_ii + λI)⁻¹ of an exact Linear block, against torch.kron of the fitted factors."""

    def make_operator(self):
        from curvlib.damping import KronInverseDamping

        stats = LayerStatistics(a=randn(5, 4, seed=58), g=randn(5, 1, 3, seed=59), scale=0.2)
        op = KronInverseDamping(value=LAM).invert(ExactBlock(stats))
        return op, kron(op.C, op.D)


class TestEKFACBlock(OperatorConformance):
    """The plugin's block (Q_A ⊗ Q_G) diag(vec(S)) (Q_A ⊗ Q_G)ᵀ from torch.kron."""

    def make_operator(self):
        from curvlib_ekfac import EKFACBlock

        Q_a, _ = torch.linalg.qr(randn(4, 4, seed=52))
        Q_g, _ = torch.linalg.qr(randn(3, 3, seed=53))
        S = randn(3, 4, seed=54).abs() + 0.1
        U = kron(Q_a, Q_g)
        return EKFACBlock(Q_a, Q_g, S), U @ torch.diag(ref.vec(S)) @ U.T


# =========================================================================== damped inverses
def kron_terms(seeds, d_a: int = 3, d_g: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(spd(d_a, s), spd(d_g, s + 100)) for s in seeds]


class TestEigenTikhonovInverse(OperatorConformance):
    """(A ⊗ B + λI)⁻¹ (4.54)."""

    def make_operator(self):
        terms = kron_terms([60])
        op = TikhonovDamping(value=LAM).invert(KroneckerSum(terms))
        assert isinstance(op, EigenTikhonovInverse)
        return op, inv(kron(*terms[0]) + LAM * torch.eye(12, dtype=F64))


class TestPCGTikhonovInverse(OperatorConformance):
    """(A_1 ⊗ B_1 + A_2 ⊗ B_2 + λI)⁻¹ by PCG to a relative residual of 1e-12."""

    rtol = 1e-8

    def make_operator(self):
        terms = kron_terms([61, 62])
        op = TikhonovDamping(value=LAM, pcg_tol=1e-12).invert(KroneckerSum(terms))
        assert isinstance(op, PCGTikhonovInverse)
        return op, inv(kron(*terms[0]) + kron(*terms[1]) + LAM * torch.eye(12, dtype=F64))


class TestDenseTikhonovInverse(OperatorConformance):
    def make_operator(self):
        terms = kron_terms([63, 64])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PerformanceWarning)
            op = TikhonovDamping(value=LAM, method="exact").invert(KroneckerSum(terms))
        assert isinstance(op, DenseTikhonovInverse)
        return op, inv(kron(*terms[0]) + kron(*terms[1]) + LAM * torch.eye(12, dtype=F64))


class TestExactBlockTikhonovInverse(OperatorConformance):
    """(F_ii + λI)⁻¹ of an exact conv block, F_ii by loops."""

    def make_operator(self):
        stats = conv_stats(65)
        op = TikhonovDamping(value=LAM).invert(ExactBlock(stats))
        assert isinstance(op, ExactBlockTikhonovInverse)
        return op, inv(ref.dense_block(stats) + LAM * torch.eye(12, dtype=F64))


class TestPiSplitInverse(OperatorConformance):
    """[(A + π√λI) ⊗ (B + π⁻¹√λI)]⁻¹ (2.95)–(2.96)."""

    def make_operator(self):
        (A, B), = kron_terms([66])
        op = HeuristicDamping(value=LAM).invert(KroneckerSum([(A, B)]))
        assert isinstance(op, PiSplitInverse)
        return op, inv(kron(*pi_damped(A, B, LAM)))


class TestTwoTermHeuristicInverse(OperatorConformance):
    """[(A + π√λI) ⊗ (B + π⁻¹√λI) + C ⊗ D]⁻¹ with C, D PSD (no μ below the floor, §3.2.5)."""

    def make_operator(self):
        (A, B), (C, D) = kron_terms([67, 68])
        C, D = 0.3 * C, 0.5 * D
        op = HeuristicDamping(value=LAM).invert(KroneckerSum([(A, B), (C, D)]))
        assert isinstance(op, TwoTermHeuristicInverse)
        return op, inv(kron(*pi_damped(A, B, LAM)) + kron(C, D))


class TestRemoteInverse(OperatorConformance):
    """The place of a layer another rank applies (``distributed_inversion="direction"``): zero here."""

    def make_operator(self):
        from curvlib.damping.api import RemoteInverse
        from curvlib.damping.base import InverseInfo

        op = RemoteInverse(a_dim=3, b_dim=2, dtype=F64, device=torch.device("cpu"),
                           info=InverseInfo(kind="heuristic", method="eigen", lam=LAM), owner=1, kappa=None)
        return op, torch.zeros(6, 6, dtype=F64)


class _TwoEqualShards:
    """A stand-in :class:`curvlib.distributed.Shard` of two ranks holding the same samples (weight ½
    each): the average of the two ranks' values is the value itself.  The communication is
    tested with processes in tests/distributed."""

    def average(self, tensors, purpose="statistics"):
        return [0.5 * t + 0.5 * t for t in tensors]


class TestShardedZOperator(OperatorConformance):
    """Z(F) of the global batch from two equal shards: Z(F) itself."""

    def make_operator(self):
        from curvlib.distributed import ShardedZOperator

        D = randn(5, 2, 3, seed=128)
        return ShardedZOperator(ExactZOperator(D, 0.4), _TwoEqualShards()), dense_z_of_pairs(D, 0.4)


class TestShardedCurvature(OperatorConformance):
    """The GGN of the global batch from two equal shards: the GGN itself (list form)."""

    def make_operator(self):
        from curvlib.distributed import ShardedCurvature

        F, dense = mlp_ggn()
        return ShardedCurvature(F, _TwoEqualShards()), dense


class TestBlockDiagonalInverse(OperatorConformance):
    """damped_inverse(approximate(F, "kfac", layers=[0]), "tikhonov"): (A_0 ⊗ G_0 + λI)⁻¹ on
    layer 0, 1/λ on the rows of the unfitted layer."""

    def make_operator(self):
        F, _ = mlp_ggn()
        approx = curvlib.approximate(F, "kfac", layers=[0], registry=builtin_registry())
        op = curvlib.damped_inverse(approx, "tikhonov", value=LAM, registry=builtin_registry())
        assert isinstance(op, BlockDiagonalInverse)
        L = F.layers[0]
        block = inv(kron(*kfac_terms(F, 0)) + LAM * torch.eye(L.p_i, dtype=F64))
        return op, block_diag(F.p, [block], [L.slice], fill=1.0 / LAM)


class TestBlockDiagonalInverseHeuristic(OperatorConformance):
    """damped_inverse(approximate(F, "kfac"), "heuristic"): diag([(A_i + π√λI) ⊗ (G_i + π⁻¹√λI)]⁻¹)."""

    def make_operator(self):
        F, _ = mlp_ggn()
        approx = curvlib.approximate(F, "kfac", registry=builtin_registry())
        op = curvlib.damped_inverse(approx, "heuristic", value=LAM, registry=builtin_registry())
        blocks = [inv(kron(*pi_damped(*kfac_terms(F, i), LAM))) for i in range(len(F.layers))]
        return op, block_diag(F.p, blocks, [L.slice for L in F.layers])


# =========================================================================== natural gradient references
class TestExactNaturalGradient(OperatorConformance):
    """(F + λI)⁻¹ by Woodbury (4.50) against a dense solve with torch.func's GGN."""

    def make_operator(self):
        F, D = mlp_ggn()
        return ExactNaturalGradient(F, LAM), inv(D + LAM * torch.eye(F.p, dtype=F64))


class TestBlockNaturalGradient(OperatorConformance):
    """diag_i (F_ii + λI)⁻¹ (4.52)."""

    def make_operator(self):
        F, D = mlp_ggn()
        slices = [L.slice for L in F.layers]
        blocks = [inv(D[s, s] + LAM * torch.eye(s.stop - s.start, dtype=F64)) for s in slices]
        return BlockNaturalGradient(F, LAM), block_diag(F.p, blocks, slices)


# =========================================================================== two-level preconditioners
def nicolaides_basis(F) -> torch.Tensor:
    """R₀ᵀ ``[p, ℓ]``: column i is 1 on layer i's rows (4.25)–(4.26)."""
    R = torch.zeros(F.p, len(F.layers), dtype=F64)
    for i, L in enumerate(F.layers):
        R[L.slice, i] = 1.0
    return R


def spectral_basis(F, lam: float) -> torch.Tensor:
    """R₀ᵀ ``[p, ℓ]``: column i is v_A,min ⊗ v_G,min of the π-damped KFAC factors (4.27)–(4.30)."""
    R = torch.zeros(F.p, len(F.layers), dtype=F64)
    for i, L in enumerate(F.layers):
        Ad, Gd = pi_damped(*kfac_terms(F, i), lam)
        v_a = torch.linalg.eigh(Ad).eigenvectors[:, 0]
        v_g = torch.linalg.eigh(Gd).eigenvectors[:, 0]
        R[L.slice, i] = torch.kron(v_a, v_g)
    return R


def kfac_heuristic_first_level():
    """``(F, F• dense, M = F•KFAC⁻¹ dense, the first level operator)``."""
    F, D = mlp_ggn()
    approx = curvlib.approximate(F, "kfac", registry=builtin_registry())
    first = curvlib.damped_inverse(approx, "heuristic", value=LAM, registry=builtin_registry())
    M = block_diag(F.p, [inv(kron(*pi_damped(*kfac_terms(F, i), LAM))) for i in range(len(F.layers))],
                   [L.slice for L in F.layers])
    return F, D + LAM * torch.eye(F.p, dtype=F64), M, first


def multiplicative_dense(M: torch.Tensor, Fb: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """P = M + R₀ᵀ(R₀F•R₀ᵀ)⁻¹R₀(I − F•M) (4.17)."""
    eye = torch.eye(M.shape[0], dtype=F64)
    return M + R @ torch.linalg.solve(R.T @ Fb @ R, R.T @ (eye - Fb @ M))


class TestTwoLevelPreconditioner(OperatorConformance):
    """Multiplicative Nicolaides two-level around the π-split KFAC inverse; its adjoint is
    M + (I − MF•)R₀ᵀ(R₀F•R₀ᵀ)⁻¹R₀ (the transpose of the dense P)."""

    def make_operator(self):
        F, Fb, M, first = kfac_heuristic_first_level()
        op = curvlib.two_level(first, F, "nicolaides", LAM, registry=builtin_registry())
        return op, multiplicative_dense(M, Fb, nicolaides_basis(F))


class TestTwoLevelPreconditionerSpectral(OperatorConformance):
    """Multiplicative, spectral coarse space (eigenvectors reused from the first level)."""

    def make_operator(self):
        F, Fb, M, first = kfac_heuristic_first_level()
        op = curvlib.two_level(first, F, "spectral", LAM, registry=builtin_registry())
        return op, multiplicative_dense(M, Fb, spectral_basis(F, LAM))


class TestTwoLevelPreconditionerAdditive(OperatorConformance):
    """Additive Nicolaides (4.19): P = M + R₀ᵀ(R₀F•R₀ᵀ)⁻¹R₀, symmetric."""

    def make_operator(self):
        F, Fb, M, first = kfac_heuristic_first_level()
        R = nicolaides_basis(F)
        op = curvlib.two_level(first, F, "nicolaides", LAM, "additive", registry=builtin_registry())
        return op, M + R @ torch.linalg.solve(R.T @ Fb @ R, R.T)


def tko_dense(F, lam: float) -> torch.Tensor:
    """F̄• of (4.20b) for Linear layers (no positions): π-split KFAC blocks on the diagonal,
    A_ij ⊗ G_ij with A_ij = (1/m)Σ_b ā_i ā_jᵀ, G_ij = scale·Σ_{b,c} g_i g_jᵀ off it."""
    stats = [F.statistics(i) for i in range(len(F.layers))]
    a = [s.uses[0].a.dense()[:, 0] for s in stats]  # [m, a_i]
    g = [s.uses[0].g[:, :, 0] for s in stats]  # [m, c, g_i]
    Fbar = torch.zeros(F.p, F.p, dtype=F64)
    for i, Li in enumerate(F.layers):
        for j, Lj in enumerate(F.layers):
            if i == j:
                Fbar[Li.slice, Li.slice] = kron(*pi_damped(*kfac_terms(F, i), lam))
            else:
                A_ij = torch.einsum("ma,mb->ab", a[i], a[j]) / a[i].shape[0]
                G_ij = torch.einsum("mcg,mch->gh", g[i], g[j]) * stats[i].scale
                Fbar[Li.slice, Lj.slice] = kron(A_ij, G_ij)
    return Fbar


class TestTwoLevelPreconditionerPrevious(OperatorConformance):
    """Tselepidis et al. ("previous", (4.20)/(4.47)): P = M + R₀ᵀ(R₀F̄•R₀ᵀ)⁻¹R₀, F̄• dense."""

    def make_operator(self):
        F, _, M, first = kfac_heuristic_first_level()
        R = nicolaides_basis(F)
        op = curvlib.two_level(first, F, "nicolaides", LAM, "previous", registry=builtin_registry())
        return op, M + R @ torch.linalg.solve(R.T @ tko_dense(F, LAM) @ R, R.T)




class TestTwoLevelPreconditionerNested(OperatorConformance):
    """A multiplicative spectral two-level around a multiplicative Nicolaides two-level (a
    non-symmetric first level): P₂ = P₁ + R₂(R₂ᵀF•R₂)⁻¹R₂ᵀ(I − F•P₁), all dense."""

    def make_operator(self):
        F, Fb, M, first = kfac_heuristic_first_level()
        inner = curvlib.two_level(first, F, "nicolaides", LAM, registry=builtin_registry())
        op = curvlib.two_level(inner, F, "spectral", LAM, registry=builtin_registry())
        P1 = multiplicative_dense(M, Fb, nicolaides_basis(F))
        return op, multiplicative_dense(P1, Fb, spectral_basis(F, LAM))


class TestTwoLevelPreconditionerResidual(OperatorConformance):
    """The residual coarse space builds its basis from u: not linear, no adjoint — forms only."""

    linear = False
    has_adjoint = False

    def make_operator(self):
        F, _, _, first = kfac_heuristic_first_level()
        return curvlib.two_level(first, F, "residual", LAM, registry=builtin_registry()), None


# =========================================================================== the preconditioner
def built_preconditioner(config):
    model, loss_fn, X, y = mlp_problem()  # shared and read only: update() does not train
    pre = curvlib.build_preconditioner(model, loss_fn, config, registry=builtin_registry())
    pre.update((X, y))
    return pre, model, loss_fn, X, y


class TestPreconditionerExactNaturalGradient(OperatorConformance):
    """preconditioner="exact_natural_gradient": (F + λI)⁻¹ with F the GGN of the captured batch."""

    def make_operator(self):
        pre, model, loss_fn, X, y = built_preconditioner(
            {"curvature": "ggn", "preconditioner": "exact_natural_gradient", "damping": {"kind": "tikhonov", "value": LAM}})
        D = ref.dense_ggn(model, pre, loss_fn, X, y)
        return pre, inv(D + LAM * torch.eye(pre.p, dtype=F64))


class TestPreconditionerKronecker(OperatorConformance):
    """preconditioner="kronecker" (kfac, tikhonov): diag((A_i ⊗ G_i + λI)⁻¹), factors by hand."""

    def make_operator(self):
        pre, *_ = built_preconditioner(
            {"curvature": "ggn", "approximator": "kfac", "damping": {"kind": "tikhonov", "value": LAM}})
        F = pre.curvature
        blocks = [inv(kron(*kfac_terms(F, i)) + LAM * torch.eye(L.p_i, dtype=F64)) for i, L in enumerate(F.layers)]
        return pre, block_diag(F.p, blocks, [L.slice for L in F.layers])




class TestPreconditionerTwoLevel(OperatorConformance):
    """coarse_space="nicolaides" (multiplicative) around kfac + heuristic: P of (4.17), dense."""

    def make_operator(self):
        pre, model, loss_fn, X, y = built_preconditioner(
            {"curvature": "ggn", "approximator": "kfac", "damping": {"kind": "heuristic", "value": LAM},
             "coarse_space": {"kind": "nicolaides"}})
        F = pre.curvature
        M = block_diag(F.p, [inv(kron(*pi_damped(*kfac_terms(F, i), LAM))) for i in range(len(F.layers))],
                       [L.slice for L in F.layers])
        Fb = ref.dense_ggn(model, pre, loss_fn, X, y) + LAM * torch.eye(F.p, dtype=F64)
        return pre, multiplicative_dense(M, Fb, nicolaides_basis(F))


class TestPreconditionerTwoLevelResidual(OperatorConformance):
    """coarse_space="residual": not linear, no adjoint — forms only."""

    linear = False
    has_adjoint = False

    def make_operator(self):
        pre, *_ = built_preconditioner(
            {"curvature": "ggn", "approximator": "kfac", "damping": {"kind": "heuristic", "value": LAM},
             "coarse_space": {"kind": "residual"}})
        return pre, None


# =========================================================================== coverage
def _operator_classes() -> set[type]:
    """Every concrete, public LinearOperator subclass defined by curvlib or its EKFAC plugin."""
    import curvlib_ekfac  # noqa: F401  (defines the plugin's operator classes)

    found, todo = set(), [LinearOperator]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            todo.append(sub)
            package = sub.__module__.split(".")[0]
            if package in ("curvlib", "curvlib_ekfac") and not inspect.isabstract(sub) and not sub.__name__.startswith("_"):
                found.add(sub)
    return found


def test_every_operator_class_has_a_conformance_class():
    """The issue's "done when": every operator of curvlib passes the shared conformance class."""
    tested = {type(cls().case()[0]) for name, cls in list(globals().items())
              if name.startswith("Test") and isinstance(cls, type) and issubclass(cls, OperatorConformance)}
    missing = sorted(c.__qualname__ for c in _operator_classes() - tested)
    assert not missing, f"operator classes without a conformance class in {__name__}: {missing}"
