"""From per-layer distance maps to one smoothed score map, and between crop and original geometry."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from spade.features.framing import CropFraming, FullFraming
from spade.io.images import crop_origin, resize_short_side


def combine_layer_maps(layer_maps: list[np.ndarray], size: int | tuple[int, int]) -> np.ndarray:
    """Upsample each (h, w) map bilinearly to ``size`` ((height, width), or an int for a square) and average them."""
    if not layer_maps:
        raise ValueError("need at least one layer map")
    size = (size, size) if isinstance(size, int) else tuple(size)
    ups = [
        F.interpolate(torch.from_numpy(np.asarray(m, dtype=np.float32))[None, None], size=size,
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


def to_original_geometry(frame_map: np.ndarray, original_size: tuple[int, int], resize: int, crop: int,
                         framing="crop") -> np.ndarray:
    """Map a frame's score map back onto the original (H, W) image: ``framing`` is a
    `spade.features.framing.Framing` or the name ``crop`` / ``full`` (see their ``to_original``)."""
    if isinstance(framing, str):
        if framing == "full":
            framing = FullFraming(crop)
        elif framing == "crop":
            framing = CropFraming(resize, crop)
        else:
            raise ValueError(f"framing {framing!r} needs its frame size: pass framing_for(config)")
    return framing.to_original(frame_map, original_size)
