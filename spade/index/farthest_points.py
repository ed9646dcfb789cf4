"""Greedy farthest-point selection in one compiled pass that skips the rows a step cannot reach (still exact).

`spade.index.coreset.greedy_coreset` selects coreset banks with it where the optional extension
``spade.index._farthest`` (farthest_kernel.c, built by setup.py) is present, and with torch's plain pass elsewhere.
The selections are the plain pass's up to float32 rounding: each step picks the row farthest from the chosen set.
Measured: benchmarks/coreset_selection.py (benchmarks/README.md).
"""
from __future__ import annotations

import ctypes
import functools
import time
from typing import Callable

import numpy as np
import torch

from spade.index import extension

EXTENSION = "spade.index._farthest"
CHUNK = 64  # steps per call: progress is reported between calls
LANES = 8   # rows the kernel reads to a vector (farthest_kernel.c, W)
MAX_THREADS = 8  # a step's read is bound by memory bandwidth, so more threads would mostly wait (2 measured here)


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    """The built kernel, or None (not built here)."""
    lib = extension.load(EXTENSION)
    if lib is None:
        return None
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.spade_farthest_steps.restype = ctypes.c_int
    lib.spade_farthest_steps.argtypes = [pointer, i64, pointer, pointer, pointer, pointer, i64, ctypes.c_int, pointer,
                                         pointer, i64, i64, i64, i64, pointer, pointer, pointer, pointer, pointer,
                                         pointer, pointer, ctypes.c_int]
    return lib


def available() -> bool:
    return _library() is not None


def farthest_points(rows: np.ndarray | torch.Tensor, n: int, start: int,
                    progress: Callable[[int, int], None] | None = None, every_s: float = 10.0,
                    visits: list | None = None, threads: int = 1) -> np.ndarray:
    """Indices of ``n`` rows of ``rows`` (N, C) in greedy farthest-point order from row ``start``, a step's rows read
    by ``threads`` threads; ``progress(chosen, n)`` every ``every_s`` seconds; ``visits`` (a list) is given (steps
    done, rows read) after each call of the kernel. Needs the built kernel (`available`)."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"{EXTENSION} is not built here: reinstall the package with a C compiler (pip install -e .)")
    total, channels = np.shape(rows)
    n = int(min(max(n, 1), total))
    if not 0 <= start < total:
        raise ValueError(f"start row {start} outside 0 .. {total - 1}")
    kcap = n + LANES
    cap = -(-(total + LANES * (n + 1)) // LANES) * LANES  # every block padded to whole panels of LANES rows
    # panels, in two halves: the kernel re-forms its groups from the half in use into the other
    x = np.zeros((2, cap // LANES, channels, LANES), dtype=np.float32)
    source = rows.numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows, dtype=np.float32)
    whole = total // LANES
    x[0, :whole] = source[:whole * LANES].reshape(whole, LANES, channels).transpose(0, 2, 1)
    x[0, whole, :, :total - whole * LANES] = source[whole * LANES:].T
    del rows, source  # where the caller kept no reference (a projection made for this call), freed here
    pos = np.full((2, cap), -1, dtype=np.int64)
    pos[0, :total] = np.arange(total)
    mind = np.empty((2, cap), dtype=np.float32)
    half = np.zeros(1, dtype=np.int64)
    owner = np.full(cap, -1, dtype=np.int64)
    owner[:total] = 0
    chosen = np.empty(n, dtype=np.int64)
    chosen[0] = start
    centres = np.zeros((channels, kcap), dtype=np.float32)
    blocks, visited = np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64)
    bstart = np.empty(n + 1, dtype=np.int64)
    brad, bmax, dist = np.empty(n, dtype=np.float32), np.empty(n, dtype=np.float32), np.empty(kcap, dtype=np.float32)
    barg = np.empty(n, dtype=np.int64)
    reported = time.monotonic()
    step = 1
    while True:
        stop = min(n, step + CHUNK)
        code = lib.spade_farthest_steps(x.ctypes.data, cap, pos.ctypes.data, mind.ctypes.data, half.ctypes.data,
                                        owner.ctypes.data, total, channels, chosen.ctypes.data, centres.ctypes.data,
                                        kcap, n, step, stop,
                                        blocks.ctypes.data, bstart.ctypes.data, brad.ctypes.data, bmax.ctypes.data,
                                        barg.ctypes.data, dist.ctypes.data, visited.ctypes.data,
                                        max(1, min(threads, MAX_THREADS)))
        if code == -2:
            raise MemoryError(f"farthest-point selection over {total} x {channels} rows could not allocate its scratch")
        if code:
            raise RuntimeError(f"farthest-point selection refused its arguments (code {code})")
        if visits is not None:
            visits.append((stop, float(visited[0])))
        step = stop
        if progress is not None and time.monotonic() - reported >= every_s:
            progress(step, n)
            reported = time.monotonic()
        if step >= n:
            return chosen
