"""FID on MNIST-classifier features (:mod:`curvlib.bench.gan.fid`): the Fréchet distance
against an independent float64 formula (scipy's general matrix square root), FID of a set
with itself ≈ 0, FID growing with added noise, and the classifier's cache."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from curvlib.bench.data import load_mnist
from curvlib.bench.gan.fid import FIDScorer, frechet_distance, gaussian_statistics, load_or_train_classifier
from curvlib.errors import ShapeError


def _spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
    return A @ A.T / (2 * d)


def test_frechet_distance_equals_the_formula_with_scipys_sqrtm():
    d = 12
    mu1, mu2 = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    S1, S2 = _spd(d, 1), _spd(d, 2)
    covmean = scipy.linalg.sqrtm(S1.numpy() @ S2.numpy())
    expected = float(((mu1 - mu2) ** 2).sum()) + np.trace(S1.numpy()) + np.trace(S2.numpy()) - 2 * np.trace(covmean).real
    assert frechet_distance(mu1, S1, mu2, S2) == pytest.approx(expected, rel=1e-10)
    # a singular covariance (rank 3 of 12): no complex round-off, still the formula
    g = torch.Generator().manual_seed(3)
    B = torch.randn(d, 3, generator=g, dtype=torch.float64)
    S3 = B @ B.T
    assert frechet_distance(mu1, S3, mu1, S3) == pytest.approx(0.0, abs=1e-9 * float(torch.trace(S3)))


def test_gaussian_statistics_refuses_fewer_than_two_samples():
    with pytest.raises(ShapeError, match="n ≥ 2"):
        gaussian_statistics(torch.zeros(1, 4))


@pytest.fixture(scope="module")
def scorer_and_images(tmp_path_factory):
    data = load_mnist(seed=0).subset(n_train=1024, n_test=400)
    classifier, accuracy = load_or_train_classifier(data, seed=0, cache=tmp_path_factory.mktemp("fid"))
    assert accuracy > 0.85  # the features separate the digits
    return FIDScorer.of(classifier, data.X_test), data


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(scorer_and_images):
    scorer, data = scorer_and_images
    real = data.X_test
    assert scorer(real) == pytest.approx(0.0, abs=1e-6 * scorer(torch.zeros_like(real) + 0.5))
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(real.shape, generator=g)
    fids = [scorer((real + s * noise).clamp(0, 1)) for s in (0.05, 0.2, 0.5, 1.0)]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    assert fids[0] > 0


def test_the_classifier_is_cached_and_reloaded(tmp_path):
    data = load_mnist(seed=0).subset(n_train=256, n_test=64)
    messages: list[str] = []
    first, acc1 = load_or_train_classifier(data, seed=1, cache=tmp_path, log=messages.append)
    second, acc2 = load_or_train_classifier(data, seed=1, cache=tmp_path, log=messages.append)
    assert "trained" in messages[0] and "loaded" in messages[1] and acc1 == acc2
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert len(list(tmp_path.glob("fid_classifier-*.pt"))) == 1
