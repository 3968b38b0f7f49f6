"""The arithmetic of the metrics: FID's Fréchet distance, and the MMD of CMMD and DINO-MMD.

    FID = |mu_1 - mu_2|^2 + tr(C_1) + tr(C_2) - 2 tr((C_1 C_2)^(1/2))

``tr((C_1 C_2)^(1/2))`` is computed as the sum of square roots of the eigenvalues of the
symmetric matrix ``C_1^(1/2) C_2 C_1^(1/2)`` (similar to ``C_1 C_2``, so the same eigenvalues):
two symmetric eigendecompositions in float64, no complex ``sqrtm`` to clean up, and exact for
singular covariances (fewer samples than 2048 features), where ``scipy.linalg.sqrtm`` warns.

With fewer samples than features (a quick evaluation of 1,000 images, the tests, the demo), the
features themselves give the same trace for far less: with ``A`` the centred features of the
smaller set over ``sqrt(n - 1)`` (in Helmert's basis: n - 1 rows), ``C_1 = A^T A`` and
``C_1 C_2 = A^T (A C_2)`` has the nonzero eigenvalues of ``A C_2 A^T`` (n - 1 square, symmetric):
one small eigendecomposition instead of two of 2048 x 2048 (:func:`fid_from_features`), and no
square roots of the rounding noise of the D - n zero eigenvalues, which cost the D x D way about
1e-8 of the value.

    MMD^2 = mean k(x, x') + mean k(y, y') - 2 mean k(x, y),   k(a, b) = exp(-|a - b|^2 / (2 sigma^2))

is CMMD's estimator (the biased, minimum-variance one, diagonal terms included) with its
sigma = 10 and its scale of 1000, over L2-normalised embeddings; sums run over blocks of rows
so that 50,000 x 50,000 kernels never exist at once.

KID (Bińkowski et al. 2018) is the unbiased MMD^2 (diagonal terms left out) of Inception features
with the cubic polynomial kernel ``k(a, b) = (a . b / D + 1)^3``, averaged over random subsets of
at most 1,000 images of each set, as torch-fidelity and clean-fid compute it: unlike FID it has no
bias at small sample counts, so evaluations of different sizes compare.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.linalg import helmert

__all__ = ["FeatureStats", "fid_from_features", "frechet_distance", "kid", "mmd"]


class FeatureStats:
    """Running count, sum and sum of outer products of feature vectors (float64)."""

    def __init__(self, dim: int):
        self.n = 0
        self.sum = np.zeros(dim)
        self.outer = np.zeros((dim, dim))

    def add(self, features: Any) -> None:
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != len(self.sum):
            raise ValueError(f"expected features [N, {len(self.sum)}], got {list(f.shape)}")
        self.n += len(f)
        self.sum += f.sum(axis=0)
        self.outer += f.T @ f

    @property
    def mean(self) -> np.ndarray:
        return self.sum / self.n

    @property
    def cov(self) -> np.ndarray:
        """The unbiased covariance (``np.cov``'s): needs at least two samples."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.n}")
        mean = self.mean
        return (self.outer - self.n * np.outer(mean, mean)) / (self.n - 1)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mean1: np.ndarray, cov1: np.ndarray, mean2: np.ndarray, cov2: np.ndarray) -> float:
    """The Fréchet distance between N(mean1, cov1) and N(mean2, cov2); see the module note."""
    mean1, mean2 = np.asarray(mean1, np.float64), np.asarray(mean2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    if mean1.shape != mean2.shape or cov1.shape != cov2.shape or cov1.shape != mean1.shape * 2:
        raise ValueError(f"mismatched statistics: means {mean1.shape} and {mean2.shape}, "
                         f"covariances {cov1.shape} and {cov2.shape}")
    root1 = _sqrt_psd(cov1)
    middle = root1 @ cov2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)  # symmetric up to rounding
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = mean1 - mean2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt)


def _feature_sets(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two sets of features [N, D] of one width, as float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected two sets of features [N, D], got {list(x.shape)} and {list(y.shape)}")
    return x, y


def fid_from_features(x: np.ndarray, y: np.ndarray) -> float:
    """The Fréchet distance between the Gaussians fitted to two sets of features [N, D]: as
    :func:`frechet_distance` does, or through the smaller set's centred features when it has fewer
    samples than dimensions (see the module note; equal to rounding)."""
    x, y = _feature_sets(x, y)
    if min(len(x), len(y)) < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {min(len(x), len(y))}")
    small, large = (x, y) if len(x) <= len(y) else (y, x)
    cov_large = np.cov(large, rowvar=False)
    if len(small) - 1 >= x.shape[1]:  # a full-rank covariance: nothing to save
        return frechet_distance(small.mean(0), np.cov(small, rowvar=False), large.mean(0), cov_large)
    # Helmert's rows are orthonormal and orthogonal to the ones vector: they centre the features and
    # drop the zero eigenvalue that centring leaves (whose square root of rounding noise would count).
    a = helmert(len(small)) @ small / np.sqrt(len(small) - 1)
    inner = a @ cov_large @ a.T
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum()
    diff = small.mean(0) - large.mean(0)
    return float(diff @ diff + (a * a).sum() + np.trace(cov_large) - 2.0 * trace_sqrt)


def _kernel_mean(a: np.ndarray, b: np.ndarray, gamma: float, block: int) -> float:
    a_sq, b_sq = (a * a).sum(1), (b * b).sum(1)
    total = 0.0
    for start in range(0, len(a), block):
        rows = slice(start, start + block)
        distances = a_sq[rows, None] + b_sq[None, :] - 2.0 * (a[rows] @ b.T)
        total += np.exp(-gamma * distances).sum()
    return total / (len(a) * len(b))


def mmd(x: np.ndarray, y: np.ndarray, *, sigma: float = 10.0, scale: float = 1000.0, block: int = 2048) -> float:
    """CMMD's squared MMD with a Gaussian kernel between the rows of ``x`` and ``y``, times ``scale``."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or not len(x) or not len(y):
        raise ValueError(f"expected two non-empty sets of embeddings [N, D], got {list(x.shape)} and {list(y.shape)}")
    gamma = 1.0 / (2.0 * sigma**2)
    value = (_kernel_mean(x, x, gamma, block) + _kernel_mean(y, y, gamma, block)
             - 2.0 * _kernel_mean(x, y, gamma, block))
    return float(scale * value)


def kid(x: np.ndarray, y: np.ndarray, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0
        ) -> tuple[float, float]:
    """KID between the rows of ``x`` and ``y`` (see the module note): the mean and standard
    deviation over ``subsets`` pairs of subsets of ``min(len(x), len(y), subset_size)`` rows, drawn
    without replacement with ``seed``. When both sets are that size, every subset is the whole set:
    one value, standard deviation 0."""
    x, y = _feature_sets(x, y)
    m = min(len(x), len(y), subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples a set, got {min(len(x), len(y))}")
    if len(x) == len(y) == m:
        return _polynomial_mmd(x, y), 0.0
    rng = np.random.default_rng(seed)
    values = [_polynomial_mmd(x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)])
              for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))


def _polynomial_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 of two equal-sized sets with the cubic polynomial kernel."""
    m, d = len(x), x.shape[1]

    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a @ b.T / d + 1.0) ** 3

    xx, yy = kernel(x, x), kernel(y, y)
    within = (xx.sum() - np.trace(xx) + yy.sum() - np.trace(yy)) / (m * (m - 1))
    return float(within - 2.0 * kernel(x, y).mean())
