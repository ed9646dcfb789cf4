"""Decoding image bytes and the paper's preprocessing (resize, centre-crop, normalise)."""
from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class ImageDecodeError(ValueError):
    """An input could not be turned into an RGB image; the message says why."""


def content_id(data: bytes) -> str:
    """Stable identity of an image: the first 16 hex digits of the SHA-256 of its bytes."""
    return hashlib.sha256(data).hexdigest()[:16]


def decode_rgb(data: bytes) -> np.ndarray:
    """Decode encoded image bytes into an ``(H, W, 3)`` uint8 array.

    Grayscale, palette, 16-bit and RGBA inputs are converted to RGB (alpha is
    dropped onto black, as most inspection cameras have no alpha). Empty,
    truncated and non-image inputs raise `ImageDecodeError`.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                return _to_rgb(img)
    except UnidentifiedImageError:
        raise ImageDecodeError("not a readable image (unknown format or not an image file)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"corrupt or truncated image: {exc}") from None


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() if arr.max() > 0 else 1.0
        gray = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        span = float(arr.max() - arr.min()) or 1.0
        gray = ((arr - arr.min()) / span * 255.0).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (0, 0, 0))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return np.asarray(canvas, dtype=np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def resize_short_side(size: tuple[int, int], resize: int) -> tuple[int, int]:
    """(width, height) after scaling the short side to ``resize``, as torchvision's Resize(int) does."""
    width, height = size
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def preprocess(rgb: np.ndarray, resize: int, crop: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Resize the short side to ``resize`` (bilinear), centre-crop ``crop``², normalise: a ``(3, crop, crop)`` tensor."""
    img = Image.fromarray(rgb)
    new_w, new_h = resize_short_side(img.size, resize)
    img = img.resize((new_w, new_h), Image.BILINEAR)
    left, top = crop_origin((new_w, new_h), crop)
    img = img.crop((left, top, left + crop, top + crop))
    tensor = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (tensor - mean_t) / std_t


def crop_origin(size: tuple[int, int], crop: int) -> tuple[int, int]:
    """Top-left corner of a centre crop, rounded as torchvision's CenterCrop rounds it."""
    width, height = size
    return int(round((width - crop) / 2.0)), int(round((height - crop) / 2.0))
