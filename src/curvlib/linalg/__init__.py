"""Pure tensor kernels of curvlib (no ``torch.nn``).

- one operator base with a lazy algebra: :class:`LinearOperator` (sum, scalar multiple,
  product, adjoint, ``to_dense``, ``to_scipy``; flat, matrix and list operands);
- layer blocks and their declared capabilities (:class:`KroneckerFactored`,
  :class:`ShiftSolvable`, :class:`FactorEigenbasis`, :class:`DampedKroneckerFactors`) and
  :class:`BlockDiagonalOperator`;
- Kronecker algebra in the column-major ``vec`` convention (§3.1.1): :func:`vec`,
  :func:`unvec`, :func:`kron`, :func:`kron_matvec`, :class:`KroneckerSum`;
- the zigzag rearrangement Z (Def. 3.3) and best Kronecker-sum fits (Thm 3.14):
  :func:`rearrange`, :func:`unrearrange`, :func:`nearest_kronecker`,
  :func:`factors_from_singular`;
- matrix-free Z-products from per-sample statistics (Prop. 3.1, (3.31)–(3.36)):
  :class:`LinearZOperator`, :class:`ConvZOperator`, :class:`AffineZOperator`
  (:func:`deflated`, :func:`ema_combined`);
- top singular triplets of matrix-free operators: :func:`power_svd` (Algorithm 1),
  :func:`lanczos_svd` (Algorithm 2, restarted);
- the algebraically largest eigenpairs of a symmetric matrix-free operator:
  :func:`top_eigenpairs` (restarted block Krylov with Rayleigh–Ritz);
- inverses of Kronecker blocks: :func:`kron_solve`, :class:`KroneckerEigen` (exact
  Tikhonov), :func:`pi_split` ((2.95)–(2.96)), :class:`TwoTermKroneckerInverse` (§3.2.5),
  :func:`eigh_safe`;
- generic solvers: :func:`pcg`, :class:`WoodburySolver` ((4.50)).

Dense references (:func:`kron`, :func:`rearrange`, :meth:`KroneckerSum.to_dense`,
:meth:`ZOperator.to_dense`, :func:`nearest_kronecker`) form matrices larger than
O(d²) and are documented as such; nothing else does.
"""

from curvlib.linalg.inverse import (
    KroneckerEigen,
    TwoTermKroneckerInverse,
    cholesky_inverses,
    eigh_safe,
    kron_solve,
    pi_split,
)
from curvlib.linalg.blocks import (
    BlockDiagonalOperator,
    DampedKroneckerFactors,
    FactorEigenbasis,
    InverseFactored,
    KroneckerFactored,
    LayerBlockOperator,
    SampledBlock,
    ShiftSolvable,
    structured_part,
)
from curvlib.linalg.kron import aligned_empty, kron, kron_matvec, matvec_from_matrix_form, row_aligned, two_sided, unvec, vec
from curvlib.linalg.kronecker_sum import KroneckerSum
from curvlib.linalg.operator import (
    AdjointOperator,
    DenseOperator,
    IdentityOperator,
    LinearOperator,
    PermutationOperator,
    ProductOperator,
    ScaledOperator,
    SubmatrixOperator,
    SumOperator,
    VectorLayout,
    finite_screen,
    host_values,
)
from curvlib.linalg.rearrange import (
    NearestKronecker,
    factors_from_singular,
    nearest_kronecker,
    rearrange,
    unrearrange,
)
from curvlib.linalg.eigen import EigenResult, top_eigenpairs
from curvlib.linalg.solvers import PCGInfo, WoodburySolver, matrix_pcg, pcg, woodbury_solve
from curvlib.linalg.svd import SVDResult, lanczos_svd, power_svd
from curvlib.linalg.zproducts import (
    AffineZOperator,
    DenseZOperator,
    ZOperator,
    ConvZOperator,
    LinearZOperator,
    deflated,
    ema_combined,
)

__all__ = [
    "BlockDiagonalOperator",
    "EigenResult",
    "top_eigenpairs",
    "DampedKroneckerFactors",
    "FactorEigenbasis",
    "InverseFactored",
    "KroneckerFactored",
    "LayerBlockOperator",
    "SampledBlock",
    "ShiftSolvable",
    "structured_part",
    "AdjointOperator",
    "DenseOperator",
    "IdentityOperator",
    "LinearOperator",
    "PermutationOperator",
    "ProductOperator",
    "ScaledOperator",
    "SubmatrixOperator",
    "SumOperator",
    "VectorLayout",
    "finite_screen",
    "host_values",
    "AffineZOperator",
    "ConvZOperator",
    "DenseZOperator",
    "KroneckerEigen",
    "KroneckerSum",
    "LinearZOperator",
    "NearestKronecker",
    "PCGInfo",
    "SVDResult",
    "TwoTermKroneckerInverse",
    "WoodburySolver",
    "ZOperator",
    "deflated",
    "eigh_safe",
    "ema_combined",
    "factors_from_singular",
    "kron",
    "kron_matvec",
    "kron_solve",
    "lanczos_svd",
    "matvec_from_matrix_form",
    "nearest_kronecker",
    "matrix_pcg",
    "pcg",
    "pi_split",
    "cholesky_inverses",
    "power_svd",
    "rearrange",
    "unrearrange",
    "unvec",
    "vec",
    "woodbury_solve",
    "aligned_empty",
    "row_aligned",
    "two_sided",
]
