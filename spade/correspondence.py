"""Pixel-level correspondence: each test position's distance to its kappa closest gallery features at ANY position."""
from __future__ import annotations

import numpy as np
import torch

GALLERY_BLOCK = 4096


def _float_tensor(values: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.to(torch.float32).contiguous()
    array = np.asarray(values, dtype=np.float32)
    if not (array.flags.writeable and array.flags.c_contiguous):
        array = np.array(array, dtype=np.float32, order="C")
    return torch.from_numpy(array)


def nearest_feature_distances(queries: np.ndarray | torch.Tensor, gallery: np.ndarray | torch.Tensor, kappa: int = 1,
                              block: int = GALLERY_BLOCK) -> np.ndarray:
    """Mean Euclidean distance from each query row (Q, C) to its ``kappa`` nearest gallery rows (G, C).

    Uses the expansion |q - g|^2 = |q|^2 - 2 q.g + |g|^2 as one matmul per
    gallery block with a running minimum, so memory stays O(Q x block).
    """
    q = _float_tensor(queries)
    g = _float_tensor(gallery)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"queries (Q, C) and gallery (G, C) must share C; got {tuple(q.shape)} and {tuple(g.shape)}")
    if kappa > g.shape[0]:
        raise ValueError(f"kappa={kappa} exceeds the {g.shape[0]} gallery features")
    q_norm = (q * q).sum(1)
    g_norm = (g * g).sum(1)
    best = torch.full((q.shape[0], kappa), float("inf"))
    with torch.inference_mode():
        for start in range(0, g.shape[0], block):
            gb = g[start:start + block]
            partial = torch.addmm(g_norm[start:start + block].unsqueeze(0), q, gb.T, beta=1.0, alpha=-2.0)
            if kappa == 1:
                best = torch.minimum(best, partial.min(dim=1, keepdim=True).values)
            else:
                best = torch.cat([best, partial], dim=1).topk(kappa, dim=1, largest=False).values
        dist = (best + q_norm.unsqueeze(1)).clamp_min_(0.0).sqrt_()
    return dist.mean(dim=1).numpy()


def layer_distance_map(test_map: np.ndarray, gallery_positions: np.ndarray, kappa: int = 1) -> np.ndarray:
    """Distance map (H, W) of one test layer map (C, H, W) against gallery features (N, C) from all
    positions of the K nearest normal images."""
    channels, height, width = test_map.shape
    queries = np.ascontiguousarray(test_map.reshape(channels, height * width).T)
    return nearest_feature_distances(queries, gallery_positions, kappa).reshape(height, width)
