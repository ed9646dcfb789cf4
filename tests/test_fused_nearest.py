"""The fused nearest-feature kernel: the same winners, ids and runner-up as a full comparison, and the GEMM search's
results wherever the config picks either."""
import platform
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from spade.config import SpadeConfig
from spade.index import fused_nearest
from spade.scoring.correspondence import _RunningMin, batch_layer_distances, nearest_feature_distances

needs_kernel = pytest.mark.skipif(not fused_nearest.available(),
                                  reason="the fused kernel is not built here (no C compiler at install, or no AVX2/FMA)")


def cpu_has_avx2_fma() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not cpu_has_avx2_fma()
                    or not (shutil.which("cc") or shutil.which("gcc")),
                    reason="the kernel is built only with a C compiler, and runs only on x86-64 with AVX2 and FMA")
def test_the_install_built_the_kernel_where_it_can_run():
    """`pip install -e .` compiles it (setup.py's optional extension); without it every search would quietly take
    the slower GEMM path."""
    assert fused_nearest.available()


def full_distances(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """(Q, G) every query's distance to every gallery vector, in float64: the reference each search must meet."""
    return np.sqrt(((queries[:, None, :].astype(np.float64) - gallery[None].astype(np.float64)) ** 2).sum(-1))


def integer_case(seed: int, rows: int, columns: int, channels: int):
    """Small integer features: every s(g) = |g|^2 - 2 q.g is an exact float32 integer, so ties are common and exact."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-2, 3, size=(rows, channels)).astype(np.float32)
    g = rng.integers(-2, 3, size=(columns, channels)).astype(np.float32)
    s = (g.astype(np.int64) ** 2).sum(1)[None, :] - 2 * q.astype(np.int64) @ g.astype(np.int64).T
    return q, g, s


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_fold_equals_a_full_comparison_with_exact_ties(threads):
    """Winner, its id (the first column of a tie, as a row minimum gives) and the runner-up, over calls of ragged
    widths (not multiples of the 16-column panels) and a row count not a multiple of the kernel's tile."""
    rows, widths, channels = 37, (130, 64, 1, 200, 77, 1100), 24
    q, g, s = integer_case(3, rows, sum(widths), channels)
    values = torch.full((rows, 2), float("inf"))
    ids = torch.full((rows, 2), -1, dtype=torch.int64)
    first = 0
    for width in widths:
        part = torch.from_numpy(g[first:first + width])
        fused_nearest.fold(torch.from_numpy(q), part, (part * part).sum(1), values, ids, 1000 + first, threads=threads)
        first += width
    winner = s.argmin(axis=1)
    assert (np.sort(s, axis=1)[:, 0] == np.sort(s, axis=1)[:, 1]).any()  # ties occur
    np.testing.assert_array_equal(values[:, 0].numpy(), s.min(axis=1))
    np.testing.assert_array_equal(ids[:, 0].numpy(), winner + 1000)
    others = s.astype(np.float64)
    others[np.arange(rows), winner] = np.inf
    np.testing.assert_array_equal(values[:, 1].numpy(), others.min(axis=1))


@needs_kernel
def test_fold_equals_the_gemm_running_minimum():
    """On real-valued features: the same winners as the GEMM search, values within float32 rounding."""
    rng = np.random.default_rng(4)
    q = torch.from_numpy(rng.normal(size=(500, 48)).astype(np.float32))
    g = torch.from_numpy(rng.normal(size=(3000, 48)).astype(np.float32))
    g_sq = (g * g).sum(1)
    gemm = _RunningMin(len(q), 1, gap=True)
    gemm.update(slice(0, len(q)), torch.addmm(g_sq, q, g.T, alpha=-2.0), 0)
    fused = _RunningMin(len(q), 1, gap=True)
    fused_nearest.fold(q, g, g_sq, fused.values, fused.ids, 0)
    np.testing.assert_array_equal(fused.ids[:, 0].numpy(), gemm.ids[:, 0].numpy())
    np.testing.assert_allclose(fused.values.numpy(), gemm.values.numpy(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("kernel", ["auto", "float32", "gemm"])
def test_searches_with_either_kernel_equal_float64(kernel):
    """The exact search's distances within 1e-5 of float64 whichever inner loop the config picks, near-ties
    included (the refinement settles them)."""
    rng = np.random.default_rng(5)
    queries = (rng.normal(size=(300, 24)) + 5).astype(np.float32)
    gallery = np.concatenate([(rng.normal(size=(1500, 24)) + 5), queries[:50] + 1e-4]).astype(np.float32)
    reference = full_distances(queries, gallery)
    got = nearest_feature_distances(queries, gallery, kernel=kernel)
    assert np.abs(got - reference.min(axis=1)).max() <= 1e-5
    pyramid = gallery[:1500].reshape(10, 150, 24)
    batch = queries[:300].reshape(2, 150, 24)
    neighbours = np.array([[0, 3, 5], [5, 7, 9]])
    got = batch_layer_distances(batch, pyramid, neighbours, 1, kernel=kernel)
    for i in range(2):
        flat = pyramid[np.sort(neighbours[i])].reshape(-1, 24)
        want = full_distances(batch[i], flat).min(axis=1)
        assert np.abs(got[i] - want).max() <= 1e-5


def test_the_gemm_path_needs_no_kernel(monkeypatch):
    """Where the kernel is missing (no compiler at install), auto searches with the GEMM, and calling the kernel
    directly says why it cannot and what to set."""
    monkeypatch.setattr(fused_nearest, "_library", lambda: None)
    assert not fused_nearest.use_fused("auto") and not fused_nearest.use_fused("gemm")
    rng = np.random.default_rng(6)
    queries, gallery = rng.normal(size=(40, 8)).astype(np.float32), rng.normal(size=(90, 8)).astype(np.float32)
    want = full_distances(queries, gallery).min(axis=1)
    assert np.abs(nearest_feature_distances(queries, gallery) - want).max() <= 1e-5
    with pytest.raises(RuntimeError, match="search_kernel: gemm"):
        fused_nearest.fold(torch.from_numpy(queries), torch.from_numpy(gallery), torch.zeros(90),
                           torch.zeros((40, 2)), torch.zeros((40, 2), dtype=torch.int64), 0)


def test_search_kernel_is_a_checked_speed_only_setting():
    from spade.config import SPEED_ONLY

    assert "search_kernel" in SPEED_ONLY
    assert SpadeConfig(search_kernel="gemm").search_kernel == "gemm"
    with pytest.raises(ValueError, match="search_kernel must be one of auto, float32, gemm"):
        SpadeConfig(search_kernel="fast")
    with pytest.raises(ValueError, match="search_kernel must be one of"):
        fused_nearest.use_fused("fast")


@pytest.mark.parametrize("exclude", [False, True])
def test_memory_bank_searches_with_either_kernel_alike(exclude):
    """A coreset bank's nearest distances (and leave-one-out's, which searches again without the query's own row)
    the same with the fused kernel as with faiss's flat search, and those of a full comparison."""
    from spade.index.coreset import MemoryBank

    rng = np.random.default_rng(8)
    vectors = rng.normal(size=(700, 24)).astype(np.float32)
    rows = np.repeat(np.arange(7), 100)
    bank = MemoryBank.from_vectors(vectors, rows)
    queries = np.concatenate([vectors[::5] + 1e-3, rng.normal(size=(200, 24))]).astype(np.float32)
    own = rows[::5].tolist() + [0] * 200
    own = np.asarray(own) if exclude else None
    fused = bank.distances(queries, 1, own, kernel="auto")
    gemm = bank.distances(queries, 1, own, kernel="gemm")
    full = full_distances(queries, vectors)
    if exclude:
        full[rows[None, :] == own[:, None]] = np.inf
    np.testing.assert_allclose(fused, full.min(axis=1), rtol=0, atol=1e-5)
    np.testing.assert_allclose(gemm, full.min(axis=1), rtol=0, atol=1e-5)
    groups = bank.largest_distances(queries, 4, own, kernel="auto")
    np.testing.assert_allclose(groups, full.min(axis=1).reshape(4, -1).max(axis=1), rtol=0, atol=1e-5)


def test_the_run_log_says_which_search_runs_and_how_to_get_the_kernel(monkeypatch):
    """`spade score` logs it: a missing kernel names the cause and the fix, not a silent slow path."""
    import importlib.util

    assert "gemm" in fused_nearest.describe("gemm")
    if fused_nearest.available():
        assert fused_nearest.describe("auto").startswith("fused nearest-feature kernel")
    monkeypatch.setattr(fused_nearest, "_library", lambda: None)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == fused_nearest.EXTENSION else real_find_spec(name, *a))
    note = fused_nearest.describe("auto")
    assert "not built" in note and "C compiler" in note and "pip install -e ." in note


needs_bf16 = pytest.mark.skipif(not fused_nearest.bf16_available(),
                                reason="the bfloat16 screen needs the kernel built and a CPU with AVX512-BF16")


def near_tied_case(seed: int, rows: int, columns: int, channels: int, spread: float):
    """Gallery vectors in tight clusters (members ``spread`` apart, far below bfloat16's resolution at these norms,
    so the screen cannot order them) around offset centres, queries near random members, some exact duplicates."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, columns // 20), channels)) * 4 + 3
    g = centres[rng.integers(0, len(centres), columns)] + spread * rng.normal(size=(columns, channels))
    q = g[rng.integers(0, columns, rows)] + spread * rng.normal(size=(rows, channels))
    g[1] = g[0]        # a tie: the first column must win
    q[:3] = g[:3]      # exact duplicates of gallery vectors
    return q.astype(np.float32), g.astype(np.float32)


@needs_bf16
@pytest.mark.parametrize("channels", [1, 7, 24, 112])
@pytest.mark.parametrize("threads", [1, 3])
def test_bf16_screen_finds_the_float32_kernels_very_winners(channels, threads):
    """The screen rounds to bfloat16 (8 bits) and settles what it cannot rule out in the float32 kernel's own
    arithmetic: the winners must be `nearest_ids`', tie to tie, on vectors the screen alone would misorder (spread
    1e-3 and 1e-2 at norms near 10), odd channel counts and a gallery that is not a multiple of its 32-column panels."""
    for spread in (1e-3, 1e-2, 1.0):
        q, g = near_tied_case(channels + int(spread * 1000), 301, 1001, channels, spread)
        panels, screen = fused_nearest.Panels.of(g), fused_nearest.Bf16Panels.of(g)
        expected = fused_nearest.nearest_ids(q, panels)
        found, compared, overflowed = fused_nearest.nearest_ids_bf16(q, panels, screen, threads=threads)
        np.testing.assert_array_equal(found, expected)
        assert compared + overflowed * len(g) >= len(q)
        if spread == 1.0:  # well-separated: q[1] = g[1] = g[0] wins at g[0], the first of the tie
            assert found[1] == 0 and overflowed == 0
            if channels > 1:  # a few columns a query (on a line, 2^-6 |q| |g| spans many neighbours)
                assert compared < 4 * len(q)


@needs_bf16
@pytest.mark.parametrize("threads", [1, 2])
def test_screened_fold_leaves_the_float32_folds_very_state(threads):
    """Winner, id and runner-up folded call after call (ragged widths, a running state coming in) through the screen:
    bit for bit what the float32 fold leaves, on exact integer ties and on near-tied real vectors."""
    rows, widths = 150, (130, 64, 1, 200, 77, 1100)
    q_int, g_int, s = integer_case(7, rows, sum(widths), 24)
    q_near, g_near = near_tied_case(9, rows, sum(widths), 40, 1e-3)
    for q, g in ((q_near, g_near), (q_int, g_int)):
        states = {}
        for screened in (False, True):
            values = torch.full((rows, 2), float("inf"))
            ids = torch.full((rows, 2), -1, dtype=torch.int64)
            first = 0
            for width in widths:
                part = torch.from_numpy(g[first:first + width])
                panels = fused_nearest.Panels.of(part)
                if screened:
                    screen = fused_nearest.Bf16Panels.of(part, centred=False)
                    fused_nearest.fold_bf16(torch.from_numpy(q), panels, screen, values, ids, 500 + first, threads)
                else:
                    fused_nearest.fold_panels(torch.from_numpy(q), panels, values, ids, 500 + first, threads)
                first += width
            states[screened] = (values.numpy(), ids[:, 0].numpy())
        np.testing.assert_array_equal(states[True][0], states[False][0])
        np.testing.assert_array_equal(states[True][1], states[False][1])
    np.testing.assert_array_equal(states[True][0][:, 0], s.min(axis=1))  # the integer case is still in states


def test_bf16_screen_overflows_into_the_whole_search_and_says_so():
    """Columns the screen cannot tell apart beyond its candidate buffer (128 a query): those queries are searched by
    the float32 kernel over every column, counted, with the same winners."""
    if not fused_nearest.bf16_available():
        pytest.skip("the bfloat16 screen needs the kernel built and a CPU with AVX512-BF16")
    rng = np.random.default_rng(5)
    base = rng.normal(size=24) * 3 + 5
    g = (base + 1e-5 * rng.normal(size=(600, 24))).astype(np.float32)
    q = np.concatenate([(base + 1e-5 * rng.normal(size=(20, 24))), rng.normal(size=(20, 24)) * 3 + 5])
    q = q.astype(np.float32)
    panels, screen = fused_nearest.Panels.of(g), fused_nearest.Bf16Panels.of(g)
    found, _, overflowed = fused_nearest.nearest_ids_bf16(q, panels, screen)
    np.testing.assert_array_equal(found, fused_nearest.nearest_ids(q, panels))
    assert overflowed >= 20


@needs_bf16
def test_bf16_screen_on_feature_like_vectors():
    """A layer-1-sized bank (8,192 vectors, 24 channels) of non-negative vectors of unequal channel scales, as after a
    ReLU, against queries near its members: the same winners as the float32 kernel, about one column a query
    compared exactly, two threads."""
    rng = np.random.default_rng(2)
    g = np.abs(rng.normal(size=(8192, 24)) * rng.uniform(0.2, 3, size=24)).astype(np.float32)
    q = (g[rng.integers(0, len(g), 3000)] + 0.05 * np.abs(rng.normal(size=(3000, 24)))).astype(np.float32)
    panels, screen = fused_nearest.Panels.of(g), fused_nearest.Bf16Panels.of(g)
    found, compared, overflowed = fused_nearest.nearest_ids_bf16(q, panels, screen, threads=2)
    np.testing.assert_array_equal(found, fused_nearest.nearest_ids(q, panels))
    assert compared < 3 * len(q) and overflowed == 0


def test_bf16_screen_is_selected_by_search_kernel(monkeypatch):
    """auto screens whole-bank searches where the CPU can; float32 keeps the fused kernel unscreened; the run log says
    which; a bank's distances are the same whichever runs."""
    from spade.index.coreset import MemoryBank

    assert not fused_nearest.use_bf16("float32") and not fused_nearest.use_bf16("gemm")
    assert fused_nearest.use_bf16("auto") == (fused_nearest.available() and fused_nearest.bf16_available())
    if fused_nearest.use_bf16("auto"):
        assert "bfloat16" in fused_nearest.describe("auto")
    assert "bfloat16" not in fused_nearest.describe("float32")
    for spread, exact in ((1e-2, False), (0.3, True)):  # near ties: float32's expansion itself may err by 3e-4
        q, g = near_tied_case(4, 500, 2000, 24, spread)
        bank = MemoryBank.from_vectors(g, np.repeat(np.arange(20), 100))
        bank._whole = True  # as after a first search whose clusters skipped too little
        results = {kernel: bank.distances(q, 1, kernel=kernel) for kernel in ("auto", "float32", "gemm")}
        np.testing.assert_array_equal(results["auto"], results["float32"])
        if exact:
            np.testing.assert_allclose(results["auto"], results["gemm"], rtol=0, atol=1e-5)
            np.testing.assert_allclose(results["auto"], full_distances(q, g).min(axis=1), rtol=0, atol=1e-5)


def test_a_kernel_built_before_the_screen_leaves_it_off(monkeypatch):
    """An extension compiled before the screen existed (no spade_fold_bf16, e.g. a checkout updated without
    `pip install -e .`) keeps the float32 kernel: auto does not screen and the run log does not claim it."""
    import types

    stale = types.SimpleNamespace(spade_nearest_supported=lambda: 1)
    monkeypatch.setattr(fused_nearest, "_library", lambda: stale)
    assert fused_nearest.available() and not fused_nearest.bf16_available()
    assert fused_nearest.use_fused("auto") and not fused_nearest.use_bf16("auto")
    assert "bfloat16" not in fused_nearest.describe("auto")
