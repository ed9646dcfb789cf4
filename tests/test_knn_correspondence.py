import numpy as np
import pytest

from spade.scoring.correspondence import layer_distance_map, nearest_feature_distances
from spade.index.knn import build_index, image_scores, nearest_images


def brute_distances(a, b):
    return np.sqrt(((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1))


def test_knn_matches_brute_force():
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(40, 16)).astype(np.float32)
    queries = rng.normal(size=(7, 16)).astype(np.float32)
    distances, rows = nearest_images(build_index(gallery), queries, k=5)
    full = brute_distances(queries, gallery)
    expected_rows = np.argsort(full, axis=1)[:, :5]
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_allclose(distances, np.sort(full, axis=1)[:, :5], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(image_scores(distances), np.sort(full, axis=1)[:, :5].mean(1), rtol=1e-4)


def test_knn_clamps_k_to_gallery_size_and_excludes_rows():
    rng = np.random.default_rng(1)
    gallery = rng.normal(size=(6, 8)).astype(np.float32)
    index = build_index(gallery)
    distances, rows = nearest_images(index, gallery, k=50)
    assert rows.shape == (6, 6)
    distances, rows = nearest_images(index, gallery[[2, 4]], k=3, exclude_rows=np.array([2, 4]))
    assert rows.shape == (2, 3)
    assert 2 not in rows[0] and 4 not in rows[1]
    full = brute_distances(gallery[[2, 4]], gallery)
    full[0, 2] = full[1, 4] = np.inf
    np.testing.assert_array_equal(rows, np.argsort(full, axis=1)[:, :3])


@pytest.mark.parametrize("kappa", [1, 3])
def test_correspondence_matches_brute_force(kappa):
    rng = np.random.default_rng(2)
    queries = rng.normal(size=(50, 12)).astype(np.float32)
    gallery = rng.normal(size=(333, 12)).astype(np.float32)
    got = nearest_feature_distances(queries, gallery, kappa=kappa, block=64)
    expected = np.sort(brute_distances(queries, gallery), axis=1)[:, :kappa].mean(1)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_correspondence_finds_features_at_any_position():
    """A test map that is a spatially shuffled normal map scores ~0 everywhere: correspondence, not alignment."""
    rng = np.random.default_rng(3)
    normal = rng.normal(size=(8, 5, 5)).astype(np.float32)
    positions = normal.reshape(8, 25).T
    shuffled = positions[rng.permutation(25)].T.reshape(8, 5, 5)
    # exact matches give ~sqrt(float32 rounding of |q|^2 - 2qg + |g|^2), far below real distances (~4 here)
    assert np.abs(layer_distance_map(shuffled, positions)).max() < 1e-2
    moved = shuffled.copy()
    moved[:, 2, 2] += 10.0
    dist = layer_distance_map(moved, positions)
    assert dist[2, 2] > 5 and np.delete(dist.ravel(), 12).max() < 1e-2


def test_correspondence_rejects_mismatched_channels():
    with pytest.raises(ValueError, match="share C"):
        nearest_feature_distances(np.zeros((3, 4)), np.zeros((5, 6)))
