"""The fused nearest-feature fold: the exact correspondence's distance, minimum and runner-up in one compiled pass.

The GEMM search (`spade.scoring.correspondence`) writes every query's value s(g) = |g|^2 - 2 q.g for a block of
gallery vectors and then reduces it; with the pyramid's few channels that matrix's traffic, not the arithmetic,
bounds it. The kernel (nearest_kernel.c, built by setup.py as the optional extension ``spade.index._nearest``)
keeps each tile of values in registers and folds it into the running minimum, its id and the runner-up directly,
in the same float32 arithmetic (dot products of length C in some order), so the winners, the runner-up bound and
the refinement that follows are those of the GEMM search up to rounding, which the refinement already bounds.

`nearest_columns_pruned` runs the same fold over a memory bank packed cluster by cluster, skipping the clusters a
tile of queries cannot win in (`spade.index.bank_clusters`); `cluster_bounds` writes its bounds out for tests.
`fold_bf16` (and `nearest_ids_bf16`) leave the fold's very result while comparing each query in float32 only with the
few columns a bfloat16 screen of every column cannot rule out, where the CPU has AVX512-BF16 (`use_bf16`).

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
SCREEN_LANES = 32    # gallery columns a bfloat16 screen tile (its panel width)
SCREENED_QUERIES = 128  # queries a fold needs to be screened (the screen packs its columns once more)


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
    if hasattr(lib, "spade_fold_bf16"):  # a build from before the screen lacks it: `bf16_available` is then False
        lib.spade_bf16_supported.restype = ctypes.c_int
        lib.spade_fold_bf16.restype = ctypes.c_int
        lib.spade_fold_bf16.argtypes = [pointer, ctypes.c_int64, ctypes.c_int, pointer, pointer, pointer, pointer,
                                        ctypes.c_int64, pointer, pointer, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_float, ctypes.c_float, ctypes.c_int, pointer, pointer, pointer]
    return lib if lib.spade_nearest_supported() else None


def available() -> bool:
    """Whether the fused kernel can run here (built, and the CPU has AVX2 and FMA)."""
    return _library() is not None


def bf16_available() -> bool:
    """Whether the bfloat16 screen can run here (the kernel built, and the CPU has AVX512-BF16)."""
    lib = _library()
    return lib is not None and hasattr(lib, "spade_fold_bf16") and bool(lib.spade_bf16_supported())


def describe(kernel: str) -> str:
    """What the searches of a run with ``search_kernel`` = ``kernel`` use on this machine, and where the kernel is
    missing, why and what to do (for the run log)."""
    if use_fused(kernel):
        screen = ", its searches screened in bfloat16 (AVX512-BF16)" if use_bf16(kernel) else ""
        return f"fused nearest-feature kernel (AVX2+FMA){screen}"
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
    return kernel in ("auto", "float32") and available()


def use_bf16(kernel: str) -> bool:
    """Whether the fused searches of a run with ``search_kernel`` = ``kernel`` are screened in bfloat16 (`fold_bf16`:
    whole memory banks and the exact correspondence; auto: where `bf16_available`; float32 keeps the fused kernel's
    float32 pass over every column)."""
    return use_fused(kernel) and kernel == "auto" and bf16_available()


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


@dataclass(frozen=True)
class Bf16Panels:
    """Gallery vectors as the bfloat16 screen reads them (`fold_bf16`): centred on ``centre`` (C,), their mean (None:
    as they are), rounded to bfloat16, ``packed`` (ceil(N / 32), ceil(C / 2), 32) int32, 32 columns a panel, two
    channels a lane; ``sq`` and ``norm`` their |g|^2 and |g| in float32 (padding: +inf, 0); ``centred_max`` and
    ``plain_max`` the largest |g| centred and as they are (the screen's error bound reads them)."""

    packed: torch.Tensor
    sq: torch.Tensor
    norm: torch.Tensor
    centre: torch.Tensor | None
    centred_max: float
    plain_max: float

    @classmethod
    def of(cls, g: torch.Tensor | np.ndarray, centred: bool = True, g_sq: torch.Tensor | None = None) -> "Bf16Panels":
        """Screen panels of gallery vectors ``g`` (N, C), float32, centred on their mean (a bank searched from fresh
        states) or not (``centred`` False: folded into running states, whose values the screen then compares with;
        ``g_sq`` |g|^2 where already computed)."""
        g = torch.from_numpy(np.array(g, dtype=np.float32)) if isinstance(g, np.ndarray) else g.to(torch.float32)
        n, channels = g.shape
        width, pairs = -(-n // SCREEN_LANES) * SCREEN_LANES, -(-channels // 2)
        halves = torch.zeros((width, 2 * pairs), dtype=torch.bfloat16)
        sq = torch.full((width,), float("inf"), dtype=torch.float32)
        norm = torch.zeros(width, dtype=torch.float32)
        if centred:
            centre = g.mean(dim=0, dtype=torch.float64).to(torch.float32).contiguous()
            moved = g - centre
            sq[:n] = (moved.double() ** 2).sum(1).to(torch.float32)
            plain_sq = (g.double() ** 2).sum(1)
        else:
            centre, moved = None, g
            sq[:n] = (g * g).sum(1) if g_sq is None else g_sq
            plain_sq = sq[:n]
        halves[:n, :channels] = moved
        norm[:n] = sq[:n].sqrt()
        packed = halves.view(torch.int32).view(width // SCREEN_LANES, SCREEN_LANES, pairs).transpose(1, 2).contiguous()
        centred_max = float(norm[:n].max()) if n else 0.0
        plain_max = float(plain_sq.max().sqrt()) if n else 0.0
        return cls(packed, sq, norm, centre, centred_max, plain_max)


def fold(q: torch.Tensor, g: torch.Tensor, g_sq: torch.Tensor, values: torch.Tensor, ids: torch.Tensor,
         first_id: int, threads: int = 1, screened: bool = False) -> None:
    """Fold gallery vectors ``g`` (N, C) with ids first_id.. into the running minimum of queries ``q`` (M, C), all
    float32: ``values`` (M, 2) each query's smallest s(g) = |g|^2 - 2 q.g and the runner-up, ``ids`` (M, 2) int64
    the smallest's id in column 0, updated in place (first column wins ties, as a row minimum does). ``threads``
    > 1 splits the queries among that many threads (the kernel releases the GIL). ``screened``: through the
    bfloat16 screen (`fold_bf16`, the same result) where `use_bf16` allows it and enough queries share the columns
    to repay packing them twice."""
    if len(q) and len(g):
        panels = Panels.of(g, g_sq)
        if screened and len(q) >= SCREENED_QUERIES:
            fold_bf16(q, panels, Bf16Panels.of(g, centred=False, g_sq=g_sq), values, ids, first_id, threads)
        else:
            fold_panels(q, panels, values, ids, first_id, threads)


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


def fold_bf16(q: torch.Tensor | np.ndarray, panels: Panels, screen: Bf16Panels, values: torch.Tensor,
              ids: torch.Tensor, first_id: int, threads: int = 1, runner_up: bool = True) -> tuple[int, int]:
    """`fold_panels`' very result (its float32 values, the first column on ties, the runner-up where ``runner_up``),
    with each query compared in float32 only with the columns a bfloat16 screen of every column cannot rule out;
    returns the columns compared exactly and the queries folded whole instead (their candidates overflowed).

    Why: a search with few channels is bound by its multiply-adds, and AVX512-BF16's dot product does 3.7x the
    float32 rate on this project's CPUs (benchmarks/README, "A bfloat16 screen"). The screen's error bound
    (nearest_kernel.c, spade_fold_bf16) leaves a few columns a query. ``screen`` is `Bf16Panels.of` the vectors
    ``panels`` packs; a centred screen needs fresh states (values +inf)."""
    lib = _required()
    if not bf16_available():
        raise RuntimeError("the bfloat16 screen needs AVX512-BF16, which this CPU lacks; use fold_panels")
    rows, channels = q.shape
    if channels != panels.packed.shape[1] or -(-channels // 2) != screen.packed.shape[1]:
        raise ValueError(f"queries have {channels} channels, the gallery {panels.packed.shape[1]}, its screen "
                         f"{2 * screen.packed.shape[1] - 1} or {2 * screen.packed.shape[1]}")
    for name, tensor in (("values", values), ("ids", ids)):
        if tensor.ndim != 2 or tensor.shape[1] != 2 or not tensor.is_contiguous() or len(tensor) != rows:
            raise ValueError(f"{name} must be a contiguous ({rows}, 2) tensor, got {tuple(tensor.shape)}")
    counts = np.zeros((max(1, rows), 2), dtype=np.int64)  # per span (indexed by its first row): compared, overflowed
    if not rows or not len(panels.sq):
        return 0, 0
    queries = torch.as_tensor(np.ascontiguousarray(q, dtype=np.float32) if isinstance(q, np.ndarray)
                              else q.to(torch.float32).contiguous())
    centre = None if screen.centre is None else screen.centre.data_ptr()

    def part(start: int, stop: int) -> int:
        return lib.spade_fold_bf16(queries[start].data_ptr(), stop - start, channels, centre, screen.packed.data_ptr(),
                                   screen.sq.data_ptr(), screen.norm.data_ptr(), len(screen.sq),
                                   panels.packed.data_ptr(), panels.sq.data_ptr(), len(panels.sq), first_id,
                                   screen.centred_max, screen.plain_max, int(runner_up), values[start].data_ptr(),
                                   ids[start].data_ptr(), counts[start].ctypes.data)

    _in_threads(rows, threads, part)
    return int(counts[:, 0].sum()), int(counts[:, 1].sum())


def nearest_ids_bf16(q: torch.Tensor | np.ndarray, panels: Panels, screen: Bf16Panels,
                     threads: int = 1) -> tuple[np.ndarray, int, int]:
    """`nearest_ids`' very answer screened in bfloat16 (`fold_bf16`): (M,) the nearest columns, the columns compared
    exactly and the queries searched whole instead."""
    values = torch.full((len(q), 2), float("inf"))
    ids = torch.full((len(q), 2), -1, dtype=torch.int64)
    compared, overflowed = fold_bf16(q, panels, screen, values, ids, 0, threads, runner_up=False)
    return ids[:, 0].numpy(), compared, overflowed


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
