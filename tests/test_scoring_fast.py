"""The fast scoring path: blocked correspondence, batching of images that share neighbours, coreset mode."""
import os

import numpy as np
import pytest
import torch

from spade.features.backbone import Features
from spade.config import SpadeConfig
from spade.index import farthest_points
from spade.index.coreset import MemoryBank, greedy_coreset
from spade.scoring.correspondence import (PyramidReader, _band_members, _RunningMin, batch_layer_distances,
                                  nearest_feature_distances)
from spade.index.gallery import Gallery
from spade.index.knn import build_index
from spade.scoring.batch import layer_distance_maps, score_batch
from spade.scoring.calibration import leave_one_out_scores


# greedy selection by torch's plain pass, and by the compiled kernel where it is built (tests/test_farthest_points.py
# checks that the install built it wherever a C compiler is present)
COMPILED = [False] + ([True] if farthest_points.available() else [])


def brute(queries, gallery, kappa=1):
    d = np.sqrt(((queries[:, None, :].astype(np.float64) - gallery[None, :, :].astype(np.float64)) ** 2).sum(-1))
    return np.sort(d, axis=1)[:, :kappa].mean(1)


def cdist(queries, gallery, kappa=1):
    d = torch.cdist(torch.from_numpy(queries), torch.from_numpy(np.ascontiguousarray(gallery)))
    return d.topk(kappa, dim=1, largest=False).values.mean(1).numpy()


def npy_pyramid(tmp_path, array, name="layer"):
    path = tmp_path / f"{name}.npy"
    out = np.lib.format.open_memmap(str(path), mode="w+", dtype=array.dtype, shape=array.shape)
    out[:] = array
    out.flush()
    del out
    return np.load(str(path), mmap_mode="r")


@pytest.mark.parametrize("kappa", [1, 4])
def test_blocked_search_matches_numpy_and_cdist(kappa):
    rng = np.random.default_rng(0)
    queries = (rng.normal(size=(300, 24)) + 5).astype(np.float32)  # large norms: cancellation in the expansion
    gallery = (rng.normal(size=(1500, 24)) + 5).astype(np.float32)
    got = nearest_feature_distances(queries, gallery, kappa=kappa, block=128)
    np.testing.assert_allclose(got, brute(queries, gallery, kappa), rtol=0, atol=1e-4)
    np.testing.assert_allclose(got, cdist(queries, gallery, kappa), rtol=0, atol=1e-4)


@pytest.mark.parametrize("kappa", [1, 3])
@pytest.mark.parametrize("memmap", [True, False])
def test_batched_images_with_shared_neighbours_equal_one_by_one(tmp_path, kappa, memmap):
    rng = np.random.default_rng(1)
    n, positions, channels, batch = 12, 49, 16, 5
    pyramid = rng.normal(size=(n, positions, channels)).astype(np.float32)
    if memmap:
        pyramid = npy_pyramid(tmp_path, pyramid)
    queries = rng.normal(size=(batch, positions, channels)).astype(np.float32)
    neighbours = np.array([[3, 4, 5], [5, 4, 3], [0, 3, 11], [7, 8, 9], [9, 1, 4]])  # shared, partly shared, disjoint
    together = batch_layer_distances(queries, pyramid, neighbours, kappa, read_positions=100)
    for i in range(batch):
        alone = batch_layer_distances(queries[i:i + 1], pyramid, neighbours[i:i + 1], kappa)[0]
        np.testing.assert_allclose(together[i], alone, rtol=0, atol=1e-5)
        flat = np.asarray(pyramid)[np.sort(neighbours[i])].reshape(-1, channels)
        np.testing.assert_allclose(together[i], brute(queries[i], flat, kappa), rtol=0, atol=1e-4)
        np.testing.assert_allclose(together[i], cdist(queries[i], flat, kappa), rtol=0, atol=1e-4)


def near_duplicates(seed, n_gallery, n_queries, channels=64):
    """Gallery: two far apart clusters (+-100 in every channel, so centring leaves the norms large) of tiny
    perturbations, drawn from few distinct vectors (many exact duplicates), a third of them moved by ~1e-3;
    queries: gallery vectors, half of them exactly, half moved by ~1e-3. Distances are ~0-1e-2 while
    |x|^2 ~ 6e5, far below float32's rounding of the expansion -2 q.g + |g|^2."""
    rng = np.random.default_rng(seed)
    sign = np.where(np.arange(40) % 2 == 0, 1.0, -1.0)[:, None]
    base = (100 * sign + 1e-3 * rng.standard_normal((40, channels))).astype(np.float32)
    gallery = base[rng.integers(0, len(base), size=n_gallery)]
    gallery[::3] += (1e-3 * rng.standard_normal((len(gallery[::3]), channels))).astype(np.float32)
    queries = gallery[rng.integers(0, n_gallery, size=n_queries)].copy()
    queries[1::2] += (1e-3 * rng.standard_normal((len(queries[1::2]), channels))).astype(np.float32)
    return queries, gallery


def float32_expansion_only(queries, gallery, kappa):
    """Winners picked by the float32 expansion alone, their distances then recomputed directly (no refinement)."""
    q, g = torch.from_numpy(queries), torch.from_numpy(gallery)
    ids = torch.addmm((g * g).sum(1), q, g.T, alpha=-2.0).topk(kappa, dim=1, largest=False).indices
    return torch.linalg.vector_norm(g[ids] - q[:, None], dim=2).mean(1).numpy()


@pytest.mark.parametrize("kernel", ["auto", "gemm"])  # auto: the fused kernel where it was built (test_fused_nearest.py)
@pytest.mark.parametrize("kappa", [1, 3])
def test_near_duplicates_are_refined_to_float64_accuracy(kappa, kernel):
    queries, gallery = near_duplicates(5, 600, 200)
    reference = brute(queries, gallery, kappa)
    assert np.abs(float32_expansion_only(queries, gallery, kappa) - reference).max() > 1e-4  # the case is hard
    got = nearest_feature_distances(queries, gallery, kappa=kappa, block=128, kernel=kernel)
    assert np.abs(got - reference).max() <= 1e-5


@pytest.mark.parametrize("kernel", ["auto", "gemm"])
@pytest.mark.parametrize("kappa", [1, 3])
def test_batched_near_duplicates_are_refined_to_float64_accuracy(tmp_path, kappa, kernel):
    n, positions, channels, batch = 8, 60, 64, 3
    queries, gallery = near_duplicates(6, n * positions, batch * positions, channels)
    pyramid = npy_pyramid(tmp_path, gallery.reshape(n, positions, channels))
    queries = queries.reshape(batch, positions, channels)
    neighbours = np.array([[0, 1, 2], [2, 1, 0], [5, 6, 7]])  # shared and disjoint neighbour sets
    got = batch_layer_distances(queries, pyramid, neighbours, kappa, read_positions=100, kernel=kernel)
    unrefined = batch_layer_distances(queries, pyramid, neighbours, kappa, read_positions=100, refine=False,
                                      kernel=kernel)
    worst, worst_unrefined = 0.0, 0.0
    for i in range(batch):
        flat = gallery.reshape(n, positions, channels)[np.sort(neighbours[i])].reshape(-1, channels)
        reference = brute(queries[i], flat, kappa)
        worst = max(worst, np.abs(float32_expansion_only(queries[i], flat, kappa) - reference).max())
        worst_unrefined = max(worst_unrefined, np.abs(unrefined[i] - reference).max())
        assert np.abs(got[i] - reference).max() <= 1e-5
    assert worst > 1e-4  # the float32 expansion alone fails here
    assert worst_unrefined > 1e-5  # and so does the centred search without the band refinement


@pytest.mark.parametrize("kappa", [1, 3])
def test_flagged_queries_are_settled_in_float64_and_only_duplicates_reach_the_band(monkeypatch, kappa):
    """The float32 search flags every near-duplicate query; the float64 search settles most of them, and
    the band search gets only those still within float64 noise (exact duplicates: distance 0)."""
    from spade.scoring import correspondence

    flagged, banded = [], []
    flags, band = correspondence._refine_flags, correspondence._refine_band
    monkeypatch.setattr(correspondence, "_refine_flags", lambda *a, **k: flagged.append(flags(*a, **k).sum()) or flags(*a, **k))
    monkeypatch.setattr(correspondence, "_refine_band", lambda q, *a, **k: banded.append(len(q)) or band(q, *a, **k))
    queries, gallery = near_duplicates(5, 600, 200)
    got = nearest_feature_distances(queries, gallery, kappa=kappa, block=128)
    assert np.abs(got - brute(queries, gallery, kappa)).max() <= 1e-5
    assert flagged[0] == len(queries)  # the float32 search cannot settle any of them
    assert 0 < banded[0] < flagged[0] / 2  # float64 settles most; duplicates still reach the band


def test_near_duplicates_far_from_the_centre_are_settled_around_their_own_mean(monkeypatch):
    """A flat background: test positions within ~1e-5 of many gallery features, far from the search's centre
    (a gallery row of other content), flagged together with near-ties of another image's content elsewhere.
    Neither float32 around that centre nor float64 around the mean of all flagged positions can rank the
    background ones (the rounding bound grows with the norms); around their own mean they are settled
    exactly, with no band search."""
    from spade.scoring import correspondence

    flagged, banded = [], []
    flags, band = correspondence._refine_flags, correspondence._refine_band
    monkeypatch.setattr(correspondence, "_refine_flags", lambda *a, **k: flagged.append(flags(*a, **k).sum()) or flags(*a, **k))
    monkeypatch.setattr(correspondence, "_refine_band", lambda q, *a, **k: banded.append(len(q)) or band(q, *a, **k))
    rng = np.random.default_rng(3)
    n, positions, channels = 5, 50, 24
    pyramid = np.empty((n, positions, channels), dtype=np.float32)
    pyramid[0] = rng.standard_normal((positions, channels))  # row 0 sets the centre: far from both clusters
    pyramid[1:3] = 60.0 + 1e-5 * rng.standard_normal((2, positions, channels))  # background near-duplicates
    pyramid[3:5] = -60.0 + 1e-2 * rng.standard_normal((2, positions, channels))  # another image's content
    queries = np.stack([60.0 + 1e-5 * rng.standard_normal((positions, channels)),
                        -60.0 + 1e-2 * rng.standard_normal((positions, channels))]).astype(np.float32)
    neighbours = np.array([[0, 1, 2], [0, 3, 4]])
    got = batch_layer_distances(queries, pyramid, neighbours, 1)
    for i in range(2):
        flat = pyramid[np.sort(neighbours[i])].reshape(-1, channels)
        assert np.abs(got[i] - brute(queries[i], flat)).max() <= 1e-6  # REFINE_TOLERANCE
    assert flagged[0] == 2 * positions  # float32 around row 0's mean settles none
    assert 0 < flagged[1] <= positions  # float64 around all flagged positions' mean settles the other content
    assert flagged[2] == 0 and banded == []  # and around their own mean, the background


def test_band_members_equal_a_full_comparison():
    rng = np.random.default_rng(7)
    for rows, width in ((50, 300), (7, 128), (3, 5), (40, 1000)):
        out = torch.from_numpy(rng.normal(size=(rows, width)).astype(np.float32))
        limit = (out.numpy().min(axis=1) + rng.uniform(0, 0.3, size=rows)).astype(np.float32)
        limit[::4] = -np.inf  # rows with no member
        got_r, got_c = _band_members(out, limit, segment=64)
        want_r, want_c = np.nonzero(out.numpy() <= limit[:, None])
        assert sorted(zip(got_r.tolist(), got_c.tolist())) == sorted(zip(want_r.tolist(), want_c.tolist()))


@pytest.mark.parametrize("gap", [False, True])
def test_running_minimum_equals_a_full_sort(gap):
    """Winner, its column and the runner-up (smallest value not picked) over blocks of ragged widths,
    with exact ties (the first column of a tie wins, as a full argmin would pick)."""
    rng = np.random.default_rng(11)
    rows, widths = 37, (130, 64, 1, 200, 77)
    values = np.round(rng.normal(size=(rows, sum(widths))), 1).astype(np.float32)  # rounding makes ties common
    best = _RunningMin(rows, 1, gap=gap)
    first = 0
    for width in widths:
        block = torch.from_numpy(values[:, first:first + width].copy())
        best.update(slice(0, rows), block, first)
        first += width
    got_v, got_i, got_next = best.winners()
    want_i = values.argmin(axis=1)
    np.testing.assert_array_equal(got_v[:, 0].numpy(), values.min(axis=1))
    np.testing.assert_array_equal(got_i[:, 0].numpy(), want_i)
    if gap:
        others = values.copy()
        others[np.arange(rows), want_i] = np.inf
        np.testing.assert_array_equal(got_next.numpy(), others.min(axis=1))
    else:
        assert got_next is None


def test_pread_exactly_fills_the_buffer_and_names_a_file_that_ends_early(tmp_path):
    from spade.index.pyramid import pread_exactly

    path = tmp_path / "rows.bin"
    data = np.arange(40, dtype=np.float32)
    path.write_bytes(data.tobytes())
    fd = os.open(path, os.O_RDONLY)
    try:
        out = np.empty(10, dtype=np.float32)
        pread_exactly(fd, out, 12 * 4, "rows.bin")
        np.testing.assert_array_equal(out, data[12:22])
        with pytest.raises(OSError, match="short read from rows.bin"):
            pread_exactly(fd, np.empty(10, dtype=np.float32), 35 * 4, "rows.bin")
    finally:
        os.close(fd)


def test_reader_reads_rows_from_npy_and_float16(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.normal(size=(6, 4, 3)).astype(np.float16)
    pyramid = npy_pyramid(tmp_path, data)
    out = np.empty((4, 4, 3), dtype=np.float32)
    with PyramidReader(pyramid) as reader:
        assert reader.fd is not None
        np.testing.assert_array_equal(reader.read(np.array([1, 2, 5]), out), data[[1, 2, 5]].astype(np.float32))


@pytest.mark.parametrize("compiled", COMPILED)
def test_greedy_coreset_picks_farthest_points(compiled):
    # a tight cluster at the origin, and three outliers at increasing distance
    points = np.array([[0, 0], [0.1, 0], [0, 0.1], [10, 0], [0, 5], [-2, 0], [0.05, 0.05]], dtype=np.float32)
    picked = greedy_coreset(points, 4, start=0, projection=0, compiled=compiled)
    # (10,0) is farthest from the origin; then distance to the SET {origin, (10,0)}: (0,5) is 5 away, (-2,0) only 2
    assert list(picked) == [0, 3, 4, 5]
    assert sorted(greedy_coreset(points, len(points), start=0, projection=0, compiled=compiled)) == \
        list(range(len(points)))


@pytest.mark.parametrize("compiled", COMPILED)
@pytest.mark.parametrize("channels", [24, 128])
def test_greedy_coreset_equals_farthest_point_selection_in_float64(channels, compiled):
    # either float32 search picks what a plain float64 farthest-point loop over the rows picks
    rng = np.random.default_rng(channels)
    points = (rng.normal(size=(3000, channels)) * rng.random((3000, 1))).astype(np.float32)
    picked = greedy_coreset(points, 200, start=7, projection=0, compiled=compiled)
    reference = points.astype(np.float64)
    nearest = ((reference - reference[7]) ** 2).sum(1)
    expected = [7]
    for _ in range(199):
        expected.append(int(nearest.argmax()))
        nearest = np.minimum(nearest, ((reference - reference[expected[-1]]) ** 2).sum(1))
    assert list(picked) == expected


@pytest.mark.parametrize("compiled", COMPILED)
def test_greedy_coreset_reports_progress_and_picks_the_same_with_it(compiled):
    points = np.random.default_rng(5).normal(size=(300, 6)).astype(np.float32)
    told = []
    picked = greedy_coreset(points, 140, projection=0, seed=1, progress=lambda done, n: told.append((done, n)),
                            every_s=0, compiled=compiled)
    done = [d for d, _ in told]
    assert done == sorted(set(done)) and done[-1] == 140 and {n for _, n in told} == {140}  # up to the last
    assert len(done) >= 3 and (compiled or done == list(range(2, 141)))  # torch's pass: every step after the first
    np.testing.assert_array_equal(picked, greedy_coreset(points, 140, projection=0, seed=1, compiled=compiled))
    quiet = []
    greedy_coreset(points, 140, projection=0, seed=1, progress=lambda done, n: quiet.append(done), compiled=compiled)
    assert quiet == []  # 10 s apart


def test_memory_bank_ratio_one_equals_exact_global_bank():
    rng = np.random.default_rng(3)
    bank_features = rng.normal(size=(400, 8)).astype(np.float32)
    queries = rng.normal(size=(60, 8)).astype(np.float32)
    for kappa in (1, 3):
        bank = MemoryBank.build(bank_features, ratio=1.0)
        assert len(bank.vectors) == 400
        np.testing.assert_allclose(bank.distances(queries, kappa), brute(queries, bank_features, kappa), rtol=0, atol=1e-4)
        small = MemoryBank.build(bank_features, ratio=0.1)
        assert len(small.vectors) == 40
        assert np.all(small.distances(queries, kappa) >= brute(queries, bank_features, kappa) - 1e-4)


def _gallery(tmp_path, n=8, positions=(16, 4), channels=(8, 12), dim=6):
    rng = np.random.default_rng(4)
    layers = ("layer1", "layer2")
    pyramid = {}
    for layer, p, c in zip(layers, positions, channels):
        pyramid[layer] = npy_pyramid(tmp_path, rng.normal(size=(n, p, c)).astype(np.float32), name=layer)
    embeddings = rng.normal(size=(n, dim)).astype(np.float32)
    manifest = {"gallery_hash": "test", "layers": list(layers)}
    gallery = Gallery(url=str(tmp_path), manifest=manifest, images=None, index=build_index(embeddings), pyramid=pyramid)
    features = Features(rng.normal(size=(3, dim)).astype(np.float32),
                        {layer: rng.normal(size=(3, c, int(p ** 0.5), int(p ** 0.5))).astype(np.float32)
                         for layer, p, c in zip(layers, positions, channels)})
    config = SpadeConfig(backbone="resnet18", weights="random", layers=layers, k=3, crop=16, resize=16, sigma=1.0,
                         framing="crop", feature_aggregation=1, image_score="knn", approximate_layers=(),
                         map_edge_band=0)  # no calibration here: the method's maps
    return gallery, features, config


def test_score_batch_exact_matches_cdist_reference(tmp_path):
    gallery, features, config = _gallery(tmp_path)
    results = score_batch(features, gallery, config)
    maps = layer_distance_maps(features.pyramid, gallery, np.stack([r.neighbours for r in results]), config).pixel
    for i, result in enumerate(results):
        for layer in config.layers:
            b_map = maps[layer][i]
            c, h, w = features.pyramid[layer][i].shape
            q = np.ascontiguousarray(features.pyramid[layer][i].reshape(c, h * w).T)
            flat = np.asarray(gallery.pyramid[layer])[np.sort(result.neighbours)].reshape(-1, c)
            np.testing.assert_allclose(b_map.reshape(-1), cdist(q, flat), rtol=0, atol=1e-4)
        assert result.score_map.shape == (16, 16)


def test_approximate_mode_with_full_coreset_equals_exact_global_bank(tmp_path):
    gallery, features, config = _gallery(tmp_path)
    config = config.replace(k=len(gallery.pyramid["layer1"]))  # every gallery image a neighbour: exact = global bank
    exact = score_batch(features, gallery, config, mode="exact")
    approx = score_batch(features, gallery, config, mode="approximate", coreset_ratio=1.0)
    for e, a in zip(exact, approx):
        assert e.image_score == a.image_score
        np.testing.assert_allclose(a.score_map, e.score_map, rtol=0, atol=1e-4)


def test_approximate_layers_take_the_bank_for_those_layers_and_the_exact_search_for_the_others(tmp_path):
    """``approximate_layers`` in exact mode: layer1 from the coreset bank (as approximate mode gives it), layer2
    from the K nearest images' positions (as exact mode gives it)."""
    gallery, features, config = _gallery(tmp_path)
    gallery.manifest["gallery_hash"] = "approximate-layers"  # its own bank cache entry
    config = config.replace(coreset_ratio=1.0)
    neighbours = np.stack([r.neighbours for r in score_batch(features, gallery, config)])
    exact = layer_distance_maps(features.pyramid, gallery, neighbours, config, mode="exact").pixel
    approx = layer_distance_maps(features.pyramid, gallery, neighbours, config, mode="approximate").pixel
    hybrid = config.replace(approximate_layers=["layer1"])
    assert hybrid.coreset_layers == ("layer1",) and config.coreset_layers == ()
    assert config.replace(scoring_mode="approximate").coreset_layers == config.layers
    mixed = layer_distance_maps(features.pyramid, gallery, neighbours, hybrid).pixel
    np.testing.assert_array_equal(mixed["layer1"], approx["layer1"])
    np.testing.assert_array_equal(mixed["layer2"], exact["layer2"])
    assert not np.allclose(mixed["layer1"], exact["layer1"], atol=1e-4)  # the bank holds every image's positions
    assert config.replace(approximate_layers=["layer1", "layer3"]).coreset_layers == ("layer1",)  # of layers only
    with pytest.raises(ValueError, match="approximate_layers: unknown layer 'layer9'"):
        config.replace(approximate_layers=["layer9"])


def test_coreset_max_vectors_caps_a_bank_and_is_recorded_only_when_set():
    from spade.index.coreset import bank_settings, layer_bank

    pyramid = np.random.default_rng(5).normal(size=(6, 50, 4)).astype(np.float32)
    assert len(layer_bank(pyramid, 0.5, projection=0).vectors) == 150
    assert len(layer_bank(pyramid, 0.5, projection=0, max_vectors=40).vectors) == 40
    assert len(layer_bank(pyramid, 0.5, projection=0, max_candidates=100, max_vectors=40).vectors) == 40
    assert "max_vectors" not in bank_settings(0.5) and bank_settings(0.5, max_vectors=40)["max_vectors"] == 40


def test_memory_bank_leaves_a_gallery_row_out():
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(60, 5)).astype(np.float32)
    rows = np.repeat(np.arange(6), 10)
    bank = MemoryBank.from_vectors(vectors, rows)
    queries = vectors[20:30] + 1e-3  # row 2's own vectors, nearly
    assert bank.distances(queries, 1).max() < 1e-2  # each query's own vector
    for kappa in (1, 3):
        np.testing.assert_allclose(bank.distances(queries, kappa, exclude_row=2), brute(queries, vectors[rows != 2], kappa),
                                   rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="gallery rows"):
        MemoryBank.from_vectors(vectors).distances(queries, 1, exclude_row=2)


@pytest.mark.parametrize("kappa", [1, 3])
def test_memory_bank_leaves_each_query_own_row_out_in_one_batch(kappa):
    """Queries of several gallery images searched together, each skipping its own row, equal each image alone."""
    rng = np.random.default_rng(8)
    vectors = rng.normal(size=(80, 6)).astype(np.float32)
    rows = np.repeat(np.arange(8), 10)
    bank = MemoryBank.from_vectors(vectors, rows)
    own = np.repeat([1, 4, 6], 10)
    queries = vectors[np.concatenate([np.arange(10, 20), np.arange(40, 50), np.arange(60, 70)])] + 1e-3
    together = bank.distances(queries, kappa, exclude_row=own)
    for row in (1, 4, 6):
        alone = own == row
        np.testing.assert_array_equal(together[alone], bank.distances(queries[alone], kappa, exclude_row=row))
        np.testing.assert_allclose(together[alone], brute(queries[alone], vectors[rows != row], kappa), rtol=0, atol=1e-5)


def test_leave_one_out_scoring_in_approximate_mode_skips_the_image_own_patches(tmp_path):
    gallery, _, config = _gallery(tmp_path)
    gallery.manifest["gallery_hash"] = "leave-one-out"  # its own bank cache entry
    row = 3
    pyramid = {layer: np.asarray(gallery.pyramid[layer][row]).T.reshape(1, -1, *([int(np.sqrt(gallery.pyramid[layer].shape[1]))] * 2))
               for layer in config.layers}
    features = Features(gallery.index.reconstruct_batch(np.array([row])), pyramid)
    maps = layer_distance_maps(pyramid, gallery, np.array([[0]]), config, mode="approximate", coreset_ratio=1.0,
                               exclude_rows=np.array([row])).pixel
    for layer in config.layers:
        data = np.asarray(gallery.pyramid[layer], dtype=np.float32)
        others = data[np.arange(len(data)) != row].reshape(-1, data.shape[2])
        np.testing.assert_allclose(maps[layer].reshape(-1), brute(data[row], others), rtol=0, atol=1e-4)
    result = score_batch(features, gallery, config, exclude_rows=np.array([row]), mode="approximate", coreset_ratio=1.0)[0]
    assert row not in result.neighbours and result.score_map.min() > 0


@pytest.mark.parametrize("mode", ["exact", "approximate"])
def test_calibration_in_batches_equals_scoring_each_image_alone(tmp_path, mode):
    gallery, _, config = _gallery(tmp_path)
    gallery.manifest["gallery_hash"] = f"calibration-{mode}"  # its own bank cache entry
    config = config.replace(batch_size=3, scoring_mode=mode, coreset_ratio=1.0)
    normal = leave_one_out_scores(gallery, config, count=7)
    scores, maps = normal.knn, normal.maps
    rows = np.unique(np.linspace(0, 7, num=7).round().astype(int))
    assert list(normal.rows) == list(rows)
    assert len(scores) == len(rows) == 7 and maps.shape == (7, 16, 16)
    for i, row in enumerate(rows):
        pyramid = {layer: np.asarray(gallery.pyramid[layer][row]).T.reshape(1, -1, *([int(np.sqrt(gallery.pyramid[layer].shape[1]))] * 2))
                   for layer in config.layers}
        alone = score_batch(Features(gallery.index.reconstruct_batch(np.array([row])), pyramid), gallery, config,
                            exclude_rows=np.array([row]))[0]
        assert row not in alone.neighbours
        assert scores[i] == alone.image_score == alone.knn_score
        assert normal.map_max[i] == alone.map_max
        np.testing.assert_allclose(maps[i], alone.score_map, rtol=0, atol=1e-6)
