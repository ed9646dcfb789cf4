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
    embeddings = gallery.index.reconstruct_batch(rows)
    for done, row in enumerate(rows, 1):
        pyramid = {}
        for layer in config.layers:
            positions = np.asarray(gallery.pyramid[layer][row], dtype=np.float32)
            side = int(round(np.sqrt(positions.shape[0])))
            pyramid[layer] = positions.T.reshape(-1, side, side)[None]
        features = Features(embedding=embeddings[done - 1:done], pyramid=pyramid)
        result = score_batch(features, gallery, config, exclude_rows=np.array([row]))[0]
        image_scores.append(result.image_score)
        maps.append(result.score_map)
        if done == len(rows) or done % 10 == 0:
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
