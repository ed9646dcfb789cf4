"""Pixel-level correspondence: each test position's distance to its kappa closest gallery features at ANY position.

The exact kernel is a blocked GEMM with the expansion |q - g|^2 = |q|^2 - 2 q.g + |g|^2:

* ``-2 q.g^T + |g|^2`` is one ``addmm`` into a preallocated, cache-sized output
  block, followed by a running row minimum (``torch.amin`` over the block; the
  winner's index only for rows the block improves); |q|^2 is constant per row and
  never enters the search. Where the compiled kernel runs (`spade.index.fused_nearest`, the config's
  ``search_kernel: auto``; kappa 1) the same values are folded into the running minimum and runner-up tile by
  tile in registers instead, never written out: the GEMM's output, not its arithmetic, bounds this search at the
  pyramid's few channels;
* the winners' distances are then recomputed directly as |q - g*| (O(Q x C)),
  so float32 cancellation in the expansion cannot leak into the scores;
* queries and gallery are centred on a point amid the features (a fixed gallery row's
  mean): distances are unchanged, the expansion's rounding error shrinks with the norms;
* the winner itself may still be wrong when candidates lie within the expansion's
  rounding noise of each other (near-tied features); the search also keeps the
  runner-up value, and queries whose error could exceed REFINE_TOLERANCE are searched
  again in float64 centred on their own mean (`_refine_flags`, `_refine_search`): a rounding
  bound 2^29 times smaller, on smaller norms; the few still unsettled get every candidate
  within the rounding band of the farthest winner computed directly (`_refine_band`);
* `batch_layer_distances` scores several test images at once: gallery images
  shared by several test images' neighbour sets are read once and multiplied
  against all those images' queries in one GEMM (each test image is still
  compared with exactly its own K neighbours);
* gallery rows are read with ``pread`` into one reused buffer, so scoring never
  holds more than a few gallery images' features whatever the gallery size.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch

from spade.index import fused_nearest
from spade.index.pyramid import pread_exactly

GALLERY_BLOCK = 4096
COLUMN_BLOCK = 1024      # gallery vectors per GEMM block
QUERY_BLOCK = 2048       # query rows per GEMM block; the output block (2048 x 1024 floats, 8 MB) stays in L3
READ_POSITIONS = 4096    # gallery positions read (pread) per chunk
BAND_SEGMENT = 128      # columns screened together by their minimum in the refinement's band search
REFINE_TOLERANCE = 1e-6  # largest error of a reported distance that the float32 search may leave unrefined
EPS32 = 2.0 ** -24       # unit roundoff of float32
EPS64 = 2.0 ** -53       # unit roundoff of float64


def configure_threads(num_threads: int = 0) -> int:
    """Set torch's and faiss's thread counts to one deliberate value (0: all cores) and return it.

    Both libraries default to every core; two thread pools (or two workers) each
    using every core oversubscribe a small machine.
    """
    n = num_threads if num_threads and num_threads > 0 else (os.cpu_count() or 1)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except ImportError:  # pragma: no cover - faiss is a hard dependency of the project
        pass
    return n


def _float_tensor(values: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.to(torch.float32).contiguous()
    array = np.asarray(values, dtype=np.float32)
    if not (array.flags.writeable and array.flags.c_contiguous):
        array = np.array(array, dtype=np.float32, order="C")
    return torch.from_numpy(array)


class _RunningMin:
    """Per-query running minimum of ``-2 q.g + |g|^2`` (the kappa smallest) and the winning gallery ids.

    With ``gap`` one more candidate is tracked: the (kappa+1)-th smallest computed
    value, which bounds from below every candidate the search did not pick (see
    `_refine_flags`). For kappa == 1 it is kept in ``values[:, 1]`` (``ids[:, 1]``
    unused); for kappa > 1 the kappa + 1 smallest are kept unsorted (`winners` sorts).
    """

    def __init__(self, rows: int, kappa: int, gap: bool = False, dtype: torch.dtype = torch.float32):
        self.kappa = kappa
        self.gap = gap
        width = kappa + 1 if gap else kappa
        self.values = torch.full((rows, width), float("inf"), dtype=dtype)
        self.ids = torch.full((rows, width), -1, dtype=torch.int64)

    def take(self, index: torch.Tensor) -> "_RunningMin":
        """The running minimum of rows ``index`` (a copy; `put` writes it back)."""
        part = _RunningMin(0, self.kappa, self.gap, self.values.dtype)
        part.values, part.ids = self.values.index_select(0, index), self.ids.index_select(0, index)
        return part

    def put(self, index: torch.Tensor, part: "_RunningMin") -> None:
        self.values.index_copy_(0, index, part.values)
        self.ids.index_copy_(0, index, part.ids)

    def update(self, sl: slice, block: torch.Tensor, first_id: int) -> None:
        values, ids = self.values[sl], self.ids[sl]
        if self.kappa == 1:
            # torch.min(dim) with indices is several times slower than amin; the winner's index is
            # only needed for rows this block improves (fewer and fewer as the search proceeds)
            vals = torch.amin(block, dim=1).numpy()
            cur_v, cur_i = values.numpy()[:, 0], ids.numpy()[:, 0]
            better = vals < cur_v
            if self.gap:
                # second smallest: rows not improved compete with the block minimum; improved rows
                # with the old minimum and (below) the block's own second smallest
                sec = values.numpy()[:, 1]
                np.minimum(sec, np.where(better, cur_v, vals), out=sec)
            if better.all():
                improved = np.arange(len(better))
            elif better.any():
                improved = np.flatnonzero(better)
            else:
                return
            data = block.numpy()
            rows = data[improved] if len(improved) < len(better) else data
            arg = rows.argmin(axis=1)
            if self.gap and data.shape[1] > 1:
                # block second minimum without topk (several times slower): mask the winner, amin again
                r = np.arange(len(arg))
                won = rows[r, arg].copy()
                rows[r, arg] = np.inf
                sec[improved] = np.minimum(sec[improved], torch.amin(torch.from_numpy(rows), dim=1).numpy())
                rows[r, arg] = won
            cur_i[improved] = arg + first_id
            cur_v[improved] = vals[improved]
            return
        k = min(values.shape[1], block.shape[1])
        vals, idx = torch.topk(block, k, dim=1, largest=False, sorted=False)
        merged_v, pick = torch.topk(torch.cat([values, vals], dim=1), values.shape[1], dim=1, largest=False, sorted=False)
        merged_i = torch.cat([ids, idx + first_id], dim=1).gather(1, pick)
        values.copy_(merged_v)
        ids.copy_(merged_i)

    def winners(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(values (M, kappa), ids (M, kappa), next value (M,) or None): the kappa winners and, with ``gap``,
        the smallest computed value among the candidates not picked (inf if there are none)."""
        if not self.gap:
            return self.values, self.ids, None
        if self.kappa == 1:
            return self.values[:, :1], self.ids[:, :1], self.values[:, 1]
        values, order = torch.sort(self.values, dim=1)
        ids = self.ids.gather(1, order)
        return values[:, :self.kappa], ids[:, :self.kappa].contiguous(), values[:, self.kappa]


def _search_block(q: torch.Tensor, g: torch.Tensor, g_sq: torch.Tensor, best: _RunningMin, first_id: int,
                  buf: torch.Tensor, query_block: int = QUERY_BLOCK, column_block: int = COLUMN_BLOCK,
                  fused: bool = False, screened: bool = False) -> None:
    """Fold gallery vectors ``g`` (N, C) with ids first_id.. into the running minimum ``best`` of queries ``q``
    (M, C), row for row: with ``fused`` (kappa 1 with its runner-up, float32) in one pass of the compiled kernel
    (`spade.index.fused_nearest`; ``screened``: through its bfloat16 screen, the same result), else by blocks of
    GEMM output and their row minima."""
    if fused and best.kappa == 1 and best.gap and q.dtype == torch.float32 and len(q):
        fused_nearest.fold(q, g, g_sq, best.values, best.ids, first_id, threads=torch.get_num_threads(),
                           screened=screened)
        return
    n_blocks = -(-g.shape[0] // column_block)
    column_block = -(-g.shape[0] // n_blocks)  # even blocks: no thin remainder GEMM
    for c0 in range(0, g.shape[0], column_block):
        gb = g[c0:c0 + column_block]
        nb = gb.shape[0]
        gt = gb.T
        bias = g_sq[c0:c0 + nb].unsqueeze(0)
        for r0 in range(0, q.shape[0], query_block):
            qb = q[r0:r0 + query_block]
            out = buf[:qb.shape[0] * nb].view(qb.shape[0], nb)
            torch.addmm(bias, qb, gt, beta=1.0, alpha=-2.0, out=out)
            best.update(slice(r0, r0 + qb.shape[0]), out, first_id + c0)


def _winner_distances(q: torch.Tensor, winners: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """|q - winner| in float64 by direct subtraction: q (M, C), winners (M, kappa, C) -> (M, kappa) float64."""
    out = torch.empty(winners.shape[:2], dtype=torch.float64)
    for r0 in range(0, q.shape[0], rows):
        diff = winners[r0:r0 + rows].double() - q[r0:r0 + rows].double().unsqueeze(1)
        out[r0:r0 + rows] = torch.linalg.vector_norm(diff, dim=2)
    return out


def _noise(q_norm: torch.Tensor, reach: torch.Tensor, channels: int, unit: float = EPS32) -> torch.Tensor:
    """Bound on the rounding error of a computed s(g) = fl(|g|^2 - 2 q.g) for any candidate with |g| <= reach.

    Dot products of length C in the search's precision (any summation order, FMA or not), then one addition:
        |s(g) - (|g|^2 - 2 q.g)| <= (gamma_C + u) (|g|^2 + 2 |q| |g|) <= 1.1 (C + 2) u (R^2 + 2 |q| R)
    (u = ``unit``: 2^-24 in float32, 2^-53 in float64; the 10 % margin covers gamma_C's 1/(1 - Cu)).
    Measured errors reach a few % of this worst case, so the bound is conservative.
    """
    return 1.1 * (channels + 2) * unit * (reach * reach + 2.0 * q_norm * reach)


def _refine_flags(q: torch.Tensor, dist: torch.Tensor, next_value: torch.Tensor,
                  tolerance: float = REFINE_TOLERANCE, unit: float = EPS32) -> np.ndarray:
    """Queries whose search may have picked winners more than ``tolerance`` too far (mean distance).

    ``q`` (M, C) are the queries as searched (centred; float32, or float64 with ``unit`` = `EPS64`), ``dist``
    (M, kappa) the winners' exact distances,
    ``next_value`` (M,) the (kappa+1)-th smallest computed value s(g) of the search.

    Only a candidate g closer than the farthest winner (|q - g| < D = max_w d_w) can improve the mean, and such a
    g has |g| < R = |q| + D, so its computed value is off by at most n = `_noise` (|q|, R). Every candidate the
    search did not pick has s(g) >= s_next, so if it is within R its true squared distance (to the searched,
    centred vectors) is >= L = |q|^2 + s_next - n. Centring rounded each coordinate once (relative error u),
    which moves a distance by at most u (|q| + |g|) <= u (2|q| + D). Swapping a winner for a better unpicked
    candidate therefore gains at most D - sqrt(max(L, 0)) + u (2|q| + D); flag where that can exceed
    ``tolerance``. (Without the runner-up only the winner's own value bounds the rest and nearly every query
    is flagged; centring shrinks |q| and R, hence n, by an order of magnitude.)
    """
    q64 = q.double()
    q_norm = (q64 * q64).sum(1).sqrt()
    far = dist.max(dim=1).values
    noise = _noise(q_norm, q_norm + far, q.shape[1], unit)
    lower = (q_norm * q_norm + next_value.double() - noise).clamp_min(0.0).sqrt() - unit * (2.0 * q_norm + far)
    return (lower < far - tolerance).numpy()


def _band_limits(q: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """Per query, the largest computed s(g) a candidate can have if its true distance is <= the farthest winner's.

    True distance <= D means distance <= D' = D + u (2|q| + D) between the centred, rounded vectors, hence
    |q|^2 + (|g|^2 - 2 q.g) <= D'^2 and s(g) <= D'^2 - |q|^2 + n (|q|, |q| + D') (see `_refine_flags`).
    Returned in float32, rounded up, to compare with float32 GEMM output.
    """
    q64 = q.double()
    q_sq = (q64 * q64).sum(1)
    q_norm = q_sq.sqrt()
    far = dist.max(dim=1).values
    far = far + EPS32 * (2.0 * q_norm + far)
    limit = far * far - q_sq + _noise(q_norm, q_norm + far, q.shape[1])
    limit = limit + 4.0 * EPS32 * (limit.abs() + q_sq + far * far)  # float64 -> float32 and this sum's own rounding
    return limit.float()


def _merge_smallest(best: np.ndarray, query: np.ndarray, dist: np.ndarray) -> None:
    """Fold (query index, distance) pairs into ``best`` (M, kappa), each row's kappa smallest distances so far."""
    kappa = best.shape[1]
    all_q = np.concatenate([np.repeat(np.arange(len(best)), kappa), query])
    all_d = np.concatenate([best.reshape(-1), dist])
    order = np.lexsort((all_d, all_q))
    sorted_q = all_q[order]
    first = np.searchsorted(sorted_q, sorted_q, side="left")
    rank = np.arange(len(order)) - first
    keep = rank < kappa
    best[sorted_q[keep], rank[keep]] = all_d[order][keep]


def _pair_distances(q: np.ndarray, q_rows: np.ndarray, g: np.ndarray, g_rows: np.ndarray) -> np.ndarray:
    """|q[q_rows] - g[g_rows]| in float64 (float32 inputs, so the differences are exact)."""
    diff = np.take(g, g_rows, axis=0).astype(np.float64)
    diff -= np.take(q, q_rows, axis=0)
    return np.sqrt(np.einsum("ij,ij->i", diff, diff))


def _band_members(out: torch.Tensor, limit: np.ndarray, segment: int = BAND_SEGMENT) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of the entries of ``out`` (m, n) at or below their row's ``limit`` (m,).

    Bands are sparse (a few members per row), so segments of ``segment`` columns are
    screened by their minimum first (one multi-threaded ``torch.amin`` pass) and only hit
    segments are compared entry by entry.
    """
    rows, width = out.shape
    whole = width - width % segment
    parts = []
    if whole:
        parts.append(torch.amin(out[:, :whole].view(rows, whole // segment, segment), dim=2))
    if whole < width:
        parts.append(torch.amin(out[:, whole:], dim=1, keepdim=True))
    seg_min = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)).numpy()
    row, seg = np.divmod(np.flatnonzero(seg_min <= limit[:, None]), seg_min.shape[1])
    cols = (seg * segment)[:, None] + np.arange(segment)
    inside = cols < width
    values = np.take(out.numpy().reshape(-1), row[:, None] * width + np.minimum(cols, width - 1))
    hit_r, hit_c = np.nonzero((values <= limit[row][:, None]) & inside)
    return row[hit_r], cols[hit_r, hit_c]


def _refine_band(q: torch.Tensor, qc: torch.Tensor, dist: torch.Tensor, centre: torch.Tensor, chunks,
                 pair_block: int = 1 << 16) -> torch.Tensor:
    """Exact distances (M, kappa) float64 to the kappa nearest candidates of flagged queries.

    ``q`` (M, C) the queries, ``qc`` the same centred as searched, ``dist`` (M, kappa) the float32 search's
    winners' exact distances; ``chunks`` yields (g (n, C) float32, slots): gallery vectors and the queries
    (an int64 index tensor into ``q``, or None for all) compared with them. Every candidate whose true distance
    is at most the farthest winner's lies in the band s(g) <= `_band_limits` of a float32 search (the same
    GEMM as the main search, on these few queries only); the band's distances are computed directly (|q - g|
    in float64) and the kappa smallest kept. Near-ties are thus settled exactly at float32 speed.
    """
    kappa = dist.shape[1]
    limits = _band_limits(qc, dist).numpy()
    best = np.full((q.shape[0], kappa), np.inf)
    q_np, qc_np = q.numpy(), qc.numpy()  # numpy gathers (np.take) are several times faster than tensor indexing here
    found_q: list[np.ndarray] = []
    found_d: list[np.ndarray] = []
    pending = 0
    buf = torch.empty(QUERY_BLOCK * COLUMN_BLOCK)  # reused: a fresh output per call costs page faults
    for g, slots in chunks:
        g_np = g.numpy()
        gc = g - centre
        g_sq = (gc * gc).sum(1)
        gt = gc.T
        count = q.shape[0] if slots is None else len(slots)
        step = max(1, len(buf) // max(1, g.shape[0]))
        for r0 in range(0, count, step):
            rows = np.arange(r0, min(r0 + step, count)) if slots is None else slots[r0:r0 + step].numpy()
            out = buf[:len(rows) * g.shape[0]].view(len(rows), g.shape[0])
            torch.addmm(g_sq, torch.from_numpy(np.take(qc_np, rows, axis=0)), gt, beta=1.0, alpha=-2.0, out=out)
            qi, gi = _band_members(out, limits[rows])
            for p0 in range(0, len(qi), pair_block):
                qs = rows[qi[p0:p0 + pair_block]]
                found_q.append(qs)
                found_d.append(_pair_distances(q_np, qs, g_np, gi[p0:p0 + pair_block]))
                pending += len(qs)
                if pending > pair_block:
                    _merge_smallest(best, np.concatenate(found_q), np.concatenate(found_d))
                    found_q, found_d, pending = [], [], 0
    if found_q:
        _merge_smallest(best, np.concatenate(found_q), np.concatenate(found_d))
    result = torch.from_numpy(best)
    missing = torch.isinf(result)
    if missing.any():  # cannot happen while the rounding bound holds; keep the float32 search's winners then
        result[missing] = dist[missing]
    return result


def _search64(q: torch.Tensor, centre: torch.Tensor, kappa: int, chunks) -> _RunningMin:
    """The kappa nearest candidates (and the runner-up) of queries ``q`` (M, C) by the expansion in float64,
    everything centred on ``centre`` (C,) float64; ``chunks`` as in `_refine_search`, for these queries."""
    q64 = q.double() - centre
    best = _RunningMin(q.shape[0], kappa, gap=True, dtype=torch.float64)
    query_block = QUERY_BLOCK // 2  # float64 output blocks of the float32 search's size
    budget = query_block * COLUMN_BLOCK  # output elements of a block, however few the queries
    buf = torch.empty(budget, dtype=torch.float64)  # pages are touched only as far as a block reaches
    for g, slots, first_id in chunks:
        # few queries (the flagged are a fraction of a percent) take a whole chunk in one block: one GEMM and one
        # running-minimum update per gallery row instead of one per COLUMN_BLOCK columns
        rows = q.shape[0] if slots is None else len(slots)
        if not rows:
            continue
        columns = max(COLUMN_BLOCK, budget // min(rows, query_block))
        gc = g.double() - centre
        g_sq = (gc * gc).sum(1)
        if slots is None:
            _search_block(q64, gc, g_sq, best, first_id, buf, query_block=query_block, column_block=columns)
        else:
            part = best.take(slots)
            _search_block(q64.index_select(0, slots), gc, g_sq, part, first_id, buf, query_block=query_block,
                          column_block=columns)
            best.put(slots, part)
    return best


def _refine_search(q: torch.Tensor, qc: torch.Tensor, centre: torch.Tensor, kappa: int,
                   chunks: Callable, gather: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Exact distances (M, kappa) float64 to the kappa nearest candidates of queries the float32 search flagged.

    ``q`` (M, C) the queries, ``qc`` the same centred on ``centre`` as searched in float32. ``chunks(subset)``
    yields (g (n, C) float32, slots, first id): gallery vectors with ids first id.., and the queries of
    ``subset`` (an index array into ``q``) compared with them (an int64 index tensor into the subset, or None
    for all of it); ``gather(ids)`` returns the gallery vectors (..., C) of ids.

    The queries are searched again with the same expansion in float64, whose rounding bound is 2^29 times
    the float32 one's, centred on their own mean: the bound also grows with the centred norms, and flagged
    queries are mostly near-duplicates of gallery features far from the float32 search's centre, close to
    one another (a flat background). `_refine_flags` settles nearly all of them; those it does not are
    searched once more around their own mean, and what is left goes to `_refine_band`. Measured on MVTec
    bottle's layer 1 (a fifth of the positions flagged): 16 of 7,121 flagged positions needed the second
    pass (2,744 when the first was centred as the float32 search), none the band search.
    """
    each = torch.empty((q.shape[0], kappa), dtype=torch.float64)
    todo = np.arange(q.shape[0])
    centre64 = q.double().mean(dim=0)
    for _ in range(2):
        part = q.index_select(0, torch.from_numpy(todo))
        best = _search64(part, centre64, kappa, chunks(todo))
        _, ids, next_value = best.winners()
        found = _winner_distances(part, gather(ids))
        each[torch.from_numpy(todo)] = found
        unsettled = _refine_flags(part.double() - centre64, found, next_value, unit=EPS64)
        todo = todo[unsettled]
        if not len(todo):
            return each
        centre64 = q.index_select(0, torch.from_numpy(todo)).double().mean(dim=0)
    index = torch.from_numpy(todo)
    each[index] = _refine_band(q.index_select(0, index), qc.index_select(0, index), each.index_select(0, index),
                               centre, ((g, slots) for g, slots, _ in chunks(todo)))
    return each


def centre_of(rows: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A point amid the features (their mean, float32) to centre the search on.

    Distances do not change under translation, but the float32 expansion's rounding
    error grows with the vectors' norms; CNN features (after ReLU) sit far from the
    origin and close to each other, so centring cuts that error by an order of magnitude.
    """
    rows = torch.as_tensor(np.asarray(rows) if not isinstance(rows, torch.Tensor) else rows)
    return rows.reshape(-1, rows.shape[-1]).double().mean(dim=0).float()


def nearest_feature_distances(queries: np.ndarray | torch.Tensor, gallery: np.ndarray | torch.Tensor, kappa: int = 1,
                              block: int = GALLERY_BLOCK, exact: bool = True, kernel: str = "auto") -> np.ndarray:
    """Mean Euclidean distance from each query row (Q, C) to its ``kappa`` nearest gallery rows (G, C).

    Blocked ``addmm`` search (memory O(query block x column block)); with ``exact``
    the winners' distances are recomputed as |q - g| instead of taken from the
    expansion. ``block`` bounds the gallery rows per GEMM column block. ``kernel``: the search's inner loop
    (`spade.index.fused_nearest.use_fused`: auto, the fused kernel where it runs, screened in bfloat16 where the CPU
    has AVX512-BF16; float32; gemm).
    """
    q = _float_tensor(queries)
    g = _float_tensor(gallery)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"queries (Q, C) and gallery (G, C) must share C; got {tuple(q.shape)} and {tuple(g.shape)}")
    if kappa > g.shape[0]:
        raise ValueError(f"kappa={kappa} exceeds the {g.shape[0]} gallery features")
    column_block = max(1, min(block, COLUMN_BLOCK))
    with torch.inference_mode():
        centre = centre_of(g)
        qc, gc = q - centre, g - centre
        best = _RunningMin(q.shape[0], kappa, gap=exact)
        buf = torch.empty(min(q.shape[0], QUERY_BLOCK) * min(g.shape[0], column_block))
        g_sq = (gc * gc).sum(1)
        _search_block(qc, gc, g_sq, best, 0, buf, column_block=column_block, fused=fused_nearest.use_fused(kernel),
                      screened=fused_nearest.use_bf16(kernel))
        values, ids, next_value = best.winners()
        if exact:
            each = _winner_distances(q, g[ids])
            flagged = np.flatnonzero(_refine_flags(qc, each, next_value))
            if len(flagged):
                index = torch.from_numpy(flagged)

                def chunks(_subset):
                    return ((g[c0:c0 + READ_POSITIONS], None, c0) for c0 in range(0, g.shape[0], READ_POSITIONS))

                each[index] = _refine_search(q.index_select(0, index), qc.index_select(0, index), centre, kappa,
                                             chunks, lambda ids: g[ids])
            dist = each.mean(dim=1).float()
        else:
            dist = (values + (qc * qc).sum(1, keepdim=True)).clamp_min_(0.0).sqrt_().mean(dim=1)
    return dist.numpy()


def layer_distance_map(test_map: np.ndarray, gallery_positions: np.ndarray, kappa: int = 1) -> np.ndarray:
    """Distance map (H, W) of one test layer map (C, H, W) against gallery features (N, C) from all
    positions of the K nearest normal images."""
    channels, height, width = test_map.shape
    queries = np.ascontiguousarray(test_map.reshape(channels, height * width).T)
    return nearest_feature_distances(queries, gallery_positions, kappa).reshape(height, width)


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) index ranges of ``rows`` that hold consecutive values (one read or one id range each)."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    bounds = [0, *breaks.tolist(), len(rows)]
    return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1) if bounds[i] < bounds[i + 1]]


def _row_users(rows: np.ndarray, neighbours: np.ndarray, images) -> np.ndarray:
    """(len(rows), B) bool: which of the test ``images`` have each sorted gallery row among their neighbours."""
    users = np.zeros((len(rows), int(neighbours.shape[0])), dtype=bool)
    for i in images:
        users[np.searchsorted(rows, neighbours[i]), i] = True
    return users


class PyramidReader:
    """Reads gallery rows (images) of one pyramid layer (N, P, C) into a caller's float32 buffer.

    A ``.npy`` memory map is read with ``pread`` from its file (page cache -> buffer,
    nothing stays mapped, so resident memory does not grow with the rows touched); an object with
    ``read_rows(rows, out)`` (`spade.index.pyramid.ShardedLayer`) reads itself; any other array is
    gathered with ``np.take``.
    """

    def __init__(self, array: np.ndarray):
        self.array = array
        self.positions, self.channels = int(array.shape[1]), int(array.shape[2])
        self.fd = None
        filename = getattr(array, "filename", None)
        if isinstance(array, np.memmap) and filename and array.flags.c_contiguous and os.path.exists(filename):
            base = array
            while isinstance(base.base, np.memmap):
                base = base.base
            if base.shape == array.shape:  # the whole file's array, not a slice of it
                self.fd = os.open(filename, os.O_RDONLY)
                self.offset = int(array.offset)
                self.row_bytes = self.positions * self.channels * array.dtype.itemsize

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "PyramidReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Rows ``rows`` into ``out[:len(rows)]`` ((n, P, C) float32); returns that view."""
        if hasattr(self.array, "read_rows"):  # a sharded gallery pyramid reads its own files
            return self.array.read_rows(rows, out)
        target = out[:len(rows)]
        if self.fd is None:
            if self.array.dtype == np.float32:
                np.take(self.array, rows, axis=0, out=target)
            else:
                target[...] = self.array[rows]
            return target
        raw = target if self.array.dtype == np.float32 else np.empty((len(rows), self.positions, self.channels), self.array.dtype)
        for start, stop in _runs(rows):  # one pread per run of consecutive rows
            pread_exactly(self.fd, raw[start:stop], self.offset + int(rows[start]) * self.row_bytes, self.array.filename)
        if raw is not target:
            target[...] = raw
        return target


def batch_layer_distances(queries: np.ndarray | torch.Tensor, pyramid: np.ndarray, neighbours: np.ndarray, kappa: int = 1,
                          exact: bool = True, read_positions: int = READ_POSITIONS,
                          on_chunk: Callable[[int], None] | None = None, refine: bool = True,
                          kernel: str = "auto") -> np.ndarray:
    """Distances (B, P) of B test images' positions (B, P, C) to the kappa nearest features among ALL positions of
    each image's own neighbour rows ``neighbours[i]`` of ``pyramid`` (N, Pg, C).

    Gallery rows are grouped by the set of test images that use them; each group's
    rows are read once and searched with the concatenated queries of those images. ``kernel``: the search's inner
    loop (`spade.index.fused_nearest.use_fused`).
    """
    q_all = _float_tensor(queries)
    if q_all.ndim != 3:
        raise ValueError(f"queries must be (B, P, C), got {tuple(q_all.shape)}")
    batch, positions, channels = q_all.shape
    neighbours = np.asarray(neighbours, dtype=np.int64).reshape(batch, -1)
    if pyramid.ndim != 3 or pyramid.shape[2] != channels:
        raise ValueError(f"gallery pyramid (N, P, C={channels}) expected, got {pyramid.shape}")
    per_row = pyramid.shape[1]
    if kappa > neighbours.shape[1] * per_row:
        raise ValueError(f"kappa={kappa} exceeds the {neighbours.shape[1] * per_row} neighbour features")
    rows = np.unique(neighbours)
    members = _row_users(rows, neighbours, range(batch))
    groups: dict[bytes, list[int]] = {}
    for j, key in enumerate(np.packbits(members, axis=1)):
        groups.setdefault(key.tobytes(), []).append(j)
    rows_per_read = max(1, read_positions // per_row)
    buffer = np.empty((min(rows_per_read, len(rows)), per_row, channels), dtype=np.float32)
    flat = q_all.reshape(batch * positions, channels)
    best = _RunningMin(batch * positions, kappa, gap=exact and refine)
    fused, screened = fused_nearest.use_fused(kernel), fused_nearest.use_bf16(kernel)
    with torch.inference_mode(), PyramidReader(pyramid) as reader:
        # centre on a fixed gallery row's mean: the same for every batch, so results do not depend on batching
        centre = centre_of(reader.read(np.zeros(1, dtype=np.int64), buffer))
        q_centred = q_all - centre
        flat_centred = q_centred.reshape(batch * positions, channels)
        gemm_buf = torch.empty(min(batch * positions, QUERY_BLOCK) * COLUMN_BLOCK)
        for group in groups.values():
            images = np.flatnonzero(members[group[0]])
            if len(images) == batch:
                q, local = flat_centred, best
            else:
                q = q_centred.index_select(0, torch.from_numpy(images)).reshape(-1, channels)
                slots = torch.from_numpy((images[:, None] * positions + np.arange(positions)).reshape(-1))
                local = best.take(slots)
            group_rows = rows[group]
            for r0 in range(0, len(group_rows), rows_per_read):
                chunk_rows = group_rows[r0:r0 + rows_per_read]
                chunk = reader.read(chunk_rows, buffer)
                g = torch.from_numpy(chunk).reshape(-1, channels)
                g -= centre
                g_sq = (g * g).sum(1)
                # ids: gallery row * per_row + position, valid within a run of consecutive rows
                for start, stop in _runs(chunk_rows):
                    sl = slice(start * per_row, stop * per_row)
                    _search_block(q, g[sl], g_sq[sl], local, int(chunk_rows[start]) * per_row, gemm_buf, fused=fused,
                                  screened=screened)
                if on_chunk is not None:
                    on_chunk(len(chunk_rows))
            if local is not best:
                best.put(slots, local)
        values, ids, next_value = best.winners()
        if exact:
            ids = ids.numpy()
            winners = _gather_positions(reader, pyramid, ids // per_row, ids % per_row)
            each = _winner_distances(flat, torch.from_numpy(winners))
            del winners
            flagged = _refine_flags(flat_centred, each, next_value) if refine else np.zeros(0, dtype=bool)
            if flagged.any():  # float64 search of the flagged queries; each gallery row is read once per pass
                index = torch.from_numpy(np.flatnonzero(flagged))
                image_of = index.numpy() // positions

                def chunks(subset):
                    return _refine_chunks(reader, neighbours, image_of[subset], buffer, per_row)

                def gather(ids):
                    ids = ids.numpy()
                    return torch.from_numpy(_gather_positions(reader, pyramid, ids // per_row, ids % per_row))

                each[index] = _refine_search(flat.index_select(0, index), flat_centred.index_select(0, index), centre,
                                             kappa, chunks, gather)
            dist = each.mean(dim=1).float()
        else:
            dist = (values + (flat_centred * flat_centred).sum(1, keepdim=True)).clamp_min_(0.0).sqrt_().mean(dim=1)
    return dist.numpy().reshape(batch, positions)


def _refine_chunks(reader: PyramidReader, neighbours: np.ndarray, image_of: np.ndarray, buffer: np.ndarray,
                   per_row: int):
    """For `_refine_search`: each gallery row used by an image in ``image_of`` (the test image of each flagged
    query), read once, as (features (P, C) float32, the flagged queries whose image has the row among its
    neighbours, the id of the row's first position)."""
    channels = reader.channels
    images = np.unique(image_of)
    rows = np.unique(neighbours[images])
    users = _row_users(rows, neighbours, images)
    for r0 in range(0, len(rows), len(buffer)):
        chunk_rows = rows[r0:r0 + len(buffer)]
        chunk = reader.read(chunk_rows, buffer)
        for j in range(len(chunk_rows)):
            slots = np.flatnonzero(users[r0 + j][image_of])
            yield torch.from_numpy(chunk[j]).reshape(-1, channels), torch.from_numpy(slots), int(chunk_rows[j]) * per_row


def _gather_positions(reader: PyramidReader, pyramid: np.ndarray, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Feature vectors pyramid[rows, positions] (any shape of ids) -> (..., C) float32, one gallery row at a time."""
    out = np.empty(rows.shape + (pyramid.shape[2],), dtype=np.float32)
    flat_rows, flat_pos, flat_out = rows.reshape(-1), positions.reshape(-1), out.reshape(-1, pyramid.shape[2])
    order = np.argsort(flat_rows, kind="stable")
    sorted_rows = flat_rows[order]
    bounds = np.flatnonzero(np.diff(sorted_rows)) + 1
    buffer = np.empty((1, pyramid.shape[1], pyramid.shape[2]), dtype=np.float32)
    for part in np.split(np.arange(len(order)), bounds):
        if len(part) == 0:
            continue
        row = sorted_rows[part[0]]
        data = reader.read(np.array([row]), buffer)[0]
        targets = order[part]
        flat_out[targets] = data[flat_pos[targets]]
    return out
