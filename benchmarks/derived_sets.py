"""Harder geometries derived from the shared MVTec-layout sets, for the framing benchmarks: frames of three images
side by side (or one above another), with their masks.

    python benchmarks/derived_sets.py --out /tmp/derived          # metal_plate x3 wide, commutators x3 tall

Each derived frame joins ``count`` consecutive images of one split (train/good, or the test images in their sorted
order across defect types), each resized to the first image's size; a test frame is defective when any part is,
labelled by its first defective part's type, its mask the parts' masks joined the same way. The frames stay in
MVTec layout, so `benchmarks/accuracy.py --data` and `benchmarks/image_decision.py --data` read them as they are.
The sources' licences (SOURCE.md) apply: write them outside the project.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SUFFIXES = (".png", ".jpg", ".bmp")


def _join(arrays: list[np.ndarray], axis: int) -> np.ndarray:
    return np.concatenate(arrays, axis=axis)


def _load(path: Path, size: tuple[int, int] | None, mode: str) -> np.ndarray:
    img = Image.open(path).convert(mode)
    if size is not None and img.size != size:
        img = img.resize(size, Image.NEAREST if mode == "L" else Image.BILINEAR)
    return np.asarray(img)


def derive(source: Path, out: Path, count: int, axis: int) -> Path:
    """Write ``out`` (MVTec layout) from ``source``: frames of ``count`` images joined along ``axis`` (1: side by
    side, 0: one above another); returns ``out``."""
    train = sorted(p for p in (source / "train" / "good").iterdir() if p.suffix.lower() in SUFFIXES)
    test = sorted(p for p in (source / "test").rglob("*") if p.suffix.lower() in SUFFIXES)
    size = Image.open(train[0]).size
    for i in range(0, len(train) - count + 1, count):
        parts = [_load(p, size, "RGB") for p in train[i:i + count]]
        target = out / "train" / "good" / f"{i // count:03d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_join(parts, axis)).save(target)
    for i in range(0, len(test) - count + 1, count):
        group = test[i:i + count]
        labels = [p.parent.name for p in group]
        label = next((lab for lab in labels if lab != "good"), "good")
        parts = [_load(p, size, "RGB") for p in group]
        name = f"{i // count:03d}.png"
        target = out / "test" / label / name
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_join(parts, axis)).save(target)
        if label != "good":
            masks = []
            for p, lab in zip(group, labels):
                mask = source / "ground_truth" / lab / f"{p.stem}_mask.png"
                masks.append(_load(mask, size, "L") if lab != "good" else np.zeros((size[1], size[0]), np.uint8))
            target = out / "ground_truth" / label / f"{Path(name).stem}_mask.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.where(_join(masks, axis) > 127, 255, 0).astype(np.uint8)).save(target)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/spade-derived")
    args = parser.parse_args(argv)
    out = Path(args.out)
    made = [derive(SHARED / "mpdd_metal_plate", out / "metal_plate_x3_wide", 3, 1),
            derive(SHARED / "kolektorsdd_commutator", out / "commutator_x3_tall", 3, 0)]
    for path in made:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
