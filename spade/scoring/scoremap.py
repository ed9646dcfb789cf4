"""From per-layer distance maps to one smoothed score map, and between crop and original geometry."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import gaussian_filter

from spade.io.images import crop_origin, resize_short_side


def combine_layer_maps(layer_maps: list[np.ndarray], size: int) -> np.ndarray:
    """Upsample each (h, w) map bilinearly to (size, size) and average them."""
    if not layer_maps:
        raise ValueError("need at least one layer map")
    ups = [
        F.interpolate(torch.from_numpy(np.asarray(m, dtype=np.float32))[None, None], size=(size, size),
                      mode="bilinear", align_corners=False)[0, 0]
        for m in layer_maps
    ]
    return torch.stack(ups).mean(0).numpy()


def smooth(score_map: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing (scipy's gaussian_filter, reflect borders), as the reference implementations do."""
    if sigma <= 0:
        return score_map.astype(np.float32, copy=False)
    return gaussian_filter(score_map.astype(np.float32, copy=False), sigma=sigma).astype(np.float32)


def crop_box(original_size: tuple[int, int], resize: int, crop: int) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the model's centre crop in the original image's pixel coordinates."""
    width, height = original_size
    new_w, new_h = resize_short_side(original_size, resize)
    left, top = crop_origin((new_w, new_h), crop)
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + crop) * sx, (top + crop) * sy


def crop_box_pixels(original_size: tuple[int, int], resize: int, crop: int) -> tuple[int, int, int, int]:
    """`crop_box` rounded to whole pixels, for slicing arrays of the original size."""
    left, top, right, bottom = crop_box(original_size, resize, crop)
    return int(round(left)), int(round(top)), int(round(right)), int(round(bottom))


def to_original_geometry(crop_map: np.ndarray, original_size: tuple[int, int], resize: int, crop: int,
                         framing: str = "crop") -> np.ndarray:
    """Map a (crop, crop) score map back onto the original (H, W) image.

    ``framing`` full: the map covers the whole frame and is resampled bilinearly to (H, W).
    ``framing`` crop: inside the crop the map is resampled bilinearly; outside it (never seen by
    the model) the nearest border values are repeated.
    """
    width, height = original_size
    if framing == "full":
        if crop_map.shape == (height, width):
            return crop_map.astype(np.float32, copy=False)
        return np.asarray(Image.fromarray(crop_map.astype(np.float32)).resize((width, height), Image.BILINEAR),
                          dtype=np.float32)
    new_w, new_h = resize_short_side(original_size, resize)
    left, top = crop_origin((new_w, new_h), crop)
    canvas = np.pad(crop_map.astype(np.float32), ((top, new_h - top - crop), (left, new_w - left - crop)), mode="edge")
    if (new_w, new_h) == (width, height):
        return canvas
    return np.asarray(Image.fromarray(canvas).resize((width, height), Image.BILINEAR), dtype=np.float32)
