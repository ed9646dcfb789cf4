"""The fused nearest-feature fold: the exact correspondence's distance, minimum and runner-up in one compiled pass.

The GEMM search (`spade.scoring.correspondence`) writes every query's value s(g) = |g|^2 - 2 q.g for a block of
gallery vectors and then reduces it; with the pyramid's few channels that matrix's traffic, not the arithmetic,
bounds it. The kernel (nearest_kernel.c, built by setup.py as the optional extension ``spade.index._nearest``)
keeps each tile of values in registers and folds it into the running minimum, its id and the runner-up directly,
in the same float32 arithmetic (dot products of length C in some order), so the winners, the runner-up bound and
the refinement that follows are those of the GEMM search up to rounding, which the refinement already bounds.

`nearest_columns_pruned` runs the same fold over a memory bank packed cluster by cluster, skipping the clusters a
tile of queries cannot win in (`spade.index.bank_clusters`); `cluster_bounds` writes its bounds out for tests.

It runs where the extension was built and the CPU has AVX2 and FMA (`available`); the config's ``search_kernel:
gemm`` keeps the GEMM everywhere. Measured: benchmarks/README.md, "The fused nearest-feature kernel".
"""
from __future__ import annotations

import ctypes
import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from spade.config import SEARCH_KERNELS
from spade.index import extension

EXTENSION = "spade.index._nearest"  # the built kernel (setup.py's optional extension)
LANES = 16           # gallery columns a kernel tile (the panel width)
ROWS = 6             # queries a kernel tile (nearest_kernel.c's ROWS)
COLUMN_BLOCK = 1024  # gallery columns per pass over the queries: 1024 x C floats stay in L2


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    """The built kernel, or None (not built here, or the CPU lacks AVX2/FMA)."""
    lib = extension.load(EXTENSION)
    if lib is None:
        return None
    pointer = ctypes.c_void_p
    lib.spade_nearest_supported.restype = ctypes.c_int
    lib.spade_nearest_fold.restype = ctypes.c_int
    lib.spade_nearest_fold.argtypes = [pointer, ctypes.c_int64, ctypes.c_int, pointer, pointer, ctypes.c_int64,
                                       ctypes.c_int64, pointer, pointer, ctypes.c_int64]
    lib.spade_nearest_pruned.restype = ctypes.c_int
    lib.spade_nearest_pruned.argtypes = [pointer, ctypes.c_int64, ctypes.c_int, pointer, pointer, ctypes.c_int,
                                         pointer, pointer, pointer, ctypes.c_int64, pointer, ctypes.c_float,
                                         ctypes.c_float, ctypes.c_float, pointer, pointer, pointer]
    lib.spade_cluster_bounds.restype = ctypes.c_int
    lib.spade_cluster_bounds.argtypes = [pointer, ctypes.c_int64, ctypes.c_int, ctypes.c_int, pointer, pointer,
                                         ctypes.c_int64, pointer, ctypes.c_float, ctypes.c_float, ctypes.c_float,
                                         pointer, pointer]
    return lib if lib.spade_nearest_supported() else None


def available() -> bool:
    """Whether the fused kernel can run here (built, and the CPU has AVX2 and FMA)."""
    return _library() is not None


def describe(kernel: str) -> str:
    """What the searches of a run with ``search_kernel`` = ``kernel`` use on this machine, and where the kernel is
    missing, why and what to do (for the run log)."""
    if use_fused(kernel):
        return "fused nearest-feature kernel (AVX2+FMA)"
    if kernel == "gemm":
        return "GEMM searches (search_kernel: gemm)"
    if not extension.built(EXTENSION):
        return ("GEMM searches: the fused kernel was not built (no C compiler at install); install one (e.g. gcc) and "
                "run `pip install -e .` again for ~1.5x faster exact scoring")
    return "GEMM searches: this CPU lacks AVX2/FMA for the fused kernel"


def use_fused(kernel: str) -> bool:
    """Whether a search with ``search_kernel`` = ``kernel`` folds with the fused kernel (auto: where `available`)."""
    if kernel not in SEARCH_KERNELS:
        raise ValueError(f"search_kernel must be one of {', '.join(SEARCH_KERNELS)}, got {kernel!r}")
    return kernel == "auto" and available()


@dataclass(frozen=True)
class Panels:
    """Gallery vectors as the kernel reads them: ``packed`` (ceil(N / 16), C, 16), 16 columns a panel, channel by
    channel, and ``sq`` |g|^2 (N,) padded with +inf to the panels' width (padding columns never win)."""

    packed: torch.Tensor
    sq: torch.Tensor

    @classmethod
    def of(cls, g: torch.Tensor | np.ndarray, g_sq: torch.Tensor | None = None) -> "Panels":
        """Pack gallery vectors ``g`` (N, C) (|g|^2 computed where ``g_sq`` is not given; a read-only array, e.g. a
        memory-mapped bank, is only read)."""
        n, channels = g.shape
        width = -(-n // LANES) * LANES
        padded = torch.zeros((width, channels), dtype=torch.float32)
        if isinstance(g, np.ndarray):
            padded.numpy()[:n] = g
        else:
            padded[:n] = g
        sq = torch.full((width,), float("inf"), dtype=torch.float32)
        sq[:n] = (padded[:n] * padded[:n]).sum(1) if g_sq is None else g_sq
        return cls(padded.view(width // LANES, LANES, channels).transpose(1, 2).contiguous(), sq)


def fold(q: torch.Tensor, g: torch.Tensor, g_sq: torch.Tensor, values: torch.Tensor, ids: torch.Tensor,
         first_id: int, threads: int = 1) -> None:
    """Fold gallery vectors ``g`` (N, C) with ids first_id.. into the running minimum of queries ``q`` (M, C), all
    float32: ``values`` (M, 2) each query's smallest s(g) = |g|^2 - 2 q.g and the runner-up, ``ids`` (M, 2) int64
    the smallest's id in column 0, updated in place (first column wins ties, as a row minimum does). ``threads``
    > 1 splits the queries among that many threads (the kernel releases the GIL)."""
    if len(q) and len(g):
        fold_panels(q, Panels.of(g, g_sq), values, ids, first_id, threads)


def _required() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the fused nearest-feature kernel is not available here ({EXTENSION} not built, "
                           "or the CPU lacks AVX2/FMA); use search_kernel: gemm")
    return lib


def _in_threads(rows: int, threads: int, part) -> None:
    """``part(start, stop)`` over ``threads`` spans of ``rows`` queries side by side (the kernel releases the GIL);
    raises where a span's call returned non-zero."""
    bounds = np.linspace(0, rows, max(1, min(threads, rows)) + 1).astype(int)
    spans = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if len(spans) == 1:
        codes = [part(*spans[0])]
    else:
        with ThreadPoolExecutor(len(spans), thread_name_prefix="nearest") as pool:
            codes = list(pool.map(lambda span: part(*span), spans))
    if any(code == -2 for code in codes):
        raise MemoryError("the fused nearest-feature kernel could not allocate its scratch")
    if any(codes):
        raise RuntimeError("the fused nearest-feature kernel refused this CPU (no AVX2/FMA)")


def _times_minus_two(q: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(q, dtype=np.float32) * np.float32(-2.0)) if isinstance(q, np.ndarray) \
        else (q.to(torch.float32) * -2.0).contiguous()


def fold_panels(q: torch.Tensor | np.ndarray, panels: Panels, values: torch.Tensor, ids: torch.Tensor, first_id: int,
                threads: int = 1) -> None:
    """`fold` with the gallery already packed (`Panels.of`), for a gallery searched many times."""
    lib = _required()
    for name, tensor in (("values", values), ("ids", ids)):
        if tensor.ndim != 2 or tensor.shape[1] != 2 or not tensor.is_contiguous() or len(tensor) != len(q):
            raise ValueError(f"{name} must be a contiguous ({len(q)}, 2) tensor, got {tuple(tensor.shape)}")
    rows, channels = q.shape
    if channels != panels.packed.shape[1]:
        raise ValueError(f"queries have {channels} channels, the gallery {panels.packed.shape[1]}")
    if not rows or not len(panels.sq):
        return
    qm2 = _times_minus_two(q)
    packed, sq = panels.packed, panels.sq

    def part(start: int, stop: int) -> int:
        return lib.spade_nearest_fold(qm2[start].data_ptr(), stop - start, channels, packed.data_ptr(), sq.data_ptr(),
                                      sq.shape[0], first_id, values[start].data_ptr(), ids[start].data_ptr(),
                                      COLUMN_BLOCK)

    _in_threads(rows, threads, part)


def nearest_ids(q: torch.Tensor | np.ndarray, panels: Panels, threads: int = 1) -> np.ndarray:
    """(M,) each query's nearest gallery column (by the float32 expansion, first column on ties)."""
    values = torch.full((len(q), 2), float("inf"))
    ids = torch.full((len(q), 2), -1, dtype=torch.int64)
    fold_panels(q, panels, values, ids, 0, threads)
    return ids[:, 0].numpy()


def _padded(radii: np.ndarray, width: int) -> np.ndarray:
    """Cluster radii as float32, padded with 0 to the centroid panels' width (the kernel reads them 8 at a time)."""
    padded = np.zeros(width, dtype=np.float32)
    padded[:len(radii)] = radii
    return padded


def nearest_columns_pruned(q: np.ndarray, panels: Panels, starts: np.ndarray, centroids: Panels, radii: np.ndarray,
                           slack: float, rounding: float, largest_sq: float,
                           threads: int = 1) -> tuple[np.ndarray, float]:
    """(M,) each query's nearest packed column, as `nearest_ids` over all of ``panels`` would find it, and the share of
    the gallery's columns a tile of six queries compared on average (1.0: nothing skipped), in a gallery
    packed cluster by cluster: cluster k is columns ``starts[k]`` .. ``starts[k + 1]`` (multiples of 16), its centroid
    column k of ``centroids`` (packed with |c|^2 (1 - ``slack``)), ``radii`` (K,) float32 no member farther from it.
    The kernel bounds each cluster's values from below by the triangle inequality (``slack``: the centroid distances'
    float32 rounding, ``rounding``: s(g)'s, relative to |q|^2 + ``largest_sq``) and skips, for a tile of six queries,
    every cluster that cannot hold a row's winner (`spade.index.bank_clusters` makes the arguments)."""
    lib = _required()
    rows, channels = q.shape
    clusters = len(starts) - 1
    for name, packed in (("gallery", panels), ("centroids", centroids)):
        if channels != packed.packed.shape[1]:
            raise ValueError(f"queries have {channels} channels, the {name} {packed.packed.shape[1]}")
    if starts[-1] != len(panels.sq) or np.any(np.asarray(starts) % LANES) or len(centroids.sq) < clusters:
        raise ValueError("cluster starts must be multiples of 16 ending at the panels' width, one centroid a cluster")
    if np.shape(radii) != (clusters,):
        raise ValueError(f"radii must be ({clusters},), got {np.shape(radii)}")
    radii = _padded(radii, len(centroids.sq))
    values = torch.full((rows, 2), float("inf"))
    ids = torch.full((rows, 2), -1, dtype=torch.int64)
    if not rows:
        return ids[:, 0].numpy(), 0.0
    qm2 = _times_minus_two(q)
    starts = np.ascontiguousarray(starts, dtype=np.int64)
    packed, sq = panels.packed, panels.sq
    folded = np.zeros(rows, dtype=np.int64)  # a counter per span (indexed by its first row)

    def part(start: int, stop: int) -> int:
        return lib.spade_nearest_pruned(qm2[start].data_ptr(), stop - start, channels, packed.data_ptr(), sq.data_ptr(),
                                        clusters, starts.ctypes.data, centroids.packed.data_ptr(),
                                        centroids.sq.data_ptr(), len(centroids.sq), radii.ctypes.data, slack, rounding,
                                        largest_sq, values[start].data_ptr(), ids[start].data_ptr(),
                                        folded[start:].ctypes.data)

    _in_threads(rows, threads, part)
    return ids[:, 0].numpy(), float(folded.sum()) / (-(-rows // ROWS) * max(1, int(starts[-1])))


def cluster_bounds(q: np.ndarray, centroids: Panels, radii: np.ndarray, slack: float, rounding: float,
                   largest_sq: float) -> tuple[np.ndarray, np.ndarray]:
    """The bounds `nearest_columns_pruned` skips clusters by, written out: (M, K) lower bounds on s(g) over each
    cluster's members and (M,) each query's nearest-centroid cluster (for tests and measurements)."""
    lib = _required()
    clusters = len(radii)
    radii = _padded(radii, len(centroids.sq))
    rows, channels = q.shape
    out = np.empty((rows, clusters), dtype=np.float32)
    first = np.empty(rows, dtype=np.int64)
    if rows:
        qm2 = _times_minus_two(q)
        code = lib.spade_cluster_bounds(qm2.data_ptr(), rows, channels, clusters, centroids.packed.data_ptr(),
                                        centroids.sq.data_ptr(), len(centroids.sq), radii.ctypes.data, slack, rounding,
                                        largest_sq, out.ctypes.data, first.ctypes.data)
        if code:
            raise RuntimeError("the fused nearest-feature kernel refused this CPU (no AVX2/FMA) or ran out of memory")
    return out, first
