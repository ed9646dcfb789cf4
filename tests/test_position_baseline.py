"""The normal frames' mean map by place and ``image_score: combined_residual`` (`spade.scoring.position_baseline`)."""
from __future__ import annotations

import numpy as np
import pytest

from spade.config import SpadeConfig
from spade.features.framing import framing_for
from spade.scoring.position_baseline import (baseline_grids, baseline_map, edge_excess, leave_one_out_edge_corrected,
                                             leave_one_out_residuals, map_residual, position_baseline, upsampled)


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


def test_interior_distance_counts_from_the_edge_of_the_tile_that_holds_a_pixel_furthest_inside():
    framing = framing_for(SpadeConfig(frame_size=(256, 448)))   # two 256-pixel tiles across, at 0 and 192
    assert [(t.top, t.left) for t in framing.tiles] == [(0, 0), (0, 192)]
    distance = framing.interior_distance()
    assert distance.shape == (256, 448)
    assert distance[128, 0] == 0 and distance[128, 447] == 0 and distance[0, 300] == 0   # the frame's border
    assert distance[128, 100] == 100 and distance[128, 320] == 127                       # inside one tile
    assert distance[128, 224] == 32 and distance[128, 255] == 63                         # the seam: the other tile's inside
    assert distance[128, 192] == 63 and distance[128, 191] == 64                         # the first tile holds these


def test_edge_excess_removes_what_normal_frames_show_near_an_edge_and_keeps_the_product_inside():
    rows, cols = np.mgrid[:96, :64].astype(np.float32)
    interior = np.minimum(np.minimum(rows, 95 - rows), np.minimum(cols, 63 - cols))
    baseline = np.full((96, 64), 10.0, dtype=np.float32)
    baseline[interior < 4] += 6.0                                   # the padding's excess at the border
    baseline[40:56, 20:44] += 3.0                                   # a part of the product, high in every frame
    baseline[10:14, 20:30] -= 2.0                                   # a quiet place near the edge: never raised
    excess = edge_excess(baseline, interior, band=16)
    assert np.all(excess >= 0)
    assert np.allclose(excess[interior < 4], 6.0)                  # above the median further inside (10)
    assert np.all(excess[interior >= 16] == 0)                      # the product's own structure stays
    assert np.all(excess[10:14, 20:30] == 0)
    assert np.all(edge_excess(baseline, interior, band=0) == 0)


def test_leave_one_out_edge_corrected_maps_take_each_maps_excess_from_the_others():
    rng = np.random.default_rng(3)
    maps = _normal_maps(rng, count=5, size=(40, 24))
    maps[:, :3, :] += rng.uniform(2.0, 6.0, size=(5, 1, 1)).astype(np.float32)   # an edge excess that differs per frame
    interior = np.minimum.outer(np.minimum(np.arange(40), 39 - np.arange(40)), np.minimum(np.arange(24), 23 - np.arange(24)))
    corrected = leave_one_out_edge_corrected(maps, interior, band=8)
    for i in range(len(maps)):
        others = upsampled(baseline_grids(np.delete(maps, i, axis=0)).mean(0), maps.shape[1:])
        assert np.allclose(corrected[i], maps[i] - edge_excess(others, interior, 8), atol=1e-5)
    assert np.array_equal(leave_one_out_edge_corrected(maps, interior, band=0), maps)


def test_fit_calibrates_and_score_lowers_the_maps_near_the_edges_by_the_normal_excess(tmp_path):
    """The run's maps are the method's less the gallery's edge excess, its image terms the method's; the calibrated
    pixel threshold is measured on maps corrected alike; another band, or a gallery without a baseline, is refused."""
    from tests.conftest import BEAM_ARGS, TINY, plumbing_config
    from pipelines.fit import run_fit
    from spade.index.gallery import Gallery
    from spade.io.samples import SampleSpec, write_sample_dataset
    from spade.scoring.batch import score_batch
    from spade.scoring.calibration import CalibrationMismatch, _gallery_features, check_calibrated_with, leave_one_out_scores
    from spade.scoring.image_score import MissingCalibration

    data = write_sample_dataset(str(tmp_path / "data"), SampleSpec(size=64, train=6, test_good=1, test_per_defect=1))
    config = plumbing_config(**TINY, map_edge_band=40)
    run_fit(config, f"{data}/train/good", str(tmp_path / "gallery"), BEAM_ARGS)
    gallery = Gallery.open(str(tmp_path / "gallery"))
    assert gallery.manifest["map_edge_band"] == 40
    calibration = gallery.manifest["calibration"]
    framing = framing_for(config)
    interior = framing.interior_distance()
    excess = edge_excess(baseline_map(calibration["position_baseline"], framing.size), interior, 40)
    assert interior.max() < 40 and excess.max() > 0   # a 64-pixel frame lies within the band: its excess above the median
    rows = np.array([0, 1])
    features = _gallery_features(gallery, rows, config)
    method = score_batch(features, gallery, config.replace(map_edge_band=0), exclude_rows=rows)
    corrected = score_batch(features, gallery, config, exclude_rows=rows)
    for before, after in zip(method, corrected):
        assert np.allclose(after.score_map, before.score_map - excess, atol=1e-6)
        assert (after.image_score, after.map_max, after.map_top) == (before.image_score, before.map_max, before.map_top)
    normal = leave_one_out_scores(gallery, config, config.calibration_images)
    expected = np.quantile(leave_one_out_edge_corrected(normal.maps, interior, 40), 1.0 - config.calibration_fpr)
    assert gallery.manifest["thresholds"]["pixel"] == pytest.approx(float(expected), rel=1e-6)
    assert gallery.manifest["thresholds"]["pixel"] != pytest.approx(float(np.quantile(normal.maps, 1.0 - config.calibration_fpr)))
    with pytest.raises(CalibrationMismatch, match="map_edge_band: gallery calibrated with 40, config has 0"):
        check_calibrated_with(gallery.manifest, config.replace(map_edge_band=0), {"source": "pixel: calibration"}, gallery.url)
    without = dict(calibration)
    del without["position_baseline"]
    with pytest.raises(MissingCalibration, match="map_edge_band: 0"):
        score_batch(features, gallery, config, exclude_rows=rows, normals=without)


def test_with_a_local_search_calibration_reads_the_terms_on_the_bank_maps_and_corrects_the_score_maps_by_their_own(
        tmp_path):
    """``approximate_local_radius``: fit records the score maps' own baseline (``pixel_baseline``) beside the terms'
    (``position_baseline``, the bank's maps); a run's edge correction is measured on the former, its image terms on
    maps the same as a run without the local search; the pixel threshold is measured on the score maps."""
    from tests.conftest import BEAM_ARGS, TINY, plumbing_config
    from pipelines.fit import run_fit
    from spade.index.gallery import Gallery
    from spade.io.samples import SampleSpec, write_sample_dataset
    from spade.scoring.batch import score_batch
    from spade.scoring.calibration import _gallery_features, leave_one_out_scores

    data = write_sample_dataset(str(tmp_path / "data"), SampleSpec(size=64, train=6, test_good=1, test_per_defect=1))
    config = plumbing_config(**TINY, map_edge_band=40, approximate_layers=("layer1",), approximate_local_radius=1,
                             approximate_local_block=2, coreset_ratio=0.2,
                             image_score="combined_residual")  # reads the terms' baseline too
    run_fit(config, f"{data}/train/good", str(tmp_path / "gallery"), BEAM_ARGS)
    gallery = Gallery.open(str(tmp_path / "gallery"))
    calibration = gallery.manifest["calibration"]
    assert (gallery.manifest["approximate_local_radius"], gallery.manifest["approximate_local_block"]) == (1, 2)
    normal = leave_one_out_scores(gallery, config, config.calibration_images)
    assert normal.pixel_maps is not None and np.all(normal.pixel_maps <= normal.maps + 1e-6)
    assert calibration["pixel_baseline"] == position_baseline(normal.pixel_maps)
    assert calibration["position_baseline"] == position_baseline(normal.maps) != calibration["pixel_baseline"]
    framing = framing_for(config)
    interior = framing.interior_distance()
    excess = edge_excess(baseline_map(calibration["pixel_baseline"], framing.size), interior, 40)
    rows = np.array([0, 1])
    features = _gallery_features(gallery, rows, config)
    alone = score_batch(features, gallery, config.replace(map_edge_band=0, approximate_local_radius=0), exclude_rows=rows)
    local = score_batch(features, gallery, config, exclude_rows=rows)
    method = score_batch(features, gallery, config.replace(map_edge_band=0), exclude_rows=rows)
    for a, b, m in zip(alone, local, method):
        assert (b.image_score, b.map_max, b.knn_score) == (a.image_score, a.map_max, a.knn_score)
        assert np.allclose(b.score_map, m.score_map - excess, atol=1e-6)
    expected = np.quantile(leave_one_out_edge_corrected(normal.pixel_maps, interior, 40), 1.0 - config.calibration_fpr)
    assert gallery.manifest["thresholds"]["pixel"] == pytest.approx(float(expected), rel=1e-6)
