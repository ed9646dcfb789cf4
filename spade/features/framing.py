"""What the model sees of an image (its frame, cut into tiles), and how a frame's score map goes back onto it.

Four framings, chosen by the config's ``framing``:

* ``crop`` (the paper): short side resized to ``resize``, centre ``crop``²; the borders are never seen;
* ``full``: the whole image squeezed to ``crop``²; a 1:2.5 frame loses 2.5x of its detail along one axis;
* ``aspect``: the whole image at the paper's pixel scale, short side ``resize`` and the long side in proportion,
  at the gallery's frame size (``frame_size``, fixed at fit from its images' median aspect);
* ``tiles``: the ``aspect`` frame cut into overlapping ``tile_size``² tiles, so a long strip or a large frame
  is inspected at the pixel scale with memory and correspondence cost per tile, not per frame.

Every framing gives a frame of one (height, width) and T tiles of one size covering it (T = 1 but for
``tiles``). A frame's pyramid map of a layer is its tiles' maps stacked along the height, (C, T*h, w): the
row layout of the gallery pyramid and the correspondence then serve every framing alike, and tile t of a frame
is the contiguous block of positions t*h*w .. (t+1)*h*w. Tile score maps are blended back into one frame map
with weights that fall off linearly across each overlap, so the stitched map has no seams.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from PIL import Image

from spade.config import SpadeConfig
from spade.io.images import crop_origin, frame as frame_image, resize_short_side

STRIDE = 32  # frame and tile sides are multiples of the backbone's largest stride: every layer's grid is whole


class FrameSizeUnset(ValueError):
    """An ``aspect`` or ``tiles`` config without ``frame_size``: fit decides it, scoring takes the gallery's."""


@dataclass(frozen=True)
class Tile:
    """A tile's box in frame pixels."""

    top: int
    left: int
    height: int
    width: int


def _round_to_stride(length: float) -> int:
    return max(STRIDE, int(round(length / STRIDE)) * STRIDE)


def frame_size_for(sizes: Iterable[tuple[int, int]], resize: int) -> tuple[int, int]:
    """(height, width) of the frame for images of ``sizes`` ((width, height) each): short side ``resize``, long side
    in proportion to their median aspect (width / height), rounded to a multiple of `STRIDE`."""
    aspects = [w / h for w, h in sizes if w > 0 and h > 0]
    if not aspects:
        raise ValueError("no image sizes to decide the frame size from")
    aspect = statistics.median(aspects)
    if aspect >= 1:
        return resize, _round_to_stride(resize * aspect)
    return _round_to_stride(resize / aspect), resize


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of side ``tile`` covering ``length`` with at least ``overlap`` shared, evenly spread
    (one tile when it covers the whole length)."""
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    return [int(round(i * (length - tile) / (count - 1))) for i in range(count)]


def _ramp(length: int, fade: int) -> np.ndarray:
    """1 in the middle, falling linearly to 1/(fade+1) over ``fade`` pixels at both ends."""
    position = np.arange(length, dtype=np.float32)
    if fade <= 0:
        return np.ones(length, dtype=np.float32)
    return np.minimum(1.0, np.minimum(position + 1, length - position) / (fade + 1)).astype(np.float32)


class Framing:
    """A frame of ``size`` (height, width) and the ``tiles`` covering it; see the module docstring."""

    name = "base"

    def __init__(self, size: tuple[int, int], tiles: tuple[Tile, ...], fade: int = 0):
        self.size = (int(size[0]), int(size[1]))
        self.tiles = tiles
        self.tile_size = (tiles[0].height, tiles[0].width)
        self.fade = fade

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, tiles={len(self.tiles)} of {self.tile_size})"

    def frame(self, img: Image.Image) -> Image.Image:
        """The image as the model sees it, ``size`` (height, width); bilinear resampling."""
        height, width = self.size
        return img.resize((width, height), Image.BILINEAR)

    def reframed(self, original_size: tuple[int, int], tolerance: float = 0.05) -> bool:
        """Whether an image of ``original_size`` (width, height) has an aspect more than ``tolerance`` (relative) away
        from the frame's, so that framing it stretches it (counted in the run summary)."""
        return False

    def cut(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) frames → (B*T, 3, th, tw) tiles, frame-major."""
        if len(self.tiles) == 1 and self.tile_size == self.size:
            return frames
        parts = [frames[:, :, t.top:t.top + t.height, t.left:t.left + t.width] for t in self.tiles]
        return torch.stack(parts, dim=1).reshape(-1, frames.shape[1], *self.tile_size)

    def stack(self, tile_maps: torch.Tensor) -> torch.Tensor:
        """(B*T, C, h, w) tile maps → (B, C, T*h, w): each frame's tiles stacked along the height."""
        count = len(self.tiles)
        if count == 1:
            return tile_maps
        bt, channels, h, w = tile_maps.shape
        return tile_maps.reshape(bt // count, count, channels, h, w).transpose(1, 2).reshape(bt // count, channels, count * h, w)

    def layer_grid(self, positions: int) -> tuple[int, int]:
        """(T*h, w) of a stacked layer map holding ``positions`` positions (the gallery stores only their count)."""
        per_tile = positions // len(self.tiles)
        th, tw = self.tile_size
        w = max(1, int(round(math.sqrt(per_tile * tw / th))))
        for candidate in sorted(range(max(1, w - 2), w + 3), key=lambda c: abs(c - w)):
            if per_tile % candidate == 0:
                return len(self.tiles) * (per_tile // candidate), candidate
        raise ValueError(f"{positions} positions do not form {len(self.tiles)} tiles of a {th}x{tw} framing")

    def blend(self, tile_maps: list[np.ndarray]) -> np.ndarray:
        """T (th, tw) tile maps → one (H, W) frame map, overlaps averaged with linearly falling weights."""
        if len(self.tiles) == 1 and self.tile_size == self.size:
            return tile_maps[0]
        height, width = self.size
        total = np.zeros((height, width), dtype=np.float32)
        weight = np.zeros((height, width), dtype=np.float32)
        th, tw = self.tile_size
        window = np.outer(_ramp(th, self.fade if th < height else 0), _ramp(tw, self.fade if tw < width else 0))
        for tile, values in zip(self.tiles, tile_maps):
            box = (slice(tile.top, tile.top + th), slice(tile.left, tile.left + tw))
            total[box] += window * values
            weight[box] += window
        return total / weight

    def interior_distance(self) -> np.ndarray:
        """(H, W): each frame pixel's distance in pixels to the nearest edge of the tile that holds it furthest
        inside (0 on a tile's outermost row or column). Features within a few of the deepest layer's strides of a
        tile's edge saw the network's zero padding there (`spade.scoring.position_baseline.edge_excess`)."""
        th, tw = self.tile_size
        rows, cols = np.arange(th)[:, None], np.arange(tw)[None, :]
        inside = np.minimum(np.minimum(rows, th - 1 - rows), np.minimum(cols, tw - 1 - cols)).astype(np.float32)
        out = np.zeros(self.size, dtype=np.float32)
        for tile in self.tiles:
            box = (slice(tile.top, tile.top + th), slice(tile.left, tile.left + tw))
            out[box] = np.maximum(out[box], inside)
        return out

    def to_original(self, frame_map: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """The (H, W) frame map resampled bilinearly onto the original (height, width) of ``original_size``
        (width, height)."""
        width, height = original_size
        if frame_map.shape == (height, width):
            return frame_map.astype(np.float32, copy=False)
        return np.asarray(Image.fromarray(frame_map.astype(np.float32)).resize((width, height), Image.BILINEAR),
                          dtype=np.float32)


class FullFraming(Framing):
    """The whole image squeezed to ``crop``² (aspect not kept, nothing cut off)."""

    name = "full"

    def __init__(self, crop: int):
        super().__init__((crop, crop), (Tile(0, 0, crop, crop),))


class CropFraming(Framing):
    """The paper's view: short side resized to ``resize``, the centre ``crop``²; outside it the map repeats the
    crop's border values."""

    name = "crop"

    def __init__(self, resize: int, crop: int):
        super().__init__((crop, crop), (Tile(0, 0, crop, crop),))
        self.resize = resize

    def frame(self, img: Image.Image) -> Image.Image:
        return frame_image(img, self.resize, self.size[0], "crop")

    def to_original(self, frame_map: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        width, height = original_size
        crop = self.size[0]
        new_w, new_h = resize_short_side(original_size, self.resize)
        left, top = crop_origin((new_w, new_h), crop)
        canvas = np.pad(frame_map.astype(np.float32), ((top, new_h - top - crop), (left, new_w - left - crop)), mode="edge")
        if (new_w, new_h) == (width, height):
            return canvas
        return np.asarray(Image.fromarray(canvas).resize((width, height), Image.BILINEAR), dtype=np.float32)


class AspectFraming(Framing):
    """The whole image at the gallery's frame size (its images' aspect kept, short side ``resize``); one tile."""

    name = "aspect"

    def __init__(self, size: tuple[int, int]):
        super().__init__(size, (Tile(0, 0, int(size[0]), int(size[1])),))

    def reframed(self, original_size: tuple[int, int], tolerance: float = 0.05) -> bool:
        width, height = original_size
        return abs((width / height) / (self.size[1] / self.size[0]) - 1.0) > tolerance


class TiledFraming(AspectFraming):
    """The ``aspect`` frame cut into overlapping ``tile``² tiles (row-major), at least ``overlap`` pixels shared."""

    name = "tiles"

    def __init__(self, size: tuple[int, int], tile: int, overlap: int):
        height, width = int(size[0]), int(size[1])
        th, tw = min(tile, height), min(tile, width)
        tiles = tuple(Tile(top, left, th, tw) for top in tile_starts(height, th, overlap)
                      for left in tile_starts(width, tw, overlap))
        Framing.__init__(self, (height, width), tiles, fade=overlap)


def framing_for(config: SpadeConfig, fallback_size: tuple[int, int] | None = None) -> Framing:
    """The `Framing` a config asks for; ``aspect`` and ``tiles`` need ``frame_size`` (fit decides it from the
    images, scoring takes the gallery's: `spade.index.gallery.with_gallery_settings`), else ``fallback_size``
    (height, width) when given (benchmarks on sets of one known size)."""
    if config.framing == "crop":
        return CropFraming(config.resize, config.crop)
    if config.framing == "full":
        return FullFraming(config.crop)
    if config.frame_size is None and fallback_size is not None:
        config = config.replace(frame_size=tuple(fallback_size))
    if config.frame_size is None:
        raise FrameSizeUnset(f"framing: {config.framing} needs frame_size [height, width]: `spade fit` decides it from "
                             "the images and records it in the gallery, `spade score` takes the gallery's; set "
                             "frame_size in the config to choose it yourself")
    if config.framing == "aspect":
        return AspectFraming(config.frame_size)
    if config.framing == "tiles":
        return TiledFraming(config.frame_size, config.tile_size, config.tile_overlap)
    raise ValueError(f"framing must be crop, full, aspect or tiles, got {config.framing!r}")
