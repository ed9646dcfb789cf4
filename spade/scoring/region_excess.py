"""How much of a frame rises above what normal frames reach there, as one connected region.

``map_residual`` (`spade.scoring.position_baseline`) reads the highest 0.1 % of a frame's map above the normal frames'
mean map at each place: a small defect's peak. A crack along a commutator rises only a little above normal, but over
a long, connected stretch, and its peak is no higher than a normal frame's own highest places. ``region_excess`` reads
that extent: the residual (the map less the position baseline) above the level normal frames' residuals reach at
`REGION_QUANTILE` of their pixels, summed over the largest connected region (8-connectivity) that rises above it,
as log(1 + mass), so the term's spread over normal frames is not set by their few largest regions. A frame with no
pixel above the level scores 0.

`REGION_BORDER` frame pixels along the frame's border are left out: the network saw its zero padding there, and a new
capture differs from the gallery's there first (the tire's good test frames peak at the border, 92 % of their
residual maxima within 16 pixels of it, against 32 % of the gallery's). The other terms still read the border.

The level is measured at `fit` on the calibration images' leave-one-out residuals (each image against the other
calibration images' baseline, as a new image is compared with all of theirs) and recorded in the manifest.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from spade.scoring.image_score import MissingCalibration
from spade.scoring.position_baseline import BASELINE_CELL, leave_one_out_residual_maps

REGION_QUANTILE = 0.995  # the level: normal frames' residual pixels above it are 1 in 200
REGION_BORDER = 16  # frame pixels along the border left out (one stride of the deepest layer)
_CONNECTIVITY = np.ones((3, 3), dtype=bool)


def _inside(residual: np.ndarray, border: int) -> np.ndarray:
    """The residual without ``border`` pixels along each side (all of it when the frame is too small for that)."""
    height, width = residual.shape
    if border <= 0 or 2 * border >= min(height, width):
        return residual
    return residual[border:height - border, border:width - border]


def region_excess(residual: np.ndarray, level: float, border: int = REGION_BORDER) -> float:
    """log(1 + the largest connected region's summed excess of ``residual`` over ``level``), ``border`` pixels along
    the frame's border left out; 0 when no pixel rises above the level."""
    excess = _inside(np.asarray(residual, dtype=np.float32), border) - np.float32(level)
    above = excess > 0
    if not above.any():
        return 0.0
    labels, count = ndimage.label(above, structure=_CONNECTIVITY)
    mass = np.bincount(labels.ravel(), weights=excess.ravel(), minlength=count + 1)[1:]  # label 0: below, dropped
    return float(np.log1p(mass.max()))


def region_record(maps: np.ndarray, cell: int = BASELINE_CELL, quantile: float = REGION_QUANTILE,
                  border: int = REGION_BORDER) -> tuple[dict[str, Any], np.ndarray]:
    """(the manifest's record {"level", "quantile", "border"}, each normal map's leave-one-out `region_excess`) of
    m >= 2 normal frame maps; the level is the ``quantile`` of their leave-one-out residual pixels inside the border."""
    maps = np.asarray(maps, dtype=np.float32)
    if len(maps) < 2:
        return {}, np.zeros(0)
    inside = np.concatenate([_inside(r, border).ravel() for r in leave_one_out_residual_maps(maps, cell)])
    level = float(np.quantile(inside, quantile))
    values = np.asarray([region_excess(r, level, border) for r in leave_one_out_residual_maps(maps, cell)])
    return {"level": level, "quantile": float(quantile), "border": int(border)}, values


def gallery_region(normals: dict[str, Any] | None, gallery: str = "the gallery") -> dict[str, Any]:
    """The gallery's region record (and the position baseline it is measured against); `MissingCalibration` naming
    the fix where `fit` did not record them (a gallery calibrated before they existed, or on fewer than 2 images)."""
    if not normals or not normals.get("region_level") or "position_baseline" not in normals:
        raise MissingCalibration(f"image_score region_excess / combined_region needs the normal images' region level "
                                 f"that `spade fit` records; {gallery} has none (fitted before it existed, or with "
                                 "fewer than 2 images). Re-run `spade fit`, or use image_score: combined_residual.")
    return normals["region_level"]
