"""`spade report`: a score run (+ ground truth) → a static HTML report with metrics, curves and a top-N gallery.

No Beam: the report reads the score table and the top-N images' files directly. Metrics are
spade.evaluation.ground_truth's (the numbers `spade evaluate` prints); thresholds are spade.evaluation.thresholds' (the
ones `spade evaluate` writes to thresholds.json).
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Any, Callable

import numpy as np
from sklearn.metrics import roc_curve

from spade.evaluation import report
from spade.io import storage
from spade.evaluation.ground_truth import GOOD, evaluate, load_pixels, metrics_table
from spade.io.images import decode_rgb
from spade.io.maps import decode_mask, decode_score_map
from spade.evaluation.metrics import pro_curve
from spade.evaluation.thresholds import operating_points
from spade.io.results import read_run_info, read_score_table
from spade.io.sources import is_tar, mask_uri, read_inputs
from pipelines.evaluate import select_run_thresholds

LOG = logging.getLogger("spade")
MAX_FPR = 0.3
CURVE_PIXELS = 16_000_000


def read_originals(uris: list[str]) -> dict[str, tuple[bytes | None, str | None]]:
    """{uri: (bytes, None) or (None, why)} for image uris, tar members ('shard.tar#member') included
    (each shard is read once, keeping only the wanted members)."""
    found: dict[str, tuple[bytes | None, str | None]] = {}
    by_shard: dict[str, set[str]] = defaultdict(set)
    for uri in uris:
        shard = uri.split("#", 1)[0]
        if "#" in uri and is_tar(shard):
            by_shard[shard].add(uri)
        else:
            for _, data, error in read_inputs(uri):
                found[uri] = (data, error)
    for shard, wanted in by_shard.items():
        for member_uri, data, error in read_inputs(shard):
            if member_uri in wanted or member_uri == shard:
                for uri in (wanted if member_uri == shard else [member_uri]):
                    found[uri] = (data, error)
    return {uri: found.get(uri, (None, "not found in its tar shard")) for uri in uris}


def _stride(maps: list[np.ndarray], budget: int) -> int:
    total = sum(m.size for m in maps)
    return max(1, math.ceil(math.sqrt(total / budget))) if total > budget else 1


def _pixel_curves(used: list[dict], maps: list[np.ndarray], masks: list[np.ndarray], result: dict,
                  budget: int) -> tuple[dict, dict, str]:
    """ROC and PRO curve points (overall and per defect type), on every ``stride``-th pixel of huge runs."""
    step = _stride(maps, budget)
    maps = [m[::step, ::step] for m in maps]
    masks = [m[::step, ::step] for m in masks]
    roc, pro = {}, {}
    groups = {"overall": list(range(len(used)))}
    for defect in result["per_defect"]:
        groups[defect] = [i for i, r in enumerate(used) if r["label"] in (GOOD, defect)]
    for name, keep in groups.items():
        metrics = result["overall"] if name == "overall" else result["per_defect"][name]
        flat_masks = np.concatenate([masks[i].ravel() for i in keep]) if keep else np.zeros(0, bool)
        if flat_masks.any() and not flat_masks.all():
            flat_maps = np.concatenate([maps[i].ravel() for i in keep])
            fpr, tpr, _ = roc_curve(flat_masks, flat_maps, drop_intermediate=True)
            roc[name] = (fpr, tpr, metrics.get("pixel_rocauc"))
            del flat_maps
            if len({maps[i].shape for i in keep}) == 1:
                x, y = pro_curve(np.stack([masks[i] for i in keep]), np.stack([maps[i] for i in keep]))
                if not np.isnan(y).any():
                    pro[name] = (x, y, metrics.get("pro"))
    note = (f"Pixel curves drawn from every {step}th pixel in each direction (the run has more than "
            f"{budget:,} evaluated pixels); the areas in the legends and the metrics table use every pixel."
            if step > 1 else "")
    return roc, pro, note


def _image_rocs(ok: list[dict], result: dict) -> dict:
    curves = {}
    names = ["overall", *result["per_defect"]]
    for name in names:
        subset = ok if name == "overall" else [r for r in ok if r["label"] in (GOOD, name)]
        labels = [r["label"] != GOOD for r in subset]
        if any(labels) and not all(labels):
            fpr, tpr, _ = roc_curve(labels, [r["image_score"] for r in subset], drop_intermediate=False)
            metrics = result["overall"] if name == "overall" else result["per_defect"][name]
            curves[name] = (fpr, tpr, metrics.get("image_rocauc"))
    return curves


def _thumbs(rank: int, row: dict, original: tuple[bytes | None, str | None], masks_root: str | None,
            scale: tuple[float, float], pixel_threshold: float | None, threshold_source: str,
            write: Callable[[str, bytes], str]) -> dict[str, Any]:
    """The four pictures of one top-N image, written as PNGs; returns their relative paths or notes."""
    card: dict[str, Any] = {"rank": rank, "row": row}
    size = report.thumb_size(row["width"] or report.THUMB, row["height"] or report.THUMB)
    data, error = original
    rgb = None
    if data is not None:
        try:
            rgb = report.resize_rgb(decode_rgb(data), size)
            card["orig"] = write(f"{rank:04d}_original.png", report.png_bytes(rgb))
        except ValueError as exc:
            card["orig_note"] = f"original unreadable: {exc}"
    else:
        card["orig_note"] = f"original not available: {error}"
    gt = None
    if row["label"] == GOOD:
        card["gt_note"] = "good image: no defect"
    elif not row["label"]:
        card["gt_note"] = "unlabelled image: no ground truth"
    elif masks_root is None:
        card["gt_note"] = "no --masks given"
    else:
        url = mask_uri(masks_root, row["label"], row["uri"])
        try:
            gt = report.resize_mask(decode_mask(storage.read_bytes(url)), size) > 0
            card["gt"] = write(f"{rank:04d}_truth.png", report.png_bytes(np.where(gt, 255, 0)))
        except (FileNotFoundError, OSError, ValueError) as exc:
            card["gt_note"] = f"ground truth {url} unreadable ({exc.__class__.__name__})"
    try:
        full = decode_score_map(storage.read_bytes(row["map_uri"]))
    except (FileNotFoundError, OSError, ValueError, TypeError) as exc:
        card["overlay_note"] = f"score map unreadable ({exc.__class__.__name__})"
        full = None
    if full is not None:
        small = report.resize_scores(full, size)
        overlay = report.heat_overlay(rgb, small, *scale)
        if gt is not None:
            overlay = report.outline(overlay, gt)
        card["overlay"] = write(f"{rank:04d}_overlay.png", report.png_bytes(overlay))
    if row.get("mask_uri"):
        try:
            predicted = decode_mask(storage.read_bytes(row["mask_uri"]))
            card["pred"] = write(f"{rank:04d}_predicted.png", report.png_bytes(report.resize_mask(predicted, size)))
            card["pred_caption"] = f"predicted mask: {predicted.mean():.1%} of pixels ({threshold_source})"
        except (FileNotFoundError, OSError, ValueError) as exc:
            card["pred_note"] = f"predicted mask unreadable ({exc.__class__.__name__})"
    elif full is not None and pixel_threshold is not None:
        predicted = full >= pixel_threshold
        card["pred"] = write(f"{rank:04d}_predicted.png", report.png_bytes(report.resize_mask(predicted, size)))
        card["pred_caption"] = f"predicted mask: {predicted.mean():.1%} of pixels (selected pixel threshold)"
    else:
        card["pred_note"] = "no pixel threshold: the run wrote no masks"
    return card


def run_report(scores_url: str, masks_root: str | None, out_url: str, top: int = 24,
               say: Callable[[str], None] = LOG.info, curve_pixels: int = CURVE_PIXELS) -> dict[str, Any]:
    """Write ``out_url``/index.html and its pictures (``out_url``/img/*.png) for the run in ``scores_url``."""
    info = read_run_info(scores_url)
    config = info["config"]
    table = read_score_table(scores_url)
    rows = table.to_pylist()
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: -r["image_score"])
    errors = [r for r in rows if r["status"] != "ok"]
    labelled = [r for r in ok if r["label"]]
    has_labels = bool(labelled)
    say(f"report: {len(ok)} scored and {len(errors)} failed images from {scores_url} -> {out_url}")

    written: list[str] = []

    def write(name: str, data: bytes) -> str:
        storage.atomic_write_bytes(storage.join(out_url, "img", name), data)
        written.append(name)
        return f"img/{name}"

    figures: dict[str, tuple[str, str]] = {}
    result, selected, curve_note, problems = None, None, "", []
    if has_labels:
        result = evaluate(table, masks_root, config["resize"], config["crop"], config["eval_region"], max_fpr=MAX_FPR)
        problems = result["problems"]
        selected = select_run_thresholds(table, config, masks_root)
        roc_image = _image_rocs(labelled, result)
        figures["roc_image"] = (write("roc_image.png", report.curve_figure(
            roc_image, "Image ROC", "false-positive rate (good images)", "true-positive rate (defective images)", "AUC")),
            "image-level ROC curve")
        if masks_root is not None:
            used, maps, masks, _ = load_pixels(labelled, masks_root, config["resize"], config["crop"], config["eval_region"])
            roc_pixel, pro, curve_note = _pixel_curves(used, maps, masks, result, curve_pixels)
            del maps, masks
            figures["roc_pixel"] = (write("roc_pixel.png", report.curve_figure(
                roc_pixel, "Pixel ROC", "false-positive rate (normal pixels)", "true-positive rate (defect pixels)", "AUC")),
                "pixel-level ROC curve")
            figures["pro"] = (write("pro.png", report.curve_figure(
                pro, f"PRO curve (FPR ≤ {MAX_FPR})", "false-positive rate (normal pixels)", "per-region overlap",
                "PRO", x_max=MAX_FPR, diagonal=False)), "per-region-overlap curve")
        groups = {"good": [r["image_score"] for r in labelled if r["label"] == GOOD],
                  "defective": [r["image_score"] for r in labelled if r["label"] != GOOD]}
    else:
        groups = {"all images": [r["image_score"] for r in ok]}
    run_thresholds = dict(info.get("thresholds") or {})
    lines = {"run threshold": run_thresholds.get("image")}
    if selected is not None:
        lines["selected threshold"] = selected["image"]
    figures["histogram"] = (write("histogram.png", report.histogram_figure(
        groups, lines, "Image scores" + (": good vs defective" if has_labels else ""))), "histogram of image scores")

    scale = report.global_scale(r["pixel_max"] for r in ok)
    colorbar = write("colorbar.png", report.colorbar_figure(*scale))
    top_rows = ok[:max(0, top)]
    originals = read_originals([r["uri"] for r in top_rows])
    pixel_threshold = (selected or {}).get("pixel")
    source = run_thresholds.get("source", "config") if run_thresholds.get("pixel") is not None else "run"
    anchors = {i: f"row-{i + 1}" for i in range(len(ok))}
    cards = []
    for rank, row in enumerate(top_rows, 1):
        card = _thumbs(rank, row, originals[row["uri"]], masks_root if has_labels else None, scale, pixel_threshold,
                       f"run's {source} threshold", write)
        card["anchor"] = anchors[rank - 1]
        card["name"] = row["uri"].rsplit("/", 1)[-1]
        cards.append(card)
        if rank % 10 == 0:
            say(f"report: {rank}/{len(top_rows)} gallery images drawn")

    warnings = []
    if config.get("weights") == "random":
        warnings.append("This run used RANDOM backbone weights (weights: random): its scores are meaningless; "
                        "it only exercises the plumbing.")
    if errors:
        warnings.append(f"{len(errors)} images could not be scored; see Errors.")
    counts = {"rows": len(rows), "scored": len(ok), "errors": len(errors)}
    if has_labels:
        counts |= {"good": sum(r["label"] == GOOD for r in labelled), "defective": sum(r["label"] != GOOD for r in labelled)}
    counts["unlabelled"] = len(ok) - len(labelled)
    run_facts = {"scores": scores_url, "images": info.get("images"), "gallery": f"{info.get('gallery')} ({info.get('gallery_hash')})",
                 "scored at": info.get("scored_at"), "backbone": f"{config.get('backbone')} (weights: {config.get('weights')})",
                 "layers / K / κ": f"{', '.join(config.get('layers', []))} / {config.get('k')} / {config.get('kappa')}",
                 "resize / crop": f"{config.get('resize')} / {config.get('crop')}",
                 "ground truth": masks_root or "none (no --masks)",
                 "heatmap scale": f"{scale[0]:.4g} (blue) … {scale[1]:.4g} (red), the same for every image"}
    page = report.render_page({
        "title": f"SPADE report: {scores_url.rstrip('/').rsplit('/', 1)[-1]}", "run": run_facts, "warnings": warnings,
        "counts": counts, "has_labels": has_labels, "has_masks": masks_root is not None,
        "metrics_rows": metrics_table(result) if result else [], "thresholds": run_thresholds, "selected": selected,
        "operating_points": operating_points([r["label"] != GOOD for r in labelled], [r["image_score"] for r in labelled],
                                             run_thresholds.get("image")) if has_labels else [],
        "figures": figures, "colorbar": colorbar, "cards": cards, "rows": ok, "anchors": anchors,
        "top_ranks": {i: i + 1 for i in range(len(top_rows))}, "errors": errors, "problems": problems,
        "curve_note": curve_note,
    })
    index = storage.join(out_url, "index.html")
    storage.atomic_write_bytes(index, page.encode())
    say(f"report: {index} ({len(cards)} gallery images, {len(written)} pictures in {storage.join(out_url, 'img')}); "
        "open it in a browser")
    return {"html": index, "pictures": len(written), "gallery": len(cards), "scored": len(ok), "errors": len(errors),
            "metrics": metrics_table(result) if result else None, "thresholds": selected}
