"""The patch memory bank behind ``image_score: bank_max`` / ``combined_bank`` (`spade.index.patch_bank`)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spade.config import SpadeConfig
from spade.features.framing import TiledFraming
from spade.index.coreset import SCREEN_MIN, MemoryBank
from spade.index.patch_bank import bank_maxima, build_patch_bank, patch_bank_for, patch_bank_settings, patch_features
from spade.scoring.image_score import image_score, normal_statistics


def _pyramid(rng: np.random.Generator, frames: int, tiles: int = 1) -> dict[str, np.ndarray]:
    """layer2 (4 channels, 8x8 per tile) and layer3 (6 channels, 4x4 per tile), tiles stacked along the height."""
    return {"layer2": rng.normal(size=(frames, 4, 8 * tiles, 8)).astype(np.float32),
            "layer3": rng.normal(size=(frames, 6, 4 * tiles, 4)).astype(np.float32)}


def _gallery(pyramid: dict[str, np.ndarray]) -> SimpleNamespace:
    rows = {layer: np.ascontiguousarray(m.reshape(m.shape[0], m.shape[1], -1).transpose(0, 2, 1)) for layer, m in pyramid.items()}
    frames = len(next(iter(rows.values())))
    return SimpleNamespace(index=SimpleNamespace(ntotal=frames), pyramid=rows, hash=None)


def test_patch_features_join_layers_at_the_first_grid_tile_by_tile():
    pyramid = {"layer2": np.zeros((1, 2, 16, 8), np.float32), "layer3": np.zeros((1, 3, 8, 4), np.float32)}
    pyramid["layer3"][:, :, :4] = 1.0   # tile 0 of layer 3 all ones, tile 1 all zeros
    features = patch_features(pyramid, ("layer2", "layer3"), tiles=2)
    assert features.shape == (1, 2 * 8 * 8, 5)
    # no tile borrows from the other: bilinear upsampling across the stacked maps would blur the boundary rows
    assert np.all(features[0, :64, 2:] == 1.0) and np.all(features[0, 64:, 2:] == 0.0)


def test_patch_features_are_each_tiles_layers_upsampled_and_joined_position_by_position():
    rng = np.random.default_rng(5)
    pyramid = _pyramid(rng, 3, tiles=3)
    features = patch_features(pyramid, ("layer2", "layer3"), tiles=3)
    expected = []
    for frame in range(3):
        for tile in range(3):
            layer2 = torch.from_numpy(pyramid["layer2"][frame:frame + 1, :, 8 * tile:8 * tile + 8].copy())
            layer3 = torch.from_numpy(pyramid["layer3"][frame:frame + 1, :, 4 * tile:4 * tile + 4].copy())
            layer3 = F.interpolate(layer3, size=(8, 8), mode="bilinear", align_corners=False)
            expected.append(torch.cat([layer2, layer3], 1)[0].permute(1, 2, 0).reshape(64, 10).numpy())
    assert np.allclose(features.reshape(9, 64, 10), np.stack(expected), atol=1e-6)


def test_bank_max_is_zero_for_a_gallery_frame_and_finds_one_odd_patch():
    rng = np.random.default_rng(0)
    pyramid = _pyramid(rng, 6)
    gallery = _gallery(pyramid)
    framing = TiledFraming((64, 64), 64, 0)
    bank = build_patch_bank(gallery.pyramid, framing, patch_bank_settings(SpadeConfig(bank_ratio=1.0)))
    assert len(bank.vectors) == 6 * 64
    same = {layer: m[:2] for layer, m in pyramid.items()}
    assert np.allclose(bank_maxima(same, bank, ("layer2", "layer3"), 1), 0.0, atol=1e-3)
    odd = {layer: m[:1].copy() for layer, m in pyramid.items()}
    odd["layer2"][0, :, 3, 5] += 10.0
    assert bank_maxima(odd, bank, ("layer2", "layer3"), 1)[0] > 9.0
    # leave-one-out: a gallery frame's own patches are not its reference
    left_out = bank_maxima(same, bank, ("layer2", "layer3"), 1, exclude_rows=np.array([0, 1]))
    assert np.all(left_out > 1.0)


def test_coreset_bank_keeps_the_ratio_and_each_vector_knows_its_frame():
    rng = np.random.default_rng(1)
    pyramid = _pyramid(rng, 10, tiles=2)
    gallery = _gallery(pyramid)
    framing = TiledFraming((64, 112), 64, 16)
    assert len(framing.tiles) == 2
    bank = build_patch_bank(gallery.pyramid, framing, patch_bank_settings(SpadeConfig(bank_ratio=0.1)))
    assert len(bank.vectors) == round(0.1 * 10 * 128) and set(bank.rows) <= set(range(10))
    features = patch_features(pyramid, ("layer2", "layer3"), 2).reshape(-1, 10)
    owners = np.repeat(np.arange(10), 128)
    for vector, row in zip(bank.vectors[:20], bank.rows[:20]):
        assert np.any(np.all(features[owners == row] == vector, axis=1))
    again = build_patch_bank(gallery.pyramid, framing, patch_bank_settings(SpadeConfig(bank_ratio=0.1, coreset_max_candidates=600)))
    assert len(again.vectors) == 128   # the ratio of all positions, drawn from a bounded candidate set
    capped = build_patch_bank(gallery.pyramid, framing, patch_bank_settings(SpadeConfig(bank_ratio=0.1, bank_max_vectors=50)))
    assert len(capped.vectors) == 50   # whatever the gallery's size: the greedy pass is bounded


def test_patch_bank_for_builds_once_per_process():
    rng = np.random.default_rng(2)
    gallery = _gallery(_pyramid(rng, 4))
    config = SpadeConfig(bank_ratio=0.5)
    framing = TiledFraming((64, 64), 64, 0)
    assert patch_bank_for(gallery, config, framing) is patch_bank_for(gallery, config, framing)


def test_combined_bank_standardises_map_top_and_bank_max():
    normals = normal_statistics([1.0, 3.0], [10.0, 14.0], [2.0, 4.0], [5.0, 7.0])
    assert normals["bank_max"] == {"mean": 6.0, "std": pytest.approx(np.sqrt(2.0))}
    value = image_score("combined_bank", 100.0, 100.0, normals, map_top=4.0, bank_max=9.0)
    assert value == pytest.approx(1.0 / np.sqrt(2.0) + 3.0 / np.sqrt(2.0))
    assert image_score("bank_max", 1.0, 2.0, None, bank_max=9.0) == 9.0


def test_bank_layers_must_be_extracted():
    with pytest.raises(ValueError, match="bank_layers"):
        SpadeConfig(layers=("layer1", "layer2"), image_score="combined_bank")
    SpadeConfig(layers=("layer1", "layer2"), image_score="combined_top")  # unused: no constraint


def test_fit_stores_the_bank_and_calibrates_its_modes(tmp_path, monkeypatch):
    """`spade fit` with a bank image score builds the patch bank once and stores it; scoring workers load it (no
    rebuild), and the gallery's calibration holds the bank modes' thresholds beside the others'."""
    from tests.conftest import BEAM_ARGS, TINY, plumbing_config
    from pipelines.fit import run_fit
    from spade.features.framing import framing_for
    from spade.index import patch_bank
    from spade.index.gallery import Gallery, with_gallery_settings
    from spade.io.samples import SampleSpec, write_sample_dataset

    data = write_sample_dataset(str(tmp_path / "data"), SampleSpec(size=64, train=6, test_good=1, test_per_defect=1))
    config = plumbing_config(**TINY, image_score="combined_bank")
    run_fit(config, f"{data}/train/good", str(tmp_path / "gallery"), BEAM_ARGS)
    gallery = Gallery.open(str(tmp_path / "gallery"))
    assert gallery.manifest["patch_bank"] == patch_bank.patch_bank_settings(config)
    assert {"coreset/patch.npy", "coreset/patch-rows.npy"} <= set(gallery.manifest["files"])
    stored_vectors, stored_rows = gallery.banks[patch_bank.PATCH]
    calls = []
    monkeypatch.setattr(patch_bank, "_BANKS", {})  # not the bank fit's calibration left in this process
    original = patch_bank.build_patch_bank
    monkeypatch.setattr(patch_bank, "build_patch_bank", lambda *a, **k: calls.append(a) or original(*a, **k))
    bank = patch_bank.patch_bank_for(gallery, config, framing_for(with_gallery_settings(config, gallery.manifest)))
    assert not calls and np.array_equal(bank.vectors, stored_vectors) and np.array_equal(bank.rows, stored_rows)
    by_mode = gallery.manifest["thresholds"]["image_by_mode"]
    assert {"bank_max", "combined_bank", "combined_top", "knn"} <= set(by_mode)
    assert all(np.isfinite(by_mode[mode]) for mode in ("bank_max", "combined_bank"))
    assert gallery.manifest["thresholds"]["image"] == by_mode["combined_bank"]


def test_a_gallery_without_bank_names_the_fix_for_a_bank_mode(tiny_night):
    """The plumbing gallery was fitted with image_score knn: no bank, no bank statistics."""
    from spade.index.gallery import Gallery
    from spade.scoring.image_score import MissingCalibration, require_normals

    gallery = Gallery.open(tiny_night["gallery"])
    assert "patch_bank" not in gallery.manifest
    with pytest.raises(MissingCalibration, match="Re-run `spade fit` with this image_score"):
        require_normals("combined_bank", gallery.manifest["calibration"], tiny_night["gallery"])


def test_one_images_queries_search_the_bank_by_gemm_with_the_same_distances():
    """One frame's 4,096 layer-1 queries of 24 channels are below faiss's own GEMM threshold (queries x dimensions
    128,000), where it compares one query at a time, several times slower; the bank's threshold sends them to the
    GEMM, and the distances are the direct ones."""
    import faiss

    from spade.index.coreset import BLAS_THRESHOLD, MemoryBank

    rng = np.random.default_rng(0)
    bank = MemoryBank.from_vectors(rng.standard_normal((600, 24), dtype=np.float32))
    queries = rng.standard_normal((4096, 24), dtype=np.float32)
    assert faiss.cvar.distance_compute_blas_threshold == BLAS_THRESHOLD <= len(queries) * 24 < 128_000
    direct = np.sqrt(((queries[:, None, :] - bank.vectors[None, :, :]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(bank.distances(queries), direct, rtol=1e-5, atol=1e-5)


def test_largest_distances_equal_searching_every_query():
    """The screened search (`MemoryBank.largest_distances`) gives each frame's largest nearest-bank distance as
    searching every query in the whole bank does, leaving gallery rows out or not, while searching fewer queries
    in the whole bank."""
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(2048, 12)).astype(np.float32)
    rows = np.repeat(np.arange(64), 32)
    bank = MemoryBank.from_vectors(vectors, rows)
    assert len(vectors) >= SCREEN_MIN
    queries = rng.normal(size=(6, 300, 12)).astype(np.float32)
    queries[2, 17] += 6.0   # one odd patch
    queries[4] = vectors[rows == 5][rng.integers(0, 32, 300)] + rng.normal(scale=0.01, size=(300, 12))  # row 5 again
    flat = queries.reshape(-1, 12)
    own = np.repeat(np.array([0, 1, 2, 3, 5, 6]), 300)
    every = bank.distances(flat, 1).reshape(6, 300).max(axis=1)
    every_left_out = bank.distances(flat, 1, exclude_row=own).reshape(6, 300).max(axis=1)
    assert every_left_out[4] > 10 * every[4]   # leaving row 5 out matters to frame 4
    searched = []
    whole = bank.distances
    bank.distances = lambda q, *args, **kwargs: searched.append(len(q)) or whole(q, *args, **kwargs)
    assert np.allclose(bank.largest_distances(flat, 6), every, rtol=1e-6, atol=0)
    assert np.allclose(bank.largest_distances(flat, 6, exclude_row=own), every_left_out, rtol=1e-6, atol=0)
    assert sum(searched) < len(flat)   # both calls together: most queries only in the screen
