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


def normal_surface(rng: np.random.Generator, size: int, width: int | None = None, period: float = 6.0,
                   slant: float = 0.15) -> np.ndarray:
    """A brushed-metal-like texture: fine stripes (``period`` px, ``slant``) with random phase plus noise,
    (size, width or size, 3) uint8."""
    width = width or size
    yy, xx = np.mgrid[0:size, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    stripes = 0.5 + 0.25 * np.sin(2 * np.pi * (xx + slant * yy) / period + phase)
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


@dataclass(frozen=True)
class PlantSpec:
    """A synthetic plant: lines with one camera each, each line's product with its own texture (stripe period and
    slant), normal images to fit from and nightly folders of test images. ``brighten``: {line: fraction per night},
    a drift (a light turned up, a lens getting hazy) that raises that line's brightness night by night from night
    ``drift_from`` on."""

    lines: tuple[str, ...] = ("L1", "L2", "L3")
    camera: str = "top"
    nights: tuple[str, ...] = ("2026-12-01",)
    train: int = 6
    good_per_night: int = 3
    defective_per_night: int = 1
    size: int = 64
    seed: int = 0
    brighten: tuple[tuple[str, float], ...] = ()
    drift_from: int = 0  # the first night (index) that is brighter


def write_plant_archive(root: str, spec: PlantSpec = PlantSpec()) -> tuple[str, str]:
    """Write ``root/normals/line=L/camera=C/*.png`` and ``root/archive/line=L/camera=C/date=D/*.png`` (local path or
    fsspec URL); returns (normals, archive) folders. Deterministic for a spec."""
    normals, archive = storage.join(root, "normals"), storage.join(root, "archive")
    drift = dict(spec.brighten)
    for index, line in enumerate(spec.lines):
        rng = np.random.default_rng([spec.seed, index])
        texture = {"period": 5.0 + 1.5 * (index % 4), "slant": 0.15 * (-1) ** index}
        partition = f"line={line}/camera={spec.camera}"
        for i in range(spec.train):
            storage.atomic_write_bytes(storage.join(normals, partition, f"{i:03d}.png"),
                                       _png(normal_surface(rng, spec.size, **texture)))
        for night, day in enumerate(spec.nights):
            gain = 1.0 + drift.get(line, 0.0) * max(0, night + 1 - spec.drift_from)
            for i in range(spec.good_per_night + spec.defective_per_night):
                image = normal_surface(rng, spec.size, **texture)
                kind = None if i < spec.good_per_night else DEFECTS[i % len(DEFECTS)]
                if kind:
                    image, _ = add_defect(rng, image, kind)
                image = np.clip(image.astype(np.float32) * gain, 0, 255).astype(np.uint8)
                name = f"{kind or 'good'}_{i:03d}.png"
                storage.atomic_write_bytes(storage.join(archive, partition, f"date={day}", name), _png(image))
    return normals, archive
