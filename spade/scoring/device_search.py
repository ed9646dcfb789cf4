"""The exact correspondence on an accelerator (config ``device: cuda``): the same distances, in torch ops only.

`spade.scoring.correspondence` is built for CPUs (a float32 GEMM into cache-sized blocks, numpy for the running
minimum, a float64 re-search only where float32 rounding could matter). A GPU has float64 arithmetic to spare and
pays for every host round trip, so this search is simpler: each test image's positions are compared with all
positions of its K neighbour rows by the expansion |q|^2 - 2 q.g + |g|^2 in float64 (centred, as on CPU; rounding
bound 2^-53), the kappa smallest and the runner-up kept per block; the winners' distances are then recomputed
directly (|q - g|). A position whose runner-up is not provably farther than its farthest winner (the CPU search's
`_refine_flags` with float64's unit) gets every candidate's distance computed directly. Everything stays on the
device until the (P,) distances come back. The code is device-agnostic: tests run it on the CPU against the CPU
search.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from spade.scoring.correspondence import EPS64, PyramidReader, _noise

BLOCK_BYTES = 1 << 28  # a block's float64 output (P x columns): 256 MB, whatever the frame's positions


def _smallest(values: torch.Tensor, ids: torch.Tensor, block: torch.Tensor, first: int, count: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``block`` (P, n) whose columns are ids first.. into the ``count`` smallest (values, ids) per row."""
    k = min(count, block.shape[1])
    found, at = torch.topk(block, k, dim=1, largest=False)
    merged = torch.cat([values, found], dim=1)
    merged_ids = torch.cat([ids, at + first], dim=1)
    keep = torch.topk(merged, count, dim=1, largest=False)
    return keep.values, merged_ids.gather(1, keep.indices)


def image_distances(q: torch.Tensor, g: torch.Tensor, kappa: int, columns: int | None = None) -> torch.Tensor:
    """Mean distance (P,) float64 from each of one image's positions ``q`` (P, C) to its ``kappa`` nearest among
    ``g`` (N, C), both float32 on one device; within float64 rounding of the exact value. ``columns``: gallery
    positions per block (default: a `BLOCK_BYTES` output)."""
    positions, channels = q.shape
    columns = columns or max(1024, BLOCK_BYTES // (8 * max(1, positions)))
    centre = g.double().mean(dim=0)
    qc, gc = q.double() - centre, g.double() - centre
    g_sq = (gc * gc).sum(1)
    count = min(kappa + 1, g.shape[0])
    values = torch.full((positions, count), float("inf"), dtype=torch.float64, device=q.device)
    ids = torch.zeros((positions, count), dtype=torch.int64, device=q.device)
    for c0 in range(0, g.shape[0], columns):
        block = torch.addmm(g_sq[c0:c0 + columns].unsqueeze(0), qc, gc[c0:c0 + columns].T, beta=1.0, alpha=-2.0)
        values, ids = _smallest(values, ids, block, c0, count)
    winners = ids[:, :kappa]
    dist = torch.linalg.vector_norm(g[winners].double() - q.double().unsqueeze(1), dim=2)  # (P, kappa)
    if count > kappa:  # is every candidate not picked provably no closer than the farthest winner?
        q_norm = torch.linalg.vector_norm(qc, dim=1)
        far = dist.max(dim=1).values
        noise = _noise(q_norm, q_norm + far, channels, EPS64)
        lower = (q_norm * q_norm + values[:, kappa] - noise).clamp_min(0.0).sqrt() - EPS64 * (2.0 * q_norm + far)
        unsettled = torch.nonzero(lower < far).flatten()
        if len(unsettled):
            direct = torch.cdist(q[unsettled].double(), g.double(), compute_mode="donot_use_mm_for_euclid_dist")
            dist[unsettled] = torch.topk(direct, kappa, dim=1, largest=False).values
    return dist.mean(dim=1)


def device_layer_distances(queries: np.ndarray, pyramid, neighbours: np.ndarray, kappa: int, device: torch.device,
                           on_chunk: Callable[[int], None] | None = None) -> np.ndarray:
    """Distances (B, P) of B test images' positions (B, P, C) to the kappa nearest features among all positions of
    each image's neighbour rows ``neighbours[i]`` of ``pyramid`` (N, Pg, C), computed on ``device``; the same
    contract as `spade.scoring.correspondence.batch_layer_distances`."""
    queries = np.asarray(queries, dtype=np.float32)
    batch, positions, channels = queries.shape
    neighbours = np.asarray(neighbours, dtype=np.int64).reshape(batch, -1)
    if pyramid.ndim != 3 or pyramid.shape[2] != channels:
        raise ValueError(f"gallery pyramid (N, P, C={channels}) expected, got {pyramid.shape}")
    if kappa > neighbours.shape[1] * pyramid.shape[1]:
        raise ValueError(f"kappa={kappa} exceeds the {neighbours.shape[1] * pyramid.shape[1]} neighbour features")
    buffer = np.empty((neighbours.shape[1], pyramid.shape[1], channels), dtype=np.float32)
    out = torch.empty((batch, positions), dtype=torch.float32)
    with torch.inference_mode(), PyramidReader(pyramid) as reader:
        for i in range(batch):
            rows = reader.read(neighbours[i], buffer)
            g = torch.from_numpy(rows).reshape(-1, channels).to(device, non_blocking=False)
            q = torch.from_numpy(queries[i]).to(device)
            out[i] = image_distances(q, g, kappa).float().cpu()
            if on_chunk is not None:
                on_chunk(len(neighbours[i]))
    return out.numpy()
