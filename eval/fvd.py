"""The Frechet distance between two sets of features (FVD over I3D features, FID over Inception features).

    d^2 = ||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr sqrt(S_a S_b)

in float64. Tr sqrt(S_a S_b) is computed without a general matrix square root: S_a S_b is similar to the symmetric
PSD matrix M = S_a^1/2 S_b S_a^1/2, so its square root's trace is the sum of sqrt(eigvalsh(M)). With
S_a = V diag(w) V^T and A = V diag(sqrt w), M = A^T S_b A: two symmetric eigendecompositions, no complex
arithmetic, and eigenvalues below eigh's resolution (rounding noise of rank deficiency, N < D) set to zero. The
`scipy.linalg.sqrtm(S_a @ S_b)` of the original code is a Schur method on a non-symmetric product: slower, complex
on singular inputs, and its `disp=False` call is gone from SciPy 1.18.

Covariance conventions differ between implementations and change the number: "unbiased" (divide by N - 1, as the
original FVD/TF-GAN and pytorch-fid code) is the default; "biased" (divide by N) matches StyleGAN-V. Every result
carries its convention.

`FeatureStats` accumulates count, sum and sum of outer products in float64, so 10,000+ videos never sit in memory
and per-worker statistics merge exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

Covariance = Literal["unbiased", "biased"]
COVARIANCES: tuple[str, ...] = ("unbiased", "biased")
DEFAULT_COVARIANCE: Covariance = "unbiased"


def _check_covariance(kind: str) -> None:
    if kind not in COVARIANCES:
        raise ValueError(f"covariance: expected one of {list(COVARIANCES)}, got {kind!r}")


def _check_features(features: np.ndarray, name: str) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"{name}: expected features (N, D) with N >= 1, got shape {features.shape}")
    if not np.isfinite(features).all():
        bad = int((~np.isfinite(features)).any(axis=1).sum())
        raise ValueError(f"{name}: {bad} of {len(features)} feature rows contain NaN or inf")
    return features


def _resolved(eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues with those below eigh's resolution (the matrix_rank tolerance) set to zero.

    They are rounding noise of a PSD matrix's null space, and the square root would amplify 1e-16 into 1e-8.
    """
    tol = max(eigenvalues.max(initial=0.0), 0.0) * len(eigenvalues) * np.finfo(np.float64).eps
    return np.where(eigenvalues > tol, eigenvalues, 0.0)


def trace_sqrt_product(cov_a: np.ndarray, cov_b: np.ndarray) -> float:
    """Tr sqrt(S_a S_b) for symmetric PSD S_a, S_b, via eigvalsh(S_a^1/2 S_b S_a^1/2)."""
    w, v = np.linalg.eigh(cov_a)
    a = v * np.sqrt(_resolved(w))
    m = a.T @ cov_b @ a
    return float(np.sqrt(_resolved(np.linalg.eigvalsh((m + m.T) / 2))).sum())


def frechet_distance_gaussians(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """The squared Frechet (2-Wasserstein) distance between N(mu_a, S_a) and N(mu_b, S_b)."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    d = mu_a.shape[0]
    if mu_a.shape != (d,) or mu_b.shape != (d,) or cov_a.shape != (d, d) or cov_b.shape != (d, d):
        raise ValueError(f"Gaussian statistics: shapes mu_a {mu_a.shape}, cov_a {cov_a.shape}, mu_b {mu_b.shape}, "
                         f"cov_b {cov_b.shape} do not share one dimension")
    diff = mu_a - mu_b
    distance = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt_product(cov_a, cov_b)
    return max(float(distance), 0.0)  # negative only by rounding when the two sets coincide


class FeatureStats:
    """Streaming first and second moments of features: update with batches, merge across workers."""

    def __init__(self, dim: int):
        if dim < 1:
            raise ValueError(f"FeatureStats: dim must be >= 1, got {dim}")
        self.dim = dim
        self.count = 0
        self.sum = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    @classmethod
    def from_features(cls, features: np.ndarray) -> FeatureStats:
        features = _check_features(features, "features")
        return cls(features.shape[1]).update(features)

    def update(self, batch: np.ndarray) -> FeatureStats:
        batch = _check_features(batch, "FeatureStats.update batch")
        if batch.shape[1] != self.dim:
            raise ValueError(f"FeatureStats.update batch: expected {self.dim} features per row, got {batch.shape[1]}")
        self.count += len(batch)
        self.sum += batch.sum(axis=0)
        self.outer += batch.T @ batch
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """A new accumulator holding both (for a tree or Ray reduce); neither input changes."""
        if other.dim != self.dim:
            raise ValueError(f"FeatureStats.merge: dimensions differ ({self.dim} vs {other.dim})")
        merged = FeatureStats(self.dim)
        merged.count = self.count + other.count
        merged.sum = self.sum + other.sum
        merged.outer = self.outer + other.outer
        return merged

    @property
    def mean(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("FeatureStats: no features accumulated")
        return self.sum / self.count

    def covariance(self, kind: Covariance = DEFAULT_COVARIANCE) -> np.ndarray:
        _check_covariance(kind)
        dof = self.count - 1 if kind == "unbiased" else self.count
        if dof < 1:
            raise ValueError(f"FeatureStats: a {kind} covariance needs more than {self.count} features")
        mean = self.mean
        # Raw moments cancel about 2 log10(|mean| / std) of float64's 16 digits: harmless for I3D logits.
        cov = (self.outer - self.count * np.outer(mean, mean)) / dof
        return (cov + cov.T) / 2

    def save(self, path: str | Path) -> None:
        np.savez(path, count=self.count, sum=self.sum, outer=self.outer)

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        with np.load(path) as data:
            stats = cls(data["sum"].shape[0])
            stats.count, stats.sum, stats.outer = int(data["count"]), data["sum"], data["outer"]
        return stats


@dataclass(frozen=True)
class FrechetResult:
    distance: float
    covariance: str  # "unbiased" (N - 1) or "biased" (N)
    n_a: int
    n_b: int

    def __str__(self) -> str:
        return f"{self.distance:.4f} (covariance={self.covariance}, n_a={self.n_a}, n_b={self.n_b})"


def frechet_from_stats(a: FeatureStats, b: FeatureStats,
                       covariance: Covariance = DEFAULT_COVARIANCE) -> FrechetResult:
    if a.dim != b.dim:
        raise ValueError(f"Frechet distance: feature dimensions differ ({a.dim} vs {b.dim})")
    distance = frechet_distance_gaussians(a.mean, a.covariance(covariance), b.mean, b.covariance(covariance))
    return FrechetResult(distance, covariance, a.count, b.count)


def _moments(features: np.ndarray, kind: Covariance, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance from centered features (all in memory: no cancellation, unlike streaming sums)."""
    features = _check_features(features, name)
    dof = len(features) - 1 if kind == "unbiased" else len(features)
    if dof < 1:
        raise ValueError(f"{name}: a {kind} covariance needs more than {len(features)} features")
    mean = features.mean(axis=0)
    centered = features - mean
    return mean, centered.T @ centered / dof


def frechet(features_a: np.ndarray, features_b: np.ndarray,
            covariance: Covariance = DEFAULT_COVARIANCE) -> FrechetResult:
    """The Frechet distance between two feature sets (N_a, D) and (N_b, D), with its protocol."""
    _check_covariance(covariance)
    mu_a, cov_a = _moments(features_a, covariance, "features_a")
    mu_b, cov_b = _moments(features_b, covariance, "features_b")
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"Frechet distance: feature dimensions differ ({mu_a.shape[0]} vs {mu_b.shape[0]})")
    return FrechetResult(frechet_distance_gaussians(mu_a, cov_a, mu_b, cov_b), covariance, len(features_a),
                         len(features_b))


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray,
                     covariance: Covariance = DEFAULT_COVARIANCE) -> float:
    return frechet(features_a, features_b, covariance).distance


def frechet_distance_from_stats(a: FeatureStats, b: FeatureStats,
                                covariance: Covariance = DEFAULT_COVARIANCE) -> float:
    return frechet_from_stats(a, b, covariance).distance
