"""Default thresholds from normal images alone: leave-one-out scores of gallery images."""
from __future__ import annotations

from typing import Callable

import numpy as np

from spade.features.backbone import Features
from spade.config import SpadeConfig
from spade.index.gallery import Gallery
from spade.scoring.batch import score_batch


def leave_one_out_scores(gallery: Gallery, config: SpadeConfig, count: int,
                         progress: Callable[[str], None] = lambda _: None) -> tuple[np.ndarray, np.ndarray]:
    """Image scores (m,) and pixel score maps (m, crop, crop) of ``count`` evenly spaced gallery images,
    each scored against the gallery without itself."""
    n = gallery.index.ntotal
    if n < 2:
        return np.zeros(0), np.zeros((0, config.crop, config.crop), dtype=np.float32)
    rows = np.unique(np.linspace(0, n - 1, num=min(count, n)).round().astype(int))
    image_scores, maps = [], []
    # A batch at a time, as `spade score` does: images sharing neighbours share their GEMMs. Each image still
    # excludes only its own row, so the results are those of scoring the images one by one.
    for start in range(0, len(rows), config.batch_size):
        chunk = rows[start:start + config.batch_size]
        pyramid = {}
        for layer in config.layers:
            positions = np.asarray(gallery.pyramid[layer][chunk], dtype=np.float32)  # (B, positions, C)
            side = int(round(np.sqrt(positions.shape[1])))
            pyramid[layer] = positions.transpose(0, 2, 1).reshape(len(chunk), -1, side, side)
        features = Features(embedding=gallery.index.reconstruct_batch(chunk), pyramid=pyramid)
        for result in score_batch(features, gallery, config, exclude_rows=chunk):
            image_scores.append(result.image_score)
            maps.append(result.score_map)
        done = start + len(chunk)
        progress(f"calibration: {done}/{len(rows)} normal images scored leave-one-out")
    return np.asarray(image_scores), np.stack(maps)


def thresholds_from_normals(image_scores: np.ndarray, pixel_maps: np.ndarray, fpr: float) -> dict[str, float]:
    """Image threshold: the highest leave-one-out normal image score. Pixel threshold: the
    (1 - fpr) quantile of normal pixel scores, so about ``fpr`` of normal pixels are flagged."""
    if len(image_scores) == 0:
        return {}
    return {
        "image": float(np.max(image_scores)),
        "pixel": float(np.quantile(pixel_maps, 1.0 - fpr)),
        "source": "calibration",
        "calibration_images": int(len(image_scores)),
        "calibration_fpr": float(fpr),
    }
