"""The compiled greedy farthest-point selection (spade/index/farthest_kernel.c): the plain pass's picks, fewer rows read."""
import platform
import shutil

import numpy as np
import pytest

from spade.index import farthest_points
from spade.index.coreset import greedy_coreset

needs_kernel = pytest.mark.skipif(not farthest_points.available(),
                                  reason="the farthest-point kernel is not built here (no C compiler at install)")


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")) or platform.system() == "Windows",
                    reason="the kernel is built only where a C compiler is present")
def test_the_install_built_the_kernel():
    """`pip install -e .` compiles it (setup.py's optional extension); without it every coreset bank would quietly be
    selected by the plain pass, several times slower."""
    assert farthest_points.available()


def float64_farthest(points: np.ndarray, n: int, start: int) -> list[int]:
    reference = points.astype(np.float64)
    nearest = ((reference - reference[start]) ** 2).sum(1)
    picked = [start]
    nearest[start] = -1.0
    for _ in range(n - 1):
        picked.append(int(nearest.argmax()))
        nearest = np.minimum(nearest, ((reference - reference[picked[-1]]) ** 2).sum(1))
        nearest[picked] = -1.0
    return picked


def blobs(rows: int, channels: int, seed: int) -> np.ndarray:
    """Rows in 30 Gaussian clusters of different spreads: features whose cells the kernel can skip."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=10.0, size=(30, channels))
    which = rng.integers(0, 30, rows)
    return (centres[which] + rng.normal(size=(rows, channels)) * rng.uniform(0.2, 2.0, (rows, 1))).astype(np.float32)


@needs_kernel
@pytest.mark.parametrize("channels", [3, 24, 61])
def test_kernel_picks_the_float64_farthest_points_while_skipping_most_rows(channels):
    points = blobs(5003, channels, channels)  # not a whole number of panels of eight
    visits = []
    picked = farthest_points.farthest_points(points, 700, 11, visits=visits)
    assert list(picked) == float64_farthest(points, 700, 11)
    steps, read = visits[-1]
    assert steps == 700 and read / (699 * len(points)) < 0.5  # blocks were skipped: most rows not read in a step


@needs_kernel
def test_kernel_threads_pick_what_one_thread_picks():
    # steps reading 16,384+ rows are cut into equal parts, a block split where a part ends (farthest_kernel.c)
    points = blobs(40001, 8, 4)
    one, two, three = ([] for _ in range(3))
    picked = farthest_points.farthest_points(points, 300, 0, visits=one, threads=1)
    np.testing.assert_array_equal(farthest_points.farthest_points(points, 300, 0, visits=two, threads=2), picked)
    np.testing.assert_array_equal(farthest_points.farthest_points(points, 300, 0, visits=three, threads=3), picked)
    assert one == two == three  # the same rows read, whoever read them
    assert list(picked) == float64_farthest(points, 300, 0)


@needs_kernel
def test_kernel_picks_every_row_once_with_duplicates_and_agrees_with_the_plain_pass():
    rng = np.random.default_rng(2)
    points = np.repeat(rng.normal(size=(50, 5)).astype(np.float32), 3, axis=0)  # every row three times
    picked = farthest_points.farthest_points(points, len(points), 4)
    assert sorted(picked) == list(range(len(points)))
    distinct = farthest_points.farthest_points(points, 50, 4)
    assert len({tuple(points[i]) for i in distinct}) == 50  # duplicates of a chosen row are taken last
    np.testing.assert_array_equal(greedy_coreset(points, 50, start=4, projection=0, compiled=True),
                                  greedy_coreset(points, 50, start=4, projection=0, compiled=False))


@needs_kernel
def test_kernel_takes_one_row_and_refuses_a_start_outside_the_rows():
    points = np.random.default_rng(0).normal(size=(9, 4)).astype(np.float32)
    assert list(farthest_points.farthest_points(points, 1, 8)) == [8]
    with pytest.raises(ValueError, match="start row 9"):
        farthest_points.farthest_points(points, 3, 9)
