"""Scoring a batch of test images against a gallery: image kNN, then patch correspondence per layer.

Two pixel modes:

* ``exact`` (default, the SPADE paper): each position's distance to the kappa
  nearest features among all positions of the image's K nearest normal images,
  computed for the whole batch at once (`spade.scoring.correspondence.batch_layer_distances`; on a CUDA
  device `spade.scoring.device_search`, the same distances);
* ``approximate``: each position's distance to the kappa nearest features of a
  global per-layer memory bank reduced by greedy coreset subsampling
  (PatchCore-style, `spade.index.coreset`), searched with a faiss index. For galleries
  too large for exact correspondence; the image score is SPADE's kNN score in both.

In exact mode the layers of ``approximate_layers`` (the default: layer 1, most of the exact search's work) are
searched in the coreset bank too, the others exactly (`SpadeConfig.coreset_layers`).
The mode and coreset ratio come from the config (``scoring_mode``,
``coreset_ratio``) or are passed explicitly.

Every result carries both image-level terms, the kNN score and the maximum of the smoothed
score map; the image score is the one ``image_score`` asks for (`spade.scoring.image_score`).

With ``approximate_local_radius`` a bank-searched layer's pixel distance is the smaller of the bank's and a local
window's among the K nearest frames (`spade.scoring.local_search`): sharper maps. The image terms read the map made
with the bank's distance alone: the local window finds a gallery image's near-identical captures among its nearest
frames, so the leave-one-out maps calibration measures would read lower than a new capture's (5 of 25 good tires
flagged against 2; README "Accuracy").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from spade.features.backbone import Features
from spade.config import SpadeConfig
from spade.features.runtime import resolve_device
from spade.scoring.correspondence import batch_layer_distances, configure_threads
from spade.scoring.lanes import each_in_lanes, halves, in_lanes
from spade.scoring.device_search import device_layer_distances
from spade.scoring.local_search import local_window_distances
from spade.features.framing import Framing, framing_for
from spade.index.gallery import Gallery, with_gallery_settings
from spade.index.pyramid import TileRows
from spade.index.knn import image_scores, nearest_images
from spade.index.patch_bank import bank_maxima, patch_bank_for
from spade.scoring.image_score import MODE_TERMS, image_score, map_top, require_normals
from spade.scoring.position_baseline import RESIDUAL_FRACTION, baseline_map, gallery_edge_excess
from spade.scoring.region_excess import gallery_region, region_excess
from spade.scoring.scoremap import combine_layer_maps, smooth

MODES = ("exact", "approximate")


@dataclass
class ImageScore:
    """One test image's result: image score, neighbour rows, its frame's (H, W) pixel score map (less the normal
    frames' tile-edge excess where ``map_edge_band`` asks for it), and the terms image scores are made of (kNN score,
    maximum and top-1 % mean of the method's map before that correction, as calibration measured them, and the patch
    bank's maximum and the map's residual above the normal position baseline where the image score uses them)."""

    image_score: float
    neighbours: np.ndarray
    score_map: np.ndarray
    knn_score: float = float("nan")
    map_max: float = float("nan")
    map_top: float = float("nan")
    bank_max: float = float("nan")
    map_residual: float = float("nan")
    region_excess: float = float("nan")
    term_map: np.ndarray | None = None  # the (H, W) map the map terms read (`LayerMaps.terms`); calibration's baseline


def scoring_mode(config: SpadeConfig, mode: str | None = None) -> str:
    chosen = mode or config.scoring_mode
    if chosen not in MODES:
        raise ValueError(f"scoring_mode must be one of {', '.join(MODES)}, got {chosen!r}")
    return chosen


def layer_queries(pyramid_batch: np.ndarray) -> np.ndarray:
    """(B, C, H, W) layer maps -> (B, H*W, C) contiguous float32 query rows."""
    b, c, h, w = pyramid_batch.shape
    return np.ascontiguousarray(np.asarray(pyramid_batch, dtype=np.float32).reshape(b, c, h * w).transpose(0, 2, 1))


def tile_neighbours(neighbours: np.ndarray, tiles: int, same_place: bool) -> np.ndarray:
    """(B, K) neighbour frames → (B*T, K) tile rows of `TileRows` at the same place (tile t of each neighbour),
    or (B*T, K*T) every tile of each neighbour."""
    neighbours = np.asarray(neighbours, dtype=np.int64)
    b, k = neighbours.shape
    if same_place:
        return (neighbours[:, None, :] * tiles + np.arange(tiles)[None, :, None]).reshape(b * tiles, k)
    every = (neighbours[:, :, None] * tiles + np.arange(tiles)[None, None, :]).reshape(b, k * tiles)
    return np.repeat(every, tiles, axis=0)


def _exact_search(config: SpadeConfig) -> Callable[[np.ndarray, object, np.ndarray], np.ndarray]:
    """The exact correspondence for the config's ``device``: the CPU search, or the same distances in torch ops on
    a CUDA device (`spade.scoring.device_search`)."""
    device = resolve_device(config.device)
    if device.type != "cpu":
        return lambda queries, rows, neighbours: device_layer_distances(queries, rows, neighbours, config.kappa, device)

    def search(queries: np.ndarray, rows, neighbours: np.ndarray) -> np.ndarray:
        # the batch's images in two lanes (`spade.scoring.lanes`): each image against its own neighbours, as in one
        def part(images: slice) -> np.ndarray:
            return batch_layer_distances(queries[images], rows, neighbours[images], config.kappa,
                                         refine=config.refine_distances, kernel=config.search_kernel)

        return np.concatenate(in_lanes(part, halves(len(queries), config.num_threads), config.num_threads))

    return search


def _exact_distances(queries: np.ndarray, layer_rows, neighbours: np.ndarray, config: SpadeConfig, tiles: int) -> np.ndarray:
    """(B, P) exact correspondence distances; with T tiles per frame each test tile is searched among its
    neighbours' tiles (`tile_neighbours`), so the cost grows with the frame's length, not its square."""
    search = _exact_search(config)
    if tiles == 1:
        return search(queries, layer_rows, neighbours)
    b, p, c = queries.shape
    dist = search(queries.reshape(b * tiles, p // tiles, c), TileRows(layer_rows, tiles),
                  tile_neighbours(neighbours, tiles, config.tile_neighbours == "same"))
    return dist.reshape(b, p)


def _local_distances(maps: np.ndarray, layer_rows, neighbours: np.ndarray, config: SpadeConfig) -> np.ndarray:
    """(B, h*w) each position's nearest feature among its K nearest frames' features near the same place
    (`spade.scoring.local_search`), the batch's images in two lanes."""
    def part(images: slice) -> list[np.ndarray]:
        return [local_window_distances(maps[i], layer_rows[np.asarray(neighbours[i], dtype=np.int64)],
                                       config.approximate_local_radius, config.approximate_local_block).reshape(-1)
                for i in range(len(maps))[images]]

    parts = in_lanes(part, halves(len(maps), config.num_threads), config.num_threads)
    return np.stack([row for rows in parts for row in rows])


@dataclass
class LayerMaps:
    """A batch's {layer: (B, T*h, w)} distance maps: ``pixel``, what its score maps are made of, and ``terms``, what
    the image terms read: the same arrays but for the layers a local window searched beside the coreset bank, whose
    term maps hold the bank's distances alone (module docstring)."""

    pixel: dict[str, np.ndarray]
    terms: dict[str, np.ndarray]

    @property
    def split(self) -> bool:
        """Whether the term maps differ from the pixel maps (a local search ran)."""
        return any(self.terms[layer] is not maps for layer, maps in self.pixel.items())


def layer_distance_maps(pyramid: dict[str, np.ndarray], gallery: Gallery, neighbours: np.ndarray, config: SpadeConfig,
                        mode: str | None = None, coreset_ratio: float | None = None,
                        exclude_rows: np.ndarray | None = None) -> LayerMaps:
    """The pixel and term `LayerMaps` {layer: (B, T*h, w)} of a batch's pyramid {layer: (B, C, T*h, w)} (T tiles
    stacked, see `spade.features.framing`); ``neighbours`` (B, K) gallery rows.

    ``exclude_rows[i]``: a gallery row whose patches image i may not match (leave-one-out). Exact mode
    never sees it (it is not among the neighbours); the global memory bank skips its vectors.
    """
    mode = scoring_mode(config, mode)
    tiles = len(framing_for(with_gallery_settings(config, gallery.manifest)).tiles)
    out, terms = {}, {}
    for layer in config.layers:
        maps = pyramid[layer]
        b, _, h, w = maps.shape
        queries = layer_queries(maps)
        if mode == "exact" and layer not in config.coreset_layers:
            dist = _exact_distances(queries, gallery.pyramid[layer], neighbours, config, tiles)
        else:
            from spade.index.coreset import coreset_settings, memory_bank_for

            bank = memory_bank_for(gallery, layer, **coreset_settings(config, coreset_ratio))
            own = None if exclude_rows is None else np.repeat(np.asarray(exclude_rows, dtype=np.int64), h * w)
            dist = bank.distances(queries.reshape(b * h * w, -1), config.kappa, exclude_row=own,
                                  kernel=config.search_kernel).reshape(b, h * w)
            if config.approximate_local_radius:
                terms[layer] = dist.reshape(b, h, w)
                dist = np.minimum(dist, _local_distances(maps, gallery.pyramid[layer], neighbours, config))
        out[layer] = dist.reshape(b, h, w)
        terms.setdefault(layer, out[layer])
    return LayerMaps(out, terms)


def finish_map(layer_maps: list[np.ndarray], config: SpadeConfig, framing: Framing | None = None) -> np.ndarray:
    """One frame's per-layer maps (T*h, w each) into its (H, W) score map: each tile's layers upsampled to the tile
    and averaged, the tiles blended into the frame, then smoothed over the whole frame (no seams)."""
    framing = framing or framing_for(config)
    count = len(framing.tiles)
    tile_maps = []
    for t in range(count):
        parts = [m[t * (m.shape[0] // count):(t + 1) * (m.shape[0] // count)] for m in layer_maps]
        tile_maps.append(combine_layer_maps(parts, framing.tile_size))
    return smooth(framing.blend(tile_maps), config.sigma)


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
    config = with_gallery_settings(config, gallery.manifest)
    framing = framing_for(config)
    distances, rows = nearest_images(gallery.index, features.embedding, config.k, exclude_rows=exclude_rows)
    knn = image_scores(distances)
    maps = layer_distance_maps({layer: features.pyramid[layer] for layer in config.layers}, gallery, rows, config,
                               mode=mode, coreset_ratio=coreset_ratio, exclude_rows=exclude_rows)
    banks = np.full(len(rows), np.nan)
    if "bank_max" in MODE_TERMS[config.image_score]:
        banks = bank_maxima({layer: features.pyramid[layer] for layer in config.bank_layers},
                            patch_bank_for(gallery, config, framing), config.bank_layers, len(framing.tiles), exclude_rows,
                            kernel=config.search_kernel)
    stats = gallery.manifest.get("calibration") if normals is None else normals
    baseline = region = None
    uses = MODE_TERMS[config.image_score]
    if "region_excess" in uses:
        region = gallery_region(stats, gallery.url)
    if "map_residual" in uses or "region_excess" in uses:
        require_normals(config.image_score, stats, gallery.url)
        baseline = baseline_map(stats["position_baseline"], framing.size)

    excess = gallery_edge_excess(stats, framing, config.map_edge_band, gallery.url, baseline)

    def finish(i: int) -> ImageScore:
        method_map = finish_map([maps.pixel[layer][i] for layer in config.layers], config, framing)
        term_map = finish_map([maps.terms[layer][i] for layer in config.layers], config, framing) if maps.split \
            else method_map
        peak, top = float(term_map.max()), map_top(term_map)
        above = None if baseline is None else term_map - baseline
        residual = float("nan") if above is None else map_top(above, RESIDUAL_FRACTION)
        extent = float("nan") if region is None else region_excess(above, region["level"], region["border"])
        terms = {"map_top": top, "bank_max": float(banks[i]), "map_residual": residual, "region_excess": extent}
        return ImageScore(image_score(config.image_score, float(knn[i]), peak, stats, gallery.url, **terms),
                          rows[i], method_map if excess is None else method_map - excess, knn_score=float(knn[i]),
                          map_max=peak, term_map=term_map, **terms)

    return each_in_lanes(finish, range(len(rows)), config.num_threads)
