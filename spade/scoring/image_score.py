"""The image-level decision from the two terms SPADE computes for every image.

* ``knn``: the paper's score, the mean distance of the global embedding to its K nearest normal
  embeddings. Small defects barely move a global average-pooled embedding.
* ``map_max``: the maximum of the smoothed pixel score map, as PatchCore and PaDiM decide: one
  anomalous patch is enough.
* ``map_top``: the mean of the smoothed map's highest `MAP_TOP_FRACTION` of positions: a defect's
  extent (a crack along a commutator) rather than its single hottest pixel, which on a textured or
  glossy surface a normal image reaches too.
* ``combined`` / ``combined_top``: the kNN term and ``map_max`` / ``map_top``, each standardised by its
  mean and standard deviation over the gallery's normal calibration images (scored leave-one-out at
  `fit`), then summed: how many normal standard deviations above normal an image is, on the global and
  the local evidence together. The terms have unrelated units (embedding vs. patch-feature distances);
  standardising makes them commensurable without a tuned weight.
* ``bank_max``: PatchCore's decision, a frame's largest distance to a global memory bank of patch
  features (`spade.index.patch_bank`): every normal frame's positions are the reference, not only the K
  nearest frames'.
* ``combined_bank``: ``map_top`` and ``bank_max`` standardised and summed: SPADE's map for a defect's extent,
  the bank for patches no normal frame has anywhere.
* ``combined_residual``: ``map_residual`` (how far the map's highest 0.1 % rise above the normal frames' mean map
  at the same place, `spade.scoring.position_baseline`), ``bank_max`` and ``knn``, standardised and summed: the
  map's evidence without the places every normal frame scores high, beside the bank's and the embedding's.
* ``region_excess``: how much of the frame rises above what normal frames reach there, as one connected region (the
  residual above a level normal frames' residuals reach at 1 pixel in 200, summed over its largest region,
  `spade.scoring.region_excess`): a crack's extent where its peak is no higher than normal peaks.
* ``combined_region``: ``combined_residual``'s three terms and ``region_excess``, standardised and summed.
* ``residual_or_region``: the larger of ``combined_residual`` and ``region_excess``, each standardised by its own
  scores on the normal calibration images: an image is as anomalous as its stronger evidence, a peak above normal
  (tire) or a crack's extent (commutators). Summed instead, each dilutes the other where it does not separate a
  product's defects; its threshold is measured on the normal images' larger of the two, like any mode's.
* ``combined_selected``: the same three candidates as ``combined_residual``, of which only those `fit` selected
  (``selected_terms`` in the normal statistics: the ones that best separate synthetic defects from normal images on
  this gallery's product, `spade.scoring.term_selection`) are standardised and summed: a term that does not separate
  a product's defects adds only its noise to the sum.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from spade.config import IMAGE_SCORES

MAP_TOP_FRACTION = 0.01
MODE_TERMS = {"knn": ("knn",), "map_max": ("map_max",), "map_top": ("map_top",), "combined": ("knn", "map_max"),
              "combined_top": ("knn", "map_top"), "bank_max": ("bank_max",), "combined_bank": ("map_top", "bank_max"),
              "combined_residual": ("map_residual", "bank_max", "knn"), "region_excess": ("region_excess",),
              "combined_region": ("map_residual", "region_excess", "bank_max", "knn"),
              "combined_selected": ("map_residual", "bank_max", "knn"),  # candidates: fit selects among them
              "residual_or_region": ("map_residual", "bank_max", "knn", "region_excess")}
EITHER_MODES = {"residual_or_region": ("combined_residual", "region_excess")}  # the larger of these modes' scores,
# each standardised by the normal images' scores in it (the calibration's "scores" record)
SELECTED_MODES = ("combined_selected",)  # modes whose terms are the normal statistics' "selected_terms"
MAP_TERMS = ("map_top", "bank_max", "map_residual", "region_excess")  # an image's terms besides knn and map_max
CALIBRATED_TERMS = ("region_excess",)  # single terms measured against a level that fit records


class MissingCalibration(ValueError):
    """``image_score: combined`` needs the normal statistics a gallery records at `fit`."""


def map_top(score_map: np.ndarray, fraction: float = MAP_TOP_FRACTION) -> float:
    """The mean of the highest ``fraction`` of a score map's values (at least one)."""
    flat = np.asarray(score_map, dtype=np.float32).ravel()
    count = max(1, int(flat.size * fraction))
    return float(np.partition(flat, flat.size - count)[flat.size - count:].mean())


def normal_statistics(knn_scores: Sequence[float] | np.ndarray, map_maxima: Sequence[float] | np.ndarray,
                      map_tops: Sequence[float] | np.ndarray | None = None,
                      bank_maxima: Sequence[float] | np.ndarray | None = None,
                      map_residuals: Sequence[float] | np.ndarray | None = None,
                      region_excesses: Sequence[float] | np.ndarray | None = None) -> dict[str, Any]:
    """{"images": m, "knn": {"mean", "std"}, "map_max": {...}, "map_top": {...}, "bank_max": {...},
    "map_residual": {...}, "region_excess": {...}} of normal images' terms (sample standard deviation; empty when
    fewer than 2 images; a term given as None is left out)."""
    terms = {"knn": knn_scores, "map_max": map_maxima, "map_top": map_tops, "bank_max": bank_maxima,
             "map_residual": map_residuals, "region_excess": region_excesses}
    values = {name: np.asarray(v, dtype=np.float64).ravel() for name, v in terms.items() if v is not None}
    if values["knn"].size < 2 or any(v.size != values["knn"].size for v in values.values()):
        return {}
    return {"images": int(values["knn"].size),
            **{name: {"mean": float(v.mean()), "std": float(v.std(ddof=1))} for name, v in values.items()}}


def mode_terms(mode: str, normals: dict[str, Any] | None) -> tuple[str, ...]:
    """The terms ``mode`` sums: `MODE_TERMS`, or for a selected mode those the normal statistics record as selected;
    without that record, ("selected_terms",), the record itself, so a check that every term is in the statistics
    (`require_normals`, `calibrate`) finds it missing."""
    if mode in SELECTED_MODES:
        selected = (normals or {}).get("selected_terms") or {}
        return tuple(selected.get("terms") or ("selected_terms",))
    return MODE_TERMS[mode]


def _standardised(value: float, stats: dict[str, float]) -> float:
    return (value - stats["mean"]) / max(stats["std"], 1e-12 * max(abs(stats["mean"]), 1.0))


def require_normals(mode: str, normals: dict[str, Any] | None, gallery: str = "the gallery") -> None:
    """Raise `MissingCalibration` when ``mode`` needs normal statistics that ``normals`` lacks (the combined modes, and
    ``region_excess``, whose level `fit` records beside its statistics)."""
    if len(MODE_TERMS.get(mode, ())) <= 1 and mode not in CALIBRATED_TERMS:
        return
    missing = [term for term in mode_terms(mode, normals) if term not in (normals or {})]
    recorded = (normals or {}).get("scores") or {}
    missing += [f"the normal images' {part} scores" for part in EITHER_MODES.get(mode, ()) if part not in recorded]
    if missing:
        raise MissingCalibration(f"image_score: {mode} needs the normal-image statistics that `spade fit` records; "
                                 f"{gallery} has none of {', '.join(missing)} (fitted before they existed, or with fewer "
                                 "than 2 images). "
                                 "Re-run `spade fit` with this image_score, or use image_score: knn or map_max.")


def image_score(mode: str, knn: float, map_max: float, normals: dict[str, Any] | None, gallery: str = "the gallery",
                **more: float) -> float:
    """The image score of ``mode`` from an image's kNN score and score-map maximum, and ``more`` of its terms by name
    (`MAP_TERMS`: the map's top mean, the bank maximum, the residual above the normal baseline, the region excess;
    a term the mode does not use may be left out).

    ``normals``: `normal_statistics` of the gallery's calibration images (the combined modes use it).
    """
    if mode not in MODE_TERMS:
        raise ValueError(f"image_score must be one of {', '.join(IMAGE_SCORES)}, got {mode!r}")
    unknown = set(more) - set(MAP_TERMS)
    if unknown:
        raise TypeError(f"unknown image terms {sorted(unknown)}; the terms are knn, map_max, {', '.join(MAP_TERMS)}")
    terms = {"knn": knn, "map_max": map_max} | {name: float(more.get(name, float("nan"))) for name in MAP_TERMS}
    if len(MODE_TERMS[mode]) == 1:
        return float(terms[mode])
    require_normals(mode, normals, gallery)
    if mode in EITHER_MODES:
        return max(_standardised(image_score(part, knn, map_max, normals, gallery, **more), normals["scores"][part])
                   for part in EITHER_MODES[mode])
    return float(sum(_standardised(terms[name], normals[name]) for name in mode_terms(mode, normals)))


def image_scores(mode: str, knn: np.ndarray, map_max: np.ndarray, normals: dict[str, Any] | None,
                 **more: np.ndarray | None) -> np.ndarray:
    """`image_score` of arrays of the terms (``more``: arrays by `MAP_TERMS` name; None or left out: not measured)."""
    given = {name: np.asarray(values, dtype=np.float64) for name, values in more.items() if values is not None}
    return np.asarray([image_score(mode, float(a), float(b), normals, **{name: float(v[i]) for name, v in given.items()})
                       for i, (a, b) in enumerate(zip(knn, map_max))], dtype=np.float64)
