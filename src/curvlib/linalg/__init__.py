"""Pure tensor kernels of curvlib (no ``torch.nn``): Kronecker algebra, the
rearrangement Z, matrix-free Z-products, power SVD, Lanczos bidiagonalization,
inverses of Kronecker sums, PCG and Woodbury solves."""

from curvlib.linalg.operator import DenseZOperator, ZOperator

__all__ = ["DenseZOperator", "ZOperator"]
