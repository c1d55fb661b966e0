"""Seeded spherical k-means (faiss) used to summarise a slice's patch tokens."""

from __future__ import annotations

import numpy as np


def spherical_kmeans(x: np.ndarray, k: int, seed: int = 0, niter: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Cluster unit vectors ``x`` (n, d) into at most ``k`` unit centroids.

    Returns ``(centroids (m, d) float32, weights (m,) float32)`` where ``weights`` are the fractions
    of points assigned to each centroid; empty clusters are dropped. When ``n <= k`` the points
    themselves are returned (each with weight 1/n), so nothing is lost on small slices.
    """
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if n == 0:
        return np.zeros((0, d), np.float32), np.zeros(0, np.float32)
    if n <= k:
        return x.copy(), np.full(n, 1.0 / n, np.float32)
    km = faiss.Kmeans(d, int(k), niter=int(niter), seed=int(seed) + 1, spherical=True, verbose=False, min_points_per_centroid=1, max_points_per_centroid=max(256, n // k + 1))
    km.train(x)
    _, assign = km.index.search(x, 1)
    counts = np.bincount(assign[:, 0], minlength=k).astype(np.float32)
    keep = counts > 0
    cents = km.centroids[keep]
    cents /= np.maximum(np.linalg.norm(cents, axis=1, keepdims=True), 1e-12)
    return cents.astype(np.float32), (counts[keep] / n).astype(np.float32)
