"""Scoring a batch of test images against a gallery: image kNN, then patch correspondence per layer.

Two pixel modes:

* ``exact`` (default, the SPADE paper): each position's distance to the kappa
  nearest features among all positions of the image's K nearest normal images,
  computed for the whole batch at once (`spade.scoring.correspondence.batch_layer_distances`);
* ``approximate``: each position's distance to the kappa nearest features of a
  global per-layer memory bank reduced by greedy coreset subsampling
  (PatchCore-style, `spade.index.coreset`), searched with a faiss index. For galleries
  too large for exact correspondence; the image score is SPADE's kNN score in both.

The mode and coreset ratio come from the config (``scoring_mode``,
``coreset_ratio``) or are passed explicitly.

Every result carries both image-level terms, the kNN score and the maximum of the smoothed
score map; the image score is the one ``image_score`` asks for (`spade.scoring.image_score`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spade.features.backbone import Features
from spade.config import SpadeConfig
from spade.scoring.correspondence import batch_layer_distances, configure_threads
from spade.index.gallery import Gallery
from spade.index.knn import image_scores, nearest_images
from spade.scoring.image_score import image_score
from spade.scoring.scoremap import combine_layer_maps, smooth

MODES = ("exact", "approximate")


@dataclass
class ImageScore:
    """One test image's result: image score, neighbour rows, a (crop, crop) pixel score map, and the
    two terms the image score is made of (kNN score, maximum of the score map)."""

    image_score: float
    neighbours: np.ndarray
    score_map: np.ndarray
    knn_score: float = float("nan")
    map_max: float = float("nan")


def scoring_mode(config: SpadeConfig, mode: str | None = None) -> str:
    chosen = mode or config.scoring_mode
    if chosen not in MODES:
        raise ValueError(f"scoring_mode must be one of {', '.join(MODES)}, got {chosen!r}")
    return chosen


def layer_queries(pyramid_batch: np.ndarray) -> np.ndarray:
    """(B, C, H, W) layer maps -> (B, H*W, C) contiguous float32 query rows."""
    b, c, h, w = pyramid_batch.shape
    return np.ascontiguousarray(np.asarray(pyramid_batch, dtype=np.float32).reshape(b, c, h * w).transpose(0, 2, 1))


def layer_distance_maps(pyramid: dict[str, np.ndarray], gallery: Gallery, neighbours: np.ndarray, config: SpadeConfig,
                        mode: str | None = None, coreset_ratio: float | None = None,
                        exclude_rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """{layer: (B, h, w) distance maps} of a batch's pyramid {layer: (B, C, h, w)}; ``neighbours`` (B, K) gallery rows.

    ``exclude_rows[i]``: a gallery row whose patches image i may not match (leave-one-out). Exact mode
    never sees it (it is not among the neighbours); the global memory bank skips its vectors.
    """
    mode = scoring_mode(config, mode)
    out = {}
    for layer in config.layers:
        maps = pyramid[layer]
        b, _, h, w = maps.shape
        queries = layer_queries(maps)
        if mode == "exact":
            dist = batch_layer_distances(queries, gallery.pyramid[layer], neighbours, config.kappa,
                                         refine=config.refine_distances)
        else:
            from spade.index.coreset import memory_bank_for

            ratio = coreset_ratio if coreset_ratio is not None else config.coreset_ratio
            bank = memory_bank_for(gallery, layer, ratio, projection=config.coreset_projection,
                                   max_candidates=config.coreset_max_candidates)
            own = None if exclude_rows is None else np.repeat(np.asarray(exclude_rows, dtype=np.int64), h * w)
            dist = bank.distances(queries.reshape(b * h * w, -1), config.kappa, exclude_row=own).reshape(b, h * w)
        out[layer] = dist.reshape(b, h, w)
    return out


def finish_map(layer_maps: list[np.ndarray], config: SpadeConfig) -> np.ndarray:
    """Upsample + average + smooth one image's per-layer maps into its (crop, crop) score map."""
    return smooth(combine_layer_maps(layer_maps, config.crop), config.sigma)


def score_batch(features: Features, gallery: Gallery, config: SpadeConfig, exclude_rows: np.ndarray | None = None,
                mode: str | None = None, coreset_ratio: float | None = None,
                normals: dict | None = None) -> list[ImageScore]:
    """Score every image of a batch; ``exclude_rows`` is for leave-one-out scoring of gallery images.

    All images of the batch go through the correspondence together, so gallery
    images shared by several test images' neighbour sets are read and multiplied once.
    ``normals``: the leave-one-out statistics of the gallery's normal images (the manifest's
    ``calibration``) that ``image_score: combined`` standardises by; default: the gallery's.
    """
    configure_threads(config.num_threads)
    distances, rows = nearest_images(gallery.index, features.embedding, config.k, exclude_rows=exclude_rows)
    knn = image_scores(distances)
    maps = layer_distance_maps({layer: features.pyramid[layer] for layer in config.layers}, gallery, rows, config,
                               mode=mode, coreset_ratio=coreset_ratio, exclude_rows=exclude_rows)
    stats = gallery.manifest.get("calibration") if normals is None else normals
    results = []
    for i in range(len(rows)):
        score_map = finish_map([maps[layer][i] for layer in config.layers], config)
        peak = float(score_map.max())
        results.append(ImageScore(image_score(config.image_score, float(knn[i]), peak, stats, gallery.url), rows[i],
                                  score_map, knn_score=float(knn[i]), map_max=peak))
    return results
