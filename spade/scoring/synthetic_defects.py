"""Synthetic defects drawn on normal images: the only defective examples a normal-only method can measure with.

The image decision sums several standardised terms (`spade.scoring.image_score`), and which of them separate
defects on a product differs by product: the patch bank's maximum on a tyre's tread, the map's rise above the normal
frames at the same place on a commutator's slots, where the bank term barely moves. Normal images cannot say which;
images with a defect drawn on them can, if the drawn defects reach the terms as real ones do. Two kinds, scaled to
the image's short side (256 pixels: the sizes below):

* ``scar``: a thin straight line (2-4 pixels wide, 12-48 long, any angle) 60-120 grey levels brighter or darker: a
  crack, scratch or cut;
* ``cut_paste``: a 10-28 pixel rectangle of another normal image (CutPaste, Li et al. 2021), sometimes flipped:
  foreign material, a misplaced part.

Both keep off the outer eighth of the frame, where a defect would be cut by the border. Seeded: the same images
give the same defects.
"""
from __future__ import annotations

import numpy as np

SCALE = 256  # the short side at which the sizes below are given
KINDS = ("scar", "cut_paste")


def _scale(rgb: np.ndarray) -> float:
    return max(min(rgb.shape[:2]) / SCALE, 1e-3)


def _centre(rng: np.random.Generator, height: int, width: int, margin_y: int = 0, margin_x: int = 0) -> tuple[int, int]:
    y0, x0 = height // 8, width // 8
    return (int(rng.integers(y0, max(y0 + 1, height - y0 - margin_y))),
            int(rng.integers(x0, max(x0 + 1, width - x0 - margin_x))))


def scar(rgb: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(image with a thin bright or dark line, its (H, W) boolean mask) of an (H, W, 3) uint8 image."""
    height, width = rgb.shape[:2]
    scale = _scale(rgb)
    length, thickness = rng.uniform(12, 48) * scale, rng.uniform(2, 4) * scale
    angle = rng.uniform(0, np.pi)
    cy, cx = _centre(rng, height, width)
    yy, xx = np.mgrid[0:height, 0:width]
    across = np.abs(-(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle))
    along = np.abs((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle))
    mask = (across <= thickness / 2) & (along <= length / 2)
    shift = rng.choice([-1.0, 1.0]) * rng.uniform(60, 120)
    out = rgb.astype(np.float32)
    out[mask] = np.clip(out[mask] + shift, 0, 255)
    return out.astype(np.uint8), mask


def cut_paste(rgb: np.ndarray, donor: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(image with a rectangle of ``donor`` pasted in, its mask); ``donor`` an (H', W', 3) uint8 image."""
    height, width = rgb.shape[:2]
    scale = _scale(rgb)
    rows = int(min(max(2, round(rng.uniform(10, 28) * scale)), height // 2, donor.shape[0]))
    cols = int(min(max(2, round(rng.uniform(10, 28) * scale)), width // 2, donor.shape[1]))
    sy, sx = int(rng.integers(0, donor.shape[0] - rows + 1)), int(rng.integers(0, donor.shape[1] - cols + 1))
    patch = donor[sy:sy + rows, sx:sx + cols]
    if rng.random() < 0.5:
        patch = patch[::-1]
    ty, tx = _centre(rng, height, width, rows, cols)
    out = rgb.copy()
    out[ty:ty + rows, tx:tx + cols] = patch
    mask = np.zeros((height, width), dtype=bool)
    mask[ty:ty + rows, tx:tx + cols] = True
    return out, mask


def synthetic_defect(rgb: np.ndarray, donor: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``rgb`` with one defect of ``kind`` (one of `KINDS`) drawn on it, and its mask."""
    if kind == "scar":
        return scar(rgb, rng)
    if kind == "cut_paste":
        return cut_paste(rgb, donor, rng)
    raise ValueError(f"synthetic defect kind must be one of {', '.join(KINDS)}, got {kind!r}")
