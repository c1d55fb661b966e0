r"""Fusion of the calibrated stage maps of ``himatch`` into one map.

The stage score of foreground patch :math:`i` at stage :math:`s` is standardised against the
stage's held-out normal scores, :math:`z_i^{(s)} = (a_i^{(s)} - m_s) / \sigma_s`, and the spread of
the supports' distances is put in the same units, :math:`\tilde v_i^{(s)} = v_i^{(s)} / \sigma_s^2`.
The rules (``fusion``):

``reliability`` (default), the project's reading of "weights maps according to their reliability":
one weight per stage map, from how much the K supports disagree on *normal* tissue,

.. math:: R_s = \operatorname{mean}_{i \in \text{held-out normal foreground}} \tilde v_i^{(s)},
          \qquad w_s = \frac{1}{R_s + \tau}, \qquad F_i = \frac{\sum_s w_s z_i^{(s)}}{\sum_s w_s}

(:math:`\tau = 1`). A stage whose supports disagree more on normal slices, relative to how much its
scores vary over normal tissue, estimates its distances less reliably and counts less; stages of
equal reliability give the plain mean. The weights are fixed at calibration: they do not depend on
the query, so an anomaly that only one stage sees keeps that stage's share of the fused score.

``mean``: :math:`F_i = \operatorname{mean}_s z_i^{(s)}`. ``max``: :math:`F_i = \max_s z_i^{(s)}`.

``variance``: the former per-pixel rule, :math:`w_i^{(s)} = 1 / (\tilde v_i^{(s)} + \tau)`. The spread
across supports grows with the anomaly itself (a lesion token is far from every support, and far by
different amounts), so at anomalies the weights fall roughly as :math:`1/z^2` and the rule acts as a
soft minimum over stages exactly where one stage is discriminative. Kept for comparison.
"""

from __future__ import annotations

import numpy as np

#: The fusion rules, the default first.
FUSIONS = ("reliability", "mean", "max", "variance")

#: Keeps the weights bounded (with agreeing supports, every stage has weight 1 / tau).
TAU = 1.0


def check_fusion(value) -> str:
    """The fusion rule ``value`` (case-insensitive), or ValueError naming the choices."""
    v = str(value).lower()
    if v not in FUSIONS:
        raise ValueError(f"must be one of {', '.join(FUSIONS)}, not '{value}'")
    return v


def standardise(a: np.ndarray, v: np.ndarray, median, sigma) -> tuple[np.ndarray, np.ndarray]:
    """(S, n) stage scores and support variances -> z-scores and variances in units of each stage's
    normal spread."""
    med = np.asarray(median, np.float32)[:, None]
    sig = np.asarray(sigma, np.float32)[:, None]
    return (a - med) / sig, v / sig**2


def stage_reliability(v_tilde_normal: np.ndarray) -> np.ndarray:
    """:math:`R_s`: the mean standardised support variance of each stage over held-out normal
    foreground patches, ``(S, n)`` -> ``(S,)``."""
    return np.asarray(v_tilde_normal, np.float64).mean(axis=1)


def stage_weights(reliability, tau: float = TAU) -> np.ndarray:
    """:math:`w_s = 1 / (R_s + \\tau)`, normalised to sum to 1."""
    w = 1.0 / (np.asarray(reliability, np.float64) + float(tau))
    return w / w.sum()


def fuse_stages(z: np.ndarray, v_tilde: np.ndarray, rule: str, weights=None, tau: float = TAU) -> np.ndarray:
    """Fused ``(n,)`` scores from ``(S, n)`` standardised stage scores (see the module docstring);
    ``weights`` (``(S,)``, from :func:`stage_weights`) are needed by ``reliability``."""
    if rule == "reliability":
        if weights is None:
            raise ValueError("the reliability fusion needs the stage weights of the calibration")
        w = np.asarray(weights, np.float64)[:, None]
        return ((w * z).sum(0) / w.sum()).astype(np.float32)
    if rule == "mean":
        return z.mean(0).astype(np.float32)
    if rule == "max":
        return z.max(0).astype(np.float32)
    if rule == "variance":
        w = 1.0 / (v_tilde + float(tau))
        return ((w * z).sum(0) / w.sum(0)).astype(np.float32)
    raise ValueError(f"unknown fusion '{rule}'")
