"""Metrics against cases computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from HiMatchADLib.evaluation.metrics import (
    PixelAccumulator,
    aupro,
    best_dice,
    dice,
    image_auroc,
    pro_curve,
    region_weights,
    top_fraction_mean,
)


# ---------------------------------------------------------------------------------------------
# image level


def test_image_auroc_three_images():
    # One normal (0.5) against two anomalous (0.7 above it, 0.3 below it): 1 of 2 pairs ranked right.
    assert image_auroc([0, 1, 1], [0.5, 0.7, 0.3]) == pytest.approx(0.5)
    # Both anomalous above the normal one.
    assert image_auroc([0, 1, 1], [0.1, 0.7, 0.3]) == pytest.approx(1.0)


def test_image_auroc_ties_count_half():
    # normals {0.2, 0.6}, anomalous {0.6, 0.9}: pairs (0.6>0.2)=1, (0.6=0.6)=0.5, (0.9>both)=2 -> 3.5 / 4.
    assert image_auroc([0, 0, 1, 1], [0.2, 0.6, 0.6, 0.9]) == pytest.approx(0.875)


def test_image_auroc_nan_score_ranks_lowest_and_one_class_is_nan():
    assert image_auroc([0, 1, 1], [0.5, np.nan, 0.9]) == pytest.approx(0.5)
    assert np.isnan(image_auroc([1, 1], [0.1, 0.2]))


def test_top_fraction_mean():
    v = np.arange(1, 201, dtype=float)  # 1 % of 200 values = the top 2: (200 + 199) / 2
    assert top_fraction_mean(v) == pytest.approx(199.5)
    assert top_fraction_mean(np.array([3.0, 1.0])) == pytest.approx(3.0)  # at least one value
    assert np.isnan(top_fraction_mean(np.array([])))


# ---------------------------------------------------------------------------------------------
# the hand-computed pixel case
#
# One row of 13 pixels. Region A = pixels 0-1 (scores 0.9, 0.45), region B = pixel 3 (score 0.7),
# separated by a normal pixel. Ten normal pixels: 0.8, 0.6, 0.45, 0.3, 0.2, 0.1, 0.1, 0.05, 0, 0.
#
# Thresholds (flagged: score >= t), FPR over the 10 normal pixels, PRO = mean(O_A, O_B):
#   t=0.9  -> FPR 0.0, O_A=1/2, O_B=0  -> PRO 0.25
#   t=0.8  -> FPR 0.1                  -> PRO 0.25
#   t=0.7  -> FPR 0.1, O_B=1           -> PRO 0.75
#   t=0.6  -> FPR 0.2                  -> PRO 0.75
#   t=0.45 -> FPR 0.3, O_A=1 (tie with a normal pixel: one diagonal step) -> PRO 1.0
# Area to FPR 0.3: 0.1*0.25 + 0.1*0.75 + 0.1*(0.75+1.0)/2 = 0.025 + 0.075 + 0.0875 = 0.1875
#   -> AUPRO(0.3) = 0.1875 / 0.3 = 0.625.
# Area to FPR 0.25 (interpolated PRO at 0.25 = 0.875): 0.025 + 0.075 + 0.05*(0.75+0.875)/2 = 0.140625
#   -> AUPRO(0.25) = 0.140625 / 0.25 = 0.5625.
# Pixel AUROC: positive 0.9 beats 10 normals, 0.7 beats 9, 0.45 beats 7 and ties 1 -> 26.5 / 30.
# Pixel AP (step-wise): recall steps of 1/3 at precisions 1, 2/3, 3/6 -> (1 + 2/3 + 1/2) / 3 = 13/18.
# Best Dice: t=0.7 -> TP 2, FP 1: 4 / (3 + 3) = 2/3 (t=0.45 also 6/9 = 2/3; the higher threshold is kept).

ROW = np.array([[0.9, 0.45, 0.8, 0.7, 0.6, 0.45, 0.3, 0.2, 0.1, 0.1, 0.05, 0.0, 0.0]])
GT = np.zeros_like(ROW, dtype=bool)
GT[0, [0, 1, 3]] = True


def test_aupro_two_regions_by_hand():
    assert aupro([ROW], [GT], max_fpr=0.3) == pytest.approx(0.625)
    assert aupro([ROW], [GT], max_fpr=0.25) == pytest.approx(0.5625)


def test_pro_curve_points_by_hand():
    fpr, pro, thr = pro_curve([ROW], [GT])
    assert thr[:5] == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.45])
    assert fpr[:5] == pytest.approx([0.0, 0.1, 0.1, 0.2, 0.3])
    assert pro[:5] == pytest.approx([0.25, 0.25, 0.75, 0.75, 1.0])
    assert fpr[-1] == pytest.approx(1.0) and pro[-1] == pytest.approx(1.0)


def test_aupro_regions_pooled_across_cases():
    # The same pixels split into two cases (region A in one, region B in the other) give the same curve.
    a = ROW[:, :3]
    b = ROW[:, 3:]
    assert aupro([a, b], [GT[:, :3], GT[:, 3:]]) == pytest.approx(0.625)


def test_pixel_accumulator_matches_hand_values():
    acc = PixelAccumulator()
    pred = ROW >= 0.7  # flags 0.9, 0.8, 0.7: TP 2, FP 1, FN 1 -> Dice 4/6
    acc.add(ROW, GT, pred)
    m = acc.compute()
    assert m.aupro == pytest.approx(0.625)
    assert m.pixel_auroc == pytest.approx(26.5 / 30)
    assert m.pixel_ap == pytest.approx(13 / 18)
    assert m.best_dice == pytest.approx(2 / 3)
    assert m.best_dice_threshold == pytest.approx(0.7)
    assert m.dice_at_threshold == pytest.approx(2 / 3)
    assert (m.n_pixels, m.n_positive, m.n_regions) == (13, 3, 2)
    assert best_dice(ROW, GT) == pytest.approx((2 / 3, 0.7))


def test_perfect_and_inverted_detectors():
    gt = np.zeros((2, 16, 16), dtype=bool)
    gt[0, 4:8, 4:8] = True
    gt[1, 10:12, 2:5] = True
    perfect = gt.astype(float)
    acc = PixelAccumulator()
    for s, g in zip(perfect, gt):
        acc.add(s, g, s > 0.5)
    m = acc.compute()
    assert m.aupro == pytest.approx(1.0)
    assert m.pixel_auroc == pytest.approx(1.0)
    assert m.pixel_ap == pytest.approx(1.0)
    assert m.best_dice == pytest.approx(1.0)
    assert m.dice_at_threshold == pytest.approx(1.0)
    assert aupro(list(1.0 - perfect), list(gt)) == pytest.approx(0.0)


def test_constant_map_gives_chance_values():
    # Every pixel tied: one straight segment from (0,0) to (1,1); area to 0.3 = 0.045 -> 0.15.
    gt = np.zeros((8, 8), dtype=bool)
    gt[2:4, 2:4] = True
    assert aupro([np.zeros((8, 8))], [gt]) == pytest.approx(0.15)
    acc = PixelAccumulator()
    acc.add(np.zeros((8, 8)), gt)
    assert acc.compute().pixel_auroc == pytest.approx(0.5)


def test_region_connectivity_2d_and_3d():
    g2 = np.zeros((5, 5), dtype=bool)
    g2[1, 1] = g2[2, 2] = True  # diagonal neighbours: one 8-connected region
    g2[4, 4] = True
    w, n = region_weights(g2)
    assert n == 2 and w.tolist() == [0.5, 0.5, 1.0]
    g3 = np.zeros((3, 4, 4), dtype=bool)
    g3[0, 0, 0] = g3[1, 1, 1] = True  # corner neighbours in 3D: one 26-connected region
    assert region_weights(g3)[1] == 1
    assert region_weights(g3[None, 0])[1] == 1  # (1, ny, nx) is treated as 2D


def test_small_region_weighs_as_much_as_a_large_one():
    # Large region (12 px) found, small region (1 px) missed -> PRO 0.5 at every FPR below 1.
    s = np.zeros((6, 6))
    gt = np.zeros((6, 6), dtype=bool)
    gt[0:3, 0:4] = True
    s[0:3, 0:4] = 1.0
    gt[5, 5] = True
    s[5, 5] = -1.0  # missed: scored below every normal pixel
    assert aupro([s], [gt]) == pytest.approx(0.5)
    # Scored like the normal pixels instead (a tie with all of them): the last segment runs from
    # (0, 0.5) to (1, 1), PRO(0.3) = 0.65, area = 0.3 * (0.5 + 0.65) / 2 = 0.1725 -> 0.575.
    s[5, 5] = 0.0
    assert aupro([s], [gt]) == pytest.approx(0.575)


def test_negative_stride_is_deterministic_and_close():
    rng = np.random.default_rng(1)
    maps, gts = [], []
    for i in range(6):
        g = np.zeros((40, 40), dtype=bool)
        if i % 2:
            g[10 + i : 18 + i, 12:20] = True
        m = rng.normal(size=(40, 40)) + 2.0 * g
        maps.append(m)
        gts.append(g)
    exact = PixelAccumulator()
    sub = PixelAccumulator(negative_stride=4)
    sub2 = PixelAccumulator(negative_stride=4)
    for m, g in zip(maps, gts):
        exact.add(m, g)
        sub.add(m, g)
        sub2.add(m, g)
    e, s, s2 = exact.compute(), sub.compute(), sub2.compute()
    assert s.to_dict() == s2.to_dict()
    assert s.negative_stride == 4 and s.n_positive == e.n_positive
    assert abs(s.pixel_auroc - e.pixel_auroc) < 0.01
    assert abs(s.aupro - e.aupro) < 0.02
    assert abs(s.best_dice - e.best_dice) < 0.02


def test_no_lesion_gives_nan_not_error():
    acc = PixelAccumulator()
    acc.add(np.ones((4, 4)), np.zeros((4, 4), bool))
    m = acc.compute()
    assert np.isnan(m.pixel_auroc) and np.isnan(m.aupro)
    assert m.to_dict()["pixel_auroc"] is None


def test_dice_and_shape_check():
    assert dice(np.array([1, 1, 0]), np.array([1, 0, 0])) == pytest.approx(2 / 3)
    assert np.isnan(dice(np.zeros(3), np.zeros(3)))
    with pytest.raises(ValueError):
        PixelAccumulator().add(np.zeros((3, 3)), np.zeros((3, 4), bool))


def _brute_force_aupro(maps, gts, max_fpr=0.3):
    """Direct definition: loop over thresholds and regions (small inputs only)."""
    from scipy import ndimage

    regions = []
    for m, g in zip(maps, gts):
        lab, n = ndimage.label(g, structure=np.ones((3,) * g.ndim))
        regions += [m[lab == i] for i in range(1, n + 1)]
    neg = np.concatenate([m[~g] for m, g in zip(maps, gts)])
    pts = [(0.0, 0.0)]
    for t in np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]:
        pts.append((float((neg >= t).mean()), float(np.mean([(r >= t).mean() for r in regions]))))
    x, y = np.array(pts).T
    keep = x <= max_fpr
    xs, ys = list(x[keep]), list(y[keep])
    nxt = int(np.argmax(~keep)) if (~keep).any() else None
    if nxt is not None and xs[-1] < max_fpr:
        ys.append(ys[-1] + (y[nxt] - ys[-1]) * (max_fpr - xs[-1]) / (x[nxt] - xs[-1]))
        xs.append(max_fpr)
    return float(np.trapezoid(ys, xs) / max_fpr)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_the_direct_definition_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    maps, gts = [], []
    for _ in range(3):
        g = np.zeros((12, 12), dtype=bool)
        for _ in range(2):
            r, c = rng.integers(0, 9, 2)
            g[r : r + rng.integers(1, 4), c : c + rng.integers(1, 4)] = True
        maps.append(rng.integers(0, 6, (12, 12)) + 2.0 * g)  # many ties
        gts.append(g)
    assert aupro(maps, gts) == pytest.approx(_brute_force_aupro(maps, gts), abs=1e-12)
    assert aupro(maps, gts, max_fpr=0.1) == pytest.approx(_brute_force_aupro(maps, gts, 0.1), abs=1e-12)
