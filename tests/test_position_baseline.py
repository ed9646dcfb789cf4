"""The normal frames' mean map by place and ``image_score: combined_residual`` (`spade.scoring.position_baseline`)."""
from __future__ import annotations

import numpy as np
import pytest

from spade.scoring.position_baseline import (baseline_grids, baseline_map, leave_one_out_residuals, map_residual,
                                             position_baseline, upsampled)


def _normal_maps(rng: np.random.Generator, count: int = 12, size: tuple[int, int] = (64, 48)) -> np.ndarray:
    """Noise around 1 with a smooth band every normal frame has, 5 higher at row 16 (a slot edge of the product)."""
    rows = np.arange(size[0], dtype=np.float32)[:, None]
    band = 5.0 * np.exp(-(((rows - 16.0) / 10.0) ** 2))
    return (rng.normal(1.0, 0.05, size=(count, *size)) + band).astype(np.float32)


def test_a_defect_below_the_normal_frames_own_peaks_rises_above_their_mean_at_its_place():
    rng = np.random.default_rng(0)
    normal = _normal_maps(rng, count=13)
    baseline = baseline_map(position_baseline(normal[1:]), normal.shape[1:])
    good, defect = normal[0], normal[0].copy()
    yy, xx = np.mgrid[:64, :48]
    defect += 3.0 * np.exp(-(((yy - 52) ** 2 + (xx - 24) ** 2) / 8.0))  # a blob of 4 where normal frames score 1
    # the map's top cannot tell them apart (both at the band's ~6); the residual above the baseline can
    assert np.sort(defect.ravel())[-3:].mean() == pytest.approx(np.sort(good.ravel())[-3:].mean(), abs=0.01)
    assert map_residual(defect, baseline) > map_residual(good, baseline) + 1.0


def test_leave_one_out_residuals_compare_each_map_with_the_others_mean():
    rng = np.random.default_rng(1)
    maps = _normal_maps(rng, count=5, size=(40, 24))   # 40 is not a multiple of the cell: uneven pooling windows
    residuals = leave_one_out_residuals(maps)
    for i in range(len(maps)):
        others = np.delete(maps, i, axis=0)
        expected = map_residual(maps[i], upsampled(baseline_grids(others).mean(0), maps.shape[1:]))
        assert residuals[i] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert leave_one_out_residuals(maps[:1]).size == 0


def test_the_record_is_small_and_refuses_another_frame_size():
    rng = np.random.default_rng(2)
    maps = _normal_maps(rng, count=3, size=(256, 640))
    record = position_baseline(maps)
    assert record["shape"] == [32, 80] and len(record["values"]) == 32 * 80 and record["frame"] == [256, 640]
    assert baseline_map(record, (256, 640)).shape == (256, 640)
    with pytest.raises(ValueError, match="re-run `spade fit`"):
        baseline_map(record, (256, 256))


def test_combined_residual_is_fitted_calibrated_and_scored(tmp_path):
    """fit records the baseline and the residual's normal statistics; the run's scores are finite and the gallery's
    threshold for the mode is the one it applies; a gallery without the baseline names the fix."""
    from tests.conftest import BEAM_ARGS, TINY, plumbing_config
    from pipelines.fit import run_fit
    from spade.index.gallery import Gallery
    from spade.io.samples import SampleSpec, write_sample_dataset
    from spade.scoring.batch import score_batch
    from spade.scoring.calibration import _gallery_features
    from spade.scoring.image_score import MissingCalibration

    data = write_sample_dataset(str(tmp_path / "data"), SampleSpec(size=64, train=6, test_good=1, test_per_defect=1))
    config = plumbing_config(**TINY, image_score="combined_residual")
    run_fit(config, f"{data}/train/good", str(tmp_path / "gallery"), BEAM_ARGS)
    gallery = Gallery.open(str(tmp_path / "gallery"))
    calibration = gallery.manifest["calibration"]
    assert {"map_residual", "bank_max", "knn", "position_baseline"} <= set(calibration)
    assert calibration["map_residual"]["std"] > 0
    by_mode = gallery.manifest["thresholds"]["image_by_mode"]
    assert gallery.manifest["thresholds"]["image"] == by_mode["combined_residual"] and np.isfinite(by_mode["combined_residual"])
    rows = np.array([0, 1])
    results = score_batch(_gallery_features(gallery, rows, config), gallery, config, exclude_rows=rows)
    assert all(np.isfinite(r.map_residual) and np.isfinite(r.image_score) for r in results)
    without = dict(calibration)
    del without["map_residual"], without["position_baseline"]
    with pytest.raises(MissingCalibration, match="Re-run `spade fit` with this image_score"):
        score_batch(_gallery_features(gallery, rows, config), gallery, config, exclude_rows=rows, normals=without)
