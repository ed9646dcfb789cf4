"""Each position's nearest feature among the K nearest normal frames' features close to the same place.

A coreset memory bank (`spade.index.coreset`) answers "the nearest feature anywhere in the gallery" with a few
thousand representatives, so a test feature whose true match sits among the K nearest frames but was not picked
for the bank is scored too far. Industrial frames are mostly registered: that match is usually near the same
place. This search adds exactly those candidates: every feature of the K nearest frames within a window around
each position, taken block by block (a block of ``block`` x ``block`` positions sees the neighbours' block grown by
``radius`` on every side, so each position sees at least ``radius`` positions around it). The union with the
bank is the distance the approximate layers report (`spade.scoring.batch.layer_distance_maps`): never larger than
the bank's alone, and a few percent of the exact correspondence's arithmetic (144 x K candidates per position at
radius 2 against every position of K frames).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

BLOCK = 8
BLOCKS_PER_STEP = 16  # blocks whose (block², K·span²) distance matrix is held at once (~6 MB at K=10)


def _windows(padded: torch.Tensor, blocks: tuple[int, int], block: int, span: int) -> torch.Tensor:
    """(K, H', W', *rest) padded neighbour maps -> (hb*wb, K*span*span, *rest): each block's grown window."""
    k = padded.shape[0]
    rest = padded.shape[3:]
    s = padded.stride()
    view = padded.as_strided((blocks[0], blocks[1], k, span, span, *rest),
                             (block * s[1], block * s[2], s[0], s[1], s[2], *s[3:]))
    return view.reshape(blocks[0] * blocks[1], k * span * span, *rest)


def local_window_distances(query: np.ndarray, neighbours: np.ndarray, radius: int, block: int = BLOCK) -> np.ndarray:
    """(h, w) Euclidean distance of each position of one frame's layer map ``query`` (C, h, w) to its nearest
    feature among the neighbour frames' maps ``neighbours`` (K, h*w, C) (gallery rows of the same layer and frame
    size) within its block's window (see the module docstring)."""
    c, h, w = query.shape
    k = len(neighbours)
    if neighbours.shape[1:] != (h * w, c):
        raise ValueError(f"neighbour rows of shape {neighbours.shape[1:]} for a ({c}, {h}, {w}) map: "
                         "the gallery's frame or layer differs from the query's")
    hb, wb = -(-h // block), -(-w // block)
    ph, pw = hb * block - h, wb * block - w
    span = block + 2 * radius
    g = torch.from_numpy(np.ascontiguousarray(neighbours, dtype=np.float32)).reshape(k, h, w, c)
    g_sq = F.pad((g * g).sum(3), (radius, radius + pw, radius, radius + ph), value=float("inf"))
    g = F.pad(g, (0, 0, radius, radius + pw, radius, radius + ph))
    candidates = _windows(g, (hb, wb), block, span)                        # (nb, K*span², C)
    candidate_sq = _windows(g_sq, (hb, wb), block, span).unsqueeze(1)       # (nb, 1, K*span²)
    q = torch.from_numpy(np.ascontiguousarray(query, dtype=np.float32)).permute(1, 2, 0)
    q = F.pad(q, (0, 0, 0, pw, 0, ph)).reshape(hb, block, wb, block, c).transpose(1, 2).reshape(hb * wb, block * block, c)
    nearest = torch.empty(hb * wb, block * block, dtype=torch.int64)
    for start in range(0, hb * wb, BLOCKS_PER_STEP):
        part = slice(start, start + BLOCKS_PER_STEP)
        torch.argmin(torch.baddbmm(candidate_sq[part], q[part], candidates[part].transpose(1, 2), alpha=-2), 2,
                     out=nearest[part])
    winners = torch.gather(candidates, 1, nearest.unsqueeze(2).expand(-1, -1, c))
    best = torch.linalg.vector_norm(winners - q, dim=2)  # recomputed directly: no cancellation near zero
    return best.reshape(hb, wb, block, block).transpose(1, 2).reshape(hb * block, wb * block)[:h, :w].numpy()
