"""Choosing decision thresholds from scores: at maximum F1 on labelled scores, or at a target
false-positive rate on normal scores. Pure functions on arrays (image scores or pixel scores).

Convention: a score is anomalous when ``score >= threshold``. Every threshold returned here
lies strictly between two observed scores (the midpoint of the last flagged and the first
unflagged distinct score), so ``score > threshold`` flags exactly the same observed scores.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

MAX_F1 = "max_f1"
TARGET_FPR = "target_fpr"
AUTO = "auto"
METHODS = (AUTO, MAX_F1, TARGET_FPR)
RULE = "anomalous when score >= threshold"


def _between(upper: float, lower: float | None) -> float:
    """A threshold that flags ``upper`` and not ``lower`` (the next lower distinct score, or nothing)."""
    if lower is None:
        return float(np.nextafter(upper, -np.inf))
    return float(lower + (upper - lower) / 2.0)


def max_f1_threshold(labels: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """The threshold with the highest F1 of ``score >= threshold`` against ``labels`` (True = anomalous).

    Among equally good thresholds the highest (fewest flagged) wins. Raises ValueError
    unless both classes are present. Returns threshold, f1, precision, recall and counts.
    """
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in length")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    positives = int(labels.sum())
    if positives == 0 or positives == labels.size:
        raise ValueError("max-F1 needs both anomalous and normal examples")
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], labels[order]
    del order
    last_of_tie = np.flatnonzero(np.r_[ranked[1:] != ranked[:-1], True])
    tp = np.cumsum(hits)[last_of_tie]
    flagged = last_of_tie + 1
    f1 = 2.0 * tp / (flagged + positives)
    best = int(np.argmax(f1))
    cut = last_of_tie[best]
    lower = float(ranked[cut + 1]) if cut + 1 < ranked.size else None
    tp_best, flagged_best = int(tp[best]), int(flagged[best])
    return {
        "method": MAX_F1,
        "threshold": _between(float(ranked[cut]), lower),
        "f1": float(f1[best]),
        "precision": tp_best / flagged_best,
        "recall": tp_best / positives,
        "flagged": flagged_best,
        "positives": positives,
        "count": int(labels.size),
    }


def fpr_threshold(normal_scores: Sequence[float] | np.ndarray, target_fpr: float) -> dict[str, Any]:
    """The lowest threshold flagging at most ``target_fpr`` of ``normal_scores`` (scores of normal examples).

    With ``target_fpr`` below 1/n no normal example is flagged (threshold just above the
    highest). Ties never push the achieved rate above the target. Raises ValueError on no scores.
    """
    if not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in [0, 1), got {target_fpr}")
    ranked = np.sort(np.asarray(normal_scores, dtype=np.float64).ravel())
    n = ranked.size
    if n == 0:
        raise ValueError("a target-FPR threshold needs at least one normal score")
    if np.isnan(ranked).any():
        raise ValueError("scores contain NaN")
    allowed = int(math.floor(target_fpr * n + 1e-9))
    # Flag ranked[j:]: j is the first index >= n - allowed (>= 1, as allowed < n) starting a new distinct value.
    j = n - allowed
    while j < n and ranked[j] == ranked[j - 1]:
        j += 1
    if j >= n:
        threshold = float(np.nextafter(ranked[-1], np.inf))
        flagged = 0
    else:
        threshold = _between(float(ranked[j]), float(ranked[j - 1]))
        flagged = n - j
    return {
        "method": TARGET_FPR,
        "threshold": threshold,
        "target_fpr": float(target_fpr),
        "fpr": flagged / n,
        "flagged": int(flagged),
        "count": int(n),
    }


def select_threshold(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray | None,
                     method: str = AUTO, target_fpr: float = 0.05) -> dict[str, Any]:
    """A threshold by ``method``: 'max_f1' (needs both classes), 'target_fpr' (on the normal
    scores: those labelled False, or all scores when ``labels`` is None), or 'auto' (max_f1 when
    both classes are present, else target_fpr). Raises ValueError when the method cannot apply.
    """
    if method not in METHODS:
        raise ValueError(f"unknown threshold method {method!r}; use one of {', '.join(METHODS)}")
    scores = np.asarray(scores, dtype=np.float64).ravel()
    flags = None if labels is None else np.asarray(labels).astype(bool).ravel()
    both = flags is not None and 0 < int(flags.sum()) < flags.size
    if method == MAX_F1 or (method == AUTO and both):
        if flags is None:
            raise ValueError("max_f1 needs labels")
        return max_f1_threshold(flags, scores)
    normals = scores if flags is None else scores[~flags]
    if normals.size == 0:
        raise ValueError("no normal examples to set a target-FPR threshold on")
    return fpr_threshold(normals, target_fpr)


def _choose(scores: np.ndarray, labels: np.ndarray | None, method: str, target_fpr: float, what: str) -> dict[str, Any]:
    try:
        return select_threshold(scores, labels, method, target_fpr)
    except ValueError as exc:
        return {"method": None, "threshold": None, "reason": f"no {what} threshold: {exc}"}


def run_thresholds(image_labels: Sequence[bool] | None, image_scores: Sequence[float],
                   pixel_maps: Sequence[np.ndarray] | None, pixel_masks: Sequence[np.ndarray] | None,
                   method: str = AUTO, image_fpr: float = 0.05, pixel_fpr: float = 0.01) -> dict[str, Any]:
    """Image and pixel thresholds of a run, as written to thresholds.json.

    ``image_labels``: True for defective, False for good, per score (None: no labels, no image
    threshold). ``pixel_maps``/``pixel_masks``: the evaluated score maps and ground-truth masks
    (masks may all be False: normal images only, then the pixel threshold is at ``pixel_fpr``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown threshold method {method!r}; use one of {', '.join(METHODS)}")
    if image_labels is None or len(image_scores) == 0:
        image = {"method": None, "threshold": None, "reason": "no labelled images (good/defect type) to choose an image threshold on"}
    else:
        image = _choose(np.asarray(image_scores, dtype=np.float64), np.asarray(image_labels, dtype=bool), method, image_fpr, "image")
    if not pixel_maps:
        pixel = {"method": None, "threshold": None, "reason": "no score maps with ground truth (or of good images) to choose a pixel threshold on"}
    else:
        flat_maps = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in pixel_maps])
        flat_masks = np.concatenate([np.asarray(m, dtype=bool).ravel() for m in pixel_masks])
        pixel = _choose(flat_maps, flat_masks, method, pixel_fpr, "pixel")
    return {"image": image["threshold"], "pixel": pixel["threshold"], "rule": RULE,
            "image_selection": image, "pixel_selection": pixel}


def validate_thresholds(payload: Any, source: str = "thresholds file") -> dict[str, Any]:
    """A thresholds.json payload (from `spade evaluate`, or hand-written ``{"image": 1.2, "pixel": 3.4}``)
    checked for use by `spade score --thresholds`: returns {"image", "pixel", "source"}; raises
    ValueError naming ``source`` when it is not a mapping with numeric (or null) image/pixel values."""
    if not isinstance(payload, dict):
        raise ValueError(f"{source}: expected a JSON object with 'image' and/or 'pixel' thresholds")
    out: dict[str, Any] = {"source": f"file {source}"}
    for kind in ("image", "pixel"):
        value = payload.get(kind)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise ValueError(f"{source}: '{kind}' threshold must be a finite number or null, got {value!r}")
        out[kind] = None if value is None else float(value)
    if out["image"] is None and out["pixel"] is None:
        raise ValueError(f"{source}: sets neither an 'image' nor a 'pixel' threshold")
    return out


GOOD_FLAGGED_TARGETS = (0.0, 0.01, 0.02, 0.05, 0.10, 0.20)
MISSED_TARGETS = (0.0, 0.01, 0.05, 0.10, 0.20, 0.30)


def _point(threshold: float, scores: np.ndarray, labels: np.ndarray, reaches: str) -> dict[str, Any]:
    flagged = scores >= threshold
    good, defective = int((~labels).sum()), int(labels.sum())
    good_flagged, missed = int((flagged & ~labels).sum()), int((~flagged & labels).sum())
    return {"reaches": reaches, "threshold": float(threshold),
            "good_flagged": good_flagged, "good": good, "good_flagged_rate": good_flagged / good if good else float("nan"),
            "defective_missed": missed, "defective": defective,
            "defective_missed_rate": missed / defective if defective else float("nan")}


def miss_rate_threshold(labels: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray,
                        target_miss: float) -> float:
    """The highest threshold that misses at most ``target_miss`` of the defective (labelled True) scores: the fewest
    good images flagged at that miss rate."""
    labels = np.asarray(labels, dtype=bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    defective = np.sort(scores[labels])
    if defective.size == 0:
        raise ValueError("a miss-rate threshold needs defective examples")
    allowed = int(math.floor(target_miss * defective.size + 1e-9))
    keep = defective[allowed:]  # flag these (the lowest `allowed` may be missed)
    lower = scores[scores < keep[0]]
    return _between(float(keep[0]), float(lower.max()) if lower.size else None)


def operating_points(labels: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray,
                     used: float | None = None) -> list[dict[str, Any]]:
    """The trade-off an inspector picks a line's operating point from: good images flagged against defective images
    missed at the thresholds that reach each of `GOOD_FLAGGED_TARGETS` (a target rate of good images flagged) and
    `MISSED_TARGETS` (a target rate of defective images missed), plus the threshold ``used`` by the run. Rows sorted
    by threshold; ``reaches`` says which target (or "run threshold") each row is for."""
    labels = np.asarray(labels, dtype=bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    points = []
    if (~labels).any():
        for target in GOOD_FLAGGED_TARGETS:
            points.append(_point(fpr_threshold(scores[~labels], target)["threshold"], scores, labels,
                                 f"good flagged <= {target:.0%}"))
    if labels.any():
        for target in MISSED_TARGETS:
            points.append(_point(miss_rate_threshold(labels, scores, target), scores, labels, f"missed <= {target:.0%}"))
    if used is not None:
        points.append(_point(float(used), scores, labels, "run threshold"))
    return sorted(points, key=lambda p: p["threshold"])


def format_operating_points(points: Sequence[dict[str, Any]]) -> str:
    """The operating points as a printed table."""
    lines = [f"{'reaches':>20} {'threshold':>12} {'good flagged':>16} {'defective missed':>18}"]
    for p in points:
        lines.append(f"{p['reaches']:>20} {p['threshold']:>12.6g} "
                     f"{p['good_flagged']:>6}/{p['good']:<4} {p['good_flagged_rate']:>5.1%} "
                     f"{p['defective_missed']:>7}/{p['defective']:<4} {p['defective_missed_rate']:>5.1%}")
    return "\n".join(lines)
