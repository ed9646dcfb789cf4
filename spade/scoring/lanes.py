"""Two lanes of half the threads each: independent parts of a CPU search run side by side.

On a small machine one lane of every thread leaves cores idle in each search's single-threaded steps (the running
minimum's numpy work, gathers, map finishing); two lanes run one part's GEMMs beside the other's serial steps.
Measured on 2 cores (benchmarks/lanes.py): calibration 1.25x, scoring 1.19x faster on metal_plate. The parts must be
independent: every result is what one lane would give. Lanes do not nest: work already in a lane runs its parts one
after another with that lane's threads. `each_in_lanes` runs per-image steps the same way (finishing a batch's score
maps, encoding and writing their PNGs: numpy, torch, scipy and Pillow release the GIL in them).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

from spade.scoring.correspondence import configure_threads

Part = TypeVar("Part")
Result = TypeVar("Result")
_LANE = threading.local()  # .active: this thread is a lane


def lanes_for(num_threads: int) -> tuple[int, int]:
    """(lanes, threads each) for ``num_threads`` threads (0: every core): two lanes from two threads on."""
    cores = num_threads if num_threads > 0 else (os.cpu_count() or 1)
    lanes = 2 if cores >= 2 else 1
    return lanes, max(1, cores // lanes)


def halves(count: int, num_threads: int) -> list[slice]:
    """``count`` rows cut into one contiguous slice per lane of ``num_threads`` (`lanes_for`), as equal as can be
    (fewer when rows are fewer)."""
    parts = max(1, min(lanes_for(num_threads)[0], count))
    bounds = [round(i * count / parts) for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


def in_lanes(work: Callable[[Part], Result], parts: Sequence[Part], num_threads: int) -> list[Result]:
    """``[work(part) for part in parts]``, two at a time with half the threads each where `lanes_for` gives two
    lanes and the caller is not itself a lane (torch's and faiss's thread counts set for the lanes, then back to
    ``num_threads``)."""
    lanes, threads = lanes_for(num_threads)
    if lanes == 1 or len(parts) < 2 or getattr(_LANE, "active", False):
        return [work(part) for part in parts]

    def lane(part: Part) -> Result:
        _LANE.active = True
        configure_threads(threads)  # faiss's OpenMP count is the calling thread's own
        return work(part)

    configure_threads(threads)
    try:
        with ThreadPoolExecutor(lanes, thread_name_prefix="lane") as pool:
            return list(pool.map(lane, parts))
    finally:
        configure_threads(num_threads)


def each_in_lanes(work: Callable[[Part], Result], items: Sequence[Part], num_threads: int) -> list[Result]:
    """``[work(item) for item in items]``, the items cut into one contiguous half per lane (`halves`, `in_lanes`)."""
    parts = in_lanes(lambda part: [work(item) for item in items[part]], halves(len(items), num_threads), num_threads)
    return [result for part in parts for result in part]
