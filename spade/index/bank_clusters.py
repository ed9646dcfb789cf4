"""A memory bank packed cluster by cluster, so that its nearest-vector search skips what cannot win: still exact.

Why: the layer-1 bank (24 channels, up to ~8,600 vectors) is searched by all 4,096 positions of every scored frame,
the largest single cost of the approximate config's scoring and of the default's layer 1. A query's nearest bank
vector lies in a few of the bank's clusters: by the triangle inequality no vector of cluster k is nearer than
|q - c_k| - r_k (centroid c_k, radius r_k), so once a query holds a candidate at distance d, every cluster whose
bound exceeds d is skipped. The compiled kernel (`spade.index.fused_nearest.nearest_columns_pruned`) folds a tile of
six queries' nearest-centroid clusters first and then only the clusters some row of the tile still needs.

Exact: the kernel computes each tile's centroid distances and bounds in float32, lowered by allowances above the
float32 rounding of the centroid distances (`slack_for`) and of its own values (`rounding_for`), so a skipped cluster
never holds a vector that the whole-bank search would have chosen, and the packed |g|^2 are the whole-bank search's
own float32 values: the winners are that search's (on an exact float32 tie between two vectors the one visited first
wins, as before; visits follow the clusters). Measured: benchmarks/bank_clusters.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import faiss
import numpy as np
import torch

from spade.index.fused_nearest import LANES, Panels, cluster_bounds, nearest_columns_pruned

PER_CLUSTER = 64           # bank vectors a cluster on average ...
MAX_CLUSTERS = 256         # ... with at most this many clusters (the bounds cost grows with them)
MIN_VECTORS = 1024         # smaller banks are searched whole (skipping saves less than the bounds cost)
WORTH = 0.6                # a bank whose first large search compares more than this share is searched whole after
WORTH_SCREENED = 0.35      # ... where the whole search is screened in bfloat16 (2.5x faster): metal_plate's and the
                           # tire's layer-1 banks (0.46-0.50 compared) 3-12 % faster whole (benchmarks/bank_clusters.py)
DECIDING_QUERIES = 1024    # the search that decides has at least this many queries
KMEANS_ITERATIONS = 20
UNIT = 2.0 ** -24          # float32's unit roundoff
SEED = 0


@dataclass(frozen=True)
class ClusteredBank:
    """Bank vectors packed for the kernel cluster by cluster: cluster k is packed columns ``starts[k]`` ..
    ``starts[k + 1]`` (each padded to 16 columns), ``column_ids`` the bank row of each column (-1: padding);
    ``centroids`` (K, C) float32 values (in float64), ``radii`` (K,) float32 rounded up: no member is farther from
    its centroid; ``largest_sq`` the largest |g|^2."""

    panels: Panels
    starts: np.ndarray
    column_ids: np.ndarray
    centroids: np.ndarray
    radii: np.ndarray
    largest_sq: float
    centroid_panels: Panels = field(repr=False)  # float32 centroids packed as the bank, with |c|^2 (1 - slack)

    @classmethod
    def of(cls, vectors: np.ndarray, clusters: int | None = None, seed: int = SEED) -> "ClusteredBank":
        """Cluster ``vectors`` (N, C) (seeded k-means into ``clusters``; default one per `PER_CLUSTER` vectors, at
        most `MAX_CLUSTERS`) and pack them."""
        data = np.ascontiguousarray(vectors, dtype=np.float32)
        n, channels = data.shape
        k = max(1, min(n, clusters or min(MAX_CLUSTERS, round(n / PER_CLUSTER))))
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
        columns = torch.zeros((len(column_ids), channels), dtype=torch.float32)
        real = column_ids >= 0
        columns.numpy()[real] = data[column_ids[real]]
        sq = (columns * columns).sum(1)  # as `Panels.of` sums |g|^2: the same float32 values as a whole-bank search
        sq[torch.from_numpy(~real)] = float("inf")
        panels = Panels.of(columns, sq)
        largest = float((data.astype(np.float64) ** 2).sum(axis=1).max()) if n else 0.0
        lowered = torch.from_numpy((centroids ** 2).sum(axis=1) * (1.0 - slack_for(channels)))
        return cls(panels, starts, column_ids, centroids, np.nextafter(radii.astype(np.float32), np.float32(np.inf)),
                   largest, Panels.of(torch.from_numpy(centroids.astype(np.float32)), lowered.to(torch.float32)))

    def nearest_ids(self, q: np.ndarray, threads: int = 1) -> tuple[np.ndarray, float]:
        """(M,) each query's nearest bank row, as the kernel's search of the whole bank finds it, and the share of
        the bank a tile of queries was compared with (`nearest_columns_pruned`)."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        channels = q.shape[1]
        columns, share = nearest_columns_pruned(q, self.panels, self.starts, self.centroid_panels, self.radii,
                                                slack_for(channels), rounding_for(channels), self.largest_sq, threads)
        return self.column_ids[columns], share

    def bounds(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The kernel's bounds for queries ``q`` (M, C): (M, K) lower bounds on s(g) = |g|^2 - 2 q.g over each
        cluster's members, and (M,) each query's nearest-centroid cluster (`fused_nearest.cluster_bounds`)."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        channels = q.shape[1]
        return cluster_bounds(q, self.centroid_panels, self.radii, slack_for(channels), rounding_for(channels),
                              self.largest_sq)


def slack_for(channels: int) -> float:
    """How much a squared centroid distance computed in float32 is lowered, relative to |q|^2 + |c|^2: its dot
    product of ``channels`` terms errs by at most channels x float32's unit roundoff of that (twice that here)."""
    return max(1e-5, 2.0 * (channels + 4) * UNIT)


def rounding_for(channels: int) -> float:
    """The allowance for the kernel's own s(g) = |g|^2 - 2 q.g, relative to |q|^2 + max |g|^2 (its error is at most
    ~2 x channels x the unit roundoff of that; the bound's square root and squares add a few units)."""
    return max(1e-4, 8.0 * (channels + 4) * UNIT)
