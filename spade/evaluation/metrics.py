"""Image ROCAUC, pixel ROCAUC and PRO (per-region overlap, MVTec AD's definition)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; NaN when only one class is present (undefined)."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.all() or not labels.any():
        return float("nan")
    return float(roc_auc_score(labels, scores))


def pro_curve(masks: np.ndarray | Sequence[np.ndarray],
              scores: np.ndarray | Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rate, mean per-region overlap) at every distinct score threshold.

    ``masks``/``scores``: an (N, H, W) stack or a sequence of per-image (H_i, W_i) arrays, so sets
    whose images differ in size need no stacking. A region is a connected component (8-connectivity)
    of one image's ground-truth mask. At a threshold t, a region's overlap is the fraction of its
    pixels scoring >= t; PRO is the mean over all regions of all images; the FPR counts normal pixels
    of all images.
    """
    if len(masks) != len(scores):
        raise ValueError(f"{len(masks)} masks and {len(scores)} score maps")
    flat_weights, flat_normal, flat_scores = [], [], []
    n_regions = 0
    structure = np.ones((3, 3), dtype=bool)
    for mask, score in zip(masks, scores):
        mask = np.asarray(mask).astype(bool)
        score = np.asarray(score, dtype=np.float64)
        if mask.shape != score.shape:
            raise ValueError(f"masks {mask.shape} and scores {score.shape} differ in shape")
        labelled, count = ndimage.label(mask, structure=structure)
        weights = np.zeros(mask.shape, dtype=np.float64)
        if count:
            sizes = np.bincount(labelled.ravel())
            region_weight = np.zeros_like(sizes, dtype=np.float64)
            region_weight[1:] = 1.0 / sizes[1:]
            weights = region_weight[labelled]
            n_regions += count
        flat_weights.append(weights.ravel())
        flat_normal.append(~mask.ravel())
        flat_scores.append(score.ravel())
    if not flat_scores:
        return np.array([0.0, 1.0]), np.array([np.nan, np.nan])
    normal = np.concatenate(flat_normal)
    n_normal = int(normal.sum())
    if n_regions == 0 or n_normal == 0:
        return np.array([0.0, 1.0]), np.array([np.nan, np.nan])
    all_scores = np.concatenate(flat_scores)
    order = np.argsort(-all_scores, kind="stable")
    sorted_scores = all_scores[order]
    fp = np.cumsum(normal[order]) / n_normal
    overlap = np.cumsum(np.concatenate(flat_weights)[order]) / n_regions
    last_of_tie = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    fpr = np.r_[0.0, fp[last_of_tie]]
    pro = np.r_[0.0, overlap[last_of_tie]]
    return fpr, pro


def pro_auc(masks: np.ndarray | Sequence[np.ndarray], scores: np.ndarray | Sequence[np.ndarray],
            max_fpr: float = 0.3) -> float:
    """Area under the PRO curve for FPR in [0, max_fpr], divided by max_fpr (1.0 is perfect)."""
    fpr, pro = pro_curve(masks, scores)
    if np.isnan(pro).any():
        return float("nan")
    cut = np.searchsorted(fpr, max_fpr, side="right")
    x = fpr[:cut]
    y = pro[:cut]
    if cut < len(fpr) and x[-1] < max_fpr:
        x0, x1, y0, y1 = fpr[cut - 1], fpr[cut], pro[cut - 1], pro[cut]
        y_end = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0) if x1 > x0 else y1
        x = np.r_[x, max_fpr]
        y = np.r_[y, y_end]
    return float(np.trapezoid(y, x) / max_fpr)
