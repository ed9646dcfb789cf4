"""Each position's nearest feature among the K nearest normal frames' features close to the same place.

A coreset memory bank (`spade.index.coreset`) answers "the nearest feature anywhere in the gallery" with a few
thousand representatives, so a test feature whose true match sits among the K nearest frames but was not picked
for the bank is scored too far. Industrial frames are mostly registered: that match is usually near the same
place. This search adds exactly those candidates: every feature of the K nearest frames within a window around
each position, taken block by block (a block of ``block`` x ``block`` positions sees the neighbours' block grown by
``radius`` on every side, so each position sees at least ``radius`` positions around it). The union with the
bank is the distance the approximate layers report (`spade.scoring.batch.layer_distance_maps`): never larger than
the bank's alone, and a few percent of the exact correspondence's arithmetic (64 x K candidates per position with
4 x 4 blocks at radius 2, the default, against every position of K frames). Smaller blocks compare each position with
fewer candidates for the same radius: 4 x 4 blocks at radius 2 take three quarters of the time of 8 x 8 blocks at
radius 1 and reach further around every position (README "A local search beside the layer-1 bank").
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from spade.config import SpadeConfig

BLOCK = SpadeConfig.approximate_local_block  # positions a block's side: the config's default, one literal for both
BLOCKS_PER_STEP = 16  # blocks whose windows and (block², K·span²) distances are held at once (~2 MB for 4 x 4 blocks at radius 2 and K=10, ~6 MB for 8 x 8 at 1)


def _windows(padded: torch.Tensor, blocks: tuple[int, int], block: int, span: int) -> torch.Tensor:
    """(K, H', W', *rest) padded neighbour maps -> a (hb, wb, K, span, span, *rest) view: each block's grown window."""
    k = padded.shape[0]
    s = padded.stride()
    return padded.as_strided((blocks[0], blocks[1], k, span, span, *padded.shape[3:]),
                             (block * s[1], block * s[2], s[0], s[1], s[2], *s[3:]))


def local_window_distances(query: np.ndarray, neighbours: np.ndarray, radius: int, block: int = BLOCK) -> np.ndarray:
    """(h, w) Euclidean distance of each position of one frame's layer map ``query`` (C, h, w) to its nearest
    feature among the neighbour frames' maps ``neighbours`` (K, h*w, C) (gallery rows of the same layer and frame
    size) within its block's window (see the module docstring). Windows are copied a few block rows at a time, so
    beyond the neighbours' maps memory does not grow with a frame's length."""
    c, h, w = query.shape
    k = len(neighbours)
    if neighbours.shape[1:] != (h * w, c):
        raise ValueError(f"neighbour rows of shape {neighbours.shape[1:]} for a ({c}, {h}, {w}) map: "
                         "the gallery's frame or layer differs from the query's")
    hb, wb = -(-h // block), -(-w // block)
    ph, pw = hb * block - h, wb * block - w
    span = block + 2 * radius
    g = torch.from_numpy(np.ascontiguousarray(neighbours, dtype=np.float32)).reshape(k, h, w, c)
    g_sq = _windows(F.pad((g * g).sum(3), (radius, radius + pw, radius, radius + ph), value=float("inf")),
                    (hb, wb), block, span)
    g = _windows(F.pad(g, (0, 0, radius, radius + pw, radius, radius + ph)), (hb, wb), block, span)
    q = torch.from_numpy(np.ascontiguousarray(query, dtype=np.float32)).permute(1, 2, 0)
    q = F.pad(q, (0, 0, 0, pw, 0, ph)).reshape(hb, block, wb, block, c).transpose(1, 2).reshape(hb, wb, block * block, c)
    best = torch.empty(hb, wb, block * block)
    rows = max(1, BLOCKS_PER_STEP // wb)
    for top in range(0, hb, rows):
        part = slice(top, top + rows)
        candidates = g[part].reshape(-1, k * span * span, c)  # (blocks of these rows, K·span², C)
        queries = q[part].reshape(-1, block * block, c)
        nearest = torch.baddbmm(g_sq[part].reshape(-1, 1, k * span * span), queries, candidates.transpose(1, 2),
                                alpha=-2).argmin(2)
        winners = torch.gather(candidates, 1, nearest.unsqueeze(2).expand(-1, -1, c))
        best[part] = torch.linalg.vector_norm(winners - queries, dim=2).reshape(-1, wb, block * block)  # direct: no cancellation
    return best.reshape(hb, wb, block, block).transpose(1, 2).reshape(hb * block, wb * block)[:h, :w].numpy()
