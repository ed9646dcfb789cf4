"""Image-score modes, leave-one-out calibration (rule and per-mode thresholds), feature aggregation, K warning."""
import numpy as np
import pytest
import torch

from spade.config import SpadeConfig
from spade.features.backbone import aggregate_neighbourhood
from spade.index.gallery import Gallery, GalleryMismatch
from spade.index.knn import k_warning
from spade.scoring.batch import score_batch
from spade.scoring.calibration import (CalibrationMismatch, NormalScores, calibrate, check_calibrated_with, image_threshold,
                                      leave_one_out_scores)
from spade.scoring.lanes import halves, in_lanes, lanes_for
from spade.scoring.image_score import MissingCalibration, image_score, map_top, normal_statistics
from tests.test_scoring_fast import _gallery
from transforms.score import resolve_thresholds


def test_modes_from_the_two_terms():
    normals = normal_statistics([1.0, 2.0, 3.0], [10.0, 14.0, 18.0])
    assert normals["knn"] == {"mean": 2.0, "std": 1.0} and normals["map_max"] == {"mean": 14.0, "std": 4.0}
    assert image_score("knn", 2.5, 22.0, None) == 2.5
    assert image_score("map_max", 2.5, 22.0, None) == 22.0
    assert image_score("combined", 2.5, 22.0, normals) == pytest.approx(0.5 + 2.0)  # z(knn) + z(map_max)
    with pytest.raises(MissingCalibration, match="re-run `spade fit`|Re-run `spade fit`"):
        image_score("combined", 2.5, 22.0, {})
    with pytest.raises(ValueError, match="image_score must be one of"):
        image_score("mean", 2.5, 22.0, normals)


def test_score_batch_reports_both_terms_and_the_configured_score(tmp_path):
    gallery, features, config = _gallery(tmp_path)
    knn = score_batch(features, gallery, config)
    peak = score_batch(features, gallery, config.replace(image_score="map_max"))
    for a, b in zip(knn, peak):
        assert a.image_score == a.knn_score and b.image_score == b.map_max == pytest.approx(float(b.score_map.max()))
        assert a.map_max == b.map_max
    with pytest.raises(MissingCalibration):
        score_batch(features, gallery, config.replace(image_score="combined"))
    normals = normal_statistics([0.5, 1.5], [1.0, 3.0])
    combined = score_batch(features, gallery, config.replace(image_score="combined"), normals=normals)
    for a, c in zip(knn, combined):
        assert c.image_score == pytest.approx((a.knn_score - 1.0) / np.sqrt(0.5) + (a.map_max - 2.0) / np.sqrt(2.0))


def test_leave_one_out_calibration_takes_every_image_up_to_the_cap(tmp_path):
    """(Batched leave-one-out equals scoring each image alone: tests/test_scoring_fast.py.)"""
    gallery, _, config = _gallery(tmp_path)
    normal = leave_one_out_scores(gallery, config.replace(batch_size=3), count=100)
    n = gallery.index.ntotal
    assert list(normal.rows) == list(range(n)) and normal.maps.shape == (n, 16, 16)
    assert len(normal.knn) == len(normal.map_max) == n
    assert len(leave_one_out_scores(gallery, config, count=3).rows) == 3


def test_lanes_split_the_threads_and_the_rows():
    assert lanes_for(1) == (1, 1) and lanes_for(2) == (2, 1) and lanes_for(6) == (2, 3)
    assert halves(5, 2) == [slice(0, 2), slice(2, 5)] or halves(5, 2) == [slice(0, 3), slice(3, 5)]
    assert halves(1, 2) == [slice(0, 1)] and halves(4, 1) == [slice(0, 4)]
    assert sum(s.stop - s.start for s in halves(7, 2)) == 7
    import threading

    def inner(part):  # nested lanes run in the lane's own thread, one part after another
        return in_lanes(lambda _: threading.current_thread().name, [1, 2], 4), threading.current_thread().name

    for names, lane in in_lanes(inner, ["a", "b"], 4):
        assert lane.startswith("lane") and names == [lane, lane]
    assert torch.get_num_threads() == 4
    torch.set_num_threads(2)


def test_two_lanes_give_one_lanes_scores(tmp_path):
    """Calibration's batches side by side, and a batch's images searched in two lanes of one thread, give what one
    lane gives, in the same order; the thread count is restored."""
    gallery, features, config = _gallery(tmp_path)
    one = leave_one_out_scores(gallery, config.replace(batch_size=2, num_threads=1), count=100)
    two = leave_one_out_scores(gallery, config.replace(batch_size=2, num_threads=2), count=100)
    assert torch.get_num_threads() == 2
    assert list(one.rows) == list(two.rows) and len(one.rows) > 2 * 2
    for name in ("knn", "map_max", "map_top", "maps"):
        np.testing.assert_allclose(getattr(two, name), getattr(one, name), rtol=1e-6, atol=1e-6, err_msg=name)
    assert len(features.embedding) >= 2
    single = score_batch(features, gallery, config.replace(num_threads=1))
    lanes = score_batch(features, gallery, config.replace(num_threads=2))
    assert torch.get_num_threads() == 2
    for a, b in zip(single, lanes):
        assert list(a.neighbours) == list(b.neighbours)
        np.testing.assert_allclose(b.score_map, a.score_map, rtol=1e-6, atol=1e-6)


def test_calibrated_thresholds_follow_the_documented_rule():
    rng = np.random.default_rng(0)
    knn, peak = rng.normal(5, 1, 40), rng.normal(2, 0.5, 40)
    maps = rng.random((40, 8, 8)).astype(np.float32)
    config = SpadeConfig(image_score="combined", calibration_image_fpr=0.05, calibration_margin=0.5, calibration_fpr=0.01,
                         map_edge_band=0)   # the maps as given (the band's correction: tests/test_position_baseline.py)
    stats, thresholds = calibrate(NormalScores(np.arange(40), knn, peak, maps), config)
    assert stats["images"] == 40
    z95 = 1.6448536269514722  # standard normal 95 % quantile: a 5 % target false-positive rate
    assert thresholds["image_by_mode"]["knn"] == pytest.approx(knn.mean() + (z95 + 0.5) * knn.std(ddof=1))
    assert thresholds["image_by_mode"]["map_max"] == pytest.approx(peak.mean() + (z95 + 0.5) * peak.std(ddof=1))
    both = (knn - knn.mean()) / knn.std(ddof=1) + (peak - peak.mean()) / peak.std(ddof=1)
    assert thresholds["image"] == thresholds["image_by_mode"]["combined"] == pytest.approx(
        both.mean() + (z95 + 0.5) * both.std(ddof=1))
    assert thresholds["pixel"] == pytest.approx(np.quantile(maps, 0.99))
    assert image_threshold(knn, 0.0, 0.0) == pytest.approx(knn.max())  # the paper-era rule: the highest normal score
    assert image_threshold(knn, 0.0, 1.0) == pytest.approx(knn.max() + knn.std(ddof=1))
    assert calibrate(NormalScores(np.arange(1), knn[:1], peak[:1], maps[:1]), config) == ({}, {})


def test_thresholds_are_resolved_for_the_scoring_config_image_score():
    manifest = {"thresholds": {"image": 3.0, "image_score": "combined", "pixel": 0.7,
                               "image_by_mode": {"knn": 1.0, "map_max": 2.0, "combined": 3.0}}}
    for mode, value in (("knn", 1.0), ("map_max", 2.0), ("combined", 3.0)):
        used = resolve_thresholds(SpadeConfig(image_score=mode), manifest)
        assert used["image"] == value and used["pixel"] == 0.7 and used["image_score"] == mode
    old = {"thresholds": {"image": 1.5, "pixel": 0.7}}  # calibrated before modes: a knn threshold
    assert resolve_thresholds(SpadeConfig(image_score="knn"), old)["image"] == 1.5
    assert resolve_thresholds(SpadeConfig(image_score="map_max"), old)["image"] is None


def test_neighbourhood_aggregation_is_a_local_mean():
    maps = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 3, 5, 6) ** 1.5
    out = aggregate_neighbourhood(maps, 3)
    assert out.shape == maps.shape
    assert torch.allclose(out[1, 2, 2, 3], maps[1, 2, 1:4, 2:5].mean())
    assert torch.allclose(out[0, 1, 0, 0], maps[0, 1, 0:2, 0:2].mean())  # border: only positions inside the map
    assert aggregate_neighbourhood(maps, 1) is maps


def test_neighbourhood_aggregation_equals_torch_average_pooling():
    """The shifted-sum mean is avg_pool2d without the padding counted, on any map shape and memory layout."""
    generator = torch.Generator().manual_seed(0)
    for size in (3, 5):
        for shape in ((2, 24, 64, 64), (1, 5, 3, 2), (3, 7, 40, 17), (1, 2, 1, 9)):
            maps = torch.randn(shape, generator=generator)
            expected = torch.nn.functional.avg_pool2d(maps, size, stride=1, padding=size // 2, count_include_pad=False)
            for layout in (maps, maps.contiguous(memory_format=torch.channels_last)):
                out = aggregate_neighbourhood(layout, size)
                assert out.shape == expected.shape
                assert torch.allclose(out, expected, atol=1e-6, rtol=1e-5), (size, shape)


def test_new_feature_settings_are_in_the_signature_and_old_galleries_stay_usable(tmp_path):
    gallery, _, _ = _gallery(tmp_path)
    paper = SpadeConfig(framing="crop", feature_aggregation=1, crop=224)
    old_signature = {key: value for key, value in paper.feature_signature().items()
                     if key not in ("framing", "feature_aggregation")}
    old = Gallery(gallery.url, {"feature_signature": old_signature}, None, gallery.index, gallery.pyramid)
    old.check_compatible(paper)  # built before framing existed: the paper's centre crop
    with pytest.raises(GalleryMismatch, match="framing: gallery has 'crop', config has 'full'"):
        old.check_compatible(paper.replace(framing="full"))
    with pytest.raises(GalleryMismatch, match="feature_aggregation"):
        old.check_compatible(paper.replace(feature_aggregation=3))
    with pytest.raises(ValueError, match="feature_aggregation must be an odd size"):
        SpadeConfig(feature_aggregation=2)
    with pytest.raises(ValueError, match="framing must be one of"):
        SpadeConfig(framing="squeeze")


def test_k_warning_says_what_the_gallery_supports():
    assert k_warning(13, 54) is None
    message = k_warning(50, 54)
    assert "k=50" in message and "54 normal images" in message and "k <= 13" in message and "`k: 13`" in message
    assert k_warning(5, 8) is not None and "k <= 2" in k_warning(5, 8)


def test_map_top_is_a_defect_extent_not_one_hot_pixel():
    one_hot = np.zeros((100, 100), dtype=np.float32)
    one_hot[50, 50] = 10.0
    crack = np.zeros((100, 100), dtype=np.float32)
    crack[50, 20:80] = 3.0  # 60 positions: more than the top 1 % (100 positions) is not all crack
    assert map_top(one_hot) == pytest.approx(0.1) and map_top(crack) == pytest.approx(1.8)
    assert one_hot.max() > crack.max() and map_top(crack) > map_top(one_hot)
    normals = normal_statistics([1.0, 3.0], [10.0, 14.0], [2.0, 4.0])
    assert normals["map_top"] == {"mean": 3.0, "std": pytest.approx(np.sqrt(2.0))}
    assert image_score("map_top", 2.0, 22.0, None, map_top=5.0) == 5.0
    assert image_score("combined_top", 2.0, 22.0, normals, map_top=5.0) == pytest.approx(0.0 + 2.0 / np.sqrt(2.0))
    with pytest.raises(MissingCalibration, match="combined_top"):
        image_score("combined_top", 2.0, 22.0, normal_statistics([1.0, 3.0], [10.0, 14.0]), map_top=5.0)


def test_a_combined_image_score_needs_maps_made_as_calibrated_even_with_thresholds_given():
    """The combined modes standardise by the calibration's normal statistics, which --thresholds does not replace;
    a single-term mode with both thresholds given uses nothing calibration measured; a gallery that recorded no
    sigma (or k) is not judged on it; one that recorded no map_edge_band made its maps without the correction."""
    manifest = {"k": 10, "kappa": 1, "sigma": 4.0, "map_edge_band": 48, "calibration": {"images": 20}}
    given = {"image": 1.0, "pixel": 2.0, "source": "image: file t.json; pixel: file t.json"}
    config = SpadeConfig(image_score="combined_bank", sigma=2.0)
    with pytest.raises(CalibrationMismatch, match=r"calibrated normal statistics were .*sigma: gallery calibrated with 4.0"):
        check_calibrated_with(manifest, config, given, "g")
    check_calibrated_with(manifest, config.replace(image_score="knn"), given, "g")
    check_calibrated_with(manifest, config.replace(sigma=4.0), given, "g")
    check_calibrated_with({"k": 10, "kappa": 1, "map_edge_band": 48, "calibration": {"images": 20}}, config, given, "g")
    before = {"k": 10, "kappa": 1, "calibration": {"images": 20}}   # fitted before map_edge_band was recorded
    with pytest.raises(CalibrationMismatch, match="map_edge_band: gallery calibrated with 0, config has 48"):
        check_calibrated_with(before, config, given, "g")
    check_calibrated_with(before, config.replace(map_edge_band=0), given, "g")
