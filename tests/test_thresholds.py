"""Threshold selection on known score arrays."""
import numpy as np
import pytest

from spade.evaluation.thresholds import fpr_threshold, max_f1_threshold, run_thresholds, select_threshold


def test_max_f1_separable_scores_split_between_classes():
    labels = [0, 0, 0, 1, 1]
    scores = [0.1, 0.2, 0.3, 0.7, 0.9]
    found = max_f1_threshold(labels, scores)
    assert found["threshold"] == pytest.approx(0.5)
    assert found["f1"] == 1.0 and found["precision"] == 1.0 and found["recall"] == 1.0
    assert found["flagged"] == 2 and found["positives"] == 2 and found["method"] == "max_f1"


def test_max_f1_known_optimum_with_overlap():
    # Sorted high to low: 9(+) 8(-) 7(+) 6(+) 5(-) 4(-) 3(+) 2(-).  Four positives.
    # Flag top 1: F1 = 2*1/(1+4) = .40; top 3: 2*2/7 = .571; top 4: 2*3/(4+4) = .75;
    # top 7: 2*4/(7+4) = .727.  Best: flag {9, 8, 7, 6}, threshold between 6 and 5.
    scores = [9, 8, 7, 6, 5, 4, 3, 2]
    labels = [1, 0, 1, 1, 0, 0, 1, 0]
    found = max_f1_threshold(labels, scores)
    assert found["threshold"] == pytest.approx(5.5)
    assert found["f1"] == pytest.approx(0.75)
    assert found["precision"] == pytest.approx(0.75) and found["recall"] == pytest.approx(0.75)
    # the rule: >= threshold and > threshold flag the same observed scores
    s = np.array(scores, dtype=float)
    assert ((s >= found["threshold"]) == (s > found["threshold"])).all()
    assert (s >= found["threshold"]).sum() == 4


def test_max_f1_ties_are_flagged_together_and_order_does_not_matter():
    scores = np.array([0.5, 0.5, 0.5, 0.2, 0.2, 0.9])
    labels = np.array([1, 0, 1, 0, 0, 1])
    found = max_f1_threshold(labels, scores)
    # top {0.9}: F1 = 2/(1+3) = .5; top {0.9, .5 x3}: 2*3/(4+3) = .857; all: 6/9
    assert found["threshold"] == pytest.approx(0.35) and found["f1"] == pytest.approx(6 / 7)
    perm = np.random.default_rng(0).permutation(len(scores))
    assert max_f1_threshold(labels[perm], scores[perm]) == found


def test_max_f1_flagging_everything_is_just_below_the_minimum():
    found = max_f1_threshold([1, 1, 0], [1.0, 2.0, 3.0])  # best: flag all (F1 .8)
    assert found["flagged"] == 3 and found["threshold"] < 1.0 and found["threshold"] == pytest.approx(1.0)


def test_max_f1_prefers_fewest_flagged_among_equal_f1():
    # flag {4}: F1 = 2/(1+1)=1.0 already; adding more only lowers it
    assert max_f1_threshold([0, 0, 1], [1.0, 2.0, 4.0])["threshold"] == pytest.approx(3.0)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1]])
def test_max_f1_needs_both_classes(labels):
    with pytest.raises(ValueError, match="both"):
        max_f1_threshold(labels, np.arange(len(labels), dtype=float))


def test_fpr_threshold_on_known_normals():
    normals = np.arange(1, 101, dtype=float)  # 1..100
    found = fpr_threshold(normals, 0.05)
    assert found["threshold"] == pytest.approx(95.5)
    assert found["fpr"] == pytest.approx(0.05) and found["flagged"] == 5 and found["count"] == 100
    assert (normals >= found["threshold"]).mean() == pytest.approx(0.05)
    found = fpr_threshold(normals, 0.049)  # 4.9 normal images allowed -> 4
    assert found["threshold"] == pytest.approx(96.5) and found["fpr"] == pytest.approx(0.04)


def test_fpr_threshold_zero_target_is_just_above_the_maximum():
    normals = [0.3, 0.1, 0.2]
    found = fpr_threshold(normals, 0.0)
    assert found["threshold"] > 0.3 and found["threshold"] == pytest.approx(0.3) and found["fpr"] == 0.0
    assert fpr_threshold(normals, 0.2)["fpr"] == 0.0  # 0.6 of an image allowed -> none


def test_fpr_threshold_ties_never_exceed_the_target():
    normals = [1, 2, 3, 3, 3, 3]  # 1/3 allowed = 2 values, but the top 4 are tied at 3
    found = fpr_threshold(normals, 1 / 3)
    assert found["flagged"] == 0 and found["threshold"] > 3
    normals = [1, 2, 2, 3]  # half allowed: the top two are 2 and 3, but 2 ties with another 2 -> flag only 3
    assert fpr_threshold(normals, 0.5)["threshold"] == pytest.approx(2.5)


def test_fpr_threshold_rejects_bad_inputs():
    with pytest.raises(ValueError):
        fpr_threshold([], 0.1)
    with pytest.raises(ValueError):
        fpr_threshold([1.0], 1.0)


def test_select_threshold_auto_picks_by_available_labels():
    scores = [0.1, 0.2, 0.3, 0.7, 0.9]
    assert select_threshold(scores, [0, 0, 0, 1, 1])["method"] == "max_f1"
    only_normal = select_threshold(scores, [0, 0, 0, 0, 0], target_fpr=0.2)
    assert only_normal["method"] == "target_fpr" and only_normal["threshold"] == pytest.approx(0.8)
    unlabelled = select_threshold(scores, None, target_fpr=0.2)
    assert unlabelled == only_normal
    # target_fpr with labels uses only the normal scores
    forced = select_threshold(scores, [0, 0, 0, 1, 1], method="target_fpr", target_fpr=0.0)
    assert forced["threshold"] > 0.3 and forced["threshold"] < 0.31 and forced["count"] == 3
    with pytest.raises(ValueError):
        select_threshold(scores, [0, 0, 0, 0, 0], method="max_f1")
    with pytest.raises(ValueError, match="unknown"):
        select_threshold(scores, None, method="youden")


def test_run_thresholds_images_and_pixels():
    good = np.zeros((4, 4), dtype=np.float32)
    bad = np.zeros((4, 4), dtype=np.float32)
    bad[1:3, 1:3] = 5.0
    bad_mask = bad > 0
    result = run_thresholds([False, True], [1.0, 3.0], [good, bad], [np.zeros((4, 4), bool), bad_mask])
    assert result["image"] == pytest.approx(2.0) and result["image_selection"]["method"] == "max_f1"
    assert result["pixel"] == pytest.approx(2.5) and result["pixel_selection"]["f1"] == 1.0
    assert result["rule"] == "anomalous when score >= threshold"
    # normal images only: target FPR on image scores and on pixels
    rng = np.random.default_rng(1)
    maps = [rng.random((10, 10)).astype(np.float32) for _ in range(2)]
    result = run_thresholds([False] * 3, [1.0, 2.0, 3.0], maps, [np.zeros((10, 10), bool)] * 2,
                            image_fpr=0.0, pixel_fpr=0.01)
    assert result["image"] > 3.0 and result["image_selection"]["method"] == "target_fpr"
    flat = np.concatenate([m.ravel() for m in maps])
    assert (flat >= result["pixel"]).sum() == 2 and result["pixel_selection"]["fpr"] == pytest.approx(0.01)
    # nothing to choose on
    result = run_thresholds(None, [], None, None)
    assert result["image"] is None and result["pixel"] is None
    assert "no labelled images" in result["image_selection"]["reason"]


def test_validate_thresholds_file_payloads():
    from spade.evaluation.thresholds import validate_thresholds

    assert validate_thresholds({"image": 1, "pixel": 2.5, "rule": "x"}, "t.json") == {"image": 1.0, "pixel": 2.5, "source": "file t.json"}
    assert validate_thresholds({"image": None, "pixel": 0.5})["image"] is None
    for bad in ([1, 2], {"image": "1"}, {"pixel": float("nan")}, {"image": True}, {}, {"image": None, "pixel": None}):
        with pytest.raises(ValueError):
            validate_thresholds(bad, "t.json")


def test_operating_points_trade_good_flagged_against_defective_missed():
    from spade.evaluation.thresholds import miss_rate_threshold, operating_points

    labels = np.array([False] * 10 + [True] * 10)
    scores = np.r_[np.arange(10.0), np.arange(5.0, 15.0)]  # good 0..9, defective 5..14: overlap 5..9
    points = {p["reaches"]: p for p in operating_points(labels, scores, used=7.5)}
    assert points["good flagged <= 0%"]["good_flagged"] == 0 and points["good flagged <= 0%"]["defective_missed"] == 5
    assert points["good flagged <= 20%"]["good_flagged"] == 2 and points["good flagged <= 20%"]["defective_missed"] == 3
    assert points["missed <= 0%"]["defective_missed"] == 0 and points["missed <= 0%"]["good_flagged"] == 5
    assert points["missed <= 30%"]["defective_missed"] == 3 and points["missed <= 30%"]["good_flagged"] == 2
    assert points["run threshold"]["threshold"] == 7.5 and points["run threshold"]["good_flagged"] == 2
    ordered = operating_points(labels, scores)
    assert [p["threshold"] for p in ordered] == sorted(p["threshold"] for p in ordered)
    assert all(p["good_flagged_rate"] <= 0.2 + 1e-9 for p in ordered if p["reaches"].startswith("good flagged <= 20"))
    threshold = miss_rate_threshold(labels, scores, 0.1)  # at most 1 of 10 defective missed, as few good flagged
    assert int((scores[labels] < threshold).sum()) == 1 and int((scores[~labels] >= threshold).sum()) == 4
