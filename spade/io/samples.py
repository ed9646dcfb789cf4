"""A small synthetic inspection data set in MVTec layout: textured plates, some with scratches or spots.

It lets the demo and the tests run end to end anywhere, with no data download.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from spade.io import storage


@dataclass(frozen=True)
class SampleSpec:
    size: int = 128
    train: int = 12
    test_good: int = 4
    test_per_defect: int = 4
    seed: int = 0


DEFECTS = ("scratch", "spot")


def normal_surface(rng: np.random.Generator, size: int, width: int | None = None) -> np.ndarray:
    """A brushed-metal-like texture: fine stripes with random phase plus noise, (size, width or size, 3) uint8."""
    width = width or size
    yy, xx = np.mgrid[0:size, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    stripes = 0.5 + 0.25 * np.sin(2 * np.pi * (xx + 0.15 * yy) / 6.0 + phase)
    noise = rng.normal(0.0, 0.04, size=(size, width))
    gray = np.clip(stripes + noise, 0, 1)
    tint = np.array([0.80, 0.82, 0.86], dtype=np.float32)
    return (gray[:, :, None] * tint * 255).astype(np.uint8)


def add_defect(rng: np.random.Generator, image: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Paint a defect; returns (image, mask) with mask True on the defect."""
    size = image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size]
    margin = size // 4
    cy, cx = rng.integers(margin, size - margin, size=2)
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        length = size * rng.uniform(0.25, 0.4)
        dx, dy = np.cos(angle), np.sin(angle)
        along = (xx - cx) * dx + (yy - cy) * dy
        across = -(xx - cx) * dy + (yy - cy) * dx
        mask = (np.abs(along) <= length / 2) & (np.abs(across) <= max(2, size // 40))
        color = np.array([40, 30, 25], dtype=np.uint8)
    elif kind == "spot":
        radius = size * rng.uniform(0.06, 0.1)
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius ** 2
        color = np.array([170, 90, 40], dtype=np.uint8)
    else:
        raise ValueError(f"unknown defect kind {kind!r}; use one of {DEFECTS}")
    out = image.copy()
    out[mask] = color
    return out, mask


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_sample_dataset(root: str, spec: SampleSpec = SampleSpec(), category: str = "plates") -> str:
    """Write the data set under ``root/category`` (local path or fsspec URL); returns that folder."""
    rng = np.random.default_rng(spec.seed)
    base = storage.join(root, category)
    for i in range(spec.train):
        storage.atomic_write_bytes(storage.join(base, "train", "good", f"{i:03d}.png"), _png(normal_surface(rng, spec.size)))
    for i in range(spec.test_good):
        storage.atomic_write_bytes(storage.join(base, "test", "good", f"{i:03d}.png"), _png(normal_surface(rng, spec.size)))
    for kind in DEFECTS:
        for i in range(spec.test_per_defect):
            image, mask = add_defect(rng, normal_surface(rng, spec.size), kind)
            storage.atomic_write_bytes(storage.join(base, "test", kind, f"{i:03d}.png"), _png(image))
            storage.atomic_write_bytes(storage.join(base, "ground_truth", kind, f"{i:03d}_mask.png"),
                                       _png(np.where(mask, 255, 0).astype(np.uint8)))
    return base
