"""Pixel-level correspondence: each test position's distance to its kappa closest gallery features at ANY position.

The exact kernel is a blocked GEMM with the expansion |q - g|^2 = |q|^2 - 2 q.g + |g|^2:

* ``-2 q.g^T + |g|^2`` is one ``addmm`` into a preallocated, cache-sized output
  block, followed by a fused row minimum (``torch.min`` with indices); |q|^2 is
  constant per row and never enters the search;
* the winners' distances are then recomputed directly as |q - g*| (O(Q x C)),
  so float32 cancellation in the expansion cannot leak into the scores;
* the winner itself may still be wrong when candidates lie within the expansion's
  rounding noise of each other (near-duplicate features); the search also keeps the
  runner-up value, and queries whose error could exceed REFINE_TOLERANCE are
  re-searched in float64 (`_refine_flags`, `_refine_search`);
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

GALLERY_BLOCK = 4096
COLUMN_BLOCK = 1024      # gallery vectors per GEMM block
QUERY_BLOCK = 4096       # query rows per GEMM block; the output block (4096 x 1024 floats, 16 MB) stays in L3
READ_POSITIONS = 4096    # gallery positions read (pread) per chunk
REFINE_TOLERANCE = 1e-6  # largest error of a reported distance that the float32 search may leave unrefined
REFINE_BLOCK = 8 << 20   # float64 elements (64 MB) per output block of the float64 refinement
EPS32 = 2.0 ** -24       # unit roundoff of float32


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

    def __init__(self, rows: int, kappa: int, gap: bool = False):
        self.kappa = kappa
        self.gap = gap
        width = kappa + 1 if gap else kappa
        self.values = torch.full((rows, width), float("inf"))
        self.ids = torch.full((rows, width), -1, dtype=torch.int64)

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


def _search_block(q: torch.Tensor, g: torch.Tensor, g_sq: torch.Tensor, best: _RunningMin, row0: int, first_id: int,
                  buf: torch.Tensor, query_block: int = QUERY_BLOCK, column_block: int = COLUMN_BLOCK) -> None:
    """Fold gallery vectors ``g`` (N, C) with ids first_id.. into the running minimum of queries ``q`` (M, C)
    (rows row0.. of ``best``)."""
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
            best.update(slice(row0 + r0, row0 + r0 + qb.shape[0]), out, first_id + c0)


def _winner_distances(q: torch.Tensor, winners: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """|q - winner| in float64 by direct subtraction: q (M, C), winners (M, kappa, C) -> (M, kappa) float64."""
    out = torch.empty(winners.shape[:2], dtype=torch.float64)
    for r0 in range(0, q.shape[0], rows):
        diff = winners[r0:r0 + rows].double() - q[r0:r0 + rows].double().unsqueeze(1)
        out[r0:r0 + rows] = torch.linalg.vector_norm(diff, dim=2)
    return out


def _refine_flags(q: torch.Tensor, dist: torch.Tensor, next_value: torch.Tensor, g_sq_max: float,
                  tolerance: float = REFINE_TOLERANCE) -> np.ndarray:
    """Queries whose float32 search may have picked winners more than ``tolerance`` too far (mean distance).

    The search compares s(g) = fl(|g|^2 - 2 q.g) with |q - g|^2 = |q|^2 + |g|^2 - 2 q.g. Rounding bound
    (dot products of length C in float32, any summation order, FMA or not; then one addition):
        |s(g) - (|g|^2 - 2 q.g)| <= (gamma_C + u) (|g|^2 + 2 |q| |g|) <= (C + 2) u (|q|^2 + 2 max|g|^2) =: n
    (u = 2^-24, 2|q||g| <= |q|^2 + |g|^2; a 10 % margin covers gamma_C's 1/(1 - Cu) and the float32 |g|^2 used
    for max|g|^2). Measured errors reach only ~2 % of this worst-case bound (C = 256, uniform and duplicate-heavy
    data: rounding errors grow like sqrt(C) u rather than C u), so it is conservative.
    Every candidate the search did not pick has s(g) >= s_next (the (kappa+1)-th smallest computed value),
    so its true squared distance is >= L = |q|^2 + s_next - n. Swapping a winner w (exact distance d_w, computed
    directly) for a better unpicked candidate gains at most d_w - sqrt(L); the mean over kappa winners is off by
    at most max_w d_w - sqrt(max(L, 0)). Flag where that can exceed ``tolerance``.
    (Using only the best computed value, the lower bound would be d_w^2 - 2n, which on real features flags
    nearly every query; the gap to the runner-up is what makes the test selective.)
    """
    channels = q.shape[1]
    q64 = q.double()
    q_sq = (q64 * q64).sum(1)
    noise = 1.1 * (channels + 2) * EPS32 * (q_sq + 2.0 * g_sq_max)
    lower = (q_sq + next_value.double() - noise).clamp_min(0.0).sqrt()
    return (lower < dist.max(dim=1).values - tolerance).numpy()


def _refine_search(q: torch.Tensor, chunks, kappa: int) -> torch.Tensor:
    """Gallery ids (M, kappa) of the kappa nearest candidates of queries ``q`` (M, C), searched in float64.

    ``chunks`` yields (g (n, C) float32, ids (n,) int64, slots): gallery vectors and the queries (an int64 index
    tensor into ``q``, or None for all) that are compared with them. Queries and gallery are centred on the
    queries' mean (distances are translation invariant) and compared with the float64 expansion, whose rounding
    error (~ C 2^-53 |centred norms|^2) is 2^29 times smaller than float32's. Output blocks hold at most
    REFINE_BLOCK float64 elements.
    """
    q64 = q.double()
    centre = q64.mean(dim=0)
    q64 -= centre
    best_v = torch.full((q.shape[0], kappa), float("inf"), dtype=torch.float64)
    best_i = torch.full((q.shape[0], kappa), -1, dtype=torch.int64)
    for g, ids, slots in chunks:
        g64 = g.double() - centre
        g_sq = (g64 * g64).sum(1).unsqueeze(0)
        gt = g64.T
        step = max(1, REFINE_BLOCK // g64.shape[0])
        count = q.shape[0] if slots is None else len(slots)
        for r0 in range(0, count, step):
            sl = slice(r0, r0 + step) if slots is None else slots[r0:r0 + step]
            out = torch.addmm(g_sq, q64[sl], gt, beta=1.0, alpha=-2.0)
            if kappa == 1:
                vals, idx = torch.min(out, dim=1, keepdim=True)
            else:
                vals, idx = torch.topk(out, min(kappa, out.shape[1]), dim=1, largest=False, sorted=False)
            merged_v, pick = torch.topk(torch.cat([best_v[sl], vals], dim=1), kappa, dim=1, largest=False)
            best_i[sl] = torch.cat([best_i[sl], ids[idx]], dim=1).gather(1, pick)
            best_v[sl] = merged_v
    return best_i


def nearest_feature_distances(queries: np.ndarray | torch.Tensor, gallery: np.ndarray | torch.Tensor, kappa: int = 1,
                              block: int = GALLERY_BLOCK, exact: bool = True) -> np.ndarray:
    """Mean Euclidean distance from each query row (Q, C) to its ``kappa`` nearest gallery rows (G, C).

    Blocked ``addmm`` search (memory O(query block x column block)); with ``exact``
    the winners' distances are recomputed as |q - g| instead of taken from the
    expansion. ``block`` bounds the gallery rows per GEMM column block.
    """
    q = _float_tensor(queries)
    g = _float_tensor(gallery)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"queries (Q, C) and gallery (G, C) must share C; got {tuple(q.shape)} and {tuple(g.shape)}")
    if kappa > g.shape[0]:
        raise ValueError(f"kappa={kappa} exceeds the {g.shape[0]} gallery features")
    column_block = max(1, min(block, COLUMN_BLOCK))
    with torch.inference_mode():
        best = _RunningMin(q.shape[0], kappa, gap=exact)
        buf = torch.empty(min(q.shape[0], QUERY_BLOCK) * min(g.shape[0], column_block))
        g_sq = (g * g).sum(1)
        _search_block(q, g, g_sq, best, 0, 0, buf, column_block=column_block)
        values, ids, next_value = best.winners()
        if exact:
            each = _winner_distances(q, g[ids])
            flagged = np.flatnonzero(_refine_flags(q, each, next_value, float(g_sq.max())))
            if len(flagged):
                index = torch.from_numpy(flagged)
                qf = q.index_select(0, index)
                all_ids = torch.arange(g.shape[0])
                step = max(1, READ_POSITIONS)
                chunks = ((g[c0:c0 + step], all_ids[c0:c0 + step], None) for c0 in range(0, g.shape[0], step))
                each[index] = _winner_distances(qf, g[_refine_search(qf, chunks, kappa)])
            dist = each.mean(dim=1).float()
        else:
            dist = (values + (q * q).sum(1, keepdim=True)).clamp_min_(0.0).sqrt_().mean(dim=1)
    return dist.numpy()


def layer_distance_map(test_map: np.ndarray, gallery_positions: np.ndarray, kappa: int = 1) -> np.ndarray:
    """Distance map (H, W) of one test layer map (C, H, W) against gallery features (N, C) from all
    positions of the K nearest normal images."""
    channels, height, width = test_map.shape
    queries = np.ascontiguousarray(test_map.reshape(channels, height * width).T)
    return nearest_feature_distances(queries, gallery_positions, kappa).reshape(height, width)


class PyramidReader:
    """Reads gallery rows (images) of one pyramid layer (N, P, C) into a caller's float32 buffer.

    A ``.npy`` memory map is read with ``pread`` from its file (page cache -> buffer,
    nothing stays mapped, so resident memory does not grow with the rows touched);
    any other array is gathered with ``np.take``.
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
        target = out[:len(rows)]
        if self.fd is None:
            if self.array.dtype == np.float32:
                np.take(self.array, rows, axis=0, out=target)
            else:
                target[...] = self.array[rows]
            return target
        raw = target if self.array.dtype == np.float32 else np.empty((len(rows), self.positions, self.channels), self.array.dtype)
        start = 0
        while start < len(rows):  # one pread per run of consecutive rows
            stop = start + 1
            while stop < len(rows) and rows[stop] == rows[stop - 1] + 1:
                stop += 1
            view = memoryview(raw[start:stop].reshape(-1)).cast("B")
            done = 0
            while done < len(view):
                got = os.preadv(self.fd, [view[done:]], self.offset + int(rows[start]) * self.row_bytes + done)
                if got <= 0:
                    raise OSError(f"short read from {self.array.filename}")
                done += got
            start = stop
        if raw is not target:
            target[...] = raw
        return target


def batch_layer_distances(queries: np.ndarray | torch.Tensor, pyramid: np.ndarray, neighbours: np.ndarray, kappa: int = 1,
                          exact: bool = True, read_positions: int = READ_POSITIONS,
                          on_chunk: Callable[[int], None] | None = None, refine: bool = True) -> np.ndarray:
    """Distances (B, P) of B test images' positions (B, P, C) to the kappa nearest features among ALL positions of
    each image's own neighbour rows ``neighbours[i]`` of ``pyramid`` (N, Pg, C).

    Gallery rows are grouped by the set of test images that use them; each group's
    rows are read once and searched with the concatenated queries of those images.
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
    members = np.zeros((len(rows), batch), dtype=bool)
    for i in range(batch):
        members[np.searchsorted(rows, neighbours[i]), i] = True
    groups: dict[bytes, list[int]] = {}
    for j, key in enumerate(np.packbits(members, axis=1)):
        groups.setdefault(key.tobytes(), []).append(j)
    rows_per_read = max(1, read_positions // per_row)
    buffer = np.empty((min(rows_per_read, len(rows)), per_row, channels), dtype=np.float32)
    flat = q_all.reshape(batch * positions, channels)
    best = _RunningMin(batch * positions, kappa, gap=exact and refine)
    g_sq_max = 0.0
    with torch.inference_mode(), PyramidReader(pyramid) as reader:
        gemm_buf = torch.empty(min(batch * positions, QUERY_BLOCK) * COLUMN_BLOCK)
        for group in groups.values():
            images = np.flatnonzero(members[group[0]])
            if len(images) == batch:
                q, local = flat, best
            else:
                index = torch.from_numpy(images)
                q = q_all.index_select(0, index).reshape(-1, channels)
                local = _RunningMin(0, kappa, gap=exact and refine)
                local.values = best.values.view(batch, positions, -1).index_select(0, index).reshape(len(images) * positions, -1)
                local.ids = best.ids.view(batch, positions, -1).index_select(0, index).reshape(len(images) * positions, -1)
            group_rows = rows[group]
            for r0 in range(0, len(group_rows), rows_per_read):
                chunk_rows = group_rows[r0:r0 + rows_per_read]
                chunk = reader.read(chunk_rows, buffer)
                g = torch.from_numpy(chunk).reshape(-1, channels)
                g_sq = (g * g).sum(1)
                g_sq_max = max(g_sq_max, float(g_sq.max())) if len(g_sq) else g_sq_max
                # ids: gallery row * per_row + position, valid within a run of consecutive rows
                start = 0
                while start < len(chunk_rows):
                    stop = start + 1
                    while stop < len(chunk_rows) and chunk_rows[stop] == chunk_rows[stop - 1] + 1:
                        stop += 1
                    sl = slice(start * per_row, stop * per_row)
                    _search_block(q, g[sl], g_sq[sl], local, 0, int(chunk_rows[start]) * per_row, gemm_buf)
                    start = stop
                if on_chunk is not None:
                    on_chunk(len(chunk_rows))
            if local is not best:
                index = torch.from_numpy(images)
                best.values.view(batch, positions, -1).index_copy_(0, index, local.values.view(len(images), positions, -1))
                best.ids.view(batch, positions, -1).index_copy_(0, index, local.ids.view(len(images), positions, -1))
        values, ids, next_value = best.winners()
        if exact:
            ids = ids.numpy()
            winners = _gather_positions(reader, pyramid, ids // per_row, ids % per_row)
            each = _winner_distances(flat, torch.from_numpy(winners))
            del winners
            flagged = _refine_flags(flat, each, next_value, g_sq_max) if refine else np.zeros(0, dtype=bool)
            if flagged.any():  # float64 re-search of the flagged queries; each gallery row is read once
                index = torch.from_numpy(np.flatnonzero(flagged))
                qf = flat.index_select(0, index)
                chunks = _refine_chunks(reader, neighbours, index.numpy() // positions, buffer)
                refined = _refine_search(qf, chunks, kappa).numpy()
                found = _gather_positions(reader, pyramid, refined // per_row, refined % per_row)
                each[index] = _winner_distances(qf, torch.from_numpy(found))
            dist = each.mean(dim=1).float()
        else:
            dist = (values + (flat * flat).sum(1, keepdim=True)).clamp_min_(0.0).sqrt_().mean(dim=1)
    return dist.numpy().reshape(batch, positions)


def _refine_chunks(reader: PyramidReader, neighbours: np.ndarray, image_of: np.ndarray, buffer: np.ndarray):
    """For `_refine_search`: each gallery row used by an image in ``image_of`` (the test image of each flagged
    query), read once, as (features (P, C) float32, ids row * P + position, the flagged queries whose image has
    the row among its neighbours)."""
    per_row, channels = reader.positions, reader.channels
    images = np.unique(image_of)
    rows = np.unique(neighbours[images])
    users = np.zeros((len(rows), int(neighbours.shape[0])), dtype=bool)
    for i in images:
        users[np.searchsorted(rows, neighbours[i]), i] = True
    for r0 in range(0, len(rows), len(buffer)):
        chunk_rows = rows[r0:r0 + len(buffer)]
        chunk = reader.read(chunk_rows, buffer)
        for j, row in enumerate(chunk_rows):
            slots = np.flatnonzero(users[r0 + j][image_of])
            ids = torch.arange(int(row) * per_row, (int(row) + 1) * per_row)
            yield torch.from_numpy(chunk[j]).reshape(-1, channels), ids, torch.from_numpy(slots)


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
