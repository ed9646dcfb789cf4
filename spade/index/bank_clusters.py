"""A memory bank packed cluster by cluster, so that its nearest-vector search skips what cannot win: still exact.

Why: the layer-1 bank (24 channels, up to ~8,600 vectors) is searched by all 4,096 positions of every scored frame,
the largest single cost of the approximate config's scoring and of the default's layer 1. A query's nearest bank
vector lies in a few of the bank's clusters: by the triangle inequality no vector of cluster k is nearer than
|q - c_k| - r_k (centroid c_k, radius r_k), so once a query holds a candidate at distance d, every cluster whose
bound exceeds d is skipped. The compiled kernel (`spade.index.fused_nearest.nearest_columns_pruned`) folds a tile of
six queries' nearest-centroid clusters first and then only the clusters some row of the tile still needs.

Exact: bounds are computed in float64 and lowered by an allowance for the float32 rounding of the kernel's values,
so a skipped cluster never holds a vector that the full search would have chosen; the winners are those of the
unpruned kernel (on an exact float32 tie between two vectors the one visited first wins, as before, and visits
follow the clusters). Measured: benchmarks/bank_search.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import faiss
import numpy as np
import torch

from spade.index.fused_nearest import LANES, Panels, nearest_columns_pruned

CLUSTERS = 64              # clusters a bank (fewer for small banks: at least MIN_PER_CLUSTER vectors each)
MIN_PER_CLUSTER = 32
MIN_VECTORS = 1024         # smaller banks are searched whole (skipping saves less than the bounds cost)
KMEANS_ITERATIONS = 20
ROUNDING = 1e-4            # allowance for s(g)'s float32 rounding, relative to |q|^2 + max |g|^2 (~20x the worst case)
CENTROID_ROUNDING = 1e-5   # allowance for a squared centroid distance's float32 rounding, relative to |q|^2 + |c|^2
QUERY_CHUNK = 8192         # queries whose bounds are held at once ((chunk, clusters) float64)
SEED = 0


@dataclass(frozen=True)
class ClusteredBank:
    """Bank vectors packed for the kernel cluster by cluster: cluster k is packed columns ``starts[k]`` ..
    ``starts[k + 1]`` (each padded to 16 columns), ``column_ids`` the bank row of each column (-1: padding);
    ``centroids`` (K, C) and ``radii`` (K,) in float64; ``largest_sq`` the largest |g|^2."""

    panels: Panels
    starts: np.ndarray
    column_ids: np.ndarray
    centroids: np.ndarray
    radii: np.ndarray
    largest_sq: float
    _centroids_t: torch.Tensor = field(init=False, repr=False, compare=False)
    _centroid_sq: torch.Tensor = field(init=False, repr=False, compare=False)
    _radii: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """The float32 forms `bounds` computes with: centroids (C, K), (1 - `CENTROID_ROUNDING`) |c|^2 (1, K), and
        the radii (1, K) rounded up."""
        centroids = torch.from_numpy(self.centroids)
        object.__setattr__(self, "_centroids_t", centroids.T.to(torch.float32).contiguous())
        object.__setattr__(self, "_centroid_sq", ((centroids * centroids).sum(1) * (1.0 - CENTROID_ROUNDING))
                           .to(torch.float32)[None].contiguous())
        object.__setattr__(self, "_radii", torch.from_numpy(np.nextafter(self.radii.astype(np.float32), np.inf))[None])

    @classmethod
    def of(cls, vectors: np.ndarray, clusters: int = CLUSTERS, seed: int = SEED) -> "ClusteredBank":
        """Cluster ``vectors`` (N, C) (seeded k-means into ``clusters``, at most one per `MIN_PER_CLUSTER` vectors)
        and pack them."""
        data = np.ascontiguousarray(vectors, dtype=np.float32)
        n, channels = data.shape
        k = max(1, min(clusters, n // MIN_PER_CLUSTER))
        if k > 1:
            kmeans = faiss.Kmeans(channels, k, niter=KMEANS_ITERATIONS, seed=seed, verbose=False,
                                  min_points_per_centroid=1, max_points_per_centroid=max(256, -(-n // k)))
            kmeans.train(data)
            assign = kmeans.index.search(data, 1)[1][:, 0]
        else:
            assign = np.zeros(n, dtype=np.int64)
        order = np.argsort(assign, kind="stable")
        labels, sizes = np.unique(assign[order], return_counts=True)  # empty clusters dropped
        widths = -(-sizes // LANES) * LANES
        starts = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
        column_ids = np.full(int(starts[-1]), -1, dtype=np.int64)
        member_starts = np.concatenate([[0], np.cumsum(sizes)])
        centroids = np.empty((len(labels), channels), dtype=np.float64)
        radii = np.empty(len(labels), dtype=np.float64)
        for i in range(len(labels)):
            members = order[member_starts[i]:member_starts[i + 1]]
            column_ids[starts[i]:starts[i] + len(members)] = members
            points = data[members].astype(np.float64)
            centroids[i] = points.mean(axis=0).astype(np.float32)  # the float32 centroid that `bounds` uses
            radii[i] = np.sqrt(((points - centroids[i]) ** 2).sum(axis=1).max())
        columns = np.zeros((len(column_ids), channels), dtype=np.float32)
        real = column_ids >= 0
        columns[real] = data[column_ids[real]]
        sq = np.full(len(column_ids), np.inf, dtype=np.float32)
        sq[real] = (columns[real] * columns[real]).sum(axis=1)
        panels = Panels.of(columns, torch.from_numpy(sq))
        largest = float((data.astype(np.float64) ** 2).sum(axis=1).max()) if n else 0.0
        return cls(panels, starts, column_ids, centroids, radii, largest)

    def bounds(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For queries ``q`` (M, C) float32: each one's nearest cluster (M,) and, for every cluster, a lower bound on
        s(g) = |g|^2 - 2 q.g over its vectors less the rounding allowance, (M, K) float32.

        In float32 (a float64 pass cost as much as the search it prunes): the squared centroid distance is lowered by
        `CENTROID_ROUNDING` of |q|^2 + |c|^2 before its root, and the bound by `ROUNDING` of |q|^2 + max |g|^2, both
        well above float32's error on these sums of 24-168 products."""
        queries = torch.from_numpy(q)
        q_sq = (queries * queries).sum(1, keepdim=True)
        distance = torch.addmm(self._centroid_sq, queries, self._centroids_t, alpha=-2.0)
        distance.add_(q_sq, alpha=1.0 - CENTROID_ROUNDING)
        first = distance.argmin(1)
        bound = distance.clamp_min_(0.0).sqrt_().sub_(self._radii).clamp_min_(0.0).square_()
        bound.sub_(q_sq.mul_(1.0 + ROUNDING).add_(ROUNDING * self.largest_sq))
        return first.numpy(), bound.numpy()

    def nearest_ids(self, q: np.ndarray, threads: int = 1) -> np.ndarray:
        """(M,) each query's nearest bank row, as the kernel's search of the whole bank finds it."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        ids = np.empty(len(q), dtype=np.int64)
        for start in range(0, len(q), QUERY_CHUNK):
            chunk = q[start:start + QUERY_CHUNK]
            first, bound = self.bounds(chunk)
            columns = nearest_columns_pruned(chunk, self.panels, self.starts, first, bound, threads)
            ids[start:start + len(chunk)] = self.column_ids[columns]
        return ids
