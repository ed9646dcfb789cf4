import math

import numpy as np
import pytest

from spade.evaluation.metrics import auroc, pro_auc, pro_curve


def test_auroc_hand_computed():
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    # pairs (neg, pos): (0.1,0.35) win, (0.1,0.8) win, (0.4,0.35) loss, (0.4,0.8) win -> 3/4
    assert auroc([0, 1, 0, 1], [0.1, 0.35, 0.4, 0.8]) == pytest.approx(0.75)
    assert auroc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert math.isnan(auroc([1, 1], [0.1, 0.2]))


def test_pro_perfect_and_inverted():
    masks = np.zeros((2, 10, 10), dtype=bool)
    masks[0, 2:4, 2:4] = True
    masks[1, 6:9, 1:3] = True
    assert pro_auc(masks, masks.astype(float)) == pytest.approx(1.0)
    assert pro_auc(masks, 1.0 - masks.astype(float)) == pytest.approx(0.0)


def test_pro_weights_regions_equally():
    """Two regions of sizes 1 and 9; the score finds only the small one first."""
    masks = np.zeros((1, 10, 10), dtype=bool)
    masks[0, 0, 0] = True
    masks[0, 5:8, 5:8] = True
    scores = np.zeros((1, 10, 10))
    scores[0, 0, 0] = 3.0
    scores[0, 5:8, 5:8] = 1.0
    fpr, pro = pro_curve(masks, scores)
    # thresholds 3 (small region found: overlap (1 + 0)/2), 1 (both), 0 (all pixels, fpr 1)
    np.testing.assert_allclose(fpr, [0.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(pro, [0.0, 0.5, 1.0, 1.0])
    assert pro_auc(masks, scores) == pytest.approx(1.0)


def test_pro_integrates_to_max_fpr_with_interpolation():
    """Regions A (score 9.5) and B (8.5) among ten normal pixels scored 10, 9, 7, ..., 0.

    Curve: (0,0) (.1,0) (.1,.5) (.2,.5) (.2,1) (.3,1) ...; area to 0.3 = .05 + .1 = .15 → 0.5;
    to 0.25 (between curve points) = .05 + .05 = .1 → 0.4.
    """
    masks = np.zeros((1, 1, 12), dtype=bool)
    masks[0, 0, 0] = masks[0, 0, 11] = True
    scores = np.zeros((1, 1, 12))
    scores[0, 0, 0], scores[0, 0, 11] = 9.5, 8.5
    scores[0, 0, 1:11] = [10, 9, 7, 6, 5, 4, 3, 2, 1, 0]
    fpr, pro = pro_curve(masks, scores)
    np.testing.assert_allclose(fpr[:5], [0.0, 0.1, 0.1, 0.2, 0.2])
    np.testing.assert_allclose(pro[:5], [0.0, 0.0, 0.5, 0.5, 1.0])
    assert pro_auc(masks, scores, max_fpr=0.3) == pytest.approx(0.5)
    assert pro_auc(masks, scores, max_fpr=0.25) == pytest.approx(0.4)


def test_pro_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        pro_curve(np.zeros((1, 2, 2)), np.zeros((1, 3, 3)))


def test_pro_on_mixed_image_sizes_equals_stacked_pieces():
    """A 32x64 image whose regions stay within its halves is, for PRO, the same as its two 32x32
    halves: the per-image (unstacked) result on two sizes must equal the stacked result on one size."""
    rng = np.random.default_rng(3)
    small_mask = np.zeros((32, 32), dtype=bool)
    small_mask[4:9, 5:12] = True
    wide_mask = np.zeros((32, 64), dtype=bool)
    wide_mask[10:20, 3:9] = True
    wide_mask[2:5, 40:60] = True
    small_scores = rng.random((32, 32)) + small_mask * rng.random((32, 32))
    wide_scores = rng.random((32, 64)) + wide_mask * 0.7 * rng.random((32, 64))
    mixed = pro_auc([small_mask, wide_mask], [small_scores, wide_scores])
    stacked = pro_auc(np.stack([small_mask, wide_mask[:, :32], wide_mask[:, 32:]]),
                      np.stack([small_scores, wide_scores[:, :32], wide_scores[:, 32:]]))
    assert not math.isnan(mixed)
    assert mixed == pytest.approx(stacked, abs=1e-12)
    fpr_mixed, pro_mixed = pro_curve([small_mask, wide_mask], [small_scores, wide_scores])
    fpr_stacked, pro_stacked = pro_curve(np.stack([small_mask, wide_mask[:, :32], wide_mask[:, 32:]]),
                                         np.stack([small_scores, wide_scores[:, :32], wide_scores[:, 32:]]))
    np.testing.assert_allclose(fpr_mixed, fpr_stacked)
    np.testing.assert_allclose(pro_mixed, pro_stacked)
    with pytest.raises(ValueError, match="differ in shape"):
        pro_auc([small_mask, wide_mask], [small_scores, small_scores])
