"""Sample-quality metrics on network features: FID/sFID, Inception Score, precision and recall.

Definitions follow the ADM evaluator (guided-diffusion/evaluations), which produced the
published numbers this project compares against:

- Frechet distance between Gaussians fitted to two feature sets (FID on pool3, sFID on the
  spatial mixed_6/conv features); covariances with the unbiased (N - 1) normaliser.
- Inception Score exp(E_x KL(p(y|x) || p(y))), averaged over equal consecutive splits.
- Improved precision/recall (Kynkaanniemi et al. 2019): a point lies on a manifold when it is
  within the k-th nearest-neighbour radius (k = 3) of at least one of the manifold's points.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import linalg


@dataclass(frozen=True)
class Gaussian:
    """Mean and covariance of a feature set."""

    mu: np.ndarray  # [D]
    sigma: np.ndarray  # [D, D]

    @classmethod
    def fit(cls, features: np.ndarray) -> "Gaussian":
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"need at least 2 feature vectors [N, D] to fit a Gaussian, got {features.shape}")
        return cls(features.mean(axis=0), np.cov(features, rowvar=False))


def frechet_distance(a: Gaussian, b: Gaussian) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    tr (S_a S_b)^(1/2) is the sum of the square roots of the eigenvalues of S_a S_b, which equal
    those of the symmetric PSD matrix S_a^(1/2) S_b S_a^(1/2). Computing them with symmetric
    eigendecompositions (clamping the tiny negative eigenvalues rounding produces) stays exact for
    singular covariances, where the general scipy sqrtm of the non-symmetric product returns
    complex or non-finite values (the case of fewer samples than dimensions: small evaluations).
    """
    if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
        raise ValueError(f"statistics of different dimension: {a.mu.shape} vs {b.mu.shape}")
    diff = a.mu - b.mu
    root_a = _psd_sqrt(a.sigma)
    cross = linalg.eigvalsh(root_a @ b.sigma @ root_a)
    trace_sqrt = np.sqrt(np.clip(cross, 0.0, None)).sum()
    distance = diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * trace_sqrt
    return float(max(distance, 0.0))


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    values, vectors = linalg.eigh((sigma + sigma.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def inception_score(logits: np.ndarray, splits: int = 10) -> float:
    """IS from classifier logits [N, K]: mean over `splits` consecutive chunks of
    exp(mean_x KL(p(y|x) || p(y))), p(y) being the chunk's marginal."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if logits.ndim != 2 or logits.shape[0] < splits:
        raise ValueError(f"need logits [N, K] with N >= splits={splits}, got {tuple(logits.shape)}")
    log_p = torch.log_softmax(logits, dim=1)
    scores = []
    for chunk in torch.tensor_split(log_p, splits):
        log_marginal = torch.logsumexp(chunk, dim=0) - np.log(chunk.shape[0])
        kl = (chunk.exp() * (chunk - log_marginal)).sum(dim=1)
        scores.append(float(kl.mean().exp()))
    return float(np.mean(scores))


def precision_recall(
    reference: np.ndarray, samples: np.ndarray, k: int = 3, block: int = 10_000, device: str | torch.device = "cpu"
) -> tuple[float, float]:
    """Improved precision (samples on the reference manifold) and recall (reference on the samples').

    Distances are computed in blocks on `device` so 50K x 50K comparisons fit in memory.
    """
    ref = torch.as_tensor(np.asarray(reference), dtype=torch.float32, device=device)
    gen = torch.as_tensor(np.asarray(samples), dtype=torch.float32, device=device)
    if ref.ndim != 2 or gen.ndim != 2 or ref.shape[1] != gen.shape[1]:
        raise ValueError(f"feature sets must be [N, D] of one D, got {tuple(ref.shape)} and {tuple(gen.shape)}")
    if min(ref.shape[0], gen.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set")
    ref_radii = _knn_radii(ref, k, block)
    gen_radii = _knn_radii(gen, k, block)
    precision = _coverage(gen, ref, ref_radii, block)
    recall = _coverage(ref, gen, gen_radii, block)
    return precision, recall


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a_i - b_j|^2 through one matmul; rounding can make it slightly negative, hence the clamp."""
    return ((a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)).clamp_min_(0)


def _knn_radii(points: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour (itself, at 0, is the 0-th)."""
    radii = []
    for rows in points.split(block):
        dists = torch.cat([_squared_distances(rows, cols) for cols in points.split(block)], dim=1)
        radii.append(dists.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _coverage(queries: torch.Tensor, manifold: torch.Tensor, radii: torch.Tensor, block: int) -> float:
    """Fraction of queries within the radius of at least one manifold point."""
    covered = 0
    for rows in queries.split(block):
        inside = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
        for cols, col_radii in zip(manifold.split(block), radii.split(block)):
            inside |= (_squared_distances(rows, cols) <= col_radii).any(dim=1)
        covered += int(inside.sum())
    return covered / queries.shape[0]
