"""A frame's largest region above what normal frames reach (`spade.scoring.region_excess`) and
``image_score: region_excess`` / ``combined_region`` / ``residual_or_region``."""
from __future__ import annotations

import numpy as np
import pytest

from spade.scoring.position_baseline import baseline_map, leave_one_out_residual_maps, map_residual, position_baseline
from spade.scoring.region_excess import region_excess, region_record


def _normal_maps(rng: np.random.Generator, count: int = 12, size: tuple[int, int] = (96, 64)) -> np.ndarray:
    """Smooth noise around 1 (speckles a few pixels wide, as a smoothed score map has) with a band every normal frame
    has, 5 higher at row 30 (a slot edge of the product)."""
    from scipy import ndimage

    rows = np.arange(size[0], dtype=np.float32)[:, None]
    band = 5.0 * np.exp(-(((rows - 30.0) / 8.0) ** 2))
    noise = np.stack([ndimage.gaussian_filter(rng.normal(0.0, 1.0, size), 1.5) for _ in range(count)])
    return (1.0 + 0.6 * noise / noise.std() + band).astype(np.float32)


def test_a_long_faint_crack_scores_above_a_normal_frame_whose_peak_is_as_high():
    """A crack that rises a little above normal along 40 pixels: the residual's top (``map_residual``) barely moves,
    the region's excess does; a single hot speck of the same height is no region."""
    rng = np.random.default_rng(0)
    normal = _normal_maps(rng, count=21)
    record, values = region_record(normal[1:])
    baseline = baseline_map(position_baseline(normal[1:]), normal.shape[1:])
    good = normal[0]
    crack, speck = good.copy(), good.copy()
    top = float(np.sort((good - baseline).ravel())[-5])
    crack[70, 12:52] = baseline[70, 12:52] + top   # as high as the good frame's own few highest residual pixels
    speck[70, 30] = baseline[70, 30] + 3.0 * top
    residual = lambda m: m - baseline  # noqa: E731
    assert map_residual(crack, baseline) < map_residual(good, baseline) + 0.15
    level, border = record["level"], record["border"]
    assert region_excess(residual(crack), level, border) > region_excess(residual(good), level, border) + 1.0
    assert region_excess(residual(crack), level, border) > values.max()   # above every normal frame, leave-one-out
    assert region_excess(residual(speck), level, border) < region_excess(residual(crack), level, border) - 0.5


def test_the_border_is_left_out_and_a_frame_without_a_region_scores_zero():
    residual = np.zeros((64, 64), dtype=np.float32)
    residual[2, 10:50] = 5.0   # along the border: left out at 16 pixels, read without the border
    assert region_excess(residual, 1.0, border=16) == 0.0
    assert region_excess(residual, 1.0, border=0) == pytest.approx(np.log1p(40 * 4.0), rel=1e-6)
    residual[30, 20:30] = 2.0  # two regions inside: the larger excess counts, not their sum
    residual[40, 20:23] = 3.0
    assert region_excess(residual, 1.0, border=16) == pytest.approx(np.log1p(10 * 1.0), rel=1e-6)
    assert region_excess(np.zeros((20, 20)), 0.0, border=16) == 0.0   # too small for the border: all of it, none above


def test_the_level_is_the_quantile_of_the_leave_one_out_residuals_inside_the_border():
    rng = np.random.default_rng(2)
    maps = _normal_maps(rng, count=6, size=(72, 40))
    record, values = region_record(maps, quantile=0.99, border=8)
    inside = np.concatenate([r[8:-8, 8:-8].ravel() for r in leave_one_out_residual_maps(maps)])
    assert record == {"level": pytest.approx(float(np.quantile(inside, 0.99))), "quantile": 0.99, "border": 8}
    expected = [region_excess(r, record["level"], 8) for r in leave_one_out_residual_maps(maps)]
    np.testing.assert_allclose(values, expected, rtol=1e-6)
    assert region_record(maps[:1]) == ({}, pytest.approx(np.zeros(0)))


def test_combined_region_is_fitted_calibrated_and_scored(tmp_path):
    """fit records the level and the term's normal statistics and a threshold for both modes; a run's terms are
    the method map's less the baseline; a gallery without the level names the fix."""
    from tests.conftest import BEAM_ARGS, TINY, plumbing_config
    from pipelines.fit import run_fit
    from spade.features.framing import framing_for
    from spade.index.gallery import Gallery
    from spade.io.samples import SampleSpec, write_sample_dataset
    from spade.scoring.batch import score_batch
    from spade.scoring.calibration import _gallery_features
    from spade.scoring.image_score import MissingCalibration, require_normals

    data = write_sample_dataset(str(tmp_path / "data"), SampleSpec(size=64, train=6, test_good=1, test_per_defect=1))
    config = plumbing_config(**TINY, image_score="combined_region")
    run_fit(config, f"{data}/train/good", str(tmp_path / "gallery"), BEAM_ARGS)
    gallery = Gallery.open(str(tmp_path / "gallery"))
    calibration = gallery.manifest["calibration"]
    assert {"region_excess", "region_level", "map_residual", "bank_max", "knn"} <= set(calibration)
    assert calibration["region_level"]["border"] == 16 and calibration["region_excess"]["std"] >= 0
    by_mode = gallery.manifest["thresholds"]["image_by_mode"]
    assert gallery.manifest["thresholds"]["image"] == by_mode["combined_region"]
    assert np.isfinite(by_mode["combined_region"]) and np.isfinite(by_mode["region_excess"])
    rows = np.array([0, 1])
    features = _gallery_features(gallery, rows, config)
    results = score_batch(features, gallery, config, exclude_rows=rows)
    baseline = baseline_map(calibration["position_baseline"], framing_for(config).size)
    level = calibration["region_level"]
    for result in results:
        assert result.region_excess == pytest.approx(region_excess(result.score_map - baseline, level["level"],
                                                                   level["border"]), rel=1e-6)
        assert np.isfinite(result.image_score)
    alone = score_batch(features, gallery, config.replace(image_score="region_excess"), exclude_rows=rows)
    assert [r.image_score for r in alone] == [r.region_excess for r in results]
    either = score_batch(features, gallery, config.replace(image_score="residual_or_region"), exclude_rows=rows)
    summed = score_batch(features, gallery, config.replace(image_score="combined_residual"), exclude_rows=rows)
    scores = calibration["scores"]
    z = lambda value, mode: (value - scores[mode]["mean"]) / scores[mode]["std"]  # noqa: E731
    for e, s, r in zip(either, summed, alone):
        assert e.image_score == pytest.approx(max(z(s.image_score, "combined_residual"), z(r.image_score, "region_excess")))
    assert np.isfinite(by_mode["residual_or_region"])
    without = dict(calibration)
    del without["region_level"]
    for mode in ("combined_region", "region_excess"):   # a gallery fitted before the term: refused at launch
        with pytest.raises(MissingCalibration, match="Re-run `spade fit` with this image_score"):
            require_normals(mode, {k: v for k, v in without.items() if k != "region_excess"}, "g")
    for mode in ("combined_region", "region_excess"):
        with pytest.raises(MissingCalibration, match="Re-run `spade fit`, or use image_score: combined_residual"):
            score_batch(features, gallery, config.replace(image_score=mode), exclude_rows=rows, normals=without)


def test_residual_or_region_takes_the_stronger_evidence_and_is_calibrated_on_it():
    """``residual_or_region``: the larger of ``combined_residual`` and ``region_excess``, each standardised by its own
    leave-one-out scores on the normal images; its threshold is the documented rule on the normals' larger of the two.
    A crack that only the region term sees passes its threshold and not ``combined_residual``'s; a gallery calibrated
    before the modes' score record names the fix."""
    from spade.config import SpadeConfig
    from spade.scoring.calibration import (CalibrationMismatch, NormalScores, calibrate, check_calibrated_with,
                                           image_threshold)
    from spade.scoring.image_score import MissingCalibration, image_score, require_normals
    from spade.scoring.position_baseline import leave_one_out_residuals
    from transforms.score import resolve_thresholds

    rng = np.random.default_rng(3)
    maps = _normal_maps(rng, count=30)
    knn, bank = rng.normal(5.0, 1.0, 30), rng.normal(2.0, 0.3, 30)
    normal = NormalScores(np.arange(30), knn, maps.max(axis=(1, 2)), maps, map_top=maps.max(axis=(1, 2)), bank_max=bank)
    stats, thresholds = calibrate(normal, SpadeConfig(image_score="residual_or_region", map_edge_band=0))
    assert {"combined_residual", "region_excess", "residual_or_region"} <= set(stats["scores"])
    z = lambda v, s: (np.asarray(v) - s["mean"]) / s["std"]  # noqa: E731
    residuals, (_, regions) = leave_one_out_residuals(maps), region_record(maps)
    summed = z(residuals, stats["map_residual"]) + z(bank, stats["bank_max"]) + z(knn, stats["knn"])
    either = np.maximum(z(summed, stats["scores"]["combined_residual"]), z(regions, stats["scores"]["region_excess"]))
    assert thresholds["image"] == thresholds["image_by_mode"]["residual_or_region"] == pytest.approx(
        image_threshold(either, 0.05, 0.0))
    assert stats["scores"]["residual_or_region"]["mean"] == pytest.approx(either.mean())

    def scores(region: float) -> dict[str, float]:   # every other term at its normal mean
        terms = {name: stats[name]["mean"] for name in ("map_residual", "bank_max")}
        return {mode: image_score(mode, stats["knn"]["mean"], 0.0, stats, region_excess=region, map_top=0.0, **terms)
                for mode in ("combined_residual", "residual_or_region")}

    crack = stats["region_excess"]["mean"] + 5.0 * stats["region_excess"]["std"]
    flagged = scores(crack)
    assert flagged["residual_or_region"] == pytest.approx(float(z(crack, stats["scores"]["region_excess"])))
    assert flagged["residual_or_region"] > thresholds["image_by_mode"]["residual_or_region"]
    assert flagged["combined_residual"] < thresholds["image_by_mode"]["combined_residual"]
    quiet = scores(stats["region_excess"]["mean"])   # no region: the combined score decides, standardised again
    assert quiet["residual_or_region"] == pytest.approx(max(
        float(z(quiet["combined_residual"], stats["scores"]["combined_residual"])), 0.0), abs=1e-9)
    older = {k: v for k, v in stats.items() if k != "scores"}
    require_normals("combined_residual", older, "g")
    with pytest.raises(MissingCalibration, match="combined_residual scores.*Re-run `spade fit`"):
        require_normals("residual_or_region", older, "g")
    config = SpadeConfig(image_score="residual_or_region", map_edge_band=0)
    before = {"calibration": stats, "thresholds": thresholds | {"image_by_mode": {
        mode: value for mode, value in thresholds["image_by_mode"].items() if mode != "residual_or_region"}}}
    with pytest.raises(CalibrationMismatch, match="calibrated before image_score residual_or_region.*Re-run `spade fit`"):
        check_calibrated_with(before, config, resolve_thresholds(config, before), "g")
    check_calibrated_with(before, config, resolve_thresholds(config, before, {"image": 1.0, "pixel": 1.0}), "g")
    fitted = {"calibration": stats, "thresholds": thresholds}
    check_calibrated_with(fitted, config, resolve_thresholds(config, fitted), "g")
