"""Decoding image bytes and preprocessing (the paper's resize + centre crop, or the whole frame; normalise)."""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from struct import error as struct_error
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from spade.config import BRIGHTNESS, IMAGENET_MEAN

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# `brightness: auto`: a gallery whose frames' median brightness lies above this is moved to ImageNet's mean; between
# the shared sets' 0.54-0.55 (bottle, metal_plate; their brightest frames 0.58 and 0.61) and 0.73 (the commutators)
BRIGHT_GALLERY = 0.65


class ImageDecodeError(ValueError):
    """An input could not be turned into an RGB image; the message says why."""


class ImageBeyondLimits(ImageDecodeError):
    """An image whose header is beyond a `DecodeLimits` bound; the message names the config key to raise."""


def content_id(data: bytes) -> str:
    """Stable identity of an image: the first 16 hex digits of the SHA-256 of its bytes."""
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds checked on an image's header before its pixels are decoded, so that no single input can take
    the machine's memory: ``max_source_pixels`` (width x height of the file) and ``max_aspect_ratio`` (long side
    / short side; the short side is resized to ``resize`` first, so the resized image grows with it).
    ``None`` switches a bound off. The config keys of the same names set them."""

    max_source_pixels: int | None = None
    max_aspect_ratio: float | None = None

    def check(self, size: tuple[int, int]) -> None:
        """Raise `ImageDecodeError` naming the limit and the config key to raise when ``size`` is beyond one."""
        width, height = size
        if width < 1 or height < 1:
            raise ImageDecodeError(f"image has no pixels ({width}x{height})")
        if self.max_source_pixels is not None and width * height > self.max_source_pixels:
            raise ImageBeyondLimits(
                f"image is {width}x{height} = {width * height / 1e6:.1f} megapixels, above the limit max_source_pixels="
                f"{self.max_source_pixels} (memory grows with it); not decoded. Raise `max_source_pixels` in the "
                "config to score it, or remove the file")
        aspect = max(width, height) / min(width, height)
        if self.max_aspect_ratio is not None and aspect > self.max_aspect_ratio:
            raise ImageBeyondLimits(
                f"image is {width}x{height}, aspect ratio {aspect:.1f}, above the limit max_aspect_ratio="
                f"{self.max_aspect_ratio:g} (the short side is resized first, so memory grows with it); not decoded. "
                "Raise `max_aspect_ratio` in the config to score it, or remove the file")


def decode_rgb(data: bytes, limits: DecodeLimits | None = None) -> np.ndarray:
    """Decode encoded image bytes into an ``(H, W, 3)`` uint8 array, upright.

    The EXIF orientation is applied (as every photo viewer does), so a camera JPEG tagged "rotate 90" is scored
    as it is seen. Grayscale, palette, 16-bit and RGBA inputs are converted to RGB (alpha is dropped onto
    black, as most inspection cameras have no alpha); a multi-frame file gives its first frame. ``limits``
    are checked on the header, before any pixel is decoded. Empty, truncated, oversized and non-image
    inputs raise `ImageDecodeError`.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Pillow's notes on damaged metadata; the pixels decide
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if limits is not None:
                    limits.check(img.size)
                img.load()
                return _to_rgb(_upright(img))
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not a readable image (unknown format or not an image file)") from None
    except (OSError, SyntaxError, ValueError, TypeError, IndexError, KeyError, EOFError, struct_error,
            Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image: {exc.__class__.__name__}: {exc}") from None


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of encoded image bytes as `decode_rgb` would turn them (EXIF orientation applied), read from
    the header alone; None for bytes that are no readable image."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            orientation = img.getexif().get(0x0112, 1)
    except Exception:
        return None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _upright(img: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation tag says; unchanged without one (or with an unreadable one)."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a damaged EXIF block is no reason to refuse the pixels
        return img
    if orientation in (None, 1):
        return img
    return ImageOps.exif_transpose(img) or img


def _to_rgb(img: Image.Image) -> np.ndarray:
    """RGB uint8 pixels of any PIL mode; 16/32-bit and float images are scaled into 0..255 (float32, in place,
    so a large one costs a few bytes per pixel, not tens)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.array(img, dtype=np.float32)
        if arr.ndim != 2:
            raise ImageDecodeError(f"unsupported pixel layout for mode {img.mode}: shape {arr.shape}")
        np.nan_to_num(arr, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        low = float(arr.min()) if img.mode == "F" else 0.0
        span = float(arr.max()) - low
        arr -= low
        arr *= 255.0 / (span if span > 0 else 1.0)
        np.clip(arr, 0, 255, out=arr)
        gray = arr.astype(np.uint8)
        del arr
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (0, 0, 0))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return np.asarray(canvas, dtype=np.uint8)
    if img.mode == "RGB":  # no converted copy: a large image costs its pixels once more, not twice
        return np.asarray(img, dtype=np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def resize_short_side(size: tuple[int, int], resize: int) -> tuple[int, int]:
    """(width, height) after scaling the short side to ``resize``, as torchvision's Resize(int) does."""
    width, height = size
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def frame(img: Image.Image, resize: int, crop: int, framing: str = "crop") -> Image.Image:
    """The ``crop``² view of an image the model sees (bilinear resampling).

    ``crop`` (the paper): the short side resized to ``resize``, then the centre ``crop``²;
    ``full``: the whole frame resized to ``crop``² (aspect ratio not kept, nothing cut off), so a
    defect at the border of a wide or tall image is inspected too.
    """
    if framing == "full":
        return img.resize((crop, crop), Image.BILINEAR)
    if framing != "crop":
        raise ValueError(f"framing {framing!r} needs its frame size: pass a spade.features.framing.Framing "
                         "(framing_for(config)); by name only 'crop' or 'full'")
    new_w, new_h = resize_short_side(img.size, resize)
    img = img.resize((new_w, new_h), Image.BILINEAR)
    left, top = crop_origin((new_w, new_h), crop)
    return img.crop((left, top, left + crop, top + crop))


def preprocess(rgb: np.ndarray, resize: int, crop: int, mean: tuple[float, ...], std: tuple[float, ...],
               framing="crop", brightness: str = "keep") -> torch.Tensor:
    """Frame the image, normalise: a ``(3, height, width)`` tensor. ``framing``: ``crop`` or ``full`` (`frame`,
    ``(3, crop, crop)``) or a `spade.features.framing.Framing` (its ``frame``: every framing, its frame size).
    ``brightness`` (config ``brightness``): ``keep``, or ``imagenet_mean``, the framed image's mean over its pixels
    and channels moved to that of ImageNet's photos by one offset (`match_brightness`), before ``mean``/``std``."""
    pil = Image.fromarray(rgb)
    img = frame(pil, resize, crop, framing) if isinstance(framing, str) else framing.frame(pil)
    tensor = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    if brightness == "imagenet_mean":
        tensor = match_brightness(tensor, sum(IMAGENET_MEAN) / len(IMAGENET_MEAN))
    elif brightness != "keep":
        raise ValueError(f"brightness {brightness!r}: use {' or '.join(BRIGHTNESS)}")
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (tensor - mean_t) / std_t


def match_brightness(tensor: torch.Tensor, level: float) -> torch.Tensor:
    """``tensor`` (channels, height, width; intensities in [0, 1]) shifted by one offset so its mean over every pixel
    and channel is ``level``: the frame's brightness as the network's training photos had it, its colour balance and
    contrast kept (values may leave [0, 1]; nothing is clipped)."""
    return tensor + (level - tensor.mean())


def frame_brightness(rgb: np.ndarray) -> float:
    """An image's mean intensity over its pixels and channels, in [0, 1]: the level `match_brightness` moves."""
    return float(rgb.mean(dtype=np.float64) / 255.0)


def brightness_for(levels: Sequence[float]) -> str:
    """``brightness: auto`` fixed for a gallery from its frames' brightness (`frame_brightness`): ``imagenet_mean``
    where their median lies above `BRIGHT_GALLERY`, else ``keep``.

    Why: frames far brighter than the photos the backbone learnt from (ImageNet's mean 0.45) drive its first
    activations to their ceiling, and moved to ImageNet's level a bright product's thin defects stand out (the
    commutators, median 0.73: PRO 0.76 -> 0.81-0.82); frames nearer that level lose by the same move (bottle's and
    metal_plate's, 0.55: pixel scores and PRO fall; the tire's, 0.08, brightened: its image decision collapses).
    The median of a gallery, not each frame, decides, so that every frame of a product is prepared alike."""
    if not levels:
        return "keep"
    return "imagenet_mean" if float(np.median(levels)) > BRIGHT_GALLERY else "keep"


def crop_origin(size: tuple[int, int], crop: int) -> tuple[int, int]:
    """Top-left corner of a centre crop, rounded as torchvision's CenterCrop rounds it."""
    width, height = size
    return int(round((width - crop) / 2.0)), int(round((height - crop) / 2.0))
