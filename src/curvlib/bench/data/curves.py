"""CURVES: the thesis's images of hand-drawn-like curves, regenerated (:func:`make_curves`)
since no package ships them, or read from a ``.npy`` given by path (:func:`load_curves`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from curvlib.bench.data.dataset import Dataset, image_dataset
from curvlib.bench.data.files import images_from_npy, user_file
from curvlib.errors import ConfigError

__all__ = ["load_curves", "make_curves"]


def _bezier_control_points(rng: np.random.Generator, n: int, size: int, margin: float,
                           min_chord: float) -> np.ndarray:
    """``[n, 4, 2]`` control points uniform in the square, end points ≥ min_chord apart."""
    lo, hi = margin, size - 1 - margin
    pts = rng.uniform(lo, hi, size=(n, 4, 2))
    redo = np.linalg.norm(pts[:, 3] - pts[:, 0], axis=1) < min_chord
    while redo.any():  # rejection: redraw the offending curves only (deterministic given the seed)
        pts[redo] = rng.uniform(lo, hi, size=(int(redo.sum()), 4, 2))
        redo = np.linalg.norm(pts[:, 3] - pts[:, 0], axis=1) < min_chord
    return pts


def _rasterize(ctrl: np.ndarray, widths: np.ndarray, size: int, n_samples: int) -> np.ndarray:
    """Draw cubic Bézier strokes: ``ctrl [b, 4, 2]`` (x, y), ``widths [b]`` → ``[b, size²]``.

    The ink at pixel p is the line integral ∫ exp(−‖p − B‖²/(2s²)) dl / (s√(2π)) along
    the curve B, by the midpoint rule on ``n_samples`` parameter intervals weighted by
    their length. The Gaussian factors into an x part and a y part, so the sum over
    samples is one batched ``[size, K] @ [K, size]`` product per image.
    """
    t = (np.arange(n_samples + 1, dtype=np.float64) / n_samples)[:, None]      # [K+1, 1]
    basis = np.concatenate([(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3], axis=1)
    poly = np.einsum("sk,bkc->bsc", basis, ctrl)                                # [b, K+1, 2]
    mid = 0.5 * (poly[:, 1:] + poly[:, :-1])                                    # [b, K, 2]
    dl = np.linalg.norm(poly[:, 1:] - poly[:, :-1], axis=2)                     # [b, K]
    grid = np.arange(size, dtype=np.float64)
    s2 = (2.0 * widths**2)[:, None, None]
    gx = np.exp(-((grid[None, None, :] - mid[:, :, 0:1]) ** 2) / s2)           # [b, K, size] (columns)
    gy = np.exp(-((grid[None, None, :] - mid[:, :, 1:2]) ** 2) / s2)           # [b, K, size] (rows)
    gy *= (dl / (widths[:, None] * math.sqrt(2.0 * math.pi)))[:, :, None]
    ink = np.matmul(gy.transpose(0, 2, 1), gx)                                  # [b, rows, cols]
    np.clip(ink, 0.0, 1.0, out=ink)  # a stroke crossing itself saturates, like ink
    ink[ink < 1e-2] = 0.0  # an exactly blank background, as in MNIST
    return ink.reshape(ctrl.shape[0], size * size)


def make_curves(
    n: int = 20_000,
    seed: int = 0,
    *,
    test_fraction: float = 0.2,
    size: int = 28,
    width: tuple[float, float] = (0.9, 1.4),
    margin: float = 2.0,
    min_chord: float = 14.0,
    n_samples: int = 96,
) -> Dataset:
    """Generate a CURVES data set: random smooth pen strokes drawn into ``size×size`` images.

    The thesis's CURVES (appendix 3.D: 28×28 "simulated handdrawn curves", 16,000 train
    and 4,000 validation images — the defaults here) is not shipped by any package, so
    it is regenerated. Construction, per image:

    1. Four control points ``P0..P3`` uniform in ``[margin, size-1-margin]²`` (pixel
       units, x = column, y = row), redrawn until ``‖P3 − P0‖ ≥ min_chord`` so that no
       stroke collapses to a dot. A cubic Bézier curve stays in the hull of its control
       points, hence inside the image.
    2. The curve is ``B(t) = (1−t)³P0 + 3(1−t)²t P1 + 3(1−t)t² P2 + t³P3``, t ∈ [0, 1].
    3. A round Gaussian pen of width ``s`` (drawn uniform in ``width``, pixels) deposits
       ink ``∫ exp(−‖p − B‖²/(2s²)) dl / (s√(2π))`` at each pixel centre ``p`` (midpoint
       rule over ``n_samples`` parameter intervals, weighted by their arc length). Along
       a straight stroke this is ``exp(−d²/(2s²))``, ``d`` the distance to the curve: an
       anti-aliased stroke 2–3 pixels wide with value 1 on the curve. Ink is clipped to
       1 where the stroke crosses itself or bends sharply, and set to 0 below 0.01.

    All random numbers are drawn up front from ``numpy.random.default_rng(seed)`` (the
    images do not depend on how rasterization is chunked); the split then uses ``seed``
    as well.

    Returns:
        a :class:`Dataset` with ``X`` ``[·, size²]`` float32 in ``[0, 1]``, no labels,
        ``image_shape == (1, size, size)``.
    """
    if n < 1 or n_samples < 1:
        raise ConfigError(f"make_curves: n and n_samples must be ≥ 1, got n={n}, n_samples={n_samples}")
    if not 0 < width[0] <= width[1]:
        raise ConfigError(f"make_curves: width must be (low, high) with 0 < low ≤ high, got {width}")
    if size - 1 - 2 * margin <= min_chord / math.sqrt(2):
        raise ConfigError(f"make_curves: min_chord={min_chord} cannot fit in a {size}×{size} image "
                          f"with margin={margin}")
    rng = np.random.default_rng(seed)
    ctrl = _bezier_control_points(rng, n, size, margin, min_chord)
    widths = rng.uniform(width[0], width[1], size=n)
    images = np.empty((n, size * size), dtype=np.float32)
    chunk = max(1, 2**21 // (size * n_samples))  # bounds the [b, K, size] temporaries
    for i in range(0, n, chunk):
        images[i:i + chunk] = _rasterize(ctrl[i:i + chunk], widths[i:i + chunk], size, n_samples)
    return image_dataset(
        "curves", images, None, image_shape=(1, size, size), test_fraction=test_fraction, seed=seed,
        description=f"{n} generated CURVES images {size}x{size} (random cubic Bezier strokes, width "
        f"{width[0]}-{width[1]} px), ink in [0, 1]",
        source=f"curvlib.bench.data.make_curves(n={n}, seed={seed})",
    )


def load_curves(
    path: str | Path | None = None, *, n: int = 20_000, test_fraction: float = 0.2, seed: int = 0
) -> Dataset:
    """CURVES images: generated by :func:`make_curves` (``n``, ``seed``) when ``path`` is
    ``None``, else read from a ``.npy`` of images ``[n, H, W]``, floats in ``[0, 1]`` or
    integers in ``[0, 255]`` (e.g. a converted copy of the original data set), split with
    ``seed``."""
    if path is None:
        return make_curves(n, seed, test_fraction=test_fraction)
    file = user_file(path, "load_curves")
    images = images_from_npy(file, "load_curves")
    m, h, w = images.shape
    return image_dataset("curves", images.reshape(m, h * w), None, image_shape=(1, h, w),
                    test_fraction=test_fraction, seed=seed,
                    description=f"{m} CURVES images from {file.name}, [0, 1]", source=str(file))
