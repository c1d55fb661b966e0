r"""Patch scoring for the three modes, and the maps built from patch scores.

Notation: a query slice has foreground patches :math:`i` with unit tokens :math:`q_i^{(s)}` at
stage :math:`s`; :math:`\cos` is the inner product of unit vectors.

``knn`` (AnomalyDINO): :math:`a_i = 1 - \max_{b \in \mathcal{B}} \cos(q_i, b)` over every
foreground patch token :math:`b` of every normal slice (last stage; by default exact, faiss
brute-force inner products; ``knn_index`` ``ivf`` or ``hnsw`` find the maximum approximately, see
``knn_index.py``).

``dpmm`` (AnomalyDINO-DPMM): a Dirichlet-process Gaussian mixture (truncated at 200 components,
diagonal covariances, stick-breaking concentration prior 2) is fitted to a seeded sample of at most
50 000 normal last-stage tokens; with component means :math:`\mu_c` L2-normalised,
:math:`a_i = 1 - \max_c \cos(q_i, \mu_c)` over the components that explain normal tokens: weight
:math:`\pi_c > 10^{-6}` (the reference's cut), summed responsibility of the fitted tokens
:math:`\ge 1` and at least one token whose most likely component it is. The variational fit gives
every unused component a weight of about :math:`1/n` and the prior mean (the mean of the data) as its
mean; the weight cut alone would keep them and make the average token look perfectly normal.

``himatch``:

1. Retrieval (dual branch). Global branch: :math:`g_n = \cos(\mathrm{cls}_q, \mathrm{cls}_n)` for every
   normal slice :math:`n` (faiss inner-product search); the best ``candidates`` slices are kept.
   (Opt-in slice-position prior ``position_window``, beyond the paper: for volumes only slices
   whose relative position lies within that distance of the query's; off by default.) Patch
   branch: :math:`p_n = \mathrm{mean}_i \max_{c \in C_n} \cos(q_i, c)` over the last-stage
   clustered features :math:`C_n` of slice :math:`n` (below). Candidates are ranked by
   :math:`r_n = \alpha g_n + (1 - \alpha) p_n` and the top :math:`K` are the supports.
2. Stage maps. For each stage :math:`s` and support :math:`k`,
   :math:`d_{ik}^{(s)} = 1 - \max_{c \in C_k^{(s)}} \cos(q_i^{(s)}, c)` against the support's clustered
   features :math:`C_k^{(s)}`, computed when the bank was built: the spherical k-means centroids
   (64 per slice) of the support slice's own foreground tokens at stage :math:`s` (HiMatch-AD
   compares the query with the clustered features of the retrieved references; how they are
   clustered is the project's choice). (Opt-in ``shared_codebook``: each centroid is replaced by
   its entry in a codebook shared by the whole normal set, spherical k-means over all slice
   centroids of the stage with :math:`8\sqrt{m}` entries for :math:`m` centroids.) The stage score
   is the distance to the closest support, :math:`a_i^{(s)} = \min_k d_{ik}^{(s)}`, and the
   supports' disagreement its spread, :math:`v_i^{(s)} = \mathrm{Var}_k\, d_{ik}^{(s)}`.
3. Calibration. Each stage is standardised against its own normal-score distribution, measured on
   held-out normal slices (leave-one-subject-out): :math:`z_i^{(s)} = (a_i^{(s)} - m_s) / \sigma_s`
   with :math:`m_s` the median and :math:`\sigma_s = 1.4826\,\mathrm{MAD}` of the held-out
   :math:`a^{(s)}`.
4. Reliability-weighted fusion (``fusion``; see :mod:`.fusion` for the formula and the other
   rules): one weight per stage map, from the supports' disagreement on held-out normal slices,
   fixed at calibration.

Maps (all modes): patch scores on the patch grid (background patches set to the slice's median
foreground score) are upsampled bilinearly to the slice's pixel grid and smoothed with a Gaussian of
``sigma`` pixels of the image (by default the mode's reference: 4 for ``knn``, as AnomalyDINO, none
for ``dpmm``, as the DPMM reference, 4 for ``himatch``); pixels outside the foreground are 0. The ``himatch`` pixel map is passed through
:math:`\mathrm{softplus}(F) = \log(1 + e^F)`: positive inside the foreground (so the background's 0 stays
the lowest value), strictly increasing (no ties among foreground pixels, unlike clipping at 0), and
within 0.13 of :math:`F` ("standard deviations above normal") wherever :math:`F \ge 2`. Slice score: mean of the top 1 % patch scores of the slice;
volume score: mean of the top 1 % of all foreground patch scores of the volume.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..bank.store import NormalBank


def top_percent_mean(x: np.ndarray, percent: float = 1.0) -> float:
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size == 0:
        return float("nan")
    n = max(1, int(np.ceil(x.size * percent / 100.0)))
    return float(np.mean(np.partition(x, x.size - n)[x.size - n :]))


def patch_to_pixels(scores: np.ndarray, fg: np.ndarray, grid: tuple, out_hw: tuple, sigma=0.0) -> np.ndarray:
    """Foreground patch scores -> pixel map of size ``out_hw`` (bilinear, then a Gaussian of
    ``sigma`` pixels of ``out_hw``: one number, or one per axis; 0 = no smoothing)."""
    import torch
    import torch.nn.functional as F
    from scipy.ndimage import gaussian_filter

    full = np.full(grid[0] * grid[1], float(np.median(scores)) if scores.size else 0.0, dtype=np.float32)
    full[fg] = scores
    t = torch.from_numpy(full.reshape(1, 1, grid[0], grid[1]))
    up = F.interpolate(t, size=tuple(out_hw), mode="bilinear", align_corners=False)[0, 0].numpy()
    sig = tuple(float(x) for x in np.broadcast_to(np.asarray(sigma, float), (2,)))
    if max(sig) > 0:
        up = gaussian_filter(up, sigma=sig)
    return up.astype(np.float32)


def _segment_max(sims: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Max over column segments ``[offsets[k], offsets[k+1])`` -> (rows, K)."""
    return np.maximum.reduceat(sims, offsets[:-1], axis=1)


def max_cos_to_slices(bank: NormalBank, stage: int, tokens: np.ndarray, slices) -> np.ndarray:
    """(n, len(slices)): for each query token, max cosine to each slice's clustered features.

    Per-slice centroids (default): only the rows of ``slices`` are read from the memory-mapped
    bank. Shared codebooks: the entries of all the slices are gathered once (deduplicated), so the
    product costs ``n x (#distinct entries)`` however many slices share them.
    """
    offs = bank.cent_offsets[stage]
    if not bank.uses_codebook:
        cents = bank.centroids[stage]
        segs = [np.asarray(cents[offs[c] : offs[c + 1]], dtype=np.float32) for c in slices]
        seg_off = np.cumsum([0] + [s.shape[0] for s in segs])
        return _segment_max(tokens @ np.concatenate(segs).T, seg_off)
    codes = bank.codes[stage]
    segs = [codes[offs[c] : offs[c + 1]] for c in slices]
    seg_off = np.cumsum([0] + [s.shape[0] for s in segs])
    used, inv = np.unique(np.concatenate(segs), return_inverse=True)
    sims = tokens @ bank.codebook_f32(stage)[used].T
    return _segment_max(sims[:, inv], seg_off)


def window(slice_spacing: float, sigma_mm: float, n_slices: Optional[int] = None) -> int:
    """How many neighbouring slices on each side take part (3 sigma), at most ``n_slices - 1`` (the
    whole volume) when the number of slices is given."""
    if sigma_mm is None or sigma_mm <= 0:
        return 0
    w = float(np.floor(3.0 * float(sigma_mm) / max(float(slice_spacing), 1e-6) + 1e-9))
    if n_slices is not None:
        w = min(w, max(int(n_slices) - 1, 0))
    return int(w)


def fuse_one(i: int, maps: dict, foregrounds: dict, slice_spacing: float, sigma_mm: float) -> np.ndarray:
    """Fused map of slice ``i`` from the scored slices' ``maps`` and ``foregrounds`` (dicts keyed by
    slice index; slices missing from ``maps`` were not scored)."""
    w = window(slice_spacing, sigma_mm)
    num = np.zeros(maps[i].shape, np.float64)
    den = np.zeros(maps[i].shape, np.float64)
    # only slices that have a map can take part: the loop is bounded by them, whatever the window
    for j in range(max(i - w, min(maps)), min(i + w, max(maps)) + 1):
        if j not in maps:
            continue
        g = np.exp(-0.5 * ((i - j) * float(slice_spacing) / float(sigma_mm)) ** 2)
        f = foregrounds[j].astype(np.float64) * g
        num += f * maps[j]
        den += f
    fused = np.where(den > 0, num / np.maximum(den, 1e-12), maps[i])
    return (fused * foregrounds[i]).astype(np.float32)


def fuse_slices(maps: np.ndarray, foreground: np.ndarray, scored: np.ndarray, slice_spacing: float, sigma_mm: float) -> np.ndarray:
    """Fuse the maps ``(n, H, W)`` of a volume across slices (see the module docstring); ``scored``
    says per slice whether it has a map. Unscored slices are returned unchanged."""
    maps = np.asarray(maps, np.float32)
    out = maps.copy()
    if window(slice_spacing, sigma_mm) == 0:
        return out
    idx = np.flatnonzero(np.asarray(scored, bool))
    m = {int(j): maps[j] for j in idx}
    f = {int(j): foreground[j] for j in idx}
    for i in idx:
        out[i] = fuse_one(int(i), m, f, slice_spacing, sigma_mm)
    return out
