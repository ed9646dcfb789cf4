"""Score maps and masks as PNG files: 16-bit score maps carrying their scale, binary masks."""
from __future__ import annotations

import io
import zlib

import numpy as np
from PIL import Image, PngImagePlugin

SCALE_KEY = "spade_scale"
_BLOCK = 1 << 20  # pixels per block when quantising a score map
PNG_LEVEL = 1  # zlib level of score maps and masks: fast encodes (see encode_score_map)
PNG_STRATEGY = zlib.Z_RLE  # zlib strategy of score maps and masks: run-length matches only (see encode_score_map)


def encode_score_map(score_map: np.ndarray) -> tuple[bytes, float]:
    """A 16-bit grayscale PNG of a non-negative score map, 65535 = its maximum; returns (png, scale).

    The scale is kept in the PNG (text chunk ``spade_scale``) and, by the
    pipelines, as ``pixel_max`` in the score table: score = value / 65535 * scale.
    Quantised in blocks of rows, so a map the size of a large original image needs
    a few bytes per pixel, not several float64 copies.
    """
    values = np.asarray(score_map)
    top = float(np.max(values)) if values.size else 0.0
    scale = top if top > 0 else 1.0
    quantised = np.empty(values.shape, dtype=np.uint16)
    step = max(1, _BLOCK // max(1, values.shape[1]))  # a (height, width) map
    for start in range(0, values.shape[0], step):
        block = np.clip(np.asarray(values[start:start + step], dtype=np.float64), 0.0, None)
        quantised[start:start + step] = np.round(block / scale * 65535.0)
    info = PngImagePlugin.PngInfo()
    info.add_text(SCALE_KEY, repr(scale))
    buffer = io.BytesIO()
    # zlib level 1: a 256x256 map encodes in 4.1 ms instead of 11.1 (level 6, PIL's default), a 900x900 one in 45
    # instead of 199, for files ~3 % larger; at archive scale the encode is a visible share of scoring. Z_RLE (matches
    # of the previous byte only) on top: metal_plate's 256x256 maps 2.8 ms instead of 4.4 and 3 % smaller, 900x900
    # ones 24 ms instead of 33 and 12 % larger; binary masks 0.29 ms instead of 0.44 and 43 % smaller
    Image.fromarray(quantised).save(buffer, format="PNG", pnginfo=info, compress_level=PNG_LEVEL,
                                    compress_type=PNG_STRATEGY)
    return buffer.getvalue(), scale


def decode_score_map(data: bytes) -> np.ndarray:
    """Inverse of `encode_score_map`: float32 scores."""
    with Image.open(io.BytesIO(data)) as img:
        scale = float(img.text.get(SCALE_KEY, "1.0")) if hasattr(img, "text") else 1.0
        values = np.asarray(img, dtype=np.float64)
    return (values / 65535.0 * scale).astype(np.float32)


def encode_mask(mask: np.ndarray) -> bytes:
    """Binary mask → 8-bit PNG (0 normal, 255 anomalous), the MVTec ground-truth convention."""
    binary = np.asarray(mask, dtype=bool).astype(np.uint8) * np.uint8(255)
    buffer = io.BytesIO()
    Image.fromarray(binary).save(buffer, format="PNG", compress_level=PNG_LEVEL, compress_type=PNG_STRATEGY)
    return buffer.getvalue()


def decode_mask(data: bytes) -> np.ndarray:
    """A ground-truth or predicted mask PNG → bool array (any non-zero pixel is anomalous)."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("L")) > 0
