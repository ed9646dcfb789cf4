"""benchmarks/image_decision.py's re-thresholding table (`--threshold-rules`), on arrays."""
import numpy as np

from benchmarks import image_decision


def test_each_threshold_rule_counts_flagged_and_missed_against_its_own_threshold():
    rng = np.random.default_rng(0)
    normals = rng.normal(0.0, 1.0, 200)
    scores = np.concatenate([rng.normal(0.0, 1.0, 40), rng.normal(2.5, 1.0, 60)])
    labels = np.concatenate([np.zeros(40, bool), np.ones(60, bool)])
    rows = image_decision.threshold_rows("set", "rule", scores, normals, labels)
    assert len(rows) == len(image_decision.THRESHOLD_RULES)
    for row, threshold_of in zip(rows, image_decision.THRESHOLD_RULES.values()):
        threshold = threshold_of(normals)
        flagged = int((scores[~labels] > threshold).sum())
        missed = int((scores[labels] <= threshold).sum())
        assert row.endswith(f"| {flagged}/40 | {missed}/60 |"), row
    # the 0.90 quantile flags about a tenth of the normal scores themselves, the 0.95 one about a twentieth
    assert (normals > image_decision.THRESHOLD_RULES["0.90 quantile"](normals)).sum() == 20
    assert (normals > image_decision.THRESHOLD_RULES["0.95 quantile"](normals)).sum() == 10
