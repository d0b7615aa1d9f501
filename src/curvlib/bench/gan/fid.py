"""FID offline: the Fréchet distance (thesis (5.33)) between Gaussians fitted to the features
of a small MNIST classifier, trained once and cached.

The thesis computes FID on Inception-v3 features; Inception's weights cannot be downloaded
on an offline machine, and an ImageNet network is a poor judge of 28×28 digits anyway. The
feature extractor here is :class:`DigitClassifier`: two convolutions and a 64-unit hidden
layer trained (seeded) on the real training images; the features are its 64 hidden units
(after the ReLU). Its numbers are **not** comparable with Inception FIDs — every table and
plot calls it "FID, MNIST-classifier features".

    FID = ‖μ_G − μ_r‖² + tr Σ_G + tr Σ_r − 2 tr (Σ_r^{1/2} Σ_G Σ_r^{1/2})^{1/2}

computed in float64 from two symmetric eigendecompositions (:func:`frechet_distance`): the
matrix square roots of symmetric PSD matrices, eigenvalues clamped at 0 (rounding makes tiny
negative ones), never a general ``sqrtm`` with its complex round-off.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from curvlib.bench.data import Dataset
from curvlib.errors import ShapeError

__all__ = ["FEATURES", "DigitClassifier", "FIDScorer", "frechet_distance", "gaussian_statistics",
           "load_or_train_classifier"]

#: what the numbers are, for every table and plot
FEATURES = "FID, MNIST-classifier features"


class DigitClassifier(nn.Module):
    """Conv(1→16, 5×5) ReLU max-pool → Conv(16→32, 5×5) ReLU max-pool → Linear(32·4·4 → 64) ReLU
    (the features) → Linear(64 → 10). Inputs ``[B, 784]`` in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        )
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _train_classifier(data: Dataset, seed: int, epochs: int = 4, batch_size: int = 64) -> tuple[DigitClassifier, float]:
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = nn.CrossEntropyLoss()
    assert data.y_train is not None
    n = data.n_train
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad()
            loss_fn(model(data.X_train[idx]), data.y_train[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        X, y = (data.X_test, data.y_test) if data.n_test else (data.X_train, data.y_train)
        accuracy = float((model(X).argmax(1) == y).float().mean())
    return model, accuracy


def load_or_train_classifier(data: Dataset, *, seed: int = 0, cache: str | Path | None = None,
                             log: Callable[[str], None] = lambda _: None) -> tuple[DigitClassifier, float]:
    """The feature classifier of ``data``'s training images (seeded), and its test accuracy.

    With ``cache`` (a folder), the trained weights are saved there as
    ``fid_classifier-<key>.pt`` — the key hashes the training images, labels and seed — and
    loaded instead of retrained when present.
    """
    if data.y_train is None:
        raise ShapeError(f"FID features: the data {data.name!r} has no labels to train the classifier on")
    key = hashlib.sha256(data.X_train.numpy().tobytes() + data.y_train.numpy().tobytes()
                         + str(seed).encode()).hexdigest()[:16]
    file = None if cache is None else Path(cache) / f"fid_classifier-{key}.pt"
    if file is not None and file.exists():
        saved = torch.load(file, weights_only=True)
        model = DigitClassifier()
        model.load_state_dict(saved["state"])
        model.eval()
        log(f"FID classifier loaded from {file} (test accuracy {saved['accuracy']:.3f})")
        return model, float(saved["accuracy"])
    model, accuracy = _train_classifier(data, seed)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".tmp")
        torch.save({"state": model.state_dict(), "accuracy": accuracy}, tmp)
        tmp.replace(file)
    log(f"FID classifier trained (seed {seed}, test accuracy {accuracy:.3f})")
    return model, accuracy


def gaussian_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[d]`` and covariance ``[d, d]`` (unbiased) of ``[n, d]`` features, in float64."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ShapeError(f"FID: expected features [n ≥ 2, d], got {list(features.shape)}")
    f = features.detach().to(torch.float64)
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def _psd_sqrt(S: torch.Tensor) -> torch.Tensor:
    e, V = torch.linalg.eigh((S + S.T) / 2)
    return (V * e.clamp_min(0).sqrt()) @ V.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2} (float64, module docstring)."""
    mu1, mu2, sigma1, sigma2 = (t.to(torch.float64) for t in (mu1, mu2, sigma1, sigma2))
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    cross = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    value = (mu1 - mu2).square().sum() + torch.trace(sigma1) + torch.trace(sigma2) - 2 * cross
    return max(float(value), 0.0)


@dataclass
class FIDScorer:
    """FID of generated images against a fixed set of real ones (their statistics kept)."""

    classifier: DigitClassifier
    mu: torch.Tensor
    sigma: torch.Tensor

    @classmethod
    def of(cls, classifier: DigitClassifier, real: torch.Tensor) -> FIDScorer:
        return cls(classifier, *gaussian_statistics(cls._features(classifier, real)))

    @staticmethod
    @torch.no_grad()
    def _features(classifier: DigitClassifier, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
        x = images.reshape(images.shape[0], -1).to(torch.float32)
        return torch.cat([classifier.features(x[i : i + batch]) for i in range(0, x.shape[0], batch)])

    def __call__(self, images: torch.Tensor) -> float:
        """FID of ``images`` ``[n, 784]`` or ``[n, 1, 28, 28]`` (values in [0, 1]); NaN when an
        image or feature is not finite (a generator that diverged)."""
        features = self._features(self.classifier, images)
        if not bool(torch.isfinite(features).all()):
            return math.nan
        return frechet_distance(*gaussian_statistics(features), self.mu, self.sigma)
