"""Approximate pixel scoring for large galleries: a global per-layer patch memory bank (PatchCore-style).

Every gallery position of a layer is a candidate; greedy coreset subsampling
(iterative farthest point selection, on a random projection of the features as
in PatchCore) keeps ``ratio`` of them, and a faiss index answers each test
position's nearest bank features. The winners' distances are recomputed exactly.

Off by default (``scoring_mode: exact``). With ``ratio`` 1.0 the bank holds every
gallery position, so scores equal exact correspondence against the whole gallery.
A bank remembers the gallery row of each vector, so a gallery image can be scored
leave-one-out (calibration) without its own patches; `spade fit` stores the banks of an
approximate-mode config in the gallery (`save_banks`), so workers load them instead of
each repeating the greedy selection.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import faiss
import numpy as np
import torch

from spade.index import bank_clusters, farthest_points, fused_nearest
from spade.index.bank_clusters import MIN_VECTORS as CLUSTERED_MIN, ClusteredBank

LOG = logging.getLogger(__name__)
DEFAULT_PROJECTION = 128
DEFAULT_MAX_CANDIDATES = 200_000   # positions drawn at random before the greedy pass (bounds build time and memory)
SEED = 0
SCREENED_MIN = 256                 # a bank searched whole is screened in bfloat16 from this many vectors on (AVX512-BF16)
PROGRESS_SECONDS = 10.0            # a long greedy pass reports how far it got this often
FOLDER = "coreset"                 # gallery sub-folder of stored banks: <layer>.npy vectors, <layer>-rows.npy rows
# faiss searches a flat index by a GEMM only from queries x dimensions >= this (its own default 128,000), one query
# at a time below. On the banks here the GEMM is 2-6x faster from a few hundred queries on (benchmarks/bank_search.py):
# one image's 4,096 layer-1 queries of 24 channels (98,304) took the slow path, 16.8 ms instead of 2.6 ms against a
# 2,212-vector bank, 64 instead of 13 against 8,192; a batch's few image embeddings keep the one-at-a-time path.
BLAS_THRESHOLD = 16384
faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
# `MemoryBank.largest_distances`' screen: a seeded draw of one bank vector in SCREEN_SHARE, for banks of at least
# SCREEN_MIN vectors (below, the whole bank costs little); each group's SCREEN_FIRST queries of largest bound are
# searched in the whole bank first; SCREEN_MARGIN (relative) covers float32 rounding in faiss's choice of winners.
SCREEN_SHARE = 8
SCREEN_MIN = 512
SCREEN_FIRST = 4
SCREEN_MARGIN = 1e-3


def greedy_coreset(features: np.ndarray, n: int, start: int | None = None, projection: int = DEFAULT_PROJECTION,
                   seed: int = 0, progress: Callable[[int, int], None] | None = None,
                   every_s: float = PROGRESS_SECONDS, compiled: bool | None = None) -> np.ndarray:
    """Indices of ``n`` rows of ``features`` (N, C) chosen by greedy farthest-point selection, in selection order.

    Each step adds the row farthest (Euclidean) from everything selected so far.
    With ``projection`` > 0 and C larger than it, distances are taken on a seeded
    Gaussian random projection to ``projection`` dims (Johnson-Lindenstrauss), as PatchCore does.
    ``compiled`` (None: where built) runs the steps in `spade.index.farthest_points`' kernel, which skips the blocks
    of rows a step cannot reach; else each step reads all N rows once (memory-bound: seconds for a few thousand steps
    over 200,000 rows). Either way ``progress(chosen, n)`` is told how far it got every ``every_s`` seconds.
    """
    array = np.ascontiguousarray(features, dtype=np.float32)
    total, channels = array.shape
    n = int(min(max(n, 1), total))
    gen = torch.Generator().manual_seed(seed)
    use_kernel = farthest_points.available() if compiled is None else compiled
    with torch.inference_mode():
        matrix = None
        if projection and channels > projection:
            matrix = torch.randn(channels, projection, generator=gen) / np.sqrt(projection)
        if start is None:
            start = int(torch.randint(total, (1,), generator=gen))
        if use_kernel:  # the projected rows are bound to no name here: the kernel's copy of them is the only one kept
            return farthest_points.farthest_points(array if matrix is None else _writable(array) @ matrix, n, start,
                                                   progress, every_s, threads=torch.get_num_threads())
        columns = torch.from_numpy(np.ascontiguousarray(array.T)) if matrix is None else matrix.t() @ _writable(array).t()
        return _plain_greedy(columns, n, start, progress, every_s)


def _writable(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _plain_greedy(columns: torch.Tensor, n: int, start: int, progress: Callable[[int, int], None] | None,
                  every_s: float) -> np.ndarray:
    """`greedy_coreset`'s steps over every row, with torch: ``columns`` (C, N) channel-major.

    Channel-major: each step's matrix-vector product runs along contiguous rows of N, 3.5x faster than over (N, C)
    rows at C=128 on 2 cores (4.3 against 14.8 ms per step for 200,000 rows); 1.5x at C=24 (metal_plate's layer 1,
    2,212 steps over 200,000 rows: 1.27-1.35 against 1.94-2.19 s, with numpy's argmax)."""
    chosen = np.empty(n, dtype=np.int64)
    chosen[0] = start
    sq = (columns * columns).sum(0)
    positions = columns.t()

    def dist_to(i: int, out: torch.Tensor) -> torch.Tensor:  # |x|^2 + |x_i|^2 - 2 x.x_i in one pass over x
        torch.add(sq, sq[i], out=out)
        return out.addmv_(positions, columns[:, i].contiguous(), alpha=-2.0).clamp_min_(0.0)

    # each step writes into the same buffer instead of two new (N,) tensors (fresh mappings from glibc above its
    # mmap threshold): the same selections, 1.02-1.10x faster over 200,000 candidates (bottle's and
    # metal_plate's layer 1, bottle's layer 2; scratch /tmp/s44/greedy_cmp.py against the code before)
    nearest, step_distances = dist_to(start, torch.empty_like(sq)), torch.empty_like(sq)
    nearest[start] = -1.0
    farthest = nearest.numpy()  # the same memory: numpy's argmax is ~10x torch's on one vector
    reported = time.monotonic()
    for step in range(1, n):
        i = int(farthest.argmax())
        chosen[step] = i
        torch.minimum(nearest, dist_to(i, step_distances), out=nearest)  # selected rows stay at -1, never picked again
        nearest[i] = -1.0
        if progress is not None and time.monotonic() - reported >= every_s:
            progress(step + 1, n)
            reported = time.monotonic()
    return chosen


@dataclass
class MemoryBank:
    """One layer's (sub-sampled) patch features, the gallery row each came from, and a faiss index over them."""

    vectors: np.ndarray
    index: faiss.Index
    rows: np.ndarray | None = None
    _screen: "MemoryBank | None" = field(default=None, repr=False, compare=False)
    _panels: "fused_nearest.Panels | None" = field(default=None, repr=False, compare=False)
    _bf16: "fused_nearest.Bf16Panels | None" = field(default=None, repr=False, compare=False)
    _clusters: "ClusteredBank | None" = field(default=None, repr=False, compare=False)
    _whole: bool = field(default=False, repr=False, compare=False)  # its clusters skipped too little: search it whole

    @classmethod
    def from_vectors(cls, vectors: np.ndarray, rows: np.ndarray | None = None) -> "MemoryBank":
        data = np.ascontiguousarray(vectors, dtype=np.float32)
        index = faiss.IndexFlatL2(data.shape[1])
        index.add(data)
        return cls(vectors=data, index=index, rows=None if rows is None else np.asarray(rows, dtype=np.int64))

    @classmethod
    def build(cls, features: np.ndarray, ratio: float, projection: int = DEFAULT_PROJECTION, seed: int = SEED,
              max_candidates: int | None = None, rows: np.ndarray | None = None,
              progress: Callable[[int, int], None] | None = None) -> "MemoryBank":
        """Greedy coreset of ``features`` (N, C) keeping ``ratio`` of them; ``rows`` (N,) their gallery rows;
        ``progress``: `greedy_coreset`'s."""
        if not 0 < ratio <= 1:
            raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
        data = np.ascontiguousarray(features, dtype=np.float32)
        keep = max(1, int(round(ratio * len(data))))
        if keep < len(data):
            pick = None  # every row a candidate: searched in place, no copy of them
            if max_candidates and len(data) > max_candidates and keep < max_candidates:
                pick = np.sort(np.random.default_rng(seed).choice(len(data), max_candidates, replace=False))
            found = np.sort(greedy_coreset(data if pick is None else data[pick], keep, projection=projection, seed=seed,
                                           progress=progress))
            chosen = found if pick is None else pick[found]
            data = np.ascontiguousarray(data[chosen])
            rows = None if rows is None else np.asarray(rows)[chosen]
        return cls.from_vectors(data, rows)

    def _nearest(self, q: np.ndarray, kappa: int, kernel: str, others: np.ndarray | None = None) -> np.ndarray:
        """(Q, kappa) ids of each query's nearest bank vectors (among rows ``others`` of the bank where given): with
        kappa 1 and the fused kernel (`spade.index.fused_nearest`, ``kernel`` auto or float32) in one compiled pass
        over the bank's packed vectors, else by faiss's flat search (a GEMM and its row minima). A bank of
        `CLUSTERED_MIN` vectors or more is packed in clusters, most of which each query skips
        (`spade.index.bank_clusters`), and searched whole from its first large search on where the clusters skipped
        less than `bank_clusters.WORTH` of it (`WORTH_SCREENED` where the whole search is screened in bfloat16,
        `fused_nearest.nearest_ids_bf16`, which finds the same winners). A large search decides on a sample of
        `DECIDING_QUERIES` spread over its queries, so the rest already take the faster path."""
        if kappa == 1 and fused_nearest.use_fused(kernel):
            if others is None and len(self.vectors) >= CLUSTERED_MIN and not self._whole:
                return self._clustered_or_whole(q, kernel)[:, None]
            if others is None:
                return self._whole_ids(q, kernel)[:, None]
            ids = fused_nearest.nearest_ids(q, fused_nearest.Panels.of(self.vectors[others]),
                                            threads=torch.get_num_threads())[:, None]
        elif others is None:
            ids = self.index.search(q, kappa)[1]
        else:
            bank = faiss.IndexFlatL2(self.vectors.shape[1])
            bank.add(self.vectors[others])
            ids = bank.search(q, kappa)[1]
        return ids if others is None else others[ids]

    def _whole_ids(self, q: np.ndarray, kernel: str) -> np.ndarray:
        """(Q,) each query's nearest bank vector by the fused kernel over the whole bank (screened in bfloat16 where
        `fused_nearest.use_bf16`)."""
        screened = fused_nearest.use_bf16(kernel) and len(self.vectors) >= SCREENED_MIN
        with _DERIVED_LOCK:
            if self._panels is None:
                self._panels = fused_nearest.Panels.of(self.vectors)
            if screened and self._bf16 is None:
                self._bf16 = fused_nearest.Bf16Panels.of(self.vectors)
        threads = torch.get_num_threads()
        if screened:
            return fused_nearest.nearest_ids_bf16(q, self._panels, self._bf16, threads=threads)[0]
        return fused_nearest.nearest_ids(q, self._panels, threads=threads)

    def _clustered_or_whole(self, q: np.ndarray, kernel: str) -> np.ndarray:
        """(Q,) each query's nearest bank vector through the bank's clusters; a search of `DECIDING_QUERIES` or more
        first searches a sample of that many spread over its queries, and where the sample compared more than the
        worth share of the bank (`_nearest`) the bank is searched whole from then on, the rest of this search too."""
        with _DERIVED_LOCK:
            if self._clusters is None:
                self._clusters = ClusteredBank.of(self.vectors)
        threads = torch.get_num_threads()
        if len(q) < bank_clusters.DECIDING_QUERIES:
            return self._clusters.nearest_ids(q, threads=threads)[0]
        sample = np.unique(np.linspace(0, len(q) - 1, bank_clusters.DECIDING_QUERIES).astype(np.int64))
        ids = np.empty(len(q), dtype=np.int64)
        ids[sample], share = self._clusters.nearest_ids(q[sample], threads=threads)
        rest = np.ones(len(q), dtype=bool)
        rest[sample] = False
        worth = bank_clusters.WORTH_SCREENED if fused_nearest.use_bf16(kernel) else bank_clusters.WORTH
        if share > worth:
            self._whole = True  # the same winners either way; whole is faster where clusters skip little
        if rest.any():
            ids[rest] = (self._whole_ids(q[rest], kernel) if self._whole
                         else self._clusters.nearest_ids(q[rest], threads=threads)[0])
        return ids

    def distances(self, queries: np.ndarray, kappa: int = 1, exclude_row: int | np.ndarray | None = None,
                  kernel: str = "auto") -> np.ndarray:
        """Mean Euclidean distance of each query (Q, C) to its ``kappa`` nearest bank vectors (exactly recomputed).

        ``exclude_row``: vectors from that gallery row are skipped (leave-one-out scoring of a gallery image);
        an array (Q,) names each query's own row, so a batch of images is searched in one call. All queries are
        searched for ``kappa`` neighbours at once (faiss is several times faster per query on a large batch than
        on one image's, and than with the extra neighbours a filter would need); only queries whose winners
        include an excluded vector are searched again, in a bank without their row. ``kernel``: the config's
        ``search_kernel`` (`_nearest`).
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if exclude_row is not None and self.rows is None:
            raise ValueError("this memory bank does not know its vectors' gallery rows; it cannot leave one out")
        excluded = None if exclude_row is None else np.broadcast_to(np.asarray(exclude_row, dtype=np.int64), (len(q),))
        available = len(self.vectors)
        if excluded is not None:
            for row in np.unique(excluded):
                available = min(available, len(self.vectors) - int(np.count_nonzero(self.rows == row)))
                if available < 1:
                    raise ValueError(f"the memory bank has no vectors outside gallery row {row}")
        kappa = min(kappa, available)  # a bank smaller than kappa: all its (other) vectors
        ids = self._nearest(q, kappa, kernel)
        if excluded is not None:
            hit = (self.rows[ids] == excluded[:, None]).any(axis=1)
            for row in np.unique(excluded[hit]):
                redo = np.flatnonzero(hit & (excluded == row))
                ids[redo] = self._nearest(q[redo], kappa, kernel, others=np.flatnonzero(self.rows != row))
        winners = self.vectors[ids]
        return np.linalg.norm(winners - q[:, None, :], axis=2).mean(axis=1).astype(np.float32)

    def largest_distances(self, queries: np.ndarray, groups: int,
                          exclude_row: int | np.ndarray | None = None, kernel: str = "auto") -> np.ndarray:
        """(groups,) each group's largest distance from a query to its nearest bank vector: the same numbers as
        ``distances(queries, 1, exclude_row).reshape(groups, -1).max(axis=1)``, with most queries never searched
        in the whole bank.

        Why: PatchCore's image evidence is a frame's largest nearest-bank distance, and searching every position of
        a long frame in a bank grown with the gallery's positions was a third of the commutators' scoring time.
        Each query's distance to its nearest vector of a screen (one bank vector in ``SCREEN_SHARE``) bounds its
        distance to the whole bank from above; each group's ``SCREEN_FIRST`` queries of largest bound are searched
        in the whole bank, and the largest of their distances bounds the group's answer from below; only queries
        whose bound exceeds that are searched in the whole bank too (well under 1 % on the shared sets' frames).
        Exact: a query left out has a distance no larger than one already found. ``kernel``: as `distances`'.
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        per_group = len(q) // groups
        screen = self._screen_bank()
        if screen is None or per_group <= SCREEN_FIRST:
            return self.distances(q, 1, exclude_row, kernel).reshape(groups, per_group).max(axis=1)
        own = None if exclude_row is None else np.broadcast_to(np.asarray(exclude_row, dtype=np.int64), (len(q),))
        try:
            bounds = screen.distances(q, 1, own, kernel).reshape(groups, per_group)
        except ValueError:  # the screen holds no vector outside some excluded row: search everything
            return self.distances(q, 1, exclude_row, kernel).reshape(groups, per_group).max(axis=1)
        first = np.argpartition(-bounds, SCREEN_FIRST - 1, axis=1)[:, :SCREEN_FIRST]
        first = (first + np.arange(groups)[:, None] * per_group).ravel()
        found = self.distances(q[first], 1, None if own is None else own[first], kernel)
        found = found.reshape(groups, SCREEN_FIRST).max(axis=1)
        rest = np.ones(len(q), dtype=bool)
        rest[first] = False
        rest &= (bounds > (found * (1.0 - SCREEN_MARGIN))[:, None]).ravel()
        left = np.flatnonzero(rest)
        if len(left):
            np.maximum.at(found, left // per_group,
                          self.distances(q[left], 1, None if own is None else own[left], kernel))
        return found

    def _screen_bank(self) -> "MemoryBank | None":
        """The bank's screen (built once, seeded), or None for a bank too small to need one."""
        if len(self.vectors) < SCREEN_MIN:
            return None
        with _DERIVED_LOCK:
            if self._screen is None:
                pick = np.sort(np.random.default_rng(SEED).permutation(len(self.vectors))[:len(self.vectors) // SCREEN_SHARE])
                self._screen = MemoryBank.from_vectors(self.vectors[pick], None if self.rows is None else self.rows[pick])
        return self._screen


# a bank's parts made on first use: its screen, its kernel panels (float32, bfloat16), its clusters
_DERIVED_LOCK = threading.Lock()


_BANKS: dict[tuple, MemoryBank] = {}
_LOCK = threading.Lock()


def layer_bank(pyramid: np.ndarray, ratio: float, projection: int = DEFAULT_PROJECTION, seed: int = SEED,
               max_candidates: int | None = DEFAULT_MAX_CANDIDATES,
               progress: Callable[[int, int], None] | None = None, max_vectors: int | None = None) -> MemoryBank:
    """A memory bank over every position of every gallery row of one layer (N, P, C); with
    ``max_candidates`` a seeded random subset of positions is drawn first (read row by row); ``max_vectors``
    caps the bank (``ratio`` of a large gallery's positions would make its search cost grow with the gallery)."""
    n, positions, channels = pyramid.shape
    total = n * positions
    if max_vectors is not None and ratio * total > max_vectors:
        ratio = max_vectors / total
    if ratio >= 1 or not max_candidates or total <= max_candidates:
        return MemoryBank.build(np.asarray(pyramid, dtype=np.float32).reshape(total, channels), ratio, projection, seed,
                                rows=np.repeat(np.arange(n), positions), progress=progress)
    pick = np.sort(np.random.default_rng(seed).choice(total, max_candidates, replace=False))
    rows = pick // positions
    candidates = np.empty((len(pick), channels), dtype=np.float32)
    for row in np.unique(rows):
        sel = rows == row
        candidates[sel] = np.asarray(pyramid[row], dtype=np.float32)[pick[sel] % positions]
    keep = max(1, int(round(ratio * total)))
    return MemoryBank.build(candidates, min(1.0, keep / len(candidates)), projection, seed, rows=rows, progress=progress)


def bank_settings(ratio: float, projection: int = DEFAULT_PROJECTION, max_candidates: int | None = DEFAULT_MAX_CANDIDATES,
                  seed: int = SEED, max_vectors: int | None = None) -> dict[str, Any]:
    """What determines a bank (recorded in the gallery manifest next to stored banks; ``max_vectors`` only when
    set, so galleries stored before it existed still match)."""
    settings = {"ratio": float(ratio), "projection": int(projection), "max_candidates": max_candidates, "seed": int(seed)}
    return settings | ({"max_vectors": int(max_vectors)} if max_vectors is not None else {})


def coreset_settings(config, ratio: float | None = None) -> dict[str, Any]:
    """`bank_settings` of a config's coreset keys (``ratio`` instead of its ``coreset_ratio`` where given): what fit
    stores and scoring asks `memory_bank_for` for (``memory_bank_for(gallery, layer, **coreset_settings(config))``)."""
    return bank_settings(config.coreset_ratio if ratio is None else ratio, config.coreset_projection,
                         config.coreset_max_candidates, max_vectors=config.coreset_max_vectors)


def bank_files(layer: str) -> tuple[str, str]:
    """A stored bank's files, relative to the gallery root: (vectors (n, C), gallery row of each vector (n,))."""
    return f"{FOLDER}/{layer}.npy", f"{FOLDER}/{layer}-rows.npy"


def save_banks(root: str, layers: Iterable[str], settings: dict[str, Any],
               progress: Callable[[str], None] = lambda _: None, pyramids: dict[str, Any] | None = None) -> None:
    """Build each layer's bank from the gallery's pyramid (``pyramids[layer]``, (N, P, C); default: the file
    ``root``/pyramid/<layer>.npy) and store it under ``root`` (`bank_files`)."""
    os.makedirs(os.path.join(root, FOLDER), exist_ok=True)
    for layer in layers:
        pyramid = pyramids[layer] if pyramids else np.load(os.path.join(root, "pyramid", f"{layer}.npy"), mmap_mode="r")
        bank = layer_bank(pyramid, settings["ratio"], settings["projection"], settings["seed"], settings["max_candidates"],
                          progress=lambda done, n, layer=layer: progress(
                              f"gallery: coreset memory bank {layer}: {done}/{n} vectors chosen"),
                          max_vectors=settings.get("max_vectors"))
        vectors_file, rows_file = bank_files(layer)
        np.save(os.path.join(root, vectors_file), bank.vectors)
        np.save(os.path.join(root, rows_file), bank.rows)
        progress(f"gallery: coreset memory bank {layer}: {len(bank.vectors)} of {pyramid.shape[0] * pyramid.shape[1]} "
                 f"positions kept (ratio {settings['ratio']})")


def load_banks(root: str, layers: Iterable[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The banks `save_banks` stored under ``root``, memory-mapped: {layer: (vectors, rows)}."""
    return {layer: tuple(np.load(os.path.join(root, name), mmap_mode="r") for name in bank_files(layer)) for layer in layers}


def memory_bank_for(gallery, layer: str, ratio: float, projection: int = DEFAULT_PROJECTION, seed: int = SEED,
                    max_candidates: int | None = DEFAULT_MAX_CANDIDATES, max_vectors: int | None = None) -> MemoryBank:
    """The gallery's bank for ``layer``: the one `spade fit` stored when its settings match, else built on first
    use; kept for the process (one per worker)."""
    manifest = getattr(gallery, "manifest", None) or {}
    key = (manifest.get("gallery_hash"), id(gallery.pyramid[layer]), layer, float(ratio), projection, seed, max_candidates,
           max_vectors)
    with _LOCK:
        bank = _BANKS.get(key)
        if bank is None:
            stored = getattr(gallery, "banks", None) or {}
            if layer in stored and manifest.get("coreset") == bank_settings(ratio, projection, max_candidates, seed,
                                                                            max_vectors):
                vectors, rows = stored[layer]
                bank = MemoryBank.from_vectors(vectors, rows)
            else:
                if getattr(gallery, "url", None) and manifest.get("num_images"):  # an opened gallery, not arrays
                    LOG.warning("gallery %s stores no coreset bank of %s with these settings (fitted with another "
                                "config or before approximate_layers); this worker builds it from every gallery row, "
                                "once per process. Fit the gallery again with this config to store it.",
                                gallery.url, layer)
                bank = layer_bank(gallery.pyramid[layer], ratio, projection, seed, max_candidates, max_vectors=max_vectors)
            _BANKS[key] = bank
    return bank
