"""Image-level kNN: an image's anomaly score is its mean distance to the K nearest normal embeddings."""
from __future__ import annotations

import faiss
import numpy as np


def build_index(embeddings: np.ndarray) -> faiss.Index:
    """An exact L2 index over the normal images' global embeddings (row i = gallery image i)."""
    data = np.ascontiguousarray(embeddings, dtype=np.float32)
    if data.ndim != 2 or len(data) == 0:
        raise ValueError(f"embeddings must be a non-empty (N, D) array, got shape {data.shape}")
    index = faiss.IndexFlatL2(data.shape[1])
    index.add(data)
    return index


def nearest_images(index: faiss.Index, queries: np.ndarray, k: int,
                   exclude_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distances (B, k') and gallery rows (B, k') of each query's k nearest normal images,
    nearest first; k' = min(k, gallery size).

    ``exclude_rows[i]`` is a gallery row query i may not use (its own row, for
    leave-one-out scoring of gallery images).
    """
    data = np.ascontiguousarray(queries, dtype=np.float32)
    if data.ndim != 2 or data.shape[1] != index.d:
        raise ValueError(f"queries must be (B, {index.d}), got {data.shape}")
    if exclude_rows is None:
        sq, rows = index.search(data, min(k, index.ntotal))
    else:
        width = min(k, index.ntotal - 1)
        sq, rows = index.search(data, width + 1)
        keep = rows != np.asarray(exclude_rows)[:, None]
        keep[keep.sum(1) > width, -1] = False
        sq = sq[keep].reshape(len(data), width)
        rows = rows[keep].reshape(len(data), width)
    return np.sqrt(np.maximum(sq, 0.0)), rows


def image_scores(distances: np.ndarray) -> np.ndarray:
    """Mean distance to the K nearest normal images, per query."""
    return distances.mean(axis=1)


def k_warning(k: int, gallery_size: int) -> str | None:
    """A warning when K is large for the gallery (more than a quarter of its images), else None.

    With K near the gallery size every image's "nearest" normal images are most of the gallery:
    the kNN score averages over images that are not similar, the correspondence searches nearly
    every normal image (scoring time grows with K) and leave-one-out calibration sees the same set.
    """
    supported = max(1, gallery_size // 4)
    if k <= supported:
        return None
    used = min(k, gallery_size)
    return (f"k={k} with a gallery of {gallery_size} normal images: more than a quarter of the gallery. Each image is "
            f"compared with {used} images, nearly all of the gallery, so its neighbours are not its nearest ones and "
            f"scoring costs about {used / supported:.0f}x what this gallery needs; this gallery supports k <= {supported} "
            f"(a quarter of it). Set `k: {supported}` or lower in the config, or fit more normal images.")
