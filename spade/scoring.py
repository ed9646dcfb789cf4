"""Scoring a batch of test images against a gallery: image kNN, then patch correspondence per layer."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spade.backbone import Features
from spade.config import SpadeConfig
from spade.correspondence import layer_distance_map
from spade.gallery import Gallery
from spade.knn import image_scores, nearest_images
from spade.scoremap import combine_layer_maps, smooth


@dataclass
class ImageScore:
    """One test image's result: image score, neighbour rows, and a (crop, crop) pixel score map."""

    image_score: float
    neighbours: np.ndarray
    score_map: np.ndarray


def pixel_score_map(pyramid: dict[str, np.ndarray], gallery: Gallery, neighbours: np.ndarray, config: SpadeConfig) -> np.ndarray:
    """Smoothed (crop, crop) score map of one image's pyramid {layer: (C, H, W)} against its neighbours' features."""
    maps = [layer_distance_map(pyramid[layer], gallery.neighbour_features(layer, neighbours), config.kappa)
            for layer in config.layers]
    return smooth(combine_layer_maps(maps, config.crop), config.sigma)


def score_batch(features: Features, gallery: Gallery, config: SpadeConfig,
                exclude_rows: np.ndarray | None = None) -> list[ImageScore]:
    """Score every image of a batch; ``exclude_rows`` is for leave-one-out scoring of gallery images."""
    distances, rows = nearest_images(gallery.index, features.embedding, config.k, exclude_rows=exclude_rows)
    scores = image_scores(distances)
    return [
        ImageScore(float(scores[i]), rows[i],
                   pixel_score_map({layer: features.pyramid[layer][i] for layer in config.layers}, gallery, rows[i], config))
        for i in range(len(rows))
    ]
