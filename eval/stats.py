"""Feature statistics and the Fréchet distance between two Gaussians: the arithmetic of FID.

    FID = |mu_1 - mu_2|^2 + tr(C_1) + tr(C_2) - 2 tr((C_1 C_2)^(1/2))

``tr((C_1 C_2)^(1/2))`` is computed as the sum of square roots of the eigenvalues of the
symmetric matrix ``C_1^(1/2) C_2 C_1^(1/2)`` (similar to ``C_1 C_2``, so the same eigenvalues):
two symmetric eigendecompositions in float64, no complex ``sqrtm`` to clean up, and exact for
singular covariances (fewer samples than 2048 features), where ``scipy.linalg.sqrtm`` warns.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FeatureStats", "frechet_distance"]


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

    def save(self, path: str | os.PathLike[str], meta: dict[str, Any]) -> None:
        """Mean and covariance (not the running sums) plus ``meta``, atomically; no pickle."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            np.savez(f, n=np.int64(self.n), mean=self.mean, cov=self.cov,
                     meta=np.array(json.dumps(meta, sort_keys=True)))
        os.replace(tmp, path)


def load_stats(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, int, dict[str, Any]]:
    """(mean, cov, n, meta) of a file written by :meth:`FeatureStats.save`."""
    with np.load(path, allow_pickle=False) as data:
        return data["mean"], data["cov"], int(data["n"]), json.loads(str(data["meta"]))


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
