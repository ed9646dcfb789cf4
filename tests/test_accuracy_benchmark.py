"""benchmarks/accuracy.py's pieces: config specs with overrides, gallery sharing, confusion counts, the table."""
import sys
from pathlib import Path

import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import accuracy  # noqa: E402


def test_spec_overrides_and_gallery_sharing():
    label, config = accuracy.parse_spec(f"{ROOT}/configs/default.yaml:image_score=knn,k=7")
    assert label == "default image_score=knn,k=7" and config.image_score == "knn" and config.k == 7
    _, default = accuracy.parse_spec(f"{ROOT}/configs/default.yaml")
    # image_score and eval_region are decided at scoring time: one gallery serves both, except that the bank modes
    # need a gallery fitted with a patch bank
    assert accuracy.gallery_key(default) == accuracy.gallery_key(default.replace(image_score="bank_max", eval_region="crop"))
    knn = default.replace(image_score="knn")
    assert accuracy.gallery_key(knn) == accuracy.gallery_key(knn.replace(image_score="combined_top", eval_region="crop"))
    assert accuracy.gallery_key(default) != accuracy.gallery_key(knn)
    assert accuracy.gallery_key(default) != accuracy.gallery_key(default.replace(k=7))
    assert accuracy.gallery_key(default) != accuracy.gallery_key(default.replace(feature_aggregation=default.feature_aggregation + 2))


def test_confusion_counts_at_the_default_thresholds():
    rows = [("good", False), ("good", True), ("good", False), ("crack", True), ("crack", False), ("hole", True),
            ("good", None)]
    table = pa.Table.from_pylist([{"label": label, "is_anomalous": flag, "status": "ok" if flag is not None else "error",
                                   "image_score": 1.0} for label, flag in rows])
    assert accuracy.confusion(table) == {"good": 3, "good_flagged": 1, "defective": 3, "defective_missed": 1}
    line = accuracy.format_rows([{"set": "s", "config": "c", "image_rocauc": 0.5, "pixel_crop": 0.6, "pixel_full": 0.7,
                                  "pro_crop": 0.8, "pro_full": 0.9, "good_flagged": 1, "good": 3,
                                  "defective_missed": 1, "defective": 3, "fit_s": 1.25, "images_per_s": 2.0}])
    assert line.splitlines()[-1] == "| s | c | 0.500 | 0.600 / 0.700 | 0.800 / 0.900 | 1/3 | 1/3 | 1.2 | 2.00 |"
