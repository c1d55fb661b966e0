"""Reader feedback as normal evidence for each method (see ``docs/method.md``, "Mark as normal").

An entry (:class:`~HiMatchADLib.bank.feedback.FeedbackEntry`) holds the tokens of the patches a
reader marked as normal, at every stage. Each method takes them as it takes its normal bank:

- ``knn`` adds the marked last-stage tokens to the tokens it searches:
  :math:`a_i = \\min(a_i, 1 - \\max_t \\cos(q_i, t))` over the marked tokens :math:`t`, the nearest
  neighbour over the bank and the marks together.
- ``himatch`` adds every marked slice as a support of its own, with its own clustered features at
  every stage (the same spherical k-means, ``clusters_per_slice`` centroids of the slice's marked
  tokens): the stage score, the distance to the closest support, becomes
  :math:`a_i^{(s)} = \\min(a_i^{(s)}, 1 - \\max_{c \\in C_f^{(s)}} \\cos(q_i^{(s)}, c))`. A marked slice
  is a support of every query slice, besides the :math:`K` retrieved normal ones (it displaces none
  of them, so the supports' disagreement and the fusion weights are those of the normal bank);
  the stage statistics and weights of the calibration are unchanged.
- ``dpmm`` adds components: the marked tokens' clustered features (as ``himatch``'s last stage)
  join the mixture's used component means, :math:`a_i = \\min(a_i, 1 - \\max_c \\cos(q_i, \\mu_c))`
  over the added components (the nearest-component rule the method scores with).

The calibrated threshold is not changed: feedback applies to predictions only, never to the
held-out normal slices the threshold was calibrated on.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..bank.clusters import spherical_kmeans

#: How each kind of evidence is made from the marked tokens.
FEEDBACK_KINDS = ("tokens", "clusters", "components")


class FeedbackEvidence:
    """Unit vectors that count as normal, per stage position (None where a method uses none)."""

    def __init__(self, vectors: list, entries: tuple = ()):
        self.vectors = [None if v is None else np.ascontiguousarray(v, np.float32) for v in vectors]
        self.entries = tuple(entries)

    def distance(self, stage_pos: int, tokens: np.ndarray) -> Optional[np.ndarray]:
        """``1 - max cos`` of every row of ``tokens`` to the evidence at ``stage_pos`` (None: none there)."""
        v = self.vectors[stage_pos]
        if v is None or v.shape[0] == 0:
            return None
        return (1.0 - (np.asarray(tokens, np.float32) @ v.T).max(1)).astype(np.float32)


def build_evidence(entries: list, kind: str, n_stages: int, clusters_per_slice: int, seed: int = 0) -> Optional[FeedbackEvidence]:
    """The evidence of ``entries`` for a method whose feedback is ``kind`` (:data:`FEEDBACK_KINDS`);
    None without entries."""
    if not entries:
        return None
    if kind not in FEEDBACK_KINDS:
        raise ValueError(f"unknown feedback kind {kind!r}")
    stages = range(n_stages) if kind == "clusters" else [n_stages - 1]
    vectors: list = [None] * n_stages
    for s in stages:
        parts = []
        for e in entries:
            for j in range(e.n_slices):
                t = e.slice_tokens(s, j)
                parts.append(t if kind == "tokens" else spherical_kmeans(t, clusters_per_slice, seed=seed))
        vectors[s] = np.concatenate(parts) if parts else None
    return FeedbackEvidence(vectors, tuple(entries))
