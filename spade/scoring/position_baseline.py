"""Where normal frames score high, place by place, and how far an image's map rises above that.

A product framed in place has parts whose patches are far from every normal neighbour's in every normal frame too
(a commutator's slot edges, a tyre's tread rim, a bottle's lip). Their distances are part of the method's map, and
an image score taken from the map's highest values (``map_max``, ``map_top``) reads them in every frame, so a
small defect elsewhere barely rises above the normal images' own peaks. The calibration images' leave-one-out maps
(`spade.scoring.calibration`) say how high each place of a normal frame scores: their mean, kept on a coarse grid
of `BASELINE_CELL` frame pixels (a few kB in the manifest; a grid of 8 pixels scored as the full-resolution mean on
the four shared sets, benchmarks/image_decision.py). ``map_residual``, the mean of the highest `RESIDUAL_FRACTION`
of an image's map minus that baseline, is the image term of how far it rises above normal at the same place, as
PaDiM models each position's normal features. The image decision uses it whole; the pixel maps only near tiles'
edges (the baseline removed everywhere loses on frames whose parts do not sit at the same place, the tire's).

``edge_excess``: features within a few of the deepest layer's strides of a tile's edge saw the network's zero padding,
and their distances run high in every frame (the commutators' layer-3 cells at a tile's edge 21.8 against 17.3
inside); a defect there reads as no higher than normal, and normal frames' edges and the seams between tiles read as
defects. ``map_edge_band`` removes, within that band only, how far the baseline rises above its median further
inside, never more: a product's own structure inside the band stays (the tire's tread) unless it is an excess every
normal frame shows there.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from spade.features.framing import Framing
from spade.scoring.image_score import MissingCalibration, map_top

BASELINE_CELL = 8  # frame pixels per grid cell
RESIDUAL_FRACTION = 0.001  # the highest 0.1 % of a frame's positions: a small defect's extent, not one pixel


def baseline_grids(maps: np.ndarray, cell: int = BASELINE_CELL) -> np.ndarray:
    """(m, h, w) grids of ``cell``-pixel means of (m, H, W) frame maps (h = ceil(H / cell))."""
    maps = np.asarray(maps, dtype=np.float32)
    height, width = maps.shape[-2:]
    grid = (math.ceil(height / cell), math.ceil(width / cell))
    return F.adaptive_avg_pool2d(torch.from_numpy(np.ascontiguousarray(maps))[:, None], grid)[:, 0].numpy()


def position_baseline(maps: np.ndarray, cell: int = BASELINE_CELL) -> dict[str, Any]:
    """The manifest's record of normal frames' mean map: {"cell", "frame": [H, W], "shape": [h, w], "values"}."""
    maps = np.asarray(maps, dtype=np.float32)
    mean = baseline_grids(maps, cell).mean(0)
    return {"cell": int(cell), "frame": [int(v) for v in maps.shape[-2:]], "shape": [int(v) for v in mean.shape],
            "values": [float(f"{v:.6g}") for v in mean.ravel()]}


def upsampled(grid: np.ndarray, frame: tuple[int, int]) -> np.ndarray:
    """A (h, w) grid bilinearly upsampled to the (H, W) frame."""
    tensor = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=tuple(frame), mode="bilinear", align_corners=False)[0, 0].numpy()


def baseline_map(record: dict[str, Any], frame: tuple[int, int]) -> np.ndarray:
    """The (H, W) baseline of a `position_baseline` record, for frames of ``frame`` size; a frame of another size
    than calibration's (a gallery's frame is fixed at fit, so only a mismatched config) is refused, named."""
    if tuple(record["frame"]) != tuple(frame):
        raise ValueError(f"the gallery's position baseline was measured on {record['frame'][0]}x{record['frame'][1]} "
                         f"frames, this config frames {frame[0]}x{frame[1]}: score with the gallery's framing settings "
                         "or re-run `spade fit` with this config")
    return upsampled(np.asarray(record["values"], dtype=np.float32).reshape(record["shape"]), frame)


def map_residual(score_map: np.ndarray, baseline: np.ndarray, fraction: float = RESIDUAL_FRACTION) -> float:
    """The mean of the highest ``fraction`` (at least one) of ``score_map - baseline``."""
    return map_top(np.asarray(score_map, dtype=np.float32) - baseline, fraction)


def edge_excess(baseline: np.ndarray, interior: np.ndarray, band: int) -> np.ndarray:
    """(H, W): within ``band`` pixels of a tile's edge (``interior``: `Framing.interior_distance`), how far the
    ``baseline`` map rises above its median further inside (at least 0); 0 beyond the band and everywhere when
    ``band`` is 0."""
    baseline = np.asarray(baseline, dtype=np.float32)
    near = interior < band
    if not near.any():
        return np.zeros_like(baseline)
    inside = baseline[~near] if (~near).any() else baseline
    return np.where(near, np.maximum(baseline - np.median(inside), 0.0), 0.0).astype(np.float32)


def gallery_edge_excess(normals: dict[str, Any] | None, framing: Framing, band: int, gallery: str = "the gallery",
                        baseline: np.ndarray | None = None) -> np.ndarray | None:
    """The (H, W) `edge_excess` a gallery's score maps are corrected by, measured on the normal frames' pixel maps
    (``pixel_baseline`` where they differ from the maps the image terms read, else ``position_baseline``): None when
    ``band`` is 0 or the gallery has no normal maps to measure it on (fewer than 2 calibration images: the method's
    distances as they are); `MissingCalibration` when it was calibrated before the position baseline was recorded.
    ``baseline``: the `baseline_map` of ``position_baseline`` for ``framing`` where the caller has it already."""
    if band <= 0 or not normals:
        return None
    if "position_baseline" not in normals:
        raise MissingCalibration(f"map_edge_band: {band} needs the normal images' mean map that `spade fit` records; "
                                 f"{gallery} was calibrated before it existed. Re-run `spade fit`, or score with "
                                 "map_edge_band: 0 (the maps it was calibrated on).")
    if "pixel_baseline" in normals:
        baseline = baseline_map(normals["pixel_baseline"], framing.size)
    elif baseline is None:
        baseline = baseline_map(normals["position_baseline"], framing.size)
    return edge_excess(baseline, framing.interior_distance(), band)


def leave_one_out_edge_corrected(maps: np.ndarray, interior: np.ndarray, band: int,
                                 cell: int = BASELINE_CELL) -> np.ndarray:
    """m >= 2 normal frame maps, each less the `edge_excess` of the other m - 1's baseline (on the grid the manifest
    records): the maps a new normal image's corrected map is compared with (the calibrated pixel threshold)."""
    maps = np.asarray(maps, dtype=np.float32)
    if len(maps) < 2 or band <= 0:
        return maps
    return np.stack([m - edge_excess(others, interior, band) for m, others in _with_the_others_baseline(maps, cell)])


def leave_one_out_residuals(maps: np.ndarray, cell: int = BASELINE_CELL) -> np.ndarray:
    """``map_residual`` of each of m >= 2 normal frame maps against the baseline of the other m - 1: a calibration
    image's own map is not part of the normal it is compared with, as a new image's is not."""
    maps = np.asarray(maps, dtype=np.float32)
    if len(maps) < 2:
        return np.zeros(0)
    return np.asarray([map_top(r, RESIDUAL_FRACTION) for r in leave_one_out_residual_maps(maps, cell)])


def leave_one_out_residual_maps(maps: np.ndarray, cell: int = BASELINE_CELL) -> Iterator[np.ndarray]:
    """Each of m >= 2 (H, W) normal frame maps less the baseline of the other m - 1 (one at a time: m full maps
    need not be held twice)."""
    for m, others in _with_the_others_baseline(np.asarray(maps, dtype=np.float32), cell):
        yield m - others


def _with_the_others_baseline(maps: np.ndarray, cell: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each of m >= 2 (H, W) maps with the (H, W) baseline of the other m - 1 (their mean on the ``cell`` grid)."""
    grids = baseline_grids(maps, cell)
    total = grids.sum(0)
    for m, g in zip(maps, grids):
        yield m, upsampled((total - g) / (len(maps) - 1), m.shape)
