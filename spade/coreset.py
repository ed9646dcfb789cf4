"""Approximate pixel scoring for large galleries: a global per-layer patch memory bank (PatchCore-style).

Every gallery position of a layer is a candidate; greedy coreset subsampling
(iterative farthest point selection, on a random projection of the features as
in PatchCore) keeps ``ratio`` of them, and a faiss index answers each test
position's nearest bank features. The winners' distances are recomputed exactly.

Off by default (``scoring_mode: exact``). With ``ratio`` 1.0 the bank holds every
gallery position, so scores equal exact correspondence against the whole gallery.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import faiss
import numpy as np
import torch

DEFAULT_PROJECTION = 128
DEFAULT_MAX_CANDIDATES = 200_000   # positions drawn at random before the greedy pass (bounds build time and memory)


def greedy_coreset(features: np.ndarray, n: int, start: int | None = None, projection: int = DEFAULT_PROJECTION,
                   seed: int = 0) -> np.ndarray:
    """Indices of ``n`` rows of ``features`` (N, C) chosen by greedy farthest-point selection, in selection order.

    Each step adds the row farthest (Euclidean) from everything selected so far.
    With ``projection`` > 0 and C larger than it, distances are taken on a seeded
    Gaussian random projection to ``projection`` dims (Johnson-Lindenstrauss), as PatchCore does.
    """
    array = np.ascontiguousarray(features, dtype=np.float32)
    x = torch.from_numpy(array if array.flags.writeable else array.copy())
    total = x.shape[0]
    n = int(min(max(n, 1), total))
    gen = torch.Generator().manual_seed(seed)
    if projection and x.shape[1] > projection:
        x = x @ (torch.randn(x.shape[1], projection, generator=gen) / np.sqrt(projection))
    if start is None:
        start = int(torch.randint(total, (1,), generator=gen))
    chosen = np.empty(n, dtype=np.int64)
    chosen[0] = start
    with torch.inference_mode():
        sq = (x * x).sum(1)
        def dist_to(i: int) -> torch.Tensor:
            return (sq - 2.0 * (x @ x[i]) + sq[i]).clamp_min_(0.0)
        nearest = dist_to(start)
        nearest[start] = -1.0
        for step in range(1, n):
            i = int(torch.argmax(nearest))
            chosen[step] = i
            torch.minimum(nearest, dist_to(i), out=nearest)  # selected rows stay at -1, never picked again
            nearest[i] = -1.0
    return chosen


@dataclass
class MemoryBank:
    """One layer's (sub-sampled) patch features and a faiss index over them."""

    vectors: np.ndarray
    index: faiss.Index

    @classmethod
    def build(cls, features: np.ndarray, ratio: float, projection: int = DEFAULT_PROJECTION, seed: int = 0,
              max_candidates: int | None = None) -> "MemoryBank":
        if not 0 < ratio <= 1:
            raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
        data = np.ascontiguousarray(features, dtype=np.float32)
        keep = max(1, int(round(ratio * len(data))))
        if keep < len(data):
            candidates = data
            if max_candidates and len(data) > max_candidates and keep < max_candidates:
                pick = np.sort(np.random.default_rng(seed).choice(len(data), max_candidates, replace=False))
                candidates = data[pick]
            chosen = greedy_coreset(candidates, keep, projection=projection, seed=seed)
            data = np.ascontiguousarray(candidates[np.sort(chosen)])
        index = faiss.IndexFlatL2(data.shape[1])
        index.add(data)
        return cls(vectors=data, index=index)

    def distances(self, queries: np.ndarray, kappa: int = 1) -> np.ndarray:
        """Mean Euclidean distance of each query (Q, C) to its ``kappa`` nearest bank vectors (exactly recomputed)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        kappa = min(kappa, len(self.vectors))
        _, ids = self.index.search(q, kappa)
        winners = self.vectors[ids]
        return np.linalg.norm(winners - q[:, None, :], axis=2).mean(axis=1).astype(np.float32)


_BANKS: dict[tuple, MemoryBank] = {}
_LOCK = threading.Lock()


def layer_bank(pyramid: np.ndarray, ratio: float, projection: int = DEFAULT_PROJECTION, seed: int = 0,
               max_candidates: int | None = DEFAULT_MAX_CANDIDATES) -> MemoryBank:
    """A memory bank over every position of every gallery row of one layer (N, P, C); with
    ``max_candidates`` a seeded random subset of positions is drawn first (read row by row)."""
    n, positions, channels = pyramid.shape
    total = n * positions
    if ratio >= 1 or not max_candidates or total <= max_candidates:
        return MemoryBank.build(np.asarray(pyramid, dtype=np.float32).reshape(total, channels), ratio, projection, seed)
    pick = np.sort(np.random.default_rng(seed).choice(total, max_candidates, replace=False))
    rows = pick // positions
    candidates = np.empty((len(pick), channels), dtype=np.float32)
    for row in np.unique(rows):
        sel = rows == row
        candidates[sel] = np.asarray(pyramid[row], dtype=np.float32)[pick[sel] % positions]
    keep = max(1, int(round(ratio * total)))
    return MemoryBank.build(candidates, min(1.0, keep / len(candidates)), projection, seed)


def memory_bank_for(gallery, layer: str, ratio: float, projection: int = DEFAULT_PROJECTION, seed: int = 0,
                    max_candidates: int | None = DEFAULT_MAX_CANDIDATES) -> MemoryBank:
    """The gallery's bank for ``layer``, built on first use and kept for the process (one per worker)."""
    key = (getattr(gallery, "hash", None), id(gallery.pyramid[layer]), layer, float(ratio), projection, seed, max_candidates)
    with _LOCK:
        bank = _BANKS.get(key)
        if bank is None:
            bank = _BANKS[key] = layer_bank(gallery.pyramid[layer], ratio, projection, seed, max_candidates)
    return bank
