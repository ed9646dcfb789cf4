"""Image ROCAUC, pixel ROCAUC and PRO (per-region overlap, MVTec AD's definition)."""
from __future__ import annotations

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


def pro_curve(masks: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rate, mean per-region overlap) at every distinct score threshold.

    A region is a connected component (8-connectivity) of one ground-truth mask.
    At a threshold t, a region's overlap is the fraction of its pixels scoring >= t;
    PRO is the mean over all regions of all images; the FPR counts normal pixels.
    """
    masks = np.asarray(masks).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if masks.shape != scores.shape:
        raise ValueError(f"masks {masks.shape} and scores {scores.shape} differ in shape")
    weights = np.zeros(masks.shape, dtype=np.float64)
    n_regions = 0
    structure = np.ones((3, 3), dtype=bool)
    for i in range(masks.shape[0]):
        labelled, count = ndimage.label(masks[i], structure=structure)
        if count:
            sizes = np.bincount(labelled.ravel())
            region_weight = np.zeros_like(sizes, dtype=np.float64)
            region_weight[1:] = 1.0 / sizes[1:]
            weights[i] = region_weight[labelled]
            n_regions += count
    normal = ~masks
    n_normal = int(normal.sum())
    if n_regions == 0 or n_normal == 0:
        return np.array([0.0, 1.0]), np.array([np.nan, np.nan])
    flat_scores = scores.ravel()
    order = np.argsort(-flat_scores, kind="stable")
    sorted_scores = flat_scores[order]
    fp = np.cumsum(normal.ravel()[order]) / n_normal
    overlap = np.cumsum(weights.ravel()[order]) / n_regions
    last_of_tie = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    fpr = np.r_[0.0, fp[last_of_tie]]
    pro = np.r_[0.0, overlap[last_of_tie]]
    return fpr, pro


def pro_auc(masks: np.ndarray, scores: np.ndarray, max_fpr: float = 0.3) -> float:
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
