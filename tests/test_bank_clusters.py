"""A memory bank searched cluster by cluster: the winners of a search of every vector, with most clusters skipped."""
import numpy as np
import pytest

from spade.index import bank_clusters, fused_nearest
from spade.index.bank_clusters import ClusteredBank
from spade.index.coreset import MemoryBank
from tests.test_fused_nearest import full_distances, needs_kernel


def clustered_features(seed: int, n: int, channels: int, centres: int = 40, spread: float = 0.6, offset: float = 0.0):
    """Features that, like a layer's patches, gather around a few modes (a common large offset stresses rounding)."""
    rng = np.random.default_rng(seed)
    modes = rng.normal(size=(centres, channels)) * 4.0
    return (modes[rng.integers(centres, size=n)] + rng.normal(size=(n, channels)) * spread + offset).astype(np.float32)


def true_nearest(queries: np.ndarray, bank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each query's smallest float64 distance to the bank, and the float64 distances to every vector."""
    full = full_distances(queries, bank)
    return full.min(axis=1), full


@needs_kernel
@pytest.mark.parametrize("channels, n, threads, offset", [(24, 2500, 1, 0.0), (24, 1337, 2, 30.0), (168, 1100, 2, 0.0)])
def test_pruned_search_finds_the_full_searchs_winners(channels, n, threads, offset):
    """Same ids as the kernel's search of every vector, for a bank size not a multiple of the 16-column panels,
    a query count not a multiple of the kernel's six-row tile, queries near bank vectors, far from all of them and in
    between, and features far from the origin (large |q|^2 against small distances)."""
    bank = clustered_features(1, n, channels, offset=offset)
    rng = np.random.default_rng(2)
    queries = np.concatenate([bank[rng.integers(n, size=301)] + rng.normal(size=(301, channels)).astype(np.float32) * 0.05,
                              clustered_features(3, 400, channels, spread=1.5, offset=offset),
                              rng.normal(size=(23, channels)).astype(np.float32) * 20 + offset]).astype(np.float32)
    clustered = ClusteredBank.of(bank)
    assert len(clustered.starts) - 1 > 16  # really clustered
    pruned, share = clustered.nearest_ids(queries, threads=threads)
    assert 0 < share < (0.7 if channels == 24 else 1.0)  # clustered 24-channel features: most of the bank skipped
    whole = fused_nearest.nearest_ids(queries, fused_nearest.Panels.of(bank), threads=threads)
    np.testing.assert_array_equal(pruned, whole)
    best, full = true_nearest(queries, bank)
    np.testing.assert_allclose(full[np.arange(len(queries)), pruned], best, rtol=0, atol=1e-4)


@needs_kernel
def test_a_query_on_a_bank_vector_finds_it_and_duplicates_keep_one_of_them():
    """Distance 0 (a query equal to a bank vector) and vectors stored twice: the winner is at distance 0."""
    bank = clustered_features(4, 1500, 24)
    bank[700:710] = bank[100:110]
    queries = np.ascontiguousarray(bank[95:115])
    ids, _ = ClusteredBank.of(bank).nearest_ids(queries)
    np.testing.assert_array_equal(bank[ids], queries)


def tight_queries(bank: np.ndarray, clustered: ClusteredBank) -> np.ndarray:
    """Queries where a cluster's bound is tight: just outside its radius, on the line from its centroid through its
    farthest member (a bound too high by a rounding step would skip the cluster that holds the winner)."""
    queries = []
    for k in range(len(clustered.starts) - 1):
        members = clustered.column_ids[clustered.starts[k]:clustered.starts[k + 1]]
        members = members[members >= 0]
        centre = clustered.centroids[k]
        far = bank[members[np.argmax(((bank[members] - centre) ** 2).sum(1))]].astype(np.float64)
        if not np.linalg.norm(far - centre):
            continue  # a cluster of one vector
        for step in (1e-6, 1e-3, 0.05, 0.5):
            queries.append(far + (far - centre) / np.linalg.norm(far - centre) * step)
    return np.asarray(queries, dtype=np.float32)


@needs_kernel
@pytest.mark.parametrize("channels", [24, 168])
def test_bounds_never_exceed_a_clusters_smallest_value(channels):
    """The kernel's bound of every (query, cluster) is at most the smallest s(g) = |g|^2 - 2 q.g over the cluster's
    members in float64 (what makes skipping it safe), at tight places and far from the origin; each query's first
    cluster is that of its nearest centroid; on clustered data most (query, cluster) pairs are ruled out."""
    bank = clustered_features(5, 3000, channels, offset=25.0)
    clustered = ClusteredBank.of(bank)
    queries = np.concatenate([tight_queries(bank, clustered), bank[::17] + 1e-3,
                              clustered_features(6, 200, channels, spread=2.0, offset=25.0)])
    bounds, first = clustered.bounds(queries)
    q64, g64 = queries.astype(np.float64), bank.astype(np.float64)
    s = (g64 ** 2).sum(1)[None] - 2 * q64 @ g64.T
    for k in range(len(clustered.starts) - 1):
        members = clustered.column_ids[clustered.starts[k]:clustered.starts[k + 1]]
        members = members[members >= 0]
        assert (bounds[:, k] <= s[:, members].min(axis=1)).all(), k
    centre_distance = ((q64[:, None] - clustered.centroids[None]) ** 2).sum(-1)
    chosen = centre_distance[np.arange(len(queries)), first]
    lowered_by = 2 * bank_clusters.slack_for(channels) * ((q64 ** 2).sum(1) + (clustered.centroids ** 2).sum(1).max())
    assert (chosen <= centre_distance.min(axis=1) + lowered_by).all()  # nearest, up to the distances' allowance
    assert (bounds > s.min(axis=1)[:, None]).mean() > 0.5


@needs_kernel
@pytest.mark.parametrize("channels", [24, 168])
def test_queries_just_past_a_clusters_reach_still_find_their_winner(channels):
    bank = clustered_features(5, 3000, channels, offset=25.0)
    clustered = ClusteredBank.of(bank)
    queries = tight_queries(bank, clustered)
    pruned, _ = clustered.nearest_ids(queries)
    np.testing.assert_array_equal(pruned, fused_nearest.nearest_ids(queries, fused_nearest.Panels.of(bank)))
    best, full = true_nearest(queries, bank)
    np.testing.assert_allclose(full[np.arange(len(queries)), pruned], best, rtol=0, atol=1e-4)


def test_packing_keeps_every_vector_once_in_its_cluster():
    bank = clustered_features(7, 2049, 24)
    clustered = ClusteredBank.of(bank)
    real = clustered.column_ids[clustered.column_ids >= 0]
    np.testing.assert_array_equal(np.sort(real), np.arange(len(bank)))
    assert (np.diff(clustered.starts) % fused_nearest.LANES == 0).all()
    assert np.isinf(clustered.panels.sq.numpy()[clustered.column_ids < 0]).all()
    whole = fused_nearest.Panels.of(bank)
    np.testing.assert_array_equal(clustered.panels.sq.numpy()[clustered.column_ids >= 0],
                                  whole.sq.numpy()[real])  # the same float32 |g|^2: the same values, the same winners
    np.testing.assert_array_equal(clustered.centroids, clustered.centroids.astype(np.float32))
    for k in range(len(clustered.starts) - 1):
        members = clustered.column_ids[clustered.starts[k]:clustered.starts[k + 1]]
        members = members[members >= 0]
        spread = np.sqrt(((bank[members].astype(np.float64) - clustered.centroids[k]) ** 2).sum(1))
        assert spread.max() <= clustered.radii[k]
    assert len(ClusteredBank.of(bank[:40]).starts) == 2  # fewer than two clusters' worth: one cluster


@needs_kernel
@pytest.mark.parametrize("exclude", [False, True])
def test_a_large_memory_bank_searches_in_clusters_with_the_same_distances(exclude):
    """A bank of `MIN_VECTORS` or more takes the clustered search (built once); its nearest distances, leave-one-out
    ones and largest-per-group distances equal those of a full comparison, and faiss's flat search's."""
    vectors = clustered_features(8, bank_clusters.MIN_VECTORS + 100, 24)
    rows = np.repeat(np.arange(11), -(-len(vectors) // 11))[:len(vectors)]
    bank = MemoryBank.from_vectors(vectors, rows)
    rng = np.random.default_rng(9)
    queries = np.concatenate([vectors[::7] + 1e-3, clustered_features(10, 240, 24, spread=1.0)]).astype(np.float32)
    own = np.concatenate([rows[::7], rng.integers(11, size=240)]) if exclude else None
    fused = bank.distances(queries, 1, own, kernel="auto")
    assert bank._clusters is not None
    gemm = bank.distances(queries, 1, own, kernel="gemm")
    best, full = true_nearest(queries, vectors)
    if exclude:
        full[rows[None, :] == own[:, None]] = np.inf
        best = full.min(axis=1)
    np.testing.assert_allclose(fused, best, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(fused, gemm)
    groups = bank.largest_distances(queries[:len(queries) // 4 * 4], 4, None if own is None else own[:len(queries) // 4 * 4])
    np.testing.assert_allclose(groups, best[:len(queries) // 4 * 4].reshape(4, -1).max(axis=1), rtol=0, atol=1e-5)


@needs_kernel
def test_a_small_bank_is_searched_whole():
    bank = MemoryBank.from_vectors(clustered_features(11, bank_clusters.MIN_VECTORS - 1, 24))
    bank.distances(clustered_features(12, 50, 24))
    assert bank._clusters is None


@needs_kernel
def test_the_pruned_call_checks_its_arguments():
    bank = clustered_features(13, 1200, 24)
    clustered = ClusteredBank.of(bank)
    q = np.ascontiguousarray(bank[:10])

    def call(q=q, starts=clustered.starts, radii=clustered.radii):
        return fused_nearest.nearest_columns_pruned(q, clustered.panels, starts, clustered.centroid_panels, radii,
                                                    1e-5, 1e-4, clustered.largest_sq)

    with pytest.raises(ValueError, match="radii must be"):
        call(radii=clustered.radii[:-1])
    with pytest.raises(ValueError, match="channels"):
        call(q=np.ascontiguousarray(q[:, :20]))
    with pytest.raises(ValueError, match="multiples of 16"):
        call(starts=clustered.starts + 1)
    np.testing.assert_array_equal(clustered.column_ids[call()[0]], np.arange(10))


@needs_kernel
def test_a_bank_whose_clusters_skip_little_is_searched_whole_after_its_first_large_search():
    """Features without clusters (wide noise, as the commutators' grey layer 1 nearly is): the first search of
    `DECIDING_QUERIES` or more compares most of the bank, so later searches take the whole bank; results equal."""
    rng = np.random.default_rng(14)
    vectors = rng.normal(size=(bank_clusters.MIN_VECTORS * 2, 24)).astype(np.float32)
    bank = MemoryBank.from_vectors(vectors)
    queries = rng.normal(size=(bank_clusters.DECIDING_QUERIES, 24)).astype(np.float32)
    small = bank.distances(queries[:100])
    assert bank._clusters is not None and not bank._whole  # too few queries to decide
    first = bank.distances(queries)
    assert bank._whole
    _, share = bank._clusters.nearest_ids(queries)
    assert share > bank_clusters.WORTH
    again = bank.distances(queries)
    best, _ = true_nearest(queries, vectors)
    np.testing.assert_allclose(first, best, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(small, first[:100])
    features = clustered_features(15, bank_clusters.MIN_VECTORS * 2, 24)
    clustered = MemoryBank.from_vectors(features)
    near = features[rng.integers(len(features), size=bank_clusters.DECIDING_QUERIES)]
    clustered.distances(near + rng.normal(size=near.shape).astype(np.float32) * 0.3)
    assert not clustered._whole


@needs_kernel
def test_a_screened_whole_search_takes_over_from_a_lower_share(monkeypatch):
    """Where the whole search is screened in bfloat16 (2.5x faster), clusters must skip more to pay: a bank whose
    first large search compares a share between `WORTH_SCREENED` and `WORTH` goes whole with search_kernel auto on
    such a CPU, and stays in clusters with float32."""
    from spade.index import fused_nearest

    rng = np.random.default_rng(16)
    features = clustered_features(17, bank_clusters.MIN_VECTORS * 2, 24)
    near = features[rng.integers(len(features), size=bank_clusters.DECIDING_QUERIES)]
    queries = near + rng.normal(size=near.shape).astype(np.float32) * 0.3
    share = bank_clusters.ClusteredBank.of(features).nearest_ids(queries)[1]
    monkeypatch.setattr(bank_clusters, "WORTH", share + 0.01)
    monkeypatch.setattr(bank_clusters, "WORTH_SCREENED", share - 0.01)
    decided = {}
    for kernel in ("auto", "float32"):
        bank = MemoryBank.from_vectors(features)
        bank.distances(queries, kernel=kernel)
        decided[kernel] = bank._whole
    assert decided == {"auto": fused_nearest.use_bf16("auto"), "float32": False}


@needs_kernel
def test_the_first_large_search_decides_on_a_sample_and_searches_the_rest_whole(monkeypatch):
    """A search of many queries in a bank whose clusters skip little searches only a spread sample of
    `DECIDING_QUERIES` in clusters; the rest already go whole (the same winners as a full comparison)."""
    rng = np.random.default_rng(18)
    vectors = rng.normal(size=(bank_clusters.MIN_VECTORS * 2, 24)).astype(np.float32)
    queries = rng.normal(size=(bank_clusters.DECIDING_QUERIES * 3 + 5, 24)).astype(np.float32)
    searched = []
    clustered_search = bank_clusters.ClusteredBank.nearest_ids

    def spy(self, q, threads=1):
        searched.append(len(q))
        return clustered_search(self, q, threads)

    monkeypatch.setattr(bank_clusters.ClusteredBank, "nearest_ids", spy)
    bank = MemoryBank.from_vectors(vectors)
    found = bank.distances(queries)
    assert bank._whole and searched == [bank_clusters.DECIDING_QUERIES]
    best, _ = true_nearest(queries, vectors)
    np.testing.assert_allclose(found, best, rtol=0, atol=1e-5)
