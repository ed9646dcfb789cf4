"""The image-level decision from the two terms SPADE computes for every image.

* ``knn``: the paper's score, the mean distance of the global embedding to its K nearest normal
  embeddings. Small defects barely move a global average-pooled embedding.
* ``map_max``: the maximum of the smoothed pixel score map, as PatchCore and PaDiM decide: one
  anomalous patch is enough.
* ``combined``: each term standardised by its mean and standard deviation over the gallery's
  normal calibration images (scored leave-one-out at `fit`), then summed: how many normal
  standard deviations above normal an image is, on the global and the local evidence together.
  The two terms have unrelated units (embedding vs. patch-feature distances); standardising
  makes them commensurable without a tuned weight.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from spade.config import IMAGE_SCORES

TERMS = ("knn", "map_max")


class MissingCalibration(ValueError):
    """``image_score: combined`` needs the normal statistics a gallery records at `fit`."""


def normal_statistics(knn_scores: Sequence[float] | np.ndarray, map_maxima: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """{"images": m, "knn": {"mean", "std"}, "map_max": {"mean", "std"}} of normal images' two terms
    (sample standard deviation; empty when fewer than 2 images)."""
    knn = np.asarray(knn_scores, dtype=np.float64).ravel()
    peak = np.asarray(map_maxima, dtype=np.float64).ravel()
    if knn.size < 2 or peak.size != knn.size:
        return {}
    return {"images": int(knn.size),
            **{name: {"mean": float(values.mean()), "std": float(values.std(ddof=1))}
               for name, values in (("knn", knn), ("map_max", peak))}}


def _standardised(value: float, stats: dict[str, float]) -> float:
    return (value - stats["mean"]) / max(stats["std"], 1e-12 * max(abs(stats["mean"]), 1.0))


def require_normals(mode: str, normals: dict[str, Any] | None, gallery: str = "the gallery") -> None:
    """Raise `MissingCalibration` when ``mode`` needs normal statistics that ``normals`` lacks."""
    if mode == "combined" and (not normals or any(term not in normals for term in TERMS)):
        raise MissingCalibration(f"image_score: combined needs the normal-image statistics that `spade fit` records; "
                                 f"{gallery} has none (fitted before they existed, or with fewer than 2 images). "
                                 "Re-run `spade fit`, or use image_score: knn or map_max.")


def image_score(mode: str, knn: float, map_max: float, normals: dict[str, Any] | None, gallery: str = "the gallery") -> float:
    """The image score of ``mode`` from an image's kNN score and score-map maximum.

    ``normals``: `normal_statistics` of the gallery's calibration images (only ``combined`` uses it).
    """
    if mode == "knn":
        return float(knn)
    if mode == "map_max":
        return float(map_max)
    if mode != "combined":
        raise ValueError(f"image_score must be one of {', '.join(IMAGE_SCORES)}, got {mode!r}")
    require_normals(mode, normals, gallery)
    return _standardised(knn, normals["knn"]) + _standardised(map_max, normals["map_max"])


def image_scores(mode: str, knn: np.ndarray, map_max: np.ndarray, normals: dict[str, Any] | None) -> np.ndarray:
    """`image_score` of arrays of both terms."""
    return np.asarray([image_score(mode, float(a), float(b), normals) for a, b in zip(knn, map_max)], dtype=np.float64)
