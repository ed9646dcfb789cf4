"""Evaluating a score run against MVTec-layout ground truth: image ROCAUC, pixel ROCAUC, PRO per defect type."""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from spade.io import storage
from spade.io.maps import decode_mask, decode_score_map
from spade.evaluation.metrics import auroc, pro_auc
from spade.scoring.scoremap import crop_box_pixels
from spade.io.sources import mask_uri

GOOD = "good"


def _region(array: np.ndarray, box: tuple[int, int, int, int] | None) -> np.ndarray:
    if box is None:
        return array
    left, top, right, bottom = box
    return array[top:bottom, left:right]


def load_pixels(rows: list[dict[str, Any]], masks_root: str | None, resize: int, crop: int, region: str,
                progress: Callable[[str], None] = lambda _: None) -> tuple[list[dict], list[np.ndarray], list[np.ndarray], list[str]]:
    """Score maps and ground-truth masks of the scored rows, cut to the evaluated region.

    Returns (rows used, maps, masks, problems): rows whose map or mask cannot be
    read are left out of the pixel metrics and named in ``problems``.
    """
    used, maps, masks, problems = [], [], [], []
    for done, row in enumerate(rows, 1):
        try:
            score_map = decode_score_map(storage.read_bytes(row["map_uri"]))
        except (FileNotFoundError, OSError) as exc:
            problems.append(f"{row['uri']}: score map {row['map_uri']} unreadable ({exc})")
            continue
        if row["label"] == GOOD:
            mask = np.zeros(score_map.shape, dtype=bool)
        else:
            url = mask_uri(masks_root, row["label"], row["uri"])
            try:
                mask = decode_mask(storage.read_bytes(url))
            except (FileNotFoundError, OSError) as exc:
                problems.append(f"{row['uri']}: ground-truth mask {url} missing or unreadable ({exc.__class__.__name__})")
                continue
        if mask.shape != score_map.shape:
            problems.append(f"{row['uri']}: mask {mask.shape} and score map {score_map.shape} differ in size")
            continue
        box = crop_box_pixels((row["width"], row["height"]), resize, crop) if region == "crop" else None
        used.append(row)
        maps.append(_region(score_map, box))
        masks.append(_region(mask, box))
        if done % 50 == 0:
            progress(f"evaluate: {done}/{len(rows)} maps read")
    return used, maps, masks, problems


def _pixel_metrics(maps: list[np.ndarray], masks: list[np.ndarray], max_fpr: float) -> dict[str, float]:
    if not maps:
        return {"pixel_rocauc": float("nan"), "pro": float("nan")}
    pro = pro_auc(masks, maps, max_fpr)  # per image: sets of mixed image sizes need no stacking
    flat_masks = np.concatenate([m.ravel() for m in masks])
    flat_maps = np.concatenate([m.ravel() for m in maps])
    return {"pixel_rocauc": auroc(flat_masks, flat_maps), "pro": pro}


def labelled_rows(table: pa.Table) -> list[dict[str, Any]]:
    """The rows that take part in the metrics: scored, with an MVTec label."""
    return [r for r in table.to_pylist() if r["status"] == "ok" and r["label"]]


def evaluate(table: pa.Table, masks_root: str | None, resize: int, crop: int, region: str = "crop",
             max_fpr: float = 0.3, progress: Callable[[str], None] = lambda _: None,
             pixels: tuple | None = None) -> dict[str, Any]:
    """Metrics of a score table: overall and per defect type (each defect type against the good images).

    ``pixels``: `load_pixels` of `labelled_rows(table)`, when the caller has read them already.
    """
    rows = table.to_pylist()
    ok = labelled_rows(table)
    counts = {
        "rows": len(rows), "scored": sum(r["status"] == "ok" for r in rows), "errors": sum(r["status"] != "ok" for r in rows),
        "unlabelled": sum(r["status"] == "ok" and not r["label"] for r in rows),
        "good": sum(r["label"] == GOOD for r in ok), "defective": sum(r["label"] != GOOD for r in ok),
    }
    result: dict[str, Any] = {"overall": {}, "per_defect": {}, "counts": counts, "problems": []}
    if not ok:
        result["problems"].append("no scored image has an MVTec label (good/defect type): nothing to evaluate")
        return result
    overall = {"image_rocauc": auroc([r["label"] != GOOD for r in ok], [r["image_score"] for r in ok])}
    if masks_root is not None:
        used, maps, masks, problems = pixels or load_pixels(ok, masks_root, resize, crop, region, progress)
        result["problems"] += problems
        overall |= _pixel_metrics(maps, masks, max_fpr)
    result["overall"] = overall
    for defect in sorted({r["label"] for r in ok} - {GOOD}):
        subset = [r for r in ok if r["label"] in (GOOD, defect)]
        metrics = {"image_rocauc": auroc([r["label"] != GOOD for r in subset], [r["image_score"] for r in subset]),
                   "images": sum(r["label"] == defect for r in subset)}
        if masks_root is not None:
            keep = [i for i, r in enumerate(used) if r["label"] in (GOOD, defect)]
            metrics |= _pixel_metrics([maps[i] for i in keep], [masks[i] for i in keep], max_fpr)
        result["per_defect"][defect] = metrics
    return result


def metrics_table(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per defect type plus 'overall', for CSV and printing."""
    rows = [{"defect": name, **values} for name, values in result["per_defect"].items()]
    rows.append({"defect": "overall", "images": result["counts"]["defective"], **result["overall"]})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    columns = ["defect", "images", "image_rocauc", "pixel_rocauc", "pro"]
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "   n/a" if math.isnan(value) else f"{value:6.4f}"
        return "" if value is None else str(value)
    lines = [" ".join(f"{c:>14}" for c in columns)]
    lines += [" ".join(f"{cell(r.get(c)):>14}" for c in columns) for r in rows]
    return "\n".join(lines)
