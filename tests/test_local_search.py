"""The local search beside the coreset bank: the K nearest frames' features near each position."""
import numpy as np
import pytest

from spade.config import SpadeConfig
from spade.scoring.batch import layer_distance_maps, score_batch
from spade.scoring.calibration import CalibrationMismatch, check_calibrated_with
from spade.scoring.local_search import local_window_distances
from tests.test_scoring_fast import _gallery


def block_window_reference(query, neighbours, radius, block=8):
    """Each position against every neighbour feature in its block grown by ``radius``, in float64, one by one."""
    c, h, w = query.shape
    frames = neighbours.reshape(len(neighbours), h, w, c).astype(np.float64)
    out = np.empty((h, w))
    for y in range(h):
        for x in range(w):
            y0, x0 = y // block * block, x // block * block
            window = frames[:, max(0, y0 - radius):y0 + block + radius, max(0, x0 - radius):x0 + block + radius]
            out[y, x] = np.sqrt(((window.reshape(-1, c) - query[:, y, x]) ** 2).sum(1).min())
    return out


@pytest.mark.parametrize("shape,radius,block", [((16, 16), 1, 8), ((21, 13), 2, 8), ((5, 30), 0, 8), ((70, 9), 1, 8),
                                                ((21, 13), 2, 4), ((70, 9), 2, 4), ((33, 66), 2, 4), ((9, 9), 1, 3)])
def test_local_window_equals_a_float64_search_of_each_block_window(shape, radius, block):
    """Partial blocks at the edges, radius 0, and maps of several steps of block rows (70x9, 33x66)."""
    rng = np.random.default_rng(1)
    h, w = shape
    query = rng.normal(size=(6, h, w)).astype(np.float32)
    neighbours = rng.normal(size=(3, h * w, 6)).astype(np.float32)
    got = local_window_distances(query, neighbours, radius, block)
    assert got.shape == (h, w)
    np.testing.assert_allclose(got, block_window_reference(query, neighbours, radius, block), rtol=0, atol=1e-4)


def test_a_feature_shifted_within_the_radius_is_found_and_one_beyond_it_is_not():
    """A neighbour holding the query's features moved by one position: radius 1 matches every position exactly."""
    rng = np.random.default_rng(2)
    query = rng.normal(size=(4, 16, 16)).astype(np.float32)
    shifted = np.roll(query, 1, axis=2)  # the neighbour's (y, x + 1) holds the query's (y, x)
    rows = shifted.reshape(4, -1).T[None].copy()
    inside = local_window_distances(query, rows, radius=1)
    assert inside[:, :15].max() < 1e-3
    wide = rng.normal(size=(4, 16, 40)).astype(np.float32)
    far = np.roll(wide, 20, axis=2).reshape(4, -1).T[None].copy()  # 20 positions away: outside every window
    assert local_window_distances(wide, far, radius=1).min() > 0.1


def test_neighbour_rows_of_another_frame_size_are_refused():
    with pytest.raises(ValueError, match="frame or layer differs"):
        local_window_distances(np.zeros((4, 8, 8), np.float32), np.zeros((2, 60, 4), np.float32), 1)


def test_bank_layers_take_the_smaller_of_the_bank_and_the_local_window(tmp_path):
    """``approximate_local_radius``: layer 1 (from the bank) becomes min(bank, local window of the K neighbours);
    the exactly searched layer is unchanged."""
    gallery, features, config = _gallery(tmp_path, positions=(64, 16))
    gallery.manifest["gallery_hash"] = "local-window"  # its own bank cache entry
    config = config.replace(approximate_layers=["layer1"], coreset_ratio=0.05, approximate_local_radius=0)
    neighbours = np.stack([r.neighbours for r in score_batch(features, gallery, config)])
    bank = layer_distance_maps(features.pyramid, gallery, neighbours, config)
    both = layer_distance_maps(features.pyramid, gallery, neighbours, config.replace(approximate_local_radius=1))
    assert not bank.split and both.split
    local = both.pixel
    np.testing.assert_array_equal(local["layer2"], bank.pixel["layer2"])
    for i in range(len(neighbours)):
        rows = np.asarray(gallery.pyramid["layer1"])[neighbours[i]]
        window = local_window_distances(features.pyramid["layer1"][i], rows, 1)
        np.testing.assert_allclose(local["layer1"][i], np.minimum(bank.pixel["layer1"][i], window), rtol=0, atol=1e-6)
    assert np.all(local["layer1"] <= bank.pixel["layer1"]) and np.any(local["layer1"] < bank.pixel["layer1"] - 1e-3)
    for layer in ("layer1", "layer2"):  # the image terms' maps: the bank's distances alone
        np.testing.assert_array_equal(both.terms[layer], bank.pixel[layer])


def test_image_terms_read_the_bank_map_while_the_score_map_takes_the_local_window(tmp_path):
    """With a local radius every image term and image score is the bank-alone run's; the score map is the sharper
    one (never higher, lower somewhere), as calibration measures them (its baseline on the terms' maps)."""
    gallery, features, config = _gallery(tmp_path, positions=(64, 16))
    gallery.manifest["gallery_hash"] = "local-terms"
    config = config.replace(approximate_layers=["layer1"], coreset_ratio=0.05, image_score="map_max", map_edge_band=0,
                            approximate_local_radius=0)
    alone = score_batch(features, gallery, config)
    local = score_batch(features, gallery, config.replace(approximate_local_radius=1))
    for a, b in zip(alone, local):
        assert (b.image_score, b.map_max, b.map_top, b.knn_score) == (a.image_score, a.map_max, a.map_top, a.knn_score)
        np.testing.assert_array_equal(b.term_map, a.score_map)
        assert np.all(b.score_map <= a.score_map + 1e-6)
    assert any(np.any(b.score_map < a.score_map - 1e-3) for a, b in zip(alone, local))


def test_local_radius_is_checked_and_recorded_as_a_map_setting():
    with pytest.raises(ValueError, match="approximate_local_radius must be >= 0"):
        SpadeConfig(approximate_local_radius=-1)
    with pytest.raises(ValueError, match="approximate_local_radius needs kappa: 1"):
        SpadeConfig(approximate_local_radius=1, kappa=3)
    SpadeConfig(approximate_local_radius=0, kappa=3)
    manifest = {"k": 10, "kappa": 1, "sigma": 2.0, "approximate_local_radius": 0, "map_edge_band": 48,
                "calibration": {"images": 20}}
    given = {"source": "image: calibration; pixel: calibration"}
    config = SpadeConfig(k=10, sigma=2.0, approximate_local_radius=1)
    with pytest.raises(CalibrationMismatch, match="approximate_local_radius: gallery calibrated with 0"):
        check_calibrated_with(manifest, config, given, "g")
    check_calibrated_with(manifest, config.replace(approximate_local_radius=0), given, "g")


def test_a_local_radius_gallery_calibrated_when_the_terms_read_the_local_maps_is_refused():
    """Calibrated (no ``pixel_baseline``) when the image terms read the local search's maps: its image threshold and
    statistics belong to other maps; its pixel threshold, and a gallery calibrated since, still serve."""
    before = {"k": 10, "kappa": 1, "sigma": 2.0, "approximate_local_radius": 1, "map_edge_band": 48,
              "calibration": {"images": 20, "position_baseline": {}}}
    config = SpadeConfig(k=10, sigma=2.0, approximate_local_radius=1, approximate_local_block=8,  # such a gallery's
                         image_score="combined_residual")
    with pytest.raises(CalibrationMismatch, match="approximate_local_radius: 1 when the image terms read"):
        check_calibrated_with(before, config, {"source": "image: calibration; pixel: calibration"}, "g")
    check_calibrated_with(before, config.replace(image_score="knn"), {"source": "image: given; pixel: calibration"}, "g")
    since = before | {"calibration": before["calibration"] | {"pixel_baseline": {}}}
    check_calibrated_with(since, config, {"source": "image: calibration; pixel: calibration"}, "g")


def test_the_local_search_block_is_a_map_setting_and_older_galleries_read_as_eight():
    """Galleries calibrated with a local radius before the block was recorded made their maps with 8 x 8 blocks: a
    config of other blocks (the default's 4) is refused, naming the block to score with; one fitted since records its
    own; a gallery without the local search is refused for its radius alone (never told to use block 0)."""
    with pytest.raises(ValueError, match="approximate_local_block must be >= 1"):
        SpadeConfig(approximate_local_block=0)
    given = {"source": "image: calibration; pixel: calibration"}
    older = {"k": 10, "kappa": 1, "sigma": 2.0, "approximate_local_radius": 1, "map_edge_band": 48,
             "calibration": {"images": 20, "pixel_baseline": {}}}
    config = SpadeConfig(k=10, sigma=2.0, approximate_local_radius=1)
    assert config.approximate_local_block == 4
    with pytest.raises(CalibrationMismatch, match="approximate_local_block: gallery calibrated with 8, config has 4"):
        check_calibrated_with(older, config, given, "g")
    check_calibrated_with(older, config.replace(approximate_local_block=8), given, "g")
    check_calibrated_with(older | {"approximate_local_block": 4}, config, given, "g")
    without = older | {"approximate_local_radius": 0}
    with pytest.raises(CalibrationMismatch) as refused:
        check_calibrated_with(without, SpadeConfig(k=10, sigma=2.0), given, "g")
    assert "`approximate_local_radius: 0`" in str(refused.value) and "approximate_local_block" not in str(refused.value)
    check_calibrated_with(without, SpadeConfig(k=10, sigma=2.0, approximate_local_radius=0), given, "g")


def test_the_default_searches_layer_one_locally_and_the_approximate_config_keeps_its_banks_alone():
    """The default's layer 1 takes the local window beside its bank (README "A local search beside the layer-1 bank");
    configs/approximate.yaml, whose point is speed, must say 0 itself: otherwise it inherits the default's radius for
    every one of its bank-searched layers."""
    from pathlib import Path

    from spade.config import load_config

    default = load_config(None)
    assert (default.local_radius, default.local_block) == (2, 4) and default.coreset_layers == ("layer1",)
    approximate = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "approximate.yaml"))
    assert approximate.coreset_layers == ("layer1", "layer2", "layer3") and approximate.local_radius == 0
    assert approximate.local_block == 0
