"""Seeded spherical k-means (faiss): per-slice summaries and the bank's shared codebooks."""

from __future__ import annotations

import math

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def spherical_kmeans(x: np.ndarray, k: int, seed: int = 0, niter: int = 20) -> np.ndarray:
    """Cluster unit vectors ``x`` (n, d) into at most ``k`` unit centroids: (m, d) float32.

    Empty clusters are dropped. When ``n <= k`` the points themselves are returned, so nothing is
    lost on small slices.
    """
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if n == 0:
        return np.zeros((0, d), np.float32)
    if n <= k:
        return x.copy()
    km = faiss.Kmeans(d, int(k), niter=int(niter), seed=int(seed) + 1, spherical=True, verbose=False, min_points_per_centroid=1, max_points_per_centroid=max(256, n // k + 1))
    km.train(x)
    _, assign = km.index.search(x, 1)
    keep = np.bincount(assign[:, 0], minlength=k) > 0
    return _unit(km.centroids[keep]).astype(np.float32)


def codebook_size(n_vectors: int, factor: float, cap: int = 16384) -> int:
    """``round(factor * sqrt(n))`` entries (at least 64, at most ``cap`` and ``n``): grows as sqrt(n)."""
    if n_vectors <= 0:
        return 0
    return int(min(n_vectors, cap, max(64, round(float(factor) * math.sqrt(n_vectors)))))


def build_codebook(
    x: np.ndarray, size: int, seed: int = 0, niter: int = 10, points_per_entry: int = 32, chunk: int = 65536, check=None
) -> tuple[np.ndarray, np.ndarray]:
    """Shared codebook of unit vectors ``x`` (n, d) (any float dtype; a memory map is read in chunks).

    Spherical k-means with ``size`` entries, trained on a seeded subsample of at most
    ``points_per_entry * size`` rows; then every row is assigned to its most similar entry. Entries
    no row uses are dropped. Returns ``(codebook (m, d) float32 unit rows, codes (n,) int32)``.
    ``check`` is called between chunks (cancellation).
    """
    import faiss

    n, d = x.shape
    if n == 0:
        return np.zeros((0, d), np.float32), np.zeros(0, np.int32)
    if n <= size:
        return _unit(np.asarray(x, dtype=np.float32)), np.arange(n, dtype=np.int32)
    rng = np.random.default_rng(seed)
    n_train = min(n, int(points_per_entry) * int(size))
    idx = np.sort(rng.choice(n, n_train, replace=False)) if n_train < n else np.arange(n)
    train = np.ascontiguousarray(np.asarray(x[idx], dtype=np.float32))
    km = faiss.Kmeans(d, int(size), niter=int(niter), seed=int(seed) + 1, spherical=True, verbose=False, min_points_per_centroid=1, max_points_per_centroid=n_train // int(size) + 1)
    km.train(train)
    del train
    cb = np.ascontiguousarray(_unit(km.centroids).astype(np.float32))
    index = faiss.IndexFlatIP(d)
    index.add(cb)
    codes = np.empty(n, np.int64)
    for a in range(0, n, chunk):
        if check is not None:
            check()
        _, nearest = index.search(np.ascontiguousarray(np.asarray(x[a : a + chunk], dtype=np.float32)), 1)
        codes[a : a + chunk] = nearest[:, 0]
    used, codes = np.unique(codes, return_inverse=True)
    return cb[used], codes.astype(np.int32)
